//! One instance of the demo: a `pgwarden run` child process (in its own process group, with
//! its output prefixed by its name) and everything it started.
//!
//! pgwarden is not PID 1 here, so killing it alone would leave its Postgres running. An
//! instance's processes are found from the process tree (pgwarden's descendants) and from the
//! working directory (every Postgres process of a data directory has it as its cwd, even
//! orphaned); they are frozen with SIGSTOP until no new one appears, then killed together.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use super::process;
use super::setup::{Layout, Ports, RunAs};
use crate::supervisor::reaper::{ExitStatus, Reaper};

/// How the instances are started (the same for all).
pub struct Launch {
    pub binary: PathBuf,
    pub run_as: Option<RunAs>,
    pub log_level: String,
    pub reaper: Reaper,
}

impl Launch {
    /// `pgwarden <args>` as the instances' user, with a clean environment: pgwarden takes
    /// every `PGWARDEN_*` variable for a configuration key, and the downward-API variables
    /// would override the demo's identities.
    pub fn command(&self, args: &[&std::ffi::OsStr]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--log-format", "human", "--log-level", &self.log_level])
            .args(args)
            .stdin(Stdio::null());
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("PGWARDEN_") || k.starts_with("POD_") || k == "KUBECONFIG" {
                cmd.env_remove(&key);
            }
        }
        if let Some(u) = &self.run_as {
            cmd.uid(u.uid.as_raw())
                .gid(u.gid.as_raw())
                .env("HOME", &u.home)
                .env("USER", &u.name)
                .env("LOGNAME", &u.name);
        }
        cmd
    }
}

/// A running pgwarden.
struct Running {
    pid: Pid,
    exit: oneshot::Receiver<ExitStatus>,
    /// The demo stopped or killed it: its exit is no news.
    expected: bool,
}

pub struct Instance {
    pub name: String,
    pub layout: Layout,
    pub ports: Ports,
    pub kubeconfig: PathBuf,
    running: Option<Running>,
    /// When a killed instance is due back.
    pub restart_at: Option<Instant>,
    /// It was killed as the primary: it comes back once another instance has taken over.
    pub wait_for_failover: bool,
    /// The threads copying its output (they end when the last writer closes the pipe).
    pumps: Vec<std::thread::JoinHandle<()>>,
}

/// How an instance's pgwarden ended.
pub struct Exit {
    pub status: ExitStatus,
    /// The demo stopped or killed it.
    pub expected: bool,
}

impl Instance {
    pub fn new(name: String, layout: Layout, ports: Ports, kubeconfig: PathBuf) -> Instance {
        Instance {
            name,
            layout,
            ports,
            kubeconfig,
            running: None,
            restart_at: None,
            wait_for_failover: false,
            pumps: Vec::new(),
        }
    }

    /// pgwarden's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.running.as_ref().map(|r| r.pid.as_raw())
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts `pgwarden run` for this instance, in its own process group (a terminal's Ctrl-C
    /// reaches the demo only, which stops the instances in order).
    pub fn spawn(&mut self, launch: &Launch) -> anyhow::Result<()> {
        let config = self.layout.config();
        let mut cmd = launch.command(&["run".as_ref(), "--config".as_ref(), config.as_os_str()]);
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let child = launch
            .reaper
            .spawn(&mut cmd)
            .with_context(|| format!("cannot start {}", launch.binary.display()))?;
        self.pumps.retain(|p| !p.is_finished());
        let streams = [
            child.stdout.map(|p| Box::new(p) as Box<dyn Read + Send>),
            child.stderr.map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for stream in streams.into_iter().flatten() {
            let prefix = format!("[{}] ", self.name);
            let pump = std::thread::Builder::new()
                .name(format!("demo-{}", self.name))
                .spawn(move || pump(stream, &prefix))
                .context("cannot start an output thread")?;
            self.pumps.push(pump);
        }
        self.running = Some(Running {
            pid: child.pid,
            exit: child.exit,
            expected: false,
        });
        (self.restart_at, self.wait_for_failover) = (None, false);
        Ok(())
    }

    /// The exit of pgwarden, once (without waiting).
    pub fn poll_exit(&mut self) -> Option<Exit> {
        let running = self.running.as_mut()?;
        let status = match running.exit.try_recv() {
            Ok(status) => status,
            Err(oneshot::error::TryRecvError::Empty) => return None,
            // The reaper is gone (it never stops while the runtime runs): take it as killed.
            Err(oneshot::error::TryRecvError::Closed) => ExitStatus::Signaled(Signal::SIGKILL),
        };
        let expected = running.expected;
        self.running = None;
        Some(Exit { status, expected })
    }

    /// Signals pgwarden (SIGTERM: a clean stop, the primary handing over first).
    pub fn signal(&mut self, sig: Signal) {
        if let Some(r) = &mut self.running {
            r.expected = true;
            let _ = kill(r.pid, sig);
        }
    }

    /// pgwarden, its descendants, and every process in the data directory with theirs.
    pub fn processes(&self) -> Vec<i32> {
        process::tree(self.pid(), &self.layout.data_dir())
    }

    /// SIGKILLs pgwarden and every process of this instance at once (a lost node), and waits
    /// (bounded) until they are gone. Returns how many processes were killed, and those still
    /// alive.
    pub async fn kill(&mut self) -> (usize, Vec<i32>) {
        if let Some(r) = &mut self.running {
            r.expected = true;
        }
        // Frozen first, so that nobody forks, restarts or notices while we go.
        let all = process::freeze(|| self.processes());
        process::signal_all(&all, Signal::SIGKILL);
        let left = process::wait_gone(&all, Duration::from_secs(10)).await;
        (all.len(), left)
    }

    /// Waits (bounded) for the output threads to copy the last lines.
    pub async fn drain_output(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.pumps.retain(|p| !p.is_finished());
    }
}

/// Copies `stream` line by line to stdout, each line prefixed (whole lines: the demo's own
/// messages never land inside one).
fn pump(stream: Box<dyn Read + Send>, prefix: &str) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let mut out = std::io::stdout().lock();
                // A closed stdout must not stop the pipe from being read.
                let _ = writeln!(out, "{prefix}{}", text.trim_end_matches(['\n', '\r']));
                let _ = out.flush();
            }
        }
    }
}
