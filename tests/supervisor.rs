//! pgwarden runs and supervises a real PostgreSQL 15: bootstrap, restart on crash, orderly
//! shutdown, PID 1 duties, bad inputs and the server log on stdout.

mod support;

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::{Sandbox, Warden};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn fresh_directory_initialises_serves_stops_cleanly_and_reuses_data() {
    let sb = Sandbox::new();
    let mut warden = sb.start();
    let client = sb.wait_client(LONG).await;
    client
        .batch_execute("CREATE TABLE t (v text); INSERT INTO t VALUES ('kept');")
        .await
        .unwrap();
    let checksums: String = client
        .query_one("SHOW data_checksums", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checksums, "on");
    let enc: String = client
        .query_one("SHOW password_encryption", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(enc, "scram-sha-256");
    let collate: String = client
        .query_one(
            "SELECT datcollate FROM pg_database WHERE datname = 'postgres'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(collate, "C.UTF-8");
    let system: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    drop(client);

    warden.signal(Signal::SIGTERM);
    let status = warden.wait_exit(LONG);
    assert_eq!(status.code(), Some(0), "{}", warden.output());
    assert!(warden.output().contains("received smart shutdown request"));
    assert!(!sb.data_dir().join("postmaster.pid").exists());
    // The control file as pgwarden reads it says what pg_controldata says.
    let control = pgwarden::postgres::control::read(&sb.data_dir()).unwrap();
    assert!(control.state.clean(), "{control:?}");
    assert_eq!(control.system_identifier.to_string(), system);
    assert_eq!(control.checkpoint_timeline, 1);
    let report = std::process::Command::new("/usr/lib/postgresql/15/bin/pg_controldata")
        .arg(sb.data_dir())
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&report.stdout);
    let field = |name: &str| {
        report
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    assert_eq!(
        field("Latest checkpoint location:"),
        Some(control.checkpoint.to_string()),
        "{report}"
    );
    assert_eq!(
        field("Database cluster state:").as_deref(),
        Some("shut down")
    );

    let mut again = sb.start();
    let client = sb.wait_client(LONG).await;
    let v: String = client
        .query_one("SELECT v FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "kept");
    assert!(again.output().contains("using the existing cluster"));
    drop(client);
    again.signal(Signal::SIGTERM);
    assert_eq!(again.wait_exit(LONG).code(), Some(0));
}

#[tokio::test]
async fn killed_postmaster_is_restarted_and_data_survives() {
    let sb = Sandbox::new();
    let _warden = sb.start();
    let client = sb.wait_client(LONG).await;
    client
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (42);")
        .await
        .unwrap();
    drop(client);
    let first = sb.postmaster_pid().unwrap();
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();

    let client = sb.wait_client(LONG).await;
    let v: i32 = client
        .query_one("SELECT v FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42);
    let second = sb.postmaster_pid().unwrap();
    assert_ne!(first, second, "a new postmaster must be running");
}

#[tokio::test]
async fn postmaster_that_keeps_dying_makes_pgwarden_exit_non_zero() {
    let mut sb = Sandbox::new();
    sb.extra =
        "[supervision]\nmax_crashes = 3\nbackoff_initial = \"100ms\"\nbackoff_max = \"200ms\"\n"
            .into();
    let mut warden = sb.start();
    for killed in 1..=3 {
        let _ = sb.wait_client(LONG).await;
        let pid = sb.postmaster_pid().unwrap();
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        if killed < 3 {
            // Wait until pgwarden noticed before looking for the next postmaster.
            warden.wait_for_line(&format!("crashes_in_window\":{killed}"), LONG);
            let deadline = std::time::Instant::now() + LONG;
            while sb.postmaster_pid() == Some(pid) && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let status = warden.wait_exit(LONG);
    assert_eq!(status.code(), Some(3), "{}", warden.output());
    assert!(warden.output().contains("giving up"));
}

#[tokio::test]
async fn smart_shutdown_blocked_by_an_idle_client_escalates_to_fast() {
    let mut sb = Sandbox::new();
    sb.extra = "[shutdown]\nsmart_timeout = \"1s\"\n".into();
    let mut warden = sb.start();
    let idle = sb.wait_client(LONG).await;
    idle.simple_query("SELECT 1").await.unwrap();

    warden.signal(Signal::SIGTERM);
    let status = warden.wait_exit(LONG);
    let out = warden.output();
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("received smart shutdown request"), "{out}");
    assert!(out.contains("escalating"), "{out}");
    assert!(out.contains("received fast shutdown request"), "{out}");
    drop(idle);
}

#[tokio::test]
async fn server_log_records_are_json_lines_on_stdout_multi_line_included() {
    let sb = Sandbox::new();
    let warden = sb.start();
    let client = sb.wait_client(LONG).await;
    client
        .batch_execute("DO $$ BEGIN RAISE LOG E'first line\\nsecond line'; END $$;")
        .await
        .unwrap();
    let err = client.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().message(), "division by zero");
    warden.wait_for_line("division by zero", LONG);
    warden.wait_for_line("second line", LONG);

    let lines = warden.lines();
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let multi = records
        .iter()
        .find(|r| r["message"] == "first line\nsecond line")
        .expect("the multi-line message is one record");
    assert_eq!(multi["target"], "postgres");
    assert_eq!(multi["postgres"]["severity"], "LOG");

    let div = records
        .iter()
        .find(|r| r["message"] == "division by zero")
        .unwrap();
    assert_eq!(div["level"], "ERROR");
    assert_eq!(div["postgres"]["sql_state"], "22012");
    assert_eq!(div["postgres"]["user"], "postgres");
    assert_eq!(div["postgres"]["database"], "postgres");
    assert!(div["postgres"]["pid"].is_number());
    assert_eq!(div["postgres"]["statement"], "SELECT 1/0");
}

/// Runs pgwarden expecting it to refuse; returns (exit code, output).
fn refused(sb: &Sandbox) -> (Option<i32>, String) {
    let mut warden = sb.start();
    let status = warden.wait_exit(LONG);
    (status.code(), warden.output())
}

#[test]
fn foreign_files_in_the_data_directory_are_refused_and_kept() {
    let sb = Sandbox::new();
    std::fs::create_dir(sb.data_dir()).unwrap();
    std::fs::write(sb.data_dir().join("precious.db"), "do not lose me").unwrap();
    support::chown(&sb.data_dir());
    let (code, out) = refused(&sb);
    assert_ne!(code, Some(0));
    assert!(
        out.contains("not a PostgreSQL cluster") && out.contains("precious.db"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(sb.data_dir().join("precious.db")).unwrap(),
        "do not lose me"
    );
    assert!(!sb.data_dir().join("PG_VERSION").exists());
}

#[test]
fn a_cluster_of_another_major_version_is_refused_and_kept() {
    let sb = Sandbox::new();
    let d = sb.data_dir();
    std::fs::create_dir_all(d.join("global")).unwrap();
    std::fs::write(d.join("PG_VERSION"), "14\n").unwrap();
    std::fs::write(d.join("global/pg_control"), "fake control file").unwrap();
    support::chown(&d);
    let (code, out) = refused(&sb);
    assert_ne!(code, Some(0));
    assert!(
        out.contains("PostgreSQL 14 cluster but the binaries are PostgreSQL 15"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("PG_VERSION")).unwrap(),
        "14\n"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("global/pg_control")).unwrap(),
        "fake control file"
    );
}

#[test]
fn a_forbidden_parameter_is_refused_with_the_reason() {
    let mut sb = Sandbox::new();
    sb.extra = "[postgres.parameters]\narchive_command = \"cp %p /tmp\"\n".into();
    // `[postgres.parameters]` after `[http]` is valid TOML for the nested table.
    let (code, out) = refused(&sb);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("postgres.parameters.archive_command"), "{out}");
    assert!(out.contains("pgwarden owns WAL archiving"), "{out}");
    assert!(!sb.data_dir().exists(), "nothing initialised");
}

#[test]
fn an_invalid_parameter_value_is_reported_with_postgres_own_message() {
    let mut sb = Sandbox::new();
    sb.extra =
        "[postgres.parameters]\nshared_buffers = \"lots\"\n[supervision]\nmax_crashes = 1\n".into();
    let (code, out) = refused(&sb);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains(r#"invalid value for parameter \"shared_buffers\": \"lots\""#),
        "{out}"
    );
    assert!(out.contains("giving up"), "{out}");
    // The cluster itself was initialised and is intact.
    assert!(sb.data_dir().join("PG_VERSION").exists());
}

#[test]
fn an_unknown_configuration_key_is_named() {
    let mut sb = Sandbox::new();
    sb.extra = "[shutdown]\nsmrt_timeout = \"5s\"\n".into();
    let (code, out) = refused(&sb);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("smrt_timeout"), "{out}");
}

#[test]
fn an_unknown_environment_key_is_named() {
    let sb = Sandbox::new();
    let mut cmd = std::process::Command::new(support::binary());
    cmd.arg("run")
        .arg("--config")
        .arg(sb.config())
        .env("PGWARDEN_POSTGRES__PROT", "5");
    let mut warden = sb.spawn(cmd);
    let status = warden.wait_exit(LONG);
    let out = warden.output();
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("prot"), "{out}");
}

#[test]
fn a_missing_postgres_binary_is_reported() {
    let mut sb = Sandbox::new();
    sb.extra = String::new();
    let config = sb.config();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[postgres]\n",
        "[postgres]\nbin_dir = \"/nonexistent/pg/bin\"\n",
    );
    std::fs::write(&config, text).unwrap();
    let mut cmd = std::process::Command::new(support::binary());
    cmd.arg("run").arg("--config").arg(&config);
    // `start()` would rewrite the file, so spawn with the edited one.
    sb.extra = "unused".into();
    let mut warden = sb.spawn(cmd);
    let status = warden.wait_exit(LONG);
    let out = warden.output();
    assert_ne!(status.code(), Some(0));
    assert!(
        out.contains("postgres binary not found at /nonexistent/pg/bin/postgres"),
        "{out}"
    );
}

