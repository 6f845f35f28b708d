//! A high-availability cluster for integration tests: the test API server, the cluster's
//! Secrets, Pods and PostgresCluster, and N `pgwarden` processes (`pg-0`, `pg-1`, ...) each
//! with its own sandbox and API identity (bearer token = pod name), all on loopback.
//!
//! Failure injection: [`Cluster::kill9`] (pgwarden and every Postgres process of the instance),
//! [`Cluster::stop_node`] / [`Cluster::cont_node`] (a hung node), [`Cluster::partition`] (the
//! API server black-holes the instance), [`Cluster::annotate`] (switchover, fencing).
//!
//! Observation: [`Cluster::status`] (`/pg/status`), [`Cluster::primary`], the [`Writer`] that
//! records every acknowledged commit, the [`SplitBrainChecker`] that polls every instance for
//! writability, and [`Cluster::assert_no_loss`].
//!
//! Every wait is bounded, every connection has a connect timeout and every query a timeout, so
//! a SIGSTOPped node never hangs a test.

use std::collections::BTreeSet;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

use super::apiserver::{ApiServer, Fault};
use super::{Sandbox, Warden, PASSWORD};
use pgwarden::demo::process::{self, signal_all, wait_gone_blocking};

mod checker;
mod control;
mod observe;
mod writer;

pub use checker::SplitBrainChecker;
pub use writer::Writer;

pub const NS: &str = "default";
pub const CLUSTER: &str = "pg";
/// apiVersion and plural of the PostgresCluster.
pub const PGC: (&str, &str) = ("pgwarden.dev/v1", "postgresclusters");
pub const LEASE: &str = "pg-leader";
pub const SWITCHOVER_TO: &str = "pgwarden.dev/switchover-to";
pub const FENCED_INSTANCES: &str = "pgwarden.dev/fenced-instances";
pub const REPLICATION_PASSWORD: &str = "replication-secret-pw";

/// Connect timeout of every harness connection.
const CONNECT: Duration = Duration::from_secs(2);
/// Bound on a single harness query.
const QUERY: Duration = Duration::from_secs(3);
/// Bound on a `/pg/status` request (a stopped pgwarden accepts the connection, never answers).
const HTTP: Duration = Duration::from_secs(2);
/// No background task (writer, checker) runs longer than this, whatever the test does.
const BACKGROUND_LIMIT: Duration = Duration::from_secs(30 * 60);

// ---------------------------------------------------------------------------------------------
// Fixtures.

pub fn instance_name(i: usize) -> String {
    format!("{CLUSTER}-{i}")
}

/// The physical slot the primary keeps for a standby.
pub fn slot_name(instance: &str) -> String {
    format!("pgwarden_{}", instance.replace('-', "_"))
}

/// Standard base64, enough for test passwords.
pub fn base64_encode(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | (u32::from(c) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn secret(name: &str, password: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {"password": base64_encode(password)}
    })
}

pub fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": CLUSTER}},
        "spec": {"containers": [{"name": "postgres", "image": "pgwarden"}]}
    })
}

/// The PostgresCluster with `instances` instances and fast failover timings (lease 6 s, renew
/// deadline 3 s, retry 1 s); asynchronous replication unless a test changes the spec.
pub fn cluster_object(instances: usize) -> Value {
    json!({
        "apiVersion": "pgwarden.dev/v1",
        "kind": "PostgresCluster",
        "metadata": {"name": CLUSTER, "namespace": NS},
        "spec": {
            "instances": instances,
            "secrets": {
                "superuser": {"name": "pg-superuser"},
                "replication": {"name": "pg-replication"}
            },
            "failover": {
                "leaseDurationSeconds": 6,
                "renewDeadlineSeconds": 3,
                "retryPeriodSeconds": 1
            }
        }
    })
}

