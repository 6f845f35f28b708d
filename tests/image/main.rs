//! The container image, built without any registry by `docker/build-offline.sh` (a debootstrap
//! base, cached by tag, and the binary this test run built) and run like the StatefulSet runs
//! it: non-root, read-only root file system, a named volume, the password file mounted. It gets
//! ready through the HTTP probe, takes writes through `psql`, reaps an orphan as PID 1, stops
//! cleanly on `docker stop`, and a new container on the same volume finds the data.
//!
//! A second container ([`tls`]) runs the image in Kubernetes mode against the test API server
//! with TLS required, on the same read-only root file system.
//!
//! Needs Docker (and, to build the base image the first time, root and debootstrap).

#[path = "../support/mod.rs"]
mod support;

mod tls;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PASSWORD: &str = "image-test-password";
/// Where the StatefulSet mounts the superuser's password (config/statefulset.yaml).
const PASSWORD_FILE: &str = "/etc/pgwarden/superuser/password";

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs a command to completion within `limit`; kills it (and fails) when it takes longer.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|mut pipe| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    })
    .collect();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut texts = readers.into_iter().map(|r| r.join().unwrap());
    Output {
        ok: status.success(),
        stdout: texts.next().unwrap(),
        stderr: texts.next().unwrap(),
    }
}

const SHORT: Duration = Duration::from_secs(60);

fn docker(args: &[&str]) -> Output {
    run(Command::new("docker").args(args), SHORT)
}

/// `docker args...`, which must succeed; returns its stdout.
fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.ok, "docker {args:?}: {}{}", out.stdout, out.stderr);
    out.stdout
}

/// Removes the containers and the volume however the test ends, then lets go of the image.
struct Cleanup {
    containers: Vec<String>,
    volume: String,
    image: Image,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = run(Command::new("docker").args(["rm", "-f", "-v", c]), SHORT);
        }
        let _ = run(
            Command::new("docker").args(["volume", "rm", "-f", &self.volume]),
            SHORT,
        );
    }
}

/// The image under test: built once for the tests that run at the same time, removed when the
/// last of them is done (the base image and the image's other layers stay cached for the next
/// run). Its own tag, so that test runs side by side do not replace each other's image.
struct Image {
    tag: String,
}

/// How many tests use the image now.
static IMAGE_USERS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

impl Image {
    fn get() -> Image {
        let mut users = IMAGE_USERS.lock().unwrap_or_else(|e| e.into_inner());
        let tag = format!("pgwarden-image-test:{}", std::process::id());
        if *users == 0 {
            build_image(&tag);
        }
        *users += 1;
        Image { tag }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let mut users = IMAGE_USERS.lock().unwrap_or_else(|e| e.into_inner());
        *users -= 1;
        if *users == 0 {
            let _ = run(
                Command::new("docker").args(["image", "rm", "-f", &self.tag]),
                SHORT,
            );
        }
    }
}

fn require_docker() {
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the image test needs a running Docker engine that this user may use: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("the image test needs Docker (the `docker` command): {e}"),
    }
}

/// Builds the image through the offline script, with the binary cargo built for this test run
/// (a release build would compile pgwarden a second time).
fn build_image(image: &str) {
    let started = Instant::now();
    let out = run(
        Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/docker/build-offline.sh"
            ))
            .args(["--image", image, "--binary", env!("CARGO_BIN_EXE_pgwarden")]),
        Duration::from_secs(25 * 60),
    );
    assert!(
        out.ok,
        "docker/build-offline.sh failed:\n{}{}",
        out.stdout, out.stderr
    );
    eprintln!(
        "image built in {:.0?}:\n{}",
        started.elapsed(),
        out.stderr.trim_end()
    );
}

struct Container {
    name: String,
    status_port: u16,
    metrics_port: u16,
}

/// How a container reaches and is reached from the host.
enum Network {
    /// Its own network, the status and metrics ports published on the host's loopback.
    Published,
    /// The host's network (to reach the test API server on the host's loopback): pgwarden
    /// listens on these loopback ports, since no port mapping is possible.
    Host { status: u16, metrics: u16 },
}