#[test]
fn an_incomplete_installation_names_what_to_install() {
    // A bin directory with `postgres` alone: the tools pgwarden needs later (pg_basebackup at
    // the first clone, pg_rewind at the first failover) are looked for at start.
    let sb = Sandbox::new();
    let bin = sb.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let postgres = std::path::Path::new("/usr/lib/postgresql/15/bin/postgres");
    std::os::unix::fs::symlink(postgres, bin.join("postgres")).unwrap();
    let config = sb.config();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[postgres]\n",
        &format!("[postgres]\nbin_dir = \"{}\"\n", bin.display()),
    );
    std::fs::write(&config, text).unwrap();
    let mut cmd = std::process::Command::new(support::binary());
    cmd.arg("run").arg("--config").arg(&config);
    let mut warden = sb.spawn(cmd);
    let status = warden.wait_exit(LONG);
    let out = warden.output();
    assert_ne!(status.code(), Some(0));
    assert!(
        out.contains("initdb is missing beside postgres")
            && out.contains("apt-get install postgresql-15"),
        "{out}"
    );
    assert!(!sb.data_dir().exists(), "nothing initialised");
}

/// Runs pgwarden as PID 1 of a new PID namespace (root only).
fn pid1(sb: &Sandbox) -> Warden {
    let user = support::pg_user().expect("root");
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "setpriv"])
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--clear-groups")
        .arg(support::binary())
        .arg("run")
        .arg("--config")
        .arg(sb.config());
    Warden::spawn(cmd)
}

