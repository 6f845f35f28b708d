//! A new cluster created from another one's backup (`spec.bootstrap.recovery`) with a real
//! PostgreSQL 15: the first instance restores to a point in time instead of running initdb
//! and becomes the primary, the others clone it; the table dropped after that time is back
//! with exactly the rows committed before it. The source is on S3 (`s3s-fs` on loopback; the
//! test skips without it), read with the credentials of the Secret that
//! `source.s3.credentialsSecret` names, while the new cluster archives to its own `file://`
//! destination (file sources are covered by the CLI restore tests). A restore that fails is
//! reported and leaves nothing; and a requested backup is taken by the streaming standby
//! (`target: prefer-standby`) and restores.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use support::cluster::{base64_encode, eventually, Cluster};
use support::sql::{archive_all, text};
use support::wal::{pgwarden_output, S3Server, S3_KEY, S3_SECRET};
use support::Sandbox;

const LONG: Duration = Duration::from_secs(90);
const BUCKET: &str = "pgwarden-backup";

async fn exec(c: &tokio_postgres::Client, sql: &str) {
    c.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn event_reasons(cluster: &Cluster) -> Vec<String> {
    cluster
        .server
        .list("events.k8s.io/v1", "events", support::cluster::NS)
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn a_new_three_instance_cluster_restored_to_a_point_in_time() {
    let Some(bin) = support::wal::s3s_fs() else {
        eprintln!("skipped: s3s-fs not found (.ci/run installs it)");
        return;
    };
    let own_dir = tempfile::tempdir().unwrap();
    support::chown(own_dir.path());
    let own = format!("file://{}", own_dir.path().display());

    // The source: one instance archiving to S3, a backup, rows, the time T, more rows, then
    // the mistake.
    let mut a = Sandbox::new();
    let s3 = S3Server::start(&bin, &a.dir.path().join("s3"), BUCKET);
    let source = format!("s3://{BUCKET}/old-pg");
    a.extra = format!(
        "[wal]\ndestination = \"{source}\"\n\
         [wal.s3]\nendpoint = \"{}\"\nallow_http = true\ncredentials_dir = \"{}\"\n",
        s3.endpoint(),
        support::wal::credentials_dir(&a).display()
    );
    let mut warden = a.start();
    let c = a.wait_client(LONG).await;
    exec(
        &c,
        "CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 100)",
    )
    .await;
    let config = a.config().display().to_string();
    let (code, _, err) = pgwarden_output(a.dir.path(), &["backup", "--config", &config]);
    assert_eq!(code, 0, "{err}");
    exec(&c, "INSERT INTO t SELECT generate_series(101, 200)").await;
    let t = text(
        &c,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .await;
    exec(&c, "INSERT INTO t SELECT generate_series(201, 300)").await;
    exec(&c, "DROP TABLE t").await;
    archive_all(&c).await;
    drop(c);
    warden.signal(Signal::SIGINT);
    assert!(warden.wait_exit(LONG).success(), "{}", warden.output());

    // The new cluster reads the source with the credentials of a Secret, which pgwarden reads
    // through the API server, and archives to its own destination.
    let credentials = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "old-pg-s3", "namespace": support::cluster::NS},
        "data": {
            "AWS_ACCESS_KEY_ID": base64_encode(S3_KEY),
            "AWS_SECRET_ACCESS_KEY": base64_encode(S3_SECRET),
        }
    });
    let cluster = Cluster::start_seeded(3, vec![credentials], |spec| {
        spec["walArchive"] = json!({"destination": own});
        spec["bootstrap"] = json!({"recovery": {
            "source": {
                "destination": source,
                "s3": {"endpoint": s3.endpoint(), "allowHttp": true, "credentialsSecret": "old-pg-s3"}
            },
            "target": {"time": t}
        }});
    });
    let p = cluster.wait_all_streaming(Duration::from_secs(120)).await;
    let primary = cluster.client(p).await.expect("the restored primary");
    let r = primary
        .query_one("SELECT count(*), min(i), max(i) FROM t", &[])
        .await
        .expect("table t is back");
    let got: (i64, i32, i32) = (r.get(0), r.get(1), r.get(2));
    assert_eq!(got, (200, 1, 200));
    let streaming: i64 = primary
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(streaming, 2);
    // Onto a new timeline, and never initdb.
    let timeline: i32 = primary
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(timeline >= 2, "timeline {timeline}");
    let reasons = event_reasons(&cluster);
    for r in ["RestoreStarted", "Restored"] {
        assert!(reasons.iter().any(|x| x == r), "no {r} Event: {reasons:?}");
    }
    assert!(!reasons.iter().any(|x| x == "Initialized"), "{reasons:?}");
    // At the first attempt: the Secret's copy was there when the restore opened the source.
    assert!(!reasons.iter().any(|x| x == "RestoreFailed"), "{reasons:?}");
    // The copy is the restoring instance's own, readable by it alone.
    let copy = cluster
        .run_dir(p)
        .join("wal/source-credentials/AWS_SECRET_ACCESS_KEY");
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), S3_SECRET);
    let mode = std::fs::metadata(&copy).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", copy.display());

    // The restored primary archives its new timeline to its own destination, nothing to the
    // source's.
    let history = format!("{timeline:08X}.history");
    eventually(
        "the new timeline archived to the cluster's own destination",
        LONG,
        async || {
            let names: Vec<String> = std::fs::read_dir(own_dir.path().join("wal"))
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            names.iter().any(|n| n.starts_with(&history)).then_some(())
        },
    )
    .await;
    // s3s-fs keeps each object as a file under its root, bucket and key.
    let in_source = std::fs::read_dir(s3.root.join(BUCKET).join("old-pg/wal"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with(&history));
    assert!(!in_source, "the source's archive got the new timeline");
}

