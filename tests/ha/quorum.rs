//! Quorum commit: commits wait for standbys, the published set follows what Postgres uses, long promotions and switchover checkpoints keep the Lease.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quorum_commits_wait_without_standbys() {
    let mut c = Cluster::start_ready(3, quorum).await;
    let p = c.wait_primary(LONG).await;
    let session = connect_within(c.port(p), Duration::from_secs(3), None)
        .await
        .expect("a session on the primary");
    timeout(LONG, session.batch_execute("CREATE TABLE q (v int)"))
        .await
        .expect("DDL commits with standbys")
        .unwrap();

    let standbys = c.others(p);
    for &s in &standbys {
        c.kill9(s);
    }
    let pending = tokio::spawn(async move {
        let r = session.execute("INSERT INTO q VALUES (1)", &[]).await;
        (session, r.map_err(|e| e.to_string()))
    });
    sleep(Duration::from_secs(5)).await;
    assert!(
        !pending.is_finished(),
        "a commit returned without a standby to confirm it"
    );
    let waiting: i64 = c
        .query_value(
            p,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        )
        .await
        .expect("a count");
    assert!(waiting >= 1, "no backend waits for synchronous replication");
    let s = c.status(p).await;
    assert_eq!(s["ha"]["role"], "primary", "it stays primary: {s}");

    // One standby back: the commit completes.
    c.restart(standbys[0]);
    let (_session, r) = timeout(LONG, pending)
        .await
        .expect("the commit completes once a standby is back")
        .unwrap();
    assert_eq!(r, Ok(1));
    assert_eq!(c.wait_streaming(standbys[0], LONG).await, p);
    let n: i64 = eventually("the row on the standby", LONG, async || {
        c.query_value(standbys[0], "SELECT count(*) FROM q").await
    })
    .await;
    assert_eq!(n, 1);

    c.restart(standbys[1]);
    assert_eq!(c.wait_streaming(standbys[1], LONG).await, p);
}

/// Issue 12, item 2: no long action holds up renewals. The switchover target's checkpointer is
/// stopped, so the CHECKPOINT that follows `pg_promote` hangs (as a large dirty
/// `shared_buffers` makes it last): the new primary takes writes meanwhile, keeps renewing its
/// Lease well past the renew deadline, and says "promoting" (not "primary") until the
/// checkpoint is done, so that nobody rewinds against it early.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_promotion_checkpoint_keeps_the_lease() {
    let c = Cluster::start_ready(2, no_change).await;
    let first = c.wait_primary(LONG).await;
    let second = c.others(first)[0];
    let checkpointer = stop_checkpointer(&c, second).await;

    ask_for_switchover(&c, second).await;
    let client = eventually("the target taking writes", LONG, async || {
        let client = c.client(second).await?;
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS during_promotion (n int)")
            .await
            .ok()?;
        Some(client)
    })
    .await;
    // Longer than a lease duration at these timings (6 s): without renewals it would have
    // fenced itself at the renew deadline and the other instance would have taken over.
    let held_since = std::time::Instant::now();
    let mut n = 0;
    while held_since.elapsed() < Duration::from_secs(8) {
        n += 1;
        timeout(
            Duration::from_secs(5),
            client.execute("INSERT INTO during_promotion VALUES ($1)", &[&n]),
        )
        .await
        .expect("an insert answered")
        .unwrap_or_else(|e| panic!("insert {n} during the promotion: {e}"));
        assert_eq!(c.lease_holder().as_deref(), Some(c.name(second)));
        assert_eq!(c.status(second).await["ha"]["role"], "promoting");
        sleep(Duration::from_millis(200)).await;
    }
    nix::sys::signal::kill(checkpointer, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(c.wait_primary(LONG).await, second);
    assert_eq!(c.wait_streaming(first, LONG).await, second);
    let rows: i64 = c
        .query_value(second, "SELECT count(*) FROM during_promotion")
        .await
        .unwrap();
    assert_eq!(rows, i64::from(n));
    let out = c.output(second);
    assert!(!out.contains("fencing myself"), "{out}");
}

