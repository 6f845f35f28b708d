//! Bootstrap, departed instances, fencing, and a spec from a newer version.

use super::*;

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
