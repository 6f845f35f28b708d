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

    // --- Observation ---------------------------------------------------------------------

    /// `/pg/status` of instance `i`; `Value::Null` when it does not answer in time.
    pub async fn status(&self, i: usize) -> Value {
        match http_get(self.status_port(i), "/pg/status", HTTP).await {
            Some((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    /// A GET on the status port (`/healthz`, `/readyz`, ...): the code, None when unanswered.
    pub async fn http_code(&self, i: usize, path: &str) -> Option<u16> {
        http_get(self.status_port(i), path, HTTP)
            .await
            .map(|(code, _)| code)
    }

    /// A superuser session on instance `i` (statement_timeout 10 s), None when unreachable.
    pub async fn client(&self, i: usize) -> Option<tokio_postgres::Client> {
        connect_within(self.port(i), CONNECT, Some("10s")).await
    }

    /// Whether instance `i` accepts writes now; None when it cannot be asked.
    pub async fn writable(&self, i: usize) -> Option<bool> {
        let c = self.client(i).await?;
        is_writable(&c, QUERY).await
    }

    /// One row of one column from instance `i`, bounded.
    pub async fn query_value<T>(&self, i: usize, sql: &str) -> Option<T>
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        let c = self.client(i).await?;
        let row = timeout(QUERY, c.query_one(sql, &[])).await.ok()?.ok()?;
        row.try_get(0).ok()
    }

    pub fn cluster(&self) -> Value {
        self.server
            .get(PGC.0, PGC.1, NS, CLUSTER)
            .expect("the PostgresCluster exists")
    }

    /// `spec.holderIdentity` of the Lease `pg-leader`.
    pub fn lease_holder(&self) -> Option<String> {
        let lease = self
            .server
            .get("coordination.k8s.io/v1", "leases", NS, LEASE)?;
        lease["spec"]["holderIdentity"]
            .as_str()
            .filter(|h| !h.is_empty())
            .map(str::to_string)
    }

    /// `status.currentPrimary` of the PostgresCluster.
    pub fn current_primary(&self) -> Option<String> {
        self.cluster()["status"]["currentPrimary"]
            .as_str()
            .map(str::to_string)
    }

    pub fn annotation(&self, key: &str) -> Option<String> {
        self.cluster()["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_string)
    }

    /// The primary, when the picture is unambiguous: exactly one instance (not SIGSTOPped)
    /// reports `ha.role` and `postgres.role` "primary", it holds the Lease, and a session on
    /// it is writable.
    pub async fn primary(&self) -> Option<usize> {
        let polled: Vec<usize> = (0..self.len())
            .filter(|&i| self.nodes[i].frozen.is_empty())
            .collect();
        let statuses = futures::future::join_all(polled.iter().map(|&i| self.status(i))).await;
        let claimed: Vec<usize> = polled
            .iter()
            .zip(&statuses)
            .filter(|(_, s)| s["ha"]["role"] == "primary" && s["postgres"]["role"] == "primary")
            .map(|(&i, _)| i)
            .collect();
        let [i] = claimed[..] else { return None };
        if self.lease_holder().as_deref() != Some(self.name(i)) {
            return None;
        }
        (self.writable(i).await == Some(true)).then_some(i)
    }

    /// A one-line-per-instance picture, for failure messages.
    pub async fn describe(&self) -> String {
        let mut out = format!(
            "lease holder {:?}, currentPrimary {:?}\n",
            self.lease_holder(),
            self.current_primary()
        );
        for i in 0..self.len() {
            let s = if self.nodes[i].frozen.is_empty() {
                self.status(i).await
            } else {
                Value::from("SIGSTOPped")
            };
            out.push_str(&format!(
                "  {}: health {} ha {} postgres.role {} wal_receiver {}\n",
                self.name(i),
                s["health"],
                s["ha"],
                s["postgres"]["role"],
                s["postgres"]["wal_receiver"]
            ));
        }
        out
    }

    async fn wait_for<T>(
        &self,
        what: &str,
        within: Duration,
        mut f: impl AsyncFnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {within:?} waiting for {what}\n{}",
                    self.describe().await
                );
            }
            sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_primary(&self, within: Duration) -> usize {
        self.wait_for("a primary", within, async || self.primary().await)
            .await
    }

    /// Waits for a primary other than `old`.
    pub async fn wait_new_primary(&self, old: usize, within: Duration) -> usize {
        let what = format!("a primary other than {}", self.name(old));
        self.wait_for(&what, within, async || {
            self.primary().await.filter(|&p| p != old)
        })
        .await
    }

    /// Whether `i` streams from the primary `p` now: it reports `ha.role` "replica" following
    /// `p`, is in recovery, and `p`'s pg_stat_replication has it streaming.
    pub async fn streams_from(&self, i: usize, p: usize) -> bool {
        if i == p {
            return false;
        }
        let s = self.status(i).await;
        if s["ha"]["role"] != "replica" || s["ha"]["following"] != self.name(p) {
            return false;
        }
        let Some(standby) = self.client(i).await else {
            return false;
        };
        let in_recovery = timeout(QUERY, standby.query_one("SELECT pg_is_in_recovery()", &[]))
            .await
            .ok()
            .and_then(Result::ok)
            .is_some_and(|r| r.get::<_, bool>(0));
        if !in_recovery {
            return false;
        }
        let Some(primary) = self.client(p).await else {
            return false;
        };
        let rows = timeout(
            QUERY,
            primary.query(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                &[&self.name(i)],
            ),
        )
        .await;
        matches!(rows, Ok(Ok(r)) if !r.is_empty())
    }

    /// Waits until `i` is a standby streaming from the (unambiguous) primary; returns it.
    pub async fn wait_streaming(&self, i: usize, within: Duration) -> usize {
        let what = format!("{} streaming from the primary", self.name(i));
        self.wait_for(&what, within, async || {
            let p = self.primary().await?;
            self.streams_from(i, p).await.then_some(p)
        })
        .await
    }

    /// Waits for a primary and every other instance streaming from it; returns the primary.
    pub async fn wait_all_streaming(&self, within: Duration) -> usize {
        self.wait_for(
            "a primary and every other instance streaming from it",
            within,
            async || {
                let p = self.primary().await?;
                for i in self.others(p) {
                    if !self.streams_from(i, p).await {
                        return None;
                    }
                }
                Some(p)
            },
        )
        .await
    }

    // --- Failures ------------------------------------------------------------------------

    /// SIGKILL: pgwarden, the postmaster and every Postgres process of instance `i` (pgwarden
    /// is not PID 1 here, so killing it alone would leave Postgres running).
    pub fn kill9(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let pids = node.freeze();
        signal_all(&pids, Signal::SIGKILL);
        if let Some(mut w) = node.warden.take() {
            let _ = w.child.kill();
            let _ = w.child.wait();
            node.past.push(w);
        }
        let left = wait_gone_blocking(&pids, Duration::from_secs(10));
        assert!(
            left.is_empty(),
            "{}: still alive after SIGKILL: {left:?}",
            node.name
        );
        node.frozen.clear();
    }

    /// SIGSTOP pgwarden and every process under it: a hung node.
    pub fn stop_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut pids = node.freeze();
        node.frozen.append(&mut pids);
    }

    /// SIGCONT a node stopped by [`Cluster::stop_node`]. pgwarden resumes first and gets up to
    /// 3 s to act (until its `/pg/status` answers with `ha.role` other than "primary") before
    /// Postgres resumes: resumed together, Postgres could answer a client before pgwarden runs
    /// a single instruction, and the split-brain checker would see that.
    pub async fn cont_node(&mut self, i: usize) {
        let warden = self.nodes[i].pgwarden_pid();
        if let Some(p) = warden {
            signal_all(&[p], Signal::SIGCONT);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                let s = match http_get(
                    self.status_port(i),
                    "/pg/status",
                    Duration::from_millis(500),
                )
                .await
                {
                    Some((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
                    _ => Value::Null,
                };
                if s.is_object() && s["ha"]["role"] != "primary" {
                    break;
                }
                sleep(Duration::from_millis(100)).await;
            }
        }
        let node = &mut self.nodes[i];
        let mut pids = std::mem::take(&mut node.frozen);
        pids.extend(node.processes());
        pids.retain(|p| Some(*p) != warden);
        signal_all(&pids, Signal::SIGCONT);
    }

    /// Cuts (or heals) instance `i` from the API server: its requests are held unanswered.
    pub fn partition(&mut self, i: usize, on: bool) {
        let fault = if on { Fault::Blackhole } else { Fault::None };
        self.server.set_fault(&self.nodes[i].name, fault);
        self.nodes[i].partitioned = on;
    }

    /// Any API fault for instance `i`'s identity.
    pub fn fault(&mut self, i: usize, fault: Fault) {
        self.nodes[i].partitioned = fault != Fault::None;
        self.server.set_fault(&self.nodes[i].name, fault);
    }

    /// Instance `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> std::path::PathBuf {
        self.nodes[i].sb.data_dir()
    }

    /// Instance `i`'s run directory.
    pub fn run_dir(&self, i: usize) -> std::path::PathBuf {
        self.nodes[i].sb.run_dir()
    }

    /// Starts a fresh pgwarden on instance `i`'s sandbox (same data directory and ports). The
    /// previous one must have exited ([`Cluster::kill9`], SIGTERM, or on its own).
    pub fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut w) = node.warden.take() {
            assert!(
                !matches!(w.child.try_wait(), Ok(None)),
                "restart: {}'s pgwarden still runs",
                node.name
            );
            let _ = w.child.wait();
            node.past.push(w);
        }
        self.spawn(i);
    }

    pub fn signal(&self, i: usize, sig: Signal) {
        self.nodes[i]
            .warden
            .as_ref()
            .expect("pgwarden started")
            .signal(sig);
    }

    pub fn sigterm(&self, i: usize) {
        self.signal(i, Signal::SIGTERM);
    }

    /// Whether instance `i`'s pgwarden process runs (stopped counts as running).
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i].pgwarden_pid().is_some()
    }

    /// Waits (bounded, without blocking the runtime) for instance `i`'s pgwarden to exit.
    pub async fn wait_exit(&mut self, i: usize, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            let w = self.nodes[i].warden.as_mut().expect("pgwarden started");
            if let Some(status) = w.child.try_wait().expect("try_wait") {
                // Let the pipe readers drain the last lines.
                sleep(Duration::from_millis(100)).await;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {within:?}; output:\n{}",
                    self.name(i),
                    self.nodes[i].output()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Live processes of instance `i`: pgwarden, its descendants, and Postgres processes.
    pub fn processes(&mut self, i: usize) -> Vec<i32> {
        self.nodes[i].processes()
    }

    /// Every pgwarden output line of instance `i`, all incarnations.
    pub fn output(&self, i: usize) -> String {
        self.nodes[i].output()
    }

    // --- The PostgresCluster ---------------------------------------------------------------

    /// Sets (Some) or removes (None) an annotation on the PostgresCluster.
    pub fn annotate(&self, key: &str, value: Option<&str>) {
        self.server.update_with(PGC.0, PGC.1, NS, CLUSTER, |obj| {
            let meta = obj["metadata"].as_object_mut().expect("metadata");
            let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
            if !annotations.is_object() {
                *annotations = json!({});
            }
            let map = annotations.as_object_mut().expect("an object");
            match value {
                Some(v) => {
                    map.insert(key.to_string(), Value::from(v));
                }
                None => {
                    map.remove(key);
                }
            }
        });
    }

    pub fn set_spec(&self, f: impl FnOnce(&mut Value)) {
        self.server
            .update_with(PGC.0, PGC.1, NS, CLUSTER, |obj| f(&mut obj["spec"]));
    }

    /// Runs `pgwarden switchover --to <to> --cluster pg --namespace default` (KUBECONFIG with
    /// its own identity) and returns its exit status and output; panics if it runs longer than
    /// `within`.
    pub async fn switchover_cli(&self, to: &str, within: Duration) -> (ExitStatus, String) {
        let kubeconfig = self.server.kubeconfig(self.admin.path(), "admin");
        let mut cmd = std::process::Command::new(super::binary());
        cmd.args([
            "switchover",
            "--to",
            to,
            "--cluster",
            CLUSTER,
            "--namespace",
            NS,
        ])
        .env("KUBECONFIG", &kubeconfig);
        let mut w = Warden::spawn(cmd);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = w.child.try_wait().expect("try_wait") {
                sleep(Duration::from_millis(100)).await;
                return (status, w.output());
            }
            if Instant::now() > deadline {
                let _ = w.child.kill();
                panic!(
                    "pgwarden switchover --to {to} did not finish within {within:?}:\n{}",
                    w.output()
                );
            }
            sleep(Duration::from_millis(100)).await;
        }
    }

    // --- Data ------------------------------------------------------------------------------

    /// Starts a [`Writer`] after creating its table on the primary.
    pub async fn writer(&self) -> Writer {
        let p = self.wait_primary(Duration::from_secs(120)).await;
        let port = self.port(p);
        eventually(
            "the ha_writes table",
            Duration::from_secs(120),
            async || {
                // Without a statement timeout: with quorum commit the DDL waits for a standby.
                let c = connect_within(port, CONNECT, None).await?;
                let sql = "CREATE TABLE IF NOT EXISTS ha_writes (id bigint PRIMARY KEY)";
                timeout(Duration::from_secs(30), c.batch_execute(sql))
                    .await
                    .ok()?
                    .ok()
            },
        )
        .await;
        Writer::start(self.ports())
    }

    pub fn checker(&self) -> SplitBrainChecker {
        SplitBrainChecker::start(
            self.nodes
                .iter()
                .map(|n| (n.name.clone(), n.sb.port))
                .collect(),
        )
    }

    /// Asserts that every acknowledged id is in `ha_writes` on instance `on` (a standby is given
    /// up to 60 s to replay what it has not yet).
    pub async fn assert_no_loss(&self, acked: &[i64], on: usize) {
        assert!(!acked.is_empty(), "the writer had no commit acknowledged");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut missing: Vec<i64>;
        loop {
            let ids: Option<BTreeSet<i64>> = async {
                let c = self.client(on).await?;
                let rows = timeout(
                    Duration::from_secs(10),
                    c.query("SELECT id FROM ha_writes", &[]),
                )
                .await
                .ok()?
                .ok()?;
                Some(rows.iter().map(|r| r.get(0)).collect())
            }
            .await;
            missing = match ids {
                Some(ids) => acked.iter().copied().filter(|i| !ids.contains(i)).collect(),
                None => acked.to_vec(),
            };
            if missing.is_empty() || Instant::now() > deadline {
                break;
            }
            sleep(Duration::from_millis(500)).await;
        }
        assert!(
            missing.is_empty(),
            "{} of {} acknowledged commits missing on {}: first {:?}\n{}",
            missing.len(),
            acked.len(),
            self.name(on),
            &missing[..missing.len().min(20)],
            self.describe().await
        );
        eprintln!(
            "{}: all {} acknowledged commits present",
            self.name(on),
            acked.len()
        );
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
// The writer.

/// A background task inserting increasing ids into `ha_writes` on whichever instance is
/// writable, reconnecting on failure, recording every id whose commit was acknowledged. Each id
/// is tried once: an unacknowledged attempt (error, timeout) is never retried with the same id.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i64>>>,
    attempts: Arc<AtomicU64>,
    task: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts writing; the table must exist (see [`Cluster::writer`]).
    pub fn start(ports: Vec<u16>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<i64>>> = Arc::default();
        let attempts = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(write_loop(
            ports,
            stop.clone(),
            acked.clone(),
            attempts.clone(),
        ));
        Writer {
            stop,
            acked,
            attempts,
            task: Some(task),
        }
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Waits until `more` further commits have been acknowledged.
    pub async fn wait_progress(&self, more: usize, within: Duration) {
        let target = self.acked_count() + more;
        let what = format!(
            "{more} more acknowledged writes (at {})",
            self.acked_count()
        );
        eventually(&what, within, async || {
            (self.acked_count() >= target).then_some(())
        })
        .await;
    }

    /// Stops the writer and returns the acknowledged ids.
    pub async fn stop(mut self) -> Vec<i64> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            let stopped = timeout(Duration::from_secs(30), task).await;
            assert!(stopped.is_ok(), "the writer did not stop within 30 s");
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        eprintln!(
            "writer: {} commits acknowledged of {} attempts",
            acked.len(),
            self.attempts()
        );
        acked
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The first writable instance, trying `preferred` first.
async fn find_writable(ports: &[u16], preferred: usize) -> Option<(usize, tokio_postgres::Client)> {
    for k in 0..ports.len() {
        let i = (preferred + k) % ports.len();
        let Some(c) = connect_within(ports[i], Duration::from_secs(1), Some("10s")).await else {
            continue;
        };
        if is_writable(&c, Duration::from_secs(1)).await == Some(true) {
            return Some((i, c));
        }
    }
    None
}

async fn write_loop(
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i64>>>,
    attempts: Arc<AtomicU64>,
) {
    let deadline = Instant::now() + BACKGROUND_LIMIT;
    let mut next: i64 = 1;
    let mut preferred = 0;
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let c = match client.take() {
            Some(c) => c,
            None => match find_writable(&ports, preferred).await {
                Some((i, c)) => {
                    preferred = i;
                    c
                }
                None => {
                    sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let id = next;
        next += 1;
        attempts.fetch_add(1, Ordering::Relaxed);
        // Dropping the future on timeout sends no cancel request: a commit waiting for a
        // synchronous standby is left waiting, never "acknowledged with a warning".
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
        let insert = c.execute("INSERT INTO ha_writes (id) VALUES ($1)", &params);
        match timeout(Duration::from_secs(5), insert).await {
            Ok(Ok(1)) => {
                acked.lock().unwrap().push(id);
                client = Some(c);
                sleep(Duration::from_millis(10)).await;
            }
            _ => sleep(Duration::from_millis(100)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The split-brain checker.

/// Consecutive writable answers from one instance.
#[derive(Debug, Clone, Copy)]
struct Stretch {
    instance: usize,
    /// The first and last sample: each from just before the query was sent to its answer.
    first: (Instant, Instant),
    last: (Instant, Instant),
    samples: u32,
}

impl Stretch {
    /// When the instance was certainly writable, assuming it stayed writable between two
    /// writable answers: from the first answer to the sending of the last query.
    fn certain(&self) -> Option<(Instant, Instant)> {
        (self.samples >= 2 && self.first.1 <= self.last.0).then_some((self.first.1, self.last.0))
    }

    /// Whether both instances were certainly writable at one moment. A single sample says
    /// "writable at some instant within the sample": that counts when the sample lies wholly
    /// inside the other's certain interval. Latency alone never makes two back-to-back stretches
    /// (a switchover) look simultaneous.
    fn simultaneous(&self, other: &Stretch) -> bool {
        let inside = |s: (Instant, Instant), c: (Instant, Instant)| c.0 <= s.0 && s.1 <= c.1;
        match (self.certain(), other.certain()) {
            (Some(a), Some(b)) => a.0 <= b.1 && b.0 <= a.1,
            (None, Some(b)) => inside(self.first, b),
            (Some(a), None) => inside(other.first, a),
            (None, None) => false,
        }
    }
}

#[derive(Default)]
struct CheckerState {
    closed: Vec<Stretch>,
    open: Vec<Option<Stretch>>,
    samples: Vec<u64>,
    writable_samples: Vec<u64>,
}

/// Attempts a write on every instance every ~50 ms (each on its own task, with 1 s connect and
/// query timeouts and a kept session that is dropped on any failure). An instance counts as
/// writable when the write was acknowledged. Consecutive writable
/// answers form a stretch; two instances whose stretches make them writable at the same moment
/// are a split brain.
pub struct SplitBrainChecker {
    names: Vec<String>,
    started: Instant,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<CheckerState>>,
    tasks: Vec<JoinHandle<()>>,
}

impl SplitBrainChecker {
    pub fn start(instances: Vec<(String, u16)>) -> SplitBrainChecker {
        let n = instances.len();
        let state = Arc::new(Mutex::new(CheckerState {
            open: vec![None; n],
            samples: vec![0; n],
            writable_samples: vec![0; n],
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = instances
            .iter()
            .enumerate()
            .map(|(i, (name, port))| {
                tokio::spawn(poll_loop(
                    i,
                    name.clone(),
                    *port,
                    stop.clone(),
                    state.clone(),
                ))
            })
            .collect();
        SplitBrainChecker {
            names: instances.into_iter().map(|(name, _)| name).collect(),
            started: Instant::now(),
            stop,
            state,
            tasks,
        }
    }

    /// Every moment seen with two or more writable instances, described.
    pub fn violations(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        let all: Vec<Stretch> = state
            .closed
            .iter()
            .copied()
            .chain(state.open.iter().flatten().copied())
            .collect();
        let at = |t: Instant| t.saturating_duration_since(self.started).as_secs_f64();
        let mut out = Vec::new();
        for (k, a) in all.iter().enumerate() {
            for b in &all[k + 1..] {
                if a.instance != b.instance && a.simultaneous(b) {
                    out.push(format!(
                        "{} writable {:.2}s..{:.2}s ({} samples) and {} writable {:.2}s..{:.2}s ({} samples)",
                        self.names[a.instance],
                        at(a.first.0),
                        at(a.last.1),
                        a.samples,
                        self.names[b.instance],
                        at(b.first.0),
                        at(b.last.1),
                        b.samples
                    ));
                }
            }
        }
        out
    }

    /// (samples, writable samples) per instance so far.
    pub fn counts(&self) -> Vec<(u64, u64)> {
        let state = self.state.lock().unwrap();
        state
            .samples
            .iter()
            .copied()
            .zip(state.writable_samples.iter().copied())
            .collect()
    }

    /// Stops polling; returns the violations seen.
    pub async fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks.drain(..) {
            let _ = timeout(Duration::from_secs(10), t).await;
        }
        eprintln!(
            "split-brain checker: (samples, writable) per instance {:?}",
            self.counts()
        );
        self.violations()
    }

    /// Stops polling and asserts that no two instances were ever writable at once, and that the
    /// checker did see a writable instance (it was working).
    pub async fn assert_clean(self) {
        let counts = self.counts();
        let violations = self.stop().await;
        assert!(
            violations.is_empty(),
            "two writable instances at once:\n{}",
            violations.join("\n")
        );
        assert!(
            counts.iter().any(|&(_, w)| w > 0),
            "the checker never saw a writable instance: {counts:?}"
        );
    }
}

impl Drop for SplitBrainChecker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn poll_loop(
    i: usize,
    name: String,
    port: u16,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<CheckerState>>,
) {
    let deadline = Instant::now() + BACKGROUND_LIMIT;
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        if client.is_none() {
            client = connect_within(port, Duration::from_secs(1), Some("1s")).await;
        }
        let start = Instant::now();
        let answer = match &client {
            Some(c) => write_acknowledged(c, &name, Duration::from_secs(1)).await,
            None => None,
        };
        let end = Instant::now();
        if answer.is_none() {
            client = None;
        }
        {
            let mut s = state.lock().unwrap();
            if answer.is_some() {
                s.samples[i] += 1;
            }
            if answer == Some(true) {
                s.writable_samples[i] += 1;
                let stretch = match s.open[i] {
                    Some(mut st) => {
                        st.last = (start, end);
                        st.samples += 1;
                        st
                    }
                    None => Stretch {
                        instance: i,
                        first: (start, end),
                        last: (start, end),
                        samples: 1,
                    },
                };
                s.open[i] = Some(stretch);
            } else if let Some(st) = s.open[i].take() {
                s.closed.push(st);
            }
        }
        sleep(Duration::from_millis(50)).await;
    }
    let mut s = state.lock().unwrap();
    if let Some(st) = s.open[i].take() {
        s.closed.push(st);
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