/// A switchover whose primary checkpoints slowly (its checkpointer stopped for longer than the
/// renew deadline, as a large dirty `shared_buffers` makes a shutdown checkpoint last): the
/// checkpoint is taken before the stop, with the Lease renewed meanwhile, so the primary neither
/// fences itself nor stops uncleanly, and the hand-over completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_switchover_checkpoint_keeps_the_lease() {
    let c = Cluster::start_ready(2, no_change).await;
    let first = c.wait_primary(LONG).await;
    let second = c.others(first)[0];
    let checkpointer = stop_checkpointer(&c, first).await;
    c.annotate(SWITCHOVER_TO, Some(c.name(second)));
    // Longer than the renew deadline at these timings (3 s).
    sleep(Duration::from_secs(5)).await;
    assert_eq!(c.lease_holder().as_deref(), Some(c.name(first)));
    nix::sys::signal::kill(checkpointer, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(c.wait_new_primary(first, LONG).await, second);
    assert_eq!(c.wait_streaming(first, LONG).await, second);
    let out = c.output(first);
    for bad in ["fencing myself", "fence timer", "did not shut down cleanly"] {
        assert!(!out.contains(bad), "logged {bad:?}:\n{out}");
    }
}

/// Stops (SIGSTOP) instance `i`'s checkpointer, so that every checkpoint waits; returns it.
async fn stop_checkpointer(c: &Cluster, i: usize) -> nix::unistd::Pid {
    let pid: i32 = eventually("the checkpointer", LONG, async || {
        c.query_value(
            i,
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'",
        )
        .await
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    pid
}

/// The quorum set the Lease publishes for a failover.
fn published_set(c: &Cluster) -> Option<Vec<String>> {
    let lease = c.server.get(
        "coordination.k8s.io/v1",
        "leases",
        NS,
        support::cluster::LEASE,
    )?;
    let set = lease["metadata"]["annotations"]["pgwarden.dev/sync-standbys"].as_str()?;
    serde_json::from_str(set).ok()
}

/// Issue 12, item 9: the quorum set in force is the one Postgres shows. A standby leaves, so
/// the primary shrinks its synchronous set: Postgres first, then the Lease. Its postmaster is
/// stopped meanwhile (a SIGHUP not yet acted on, no new session to read the setting back): the
/// smaller set is not published while Postgres may still count on the one that left, and it is
/// once Postgres shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_smaller_quorum_set_is_published_only_once_postgres_uses_it() {
    let mut c = Cluster::start_ready(3, quorum).await;
    let p = c.wait_primary(LONG).await;
    let (b, gone) = (c.others(p)[0], c.others(p)[1]);
    let both = {
        let mut v = vec![c.name(b).to_string(), c.name(gone).to_string()];
        v.sort();
        v
    };
    eventually("both standbys in the published set", LONG, async || {
        (published_set(&c).as_ref() == Some(&both)).then_some(())
    })
    .await;
    // ... and in force (the union is published before Postgres uses it).
    eventually("both standbys in force", LONG, async || {
        let shown: String = c.query_value(p, "SHOW synchronous_standby_names").await?;
        both.iter()
            .all(|n| shown.contains(n.as_str()))
            .then_some(())
    })
    .await;
    // The running postmaster's pid (its file may still be an earlier one's for a moment).
    let postmaster = eventually("the primary's postmaster stopped", LONG, async || {
        let pid_file = std::fs::read_to_string(c.data_dir(p).join("postmaster.pid")).ok()?;
        let raw: i32 = pid_file.lines().next()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{raw}/cmdline")).ok()?;
        if !String::from_utf8_lossy(&cmdline).contains("postgres") {
            return None;
        }
        let pid = nix::unistd::Pid::from_raw(raw);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)
            .ok()
            .map(|()| pid)
    })
    .await;
    c.kill9(gone);
    // Several retry periods (1 s here): the primary wants the smaller set all along.
    let held = std::time::Instant::now();
    while held.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            published_set(&c).as_ref(),
            Some(&both),
            "published before in force"
        );
        sleep(Duration::from_millis(100)).await;
    }
    nix::sys::signal::kill(postmaster, nix::sys::signal::Signal::SIGCONT).unwrap();
    let only = vec![c.name(b).to_string()];
    eventually("the smaller set published", LONG, async || {
        (published_set(&c).as_ref() == Some(&only)).then_some(())
    })
    .await;
    let shown: String = c
        .query_value(p, "SHOW synchronous_standby_names")
        .await
        .unwrap();
    assert!(
        shown.contains(c.name(b)) && !shown.contains(c.name(gone)),
        "{shown}"
    );
}
