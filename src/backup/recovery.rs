//! Archive recovery of a restored data directory to its target, run by `pgwarden restore`
//! itself, so that what it hands over is a promoted, cleanly shut down data directory with
//! no recovery setting left behind (a leftover `recovery_target_*` would stop that instance
//! as a standby later).
//!
//! Postgres runs with everything recovery needs on its command line, which overrides the
//! restored configuration files without changing them: pgwarden's restore command, served by
//! an in-process restorer that prefetches like the daemon's; the target with
//! `recovery_target_action = promote`; no TCP listener, a socket in the working directory;
//! and `archive_mode = on` with no `archive_command`, so that no WAL is archived into the
//! source's destination while the new timeline's history and WAL are marked for archiving by
//! whoever runs the instance next.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::catalog::Target;
use super::BackupError;
use crate::config::WalConfig;
use crate::metrics::Metrics;
use crate::postgres::binaries::Binaries;
use crate::supervisor::reaper::{ExitStatus, Reaper};
use crate::wal::{self, restore::Restorer, socket, Settings, WalMetrics, WalState};

pub struct Recovery<'a> {
    pub reaper: &'a Reaper,
    pub bin: &'a Binaries,
    pub data_dir: &'a Path,
    pub work_dir: &'a Path,
    pub destination: &'a str,
    pub wal: &'a WalConfig,
    pub target: &'a Target,
    pub timeout: Duration,
}

#[derive(Debug)]
pub struct Recovered {
    pub timeline: Option<u32>,
}

/// The line PostgreSQL logs once it promoted and accepts writes.
const READY: &str = "database system is ready to accept connections";

/// The `-c` settings for the target.
fn target_settings(target: &Target) -> Vec<String> {
    match target {
        Target::Latest => vec![],
        Target::Immediate => vec!["recovery_target=immediate".into()],
        Target::Time(t) => vec![format!("recovery_target_time={}", postgres_time(*t))],
        Target::Lsn(l) => vec![format!("recovery_target_lsn={l}")],
        Target::Name(n) => vec![format!("recovery_target_name={n}")],
        Target::Xid(x) => vec![format!("recovery_target_xid={x}")],
    }
}

/// `2026-12-01 11:06:00.123456+00`: recovery_target_time takes no ISO 8601 `T`/`Z` form,
/// and microseconds keep a target between two close commits between them.
fn postgres_time(t: std::time::SystemTime) -> String {
    humantime_serde::re::humantime::format_rfc3339_micros(t)
        .to_string()
        .replace('T', " ")
        .replace('Z', "+00")
}

/// What Postgres said: the last lines, and every line that matters kept apart.
#[derive(Default)]
struct ServerLog {
    last: VecDeque<String>,
    important: VecDeque<String>,
    ready: bool,
}

const KEPT: usize = 100;

impl ServerLog {
    fn push(&mut self, line: String) {
        if line.contains(READY) {
            self.ready = true;
        }
        let important = [
            "FATAL",
            "PANIC",
            "ERROR",
            "pgwarden wal-restore:",
            "new timeline ID",
        ]
        .iter()
        .any(|m| line.contains(m));
        if important {
            if self.important.len() == KEPT {
                self.important.pop_front();
            }
            self.important.push_back(line.clone());
        }
        if self.last.len() == KEPT {
            self.last.pop_front();
        }
        self.last.push_back(line);
    }

    fn problems(&self) -> String {
        let lines: Vec<&str> = self
            .important
            .iter()
            .filter(|l| !l.contains("new timeline ID"))
            .map(String::as_str)
            .collect();
        match lines.is_empty() {
            true => self
                .last
                .iter()
                .rev()
                .take(10)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            false => lines.join("\n"),
        }
    }

