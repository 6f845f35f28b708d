//! Base backups and point-in-time recovery against a real PostgreSQL 15: to a directory and
//! to a real S3-protocol server (s3s-fs) on loopback. Restores to a time, a restore point, an
//! LSN, the end of the backup and the end of the archive, each checked row by row; a corrupt
//! object and a missing WAL segment stop a restore naming them; an interrupted backup is not
//! listed as complete; retention deletes exactly what the window allows.

#[path = "../support/mod.rs"]
mod support;

mod kubernetes;
mod s3;

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::cluster::eventually;
use support::sql::{archive_all, text};
use support::wal::{metric, pgwarden_output, S3Server};
use support::{Sandbox, Warden};

const LONG: Duration = Duration::from_secs(90);
const BUCKET: &str = "pgwarden-backup";

/// A source instance archiving to `destination`.
fn source(destination: &str, more: &str) -> Sandbox {
    let mut sb = Sandbox::new();
    sb.extra = format!(
        "[postgres.parameters]\nwal_keep_size = \"1GB\"\n\
         [wal]\ndestination = \"{destination}\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n{more}"
    );
    sb
}

/// `pgwarden <args>`; panics unless it succeeds; its stdout as JSON.
fn pgwarden_json(sb: &Sandbox, args: &[&str]) -> Value {
    let (code, out, err) = pgwarden_output(sb.dir.path(), args);
    assert_eq!(code, 0, "pgwarden {args:?} failed:\n{err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// `pgwarden <args>`, which must fail: its stderr.
fn pgwarden_fails(sb: &Sandbox, args: &[&str]) -> String {
    let (code, out, err) = pgwarden_output(sb.dir.path(), args);
    assert_eq!(code, 1, "pgwarden {args:?} did not fail:\n{out}\n{err}");
    err
}

async fn exec(c: &tokio_postgres::Client, sql: &str) {
    c.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Inserts rows `from..=to` into `t`, one transaction.
async fn rows(c: &tokio_postgres::Client, from: i32, to: i32) {
    exec(
        c,
        &format!("INSERT INTO t SELECT generate_series({from}, {to})"),
    )
    .await;
}

/// The current time as PostgreSQL sees it, in UTC (RFC 3339).
async fn now(c: &tokio_postgres::Client) -> String {
    text(
        c,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .await
}

/// `SELECT count(*), max(i) FROM t`, or `None` when there is no table t.
async fn table_t(c: &tokio_postgres::Client) -> Option<(i64, i32)> {
    let r = c
        .query_one("SELECT count(*), max(i) FROM t", &[])
        .await
        .ok()?;
    Some((r.get(0), r.get(1)))
}

/// A new instance restored with `args` and started by `pgwarden run` (with `extra` in its
/// configuration).
async fn restored(
    archive_args: &[&str],
    args: &[&str],
    extra: &str,
) -> (Sandbox, Warden, tokio_postgres::Client) {
    let (sb, warden, c, _) = restored_from(archive_args, args, extra).await;
    (sb, warden, c)
}

/// [`restored`], and the id of the backup the restore started from.
async fn restored_from(
    archive_args: &[&str],
    args: &[&str],
    extra: &str,
) -> (Sandbox, Warden, tokio_postgres::Client, String) {
    let mut sb = Sandbox::new();
    sb.extra = extra.to_string();
    let data = sb.data_dir().display().to_string();
    let mut all = vec![
        "restore",
        "--json",
        "--recovery-timeout",
        "60s",
        "--data-dir",
        &data,
    ];
    all.extend_from_slice(archive_args);
    all.extend_from_slice(args);
    let r = pgwarden_json(&sb, &all);
    assert!(r["timeline"].as_u64().unwrap() >= 2, "{r}");
    // Handed over shut down cleanly, promoted, with no recovery setting left.
    assert!(!sb.data_dir().join("recovery.signal").exists());
    assert!(!sb.data_dir().join("postmaster.pid").exists());
    let warden = sb.start();
    let c = sb.wait_client(LONG).await;
    assert_eq!(text(&c, "SELECT pg_is_in_recovery()::text").await, "false");
    let backup = r["backup"].as_str().unwrap_or_default().to_string();
    (sb, warden, c, backup)
}

fn stop(mut warden: Warden) {
    warden.signal(Signal::SIGINT);
    let status = warden.wait_exit(LONG);
    assert!(status.success(), "{}", warden.output());
}

fn flip_byte(path: &Path) -> Vec<u8> {
    let original = std::fs::read(path).unwrap();
    let mut bad = original.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    std::fs::write(path, bad).unwrap();
    original
}

#[tokio::test]
async fn backup_to_a_directory_and_restore_to_each_kind_of_target() {
    let archive_dir = tempfile::tempdir().unwrap();
    support::chown(archive_dir.path());
    let destination = format!("file://{}", archive_dir.path().display());
    let a = source(&destination, "");
    let warden = a.start();
    let c = a.wait_client(LONG).await;
    let config = a.config().display().to_string();
    exec(&c, "CREATE TABLE t (i int)").await;
    rows(&c, 1, 100).await;

    let b = pgwarden_json(&a, &["backup", "--json", "--config", &config]);
    let id = b["id"].as_str().unwrap().to_string();
    assert_eq!(b["source"], "pg-test");
    assert_eq!(b["timeline"], 1);
    assert!(b["files"].as_u64().unwrap() > 900, "{b}");
    assert!(
        b["stored_bytes"].as_u64().unwrap() < b["bytes"].as_u64().unwrap() / 3,
        "zstd: {b}"
    );

    rows(&c, 101, 200).await;
    let t = now(&c).await;
    let xid = text(
        &c,
        "WITH ins AS (INSERT INTO t SELECT generate_series(201, 300)) SELECT txid_current()::text",
    )
    .await;
    exec(&c, "SELECT pg_create_restore_point('three-hundred')").await;
    // The WAL after the backup spans segments: one of them goes missing below.
    archive_all(&c).await;
    rows(&c, 301, 400).await;
    let lsn = text(&c, "SELECT pg_current_wal_insert_lsn()::text").await;
    rows(&c, 401, 500).await;
    exec(
        &c,
        "DROP TABLE t; CREATE TABLE after_drop AS SELECT 'last' AS v",
    )
    .await;
    archive_all(&c).await;
    // A second backup, after every target below but the latest: the restore point and the
    // transaction, which no catalog entry places in time, are reached from the first.
    let newest = pgwarden_json(&a, &["backup", "--json", "--config", &config]);
    let newest = newest["id"].as_str().unwrap().to_string();

    // The catalog is the destination.
    let list = pgwarden_json(
        &a,
        &["backup", "list", "--json", "--destination", &destination],
    );
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let first = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} in {list}"));
    assert_eq!(first["status"], "complete");
    assert_eq!(first["info"]["start_lsn"], b["start_lsn"]);
    let v = pgwarden_json(
        &a,
        &[
            "backup",
            "verify",
            &id,
            "--json",
            "--destination",
            &destination,
        ],
    );
    assert_eq!(
        v["objects"].as_u64().unwrap() as usize,
        b["parts"].as_array().unwrap().len() + 2,
        "{v}"
    );
    assert!(v["wal_segments"].as_u64().unwrap() >= 1);

    let from = ["--destination", destination.as_str()];
    for (args, expected, from_backup) in [
        (vec!["--target-time", t.as_str()], Some((200, 200)), &id),
        (
            vec!["--target-name", "three-hundred"],
            Some((300, 300)),
            &id,
        ),
        (vec!["--target-xid", xid.as_str()], Some((300, 300)), &id),
        (vec!["--target-lsn", lsn.as_str()], Some((400, 400)), &id),
        (vec!["--target", "immediate"], None, &newest),
        (
            vec!["--backup", id.as_str(), "--target", "immediate"],
            Some((100, 100)),
            &id,
        ),
    ] {
        let (_sb, w, rc, used) = restored_from(&from, &args, "").await;
        assert_eq!(table_t(&rc).await, expected, "restore {args:?}");
        assert_eq!(&used, from_backup, "restore {args:?}");
        drop(rc);
        stop(w);
    }
    // Latest: every acknowledged commit of the source. Started with the source's destination
    // by mistake: it refuses to archive there, and the archive gets nothing of it.
    let wal_extra = format!("[wal]\ndestination = \"{destination}\"\n");
    let (restored_sb, w, rc) = restored(&from, &[], &wal_extra).await;
    assert_eq!(table_t(&rc).await, None);
    assert_eq!(text(&rc, "SELECT v FROM after_drop").await, "last");
    let objects = || {
        std::fs::read_dir(archive_dir.path().join("wal"))
            .unwrap()
            .count()
    };
    let before = objects();
    exec(&rc, "CREATE TABLE mine AS SELECT 1 AS x").await;
    text(&rc, "SELECT pg_switch_wal()::text").await;
    eventually("archiving refused", LONG, async || {
        let row = rc.query_one("SELECT failed_count FROM pg_stat_archiver", &[]);
        (row.await.ok()?.get::<_, i64>(0) >= 2).then_some(())
    })
    .await;
    assert_eq!(
        objects(),
        before,
        "the restored cluster archived into its source's destination"
    );
    assert!(w.output().contains("was restored from"), "{}", w.output());
    // Nor does a backup of it go there (it would be listed as one of the source's).
    let config = restored_sb.config().display().to_string();
    let listed = || {
        pgwarden_json(
            &restored_sb,
            &["backup", "list", "--json", "--destination", &destination],
        )
    };
    let count = listed().as_array().map(Vec::len);
    let err = pgwarden_fails(&restored_sb, &["backup", "--config", &config]);
    assert!(err.contains("was restored from"), "{err}");
    assert_eq!(listed().as_array().map(Vec::len), count, "nothing listed");
    drop(rc);
    stop(w);

    // Refusals, each before anything is written.
    let sb = Sandbox::new();
    let data = sb.data_dir();
    let data_s = data.display().to_string();
    let restore = |more: &[&str]| {
        let mut args = vec![
            "restore",
            "--destination",
            &destination,
            "--data-dir",
            &data_s,
        ];
        args.extend_from_slice(more);
        pgwarden_fails(&sb, &args)
    };
    let err = restore(&["--target-time", "2020-01-01T00:00:00Z"]);
    assert!(
        err.contains(&format!("before the end of the oldest backup, {id}")),
        "{err}"
    );
    let err = restore(&["--target-time", "2099-01-01T00:00:00Z"]);
    assert!(err.contains("after the newest archived WAL"), "{err}");
    let err = restore(&["--target-lsn", "FF/0"]);
    assert!(err.contains("after the newest archived WAL"), "{err}");
    assert!(!data.exists());
    // A destination directory that does not exist is named, and not created.
    let missing = sb.dir.path().join("no-such-archive");
    let url = format!("file://{}", missing.display());
    let (code, _, err) = pgwarden_output(sb.dir.path(), &["backup", "list", "--destination", &url]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not exist") && !missing.exists(), "{err}");

    // A missing WAL segment (not the newest: a shorter archive is no error) is named.
    let wal_dir = archive_dir.path().join("wal");
    let after_backup =
        pgwarden::wal::names::next_segment(b["last_wal"].as_str().unwrap(), 16 << 20).unwrap();
    let moved = archive_dir.path().join("moved");
    std::fs::rename(wal_dir.join(&after_backup), &moved).unwrap();
    let err = restore(&["--backup", &id]);
    assert!(
        err.contains(&format!("wal/{after_backup} is missing from the archive")),
        "{err}"
    );
    assert!(!data.exists());
    std::fs::rename(&moved, wal_dir.join(&after_backup)).unwrap();

    // A corrupt object is named, by verify and by restore.
    let part = format!("base/{id}/base.tar.00000");
    let original = flip_byte(&archive_dir.path().join(&part));
    let (code, _, err) = pgwarden_output(
        sb.dir.path(),
        &["backup", "verify", &id, "--destination", &destination],
    );
    assert_eq!(code, 1);
    assert!(err.contains(&format!("{part} is corrupt")), "{err}");
    let err = restore(&["--backup", &id]);
    assert!(err.contains(&format!("{part} is corrupt")), "{err}");
    assert!(!data.exists(), "a failed restore leaves nothing behind");
    std::fs::write(archive_dir.path().join(&part), original).unwrap();

    // A data directory that is not empty is never restored into.
    std::fs::create_dir_all(data.join("base")).unwrap();
    let err = restore(&[]);
    assert!(err.contains("is not empty"), "{err}");
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1);

    drop(c);
    stop(warden);
}

#[tokio::test]
async fn scheduled_backups_on_the_primary_with_retention_and_metrics() {
    let archive_dir = tempfile::tempdir().unwrap();
    support::chown(archive_dir.path());
    let destination = format!("file://{}", archive_dir.path().display());
    // A slot every 3 s; a window of 1 s keeps the newest backup and the one before it.
    let a = source(
        &destination,
        "[backup]\nschedule = \"*/3 * * * * *\"\nretention = \"1s\"\n",
    );
    let warden = a.start();
    let c = a.wait_client(LONG).await;
    exec(&c, "CREATE TABLE t (i int)").await;
    let metrics = || support::http_get(a.metrics_port, "/metrics").unwrap().1;
    let list = || {
        let v = pgwarden_json(
            &a,
            &["backup", "list", "--json", "--destination", &destination],
        );
        let complete: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["status"] == "complete")
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        complete
    };
    let first = eventually("a scheduled backup", LONG, async || list().first().cloned()).await;
    // Three more slots: the first backup falls out of the window and is deleted.
    let m = eventually("retention deleting the first backup", LONG, async || {
        let m = metrics();
        let done = metric(&m, "pgwarden_backups_total{result=\"success\"}")?;
        (done >= 3.0 && !list().contains(&first)).then_some(m)
    })
    .await;
    assert!(
        metric(
            &m,
            "pgwarden_backup_retention_deleted_total{kind=\"backup\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(metric(&m, "pgwarden_backup_retention_deleted_total{kind=\"wal\"}").unwrap() >= 1.0);
    assert_eq!(
        metric(&m, "pgwarden_backup_schedule_period_seconds"),
        Some(3.0)
    );
    assert_eq!(
        metric(&m, "pgwarden_backups_total{result=\"failure\"}"),
        Some(0.0)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = metric(&m, "pgwarden_backup_last_success_timestamp_seconds").unwrap();
    assert!(now - last < 30.0, "last success {last}, now {now}");
    let oldest = metric(&m, "pgwarden_backup_first_recoverable_timestamp_seconds").unwrap();
    assert!(oldest > 0.0 && oldest <= last);
    // The slots were claimed by this instance, and retention deletes claims of past slots
    // (at least three slots went by; one or two claims may be newer than the window).
    let claims: Vec<Value> = std::fs::read_dir(archive_dir.path().join("schedule"))
        .unwrap()
        .map(|e| {
            let bytes = support::wal::decode(&e.unwrap().path());
            serde_json::from_slice(&bytes).unwrap()
        })
        .collect();
    assert!(claims.len() <= 2, "{claims:?}");
    assert!(
        claims.iter().all(|c| c["instance"] == "pg-test"),
        "{claims:?}"
    );
    drop(c);
    stop(warden);
}

#[tokio::test]
async fn a_backup_taken_from_a_standby_restores() {
    let archive_dir = tempfile::tempdir().unwrap();
    support::chown(archive_dir.path());
    let destination = format!("file://{}", archive_dir.path().display());
    let a = source(&destination, "");
    let primary = a.start();
    let c = a.wait_client(LONG).await;
    exec(&c, "CREATE TABLE t (i int)").await;
    rows(&c, 1, 50).await;

    // A streaming standby of it, cloned with pg_basebackup -R, run by its own pgwarden.
    let mut b = Sandbox::new();
    b.name = "pg-standby".into();
    support::wal::pg_basebackup(a.port, &b.data_dir(), &["-X", "stream", "-R"]);
    support::wal::chown_tree(&b.data_dir());
    let standby = b.start();
    let bc = b.wait_client(LONG).await;
    eventually("the standby replaying the rows", LONG, async || {
        (table_t(&bc).await == Some((50, 50))).then_some(())
    })
    .await;

    // Its backup ends in a segment the primary archives: the primary switches segments
    // until the backup is complete.
    let config = b.config().display().to_string();
    let dest = destination.clone();
    let run = tokio::task::spawn_blocking(move || {
        pgwarden_output(
            Path::new("/"),
            &[
                "backup",
                "--json",
                "--config",
                &config,
                "--destination",
                &dest,
                "--wal-timeout",
                "20s",
                "--timeout",
                "40s",
            ],
        )
    });
    while !run.is_finished() {
        exec(&c, "SELECT pg_switch_wal()").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, out, err) = run.await.unwrap();
    assert_eq!(code, 0, "{err}");
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["source"], "pg-standby");
    assert_eq!(info["standby"], true);

    rows(&c, 51, 60).await;
    archive_all(&c).await;
    let from = ["--destination", destination.as_str()];
    let (_sb, w, rc) = restored(&from, &["--backup", info["id"].as_str().unwrap()], "").await;
    assert_eq!(table_t(&rc).await, Some((60, 60)));
    drop((rc, bc, c));
    stop(w);
    stop(standby);
    stop(primary);
}
