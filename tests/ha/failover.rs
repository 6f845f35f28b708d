//! Failover and hand-over: a killed, a hung and a partitioned primary; switchover by annotation, CLI and SIGTERM; the lag limit on promotion.

use super::*;

/// kill -9 of the primary, at the default timings: a standby takes over, the old primary comes
/// back as its standby; never two writable instances, and in quorum mode no acknowledged commit
/// lost (asynchronous mode may lose what no standby had received).
async fn killed_primary_fails_over(spec: fn(&mut Value), lossless: bool) {
    let mut c = Cluster::start_ready_at_defaults(3, spec).await;
    let (writer, checker) = writing(&c, 50).await;

    let old = c.wait_primary(LONG).await;
    c.kill9(old);
    let new = c.wait_new_primary(old, LONG).await;
    writer.wait_progress(50, LONG).await;
    let name = c.name(new).to_string();
    eventually(
        "status.currentPrimary naming the new primary",
        LONG,
        async || (c.current_primary().as_deref() == Some(name.as_str())).then_some(()),
    )
    .await;

    // The old primary, restarted, comes back as a standby of the new one.
    c.restart(old);
    assert_eq!(c.wait_streaming(old, LONG).await, new);
    writer.wait_progress(20, LONG).await;

    ending(&c, writer, checker, &[new, old], lossless).await;
    assert_no_configuration_errors(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_primary_fails_over_quorum() {
    killed_primary_fails_over(quorum, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_primary_fails_over_asynchronous() {
    killed_primary_fails_over(no_change, false).await;
}

/// Quorum mode only: SIGCONT resumes Postgres and pgwarden at once, and in asynchronous mode a
/// commit in flight at the hang may complete in the moment before the fence timer (which fires
/// at once, its deadline long past) stops it. Quorum commit makes that commit wait for a
/// standby, which now follows the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_primary_refuses_writes_after_resume() {
    let mut c = Cluster::start_ready_at_defaults(3, quorum).await;
    let (writer, checker) = writing(&c, 50).await;

    let old = c.wait_primary(LONG).await;
    // A session opened on the primary before it hangs.
    let stale = connect_within(c.port(old), Duration::from_secs(3), None)
        .await
        .expect("a session on the primary");
    stale.batch_execute("SELECT 1").await.unwrap();

    c.stop_node(old);
    let new = c.wait_new_primary(old, LONG).await;
    writer.wait_progress(50, LONG).await;
    c.cont_node(old).await;

    // The session from before the hang cannot commit anything.
    let r = timeout(
        Duration::from_secs(30),
        stale.execute("INSERT INTO ha_writes (id) VALUES (-1)", &[]),
    )
    .await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "the deposed primary acknowledged a write after resuming"
    );
    // Nor can new sessions, from resume until it has rejoined.
    for k in 0..10i64 {
        if let Some(s) = c.client(old).await {
            let r = timeout(
                Duration::from_secs(3),
                s.execute("INSERT INTO ha_writes (id) VALUES ($1)", &[&(-2 - k)]),
            )
            .await;
            assert!(
                !matches!(r, Ok(Ok(_))),
                "the deposed primary acknowledged a write from a new session"
            );
        }
        sleep(Duration::from_millis(500)).await;
    }

    assert_eq!(c.wait_streaming(old, LONG).await, new);
    let s = c.status(old).await;
    assert_eq!(s["ha"]["role"], "replica", "{s}");
    assert_eq!(s["postgres"]["role"], "replica", "{s}");
    writer.wait_progress(20, LONG).await;

    let acked = writer.stop().await;
    c.assert_no_loss(&acked, new).await;
    let stray: i64 = c
        .query_value(new, "SELECT count(*) FROM ha_writes WHERE id < 0")
        .await
        .expect("a count");
    assert_eq!(stray, 0, "a write on the deposed primary survived");
    checker.assert_clean().await;
}

/// The primary cut off from the API server, at the default timings: it stops writes before a
/// standby can take the Lease, stays up, and rejoins as a standby once the partition ends.
async fn partitioned_primary_fences_itself_and_rejoins(spec: fn(&mut Value), lossless: bool) {
    let mut c = Cluster::start_ready_at_defaults(3, spec).await;
    let (writer, checker) = writing(&c, 50).await;

    let old = c.wait_primary(LONG).await;
    c.partition(old, true);
    let new = c.wait_new_primary(old, LONG).await;
    // By the time another instance leads, the partitioned one takes no writes (it had to stop
    // within the renew deadline, before the Lease could expire for the others).
    assert_ne!(
        c.writable(old).await,
        Some(true),
        "the partitioned old primary still takes writes:\n{}",
        c.describe().await
    );
    let s = c.status(old).await;
    assert!(s.is_object(), "its pgwarden still answers");
    assert_ne!(s["ha"]["role"], "primary", "{s}");
    assert!(c.is_running(old), "its pgwarden stays up");
    assert_eq!(c.http_code(old, "/healthz").await, Some(200));
    writer.wait_progress(50, LONG).await;

    c.partition(old, false);
    assert_eq!(c.wait_streaming(old, LONG).await, new);
    let name = c.name(new).to_string();
    eventually(
        "status.currentPrimary naming the new primary",
        LONG,
        async || (c.current_primary().as_deref() == Some(name.as_str())).then_some(()),
    )
    .await;
    writer.wait_progress(20, LONG).await;

    ending(&c, writer, checker, &[new, old], lossless).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_primary_fences_itself_and_rejoins_quorum() {
    partitioned_primary_fences_itself_and_rejoins(quorum, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_primary_fences_itself_and_rejoins_asynchronous() {
    partitioned_primary_fences_itself_and_rejoins(no_change, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchover_by_annotation_and_by_cli() {
    let c = Cluster::start_ready(3, quorum).await;
    let (writer, checker) = writing(&c, 50).await;

    let first = c.wait_primary(LONG).await;
    let others = c.others(first);
    let (second, third) = (others[0], others[1]);

    // By annotation.
    c.annotate(SWITCHOVER_TO, Some(c.name(second)));
    let now = c.wait_new_primary(first, LONG).await;
    assert_eq!(now, second, "the requested target became primary");
    eventually("the switchover annotation removed", LONG, async || {
        c.annotation(SWITCHOVER_TO).is_none().then_some(())
    })
    .await;
    assert_eq!(c.wait_streaming(first, LONG).await, second);
    let name = c.name(second).to_string();
    eventually(
        "status.currentPrimary naming the target",
        LONG,
        async || (c.current_primary().as_deref() == Some(name.as_str())).then_some(()),
    )
    .await;
    writer.wait_progress(50, LONG).await;

    // By the CLI: it returns once the target is primary.
    let (status, out) = c.switchover_cli(c.name(third), LONG).await;
    assert!(status.success(), "{status}: {out}");
    let now = eventually(
        "the CLI's target as primary",
        Duration::from_secs(15),
        async || c.primary().await,
    )
    .await;
    assert_eq!(now, third, "{}", c.describe().await);
    assert_eq!(c.wait_streaming(second, LONG).await, third);
    assert_eq!(c.wait_streaming(first, LONG).await, third);
    assert_eq!(c.annotation(SWITCHOVER_TO), None);
    writer.wait_progress(50, LONG).await;

    // A target that does not exist is refused, with a message; nothing changes.
    let (status, out) = c.switchover_cli("pg-9", LONG).await;
    assert!(!status.success(), "switchover to pg-9 succeeded: {out}");
    assert!(!out.trim().is_empty(), "refused without a message");
    eventually("the refused annotation removed", LONG, async || {
        c.annotation(SWITCHOVER_TO).is_none().then_some(())
    })
    .await;
    assert_eq!(c.wait_primary(LONG).await, third);
    writer.wait_progress(20, LONG).await;

    no_loss_on(&c, writer, checker, &[third]).await;
    assert_no_configuration_errors(&c);
}

/// SIGTERM of the primary (a rolling restart), at the default timings: it hands over before it
/// exits, so no acknowledged commit is lost in either mode (the target received all of the
/// stopped primary's WAL first), and in asynchronous mode the target renews the Lease it was
/// handed before it takes writes: nobody fences.
async fn sigterm_of_primary_hands_over_before_stopping(spec: fn(&mut Value)) {
    let mut c = Cluster::start_ready_at_defaults(3, spec).await;
    let (writer, checker) = writing(&c, 50).await;

    let old = c.wait_primary(LONG).await;
    c.sigterm(old);
    let status = c.wait_exit(old, LONG).await;
    // At exit the leadership has already moved (no waiting for the Lease to expire).
    let holder = c.lease_holder();
    assert!(status.success(), "{status}\n{}", c.output(old));
    assert!(
        holder.is_some() && holder.as_deref() != Some(c.name(old)),
        "the Lease is still {holder:?} when the old primary exited"
    );
    let left = c.processes(old);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let new = c.wait_new_primary(old, LONG).await;
    assert_eq!(Some(c.name(new)), holder.as_deref());
    writer.wait_progress(50, LONG).await;

    c.restart(old);
    assert_eq!(c.wait_streaming(old, LONG).await, new);
    assert_no_fence(&c);
    no_loss_on(&c, writer, checker, &[new]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_of_primary_hands_over_before_stopping_quorum() {
    sigterm_of_primary_hands_over_before_stopping(quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_of_primary_hands_over_before_stopping_asynchronous() {
    sigterm_of_primary_hands_over_before_stopping(no_change).await;
}

/// In asynchronous mode (the default) a hand-over, by annotation and by SIGTERM, promotes the
/// target without a fence: it renews the Lease it was handed before it takes writes. Nothing in
/// any instance's log says the configuration has errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asynchronous_hand_overs_need_no_fence() {
    let mut c = Cluster::start_ready_at_defaults(3, no_change).await;
    let (writer, checker) = writing(&c, 20).await;

    let first = c.wait_primary(LONG).await;
    let second = c.others(first)[0];
    ask_for_switchover(&c, second).await;
    assert_eq!(c.wait_new_primary(first, LONG).await, second);
    assert_eq!(c.wait_streaming(first, LONG).await, second);
    writer.wait_progress(20, LONG).await;

    // A rolling restart of the new primary: it hands over before it exits.
    c.sigterm(second);
    let status = c.wait_exit(second, LONG).await;
    assert!(status.success(), "{status}\n{}", c.output(second));
    let third = c.wait_new_primary(second, LONG).await;
    writer.wait_progress(20, LONG).await;
    c.restart(second);
    assert_eq!(c.wait_streaming(second, LONG).await, third);

    assert_no_fence(&c);
    no_loss_on(&c, writer, checker, &[third]).await;
}

/// No instance fenced itself, nor logged a configuration error.
fn assert_no_fence(c: &Cluster) {
    for i in 0..c.len() {
        let out = c.output(i);
        for bad in ["fencing myself", "fence timer", "contains errors"] {
            assert!(!out.contains(bad), "{} logged {bad:?}:\n{out}", c.name(i));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_asynchronous_standby_is_not_promoted() {
    const MAX_LAG: i64 = 1 << 20;
    let mut c = Cluster::start_ready(3, |s| {
        s["failover"]["maximumLagBytes"] = json!(MAX_LAG);
    })
    .await;
    let checker = c.checker();
    let p = c.wait_primary(LONG).await;
    let others = c.others(p);
    let (lagging, good) = (others[0], others[1]);

    // The lagging standby receives WAL but does not replay it.
    let lc = c.client(lagging).await.unwrap();
    lc.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let pc = c.client(p).await.unwrap();
    pc.batch_execute(
        "CREATE TABLE filler (id int, pad text);
         INSERT INTO filler SELECT g, repeat('x', 1000) FROM generate_series(1, 8000) g",
    )
    .await
    .unwrap();
    let end: String = pc
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let caught_up = format!("SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '{end}') >= 0");
    eventually("the good standby caught up", LONG, async || {
        c.query_value::<bool>(good, &caught_up).await?.then_some(())
    })
    .await;
    let lag_sql = format!(
        "SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '{end}') >= 0
            AND pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) > {MAX_LAG}
            AND pg_get_wal_replay_pause_state() = 'paused'"
    );
    eventually(
        "the paused standby received everything, replayed little",
        LONG,
        async || {
            c.query_value::<bool>(lagging, &lag_sql)
                .await?
                .then_some(())
        },
    )
    .await;

    // The primary and the good standby die at once: only the lagging one is left.
    c.kill9(p);
    c.kill9(good);
    let paused_sql = "SELECT pg_is_in_recovery(), pg_get_wal_replay_pause_state()";
    let watch = Duration::from_secs(20); // more than three lease durations
    let started = std::time::Instant::now();
    while started.elapsed() < watch {
        if let Some(lc) = c.client(lagging).await {
            if let Ok(Ok(row)) =
                timeout(Duration::from_secs(3), lc.query_one(paused_sql, &[])).await
            {
                let (in_recovery, pause): (bool, String) = (row.get(0), row.get(1));
                assert!(in_recovery, "the lagging standby was promoted");
                assert_eq!(
                    pause, "paused",
                    "replay resumed on the lagging standby (Postgres restarted?): the test's premise is gone"
                );
            }
        }
        let s = c.status(lagging).await;
        assert_ne!(s["ha"]["role"], "primary", "{s}");
        sleep(Duration::from_millis(500)).await;
    }

    // The good standby back: it is promoted, not the lagging one.
    c.restart(good);
    assert_eq!(c.wait_primary(LONG).await, good);
    // Replay resumed, the lagging standby follows the new primary; the old primary rejoins.
    if let Some(lc) = c.client(lagging).await {
        let _ = timeout(
            Duration::from_secs(5),
            lc.batch_execute("SELECT pg_wal_replay_resume()"),
        )
        .await;
    }
    assert_eq!(c.wait_streaming(lagging, LONG).await, good);
    c.restart(p);
    assert_eq!(c.wait_streaming(p, LONG).await, good);
    let n: i64 = c
        .query_value(good, "SELECT count(*) FROM filler")
        .await
        .unwrap();
    assert_eq!(n, 8000);
    checker.assert_clean().await;
}
