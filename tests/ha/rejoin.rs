//! Former primaries and stray data coming back: recreated clusters, foreign databases, rewinds, reclones, timelines.

use super::*;

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

/// Standbys whose data directories hold another database (another system identifier) never
/// rewind onto the primary, reclone from it, or start streaming from it (one of them marked a
/// standby's, which is started without a rewind): that would replace their data. Each says so
/// and waits, its data in place. A fourth whose directory comes to hold files that are not a
/// cluster is not "empty" either: it reports the directory unusable (and its data as unknown to
/// the others) instead of cloning over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_database_is_never_rewound_or_recloned_over() {
    let mut c = Cluster::start_ready(4, no_change).await;
    let p = c.wait_primary(LONG).await;
    let others = c.others(p);
    let (rewound, started, stray) = (others[0], others[1], others[2]);
    for i in [rewound, started] {
        c.kill9(i);
        let dir = c.data_dir(i);
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
    }
    std::fs::write(c.data_dir(started).join("standby.signal"), "").expect("standby.signal");
    for i in [rewound, started] {
        c.restart(i);
    }
    // pgwarden refuses such a directory at start: this one changes under a running elector,
    // with Postgres stopped by fencing.
    c.annotate(FENCED_INSTANCES, Some(&json!([c.name(stray)]).to_string()));
    eventually("the stray instance fenced", LONG, async || {
        let s = c.status(stray).await;
        (s["ha"]["role"] == "fenced" && s["postgres"].is_null()).then_some(())
    })
    .await;
    let stray_dir = c.data_dir(stray);
    std::fs::remove_dir_all(&stray_dir).expect("remove the standby's data");
    std::fs::create_dir(&stray_dir).expect("the directory");
    std::fs::write(stray_dir.join("notes.txt"), "not a cluster").expect("a stray file");
    support::chown(&stray_dir);
    c.annotate(FENCED_INSTANCES, None);

    let event = async |reason: &str, i: usize| {
        let name = c.name(i).to_string();
        eventually(&format!("a {reason} Event for {name}"), LONG, async || {
            c.server
                .list("events.k8s.io/v1", "events", NS)
                .iter()
                .any(|e| {
                    e["reason"] == reason && e["note"].as_str().is_some_and(|n| n.contains(&name))
                })
                .then_some(())
        })
        .await;
    };
    event("ForeignSystemIdentifier", rewound).await;
    event("ForeignSystemIdentifier", started).await;
    event("DataDirectoryUnusable", stray).await;
    assert!(
        !c.output(started)
            .contains("database system identifier differs"),
        "never started streaming from another database:\n{}",
        c.output(started)
    );
    assert!(
        c.status(stray).await["ha"]["has_data"].is_null(),
        "an unusable directory's data is unknown, never false"
    );
    for i in [rewound, started] {
        let dir = c.data_dir(i);
        let parent = dir.parent().expect("a parent");
        let aside: Vec<String> = std::fs::read_dir(parent)
            .expect("list the sandbox")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains("diverged"))
            .collect();
        assert!(aside.is_empty(), "moved aside: {aside:?}");
        assert!(dir.join("PG_VERSION").exists(), "its data stays");
    }
    assert!(stray_dir.join("notes.txt").exists(), "the stray file stays");
    assert!(
        !c.output(stray).contains("not cloning"),
        "no clone attempted:\n{}",
        c.output(stray)
    );
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

/// Issue 12, item 2 (and issue 13's restart in place): pgwarden and Postgres killed and started
/// again at once, as a kubelet restarts a container. The instance still holds the Lease: it
/// recovers as a standby, renews, and promotes (a new timeline) instead of taking writes
/// after crash recovery on a Lease this process had not renewed. No other instance promotes,
/// no acknowledged commit is lost, and the standbys follow it onto the new timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_restarted_in_place_keeps_its_lease_on_a_new_timeline() {
    let mut c = Cluster::start_ready(3, quorum).await;
    let (writer, checker) = writing(&c, 20).await;
    let first = c.wait_primary(LONG).await;
    let timeline = c.status(first).await["postgres"]["timeline"]
        .as_u64()
        .unwrap();

    c.kill9(first);
    c.restart(first);
    eventually("the same instance primary again", LONG, async || {
        (c.primary().await == Some(first)).then_some(())
    })
    .await;
    let now = c.status(first).await["postgres"]["timeline"]
        .as_u64()
        .unwrap();
    assert_eq!(now, timeline + 1, "promoted onto a new timeline");
    for i in c.others(first) {
        assert_eq!(c.wait_streaming(i, LONG).await, first);
    }
    writer.wait_progress(20, LONG).await;
    for i in c.others(first) {
        let out = c.output(i);
        assert!(
            !out.contains("took the expired Lease"),
            "{}:\n{out}",
            c.name(i)
        );
    }
    no_loss_on(&c, writer, checker, &[first]).await;
    assert_no_configuration_errors(&c);
}

