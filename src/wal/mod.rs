//! WAL archiving and restore.
//!
//! Postgres calls `archive_command` for one segment at a time; when every call waits on a
//! remote store, WAL piles up in `pg_wal`. pgwarden's archiver (in `pgwarden run`) watches
//! `pg_wal/archive_status/*.ready` and uploads ahead with N parallel workers, so that when
//! Postgres runs `pgwarden wal-archive %p` the segment is usually archived already and the
//! answer is immediate; a requested segment that is not done yet jumps the queue. During
//! recovery `pgwarden wal-restore %f %p` asks the same daemon, which prefetches the next
//! segments in parallel into a spool directory. Without a daemon to talk to, both commands do
//! the work themselves.
//!
//! | module | role |
//! |---|---|
//! | [`names`] | WAL file names: kinds, order, next segment (pure) |
//! | [`format`] | the self-verifying object format: header with SHA-256, zstd/gzip/none (pure) |
//! | [`store`] | `object_store` wrapper: filesystem and S3, create-only uploads, timeouts |
//! | [`socket`] | the local request/response protocol over a unix socket |
//! | [`archiver`] | the upload-ahead daemon: queue, workers, retries, drain, status |
//! | [`restore`] | fetch + verify + spool, prefetch, and the hand-over to Postgres |
//! | [`commands`] | the `wal-archive` / `wal-restore` subcommands Postgres runs |
//! | [`identity`] | the destination's claim: whose database system its WAL belongs to |
//! | `state` | the daemon's counters, state and its part of `/pg/status` |

pub mod archiver;
pub mod commands;
pub mod format;
pub mod identity;
pub mod names;
pub mod restore;
pub mod socket;
mod state;
pub mod store;

pub use state::{WalDoc, WalMetrics, WalState};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, PostgresConfig, WalConfig};
use crate::metrics::Metrics;
use crate::monitor::Observation;
use crate::postgres::conf::ArchiveCommands;

/// Everything `wal-archive` / `wal-restore` need, resolved by `pgwarden run` and written to
/// [`settings_path`] (no secrets: credentials come from the environment or a mounted Secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// `wal.destination`, known to be set.
    pub destination: String,
    pub data_dir: PathBuf,
    /// `wal.spool_dir`, or its default beside the data directory.
    pub spool_dir: PathBuf,
    pub socket: PathBuf,
    /// The `[wal]` section (or the spec's layered over it) these were resolved from: its
    /// tuning is read from here, never copied field by field.
    pub wal: WalConfig,
}

/// `<run_dir>/wal/`: the socket and the settings file.
pub fn run_subdir(run_dir: &Path) -> PathBuf {
    run_dir.join("wal")
}

pub fn settings_path(run_dir: &Path) -> PathBuf {
    run_subdir(run_dir).join("settings.json")
}

impl Settings {
    /// The settings for `wal` (the configuration file's, or the spec's layered over it);
    /// `None` when archiving is off.
    pub fn resolve(wal: &WalConfig, pg: &PostgresConfig) -> Option<Settings> {
        let destination = wal.destination.clone().filter(|d| !d.is_empty())?;
        let spool_dir = wal.spool_dir.clone().unwrap_or_else(|| {
            pg.data_dir
                .parent()
                .map(|p| p.join("pgwarden-wal-spool"))
                .unwrap_or_else(|| run_subdir(&pg.run_dir).join("spool"))
        });
        Some(Settings {
            destination,
            data_dir: pg.data_dir.clone(),
            spool_dir,
            socket: run_subdir(&pg.run_dir).join("archiver.sock"),
            wal: wal.clone(),
        })
    }

    /// Parallel uploads and prefetch downloads (at least one).
    pub fn parallelism(&self) -> usize {
        self.wal.parallelism.max(1) as usize
    }

    /// Segments fetched ahead during recovery (0: no prefetch).
    pub fn prefetch(&self) -> usize {
        self.wal.prefetch as usize
    }

    pub fn load(path: &Path) -> Result<Settings, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{} is not valid: {e}", path.display()))
    }

    /// Writes the settings file atomically (mode 0600: only pgwarden's user runs the
    /// commands).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    pub fn open_store(&self) -> Result<store::Store, String> {
        store::Store::open(&self.destination, &self.wal.s3, self.wal.io_timeout)
    }

    /// [`Settings::open_store`] for archiving: refused when the data directory was restored
    /// from this very destination (see [`RESTORED_FROM`]).
    pub fn open_archive(&self) -> Result<store::Store, String> {
        check_restored_from(&self.data_dir, &self.destination)?;
        self.open_store()
    }
}

/// Written by `pgwarden restore` into the data directory it restored (and so copied to every
/// standby cloned from it): the destination it came from. A restored cluster shares the
/// source's system identifier and its timelines, so its WAL in the source's archive would be
/// mistaken for the source's history; pgwarden never archives into that destination.
pub const RESTORED_FROM: &str = "pgwarden.restored-from";