/// Spec edit: quorum commit with one synchronous standby, never degraded.
pub fn quorum(spec: &mut Value) {
    spec["synchronous"] = json!({"mode": "quorum", "number": 1, "allowDegraded": false});
}

// ---------------------------------------------------------------------------------------------
// Small async helpers.

/// Polls `f` every 200 ms until it returns Some; panics naming `what` after `within`.
pub async fn eventually<T>(
    what: &str,
    within: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        sleep(Duration::from_millis(200)).await;
    }
}

/// Connects to Postgres on loopback as the superuser; None when that fails or takes longer
/// than `within` (connect_timeout bounds only the TCP connect, not the startup exchange with a
/// stopped server). `statement_timeout` is set on the session when given (e.g. "5s").
pub async fn connect_within(
    port: u16,
    within: Duration,
    statement_timeout: Option<&str>,
) -> Option<tokio_postgres::Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(PASSWORD)
        .dbname("postgres")
        .application_name("pgwarden-ha-test")
        .connect_timeout(within);
    if let Some(t) = statement_timeout {
        config.options(format!("-c statement_timeout={t}"));
    }
    let (client, conn) = timeout(within, config.connect(tokio_postgres::NoTls))
        .await
        .ok()?
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(client)
}

/// Attempts a write: an acknowledged commit on this instance makes it "writable" at that
/// moment, whatever it says of itself (`pg_is_in_recovery()` can lag behind what it does).
/// The refusals on read-only instances stay out of their logs (pgwarden reads them).
async fn write_acknowledged(
    client: &tokio_postgres::Client,
    name: &str,
    within: Duration,
) -> Option<bool> {
    let write = format!(
        "SET log_min_messages = fatal; \
         CREATE TABLE IF NOT EXISTS ha_split_brain_probe (instance text, at timestamptz DEFAULT now()); \
         INSERT INTO ha_split_brain_probe (instance) VALUES ('{name}')"
    );
    match timeout(within, client.batch_execute(&write)).await {
        Err(_) => None,
        Ok(Ok(())) => Some(true),
        // Refused as read-only (a standby, a fenced primary): answered, not writable.
        Ok(Err(e)) if e.as_db_error().is_some() => Some(false),
        Ok(Err(_)) => None,
    }
}

/// `SELECT pg_is_in_recovery(), current_setting('transaction_read_only')` as "writable".
async fn is_writable(client: &tokio_postgres::Client, within: Duration) -> Option<bool> {
    let row = timeout(
        within,
        client.query_one(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')",
            &[],
        ),
    )
    .await
    .ok()?
    .ok()?;
    let in_recovery: bool = row.get(0);
    let read_only: String = row.get(1);
    Some(!in_recovery && read_only == "off")
}

/// A bounded HTTP/1.1 GET on loopback: status code and body, None on any failure or timeout.
pub async fn http_get(port: u16, path: &str, within: Duration) -> Option<(u16, String)> {
    http_get_with(port, path, &[], within).await
}

/// [`http_get`] with extra request headers.
pub async fn http_get_with(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    within: Duration,
) -> Option<(u16, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n");
        s.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_string()))
    };
    timeout(within, exchange).await.ok().flatten()
}

// ---------------------------------------------------------------------------------------------
// The cluster.

/// One instance: its sandbox (data directory, ports) and its pgwarden, if started.
pub struct Node {
    pub name: String,
    pub sb: Sandbox,
    pub warden: Option<Warden>,
    /// Earlier pgwarden processes of this instance (killed or exited), kept for their output.
    past: Vec<Warden>,
    /// Pids held by SIGSTOP.
    frozen: Vec<i32>,
    partitioned: bool,
}

impl Node {
    fn pgwarden_pid(&mut self) -> Option<i32> {
        let w = self.warden.as_mut()?;
        matches!(w.child.try_wait(), Ok(None)).then(|| w.child.id() as i32)
    }

