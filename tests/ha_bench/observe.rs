//! What a run waits for and looks at: writes on an instance, streaming, the synchronous
//! standby, refusals, the most advanced standby, clocks and the instances' HA records.

use super::*;

/// Waits for `n` acknowledged writes on instance `on`, counted from now.
pub(crate) async fn writes_on(c: &Cluster, w: &TimedWriter, on: usize, n: usize) {
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
pub(crate) async fn steady(c: &Cluster, w: &TimedWriter) -> usize {
    let p = c.wait_all_streaming(LONG).await;
    writes_on(c, w, p, SETTLE_WRITES).await;
    p
}

/// Ids of `ids` that the primary `p` does not have.
pub(crate) async fn missing_on(c: &Cluster, p: usize, ids: &[i64]) -> Vec<i64> {
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
pub(crate) async fn answering_again(port: u16, t0: Instant) -> Duration {
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
pub(crate) async fn watch_sync(port: u16, quorum: bool) -> (Option<Instant>, Option<Instant>) {
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
pub(crate) fn refusals(c: &Cluster) -> usize {
    (0..c.len())
        .map(|i| c.output(i).matches("switchover refused").count())
        .sum()
}

/// After a switchover request at `t0` (with `before` refusals logged until then): the first
/// acknowledged write on another instance than `p`, or None once a new refusal is logged and
/// no such write came.
pub(crate) async fn switched_or_refused(
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
pub(crate) async fn most_advanced_standby(c: &Cluster, p: usize) -> usize {
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

/// The wall-clock time of day (UTC, to the millisecond), to match progress lines with the
/// instances' logs.
pub(crate) fn clock() -> String {
    clock_at(Instant::now())
}

/// [`clock`] for an earlier moment.
pub(crate) fn clock_at(t: Instant) -> String {
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
pub(crate) fn ha_records(c: &Cluster, from: &str, to: &str) -> Vec<String> {
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
pub(crate) fn crashes_in_window(output: &str) -> Option<u32> {
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
