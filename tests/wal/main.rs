//! WAL archiving against a real PostgreSQL 15 under pgbench load: to a directory and to a real
//! S3-protocol server (s3s-fs) on loopback; a point-in-time restore through `wal-restore`; the
//! S3 server down for a while (backlog, metrics, condition, drain); a conflicting segment; a
//! corrupt object on restore; and `wal-archive` without the daemon.

#[path = "../support/mod.rs"]
mod support;

mod s3;

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use support::apiserver::ApiServer;
use support::wal::{check_archive, decode, metric, pgbench, pgwarden_cmd, S3Server};
use support::{http_get, http_json, Sandbox, Warden};

const LONG: Duration = Duration::from_secs(90);
const FIRST: &str = "000000010000000000000001";

/// The `[wal]` section and settings that keep every segment in pg_wal for comparison.
fn wal_extra(destination: &str, more: &str) -> String {
    format!(
        "[monitor]\ninterval = \"300ms\"\nquery_timeout = \"1s\"\n\
         [postgres.parameters]\nwal_keep_size = \"4GB\"\nmax_wal_size = \"4GB\"\n\
         [wal]\ndestination = \"{destination}\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n{more}"
    )
}

fn status(sb: &Sandbox) -> Value {
    http_json(sb.status_port, "/pg/status").1
}

fn metrics(sb: &Sandbox) -> String {
    http_get(sb.metrics_port, "/metrics").unwrap().1
}

async fn eventually<T>(what: &str, within: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn load(port: u16, args: &'static [&'static str]) {
    tokio::task::spawn_blocking(move || pgbench(port, args))
        .await
        .unwrap();
}

/// Writes a little and switches to a new segment; returns the name of the one completed.
async fn switch(c: &tokio_postgres::Client) -> String {
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS tick (at timestamptz); INSERT INTO tick VALUES (now())",
    )
    .await
    .unwrap();
    c.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0)
}