/// Issue 12, item 7: a standby that diverged (it received WAL of the old primary that the new
/// one never had) is brought back with pg_rewind, not by a new copy: no directory is moved
/// aside, and it streams from the new primary with every row the new primary has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_diverged_standby_is_rewound_not_recloned() {
    let mut c = Cluster::start_ready(3, no_change).await;
    let p = c.wait_primary(LONG).await;
    let (a, b) = (c.others(p)[0], c.others(p)[1]);
    let primary = c.client(p).await.expect("a session on the primary");
    primary
        .batch_execute("CREATE TABLE fork (n int)")
        .await
        .unwrap();
    // `a` stops receiving: what follows reaches `b` only.
    let receiver: i32 = eventually("a's WAL receiver", LONG, async || {
        c.query_value(a, "SELECT pid FROM pg_stat_wal_receiver")
            .await
    })
    .await;
    let receiver = nix::unistd::Pid::from_raw(receiver);
    let at_a: String = c
        .query_value(a, "SELECT pg_last_wal_receive_lsn()::text")
        .await
        .unwrap();
    nix::sys::signal::kill(receiver, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // More WAL than the sockets between them buffer (a stopped receiver's socket still takes
    // in a few megabytes, which it reads when it resumes).
    primary
        .batch_execute("INSERT INTO fork SELECT generate_series(1, 1000000)")
        .await
        .unwrap();
    let end: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    eventually("b received the rows a lacks", LONG, async || {
        let got: bool = c
            .query_value(b, &format!("SELECT pg_last_wal_replay_lsn() >= '{end}'"))
            .await?;
        got.then_some(())
    })
    .await;
    drop(primary);
    // `b` hangs, the primary dies, `a` resumes and is the only candidate.
    c.stop_node(b);
    c.kill9(p);
    nix::sys::signal::kill(receiver, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(c.wait_new_primary(p, LONG).await, a);
    let rows: i64 = c.query_value(a, "SELECT count(*) FROM fork").await.unwrap();
    assert!(
        rows < 1_000_000,
        "a had received the rows (from {at_a}): no divergence"
    );
    c.client(a)
        .await
        .unwrap()
        .batch_execute("INSERT INTO fork VALUES (-1)")
        .await
        .unwrap();
    c.cont_node(b).await;
    assert_eq!(c.wait_streaming(b, Duration::from_secs(180)).await, a);
    let on_b: i64 = eventually("b replayed the new primary's row", LONG, async || {
        let n: i64 = c
            .query_value(b, "SELECT count(*) FROM fork WHERE n = -1")
            .await?;
        (n == 1).then_some(())?;
        c.query_value(b, "SELECT count(*) FROM fork").await
    })
    .await;
    assert_eq!(on_b, rows + 1, "b has exactly the new primary's rows");
    let out = c.output(b);
    assert!(out.contains("pg_rewind done"), "{out}");
    assert!(!out.contains("moved aside"), "{out}");
    let parent = c.data_dir(b).parent().unwrap().to_path_buf();
    let aside: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("diverged"))
        .collect();
    assert!(aside.is_empty(), "a copy was moved aside: {aside:?}");
}

/// Issue 12, item 6: a second promotion from one timeline. `a` promotes (timeline 2) and dies
/// before `b` (frozen meanwhile) saw its history; `b` then promotes from timeline 1 and picks
/// timeline 2 again. `a` comes back: pg_rewind would find "no rewind required" and `a` would
/// stream from `b` with a row `b` never had. It rejoins by a new copy instead, with exactly
/// `b`'s rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reused_timeline_is_rejoined_by_a_new_copy() {
    let mut c = Cluster::start_ready(3, no_change).await;
    let p = c.wait_primary(LONG).await;
    let (a, b) = (c.others(p)[0], c.others(p)[1]);
    c.client(p)
        .await
        .unwrap()
        .batch_execute("CREATE TABLE tl (what text)")
        .await
        .unwrap();
    eventually("the table on b", LONG, async || {
        c.query_value::<i64>(b, "SELECT count(*) FROM tl").await
    })
    .await;
    c.stop_node(b);
    c.kill9(p);
    assert_eq!(c.wait_new_primary(p, LONG).await, a);
    c.client(a)
        .await
        .unwrap()
        .batch_execute("INSERT INTO tl VALUES ('only on a')")
        .await
        .unwrap();
    let a_timeline = c.status(a).await["postgres"]["timeline"].as_u64();
    // b learns of a's timeline from the Lease, which a publishes with its first renewal after
    // the promotion: a dies once it has (the case where it never did is the same to b as a
    // first failover).
    eventually("a's timeline in the Lease", LONG, async || {
        (c.lease_timeline() == a_timeline).then_some(())
    })
    .await;
    c.kill9(a);
    c.cont_node(b).await;
    assert_eq!(c.wait_new_primary(a, LONG).await, b);
    let b_timeline = c.status(b).await["postgres"]["timeline"].as_u64();
    assert_eq!(
        a_timeline, b_timeline,
        "the second promotion reused the timeline"
    );
    // Said where users look, not only in b's log.
    let b_name = c.name(b).to_string();
    eventually("a TimelineMayBeReused Warning Event", LONG, async || {
        c.server
            .list("events.k8s.io/v1", "events", NS)
            .iter()
            .any(|e| {
                e["reason"] == "TimelineMayBeReused"
                    && e["type"] == "Warning"
                    && e["note"].as_str().is_some_and(|n| n.contains(&b_name))
            })
            .then_some(())
    })
    .await;
    c.client(b)
        .await
        .unwrap()
        .batch_execute("INSERT INTO tl VALUES ('on b')")
        .await
        .unwrap();

    c.restart(a);
    assert_eq!(c.wait_streaming(a, Duration::from_secs(180)).await, b);
    let rows = eventually("b's row on a", LONG, async || {
        let client = c.client(a).await?;
        let rows = client
            .query("SELECT what FROM tl ORDER BY what", &[])
            .await
            .ok()?;
        let rows: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        rows.contains(&"on b".to_string()).then_some(rows)
    })
    .await;
    assert_eq!(rows, vec!["on b".to_string()], "a has exactly b's rows");
    let out = c.output(a);
    assert!(out.contains("which pg_rewind cannot see"), "{out}");
}