/// `target: prefer-standby` (the default): a requested backup is taken by the streaming
/// standby, not the primary (which switches WAL for it), and restores.
#[tokio::test]
async fn a_requested_backup_is_taken_by_the_streaming_standby_and_restores() {
    let own_dir = tempfile::tempdir().unwrap();
    support::chown(own_dir.path());
    let own = format!("file://{}", own_dir.path().display());
    let cluster = Cluster::start(2, |spec| {
        spec["walArchive"] = json!({"destination": own});
    });
    let p = cluster.wait_all_streaming(Duration::from_secs(120)).await;
    let s = cluster.others(p)[0];
    let primary = cluster.client(p).await.expect("the primary");
    exec(
        &primary,
        "CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 50)",
    )
    .await;

    cluster.annotate("pgwarden.dev/backup", Some("from-standby"));
    let list = || {
        let (code, out, err) = pgwarden_output(
            own_dir.path(),
            &["backup", "list", "--json", "--destination", &own],
        );
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let backup = eventually("the standby's backup complete", LONG, async || {
        list()
            .as_array()?
            .iter()
            .find(|e| e["status"] == "complete")
            .cloned()
    })
    .await;
    assert_eq!(backup["info"]["source"], cluster.name(s), "{backup}");
    assert_eq!(backup["info"]["standby"], true, "{backup}");
    assert_eq!(list().as_array().unwrap().len(), 1, "taken once");
    // The standby reports it, in its own condition.
    eventually("the standby's Backup condition", LONG, async || {
        let state = cluster.cluster();
        let conditions = state["status"]["instances"][cluster.name(s)]["conditions"].clone();
        conditions
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Backup" && c["reason"] == "BackupCompleted")
            .map(|_| ())
    })
    .await;

    // Only the primary writes status.backups: it records the standby's backup from the catalog.
    let id = backup["id"].as_str().unwrap().to_string();
    eventually("status.backups.lastSuccessful", LONG, async || {
        let b = cluster.cluster()["status"]["backups"].clone();
        (b["lastSuccessful"]["id"] == id.as_str()).then_some(())
    })
    .await;

    exec(&primary, "INSERT INTO t SELECT generate_series(51, 60)").await;
    archive_all(&primary).await;
    let sb = Sandbox::new();
    let data = sb.data_dir().display().to_string();
    let (code, _, err) = pgwarden_output(
        sb.dir.path(),
        &[
            "restore",
            "--destination",
            &own,
            "--backup",
            &id,
            "--recovery-timeout",
            "60s",
            "--data-dir",
            &data,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let mut warden = sb.start();
    let c = sb.wait_client(LONG).await;
    assert_eq!(text(&c, "SELECT count(*)::text FROM t").await, "60");
    drop(c);
    warden.signal(Signal::SIGINT);
    assert!(warden.wait_exit(LONG).success(), "{}", warden.output());
}

/// A restore that cannot succeed (a source without backups): a `RestoreFailed` Event and
/// condition naming the reason, never initdb, nothing in the data directory, no staging
/// directory left.
#[tokio::test]
async fn a_failed_restore_is_reported_and_leaves_the_data_directory_empty() {
    let empty = tempfile::tempdir().unwrap();
    support::chown(empty.path());
    let source = format!("file://{}", empty.path().display());
    let cluster = Cluster::start(1, |spec| {
        spec["bootstrap"] = json!({"recovery": {"source": {"destination": source}}});
    });
    let condition = eventually("the Restore condition failed", LONG, async || {
        let state = cluster.cluster();
        state["status"]["instances"][cluster.name(0)]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Restore" && c["reason"] == "RestoreFailed")
            .cloned()
    })
    .await;
    let message = condition["message"].as_str().unwrap();
    assert!(message.contains("holds no complete backup"), "{condition}");
    let reasons = event_reasons(&cluster);
    assert!(reasons.iter().any(|r| r == "RestoreFailed"), "{reasons:?}");
    assert!(!reasons.iter().any(|r| r == "Initialized"), "{reasons:?}");
    let data = cluster.data_dir(0);
    let empty_or_absent = std::fs::read_dir(&data).map_or(true, |mut d| d.next().is_none());
    assert!(empty_or_absent, "{} has files", data.display());
    let staging = data.with_file_name("data.pgwarden-restore");
    assert!(!staging.exists(), "{} left behind", staging.display());
    assert_eq!(cluster.query_value::<i32>(0, "SELECT 1").await, None);
}