    /// pgwarden, its descendants, and every process in the data directory (with theirs).
    fn processes(&mut self) -> Vec<i32> {
        let root = self.pgwarden_pid();
        process::tree(root, &self.sb.data_dir())
    }

    /// SIGSTOPs pgwarden first, then everything under it, repeating until no new process
    /// appears (a running postmaster may fork while we go). Returns every pid stopped.
    fn freeze(&mut self) -> Vec<i32> {
        process::freeze(|| self.processes())
    }

    fn output(&self) -> String {
        let mut out = String::new();
        for (n, w) in self.past.iter().chain(&self.warden).enumerate() {
            out.push_str(&format!("--- {} run {n} ---\n{}\n", self.name, w.output()));
        }
        out
    }
}

pub struct Cluster {
    pub server: ApiServer,
    pub nodes: Vec<Node>,
    /// Extra TOML appended to every instance's configuration (after `[monitor]`'s keys).
    extra: String,
    /// Holds the kubeconfig of the CLI (token "admin").
    admin: tempfile::TempDir,
    /// pgwarden's and the spec's default timings (Lease 10 / 6 / 2 s, `api_timeout` 5 s,
    /// monitor 2 s), as users run it, instead of the faster ones of functional tests.
    defaults: bool,
    /// Environment variables every instance's pgwarden process gets on top of the harness's.
    env: Vec<(String, String)>,
}

impl Cluster {
    /// Starts the API server, seeds the Secrets, the Pods and the PostgresCluster (`spec` edits
    /// the spec of [`cluster_object`]), and starts `n` instances with empty data directories.
    pub fn start(n: usize, spec: impl FnOnce(&mut Value)) -> Cluster {
        Cluster::start_with(n, spec, "")
    }

    /// [`Cluster::start`] with extra TOML for every instance.
    pub fn start_with(n: usize, spec: impl FnOnce(&mut Value), extra: &str) -> Cluster {
        Cluster::launch(n, spec, extra, false, &[], Vec::new())
    }

    /// [`Cluster::start`] with `objects` (Secrets the spec names, ...) already in the API
    /// server when the instances start: what they read at their first start is there.
    pub fn start_seeded(n: usize, objects: Vec<Value>, spec: impl FnOnce(&mut Value)) -> Cluster {
        Cluster::launch(n, spec, "", false, &[], objects)
    }

    /// [`Cluster::start_with`] with extra environment variables for every pgwarden process.
    pub fn start_with_env(
        n: usize,
        spec: impl FnOnce(&mut Value),
        extra: &str,
        env: &[(&str, &str)],
    ) -> Cluster {
        Cluster::launch(n, spec, extra, false, env, Vec::new())
    }

    /// [`Cluster::start_ready`] at the default timings of the spec and of pgwarden's
    /// configuration: what safety tests judge.
    pub async fn start_ready_at_defaults(n: usize, spec: impl FnOnce(&mut Value)) -> Cluster {
        let cluster = Cluster::launch(n, spec, "", true, &[], Vec::new());
        cluster.wait_all_streaming(Duration::from_secs(180)).await;
        cluster
    }

    /// [`Cluster::start_with`] at the default timings of the spec and of pgwarden's
    /// configuration (`spec` and `extra` may still change some): what the benchmarks measure.
    pub fn start_at_defaults_with(n: usize, spec: impl FnOnce(&mut Value), extra: &str) -> Cluster {
        Cluster::launch(n, spec, extra, true, &[], Vec::new())
    }