    /// `selected new timeline ID: 2`.
    fn timeline(&self) -> Option<u32> {
        self.important.iter().find_map(|l| {
            l.split("new timeline ID: ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    }

    /// A restore command that failed other than by "not found" (a corrupt WAL object).
    fn restore_failure(&self) -> Option<String> {
        self.important
            .iter()
            .find(|l| l.contains("pgwarden wal-restore:"))
            .cloned()
    }
}

pub async fn recover(r: Recovery<'_>) -> Result<Recovered, BackupError> {
    let mut tuning = r.wal.clone();
    // Recovery restores only: nothing is uploaded ahead.
    tuning.upload_ahead = false;
    let settings = Settings {
        destination: r.destination.to_string(),
        data_dir: r.data_dir.to_path_buf(),
        spool_dir: r.work_dir.join("spool"),
        socket: r.work_dir.join("wal.sock"),
        wal: tuning,
    };
    let settings_file = r.work_dir.join("wal-settings.json");
    settings
        .write(&settings_file)
        .map_err(BackupError::io(format!(
            "cannot write {}",
            settings_file.display()
        )))?;
    let served = start_restorer(&settings)?;
    // A backup taken from a standby carries its standby.signal, which would win over
    // recovery.signal and keep this Postgres waiting for more WAL instead of promoting.
    let standby = r.data_dir.join("standby.signal");
    match std::fs::remove_file(&standby) {
        Ok(()) => tracing::info!("standby.signal from the source removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(BackupError::Io {
                what: format!("cannot remove {}", standby.display()),
                source: e,
            })
        }
    }
    let signal = r.data_dir.join("recovery.signal");
    std::fs::write(&signal, b"").map_err(BackupError::io(format!(
        "cannot write {}",
        signal.display()
    )))?;

    let restore_command = wal::commands(&wal::own_binary(), &settings_file).restore_command;
    let mut settings_args = vec![
        "listen_addresses=".to_string(),
        format!("unix_socket_directories={}", r.work_dir.display()),
        "archive_mode=on".into(),
        "archive_command=".into(),
        "archive_library=".into(),
        format!("restore_command={restore_command}"),
        "recovery_target_timeline=latest".into(),
        "recovery_target_action=promote".into(),
        "primary_conninfo=".into(),
        "synchronous_standby_names=".into(),
        "ssl=off".into(),
        "logging_collector=off".into(),
        "log_destination=stderr".into(),
        "lc_messages=C".into(),
    ];
    settings_args.extend(target_settings(r.target));
    let mut cmd = crate::postgres::command(r.bin.postgres());
    cmd.arg("-D").arg(r.data_dir);
    for s in &settings_args {
        cmd.arg("-c").arg(s);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = r
        .reaper
        .spawn(&mut cmd)
        .map_err(BackupError::io("cannot start postgres"))?;
    let log = Arc::new(Mutex::new(ServerLog::default()));
    if let Some(pipe) = child.stderr.take() {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                tracing::debug!(target: "postgres", "{line}");
                log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
    }
    // What the stderr thread collected so far.
    let said = || log.lock().unwrap_or_else(|p| p.into_inner());

    let deadline = Instant::now() + r.timeout;
    let outcome = loop {
        if said().ready {
            break Ok(());
        }
        match child.exit.try_recv() {
            Ok(status) => {
                // Let the last lines arrive.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let problems = said().problems();
                let message = format!(
                    "PostgreSQL stopped ({status}) before reaching the target {}; the data \
                     directory {} is not usable:\n{problems}",
                    r.target,
                    r.data_dir.display()
                );
                return Err(match problems.contains("recovery target") {
                    true => BackupError::Target(message),
                    false => BackupError::Postgres(message),
                });
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                break Err(BackupError::Postgres("postgres vanished".into()))
            }
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
        }
        if Instant::now() >= deadline {
            break Err(BackupError::TimedOut(format!(
                "recovery did not reach the target {} within {:?}",
                r.target, r.timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stopped = stop(child.pid, &mut child.exit).await;
    drop(served);
    outcome?;
    stopped?;
    let failure = said().restore_failure();
    if let Some(line) = failure {
        return Err(BackupError::Postgres(format!(
            "recovery stopped early on WAL that could not be restored; the data directory {} \
             is not usable: {line}",
            r.data_dir.display()
        )));
    }
    let timeline = said().timeline();
    Ok(Recovered { timeline })
}

/// The daemon's restorer and its socket server, in this process; stopped when dropped.
struct Served(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Served {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

fn start_restorer(settings: &Settings) -> Result<Served, BackupError> {
    let metrics = Metrics::new()
        .and_then(|m| WalMetrics::new(&m))
        .map_err(|e| BackupError::Internal(format!("metrics: {e}")))?;
    let (settings_tx, settings_rx) = watch::channel(Some(Arc::new(settings.clone())));
    let (state_tx, _) = watch::channel(WalState::default());
    let (calls_tx, calls_rx) = mpsc::channel(64);
    let server = socket::serve(&settings.socket, calls_tx, settings.wal.command_timeout).map_err(
        BackupError::io(format!("cannot listen on {}", settings.socket.display())),
    )?;
    let restorer = tokio::spawn(async move {
        // Held for as long as the restorer runs: its settings never change.
        let _settings = settings_tx;
        Restorer::new(settings_rx, state_tx, metrics)
            .run(calls_rx)
            .await;
    });
    Ok(Served(vec![server, restorer]))
}

/// Fast shutdown, then immediate, then SIGKILL.
async fn stop(
    pid: nix::unistd::Pid,
    exit: &mut tokio::sync::oneshot::Receiver<ExitStatus>,
) -> Result<(), BackupError> {
    use nix::sys::signal::{kill, Signal};
    for (sig, within) in [
        (Signal::SIGINT, Duration::from_secs(120)),
        (Signal::SIGQUIT, Duration::from_secs(10)),
        (Signal::SIGKILL, Duration::from_secs(10)),
    ] {
        if kill(pid, sig).is_err() {
            // Gone meanwhile: its exit is on its way.
            return match tokio::time::timeout(within, &mut *exit).await {
                Ok(_) => Ok(()),
                Err(_) => Err(BackupError::Postgres(format!(
                    "postgres (pid {pid}) vanished"
                ))),
            };
        }
        if tokio::time::timeout(within, &mut *exit).await.is_ok() {
            return Ok(());
        }
    }
    Err(BackupError::Postgres(format!(
        "postgres (pid {pid}) did not stop"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn targets_as_postgres_reads_them() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_950_360_250_001);
        assert_eq!(
            target_settings(&Target::Time(t)),
            ["recovery_target_time=2026-11-29 11:06:00.250001+00"]
        );
        assert_eq!(
            target_settings(&Target::Lsn("0/5000100".parse().unwrap())),
            ["recovery_target_lsn=0/5000100"]
        );
        assert_eq!(
            target_settings(&Target::Immediate),
            ["recovery_target=immediate"]
        );
        assert!(target_settings(&Target::Latest).is_empty());
    }

    #[test]
    fn the_server_log_tells_promotion_timeline_and_failures() {
        let mut log = ServerLog::default();
        for line in [
            "LOG:  starting archive recovery",
            "LOG:  pgwarden wal-restore: 000000010000000000000005 in the archive is corrupt",
            "LOG:  selected new timeline ID: 3",
            "LOG:  database system is ready to accept read-only connections",
        ] {
            log.push(line.into());
        }
        assert!(!log.ready);
        assert_eq!(log.timeline(), Some(3));
        assert!(log.restore_failure().unwrap().contains("is corrupt"));
        log.push(format!("LOG:  {READY}"));
        assert!(log.ready);
    }
}