/// Runs the image as the StatefulSet does: the image's user, a read-only root file system with
/// /run and /tmp writable, the data volume, the password file; `extra` adds `docker run`
/// options (environment, mounts).
fn start(
    image: &str,
    name: &str,
    volume: &str,
    scratch: &Path,
    password_file: &str,
    network: Network,
    extra: &[String],
) -> Container {
    // /run and /tmp like the StatefulSet's emptyDirs: empty directories of mode 0777 owned by
    // root (Docker's --tmpfs would take the image's mode for /run).
    let mut dirs = Vec::new();
    for dir in ["run", "tmp"] {
        let host = scratch.join(format!("{name}-{dir}"));
        std::fs::create_dir(&host).unwrap();
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o777)).unwrap();
        dirs.push(format!("{}:/{dir}", host.display()));
    }
    let mut args: Vec<String> = [
        "run",
        "--detach",
        "--name",
        name,
        "--read-only",
        "--volume",
        &dirs[0],
        "--volume",
        &dirs[1],
        "--volume",
        &format!("{volume}:/var/lib/postgresql/data"),
        "--volume",
        &format!("{password_file}:{PASSWORD_FILE}:ro"),
        "--env",
        &format!("PGWARDEN_POSTGRES__SUPERUSER_PASSWORD_FILE={PASSWORD_FILE}"),
        "--stop-timeout",
        "35",
    ]
    .map(String::from)
    .into();
    match network {
        Network::Published => args.extend(
            [
                "--publish",
                "127.0.0.1::8000",
                "--publish",
                "127.0.0.1::9187",
            ]
            .map(String::from),
        ),
        Network::Host { status, metrics } => args.extend([
            "--network".to_string(),
            "host".to_string(),
            "--env".to_string(),
            format!("PGWARDEN_HTTP__STATUS_LISTEN=127.0.0.1:{status}"),
            "--env".to_string(),
            format!("PGWARDEN_HTTP__METRICS_LISTEN=127.0.0.1:{metrics}"),
        ]),
    }
    args.extend_from_slice(extra);
    args.push(image.to_string());
    docker_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (status_port, metrics_port) = match network {
        Network::Host { status, metrics } => (status, metrics),
        Network::Published => {
            let port = |p: &str| -> u16 {
                let out = docker_ok(&["port", name, p]);
                out.lines()
                    .find_map(|l| l.strip_prefix("127.0.0.1:"))
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or_else(|| panic!("docker port {name} {p}: {out}"))
            };
            (port("8000/tcp"), port("9187/tcp"))
        }
    };
    Container {
        name: name.to_string(),
        status_port,
        metrics_port,
    }
}

impl Container {
    fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!("{}{}", out.stdout, out.stderr)
    }

    fn running(&self) -> bool {
        docker_ok(&["inspect", "--format", "{{.State.Running}}", &self.name]).trim() == "true"
    }

    /// Waits until `/readyz` answers 200 through the published port.
    fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, _)) = support::http_get(self.status_port, "/readyz") {
                return;
            }
            assert!(
                self.running(),
                "the container stopped before it was ready:\n{}",
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "/readyz did not answer 200 within {within:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        docker(&all)
    }

    fn psql(&self, sql: &str) -> String {
        let out = self.exec(&["psql", "-v", "ON_ERROR_STOP=1", "-XAtq", "-c", sql]);
        assert!(out.ok, "psql {sql:?}: {}{}", out.stdout, out.stderr);
        out.stdout.trim().to_string()
    }

    /// (pid, state, parent pid, command) of every process in the container, from /proc.
    fn processes(&self) -> Vec<(i32, char, i32, String)> {
        let out = self.exec(&[
            "sh",
            "-c",
            "for f in /proc/[0-9]*/stat; do cat \"$f\" 2>/dev/null; echo; done",
        ]);
        assert!(out.ok, "{}", out.stderr);
        out.stdout
            .lines()
            .filter_map(|l| {
                // pid (comm) state ppid ...; comm may hold spaces and parentheses.
                let (head, rest) = l.rsplit_once(')')?;
                let (pid, comm) = head.split_once(" (")?;
                let mut fields = rest.split_whitespace();
                let state = fields.next()?.chars().next()?;
                let ppid = fields.next()?.parse().ok()?;
                Some((pid.trim().parse().ok()?, state, ppid, comm.to_string()))
            })
            .collect()
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let (code, body) = support::http_get(self.metrics_port, "/metrics").ok()?;
        assert_eq!(code, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// `docker stop`: returns how long it took and the container's exit code.
    fn stop(&self) -> (Duration, i64) {
        let started = Instant::now();
        docker_ok(&["stop", "--time", "35", &self.name]);
        let took = started.elapsed();
        let code = docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.name]);
        (took, code.trim().parse().unwrap())
    }
}

