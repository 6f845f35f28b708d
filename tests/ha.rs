//! High availability with three real instances against the test API server: bootstrap,
//! failover after kill -9, a hung primary, a partitioned primary, switchover (annotation, CLI,
//! SIGTERM), fencing, quorum commit, the lag limit on promotion, and a chaos loop. Acknowledged
//! commits are never lost, and no two instances are ever writable at once.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::apiserver::Fault;
use support::cluster::{
    cluster_object, connect_within, eventually, quorum, slot_name, Cluster, Rng, FENCED_INSTANCES,
    NS, PGC, SWITCHOVER_TO,
};
use tokio::time::{sleep, timeout};

/// Upper bound for a wait: catches hangs, asserts nothing about speed.
const LONG: Duration = Duration::from_secs(120);

fn no_change(_: &mut Value) {}

/// After a promotion Postgres re-reads a configuration in which nothing it cannot change
/// without a restart has changed: no instance logs "contains errors".
fn assert_no_configuration_errors(c: &Cluster) {
    for i in 0..c.len() {
        let out = c.output(i);
        assert!(!out.contains("contains errors"), "{}:\n{out}", c.name(i));
    }
}

/// libpq variables as images commonly set them, each of which broke a clone (or the standby's
/// stream) while pgwarden's children inherited them (issue 11).
const HOSTILE_LIBPQ_ENV: &[(&str, &str)] = &[
    ("PGPASSWORD", "wrong"),
    ("PGUSER", "nobody"),
    ("PGHOST", "/nonexistent"),
    ("PGSSLMODE", "require"),
    ("PGSERVICE", "none"),
    ("PGOPTIONS", "-cstatement_timeout=1"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bootstrap_one_primary_two_streaming_standbys_with_slots() {
    // pgwarden's own environment carries hostile libpq variables: initdb, the clones and the
    // streaming standbys must not see them.
    let c = Cluster::start_with_env(3, no_change, "", HOSTILE_LIBPQ_ENV);
    let p = c.wait_all_streaming(Duration::from_secs(180)).await;
    let primary = c.name(p).to_string();
    assert_eq!(c.lease_holder().as_deref(), Some(primary.as_str()));

    // Everyone agrees on the leader; the standbys follow it.
    let mut system_ids = Vec::new();
    for i in 0..3 {
        let s = c.status(i).await;
        assert_eq!(s["ha"]["leader"], primary, "{}: {s}", c.name(i));
        assert_eq!(s["ha"]["fenced"], false, "{}: {s}", c.name(i));
        if i == p {
            assert_eq!(s["ha"]["role"], "primary", "{s}");
            assert_eq!(s["postgres"]["role"], "primary", "{s}");
        } else {
            assert_eq!(s["ha"]["role"], "replica", "{s}");
            assert_eq!(s["ha"]["following"], primary, "{s}");
            assert_eq!(s["postgres"]["role"], "replica", "{s}");
        }
        system_ids.push(s["postgres"]["system_identifier"].clone());
    }
    // One initdb: the standbys are clones of the primary.
    assert!(system_ids[0].is_string(), "{system_ids:?}");
    assert!(
        system_ids.iter().all(|id| *id == system_ids[0]),
        "{system_ids:?}"
    );

    // One active physical slot per standby, named after it.
    let expected: Vec<String> = c.others(p).iter().map(|&i| slot_name(c.name(i))).collect();
    let pc = c.client(p).await.expect("a session on the primary");
    let wanted = expected.clone();
    let slots = eventually("both standbys' slots active", LONG, async || {
        let rows = pc
            .query(
                "SELECT slot_name::text, slot_type, active FROM pg_replication_slots ORDER BY 1",
                &[],
            )
            .await
            .ok()?;
        let slots: Vec<(String, String, bool)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        wanted
            .iter()
            .all(|w| {
                slots
                    .iter()
                    .any(|(n, t, a)| n == w && t == "physical" && *a)
            })
            .then_some(slots)
    })
    .await;
    assert_eq!(slots.len(), 2, "only the standbys' slots: {slots:?}");
    // /pg/status shows the same (from the monitor's next refresh): both slots, and each
    // standby streaming under its own name.
    let names: Vec<String> = c.others(p).iter().map(|&i| c.name(i).to_string()).collect();
    eventually(
        "/pg/status listing the slots and streaming standbys",
        LONG,
        async || {
            let s = c.status(p).await;
            let listed: Vec<&str> = s["postgres"]["slots"]
                .as_array()?
                .iter()
                .filter_map(|slot| slot["name"].as_str())
                .collect();
            let streaming: Vec<&str> = s["postgres"]["replication"]
                .as_array()?
                .iter()
                .filter(|r| r["state"] == "streaming")
                .filter_map(|r| r["application_name"].as_str())
                .collect();
            (expected.iter().all(|w| listed.contains(&w.as_str()))
                && names.iter().all(|n| streaming.contains(&n.as_str())))
            .then_some(())
        },
    )
    .await;

    // Each instance advertises its addresses.
    let instances = c.cluster()["status"]["instances"].clone();
    for i in 0..3 {
        let e = &instances[c.name(i)];
        assert_eq!(
            e["postgresAddress"],
            format!("127.0.0.1:{}", c.port(i)),
            "{instances}"
        );
        assert_eq!(
            e["statusAddress"],
            format!("127.0.0.1:{}", c.status_port(i)),
            "{instances}"
        );
    }

    // Data flows to the standbys; they refuse writes.
    pc.batch_execute("CREATE TABLE boot (v int); INSERT INTO boot VALUES (42)")
        .await
        .unwrap();
    for i in c.others(p) {
        let v: i32 = eventually("the row on the standby", LONG, async || {
            c.query_value(i, "SELECT v FROM boot").await
        })
        .await;
        assert_eq!(v, 42);
        let sc = c.client(i).await.expect("a session on the standby");
        let err = sc
            .execute("INSERT INTO boot VALUES (1)", &[])
            .await
            .expect_err("a standby refuses writes");
        let message = err.as_db_error().map(|e| e.message().to_string());
        assert!(
            message.as_deref().is_some_and(|m| m.contains("read-only")),
            "{err:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_primary_fails_over_without_losing_acknowledged_commits() {
    let mut c = Cluster::start_ready(3, quorum).await;
    let writer = c.writer().await;
    let checker = c.checker();
    writer.wait_progress(50, LONG).await;

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

    let acked = writer.stop().await;
    c.assert_no_loss(&acked, new).await;
    c.assert_no_loss(&acked, old).await;
    checker.assert_clean().await;
    assert_no_configuration_errors(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_primary_refuses_writes_after_resume() {
    let mut c = Cluster::start_ready(3, quorum).await;
    let writer = c.writer().await;
    let checker = c.checker();
    writer.wait_progress(50, LONG).await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_primary_fences_itself_and_rejoins() {
    let mut c = Cluster::start_ready(3, quorum).await;
    let writer = c.writer().await;
    let checker = c.checker();
    writer.wait_progress(50, LONG).await;

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

    let acked = writer.stop().await;
    c.assert_no_loss(&acked, new).await;
    c.assert_no_loss(&acked, old).await;
    checker.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_api_outage_keeps_the_primary_writing_when_every_member_confirms() {
    let c = Cluster::start_ready(3, quorum).await;
    let writer = c.writer().await;
    let checker = c.checker();
    writer.wait_progress(50, LONG).await;
    let p = c.wait_primary(LONG).await;

    // Nobody reaches the API server, so nobody can take the Lease: every standby says so to
    // the primary, which keeps taking writes well past the lease duration (failsafe). The API
    // server is down (connections refused): under a black hole the members learn that they
    // are cut off only after their own `api_timeout`, too late for the primary's renew
    // deadline at these timings (see the closing note of the HA safety work).
    c.server.outage_refuse(true);
    sleep(Duration::from_secs(12)).await;
    let before = writer.acked_count();
    writer.wait_progress(50, LONG).await;
    assert!(writer.acked_count() > before);
    assert_eq!(c.writable(p).await, Some(true), "{}", c.describe().await);
    let s = c.status(p).await;
    assert_eq!(s["ha"]["role"], "primary", "{s}");
    assert_eq!(s["kubernetes"]["api"]["reachable"], false, "{s}");
    // Only members may ask for the promise: without the cluster's token a standby refuses
    // (and so cannot be made to block failover by anyone who reaches its status port), while
    // its read-only status stays open.
    let standby = c.others(p)[0];
    let forged = format!("/pg/status?failsafe={}", c.name(p));
    assert_eq!(c.http_code(standby, &forged).await, Some(403));
    assert_eq!(c.http_code(standby, "/pg/status").await, Some(200));

    // The API server is back: the same primary renews; nobody failed over.
    c.server.outage(false);
    writer.wait_progress(50, LONG).await;
    assert_eq!(c.wait_all_streaming(LONG).await, p);
    assert_eq!(c.lease_holder().as_deref(), Some(c.name(p)));
    let acked = writer.stop().await;
    c.assert_no_loss(&acked, p).await;
    checker.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_departed_instance_loses_its_entry_and_its_slot() {
    let mut c = Cluster::start_ready(3, no_change).await;
    let p = c.wait_primary(LONG).await;
    // A scale-down: the last standby's pgwarden and Postgres go, and so does its Pod.
    let gone = c.others(p)[1];
    let name = c.name(gone).to_string();
    c.kill9(gone);
    c.server
        .delete("v1", "pods", NS, &name)
        .expect("the Pod existed");
    let slot = slot_name(&name);
    eventually(
        "the departed instance's entry and slot removed",
        LONG,
        async || {
            let entry = c.cluster()["status"]["instances"][name.as_str()].clone();
            let slots: i64 = c
                .query_value(
                    p,
                    &format!(
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"
                    ),
                )
                .await?;
            (entry.is_null() && slots == 0).then_some(())
        },
    )
    .await;
    // The remaining standby keeps its slot and streams.
    let other = c.others(p).into_iter().find(|&i| i != gone).unwrap();
    assert!(c.streams_from(other, p).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchover_by_annotation_and_by_cli() {
    let c = Cluster::start_ready(3, quorum).await;
    let writer = c.writer().await;
    let checker = c.checker();
    writer.wait_progress(50, LONG).await;

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

    let acked = writer.stop().await;
    c.assert_no_loss(&acked, third).await;
    checker.assert_clean().await;
    assert_no_configuration_errors(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_of_primary_hands_over_before_stopping() {
    let mut c = Cluster::start_ready(3, quorum).await;
    let writer = c.writer().await;
    let checker = c.checker();
    writer.wait_progress(50, LONG).await;

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
    let acked = writer.stop().await;
    c.assert_no_loss(&acked, new).await;
    checker.assert_clean().await;
}

/// Waits until instance `i` is fenced: Postgres stopped, pgwarden alive, live but not ready.
async fn wait_fenced(c: &Cluster, i: usize) {
    let what = format!("{} fenced", c.name(i));
    eventually(&what, LONG, async || {
        let s = c.status(i).await;
        (s["health"] == "fenced"
            && s["ha"]["fenced"] == true
            && s["ha"]["role"] == "fenced"
            && s["postgres"].is_null())
        .then_some(())
    })
    .await;
    assert!(
        c.client(i).await.is_none(),
        "{}: Postgres still answers",
        c.name(i)
    );
    assert_eq!(c.http_code(i, "/healthz").await, Some(200));
    assert_eq!(c.http_code(i, "/readyz").await, Some(503));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_and_unfencing_standby_and_primary() {
    let mut c = Cluster::start_ready(3, no_change).await;
    let checker = c.checker();
    let p = c.wait_primary(LONG).await;
    let pc = c.client(p).await.unwrap();
    pc.batch_execute("CREATE TABLE fence_marks (v int); INSERT INTO fence_marks VALUES (1)")
        .await
        .unwrap();
    drop(pc);

    // A standby.
    let s = c.others(p)[0];
    c.annotate(FENCED_INSTANCES, Some(&json!([c.name(s)]).to_string()));
    wait_fenced(&c, s).await;
    assert!(c.is_running(s));
    assert_eq!(c.primary().await, Some(p), "the primary is not disturbed");
    let name = c.name(s).to_string();
    eventually("the fenced standby gone from pg_stat_replication", LONG, async || {
        let n: i64 = c
            .query_value(
                p,
                &format!("SELECT count(*) FROM pg_stat_replication WHERE application_name = '{name}'"),
            )
            .await?;
        (n == 0).then_some(())
    })
    .await;
    c.annotate(FENCED_INSTANCES, None);
    assert_eq!(c.wait_streaming(s, LONG).await, p);
    eventually("the unfenced standby ready", LONG, async || {
        (c.http_code(s, "/readyz").await == Some(200)).then_some(())
    })
    .await;

    // The primary: its Postgres stops, its pgwarden stays.
    c.annotate(FENCED_INSTANCES, Some(&json!([c.name(p)]).to_string()));
    wait_fenced(&c, p).await;
    assert!(c.is_running(p));
    c.annotate(FENCED_INSTANCES, None);
    let now = c.wait_all_streaming(LONG).await;
    let v: i32 = c
        .query_value(now, "SELECT v FROM fence_marks")
        .await
        .unwrap();
    assert_eq!(v, 1);

    // Everyone.
    c.annotate(FENCED_INSTANCES, Some(r#"["*"]"#));
    for i in 0..3 {
        wait_fenced(&c, i).await;
    }
    for i in 0..3 {
        assert!(c.is_running(i), "{} pgwarden alive", c.name(i));
        assert_ne!(c.writable(i).await, Some(true));
    }
    c.annotate(FENCED_INSTANCES, None);
    let now = c.wait_all_streaming(LONG).await;
    let v: i32 = c
        .query_value(now, "SELECT v FROM fence_marks")
        .await
        .unwrap();
    assert_eq!(v, 1);
    for i in 0..3 {
        let s = c.status(i).await;
        assert_eq!(s["ha"]["fenced"], false, "{s}");
    }
    checker.assert_clean().await;
}

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

#[derive(Debug, Clone, Copy)]
enum Failure {
    Kill9,
    Hang,
    Partition,
    Switchover,
    /// Every API request of the instance waits 1 to 3 s.
    SlowApi,
    /// Only its Lease renewals (PUT) hang.
    HungLeasePut,
    /// SIGTERM (a rolling restart): a primary hands over first.
    Sigterm,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_loop_loses_no_acknowledged_commit() {
    chaos(quorum, true).await;
}

/// Asynchronous mode may lose commits a standby had not received; it never has two writable
/// primaries, and every instance streams at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_loop_asynchronous_never_has_two_primaries() {
    chaos(no_change, false).await;
}

async fn chaos(spec: fn(&mut Value), lossless: bool) {
    let mut rng = Rng::from_env_or_time();
    let mut c = Cluster::start_ready(3, spec).await;
    let writer = c.writer().await;
    let checker = c.checker();
    writer.wait_progress(50, LONG).await;

    const ROUNDS: usize = 12;
    let failures = [
        Failure::Kill9,
        Failure::Hang,
        Failure::Partition,
        Failure::Switchover,
        Failure::SlowApi,
        Failure::HungLeasePut,
        Failure::Sigterm,
    ];
    for round in 0..ROUNDS {
        let p = c.wait_primary(LONG).await;
        // Mostly the primary: that is where failures matter.
        let target = if rng.below(10) < 6 {
            p
        } else {
            rng.pick(&c.others(p))
        };
        let failure = rng.pick(&failures);
        eprintln!(
            "chaos round {round}: {failure:?} on {} (primary {}), {} commits so far",
            c.name(target),
            c.name(p),
            writer.acked_count()
        );
        match failure {
            Failure::Kill9 => {
                c.kill9(target);
                sleep(rng.millis(0, 5000)).await;
                c.restart(target);
            }
            Failure::Hang => {
                c.stop_node(target);
                if target == p && rng.below(2) == 0 {
                    c.wait_new_primary(p, LONG).await;
                } else {
                    sleep(rng.millis(500, 8000)).await;
                }
                c.cont_node(target).await;
            }
            Failure::Partition => {
                c.partition(target, true);
                if target == p && rng.below(2) == 0 {
                    c.wait_new_primary(p, LONG).await;
                } else {
                    sleep(rng.millis(500, 8000)).await;
                }
                c.partition(target, false);
            }
            Failure::SlowApi => {
                let name = c.name(target).to_string();
                c.server
                    .set_fault(&name, Fault::Latency(rng.millis(1000, 3000)));
                sleep(rng.millis(2000, 8000)).await;
                c.server.clear_faults(&name);
            }
            Failure::HungLeasePut => {
                let name = c.name(target).to_string();
                c.server
                    .set_fault_on(&name, Some("update"), Some("leases"), Fault::Blackhole);
                if target == p && rng.below(2) == 0 {
                    c.wait_new_primary(p, LONG).await;
                } else {
                    sleep(rng.millis(500, 8000)).await;
                }
                c.server.clear_faults(&name);
            }
            Failure::Sigterm => {
                c.sigterm(target);
                c.wait_exit(target, LONG).await;
            }
            Failure::Switchover => {
                let to = rng.pick(&c.others(p));
                c.annotate(SWITCHOVER_TO, Some(c.name(to)));
                eventually("the switchover done or refused", LONG, async || {
                    c.annotation(SWITCHOVER_TO).is_none().then_some(())
                })
                .await;
            }
        }
        // The orchestrator restarts a container whose pgwarden exited.
        for i in 0..c.len() {
            if !c.is_running(i) {
                eprintln!("chaos round {round}: {} exited; restarting it", c.name(i));
                c.restart(i);
            }
        }
        let now = c.wait_primary(LONG).await;
        // Commits go on (with quorum commit, a standby confirms them) before the next failure.
        writer.wait_progress(20, LONG).await;
        eprintln!("chaos round {round}: primary {}", c.name(now));
    }

    let p = c.wait_all_streaming(Duration::from_secs(180)).await;
    writer.wait_progress(20, LONG).await;
    let acked = writer.stop().await;
    if lossless {
        for i in 0..c.len() {
            c.assert_no_loss(&acked, i).await;
        }
    }
    assert_eq!(c.wait_all_streaming(LONG).await, p);
    checker.assert_clean().await;
}

// ---------------------------------------------------------------------------------------------
// Safety in an unkind world, at the default timings (Lease 10 / 6 / 2 s, `api_timeout` 5 s,
// monitor 2 s) and in both synchronous modes.

/// How late the fence timer stopped writes, from the instance's log: the seconds since its
/// last confirmed renewal, as pgwarden measured them.
fn fence_timer_lateness(output: &str) -> Option<f64> {
    let rest = output.split("fence timer: lease not renewed for ").nth(1)?;
    rest.split('s').next()?.parse().ok()
}

/// The primary's Lease renewals hang (its reads are answered): it stops writes by its renew
/// deadline, from a timer, although its elector waits on the renewal for `api_timeout`; a
/// standby takes over, never while the old primary still takes writes.
async fn hung_renewals_fence_on_time(spec: fn(&mut Value), lossless: bool) {
    let c = Cluster::start_ready_at_defaults(3, spec).await;
    let writer = c.writer().await;
    let checker = c.checker();
    writer.wait_progress(20, LONG).await;
    let old = c.wait_primary(LONG).await;
    let name = c.name(old).to_string();
    c.server
        .set_fault_on(&name, Some("update"), Some("leases"), Fault::Blackhole);
    let new = c.wait_new_primary(old, LONG).await;
    writer.wait_progress(20, LONG).await;

    let out = c.output(old);
    let late = fence_timer_lateness(&out).unwrap_or_else(|| panic!("no fence timer:\n{out}"));
    // The renew deadline is 6 s; the renewal in flight would have held the elector to 7 s.
    assert!(late < 6.5, "fenced {late}s after the last renewal");

    c.server.clear_faults(&name);
    assert_eq!(c.wait_streaming(old, LONG).await, new);
    let acked = writer.stop().await;
    if lossless {
        c.assert_no_loss(&acked, new).await;
    }
    checker.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_lease_renewals_fence_on_time_asynchronous() {
    hung_renewals_fence_on_time(no_change, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_lease_renewals_fence_on_time_quorum() {
    hung_renewals_fence_on_time(quorum, true).await;
}

/// In asynchronous mode (the default) a switchover promotes the target
/// without a fence: it renews the Lease it was handed before it takes writes. Nothing in any
/// instance's log says the configuration has errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asynchronous_hand_overs_need_no_fence() {
    let c = Cluster::start_ready_at_defaults(3, no_change).await;
    let writer = c.writer().await;
    let checker = c.checker();
    writer.wait_progress(20, LONG).await;

    let first = c.wait_primary(LONG).await;
    let second = c.others(first)[0];
    // A switchover to a standby that is not caught up yet is refused (the annotation goes,
    // with an Event); a user asks again.
    for _ in 0..5 {
        c.annotate(SWITCHOVER_TO, Some(c.name(second)));
        eventually("the switchover done or refused", LONG, async || {
            c.annotation(SWITCHOVER_TO).is_none().then_some(())
        })
        .await;
        if c.primary().await == Some(second) {
            break;
        }
    }
    assert_eq!(c.wait_new_primary(first, LONG).await, second);
    assert_eq!(c.wait_streaming(first, LONG).await, second);
    writer.wait_progress(20, LONG).await;

    let third = second;

    for i in 0..c.len() {
        let out = c.output(i);
        for bad in ["fencing myself", "fence timer", "contains errors"] {
            assert!(!out.contains(bad), "{} logged {bad:?}:\n{out}", c.name(i));
        }
    }
    let acked = writer.stop().await;
    c.assert_no_loss(&acked, third).await;
    checker.assert_clean().await;
}

/// A rolling upgrade of pgwarden: the CRD gains a field this version does not know, and the spec
/// uses it. Every instance reports the field once and ignores it; the primary keeps renewing,
/// and a failover still happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spec_field_from_a_newer_version_keeps_ha_running() {
    let mut c = Cluster::start_ready(3, no_change).await;
    let p = c.wait_primary(LONG).await;
    c.server.update_with(
        "apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        "",
        "postgresclusters.pgwarden.dev",
        |crd| {
            let spec = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
                ["spec"]["properties"];
            spec["futureFeature"] =
                json!({"type": "object", "properties": {"enabled": {"type": "boolean"}}});
        },
    );
    c.set_spec(|s| s["futureFeature"] = json!({"enabled": true}));
    assert_eq!(c.cluster()["spec"]["futureFeature"]["enabled"], true);

    for i in 0..c.len() {
        let name = c.name(i).to_string();
        eventually(
            &format!("{name} reporting the unknown field"),
            LONG,
            async || {
                let entry = &c.cluster()["status"]["instances"][&name];
                let valid = entry["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "SpecValid")?
                    .clone();
                (valid["status"] == "True"
                    && valid["reason"] == "UnknownFields"
                    && valid["message"].as_str()?.contains("spec.futureFeature"))
                .then_some(())
            },
        )
        .await;
    }
    let notes: Vec<Value> = c
        .server
        .list("events.k8s.io/v1", "events", NS)
        .into_iter()
        .filter(|e| e["reason"] == "UnknownSpecField")
        .collect();
    assert!(!notes.is_empty(), "no UnknownSpecField Event");

    // The primary renews ...
    let renewed = || {
        c.server
            .get("coordination.k8s.io/v1", "leases", NS, "pg-leader")
            .map(|l| l["spec"]["renewTime"].clone())
    };
    let before = renewed();
    eventually("a renewal after the change", LONG, async || {
        (renewed() != before).then_some(())
    })
    .await;
    // ... and when it is lost, a standby takes over.
    let writer = c.writer().await;
    c.kill9(p);
    let new = c.wait_new_primary(p, LONG).await;
    writer.wait_progress(20, LONG).await;
    c.restart(p);
    assert_eq!(c.wait_streaming(p, LONG).await, new);
    writer.stop().await;
}

/// The PostgresCluster is re-created (its status and the Lease are gone) while every instance is
/// down, one instance's volume is emptied and that instance starts first: it never initialises a
/// new cluster beside the others' data. Once they are back one of them leads, the table is still
/// there, and the emptied instance clones it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recreated_cluster_keeps_its_data_when_an_empty_instance_starts_first() {
    let mut c = Cluster::start_ready(3, no_change).await;
    let p = c.wait_primary(LONG).await;
    let client = c.client(p).await.expect("a session on the primary");
    client
        .batch_execute("CREATE TABLE precious (v int); INSERT INTO precious VALUES (42)")
        .await
        .expect("the table");
    drop(client);
    for i in 0..c.len() {
        c.kill9(i);
    }
    c.server.delete(PGC.0, PGC.1, NS, "pg");
    c.server
        .delete("coordination.k8s.io/v1", "leases", NS, "pg-leader");
    c.server.create(cluster_object(c.len()));

    let empty = c.others(p)[0];
    let dir = c.data_dir(empty);
    std::fs::remove_dir_all(&dir).expect("empty the volume");
    std::fs::create_dir(&dir).expect("an empty volume");
    support::chown(&dir);
    c.restart(empty);
    eventually(
        "the empty instance waiting for the others",
        LONG,
        async || {
            let s = c.status(empty).await;
            s["ha"]["action"]
                .as_str()?
                .contains("waiting to hear from every instance")
                .then_some(())
        },
    )
    .await;
    assert!(
        !dir.join("PG_VERSION").exists(),
        "initialised a new cluster"
    );

    for i in c.others(empty) {
        c.restart(i);
    }
    let leader = c.wait_all_streaming(Duration::from_secs(180)).await;
    assert_ne!(leader, empty);
    for i in 0..c.len() {
        let name = c.name(i).to_string();
        let v = eventually(&format!("the row on {name}"), LONG, async || {
            c.query_value::<i32>(i, "SELECT v FROM precious").await
        })
        .await;
        assert_eq!(v, 42, "{name}");
    }
}

/// A standby whose data directory holds another database (another system identifier) never
/// rewinds onto the primary nor reclones from it: that would replace its data. It says so and
/// waits, its data in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_database_is_never_rewound_or_recloned_over() {
    let mut c = Cluster::start_ready(2, no_change).await;
    let p = c.wait_primary(LONG).await;
    let other = c.others(p)[0];
    c.kill9(other);
    let dir = c.data_dir(other);
    std::fs::remove_dir_all(&dir).expect("remove the standby's data");
    let mut initdb = std::process::Command::new("/usr/lib/postgresql/15/bin/initdb");
    initdb.arg("-D").arg(&dir).arg("--auth=trust");
    if let Some(u) = support::pg_user() {
        std::fs::create_dir(&dir).expect("the directory");
        support::chown(&dir);
        use std::os::unix::process::CommandExt;
        initdb.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    let out = initdb.output().expect("run initdb");
    assert!(out.status.success(), "{out:?}");
    c.restart(other);

    let name = c.name(other).to_string();
    eventually("a ForeignSystemIdentifier Event", LONG, async || {
        c.server
            .list("events.k8s.io/v1", "events", NS)
            .iter()
            .any(|e| {
                e["reason"] == "ForeignSystemIdentifier"
                    && e["note"].as_str().is_some_and(|n| n.contains(&name))
            })
            .then_some(())
    })
    .await;
    let parent = dir.parent().expect("a parent");
    let aside: Vec<String> = std::fs::read_dir(parent)
        .expect("list the sandbox")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("diverged"))
        .collect();
    assert!(aside.is_empty(), "moved aside: {aside:?}");
    assert!(dir.join("PG_VERSION").exists(), "its data stays");
    assert_eq!(c.wait_primary(LONG).await, p, "the primary goes on");
}

/// Standbys that cannot connect (here pg_hba.conf rejects replication) are reported and retried,
/// never recloned: a new copy cannot cure a refusal, and each reclone keeps one aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standbys_that_cannot_connect_are_not_recloned() {
    let c = Cluster::start_ready(3, no_change).await;
    let p = c.wait_primary(LONG).await;
    c.set_spec(|s| {
        s["postgresql"]["pgHba"] = json!(["host replication all 127.0.0.1/32 reject"]);
    });
    // A reload leaves established replication connections alone: end them, so that the
    // standbys must reconnect through the new rules.
    let primary = c.client(p).await.expect("a session on the primary");
    eventually("pg_hba.conf reloaded on the primary", LONG, async || {
        let rows = primary
            .query(
                "SELECT 1 FROM pg_hba_file_rules WHERE 'reject' = auth_method",
                &[],
            )
            .await
            .ok()?;
        (!rows.is_empty()).then_some(())
    })
    .await;
    // Until none is back: a standby may reconnect before the postmaster has reloaded.
    eventually("no standby streaming any more", LONG, async || {
        primary
            .batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
            .await
            .ok()?;
        sleep(Duration::from_secs(1)).await;
        let rows = primary
            .query("SELECT 1 FROM pg_stat_replication", &[])
            .await
            .ok()?;
        rows.is_empty().then_some(())
    })
    .await;
    let events = |reason: &str| {
        c.server
            .list("events.k8s.io/v1", "events", NS)
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .count()
    };
    eventually(
        "CannotStream Events",
        Duration::from_secs(150),
        async || (events("CannotStream") >= 2).then_some(()),
    )
    .await;
    assert_eq!(
        events("Recloning"),
        0,
        "a standby that cannot connect was recloned"
    );

    c.set_spec(|s| {
        s["postgresql"]["pgHba"] = json!([]);
    });
    assert_eq!(c.wait_all_streaming(LONG).await, p);
    assert_eq!(events("Recloning"), 0);
}
