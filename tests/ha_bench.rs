//! High-availability figures of the three-instance cluster (`bench/ha.sh` runs this): recovery
//! time of a pod loss (kill -9), a hung primary (SIGSTOP) and a Postgres crash under a live
//! pgwarden; write unavailability of a switchover and of a primary's SIGTERM; acknowledged
//! commits lost. It prints figures rather than asserting them, so it is `#[ignore]`d: run it
//! with `cargo test --release --test ha_bench -- --ignored --nocapture --test-threads=1`.
//!
//! One cluster at pgwarden's default instance configuration (monitor 2 s, `api_timeout` 5 s),
//! as users run it, with the default failover timings (Lease 10 s, renew deadline 6 s, retry
//! 2 s) and quorum commit with one synchronous standby. `PGW_BENCH_MODE=async` measures
//! asynchronous replication instead; `PGW_BENCH_PROFILE=fast` the fast profile (Lease 5 s,
//! renew deadline 3 s, retry 1 s, with `kubernetes.api_timeout` 2 s, which must stay under the
//! renew deadline). A timed writer inserts increasing ids on whichever instance takes them and
//! records when each commit was acknowledged; every figure comes from those acknowledgements:
//!
//! - recovery time (pod loss, hung primary, Postgres crash): from the failure to the first
//!   acknowledged write after it (on another instance for the first two);
//! - unavailability (switchover, SIGTERM): the longest gap between consecutive acknowledged
//!   writes from the last one before the request until every instance streams again. Not only
//!   until the first write on the new primary: a new primary can take a few writes and then
//!   stall (its commits waiting for a standby that has not reconnected yet).
//!
//! Supporting figures: the longest gap after that first write; when the primary after the
//! failure first had a synchronous standby streaming, and how many writes it acknowledged
//! before (writes no standby had confirmed, whatever quorum commit promises).
//!
//! Each scenario runs `PGW_BENCH_RUNS` times (default 10), with every instance streaming from
//! the primary before each run; `PGW_BENCH_SCENARIOS` selects some of them. After each run every
//! id acknowledged so far is looked up on the primary. Every wait is bounded (`LONG`): a run
//! that hangs panics, naming what it waited for, and the instances' logs are printed.
//!
//! At the end, with the writer stopped and every instance streaming, the footprint of each
//! pgwarden process alone (not Postgres): `VmRSS`, and its CPU time (utime + stime of all its
//! threads) over `PGW_BENCH_IDLE_SECONDS` (default 60; 0 skips it) as a percentage of one core.
//! Besides the tables, every figure is printed as a `ha-bench-figure` line for `bench/ha.sh
//! --with-patroni`, which sets the same figures of Patroni beside them.

mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use support::cluster::{connect_within, eventually, quorum, Cluster, SWITCHOVER_TO};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

/// Bound on every wait of a run.
const LONG: Duration = Duration::from_secs(120);
/// The writer's connect timeout (TCP connect and start-up exchange).
const CONNECT: Duration = Duration::from_secs(1);
/// The writer's bound on one INSERT, enforced by the client (see [`insert`]).
const STATEMENT: Duration = Duration::from_secs(2);
/// Pause after a failed attempt on one instance.
const RETRY: Duration = Duration::from_millis(50);
/// Pause after an acknowledged commit.
const PACE: Duration = Duration::from_millis(10);
/// Acknowledged writes on the primary before each failure (steady state) and after it.
const SETTLE_WRITES: usize = 20;
/// `supervision.crash_window` of every instance: short, so that each Postgres crash run is the
/// first crash within the window (restarted after the initial 500 ms backoff) instead of a
/// crash loop whose backoff doubles and which gives the Lease up at the fourth crash.
const CRASH_WINDOW: Duration = Duration::from_secs(5);
const TABLE: &str = "bench_writes";

/// What `PGW_BENCH_MODE` and `PGW_BENCH_PROFILE` select.
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// Quorum commit (ANY 1, never degraded) rather than asynchronous replication.
    quorum: bool,
    /// `spec.failover`: lease duration, renew deadline and retry period, in seconds.
    lease: u64,
    renew_deadline: u64,
    retry: u64,
    /// `kubernetes.api_timeout` when it differs from pgwarden's default (5 s).
    api_timeout: Option<&'static str>,
}

impl Setup {
    fn from_env() -> Setup {
        let quorum = match std::env::var("PGW_BENCH_MODE").as_deref() {
            Err(_) | Ok("quorum") => true,
            Ok("async") => false,
            Ok(other) => panic!("PGW_BENCH_MODE must be quorum or async, not {other:?}"),
        };
        match std::env::var("PGW_BENCH_PROFILE").as_deref() {
            // The defaults of `spec.failover` and of pgwarden's configuration.
            Err(_) | Ok("default") => Setup {
                quorum,
                lease: 10,
                renew_deadline: 6,
                retry: 2,
                api_timeout: None,
            },
            // pgwarden refuses a renew deadline that is not longer than its api_timeout.
            Ok("fast") => Setup {
                quorum,
                lease: 5,
                renew_deadline: 3,
                retry: 1,
                api_timeout: Some("2s"),
            },
            Ok(other) => panic!("PGW_BENCH_PROFILE must be default or fast, not {other:?}"),
        }
    }

