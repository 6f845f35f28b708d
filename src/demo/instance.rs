//! One instance of the demo: a `pgwarden run` child process (in its own process group, with
//! its output prefixed by its name) and everything it started.
//!
//! pgwarden is not PID 1 here, so killing it alone would leave its Postgres running. An
//! instance's processes are found from the process tree (pgwarden's descendants) and from the
//! working directory (every Postgres process of a data directory has it as its cwd, even
//! orphaned); they are frozen with SIGSTOP until no new one appears, then killed together.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::oneshot;

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
        let mut found = Vec::new();
        if let Some(pid) = self.pid() {
            found.push(pid);
            found.extend(descendants(pid));
        }
        for pid in processes_in(&self.layout.data_dir()) {
            found.push(pid);
            found.extend(descendants(pid));
        }
        let mut seen = std::collections::BTreeSet::new();
        found.retain(|&p| seen.insert(p) && alive(p));
        found
    }

    /// SIGKILLs pgwarden and every process of this instance at once (a lost node), and waits
    /// (bounded) until they are gone. Returns how many processes were killed, and those still
    /// alive.
    pub async fn kill(&mut self) -> (usize, Vec<i32>) {
        if let Some(r) = &mut self.running {
            r.expected = true;
        }
        // Frozen first, so that nobody forks, restarts or notices while we go.
        let mut all: Vec<i32> = Vec::new();
        for _ in 0..10 {
            let new: Vec<i32> = self
                .processes()
                .into_iter()
                .filter(|p| !all.contains(p))
                .collect();
            if new.is_empty() {
                break;
            }
            signal_all(&new, Signal::SIGSTOP);
            all.extend(new);
        }
        signal_all(&all, Signal::SIGKILL);
        let left = wait_gone(&all, Duration::from_secs(10)).await;
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

// ---------------------------------------------------------------------------------------------
// Processes, from /proc.

/// Alive and not a zombie.
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain anything.
    match stat.rsplit_once(')') {
        Some((_, rest)) => !matches!(rest.trim_start().chars().next(), Some('Z' | 'X') | None),
        None => false,
    }
}

/// Every process whose parent is `pid` (any of its threads), and theirs.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let path = task.path().join("children");
            let Ok(text) = std::fs::read_to_string(path) else {
                continue;
            };
            for child in text.split_whitespace().filter_map(|c| c.parse().ok()) {
                // Bounded by the process table; a pid cannot repeat in a tree.
                if !out.contains(&child) {
                    out.push(child);
                    frontier.push(child);
                }
            }
        }
    }
    out
}

/// Processes whose working directory is `dir`.
fn processes_in(dir: &Path) -> Vec<i32> {
    let Ok(wanted) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == wanted))
        .collect()
}

pub fn signal_all(pids: &[i32], sig: Signal) {
    for &p in pids {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

/// Waits (bounded) until none of `pids` is alive; returns those still alive.
pub async fn wait_gone(pids: &[i32], within: Duration) -> Vec<i32> {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The arguments of a process, for messages.
pub fn command_line(pid: i32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.join(" ")
}