    fn launch(
        n: usize,
        spec: impl FnOnce(&mut Value),
        extra: &str,
        defaults: bool,
        env: &[(&str, &str)],
        objects: Vec<Value>,
    ) -> Cluster {
        let server = ApiServer::start();
        server.create(secret("pg-superuser", PASSWORD));
        server.create(secret("pg-replication", REPLICATION_PASSWORD));
        for o in objects {
            server.create(o);
        }
        let mut object = cluster_object(n);
        if defaults {
            if let Some(spec) = object["spec"].as_object_mut() {
                spec.remove("failover");
            }
        }
        spec(&mut object["spec"]);
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = instance_name(i);
            server.create(pod(&name));
            let mut sb = Sandbox::new();
            sb.name = name.clone();
            nodes.push(Node {
                name,
                sb,
                warden: None,
                past: Vec::new(),
                frozen: Vec::new(),
                partitioned: false,
            });
        }
        server.create(object);
        let admin = tempfile::tempdir().expect("a temporary directory");
        let mut cluster = Cluster {
            server,
            nodes,
            extra: extra.to_string(),
            admin,
            defaults,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster
    }

    /// [`Cluster::start`], then waits for a primary and every other instance streaming from it.
    pub async fn start_ready(n: usize, spec: impl FnOnce(&mut Value)) -> Cluster {
        let cluster = Cluster::start(n, spec);
        cluster.wait_all_streaming(Duration::from_secs(180)).await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let extra = self.extra.clone();
        let node = &mut self.nodes[i];
        let pod = node.name.clone();
        let identity = format!(
            "[kubernetes]\ncluster = \"{CLUSTER}\"\nnamespace = \"{NS}\"\npod_name = \"{pod}\"\n\
             pod_ip = \"127.0.0.1\"\n"
        );
        node.sb.extra = if self.defaults {
            format!("{identity}{extra}")
        } else {
            format!(
                "{identity}status_interval = \"1s\"\napi_timeout = \"2s\"\n\
                 [monitor]\ninterval = \"300ms\"\nquery_timeout = \"500ms\"\n{extra}"
            )
        };
        let kubeconfig = self.server.kubeconfig(node.sb.dir.path(), &pod);
        super::chown(&kubeconfig);
        let mut cmd = std::process::Command::new(super::binary());
        cmd.arg("run")
            .arg("--config")
            .arg(node.sb.config())
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        node.warden = Some(node.sb.spawn(cmd));
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The instance's Postgres port.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].sb.port
    }

    pub fn status_port(&self, i: usize) -> u16 {
        self.nodes[i].sb.status_port
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.sb.port).collect()
    }

    /// Every instance except `i`.
    pub fn others(&self, i: usize) -> Vec<usize> {
        (0..self.len()).filter(|&j| j != i).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                let out = node.output();
                let lines: Vec<&str> = out.lines().collect();
                let tail = &lines[lines.len().saturating_sub(300)..];
                eprintln!("===== {} (last {} lines) =====", node.name, tail.len());
                for l in tail {
                    eprintln!("{l}");
                }
            }
        }
        // Resume whatever is stopped, then an immediate stop (SIGQUIT, as Warden's drop does)
        // of every instance at once, then SIGKILL for whatever is left.
        for node in &mut self.nodes {
            let mut pids = std::mem::take(&mut node.frozen);
            pids.extend(node.processes());
            signal_all(&pids, Signal::SIGCONT);
        }
        let mut all = Vec::new();
        for node in &mut self.nodes {
            if let Some(p) = node.pgwarden_pid() {
                signal_all(&[p], Signal::SIGQUIT);
            }
            all.extend(node.processes());
        }
        let left = wait_gone_blocking(&all, Duration::from_secs(10));
        signal_all(&left, Signal::SIGKILL);
        for node in &mut self.nodes {
            let pids = node.processes();
            signal_all(&pids, Signal::SIGKILL);
            if let Some(w) = node.warden.as_mut() {
                let _ = w.child.kill();
                let _ = w.child.wait();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness for chaos tests.

/// splitmix64: small, deterministic, good enough to pick failures.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `PGW_CHAOS_SEED` when set, else from the clock; prints the seed.
    pub fn from_env_or_time() -> Rng {
        let seed = std::env::var("PGW_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0x5eed)
            });
        eprintln!("chaos seed: {seed} (rerun with PGW_CHAOS_SEED={seed})");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}