    fn mode(self) -> &'static str {
        if self.quorum {
            "quorum"
        } else {
            "async"
        }
    }

    fn profile(self) -> &'static str {
        if self.api_timeout.is_some() {
            "fast"
        } else {
            "default"
        }
    }

    fn describe(self) -> String {
        format!(
            "profile {}: lease {} s / renew deadline {} s / retry {} s, api_timeout {}, monitor 2 s \
             (pgwarden's defaults otherwise); {}",
            self.profile(),
            self.lease,
            self.renew_deadline,
            self.retry,
            self.api_timeout.unwrap_or("5s"),
            if self.quorum {
                "quorum commit (ANY 1)"
            } else {
                "asynchronous replication"
            }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The timed writer.

/// One acknowledged commit: when the INSERT returned, its id, the instance that took it, and
/// when the session it came on was opened.
#[derive(Debug, Clone, Copy)]
struct Ack {
    at: Instant,
    id: i64,
    on: usize,
    session: Instant,
}

/// The writer's session on instance `on`, opened at `opened`.
struct Session {
    on: usize,
    opened: Instant,
    client: Client,
}

/// Inserts increasing ids into [`TABLE`] on whichever instance takes them and records every
/// acknowledged commit with its time. It keeps one session while writes succeed (one INSERT,
/// then [`PACE`]). When that session fails it tries every instance at once, each on its own
/// session retried every [`RETRY`], and keeps the first that acknowledges a write: a hung
/// instance (whose connects and statements only time out) delays no other, and a standby's
/// session, kept across its read-only errors, takes writes the moment it is promoted.
struct TimedWriter {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    task: Option<JoinHandle<()>>,
}

type Client = tokio_postgres::Client;

impl TimedWriter {
    fn start(ports: Vec<u16>) -> TimedWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
        let task = tokio::spawn(write_loop(ports, stop.clone(), acks.clone()));
        TimedWriter {
            stop,
            acks,
            task: Some(task),
        }
    }

    fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    fn ids(&self) -> Vec<i64> {
        self.acks.lock().unwrap().iter().map(|a| a.id).collect()
    }

    /// The acknowledgements from `from` (inclusive) to `to` (inclusive), in time order.
    fn between(&self, from: Instant, to: Instant) -> Vec<Ack> {
        let acks = self.acks.lock().unwrap();
        let start = acks.partition_point(|a| a.at < from);
        acks[start..]
            .iter()
            .take_while(|a| a.at <= to)
            .copied()
            .collect()
    }

    /// The last acknowledgement at or before `t`.
    fn last_before(&self, t: Instant) -> Option<Ack> {
        let acks = self.acks.lock().unwrap();
        let end = acks.partition_point(|a| a.at <= t);
        end.checked_sub(1).map(|k| acks[k])
    }

    /// The first acknowledgement after `t` for which `pred` holds, if there is one yet.
    fn first_after(&self, t: Instant, pred: &impl Fn(&Ack) -> bool) -> Option<Ack> {
        let acks = self.acks.lock().unwrap();
        let start = acks.partition_point(|a| a.at <= t);
        acks[start..].iter().find(|a| pred(a)).copied()
    }

    /// How many acknowledgements after `t` satisfy `pred`.
    fn count_after(&self, t: Instant, pred: &impl Fn(&Ack) -> bool) -> usize {
        let acks = self.acks.lock().unwrap();
        let start = acks.partition_point(|a| a.at <= t);
        acks[start..].iter().filter(|a| pred(a)).count()
    }

    async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            assert!(
                timeout(Duration::from_secs(30), task).await.is_ok(),
                "the timed writer did not stop within 30 s"
            );
        }
    }
}

impl Drop for TimedWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// One INSERT of `id`, bounded by [`STATEMENT`] on the client side: `Ok` with the time of the
/// acknowledgement, or `Err(keep)` where `keep` says the session is still usable (a statement
/// error such as "read-only transaction"). The bound is not a server-side `statement_timeout`
/// on purpose: a commit waiting for its synchronous standby that gets cancelled is reported as
/// a success (with a warning) although no standby has it, which would count a commit that
/// quorum commit never promised as "acknowledged". Dropping the future sends no cancel; the
/// session is then dropped and the commit never acknowledged.
async fn insert(c: &Client, id: i64) -> Result<Instant, bool> {
    let sql = format!("INSERT INTO {TABLE} (id) VALUES ($1)");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
    match timeout(STATEMENT, c.execute(sql.as_str(), &params)).await {
        Ok(Ok(1)) => Ok(Instant::now()),
        Ok(Ok(_)) => Err(true),
        Ok(Err(e)) => Err(e.as_db_error().is_some() && !c.is_closed()),
        Err(_) => Err(false),
    }
}

