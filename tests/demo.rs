//! `pgwarden demo` end to end, as a newcomer drives it: it starts three instances with real
//! PostgreSQL against its embedded API server and reports the primary; `kill` on its stdin
//! kills the primary, a standby takes over and the old primary rejoins as a standby; Ctrl-C
//! (SIGINT) stops everything, the demo exits 0, and no process of it is left. Before the
//! kill, `backup` and `restore TIME` bring a dropped table back in a new instance.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Bootstrap and two clones, on a slow shared machine.
const UP: Duration = Duration::from_secs(300);
const FAILOVER: Duration = Duration::from_secs(120);
const REJOIN: Duration = Duration::from_secs(240);
/// Two stop phases of at most 30 s each, then the kills.
const EXIT: Duration = Duration::from_secs(150);

struct Demo {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
}

impl Demo {
    fn start(dir: &Path) -> Demo {
        let mut cmd = Command::new(support::binary());
        cmd.arg("demo")
            .arg("--dir")
            .arg(dir)
            .args(["--base-port", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Only the variables the test sets may reach pgwarden.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PGWARDEN_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd.spawn().expect("spawn pgwarden demo");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let pipes = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for pipe in pipes.into_iter().flatten() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    if std::env::var_os("PGW_TEST_ECHO").is_some() {
                        eprintln!("{line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Demo {
            stdin: child.stdin.take(),
            child,
            lines,
            dir: dir.to_path_buf(),
        }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("the demo's stdin");
        writeln!(stdin, "{command}").expect("write to the demo's stdin");
        stdin.flush().unwrap();
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The demo's own lines (`[demo] ...`), without the marker.
    fn said(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("[demo] "))
            .map(str::to_string)
            .collect()
    }

    /// Waits for a line of the demo's own, after the first `skip`, for which `f` gives
    /// Some; returns its index and that value.
    fn wait_said<T>(
        &mut self,
        skip: usize,
        what: &str,
        within: Duration,
        f: impl Fn(&str) -> Option<T>,
    ) -> (usize, T) {
        let deadline = Instant::now() + within;
        loop {
            let said = self.said();
            if let Some(found) = said
                .iter()
                .enumerate()
                .skip(skip)
                .find_map(|(i, l)| Some((i, f(l)?)))
            {
                return found;
            }
            if Instant::now() > deadline {
                panic!(
                    "no line {what} within {within:?}; output:\n{}",
                    self.output()
                );
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the demo exited ({status}) before {what}; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers take the last lines.
                std::thread::sleep(Duration::from_millis(200));
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "the demo did not exit within {within:?}; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Demo {
    /// After a failure: nothing of the demo may outlive the test.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for _ in 0..3 {
            let left = processes_of(&self.dir);
            if left.is_empty() {
                break;
            }
            for p in left {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Processes whose command line mentions `dir`, or that run in it.
fn processes_of(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            cmdline.contains(&needle) || cwd.starts_with(dir)
        })
        .collect()
}

/// The Postgres port the banner gives for `name` (`psql "host=127.0.0.1 port=<port> ...`).
fn psql_port(said: &[String], name: &str) -> u16 {
    let line = said
        .iter()
        .rev()
        .find(|l| l.trim_start().starts_with(&format!("{name} ")) && l.contains("psql"))
        .unwrap_or_else(|| panic!("no psql line for {name} in {said:#?}"));
    let after = line.split(" port=").nth(1).unwrap();
    after.split_whitespace().next().unwrap().parse().unwrap()
}

/// One value (as text) of `sql` on `port`, retried while Postgres is not there yet.
fn query(rt: &tokio::runtime::Runtime, port: u16, password: &str, sql: &str) -> String {
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match support::connect_as(port, "postgres", password).await {
                Ok(c) => {
                    let rows = c
                        .simple_query(sql)
                        .await
                        .unwrap_or_else(|e| panic!("{sql}: {e}"));
                    return rows
                        .iter()
                        .find_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => {
                                r.get(0).map(str::to_string)
                            }
                            _ => None,
                        })
                        .unwrap_or_default();
                }
                Err(e) if Instant::now() > deadline => panic!("port {port}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
}

/// Drop a table, get it back: `backup`, rows, a time, `DROP TABLE`, `restore TIME`.
fn drop_a_table_and_get_it_back(demo: &mut Demo, primary: &str) {
    let said = demo.said();
    let password = said
        .iter()
        .find_map(|l| {
            l.strip_prefix("the superuser is postgres, password ")?
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
        .expect("the password in the banner");
    let port = psql_port(&said, primary);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    query(
        &rt,
        port,
        &password,
        "CREATE TABLE t AS SELECT generate_series(1, 10) AS i",
    );
    let failed =
        |l: &str| l.starts_with("the backup failed") || l.starts_with("the restore failed");
    let before = demo.said().len();
    demo.send("backup");
    let (_, done) = demo.wait_said(before, "after the backup", Duration::from_secs(120), |l| {
        (l.starts_with("backup complete") || failed(l)).then(|| l.to_string())
    });
    assert!(done.starts_with("backup complete"), "{done}");
    query(
        &rt,
        port,
        &password,
        "INSERT INTO t SELECT generate_series(11, 20)",
    );
    let t = query(
        &rt,
        port,
        &password,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    query(&rt, port, &password, "DROP TABLE t");
    let before = demo.said().len();
    demo.send(&format!("restore {t}"));
    let (_, line) = demo.wait_said(before, "after the restore", Duration::from_secs(180), |l| {
        (l.trim_start().starts_with("pg-restored ") || failed(l)).then(|| l.to_string())
    });
    assert!(!failed(&line), "{line}");
    let restored = psql_port(&demo.said(), "pg-restored");
    assert_eq!(
        query(&rt, restored, &password, "SELECT count(*) FROM t"),
        "20"
    );
}

fn primary_named(line: &str) -> Option<String> {
    let rest = line.strip_prefix("primary is now ")?;
    Some(rest.split_whitespace().next()?.to_string())
}

/// The status port the banner gives for `name` (`curl 127.0.0.1:<port>/pg/status`).
fn status_port(said: &[String], name: &str) -> u16 {
    let line = said
        .iter()
        .rev()
        .find(|l| l.trim_start().starts_with(&format!("{name} ")) && l.contains("/pg/status"))
        .unwrap_or_else(|| panic!("no connection line for {name} in {said:#?}"));
    let after = line.split("curl 127.0.0.1:").nth(1).unwrap();
    after.split('/').next().unwrap().parse().unwrap()
}

#[test]
fn demo_fails_over_on_kill_and_stops_without_leftovers() {
    let dir = tempfile::Builder::new()
        .prefix("pgwarden-demo-test-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    support::chown(dir.path());
    let mut demo = Demo::start(dir.path());

    // Up: a primary announced, then the banner once both standbys stream.
    let (up, ()) = demo.wait_said(0, "saying the cluster is up", UP, |l| {
        l.starts_with("the cluster is up: ").then_some(())
    });
    let said = demo.said();
    let first = said[..up]
        .iter()
        .rev()
        .find_map(|l| primary_named(l))
        .unwrap_or_else(|| panic!("no primary announced before the banner: {said:#?}"));
    assert!(
        said[up].starts_with(&format!("the cluster is up: {first} is the primary")),
        "{}",
        said[up]
    );
    let (code, status) = support::http_json(status_port(&said, &first), "/pg/status");
    assert_eq!(code, 200);
    assert_eq!(status["ha"]["role"], "primary", "{status}");

    drop_a_table_and_get_it_back(&mut demo, &first);

    // A lost node: the primary killed, another instance takes over.
    let before_kill = demo.said().len();
    demo.send("kill");
    demo.wait_said(
        before_kill,
        "confirming the kill",
        Duration::from_secs(60),
        |l| {
            l.starts_with(&format!("killed {first}, the primary"))
                .then_some(())
        },
    );
    let (_, second) = demo.wait_said(before_kill, "with a new primary", FAILOVER, |l| {
        primary_named(l).filter(|p| *p != first)
    });
    eprintln!("failover: {first} -> {second}");

    // The old primary comes back as a standby of the new one.
    let rejoined = format!("{first} standby, streaming from {second}");
    demo.wait_said(before_kill, &format!("with {rejoined:?}"), REJOIN, |l| {
        l.contains(&rejoined).then_some(())
    });
    let before_status = demo.said().len();
    demo.send("status");
    demo.wait_said(
        before_status,
        "answering status",
        Duration::from_secs(30),
        |l| l.contains("/pg/status").then_some(()),
    );
    let said = demo.said();
    let (code, status) = support::http_json(status_port(&said, &second), "/pg/status");
    assert_eq!(code, 200);
    assert_eq!(status["ha"]["role"], "primary", "{status}");

    // Ctrl-C: everything stops, the demo exits 0, nothing is left.
    kill(Pid::from_raw(demo.child.id() as i32), Signal::SIGINT).unwrap();
    let exit = demo.wait_exit(EXIT);
    assert!(exit.success(), "{exit}; output:\n{}", demo.output());
    let said = demo.said();
    assert!(
        said.iter()
            .any(|l| l.starts_with("stopped; nothing is left running")),
        "{said:#?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_of(dir.path());
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes left behind: {:?}",
            left.iter()
                .map(|p| std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                    .unwrap_or_default())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // --dir is kept, with each instance's files.
    assert!(dir.path().join("pg-0/pgwarden.toml").exists());
}
