//! Acting on the cluster: failures (kill -9, SIGSTOP, partitions, faults), restarts and
//! signals, annotations and the spec, the switchover command, the writer and the checker, and
//! the check that no acknowledged commit was lost.

use super::*;

impl Cluster {
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
        let mut cmd = std::process::Command::new(crate::support::binary());
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