/// Refuses `destination` when `data_dir` was restored from it.
pub fn check_restored_from(data_dir: &Path, destination: &str) -> Result<(), String> {
    let Ok(text) = std::fs::read_to_string(data_dir.join(RESTORED_FROM)) else {
        return Ok(());
    };
    let source = text.lines().next().unwrap_or_default().trim();
    let same = match (
        store::parse_destination(source),
        store::parse_destination(destination),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => source == destination,
    };
    if same {
        return Err(format!(
            "this data directory was restored from {destination}: archiving into it would mix \
             this cluster's WAL with its source's history; give this cluster a destination of its \
             own (wal.destination or spec.walArchive.destination)"
        ));
    }
    Ok(())
}

impl WalConfig {
    /// Checks the `[wal]` section; errors name the key below `wal.`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let key = |k: &str, m: String| Err((k.to_string(), m));
        if let Some(d) = &self.destination {
            if !d.is_empty() {
                if let Err(e) = store::parse_destination(d) {
                    return key("destination", e);
                }
            }
        }
        if !(1..=64).contains(&self.parallelism) {
            return key("parallelism", "must be between 1 and 64".into());
        }
        if self.prefetch > 64 {
            return key("prefetch", "must be at most 64".into());
        }
        for (k, d) in [
            ("io_timeout", self.io_timeout),
            ("command_timeout", self.command_timeout),
            ("retry_initial", self.retry_initial),
        ] {
            if d.is_zero() {
                return key(k, "must be greater than zero".into());
            }
        }
        if self.retry_max < self.retry_initial {
            return key(
                "retry_max",
                "must not be shorter than wal.retry_initial".into(),
            );
        }
        if let Some(p) = &self.spool_dir {
            if !p.is_absolute() {
                return key(
                    "spool_dir",
                    format!("{} must be an absolute path", p.display()),
                );
            }
        }
        if let Some(e) = &self.s3.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return key(
                    "s3.endpoint",
                    format!("{e:?} must be an http:// or https:// URL"),
                );
            }
        }
        Ok(())
    }
}

/// The spool directory must be a directory of its own: pgwarden deletes WAL-named files in
/// it, which in (or as) the data directory would be `pg_wal`'s segments, and a spool above the
/// data directory held the data directory itself when the spool was still removed whole.
/// Paths are compared canonicalised as far as they exist (symbolic links, `..`), lexically
/// below that.
pub fn check_spool_dir(spool: &Path, data_dir: &Path) -> Result<(), String> {
    let (s, d) = (resolved(spool), resolved(data_dir));
    let relation = if s == d {
        "is the data directory"
    } else if s.starts_with(&d) {
        "is inside the data directory"
    } else if d.starts_with(&s) {
        "contains the data directory"
    } else {
        return Ok(());
    };
    Err(format!(
        "{} {relation} {}: pgwarden deletes WAL files in the spool directory, so it must be a \
         directory of its own outside the data directory (the default, pgwarden-wal-spool beside \
         it, is)",
        spool.display(),
        data_dir.display()
    ))
}

/// `path` with symbolic links resolved as far as it exists, and `.` / `..` applied lexically
/// to the part that does not exist (yet).
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let mut lexical = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                lexical.pop();
            }
            other => lexical.push(other),
        }
    }
    let mut missing = Vec::new();
    let mut existing = lexical.as_path();
    loop {
        if let Ok(mut p) = std::fs::canonicalize(existing) {
            p.extend(missing.iter().rev());
            return p;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                existing = parent;
            }
            _ => return lexical,
        }
    }
}

/// Quotes a word for `/bin/sh` and escapes `%` for Postgres's command templates.
fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''").replace('%', "%%"))
}

/// The archive_command and restore_command pgwarden renders, calling this very binary.
pub fn commands(binary: &Path, settings_file: &Path) -> ArchiveCommands {
    let bin = shell_word(&binary.to_string_lossy());
    let settings = shell_word(&settings_file.to_string_lossy());
    ArchiveCommands {
        archive_command: format!("{bin} wal-archive --settings {settings} %p"),
        restore_command: format!("{bin} wal-restore --settings {settings} %f %p"),
    }
}

/// The binary Postgres should run: this process's own executable. When the file was
/// replaced since (an upgrade in place), Linux reports it as "<path> (deleted)": the path
/// itself then holds the new binary, which is the one to run.
pub fn own_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pgwarden"));
    match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(p) => PathBuf::from(p),
        None => exe,
    }
}

/// The running daemon.
#[derive(Clone)]
pub struct Handle {
    pub state: watch::Receiver<WalState>,
    settings: watch::Sender<Option<Arc<Settings>>>,
    drain: mpsc::Sender<(Duration, oneshot::Sender<u64>)>,
    run_dir: PathBuf,
}