/// Writes on instance `on` (port `port`) until a commit is acknowledged; None once stopped.
async fn attempt_on(
    on: usize,
    port: u16,
    next: &AtomicI64,
    stop: &AtomicBool,
) -> Option<(Session, Ack)> {
    let mut session: Option<Session> = None;
    while !stop.load(Ordering::SeqCst) {
        let Some(s) = session.take() else {
            let opened = Instant::now();
            session = connect_within(port, CONNECT, None)
                .await
                .map(|client| Session { on, opened, client });
            if session.is_none() {
                sleep(RETRY).await;
            }
            continue;
        };
        let id = next.fetch_add(1, Ordering::SeqCst);
        match insert(&s.client, id).await {
            Ok(at) => {
                let ack = Ack {
                    at,
                    id,
                    on,
                    session: s.opened,
                };
                return Some((s, ack));
            }
            Err(keep) => {
                if keep {
                    session = Some(s);
                }
                sleep(RETRY).await;
            }
        }
    }
    None
}

async fn write_loop(ports: Vec<u16>, stop: Arc<AtomicBool>, acks: Arc<Mutex<Vec<Ack>>>) {
    // Whatever the test does, the writer does not outlive this.
    let deadline = Instant::now() + Duration::from_secs(6 * 3600);
    let next = AtomicI64::new(1);
    let mut current: Option<Session> = None;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let Some(s) = current.take() else {
            // Every instance at once; the first acknowledged write wins, the other attempts
            // are dropped (with their sessions: nothing they had in flight was acknowledged).
            type Attempt<'a> = Pin<Box<dyn Future<Output = Option<(Session, Ack)>> + Send + 'a>>;
            let attempts: Vec<Attempt<'_>> = ports
                .iter()
                .enumerate()
                .map(|(i, &port)| Box::pin(attempt_on(i, port, &next, &stop)) as Attempt<'_>)
                .collect();
            let (won, _, _) = futures::future::select_all(attempts).await;
            if let Some((s, ack)) = won {
                acks.lock().unwrap().push(ack);
                current = Some(s);
                sleep(PACE).await;
            }
            continue;
        };
        let id = next.fetch_add(1, Ordering::SeqCst);
        if let Ok(at) = insert(&s.client, id).await {
            acks.lock().unwrap().push(Ack {
                at,
                id,
                on: s.on,
                session: s.opened,
            });
            current = Some(s);
            sleep(PACE).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Waits.

/// Waits for the first acknowledged write after `after` satisfying `pred`.
async fn first_ack(
    c: &Cluster,
    w: &TimedWriter,
    what: &str,
    after: Instant,
    pred: impl Fn(&Ack) -> bool,
) -> Ack {
    let deadline = Instant::now() + LONG;
    loop {
        if let Some(a) = w.first_after(after, &pred) {
            return a;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {LONG:?} waiting for {what} ({} writes acknowledged in all)\n{}",
                w.count(),
                c.describe().await
            );
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for `n` acknowledged writes on instance `on`, counted from now.
async fn writes_on(c: &Cluster, w: &TimedWriter, on: usize, n: usize) {
    let from = Instant::now();
    let deadline = from + LONG;
    while w.count_after(from, &|a| a.on == on) < n {
        if Instant::now() > deadline {
            panic!(
                "timed out after {LONG:?} waiting for {n} acknowledged writes on {}\n{}",
                c.name(on),
                c.describe().await
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// Every instance streaming from the primary, and the writer writing on it; returns it.
async fn steady(c: &Cluster, w: &TimedWriter) -> usize {
    let p = c.wait_all_streaming(LONG).await;
    writes_on(c, w, p, SETTLE_WRITES).await;
    p
}

/// Ids of `ids` that the primary `p` does not have.
async fn missing_on(c: &Cluster, p: usize, ids: &[i64]) -> Vec<i64> {
    let what = format!("the acknowledged ids looked up on {}", c.name(p));
    let port = c.port(p);
    eventually(&what, LONG, async || {
        let client = connect_within(port, Duration::from_secs(3), None).await?;
        let sql = format!(
            "SELECT x FROM unnest($1::bigint[]) AS x \
             WHERE NOT EXISTS (SELECT 1 FROM {TABLE} w WHERE w.id = x) ORDER BY x"
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
        let rows = timeout(Duration::from_secs(60), client.query(sql.as_str(), &params))
            .await
            .ok()?
            .ok()?;
        Some(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
    })
    .await
}

/// How long after `t0` the Postgres on `port` answers a query again (polled every 20 ms): when
/// a restarted primary is back, whether or not its commits can complete yet.
async fn answering_again(port: u16, t0: Instant) -> Duration {
    let deadline = t0 + LONG;
    loop {
        if let Some(client) = connect_within(port, CONNECT, None).await {
            if let Ok(Ok(_)) = timeout(STATEMENT, client.simple_query("SELECT 1")).await {
                return t0.elapsed();
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {LONG:?} waiting for Postgres on port {port} to answer again"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the primary on `port` every 20 ms (for at most a minute) until a standby streams to it
/// as a synchronous (quorum) standby (at once `(None, None)` with asynchronous replication). Returns when that was first seen, and when the last poll
/// that saw none was sent: a write that primary acknowledged before then had no standby to
/// confirm it.
async fn watch_sync(port: u16, quorum: bool) -> (Option<Instant>, Option<Instant>) {
    if !quorum {
        // No synchronous standby to wait for.
        return (None, None);
    }
    let sql = "SELECT count(*) FROM pg_stat_replication \
               WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum')";
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_none = None;
    let mut client: Option<Client> = None;
    while Instant::now() < deadline {
        if client.is_none() {
            client = connect_within(port, CONNECT, None).await;
        }
        if let Some(c) = &client {
            let sent = Instant::now();
            match timeout(STATEMENT, c.query_one(sql, &[])).await {
                Ok(Ok(row)) if row.get::<_, i64>(0) > 0 => {
                    return (Some(Instant::now()), last_none)
                }
                Ok(Ok(_)) => last_none = Some(sent),
                _ => client = None,
            }
        }
        sleep(Duration::from_millis(20)).await;
    }
    (None, last_none)
}

/// How many "switchover refused" records every instance has logged so far.
fn refusals(c: &Cluster) -> usize {
    (0..c.len())
        .map(|i| c.output(i).matches("switchover refused").count())
        .sum()
}

/// After a switchover request at `t0` (with `before` refusals logged until then): the first
/// acknowledged write on another instance than `p`, or None once a new refusal is logged and
/// no such write came.
async fn switched_or_refused(
    c: &Cluster,
    w: &TimedWriter,
    p: usize,
    t0: Instant,
    before: usize,
) -> Option<Ack> {
    let deadline = Instant::now() + LONG;
    loop {
        if let Some(a) = w.first_after(t0, &|a: &Ack| a.on != p) {
            return Some(a);
        }
        if refusals(c) > before {
            return None;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {LONG:?} waiting for the switchover or its refusal\n{}",
                c.describe().await
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// The standby of `p` with the most WAL replayed.
async fn most_advanced_standby(c: &Cluster, p: usize) -> usize {
    let sql = "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::float8";
    let mut best: Option<(usize, f64)> = None;
    for i in c.others(p) {
        let lsn: f64 = eventually("a standby's replay position", LONG, async || {
            c.query_value::<f64>(i, sql).await
        })
        .await;
        if best.is_none_or(|(_, b)| lsn > b) {
            best = Some((i, lsn));
        }
    }
    best.expect("a standby").0
}

/// The longest gap between consecutive acknowledged writes from `from` to `to`.
fn longest_gap(w: &TimedWriter, from: Instant, to: Instant) -> Duration {
    w.between(from, to)
        .windows(2)
        .map(|pair| pair[1].at.duration_since(pair[0].at))
        .max()
        .unwrap_or_default()
}

/// The wall-clock time of day (UTC, to the millisecond), to match progress lines with the
/// instances' logs.
fn clock() -> String {
    clock_at(Instant::now())
}

/// [`clock`] for an earlier moment.
fn clock_at(t: Instant) -> String {
    let ms = (std::time::SystemTime::now() - t.elapsed())
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// The records of every instance about roles (pgwarden's elector and supervisor, Postgres's
/// promotion and start-up), in time order, whose time of day lies between `from` and `to` (as
/// [`clock`] writes them; the harness's pgwarden logs JSON).
fn ha_records(c: &Cluster, from: &str, to: &str) -> Vec<String> {
    let (from, to) = (&from[..12], &to[..12]);
    let mut out: Vec<(String, String)> = Vec::new();
    for i in 0..c.len() {
        for line in c.output(i).lines() {
            let wanted = line.contains("pgwarden::ha")
                || line.contains("pgwarden::supervisor")
                || ["promote", "timeline", "ready to accept", "redo", "recovery"]
                    .iter()
                    .any(|w| line.contains(w));
            if !wanted {
                continue;
            }
            let Some(k) = line.find("\"timestamp\":\"") else {
                continue;
            };
            let Some((_, time)) = line[k + 13..].split_once('T') else {
                continue;
            };
            let time = time.get(..12).unwrap_or(time).to_string();
            if from <= time.as_str() && time.as_str() <= to {
                let text: String = line.chars().take(400).collect();
                out.push((time, format!("{}: {text}", c.name(i))));
            }
        }
    }
    out.sort();
    out.into_iter().map(|(_, line)| line).collect()
}

/// `crashes_in_window` of the last "exited unexpectedly" record in `output`, if any.
fn crashes_in_window(output: &str) -> Option<u32> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.contains("exited unexpectedly"))?;
    let rest = &line[line.find("crashes_in_window")? + "crashes_in_window".len()..];
    let digits: String = rest
        .chars()
        .skip_while(|ch| !ch.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Scenarios and figures.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scenario {
    PodLoss,
    Hung,
    Crash,
    Switchover,
    Sigterm,
}

impl Scenario {
    const ALL: [Scenario; 5] = [
        Scenario::PodLoss,
        Scenario::Hung,
        Scenario::Crash,
        Scenario::Switchover,
        Scenario::Sigterm,
    ];

    fn label(self) -> &'static str {
        match self {
            Scenario::PodLoss => "pod loss (kill -9), recovery",
            Scenario::Hung => "hung primary (SIGSTOP), recovery",
            Scenario::Crash => "postgres crash, pgwarden alive, recovery",
            Scenario::Switchover => "switchover, unavailability",
            Scenario::Sigterm => "primary SIGTERM, unavailability",
        }
    }

    /// The name `PGW_BENCH_SCENARIOS` selects it by.
    fn key(self) -> &'static str {
        match self {
            Scenario::PodLoss => "pod-loss",
            Scenario::Hung => "hung",
            Scenario::Crash => "crash",
            Scenario::Switchover => "switchover",
            Scenario::Sigterm => "sigterm",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Scenario::PodLoss => "pod loss",
            Scenario::Hung => "hung primary",
            Scenario::Crash => "postgres crash",
            Scenario::Switchover => "switchover",
            Scenario::Sigterm => "SIGTERM",
        }
    }

    /// The target in seconds, and whether it is "at most" (true) or "under" (false).
    fn target(self, setup: Setup) -> (f64, bool) {
        match self {
            Scenario::PodLoss | Scenario::Hung => ((setup.lease + 2) as f64, true),
            Scenario::Crash => (3.0, false),
            Scenario::Switchover | Scenario::Sigterm => (2.0, false),
        }
    }
}

/// What one run measured.
struct Outcome {
    /// The failure (or the request).
    t0: Instant,
    /// The first acknowledged write after it that counts (on the new or restarted primary).
    first: Ack,
    /// What [`watch_sync`] saw on that primary.
    sync: (Option<Instant>, Option<Instant>),
}

#[derive(Default)]
struct Figures {
    /// The headline figure of each run, in seconds.
    seconds: Vec<f64>,
    /// Acknowledged commits found missing.
    lost: usize,
    /// Seconds from the failure until the primary had a synchronous standby streaming.
    sync_seconds: Vec<f64>,
    /// Runs where it had none within a minute.
    sync_never: usize,
    /// Writes the primary acknowledged before it had a synchronous standby.
    unprotected: usize,
    /// The longest gap between acknowledged writes after the first one that counts, until every
    /// instance streamed again.
    stall: Vec<f64>,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn print_table(
    setup: Setup,
    figures: &[(Scenario, Figures)],
    runs: usize,
    total_acks: usize,
    lost: usize,
) {
    println!();
    println!(
        "HA figures: 3 instances, {}, {runs} runs per scenario",
        setup.describe()
    );
    println!(
        "{:<42} {:>4} {:>7} {:>7} {:>7} {:>7} {:>8} {:>5}  verdict (max)",
        "scenario", "runs", "min s", "median", "p90", "max s", "target", "lost"
    );
    for (s, f) in figures {
        let mut v = f.seconds.clone();
        v.sort_by(f64::total_cmp);
        let (target, at_most) = s.target(setup);
        let target_text = format!("{}{target:.0} s", if at_most { "<=" } else { "<" });
        if v.is_empty() {
            println!("{:<42} {:>4} {:>39}", s.label(), 0, "-");
            continue;
        }
        let max = v[v.len() - 1];
        let ok = if at_most { max <= target } else { max < target };
        println!(
            "{:<42} {:>4} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>8} {:>5}  {}",
            s.label(),
            v.len(),
            v[0],
            median(&v),
            percentile(&v, 0.9),
            max,
            target_text,
            f.lost,
            if ok { "OK" } else { "MISS" }
        );
    }
    println!(
        "acknowledged commits lost: {lost} of {total_acks} acknowledged (target 0): {}",
        if lost == 0 { "OK" } else { "MISS" }
    );
    println!();
    println!(
        "(info) after the first write that counts: the longest gap between writes until every \
         instance streamed again; when that primary had a synchronous standby streaming (seconds \
         after the failure) and how many writes it acknowledged before"
    );
    println!(
        "{:<42} {:>4} {:>13} {:>13} {:>6} {:>12}",
        "scenario", "runs", "gap med/max", "sync med/max", "never", "acked before"
    );
    let pair = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        match v.last() {
            Some(max) => format!("{:.2}/{max:.2}", median(&v)),
            None => "-".to_string(),
        }
    };
    for (s, f) in figures {
        println!(
            "{:<42} {:>4} {:>13} {:>13} {:>6} {:>12}",
            s.label(),
            f.stall.len(),
            pair(&f.stall),
            pair(&f.sync_seconds),
            f.sync_never,
            f.unprotected
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark: prints figures; run through bench/ha.sh"]
async fn ha_figures() {
    let runs: usize = match std::env::var("PGW_BENCH_RUNS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&n| n >= 1)
            .unwrap_or_else(|| panic!("PGW_BENCH_RUNS must be a whole number >= 1, not {v:?}")),
        Err(_) => 10,
    };
    let scenarios: Vec<Scenario> = match std::env::var("PGW_BENCH_SCENARIOS") {
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                Scenario::ALL
                    .into_iter()
                    .find(|s| s.key() == k)
                    .unwrap_or_else(|| {
                        panic!(
                            "PGW_BENCH_SCENARIOS: unknown scenario {k:?} (known: {})",
                            Scenario::ALL.map(Scenario::key).join(", ")
                        )
                    })
            })
            .collect(),
        Err(_) => Scenario::ALL.to_vec(),
    };
    let idle_seconds: u64 = match std::env::var("PGW_BENCH_IDLE_SECONDS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("PGW_BENCH_IDLE_SECONDS must be a whole number, not {v:?}")),
        Err(_) => 60,
    };
    let setup = Setup::from_env();
    eprintln!("ha-bench: {}", setup.describe());
    let started = Instant::now();
    // Keys before the first table header land in [kubernetes] (see Cluster::spawn).
    let extra = format!(
        "{}[supervision]\ncrash_window = \"{}s\"\n",
        setup
            .api_timeout
            .map_or_else(String::new, |t| format!("api_timeout = \"{t}\"\n")),
        CRASH_WINDOW.as_secs()
    );
    let mut c = Cluster::start_at_defaults_with(
        3,
        |spec| {
            if setup.quorum {
                quorum(spec);
            }
            spec["failover"] = json!({
                "leaseDurationSeconds": setup.lease,
                "renewDeadlineSeconds": setup.renew_deadline,
                "retryPeriodSeconds": setup.retry,
            });
        },
        &extra,
    );
    let p = c.wait_all_streaming(Duration::from_secs(180)).await;
    eprintln!(
        "ha-bench: cluster ready after {:.1} s, primary {}; {runs} runs per scenario",
        started.elapsed().as_secs_f64(),
        c.name(p)
    );
    let port = c.port(p);
    eventually(&format!("the {TABLE} table"), LONG, async || {
        // No statement timeout: with quorum commit the DDL waits for a standby.
        let client = connect_within(port, Duration::from_secs(3), None).await?;
        let sql = format!("CREATE TABLE IF NOT EXISTS {TABLE} (id bigint PRIMARY KEY)");
        timeout(Duration::from_secs(30), client.batch_execute(&sql))
            .await
            .ok()?
            .ok()
    })
    .await;
    let w = TimedWriter::start(c.ports());

    let mut lost: BTreeSet<i64> = BTreeSet::new();
    let mut last_crash: Vec<Option<Instant>> = vec![None; c.len()];
    let mut figures: Vec<(Scenario, Figures)> = Vec::new();
    for scenario in scenarios {
        let mut f = Figures::default();
        for run in 1..=runs {
            let p = steady(&c, &w).await;
            let name = c.name(p).to_string();
            let tag = format!("ha-bench: {} {run}/{runs}", scenario.short());
            let o = match scenario {
                Scenario::PodLoss => {
                    let t0 = Instant::now();
                    let at = clock();
                    c.kill9(p);
                    let a = first_ack(&c, &w, "a write on a new primary", t0, |a| a.on != p).await;
                    eprintln!(
                        "{tag}: {name} killed at {at}; first write on {} after {:.2} s",
                        c.name(a.on),
                        a.at.duration_since(t0).as_secs_f64()
                    );
                    c.restart(p);
                    let sync = watch_sync(c.port(a.on), setup.quorum).await;
                    Outcome { t0, first: a, sync }
                }
                Scenario::Hung => {
                    let t0 = Instant::now();
                    let at = clock();
                    c.stop_node(p);
                    let a = first_ack(&c, &w, "a write on a new primary", t0, |a| a.on != p).await;
                    eprintln!(
                        "{tag}: {name} stopped at {at}; first write on {} after {:.2} s",
                        c.name(a.on),
                        a.at.duration_since(t0).as_secs_f64()
                    );
                    let port = c.port(a.on);
                    let (_, sync) = tokio::join!(c.cont_node(p), watch_sync(port, setup.quorum));
                    Outcome { t0, first: a, sync }
                }
                Scenario::Crash => {
                    // Each crash the first in its instance's crash window (see CRASH_WINDOW).
                    if let Some(t) = last_crash[p] {
                        let quiet = CRASH_WINDOW + Duration::from_secs(1);
                        if t.elapsed() < quiet {
                            sleep(quiet - t.elapsed()).await;
                        }
                        writes_on(&c, &w, p, SETTLE_WRITES).await;
                    }
                    let pid = c.nodes[p]
                        .sb
                        .postmaster_pid()
                        .unwrap_or_else(|| panic!("{name}: no postmaster.pid"));
                    let t0 = Instant::now();
                    let at = clock();
                    kill(Pid::from_raw(pid), Signal::SIGKILL)
                        .unwrap_or_else(|e| panic!("{name}: SIGKILL of postmaster {pid}: {e}"));
                    last_crash[p] = Some(t0);
                    // Sessions opened before the crash die with it: a write acknowledged on one
                    // of them after t0 was committed before the crash.
                    let (a, up) = tokio::join!(
                        first_ack(
                            &c,
                            &w,
                            "a write on a session opened after the crash",
                            t0,
                            |a| a.session > t0
                        ),
                        answering_again(c.port(p), t0)
                    );
                    let note = if a.on == p {
                        String::new()
                    } else {
                        format!(" (NOT the crashed primary {name}: it failed over)")
                    };
                    eprintln!(
                        "{tag}: {name}'s postmaster {pid} killed at {at}; answering queries again \
                         after {:.2} s; first write on {} after {:.2} s{note}; pgwarden logged \
                         crashes_in_window={}",
                        up.as_secs_f64(),
                        c.name(a.on),
                        a.at.duration_since(t0).as_secs_f64(),
                        crashes_in_window(&c.output(p))
                            .map_or_else(|| "?".to_string(), |n| n.to_string())
                    );
                    let sync = watch_sync(c.port(a.on), setup.quorum).await;
                    Outcome { t0, first: a, sync }
                }
                Scenario::Switchover => {
                    let to = most_advanced_standby(&c, p).await;
                    // A request pgwarden refuses (its view of the target not caught up yet,
                    // e.g. just after the previous run) is made again, as a user would; the
                    // figures count from the request that was carried out.
                    let mut refused = 0;
                    let (t0, at, a) = loop {
                        let before = refusals(&c);
                        let t0 = Instant::now();
                        let at = clock();
                        c.annotate(SWITCHOVER_TO, Some(c.name(to)));
                        if let Some(a) = switched_or_refused(&c, &w, p, t0, before).await {
                            break (t0, at, a);
                        }
                        refused += 1;
                        assert!(
                            refused < 10,
                            "{tag}: the switchover was refused {refused} times"
                        );
                        eventually("the refused annotation removed", LONG, async || {
                            c.annotation(SWITCHOVER_TO).is_none().then_some(())
                        })
                        .await;
                        sleep(Duration::from_secs(1)).await;
                    };
                    let note = if a.on == to {
                        String::new()
                    } else {
                        format!(" (NOT the requested {})", c.name(to))
                    };
                    eprintln!(
                        "{tag}: {name} -> {} requested at {at} ({refused} earlier requests \
                         refused); first write on {} after {:.2} s{note}",
                        c.name(to),
                        c.name(a.on),
                        a.at.duration_since(t0).as_secs_f64()
                    );
                    let (_, sync) = tokio::join!(
                        eventually("the switchover annotation removed", LONG, async || {
                            c.annotation(SWITCHOVER_TO).is_none().then_some(())
                        }),
                        watch_sync(c.port(a.on), setup.quorum)
                    );
                    Outcome { t0, first: a, sync }
                }
                Scenario::Sigterm => {
                    let t0 = Instant::now();
                    let at = clock();
                    c.sigterm(p);
                    let a =
                        first_ack(&c, &w, "a write on the new primary", t0, |a| a.on != p).await;
                    let port = c.port(a.on);
                    let (status, sync) =
                        tokio::join!(c.wait_exit(p, LONG), watch_sync(port, setup.quorum));
                    eprintln!(
                        "{tag}: {name} signalled at {at}, exited ({status}); first write on {} \
                         after {:.2} s",
                        c.name(a.on),
                        a.at.duration_since(t0).as_secs_f64()
                    );
                    c.restart(p);
                    Outcome { t0, first: a, sync }
                }
            };

            // Back to every instance streaming, with writes on the primary.
            let now = steady(&c, &w).await;
            let end = Instant::now();

            // The figures of the run.
            let before = w
                .last_before(o.t0)
                .expect("writes acknowledged before the failure");
            let first = o.first.at.duration_since(o.t0).as_secs_f64();
            let longest = longest_gap(&w, before.at, end).as_secs_f64();
            let stall = longest_gap(&w, o.first.at, end).as_secs_f64();
            let (seen, last_none) = o.sync;
            let on = o.first.on;
            let unprotected = last_none.map_or(0, |t| {
                w.between(o.t0, t).iter().filter(|a| a.on == on).count()
            });
            let sync = match seen {
                Some(t) => {
                    let s = t.duration_since(o.t0).as_secs_f64();
                    f.sync_seconds.push(s);
                    format!("after {s:.2} s")
                }
                None => {
                    f.sync_never += 1;
                    "NOT within a minute".to_string()
                }
            };
            f.unprotected += unprotected;
            f.stall.push(stall);
            let headline = match scenario {
                Scenario::Switchover | Scenario::Sigterm => longest,
                Scenario::PodLoss | Scenario::Hung | Scenario::Crash => first,
            };
            f.seconds.push(headline);
            eprintln!(
                "{tag}: first write after {first:.2} s; longest gap between writes {longest:.2} s \
                 (after the first write: {stall:.2} s); {} had a synchronous standby {sync} and \
                 acknowledged {unprotected} writes before",
                c.name(on)
            );
            // A failover slower than its target: what the instances did meanwhile.
            if matches!(scenario, Scenario::PodLoss | Scenario::Hung)
                && headline > scenario.target(setup).0
            {
                let records = ha_records(&c, &clock_at(o.t0), &clock_at(o.first.at));
                eprintln!(
                    "{tag}: over the target; the instances' records about roles from the failure \
                     to the first write ({} lines):",
                    records.len()
                );
                for line in &records[..records.len().min(200)] {
                    eprintln!("    {line}");
                }
            }

            // Every acknowledged id on the primary.
            let ids = w.ids();
            let missing = missing_on(&c, now, &ids).await;
            let new: Vec<i64> = missing
                .iter()
                .copied()
                .filter(|id| !lost.contains(id))
                .collect();
            if !new.is_empty() {
                eprintln!(
                    "{tag}: {} acknowledged commits MISSING on {}: first {:?}",
                    new.len(),
                    c.name(now),
                    &new[..new.len().min(20)]
                );
            }
            f.lost += new.len();
            lost.extend(new);
            eprintln!(
                "{tag}: primary {}, all streaming, {} acknowledged writes so far, {} lost",
                c.name(now),
                ids.len(),
                lost.len()
            );
        }
        figures.push((scenario, f));
    }

    let total = w.count();
    w.stop().await;
    let footprint = if idle_seconds > 0 {
        Some(idle_footprint(&mut c, Duration::from_secs(idle_seconds)).await)
    } else {
        None
    };
    eprintln!("ha-bench: done in {:.0} s", started.elapsed().as_secs_f64());
    print_table(setup, &figures, runs, total, lost.len());
    if let Some(fp) = &footprint {
        print_footprint(&c, fp, idle_seconds);
    }
    print_figure_lines(setup, runs, &figures, footprint.as_ref());
}

/// One pgwarden process's footprint while the cluster is idle.
struct Footprint {
    /// Whether the instance was the primary during the measurement.
    primary: bool,
    /// `VmRSS` at the end of the idle period, in KiB.
    rss_kib: u64,
    /// utime + stime over the idle period, in clock ticks, and as a percentage of one core.
    ticks: u64,
    cpu_percent: f64,
}

/// utime + stime (fields 14 and 15 of /proc/PID/stat) of the process itself, all its threads,
/// not its children (Postgres), in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // The fields after the command name, which is in parentheses and may contain anything.
    let (_, rest) = stat.rsplit_once(')').expect("a /proc/PID/stat line");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state).
    let field = |n: usize| -> u64 { fields[n - 3].parse().expect("a number of ticks") };
    field(14) + field(15)
}

/// `VmRSS` of the process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Every instance streaming and no writes: each pgwarden's CPU time over `idle`, and its
/// resident size at the end.
async fn idle_footprint(c: &mut Cluster, idle: Duration) -> Vec<Footprint> {
    let p = c.wait_all_streaming(LONG).await;
    // Let the last writes' replication and status updates settle.
    sleep(Duration::from_secs(5)).await;
    let pids: Vec<i32> = (0..c.len())
        .map(|i| {
            let w = c.nodes[i].warden.as_ref().expect("every pgwarden running");
            w.pid().as_raw()
        })
        .collect();
    eprintln!(
        "ha-bench: idle footprint of every pgwarden over {} s",
        idle.as_secs()
    );
    // Clock ticks per second of /proc/PID/stat (USER_HZ, 100 on Linux).
    let hz: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    let before: Vec<u64> = pids.iter().map(|&pid| cpu_ticks(pid)).collect();
    let t = Instant::now();
    sleep(idle).await;
    let elapsed = t.elapsed().as_secs_f64();
    let now_primary = c.wait_all_streaming(LONG).await;
    assert_eq!(
        p,
        now_primary,
        "the primary changed during the idle period ({} -> {})",
        c.name(p),
        c.name(now_primary)
    );
    pids.iter()
        .zip(before)
        .enumerate()
        .map(|(i, (&pid, b))| {
            let ticks = cpu_ticks(pid) - b;
            Footprint {
                primary: i == p,
                rss_kib: rss_kib(pid),
                ticks,
                cpu_percent: ticks as f64 / hz / elapsed * 100.0,
            }
        })
        .collect()
}

fn print_footprint(c: &Cluster, fp: &[Footprint], idle_seconds: u64) {
    println!();
    println!(
        "footprint of each pgwarden process alone (not Postgres), idle for {idle_seconds} s, \
         writer stopped"
    );
    println!(
        "{:<10} {:<8} {:>10} {:>7} {:>12}",
        "instance", "role", "VmRSS MiB", "ticks", "CPU % core"
    );
    for (i, f) in fp.iter().enumerate() {
        println!(
            "{:<10} {:<8} {:>10.1} {:>7} {:>12.3}",
            c.name(i),
            if f.primary { "primary" } else { "standby" },
            f.rss_kib as f64 / 1024.0,
            f.ticks,
            f.cpu_percent
        );
    }
}

/// The figures as `ha-bench-figure` lines (one per scenario: key, lost commits, and every run's
/// seconds; then the footprint), the format `bench/ha.sh --with-patroni` reads from both sides.
fn print_figure_lines(
    setup: Setup,
    runs: usize,
    figures: &[(Scenario, Figures)],
    footprint: Option<&Vec<Footprint>>,
) {
    println!();
    println!(
        "ha-bench-figure setup manager=pgwarden mode={} profile={} lease={} renew_deadline={} \
         retry={} runs={runs}",
        setup.mode(),
        setup.profile(),
        setup.lease,
        setup.renew_deadline,
        setup.retry
    );
    let join = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(",");
    for (s, f) in figures {
        let seconds = join(&mut f.seconds.iter().map(|x| format!("{x:.3}")));
        println!(
            "ha-bench-figure scenario {} lost={} seconds={}",
            s.key(),
            f.lost,
            if seconds.is_empty() { "-" } else { &seconds }
        );
    }
    if let Some(fp) = footprint {
        let rss = join(
            &mut fp
                .iter()
                .map(|f| format!("{:.1}", f.rss_kib as f64 / 1024.0)),
        );
        let cpu = join(&mut fp.iter().map(|f| format!("{:.3}", f.cpu_percent)));
        println!("ha-bench-figure footprint rss_mib={rss} cpu_percent={cpu}");
    }
}