/// pgwarden's stdout as JSON records (other lines left out).
fn records(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn postgres_messages(logs: &str) -> Vec<String> {
    records(logs)
        .into_iter()
        .filter(|r| r["target"] == "postgres")
        .filter_map(|r| r["message"].as_str().map(str::to_string))
        .collect()
}

/// A clean stop: exit 0, Postgres's own log shows a smart or fast shutdown that completed, and
/// nothing of a crash or an immediate shutdown.
fn assert_clean_stop(c: &Container, took: Duration, code: i64) {
    let logs = c.logs();
    assert_eq!(code, 0, "exit code after docker stop:\n{logs}");
    let pg = postgres_messages(&logs);
    assert!(
        pg.iter().any(
            |m| m == "received smart shutdown request" || m == "received fast shutdown request"
        ),
        "no smart or fast shutdown in Postgres's log:\n{logs}"
    );
    assert!(
        pg.iter().any(|m| m == "database system is shut down"),
        "{logs}"
    );
    for bad in [
        "received immediate shutdown request",
        "terminated by signal",
        "was interrupted",
        "automatic recovery in progress",
    ] {
        assert!(
            !pg.iter().any(|m| m.contains(bad)),
            "Postgres's log shows {bad:?}:\n{logs}"
        );
    }
    assert!(logs.contains("pgwarden stopped cleanly"), "{logs}");
    assert!(took < Duration::from_secs(30), "docker stop took {took:?}");
}

#[test]
fn the_image_runs_pgwarden_as_pid_1_stops_cleanly_and_keeps_its_data() {
    require_docker();
    let id = std::process::id();
    let volume = format!("pgwarden-image-test-{id}");
    // The password file, and the containers' /run and /tmp (dropped after the containers).
    let secrets = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup {
        containers: Vec::new(),
        volume: volume.clone(),
        image: Image::get(),
    };
    let image = cleanup.image.tag.clone();

    // The image as built.
    let inspect: Value = serde_json::from_str(&docker_ok(&["image", "inspect", &image])).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/pgwarden", "run"])
    );
    assert!(config["Cmd"].is_null(), "{}", config["Cmd"]);
    assert_eq!(config["User"], "999:999");
    assert_eq!(config["StopSignal"], "SIGTERM");
    let labels = &config["Labels"];
    for label in ["title", "version", "revision", "licenses", "description"] {
        let value = labels[format!("org.opencontainers.image.{label}")]
            .as_str()
            .unwrap_or("");
        assert!(
            !value.is_empty() && value != "unknown",
            "label {label}: {labels}"
        );
    }

    docker_ok(&["volume", "create", &volume]);
    let password_file = secrets.path().join("password");
    std::fs::write(&password_file, PASSWORD).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let password_file = password_file.to_str().unwrap();
    let start_on_volume = |name: &str| {
        let scratch = secrets.path();
        start(
            &image,
            name,
            &volume,
            scratch,
            password_file,
            Network::Published,
            &[],
        )
    };

    // First container: initdb on the empty volume, ready through the probe.
    let first = format!("pgwarden-image-test-{id}-a");
    cleanup.containers.push(first.clone());
    let started = Instant::now();
    let a = start_on_volume(&first);
    a.wait_ready(Duration::from_secs(120));
    eprintln!("first start (initdb) ready in {:.1?}", started.elapsed());
    for path in ["/startupz", "/healthz", "/primary"] {
        let (code, _) = support::http_get(a.status_port, path).unwrap();
        assert_eq!(code, 200, "{path}");
    }
    let logs = a.logs();
    assert!(logs.contains("initialising a new cluster"), "{logs}");

    // PID 1 is pgwarden itself, as the image's user.
    let cmdline = a.exec(&["cat", "/proc/1/cmdline"]).stdout;
    assert_eq!(cmdline, "/usr/local/bin/pgwarden\0run\0");
    let status = a.exec(&["cat", "/proc/1/status"]).stdout;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(uid, "999");

    // Writes and reads through psql in the container (unix socket, peer authentication), and
    // over TCP with the password from the mounted file (set at initdb).
    a.psql(
        "CREATE TABLE kept (note text); INSERT INTO kept VALUES ('written by the first container')",
    );
    assert_eq!(
        a.psql("SELECT note FROM kept"),
        "written by the first container"
    );
    let tcp = a.exec(&[
        "env",
        &format!("PGPASSWORD={PASSWORD}"),
        "psql",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-XAtq",
        "-c",
        "SELECT count(*) FROM kept",
    ]);
    assert!(
        tcp.ok && tcp.stdout.trim() == "1",
        "{}{}",
        tcp.stdout,
        tcp.stderr
    );

    // A zombie orphan: `sh` exits and leaves `sleep` to PID 1, which must reap it.
    let reaped_before = a.metric("pgwarden_orphans_reaped_total").unwrap_or(0.0);
    let out = a.exec(&["sh", "-c", "sleep 3 & exit 0"]);
    assert!(out.ok, "{}", out.stderr);
    let orphan = a
        .processes()
        .into_iter()
        .find(|p| p.3 == "sleep")
        .expect("the orphaned sleep is running");
    assert_eq!(
        orphan.2, 1,
        "the orphan was re-parented to PID 1: {orphan:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let procs = a.processes();
        let left: Vec<_> = procs
            .iter()
            .filter(|p| p.0 == orphan.0 || (p.2 == 1 && p.1 == 'Z'))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not reaped after its exit: {left:?} (all: {procs:?})"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.metric("pgwarden_orphans_reaped_total").unwrap_or(0.0) <= reaped_before {
        assert!(
            Instant::now() < deadline,
            "pgwarden_orphans_reaped_total did not move"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(a.metric("pgwarden_postgres_up"), Some(1.0));

    // docker stop: SIGTERM, a smart shutdown, exit 0.
    let (took, code) = a.stop();
    assert_clean_stop(&a, took, code);
    eprintln!("docker stop took {took:.1?}");

    // A new container on the same volume: the same cluster, the data still there.
    let second = format!("pgwarden-image-test-{id}-b");
    cleanup.containers.push(second.clone());
    let started = Instant::now();
    let b = start_on_volume(&second);
    b.wait_ready(Duration::from_secs(120));
    eprintln!(
        "restart on the same volume ready in {:.1?}",
        started.elapsed()
    );
    let logs = b.logs();
    assert!(logs.contains("using the existing cluster"), "{logs}");
    assert!(!logs.contains("initialising a new cluster"), "{logs}");
    assert!(
        postgres_messages(&logs)
            .iter()
            .any(|m| m.starts_with("database system was shut down at")),
        "the cluster was not shut down cleanly before:\n{logs}"
    );
    assert_eq!(
        b.psql("SELECT note FROM kept"),
        "written by the first container"
    );
    let (took, code) = b.stop();
    assert_clean_stop(&b, took, code);
}