/// (archived_count, last_archived_wal, failed_count) from pg_stat_archiver.
async fn archiver(c: &tokio_postgres::Client) -> (i64, String, i64) {
    let r = c
        .query_one(
            "SELECT archived_count, coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// Waits until Postgres reports `name` (or a later file) archived.
async fn wait_archived(c: &tokio_postgres::Client, name: &str) {
    eventually(&format!("{name} archived"), LONG, async || {
        let (_, last, _) = archiver(c).await;
        (last.as_str() >= name && !last.ends_with(".history")).then_some(())
    })
    .await;
}

async fn checksum(c: &tokio_postgres::Client) -> (i64, i64, i64) {
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM pgbench_accounts), (SELECT sum(abalance) FROM pgbench_accounts), \
                    (SELECT count(*) FROM pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// The names under the destination's `wal/`, sorted.
fn wal_files(archive: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(archive.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn stop(mut warden: Warden) {
    warden.signal(Signal::SIGINT);
    let status = warden.wait_exit(LONG);
    assert!(status.success(), "{}", warden.output());
}

#[tokio::test]
async fn archives_to_a_directory_under_load_and_a_fresh_instance_restores_to_the_last_segment() {
    let mut a = Sandbox::new();
    let archive = a.dir.path().join("archive");
    a.extra = wal_extra(&format!("file://{}", archive.display()), "");
    let warden = a.start();
    let c = a.wait_client(LONG).await;
    let port = a.port;

    load(port, &["-i", "-q", "-s", "6"]).await;
    // A base backup that needs the archive: no WAL of its own.
    let base = a.dir.path().join("base");
    support::wal::pg_basebackup(port, &base, &["-X", "none"]);
    load(port, &["-c", "4", "-j", "2", "-T", "6", "-n"]).await;
    let expected = checksum(&c).await;
    let last = switch(&c).await;
    wait_archived(&c, &last).await;

    // Every segment generated is archived, byte-identical after decompression, and Postgres
    // never saw a failure.
    let n = check_archive(
        &archive.join("wal"),
        &a.data_dir().join("pg_wal"),
        FIRST,
        &last,
    );
    assert!(n >= 8, "only {n} segments");
    let (archived, _, failed) = archiver(&c).await;
    assert_eq!(failed, 0);
    assert!(archived >= n as i64);
    let doc = status(&a);
    assert_eq!(doc["wal"]["state"], "ok", "{doc}");
    assert!(
        doc["wal"]["archived_segments"].as_u64().unwrap() >= n as u64,
        "{doc}"
    );
    assert_eq!(
        doc["wal"]["destination"],
        format!("file://{}", archive.display())
    );
    let m = metrics(&a);
    assert!(metric(&m, "pgwarden_wal_archived_segments_total").unwrap() >= n as f64);
    assert!(metric(&m, "pgwarden_wal_archived_bytes_total").unwrap() >= (n << 24) as f64 * 0.9);
    assert!(metric(&m, "pgwarden_wal_upload_duration_seconds_count").unwrap() >= n as f64);
    assert_eq!(metric(&m, "pgwarden_wal_archive_failing"), Some(0.0));
    assert!(metric(&m, "pgwarden_wal_last_archive_age_seconds").is_some());
    drop(c);
    stop(warden);

    // A fresh instance from the base copy and the archive: archive recovery to the end of the
    // archive through wal-restore, then promotion.
    let mut b = Sandbox::new();
    std::fs::rename(&base, b.data_dir()).unwrap();
    std::fs::write(b.data_dir().join("recovery.signal"), "").unwrap();
    support::wal::chown_tree(&b.data_dir());
    b.extra = wal_extra(&format!("file://{}", archive.display()), "prefetch = 4\n");
    let warden = b.start();
    let c = b.wait_client(LONG).await;
    eventually("promotion after archive recovery", LONG, async || {
        let r = c.query_one("SELECT pg_is_in_recovery()", &[]).await.ok()?;
        (!r.get::<_, bool>(0)).then_some(())
    })
    .await;
    assert_eq!(checksum(&c).await, expected, "restored data differs");
    let doc = status(&b);
    let restored = doc["wal"]["restored_segments"].as_u64().unwrap();
    // Everything after the base backup's start came from the archive.
    assert!(restored >= 3, "{doc}");
    assert_eq!(doc["wal"]["restore_failures"], 0, "{doc}");
    let m = metrics(&b);
    assert!(
        metric(&m, "pgwarden_wal_prefetch_hits_total").unwrap() >= (restored / 2) as f64,
        "prefetch barely used:\n{m}"
    );
    // The new timeline's history went to the archive.
    eventually("00000002.history archived", LONG, async || {
        archive.join("wal/00000002.history").is_file().then_some(())
    })
    .await;
    drop(c);
    stop(warden);
}

#[tokio::test]
async fn refuses_a_conflict_detects_corruption_and_archives_without_the_daemon() {
    let mut sb = Sandbox::new();
    let archive = sb.dir.path().join("archive");
    sb.extra = wal_extra(&format!("file://{}", archive.display()), "");
    let warden = sb.start();
    let c = sb.wait_client(LONG).await;
    let settings = sb.run_dir().join("wal/settings.json");
    let settings = settings.to_str().unwrap();
    let data = sb.data_dir();

    // Something else already sits in the archive under the name of the current segment.
    let current: String = c
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await
        .unwrap()
        .get(0);
    let object = archive.join("wal").join(&current);
    let bogus = pgwarden::wal::format::encode(
        b"not this segment",
        pgwarden::wal::format::Compression::Zstd,
    )
    .unwrap();
    std::fs::create_dir_all(object.parent().unwrap()).unwrap();
    std::fs::write(&object, &bogus).unwrap();
    assert_eq!(switch(&c).await, current);
    let doc = eventually("the conflict reported", LONG, async || {
        let doc = status(&sb);
        (doc["wal"]["state"] == "conflict").then_some(doc)
    })
    .await;
    assert!(
        doc["wal"]["last_error"]
            .as_str()
            .unwrap()
            .contains("different content"),
        "{doc}"
    );
    eventually("Postgres saw the failure", LONG, async || {
        (archiver(&c).await.2 > 0).then_some(())
    })
    .await;
    let m = metrics(&sb);
    assert!(
        metric(
            &m,
            "pgwarden_wal_archive_failures_total{reason=\"conflict\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(std::fs::read(&object).unwrap(), bogus, "never overwritten");

    // An operator removes the stray object: the segment is archived.
    std::fs::remove_file(&object).unwrap();
    let next = switch(&c).await;
    wait_archived(&c, &next).await;
    assert_eq!(status(&sb)["wal"]["state"], "ok");
    check_archive(&archive.join("wal"), &data.join("pg_wal"), FIRST, &next);

    // Restore through the daemon: a good object, a missing one (promptly), a corrupt one.
    let out = sb.dir.path().join("restored");
    let (code, err) = pgwarden_cmd(
        &data,
        &[
            "wal-restore",
            "--settings",
            settings,
            FIRST,
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(data.join("pg_wal").join(FIRST)).unwrap()
    );
    let started = Instant::now();
    let (code, _) = pgwarden_cmd(
        &data,
        &[
            "wal-restore",
            "--settings",
            settings,
            "0000000100000000000000FF",
            "x",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "not found took {:?}",
        started.elapsed()
    );
    let mut corrupt = std::fs::read(&object).unwrap();
    let at = corrupt.len() / 2;
    corrupt[at] ^= 0x5a;
    std::fs::write(&object, &corrupt).unwrap();
    let dest = sb.dir.path().join("corrupt-restore");
    let (code, _) = pgwarden_cmd(
        &data,
        &[
            "wal-restore",
            "--settings",
            settings,
            &current,
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(!dest.exists(), "a corrupt segment was handed over");
    let doc = status(&sb);
    assert_eq!(doc["wal"]["restore_failures"], 1, "{doc}");
    assert!(
        doc["wal"]["last_restore_error"]
            .as_str()
            .unwrap()
            .contains("corrupt"),
        "{doc}"
    );
    let m = metrics(&sb);
    assert_eq!(
        metric(
            &m,
            "pgwarden_wal_restore_failures_total{reason=\"corrupt\"}"
        ),
        Some(1.0)
    );
    drop(c);
    stop(warden);

    // No daemon: the commands do the work themselves.
    let (code, err) = pgwarden_cmd(
        &data,
        &[
            "wal-restore",
            "--settings",
            settings,
            &current,
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("corrupt"), "{err}");
    assert!(!dest.exists());
    let unarchived = newest_unarchived(&data.join("pg_wal"), &archive.join("wal"));
    let rel = format!("pg_wal/{unarchived}");
    let (code, err) = pgwarden_cmd(&data, &["wal-archive", "--settings", settings, &rel]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        decode(&archive.join("wal").join(&unarchived)),
        std::fs::read(data.join(&rel)).unwrap()
    );
    // Again: identical content is already archived, which is success.
    let (code, err) = pgwarden_cmd(&data, &["wal-archive", "--settings", settings, &rel]);
    assert_eq!(code, 0, "{err}");
    // Different content under that name is refused.
    let other = sb.dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    support::chown(&other);
    let mut content = std::fs::read(data.join(&rel)).unwrap();
    content[100] ^= 1;
    std::fs::write(other.join(&unarchived), content).unwrap();
    let (code, err) = pgwarden_cmd(
        &data,
        &[
            "wal-archive",
            "--settings",
            settings,
            other.join(&unarchived).to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("refusing"), "{err}");
}

/// The highest-named segment in pg_wal that is not in the archive.
fn newest_unarchived(pg_wal: &Path, archive_wal: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(pg_wal)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| pgwarden::wal::names::kind(n) == Some(pgwarden::wal::names::Kind::Segment))
        .filter(|n| !archive_wal.join(n).exists())
        .collect();
    names.sort();
    names.pop().expect("an unarchived segment")
}

/// Every file below `dir` with its length and modification time.
fn tree(dir: &Path) -> Vec<(std::path::PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                todo.push(e.path());
            } else {
                out.push((e.path(), meta.len(), meta.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_spool_directory_over_the_data_directory_is_refused_and_foreign_files_survive() {
    let mut sb = Sandbox::new();
    let archive = format!("file://{}", sb.dir.path().join("archive").display());
    // A spool directory shared with someone else's file, and a segment an earlier run left.
    let spool = sb.dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    support::chown(&spool);
    let foreign = spool.join("notes.txt");
    let stale = spool.join(FIRST);
    std::fs::write(&foreign, "not pgwarden's").unwrap();
    std::fs::write(&stale, "stale").unwrap();
    let good = wal_extra(&archive, &format!("spool_dir = \"{}\"\n", spool.display()));
    sb.extra = good.clone();
    let warden = sb.start();
    let c = sb.wait_client(LONG).await;
    c.batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)")
        .await
        .unwrap();
    eventually(
        "the stale segment removed from the spool",
        LONG,
        async || (!stale.exists()).then_some(()),
    )
    .await;
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "not pgwarden's");
    drop(c);
    stop(warden);

    // Restarted with the spool directory set to the volume holding the data directory: refused
    // before anything is touched.
    let data = sb.data_dir();
    let before = tree(&data);
    sb.extra = wal_extra(
        &archive,
        &format!("spool_dir = \"{}\"\n", sb.dir.path().display()),
    );
    let mut warden = sb.start();
    let code = warden.wait_exit(LONG);
    let out = warden.output();
    assert!(!code.success(), "{out}");
    assert!(
        out.contains("wal.spool_dir")
            && out.contains(&format!("contains the data directory {}", data.display())),
        "{out}"
    );
    assert_eq!(tree(&data), before, "the data directory changed");
    assert!(foreign.exists());

    // The table is still there.
    sb.extra = good;
    let warden = sb.start();
    let c = sb.wait_client(LONG).await;
    let v: i32 = c.query_one("SELECT v FROM kept", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
    assert!(foreign.exists());
    drop(c);
    stop(warden);
}

/// Two databases (two initdb, two system identifiers) pointed at one destination: the first
/// claims it, the second archives nothing there and says whose history it holds.
#[tokio::test]
async fn a_destination_holding_another_databases_history_is_refused() {
    let mut a = Sandbox::new();
    let archive = a.dir.path().join("archive");
    let destination = format!("file://{}", archive.display());
    a.extra = wal_extra(&destination, "");
    let wa = a.start();
    let ca = a.wait_client(LONG).await;
    let first = switch(&ca).await;
    wait_archived(&ca, &first).await;
    drop(ca);
    stop(wa);
    // Counted once the first instance has stopped: its archiver may still send a segment
    // that became ready after the one waited for.
    let claimed = wal_files(&archive);

    let mut b = Sandbox::new();
    b.extra = wal_extra(&destination, "");
    let wb = b.start();
    let cb = b.wait_client(LONG).await;
    for _ in 0..3 {
        switch(&cb).await;
    }
    let doc = eventually("the refusal in the status", LONG, async || {
        let doc = status(&b);
        let error = doc["wal"]["last_error"].to_string();
        error
            .contains("holds the WAL of database system")
            .then_some(doc)
    })
    .await;
    // Postgres's own archive_command is refused too (it asks after the archiver scanned).
    eventually("archive_command failing", LONG, async || {
        let (_, _, failed) = archiver(&cb).await;
        (failed > 0).then_some(())
    })
    .await;
    let error = doc["wal"]["last_error"].to_string();
    assert!(
        error.contains("this data directory is database system"),
        "{doc}"
    );
    // Nor does a base backup of it go there.
    let config = b.config().display().to_string();
    let (code, out, err) =
        support::wal::pgwarden_output(b.dir.path(), &["backup", "--config", &config]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("holds the WAL of database system"), "{err}");
    assert!(!archive.join("base").exists(), "a backup was written");
    assert_eq!(
        wal_files(&archive),
        claimed,
        "the second database wrote into the first's archive"
    );
    drop(cb);
    stop(wb);
}
