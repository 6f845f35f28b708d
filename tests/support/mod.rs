//! Test support: run the real `pgwarden` binary against a real PostgreSQL 15, as an
//! unprivileged user (initdb refuses root), in a throw-away directory.
#![allow(dead_code)]

pub mod apiserver;
pub mod cluster;
pub mod sql;
pub mod tls;
pub mod wal;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const PASSWORD: &str = "test-superuser-password";

/// The user Postgres runs as when the tests run as root.
pub fn pg_user() -> Option<nix::unistd::User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .or_else(|| nix::unistd::User::from_name("nobody").ok().flatten())
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A copy of the binary that the unprivileged user can execute (the build directory may sit
/// under root's home).
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let built = PathBuf::from(env!("CARGO_BIN_EXE_pgwarden"));
        if pg_user().is_none() {
            return built;
        }
        // One place per build directory, replaced atomically: repeated runs leave no copies
        // behind, and two checkouts testing at once never run each other's binary.
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        built.hash(&mut h);
        let top = std::env::temp_dir().join("pgwarden-test-bin");
        let dir = top.join(format!("{:016x}", h.finish()));
        std::fs::create_dir_all(&dir).unwrap();
        for d in [&top, &dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let copy = dir.join("pgwarden");
        let staging = dir.join(format!("pgwarden.{}", std::process::id()));
        std::fs::copy(&built, &staging).unwrap();
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&staging, &copy).unwrap();
        copy
    })
    .clone()
}

/// A free loopback port for a server a test starts later: bound, released, and never given
/// out twice by this process. Taken below the kernel's ephemeral range (32768 and up by
/// default), from which every outgoing connection draws its local port: one released there
/// can be taken by a client's connection before the server binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    // Test binaries run one after the other; the offset keeps a leftover server of an
    // earlier one out of the way.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id() % COUNT,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT);
}

/// Gives a path to the unprivileged user.
pub fn chown(path: &Path) {
    if let Some(u) = pg_user() {
        nix::unistd::chown(path, Some(u.uid), Some(u.gid)).unwrap();
    }
}

/// A directory holding one instance's data, run directory and configuration.
pub struct Sandbox {
    /// `instance_name` in the generated configuration ("pg-test" unless a test sets it).
    pub name: String,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub status_port: u16,
    pub metrics_port: u16,
    /// Extra TOML appended to the generated configuration.
    pub extra: String,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-test-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        chown(dir.path());
        let pw = dir.path().join("superuser-password");
        std::fs::write(&pw, PASSWORD).unwrap();
        chown(&pw);
        Sandbox {
            name: "pg-test".to_string(),
            dir,
            port: free_port(),
            status_port: free_port(),
            metrics_port: free_port(),
            extra: String::new(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Writes the configuration file; `sections` is extra TOML (may add keys to [postgres] etc.
    /// through dotted keys at top level).
    pub fn config(&self) -> PathBuf {
        let path = self.dir.path().join("pgwarden.toml");
        let text = format!(
            r#"instance_name = "{name}"
[postgres]
data_dir = "{data}"
run_dir = "{run}"
port = {port}
listen_addresses = "127.0.0.1"
superuser_password_file = "{pw}"
[http]
status_listen = "127.0.0.1:{status}"
metrics_listen = "127.0.0.1:{metrics}"
{extra}
"#,
            name = self.name,
            data = self.data_dir().display(),
            run = self.run_dir().display(),
            port = self.port,
            pw = self.dir.path().join("superuser-password").display(),
            status = self.status_port,
            metrics = self.metrics_port,
            extra = self.extra,
        );
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    }

    /// Starts `pgwarden run` as the unprivileged user.
    pub fn start(&self) -> Warden {
        let mut cmd = Command::new(binary());
        cmd.arg("run").arg("--config").arg(self.config());
        self.spawn(cmd)
    }

    pub fn spawn(&self, mut cmd: Command) -> Warden {
        if let Some(u) = pg_user() {
            cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
        Warden::spawn(cmd)
    }

    /// Connects over TCP as the superuser with the password.
    pub async fn client(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect(self.port, "postgres").await
    }

    /// Retries `client()` until Postgres accepts connections.
    pub async fn wait_client(&self, within: Duration) -> tokio_postgres::Client {
        let deadline = Instant::now() + within;
        loop {
            match self.client().await {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("postgres not reachable: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The postmaster's pid from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

pub async fn connect(port: u16, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(PASSWORD)
        .dbname(db)
        .connect_timeout(Duration::from_secs(3))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A running pgwarden process with its stdout captured line by line.
pub struct Warden {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Warden {
    pub fn spawn(mut cmd: Command) -> Warden {
        // pgwarden takes every PGWARDEN_* variable for a configuration key: only those the test
        // sets may reach it, never whatever the environment running the tests has.
        let explicit: Vec<std::ffi::OsString> =
            cmd.get_envs().map(|(k, _)| k.to_os_string()).collect();
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PGWARDEN_") && !explicit.contains(&key) {
                cmd.env_remove(key);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PGWARDEN_LOG_LEVEL", "info");
        let mut child = cmd.spawn().expect("spawn pgwarden");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
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
        Warden { child, lines }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn output(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits for a line containing `needle`; panics with the output after `within`.
    pub fn wait_for_line(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no line containing {needle:?} within {within:?}; output:\n{}",
            self.output()
        );
    }

    /// Waits for the process to exit; panics (after killing it) when it does not in time.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Give the pipe readers a moment to drain the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "pgwarden did not exit within {within:?}; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Warden {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal HTTP/1.1 GET (the tests need nothing more): returns status code and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

/// GET returning the JSON body.
pub fn http_json(port: u16, path: &str) -> (u16, serde_json::Value) {
    let (code, body) = http_get(port, path).unwrap();
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (code, json)
}

// Not every test binary uses it.
#[allow(unused_imports)]
pub use pgwarden::demo::process::descendants;

/// Connects over TCP as `user` with `password`.
pub async fn connect_as(
    port: u16,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(3))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}
