//! Base backups and point-in-time recovery against a real PostgreSQL 15: to a directory and
//! to a real S3-protocol server (s3s-fs) on loopback. Restores to a time, a restore point, an
//! LSN, the end of the backup and the end of the archive, each checked row by row; a corrupt
//! object and a missing WAL segment stop a restore naming them; an interrupted backup is not
//! listed as complete; retention deletes exactly what the window allows.

mod support;

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
    (sb, warden, c)
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

    // The catalog is the destination.
    let list = pgwarden_json(
        &a,
        &["backup", "list", "--json", "--destination", &destination],
    );
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["status"], "complete");
    assert_eq!(list[0]["info"]["start_lsn"], b["start_lsn"]);
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
    for (args, expected) in [
        (vec!["--target-time", t.as_str()], Some((200, 200))),
        (vec!["--target-name", "three-hundred"], Some((300, 300))),
        (vec!["--target-xid", xid.as_str()], Some((300, 300))),
        (vec!["--target-lsn", lsn.as_str()], Some((400, 400))),
        (vec!["--target", "immediate"], Some((100, 100))),
    ] {
        let (_sb, w, rc) = restored(&from, &args, "").await;
        assert_eq!(table_t(&rc).await, expected, "restore {args:?}");
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
    let err = restore(&[]);
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
    let err = restore(&[]);
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
async fn s3_backups_an_interrupted_one_retention_and_a_point_in_time_restore() {
    let Some(bin) = support::wal::s3s_fs() else {
        eprintln!("skipped: s3s-fs not found (.ci/run installs it)");
        return;
    };
    let probe = Sandbox::new();
    let s3 = S3Server::start(&bin, &probe.dir.path().join("s3"), BUCKET);
    let credentials = support::wal::credentials_dir(&probe);
    let s3_settings = format!(
        "[wal.s3]\nendpoint = \"{}\"\nallow_http = true\ncredentials_dir = \"{}\"\n",
        s3.endpoint(),
        credentials.display()
    );
    let a = source(&format!("s3://{BUCKET}/cluster-a"), &s3_settings);
    let warden = a.start();
    let c = a.wait_client(LONG).await;
    let config = a.config().display().to_string();
    let with_config = ["--config", config.as_str()];
    exec(&c, "CREATE TABLE t (i int)").await;
    rows(&c, 1, 10).await;
    let backup = || pgwarden_json(&a, &["backup", "--json", "--config", &config]);
    let first = backup();
    let first_id = first["id"].as_str().unwrap().to_string();

    // Interrupted mid-way (kill -9), slowed down so that it is: never listed as complete.
    support::wal::pgbench(a.port, &["-i", "-q", "-s", "2"]);
    let mut cmd = std::process::Command::new(support::binary());
    cmd.args([
        "backup",
        "--config",
        &config,
        "--part-mib",
        "1",
        "--max-rate",
        "4M",
    ]);
    let mut killed = a.spawn(cmd);
    let objects = s3.root.join(BUCKET).join("cluster-a/base");
    let deadline = Instant::now() + LONG;
    let interrupted = loop {
        let part = std::fs::read_dir(&objects).ok().and_then(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.join("base.tar.00000").is_file() && !p.ends_with(&first_id))
        });
        if let Some(p) = part {
            break p.file_name().unwrap().to_string_lossy().into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no part uploaded: {}",
            killed.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    killed.signal(Signal::SIGKILL);
    killed.wait_exit(LONG);
    let list = pgwarden_json(&a, &["backup", "list", "--json", "--config", &config]);
    let status = |list: &Value, id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .map(|e| e["status"].as_str().unwrap().to_string())
    };
    assert_eq!(
        status(&list, &interrupted).as_deref(),
        Some("incomplete"),
        "{list}"
    );
    assert_eq!(
        status(&list, first["id"].as_str().unwrap()).as_deref(),
        Some("complete")
    );

    // The next ones work; a time between two of them for the restore.
    let second = backup();
    rows(&c, 11, 20).await;
    let t = now(&c).await;
    rows(&c, 21, 30).await;
    archive_all(&c).await;
    // Room between the two backups' ends for the retention window to start in.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let third = backup();

    // Retention: a window that starts between the second's end and the third's: the second
    // stays (it is where the window's first moments are recovered from), the first and the
    // interrupted one go, and the WAL before the second's start.
    let end =
        |b: &Value| pgwarden::backup::info::parse_time(b["end_time"].as_str().unwrap()).unwrap();
    // The window starts just after the second's end now, and a little later at each command.
    let start = end(&second) + Duration::from_millis(50);
    assert!(end(&third) > start + Duration::from_secs(1));
    let window = std::time::SystemTime::now().duration_since(start).unwrap();
    let retention = format!("{}ms", window.as_millis());
    let mut wal_before: Vec<String> = std::fs::read_dir(s3.root.join(BUCKET).join("cluster-a/wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.as_str() < second["first_wal"].as_str().unwrap())
        .map(|n| format!("wal/{n}"))
        .collect();
    wal_before.sort();
    assert!(!wal_before.is_empty());
    let mut prune = vec!["backup", "prune", "--json", "--retention", &retention];
    prune.extend_from_slice(&with_config);
    let dry = pgwarden_json(&a, &[prune.clone(), vec!["--dry-run"]].concat());
    let ids = |v: &Value| -> Vec<String> {
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let mut gone = vec![
        first["id"].as_str().unwrap().to_string(),
        interrupted.clone(),
    ];
    gone.sort();
    assert_eq!(ids(&dry["delete_backups"]), gone, "{dry}");
    assert_eq!(
        ids(&dry["keep"]),
        [
            second["id"].as_str().unwrap(),
            third["id"].as_str().unwrap()
        ],
        "{dry}"
    );
    let mut planned = ids(&dry["delete_wal"]);
    planned.retain(|k| k.len() == "wal/".len() + 24);
    assert_eq!(planned, wal_before, "{dry}");
    // The dry run deleted nothing; the real one deletes exactly that.
    assert_eq!(
        pgwarden_json(&a, &["backup", "list", "--json", "--config", &config])
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let done = pgwarden_json(&a, &prune);
    assert_eq!(done, dry);
    let list = pgwarden_json(&a, &["backup", "list", "--json", "--config", &config]);
    let left: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        left,
        [
            second["id"].as_str().unwrap(),
            third["id"].as_str().unwrap()
        ]
    );
    for key in &wal_before {
        assert!(
            !s3.root.join(BUCKET).join("cluster-a").join(key).exists(),
            "{key} kept"
        );
    }

    // A point-in-time restore from S3 after the pruning: exactly the rows before T.
    let (_sb, w, rc) = restored(&with_config, &["--target-time", &t], "").await;
    assert_eq!(table_t(&rc).await, Some((20, 20)));
    drop(rc);
    stop(w);
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

const NS: &str = "default";
const CLUSTER: &str = "pg";

/// The condition `type_` of instance `pod` in the PostgresCluster's status.
fn condition(server: &support::apiserver::ApiServer, pod: &str, type_: &str) -> Option<Value> {
    let c = server.get("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER)?;
    c["status"]["instances"][pod]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

#[tokio::test]
async fn kubernetes_backups_on_request_and_on_the_spec_schedule() {
    let archive_dir = tempfile::tempdir().unwrap();
    support::chown(archive_dir.path());
    let destination = format!("file://{}", archive_dir.path().display());
    let server = support::apiserver::ApiServer::start();
    server.seed_single(NS, CLUSTER, "pg-0");
    let a = source(
        &destination,
        &format!(
            "[kubernetes]\ncluster = \"{CLUSTER}\"\nnamespace = \"{NS}\"\npod_name = \"pg-0\"\n\
             status_interval = \"1s\"\napi_timeout = \"2s\"\n"
        ),
    );
    let mut cmd = std::process::Command::new(support::binary());
    cmd.arg("run")
        .arg("--config")
        .arg(a.config())
        .env("KUBECONFIG", server.kubeconfig(a.dir.path(), "pg-0"));
    let warden = a.spawn(cmd);
    let c = a.wait_client(LONG).await;
    exec(&c, "CREATE TABLE t (i int)").await;
    let complete = || {
        let v = pgwarden_json(
            &a,
            &["backup", "list", "--json", "--destination", &destination],
        );
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["status"] == "complete")
            .count()
    };

    // On request: the annotation's value comes back in the condition.
    server.update_with("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER, |c| {
        c["metadata"]["annotations"] = serde_json::json!({"pgwarden.dev/backup": "before-upgrade"});
    });
    let done = eventually("the requested backup", LONG, async || {
        condition(&server, "pg-0", "Backup").filter(|c| c["reason"] == "BackupCompleted")
    })
    .await;
    let message = done["message"].as_str().unwrap();
    assert!(
        message.starts_with("pgwarden.dev/backup=before-upgrade: backup "),
        "{done}"
    );
    assert_eq!(complete(), 1);
    let reasons: Vec<String> = server
        .list("events.k8s.io/v1", "events", NS)
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    for r in ["BackupStarted", "BackupCompleted"] {
        assert!(reasons.iter().any(|x| x == r), "no {r} Event: {reasons:?}");
    }

    // The same through the command line, which waits for the outcome.
    let out = std::process::Command::new(support::binary())
        .args([
            "backup",
            "--cluster",
            CLUSTER,
            "--namespace",
            NS,
            "--timeout",
            "60s",
        ])
        .env("KUBECONFIG", server.kubeconfig(a.dir.path(), "cli"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("pgwarden.dev/backup=cli-") && said.contains(" complete"),
        "{said}"
    );
    assert_eq!(complete(), 2);

    // A schedule that does not parse is refused with the field named; a valid one runs.
    server.update_with("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER, |c| {
        c["spec"]["backup"] = serde_json::json!({"schedule": "nightly"});
    });
    let refused = eventually("the bad schedule refused", LONG, async || {
        condition(&server, "pg-0", "SpecValid").filter(|c| c["status"] == "False")
    })
    .await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("spec.backup.schedule"),
        "{refused}"
    );
    server.update_with("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER, |c| {
        c["spec"]["backup"] = serde_json::json!({"schedule": "*/2 * * * * *", "retention": "1h"});
    });
    eventually("two scheduled backups", LONG, async || {
        (complete() >= 3).then_some(())
    })
    .await;
    assert_eq!(
        condition(&server, "pg-0", "SpecValid").unwrap()["status"],
        "True"
    );
    // The primary's status.backups: what the catalog holds and how the last backup went.
    let status = eventually("status.backups", LONG, async || {
        let c = server.get("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER)?;
        let b = c["status"]["backups"].clone();
        (b["complete"].as_u64()? >= 4).then_some(b)
    })
    .await;
    let last = &status["lastSuccessful"];
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .starts_with("scheduled slot "),
        "{status}"
    );
    assert!(
        last["id"].is_string() && status.get("lastFailed").is_none(),
        "{status}"
    );
    let first = status["firstRecoverablePoint"].as_str().unwrap();
    let latest = status["lastRecoverablePoint"].as_str().unwrap();
    assert!(first < latest, "{status}");
    drop(c);
    stop(warden);
}
