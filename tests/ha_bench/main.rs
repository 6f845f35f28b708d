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

#[path = "../support/mod.rs"]
mod support;

mod figures;
mod observe;
mod writer;

use figures::*;
use observe::*;
use writer::*;

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