/// Host pid of the single child of `parent`.
fn child_of(parent: Pid) -> Option<Pid> {
    let text = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    text.split_whitespace()
        .next()?
        .parse()
        .ok()
        .map(Pid::from_raw)
}

/// Pids of zombies whose parent is `parent`.
fn zombies_of(parent: Pid) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if state == Some("Z") && ppid == Some(&parent.to_string()) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test]
async fn as_pid_1_orphans_are_reaped_and_sigterm_shuts_down_in_order() {
    if !support::is_root() {
        eprintln!("skipped: creating a PID namespace needs root");
        return;
    }
    let sb = Sandbox::new();
    let mut outer = pid1(&sb);
    let client = sb.wait_client(LONG).await;
    let warden = child_of(outer.pid()).expect("pgwarden runs under unshare");
    let status = std::fs::read_to_string(format!("/proc/{warden}/status")).unwrap();
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap()
        .to_string();
    assert!(
        nspid.ends_with("\t1"),
        "pgwarden is PID 1 in its namespace: {nspid}"
    );

    // A shell inside the namespace starts a background child and exits: the child is
    // re-parented to PID 1 (pgwarden) and becomes a zombie when it exits, unless reaped.
    let ok = std::process::Command::new("nsenter")
        .arg("-t")
        .arg(warden.to_string())
        .args([
            "-p",
            "-m",
            "--",
            "sh",
            "-c",
            "sleep 0.3 & sleep 0.3 & exit 0",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        zombies_of(warden),
        Vec::<i32>::new(),
        "orphans must be reaped"
    );
    client.simple_query("SELECT 1").await.unwrap();
    drop(client);

    kill(warden, Signal::SIGTERM).unwrap();
    let status = outer.wait_exit(LONG);
    let out = outer.output();
    assert_eq!(status.code(), Some(0), "{out}");
    let smart = out.find("received smart shutdown request").expect(&out);
    let down = out.find("database system is shut down").expect(&out);
    let clean = out.find("pgwarden stopped cleanly").expect(&out);
    assert!(smart < down && down < clean, "{out}");
}

#[tokio::test]
async fn sighup_applies_a_changed_parameter_and_keeps_the_last_good_configuration() {
    let mut sb = Sandbox::new();
    sb.extra = "[postgres.parameters]\nwork_mem = \"8MB\"\n".into();
    let warden = sb.start();
    let client = sb.wait_client(LONG).await;
    let work_mem = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
        rows.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(
        work_mem(client.simple_query("SHOW work_mem").await.unwrap()),
        "8MB"
    );

    sb.extra = "[postgres.parameters]\nwork_mem = \"16MB\"\n".into();
    sb.config();
    warden.signal(Signal::SIGHUP);
    warden.wait_for_line("configuration reloaded", LONG);
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let fresh = sb.client().await.unwrap();
        if work_mem(fresh.simple_query("SHOW work_mem").await.unwrap()) == "16MB" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "work_mem never became 16MB"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A value Postgres refuses is reported with Postgres's own message; nothing changes.
    sb.extra = "[postgres.parameters]\nwork_mem = \"lots\"\n".into();
    sb.config();
    warden.signal(Signal::SIGHUP);
    warden.wait_for_line("reload failed", LONG);
    assert!(
        warden
            .output()
            .contains(r#"invalid value for parameter \"work_mem\": \"lots\""#),
        "{}",
        warden.output()
    );
    let fresh = sb.client().await.unwrap();
    assert_eq!(
        work_mem(fresh.simple_query("SHOW work_mem").await.unwrap()),
        "16MB"
    );

    // A pg_hba rule Postgres cannot load is refused too, and the file on disk stays good.
    sb.extra = "[postgres.parameters]\nwork_mem = \"16MB\"\n".into();
    let good_hba = std::fs::read_to_string(sb.data_dir().join("pg_hba.conf")).unwrap();
    let config = sb.config();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[postgres]\n",
        "[postgres]\npg_hba = [\"host all all 10.0.0.0/99 scram-sha-256\"]\n",
    );
    std::fs::write(&config, text).unwrap();
    let before = warden.lines().len();
    warden.signal(Signal::SIGHUP);
    let deadline = std::time::Instant::now() + LONG;
    while !warden.lines()[before..]
        .iter()
        .any(|l| l.contains("reload failed"))
    {
        assert!(std::time::Instant::now() < deadline, "{}", warden.output());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = warden.lines()[before..].join("\n");
    assert!(out.contains("pg_hba.conf line"), "{out}");
    assert_eq!(
        std::fs::read_to_string(sb.data_dir().join("pg_hba.conf")).unwrap(),
        good_hba
    );
    assert!(sb.client().await.is_ok());

    // A broken file is refused; the running configuration stays.
    std::fs::write(
        sb.dir.path().join("pgwarden.toml"),
        "instance_name = [broken",
    )
    .unwrap();
    warden.signal(Signal::SIGHUP);
    warden.wait_for_line("configuration reload rejected", LONG);
    let fresh = sb.client().await.unwrap();
    assert_eq!(
        work_mem(fresh.simple_query("SHOW work_mem").await.unwrap()),
        "16MB"
    );
    let conf = std::fs::read_to_string(sb.data_dir().join("postgresql.conf")).unwrap();
    assert!(conf.contains("work_mem = '16MB'"), "{conf}");
}

#[tokio::test]
async fn sigint_is_a_fast_shutdown() {
    let sb = Sandbox::new();
    let mut warden = sb.start();
    let idle = sb.wait_client(LONG).await;
    warden.signal(Signal::SIGINT);
    let status = warden.wait_exit(LONG);
    let out = warden.output();
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("received fast shutdown request"), "{out}");
    assert!(!out.contains("received smart shutdown request"), "{out}");
    drop(idle);
}
