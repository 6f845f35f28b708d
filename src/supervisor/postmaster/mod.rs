//! The postmaster actor: the one task that owns the `postgres` child process.
//!
//! Everything else sends it [`Command`]s and watches its [`Status`]. It renders the
//! configuration before every start, spawns `postgres -D` directly, declares it ready only
//! after `postmaster.pid` says so *and* a real connection succeeds, restarts it with
//! exponential backoff when it dies unexpectedly, and gives up (state [`State::Failed`]) after
//! too many crashes in a window, so that pgwarden exits and the kubelet restarts the container.

use std::collections::VecDeque;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::sleep_until;

use crate::config::{PostgresConfig, ShutdownConfig, SupervisionConfig};
use crate::postgres::binaries::Binaries;
use crate::postgres::conf;
use crate::postgres::log::ServerLog;
use crate::postgres::server;
use crate::supervisor::reaper::{ExitStatus, Reaper};

mod actor;
pub use actor::spawn;

/// Postgres's three shutdown modes, in increasing severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopMode {
    /// Wait for clients to disconnect (SIGTERM).
    Smart,
    /// Disconnect clients, checkpoint (SIGINT).
    Fast,
    /// Exit at once; crash recovery on the next start (SIGQUIT).
    Immediate,
}

impl StopMode {
    fn signal(self) -> Signal {
        match self {
            StopMode::Smart => Signal::SIGTERM,
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        }
    }
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOutcome {
    /// The most severe mode that was needed; `None` when nothing was running.
    pub mode: Option<StopMode>,
    /// Whether the postmaster had to be killed with SIGKILL.
    pub killed: bool,
    pub status: Option<ExitStatus>,
}

impl StopOutcome {
    /// A stop that left a consistent data directory: nothing ran, or a smart or fast shutdown
    /// that exited 0.
    pub fn clean(&self) -> bool {
        match (self.mode, self.status) {
            (None, _) => true,
            (Some(mode), Some(status)) => {
                !self.killed && mode <= StopMode::Fast && status.success()
            }
            _ => false,
        }
    }
}

/// The postmaster's lifecycle, as seen by everyone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Before the first start: the data directory is being prepared.
    Initializing,
    /// Not running, on purpose (after a stop).
    Stopped,
    /// Spawned, not yet accepting connections. `crash_recovery` when the data directory was
    /// not shut down cleanly, so WAL replay (of unknown length) comes first.
    Starting { pid: i32, crash_recovery: bool },
    /// Accepting connections since `since`.
    Running { pid: i32, since: Instant },
    /// Shutting down in the given mode.
    Stopping { pid: i32, mode: StopMode },
    /// Died unexpectedly; restarting after a backoff.
    Restarting { crashes_in_window: u32 },
    /// Died too often; pgwarden gives up.
    Failed { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// Unexpected postmaster exits since pgwarden started.
    pub crashes: u64,
    /// Postmaster starts since pgwarden started.
    pub starts: u64,
    /// Whether Postgres has accepted connections at least once.
    pub ever_ready: bool,
    /// Held stopped by fencing (manual or self-fencing) until the next start.
    pub fenced: bool,
}

type Reply<T> = oneshot::Sender<T>;

/// Why a command to the postmaster actor failed. Callers decide on the kind: a configuration
/// Postgres refuses is reported and not retried until it changes; trouble writing the files or
/// signalling is retried; a shutdown ends the caller's work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PostmasterError {
    /// Postgres refuses the settings (`postgres -C`, `pg_hba_file_rules`): the running ones
    /// stay in force.
    #[error("{0}")]
    Rejected(String),
    /// The configuration files could not be written or checked, or the postmaster signalled.
    #[error("{0}")]
    Io(String),
    /// The command needs a running Postgres (a promotion).
    #[error("postgres is not running")]
    NotRunning,
    /// Postgres did not start, or stopped while starting (its own messages included).
    #[error("{0}")]
    Start(String),
    /// `pg_promote` failed or timed out.
    #[error("{0}")]
    Promote(String),
    /// pgwarden is shutting down (or the actor is gone).
    #[error("pgwarden is shutting down")]
    ShuttingDown,
}

impl From<crate::postgres::conf::CheckError> for PostmasterError {
    fn from(e: crate::postgres::conf::CheckError) -> Self {
        match e {
            crate::postgres::conf::CheckError::Rejected(m) => PostmasterError::Rejected(m),
            crate::postgres::conf::CheckError::Unchecked(m) => PostmasterError::Io(m),
        }
    }
}