impl Handle {
    /// Replaces the settings (the spec's `walArchive` over the file's); `None` turns the
    /// archiver off. The settings file the commands read is rewritten first.
    pub fn set(&self, settings: Option<Settings>) {
        let path = settings_path(&self.run_dir);
        match &settings {
            Some(s) => {
                if let Err(e) = s.write(&path) {
                    tracing::error!(error = %e, path = %path.display(), "cannot write the WAL settings file");
                }
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        self.settings.send_if_modified(|cur| {
            let new = settings.map(Arc::new);
            if *cur == new {
                return false;
            }
            *cur = new;
            true
        });
    }

    pub fn settings(&self) -> Option<Arc<Settings>> {
        self.settings.borrow().clone()
    }

    /// After Postgres stopped: uploads what is still waiting, for at most the drain timeout.
    /// Returns how many files are still not archived.
    pub async fn drain(&self) -> u64 {
        let Some(timeout) = self.settings().map(|s| s.wal.drain_timeout) else {
            return 0;
        };
        let (tx, rx) = oneshot::channel();
        if self.drain.send((timeout, tx)).await.is_err() {
            return 0;
        }
        tokio::time::timeout(timeout + Duration::from_secs(1), rx)
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or(0)
    }
}

/// Whether the daemon should run: archiving configured, or a PostgresCluster that may
/// configure it.
pub fn wanted(config: &Config) -> bool {
    config
        .wal
        .destination
        .as_deref()
        .is_some_and(|d| !d.is_empty())
        || config.kubernetes.cluster.is_some()
}

/// Starts the socket server, the archiver and the restorer.
pub fn start(
    config: &Config,
    metrics: &Metrics,
    observation: watch::Receiver<Observation>,
) -> anyhow::Result<Handle> {
    let pg = &config.postgres;
    let settings = Settings::resolve(&config.wal, pg);
    let wal_metrics = WalMetrics::new(metrics)?;
    let (settings_tx, settings_rx) = watch::channel(None);
    let (state_tx, state_rx) = watch::channel(WalState::default());
    let (drain_tx, drain_rx) = mpsc::channel(1);
    let (calls_tx, mut calls_rx) = mpsc::channel::<socket::Call>(256);
    let (archive_tx, archive_rx) = mpsc::channel(256);
    let (restore_tx, restore_rx) = mpsc::channel(256);
    let handle = Handle {
        state: state_rx,
        settings: settings_tx,
        drain: drain_tx,
        run_dir: pg.run_dir.clone(),
    };
    handle.set(settings);
    let socket_path = run_subdir(&pg.run_dir).join("archiver.sock");
    socket::serve(&socket_path, calls_tx, config.wal.command_timeout)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", socket_path.display()))?;
    tokio::spawn(async move {
        while let Some((req, reply)) = calls_rx.recv().await {
            let to = match &req {
                socket::Request::Archive { .. } => archive_tx.send((req, reply)).await,
                socket::Request::Restore { .. } => restore_tx.send((req, reply)).await,
            };
            if to.is_err() {
                break;
            }
        }
    });
    tokio::spawn(
        archiver::Archiver::new(
            pg.data_dir.clone(),
            settings_rx.clone(),
            state_tx.clone(),
            wal_metrics.clone(),
            observation,
        )
        .run(archive_rx, drain_rx),
    );
    tokio::spawn(restore::Restorer::new(settings_rx, state_tx, wal_metrics).run(restore_rx));
    tracing::info!(socket = %socket_path.display(), "WAL archiver listening");
    Ok(handle)
}

/// Keeps the instance condition `WALArchiving` in line with the archiver's state.
pub fn report_condition(mut state: watch::Receiver<WalState>, k: Arc<crate::k8s::Shared>) {
    tokio::spawn(async move {
        let mut last: Option<(bool, String, String)> = None;
        loop {
            let now = {
                let s = state.borrow_and_update();
                match s.state() {
                    "off" => None,
                    "ok" => Some((
                        true,
                        "Archiving".to_string(),
                        "WAL archiving works".to_string(),
                    )),
                    "conflict" => Some((
                        false,
                        "ArchiveConflict".to_string(),
                        s.conflict.clone().unwrap_or_default(),
                    )),
                    _ => Some((
                        false,
                        "ArchiveFailing".to_string(),
                        s.last_error
                            .as_ref()
                            .map(|(n, e, _)| format!("{n}: {e}"))
                            .unwrap_or_default(),
                    )),
                }
            };
            if let Some(c) = &now {
                if last.as_ref() != Some(c) {
                    k.set_condition("WALArchiving", c.0, &c.1, &c.2, None);
                }
            }
            last = now;
            // At most one update per second: a failing destination changes errors often.
            tokio::time::sleep(Duration::from_secs(1)).await;
            if state.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The checks both daemons make before serving a command: a WAL file name, and a usable
/// destination. `Err` is the answer to send back.
pub(crate) fn serviceable<S>(
    name: &str,
    current: &Option<(S, Result<store::Store, String>)>,
) -> Result<(), String> {
    if names::kind(name).is_none() {
        return Err(format!("{name:?} is not a WAL file name"));
    }
    match current {
        None => Err("WAL archiving is not configured".into()),
        Some((_, Err(e))) => Err(e.clone()),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
