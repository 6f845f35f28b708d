//! The one place that calls `waitpid`.
//!
//! As PID 1 (or a child subreaper) pgwarden inherits every orphan in the container and must
//! reap them all, or zombies pile up. A reaper calling `waitpid(-1)` would steal the exit status
//! of children someone else waits for, so every child pgwarden starts is spawned through
//! [`Reaper::spawn`], which registers its pid; the reaper routes that child's status to the
//! owner and simply discards the status of any other process.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(nix::sys::signal::Signal),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exit code {code}"),
            ExitStatus::Signaled(sig) => write!(f, "killed by {sig}"),
        }
    }
}

#[derive(Default)]
struct Registry {
    /// Owners waiting for a child's status.
    waiting: HashMap<Pid, oneshot::Sender<ExitStatus>>,
}

/// Handle to the reaper task; cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    registry: Arc<Mutex<Registry>>,
    orphans_reaped: Arc<AtomicU64>,
}

/// A child started through the reaper.
pub struct Child {
    pub pid: Pid,
    pub stdout: Option<std::process::ChildStdout>,
    pub stderr: Option<std::process::ChildStderr>,
    pub exit: oneshot::Receiver<ExitStatus>,
}

/// Output of a short-lived command.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task. Must run inside the runtime,
    /// before any child is spawned.
    pub fn start() -> std::io::Result<Reaper> {
        if std::process::id() != 1 {
            // Outside a PID namespace, become a subreaper so orphaned descendants (for example
            // backends of a postmaster that was killed) are still reaped here.
            if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
                tracing::warn!(error = %e, "cannot become a child subreaper");
            }
        }
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper {
            registry: Arc::default(),
            orphans_reaped: Arc::default(),
        };
        let task = reaper.clone();
        tokio::spawn(async move {
            loop {
                task.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Number of processes reaped that pgwarden did not start itself.
    pub fn orphans_reaped(&self) -> u64 {
        self.orphans_reaped.load(Ordering::Relaxed)
    }

    fn reap_all(&self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signaled(sig)),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(_) => continue, // stopped/continued: not an exit
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            };
            let (pid, exit) = status;
            let owner = self.lock().waiting.remove(&pid);
            match owner {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => {
                    self.orphans_reaped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(pid = pid.as_raw(), %exit, "reaped an orphan");
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves a consistent map; keep going.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `cmd` and registers it. The registry lock is held across the spawn so the reaper
    /// cannot collect the child's status before its owner is registered.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<Child> {
        let mut registry = self.lock();
        let mut child = cmd.spawn()?;
        let pid = Pid::from_raw(child.id() as i32);
        let (tx, rx) = oneshot::channel();
        registry.waiting.insert(pid, tx);
        drop(registry);
        Ok(Child {
            pid,
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            exit: rx,
        })
    }

    /// Runs a short command to completion and captures its output.
    pub async fn output(&self, cmd: &mut Command) -> std::io::Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = self.spawn(cmd)?;
        let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            tokio::task::spawn_blocking(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let out = read(
            child
                .stdout
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        );
        let err = read(
            child
                .stderr
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        );
        let status = child
            .exit
            .await
            .map_err(|_| std::io::Error::other("reaper stopped"))?;
        Ok(Output {
            status,
            stdout: out.await.unwrap_or_default(),
            stderr: err.await.unwrap_or_default(),
        })
    }
}
