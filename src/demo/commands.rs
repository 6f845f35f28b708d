//! The demo's commands on stdin (`kill`, `start`, `status`, `backup`, `restore TIME`, `help`,
//! `stop`) and the banner and help they print.

use super::*;

impl Demo {
    /// A command typed on stdin; false to stop the demo.
    pub(super) async fn command(&mut self, line: &str) -> bool {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            [] => {}
            ["kill"] => match self.view.as_ref().and_then(|v| v.primary) {
                Some(p) => self.kill(p).await,
                None => say(
                    "there is no primary right now (starting, or failing over): wait for one, \
                     or name an instance (kill pg-1)",
                ),
            },
            ["kill", name] => match self.index(name) {
                Some(i) => self.kill(i).await,
                None => self.unknown(name),
            },
            ["start", name] => match self.index(name) {
                Some(i) if self.instances[i].is_running() => say(&format!("{name} is running")),
                Some(i) => {
                    say(&format!("starting {name}"));
                    if let Err(e) = self.instances[i].spawn(&self.launch) {
                        say(&format!("{e:#}"));
                    }
                }
                None => self.unknown(name),
            },
            ["status"] => self.status().await,
            ["backup"] => recovery::backup_command(&self.launch, &self.admin_kubeconfig).await,
            ["restore", time] => self.restore(time).await,
            ["restore"] => say("restore TIME: a UTC time such as 2026-12-01T14:04:59Z"),
            ["help"] | ["?"] => self.help(),
            ["stop"] | ["quit"] | ["exit"] => {
                say(&format!("{line}: stopping the cluster"));
                return false;
            }
            _ => say(&format!("unknown command {line:?}; type help")),
        }
        true
    }

    /// `restore TIME`: the database as it was then, in a new instance beside the cluster.
    pub(super) async fn restore(&mut self, time: &str) {
        let Some(p) = self.view.as_ref().and_then(|v| v.primary) else {
            say("there is no primary right now: wait for one (its latest WAL is archived first)");
            return;
        };
        let input = recovery::RestoreInput {
            launch: &self.launch,
            dir: &self.workdir.path,
            time,
            primary_port: self.instances[p].ports.postgres,
            password: &self.password,
            password_file: &self.password_file,
        };
        if let Some(instance) = recovery::restore_command(input).await {
            self.restored = Some(instance);
        }
    }

    pub(super) fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    pub(super) fn unknown(&self, name: &str) {
        say(&format!(
            "no instance {name:?}: the instances are {}",
            self.names.join(", ")
        ));
    }

    /// SIGKILL of an instance's pgwarden and Postgres: a lost node. It comes back later.
    pub(super) async fn kill(&mut self, i: usize) {
        let was_primary = self.view.as_ref().and_then(|v| v.primary) == Some(i);
        let name = self.names[i].clone();
        let instance = &mut self.instances[i];
        if !instance.is_running() && instance.processes().is_empty() {
            say(&format!("{name} is not running"));
            return;
        }
        let (killed, left) = instance.kill().await;
        instance.restart_at = Some(Instant::now() + RESTART_DELAY);
        instance.wait_for_failover = was_primary;
        if was_primary {
            self.primary_killed_at = Some(Instant::now());
        }
        let role = if was_primary {
            "the primary"
        } else {
            "an instance"
        };
        let mut lines = vec![format!(
            "killed {name}, {role}: its pgwarden and Postgres, {killed} processes, with SIGKILL \
             (as if its node were lost)"
        )];
        if !left.is_empty() {
            lines.push(format!("still alive after SIGKILL: {left:?}"));
        }
        if was_primary {
            lines.push(format!(
                "nobody renews the Lease now: once it is {LEASE_SECONDS} s old the most advanced \
                 standby takes it and promotes itself; {name} starts again after that and \
                 rejoins as a standby"
            ));
        } else {
            lines.push(format!(
                "{name} starts again in {} s",
                RESTART_DELAY.as_secs()
            ));
        }
        say_lines(&lines);
    }

    /// How to reach each instance.
    pub(super) fn connections(&self) -> Vec<String> {
        let pw = &self.password;
        let ports: Vec<String> = self
            .instances
            .iter()
            .map(|i| i.ports.postgres.to_string())
            .collect();
        let hosts = vec!["127.0.0.1"; self.instances.len()].join(",");
        let mut lines = vec![
            format!(
                "the superuser is postgres, password {pw} (in {})",
                self.password_file.display()
            ),
            "the primary, wherever it is (libpq tries each and keeps the writable one):"
                .to_string(),
            format!(
                "  psql \"host={hosts} port={} user=postgres password={pw} \
                 target_session_attrs=read-write\"",
                ports.join(",")
            ),
            "each instance:".to_string(),
        ];
        for instance in &self.instances {
            let pid = match instance.pid() {
                Some(pid) => format!("pgwarden pid {pid}"),
                None => "not running".to_string(),
            };
            lines.push(format!(
                "  {}  psql \"host=127.0.0.1 port={} user=postgres password={pw}\"   \
                 curl 127.0.0.1:{}/pg/status   ({pid})",
                instance.name, instance.ports.postgres, instance.ports.status
            ));
        }
        let metrics: Vec<String> = self
            .instances
            .iter()
            .map(|i| i.ports.metrics.to_string())
            .collect();
        lines.push(format!(
            "metrics: curl 127.0.0.1:PORT/metrics with PORT {}",
            metrics.join(", ")
        ));
        // A switchover to a standby of the current primary, through the embedded API server.
        let primary = self.view.as_ref().and_then(|v| v.primary);
        let target = (0..self.names.len()).find(|&i| Some(i) != primary);
        if let Some(target) = target {
            lines.push(format!(
                "a planned switchover: KUBECONFIG={} {} switchover --cluster {CLUSTER} --to {}",
                self.admin_kubeconfig.display(),
                self.launch.binary.display(),
                self.names[target]
            ));
        }
        lines
    }

    pub(super) fn commands_help() -> Vec<String> {
        vec![
            "commands (type one and Enter):".to_string(),
            "  kill        SIGKILL the primary's pgwarden and Postgres (a lost node): a standby \
             takes over, the old primary rejoins as a standby"
                .to_string(),
            "  kill NAME   the same for any instance; start NAME starts a stopped one".to_string(),
            "  status      the state of each instance and how to connect".to_string(),
            "  backup      a base backup now (to the demo's WAL archive, by a standby)".to_string(),
            "  restore T   the database as it was at T (UTC, 2026-12-01T14:04:59Z) in a new \
             instance pg-restored beside the cluster: drop a table, then get it back"
                .to_string(),
            "  stop        stop everything, as Ctrl-C does".to_string(),
        ]
    }

    /// Once the cluster is first up: what it is, how to use it, what to try.
    pub(super) fn banner(&self) {
        let rule = "=".repeat(72);
        let mut lines = vec![rule.clone()];
        if let Some(p) = self.view.as_ref().and_then(|v| v.primary) {
            let standbys: Vec<&str> = (0..self.names.len())
                .filter(|&i| i != p)
                .map(|i| self.names[i].as_str())
                .collect();
            lines.push(format!(
                "the cluster is up: {} is the primary, {} stream from it (quorum commit: \
                 every commit is on a standby too)",
                self.names[p],
                standbys.join(" and ")
            ));
        }
        lines.extend(self.connections());
        lines.push(String::new());
        lines.push(
            "try a failover: type  kill  and Enter. The primary dies at once (SIGKILL of its \
             pgwarden and Postgres); a standby takes over within about 10 s and the demo \
             prints \"primary is now ...\"; the old primary then rejoins as a standby."
                .to_string(),
        );
        lines.extend(Self::commands_help());
        lines.push("Ctrl-C stops everything and leaves nothing running.".to_string());
        lines.push(rule);
        say_lines(&lines);
    }

    pub(super) fn help(&self) {
        let mut lines = Self::commands_help();
        lines.push("Ctrl-C stops everything and leaves nothing running.".to_string());
        say_lines(&lines);
    }

    pub(super) async fn status(&mut self) {
        let mut lines = Vec::new();
        if let Some(server) = &self.server {
            let view = observe::observe(&self.instances, server).await;
            lines.push(view.line(&self.names));
        }
        lines.extend(self.connections());
        say_lines(&lines);
    }
}