pub enum Command {
    /// Start if not running; replies once ready or when the start failed.
    Start(Reply<Result<(), PostmasterError>>),
    /// Stop, escalating smart -> fast -> immediate -> SIGKILL on the configured timeouts.
    Stop(StopMode, Reply<StopOutcome>),
    /// Fast stop, then start; replies once ready again.
    Restart(Reply<Result<(), PostmasterError>>),
    /// Re-render the configuration files (with new settings when given) and signal a reload.
    Reload(
        Option<Box<PostgresConfig>>,
        Reply<Result<(), PostmasterError>>,
    ),
    /// Stop and stay stopped until the next Start (HA: fencing, demotion, rewind, clone);
    /// unlike Stop, pgwarden is not shutting down. `fenced` is reported in the status.
    Halt {
        mode: StopMode,
        fenced: bool,
        reply: Reply<StopOutcome>,
    },
    /// Replace the replication settings (standby upstream, synchronous standbys) and reload.
    SetReplication(conf::Replication, Reply<Result<(), PostmasterError>>),
    /// Replace the TLS certificate files (none: TLS off) and reload: Postgres re-reads them on
    /// SIGHUP, so a renewed certificate needs no restart.
    SetSsl(Option<conf::SslFiles>, Reply<Result<(), PostmasterError>>),
    /// Promote the running standby, with these `synchronous_standby_names` in force from its
    /// first write; replies once it accepts writes.
    Promote(Option<String>, Reply<Result<(), PostmasterError>>),
}

/// Handle used to talk to the actor.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }
    pub async fn start(&self) -> Result<(), PostmasterError> {
        self.call(Command::Start)
            .await
            .unwrap_or(Err(PostmasterError::ShuttingDown))
    }
    /// Sends a stop and returns the receiver of its outcome without waiting for it.
    pub async fn begin_stop(&self, mode: StopMode) -> Option<oneshot::Receiver<StopOutcome>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Stop(mode, tx)).await.ok()?;
        Some(rx)
    }
    pub async fn restart(&self) -> Result<(), PostmasterError> {
        self.call(Command::Restart)
            .await
            .unwrap_or(Err(PostmasterError::ShuttingDown))
    }
    pub async fn reload(&self, settings: Option<PostgresConfig>) -> Result<(), PostmasterError> {
        self.call(|r| Command::Reload(settings.map(Box::new), r))
            .await
            .unwrap_or(Err(PostmasterError::ShuttingDown))
    }
    /// Stops Postgres and keeps it stopped until the next start.
    pub async fn halt(&self, mode: StopMode, fenced: bool) -> Option<StopOutcome> {
        self.call(|reply| Command::Halt {
            mode,
            fenced,
            reply,
        })
        .await
    }
    pub async fn set_replication(&self, r: conf::Replication) -> Result<(), PostmasterError> {
        self.call(|reply| Command::SetReplication(r, reply))
            .await
            .unwrap_or(Err(PostmasterError::ShuttingDown))
    }
    pub async fn set_ssl(&self, files: Option<conf::SslFiles>) -> Result<(), PostmasterError> {
        self.call(|reply| Command::SetSsl(files, reply))
            .await
            .unwrap_or(Err(PostmasterError::ShuttingDown))
    }
    pub async fn promote(
        &self,
        synchronous_standby_names: Option<String>,
    ) -> Result<(), PostmasterError> {
        self.call(|r| Command::Promote(synchronous_standby_names, r))
            .await
            .unwrap_or(Err(PostmasterError::ShuttingDown))
    }
}

/// What the actor needs to run Postgres.
pub struct Spec {
    pub settings: PostgresConfig,
    pub binaries: Binaries,
    pub os_user: String,
    pub shutdown: ShutdownConfig,
    pub supervision: SupervisionConfig,
}

/// The status channel, created before the actor so that probes can report the bootstrap.
pub fn status_channel() -> (watch::Sender<Status>, watch::Receiver<Status>) {
    watch::channel(Status {
        state: State::Initializing,
        crashes: 0,
        starts: 0,
        ever_ready: false,
        fenced: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_stop_rules() {
        let ok = Some(ExitStatus::Exited(0));
        let clean = |mode, killed, status| {
            StopOutcome {
                mode,
                killed,
                status,
            }
            .clean()
        };
        assert!(clean(None, false, None));
        assert!(clean(Some(StopMode::Smart), false, ok));
        assert!(clean(Some(StopMode::Fast), false, ok));
        assert!(!clean(Some(StopMode::Immediate), false, ok));
        assert!(!clean(Some(StopMode::Fast), true, ok));
        assert!(!clean(
            Some(StopMode::Fast),
            false,
            Some(ExitStatus::Exited(1))
        ));
    }
}
