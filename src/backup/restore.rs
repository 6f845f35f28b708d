//! `pgwarden restore`: a backup into an empty data directory, then archive recovery to the
//! target ([`super::recovery`]).
//!
//! Before anything is written: the data directory must be empty (or absent), a backup must
//! reach the target, and the archive must hold every WAL segment from the backup's start on
//! (to the target's segment for an LSN, to the newest otherwise) and reach the target. The
//! parts are then downloaded in parallel (in order, at most `wal.parallelism` at once), each
//! checked against its header and `backup.info` before a byte of it is unpacked, and the
//! result is checked by `pg_verifybackup` against the stored manifest.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;

use super::catalog::{self, fetch_part, Target, WalIndex};
use super::info::BackupInfo;
use super::recovery::{self, Recovered};
use super::{split, BackupError};
use crate::config::WalConfig;
use crate::postgres::binaries::Binaries;
use crate::supervisor::reaper::{ExitStatus, Reaper};
use crate::wal::store::Store;

pub struct RestoreOptions {
    pub destination: String,
    /// The archive's settings: S3, timeouts, parallelism, prefetch.
    pub wal: WalConfig,
    pub backup: Option<String>,
    pub target: Target,
    pub data_dir: PathBuf,
    pub bin_dir: Option<PathBuf>,
    /// Bound for the recovery (replay to the target and promotion).
    pub recovery_timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub backup: String,
    pub target: String,
    pub data_dir: PathBuf,
    /// The timeline the restored instance promoted onto.
    pub timeline: Option<u32>,
}

/// Removes everything inside `dir` (not `dir` itself).
fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Refuses a data directory that has anything in it (a missing one is fine).
fn refuse_non_empty(dir: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(dir).map(|mut entries| entries.next().is_some()) {
        Ok(true) => Err(BackupError::Refused(format!(
            "{} is not empty: pgwarden restores only into an empty data directory",
            dir.display()
        ))),
        Ok(false) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackupError::Io {
            what: format!("cannot read {}", dir.display()),
            source: e,
        }),
    }
}

/// Checks the data directory again and creates it (mode 0700, as PostgreSQL wants).
fn prepare_data_dir(dir: &Path) -> Result<(), BackupError> {
    refuse_non_empty(dir)?;
    std::fs::create_dir_all(dir)
        .map_err(BackupError::io(format!("cannot create {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(BackupError::io(
        format!("cannot set the mode of {}", dir.display()),
    ))
}

/// The working directory beside the data directory (spool, sockets, settings, manifest);
/// removed when dropped.
struct WorkDir(PathBuf);

/// Where the restore into `data_dir` keeps its working files.
pub fn work_dir(data_dir: &Path) -> PathBuf {
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    data_dir.with_file_name(format!(".{name}.pgwarden-restore"))
}

impl WorkDir {
    fn create(data_dir: &Path) -> Result<WorkDir, BackupError> {
        let dir = work_dir(data_dir);
        if dir.exists() {
            return Err(BackupError::Refused(format!(
                "{} exists: another restore is running, or one was interrupted (remove it)",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(BackupError::io(format!("cannot create {}", dir.display())))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn restore(o: &RestoreOptions) -> Result<Restored, BackupError> {
    let reaper = Reaper::start().map_err(BackupError::io("cannot watch child processes"))?;
    restore_with(o, &reaper).await
}

/// [`restore`] with the process's reaper (`pgwarden run` has one already: a second would
/// take the exit statuses of the first's children).
pub async fn restore_with(o: &RestoreOptions, reaper: &Reaper) -> Result<Restored, BackupError> {
    let store =
        Store::open(&o.destination, &o.wal.s3, o.wal.io_timeout).map_err(BackupError::Refused)?;
    let data_dir = std::path::absolute(&o.data_dir)
        .map_err(BackupError::io(format!("{}", o.data_dir.display())))?;
    refuse_non_empty(&data_dir)?;
    let entries = catalog::list(&store).await?;
    let candidates = catalog::candidates(&entries, o.backup.as_deref(), &o.target, &o.destination)?;
    let existed = data_dir.exists();
    let mut tried = Vec::new();
    for (n, info) in candidates.iter().enumerate() {
        let more = n + 1 < candidates.len();
        match restore_one(o, &store, reaper, info, &data_dir, existed).await {
            Ok(timeline) => {
                return Ok(Restored {
                    backup: info.id.clone(),
                    target: o.target.to_string(),
                    data_dir,
                    timeline,
                })
            }
            // A restore point or transaction that came before this backup: an older one may
            // reach it.
            Err(BackupError::Target(message)) if more => {
                tracing::warn!(backup = info.id, target = %o.target, %message, "the target was not reached from this backup; trying an older one");
                tried.push(info.id.clone());
            }
            Err(e) if tried.is_empty() => return Err(e),
            Err(e) => {
                return Err(BackupError::Target(format!(
                    "{e} (backups tried before, newest first: {})",
                    tried.join(", ")
                )))
            }
        }
    }
    Err(BackupError::NoBackups(o.destination.clone()))
}

/// One attempt: the WAL checked, the data directory filled from `info` and recovered; on
/// failure emptied again (it was empty or absent before).
async fn restore_one(
    o: &RestoreOptions,
    store: &Store,
    reaper: &Reaper,
    info: &BackupInfo,
    data_dir: &Path,
    existed: bool,
) -> Result<Option<u32>, BackupError> {
    let wal = WalIndex::load(store, info.wal_segment_size).await?;
    catalog::check_wal(info, &wal, &o.target)?;

    let bin = Binaries::locate(reaper, o.bin_dir.as_deref(), major(&info.server_version))
        .await
        .map_err(|e| BackupError::Postgres(e.to_string()))?;
    prepare_data_dir(data_dir)?;
    let restored = fill(o, store, reaper, &bin, info, data_dir).await;
    if restored.is_err() {
        // It was empty or absent: what is in it now is this restore's, and unusable. Its
        // contents go (the directory itself stays, and through a symbolic link what it points
        // to is emptied, not the link alone), off the runtime's thread.
        let dir = data_dir.to_path_buf();
        let cleared = tokio::task::spawn_blocking(move || {
            let result = clear_dir(&dir);
            if !existed {
                let _ = std::fs::remove_dir(&dir);
            }
            result
        })
        .await;
        if let Ok(Err(e)) | Err(e) = cleared.map_err(std::io::Error::other) {
            tracing::error!(dir = %data_dir.display(), error = %e, "cannot clear the failed restore's files");
        }
    }
    restored
}

/// Everything after the checks: download, verify, recover. The promoted timeline.
async fn fill(
    o: &RestoreOptions,
    store: &Store,
    reaper: &Reaper,
    bin: &Binaries,
    info: &BackupInfo,
    data_dir: &Path,
) -> Result<Option<u32>, BackupError> {
    let work = WorkDir::create(data_dir)?;
    tracing::info!(backup = info.id, target = %o.target, data_dir = %data_dir.display(), "restore started");
    let parallelism = o.wal.parallelism.max(1) as usize;
    download(store, info, data_dir, parallelism).await?;
    let manifest = work.0.join("backup_manifest");
    let text = fetch_part(store, &info.manifest).await?;
    std::fs::write(&manifest, text).map_err(BackupError::io(format!(
        "cannot write {}",
        manifest.display()
    )))?;
    verify_backup(reaper, bin, &manifest, data_dir).await?;
    tracing::info!(backup = info.id, "backup restored and verified; recovering");
    let Recovered { timeline } = recovery::recover(recovery::Recovery {
        reaper,
        bin,
        data_dir,
        work_dir: &work.0,
        destination: &o.destination,
        wal: &o.wal,
        target: &o.target,
        timeout: o.recovery_timeout,
    })
    .await?;
    let marker = data_dir.join(crate::wal::RESTORED_FROM);
    let text = format!(
        "{}\nbackup {}, target {}: pgwarden never archives into this destination from here\n",
        o.destination, info.id, o.target
    );
    std::fs::write(&marker, text).map_err(BackupError::io(format!(
        "cannot write {}",
        marker.display()
    )))?;
    Ok(timeline)
}

/// `15` of `15.8 (Debian 15.8-0+deb12u1)`.
fn major(version: &str) -> Option<u32> {
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Downloads and checks the parts in order, at most `parallelism` at once, and unpacks them
/// into `dir` as they arrive.
async fn download(
    store: &Store,
    info: &BackupInfo,
    dir: &Path,
    parallelism: usize,
) -> Result<(), BackupError> {
    let (tx, rx) = mpsc::channel(parallelism);
    let target = dir.to_path_buf();
    let unpack =
        tokio::task::spawn_blocking(move || split::unpack_tar(split::Joined::new(rx), &target));
    // Owned futures: a closure over borrowed parts would make this future impossible to
    // prove Send (which the elector's restore task needs).
    let mut parts = futures::stream::iter(info.parts.clone().into_iter().map(|p| {
        let store = store.clone();
        async move { fetch_part(&store, &p).await }
    }))
    .buffered(parallelism);
    let mut fetched = Ok(());
    while let Some(part) = parts.next().await {
        match part {
            Ok(content) => {
                if tx.send(content).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                fetched = Err(e);
                break;
            }
        }
    }
    drop(tx);
    let unpacked = unpack.await;
    // A failed download ends the stream early, which the unpacking then reports too: the
    // download's error is the cause.
    fetched?;
    unpacked
        .map_err(|e| BackupError::Internal(format!("unpacking the backup: {e}")))?
        .map_err(BackupError::io(format!(
            "cannot unpack the backup into {}",
            dir.display()
        )))
}

/// `pg_verifybackup` against the stored manifest (the WAL comes later, from the archive).
async fn verify_backup(
    reaper: &Reaper,
    bin: &Binaries,
    manifest: &Path,
    data_dir: &Path,
) -> Result<(), BackupError> {
    let mut cmd = crate::postgres::command(bin.tool("pg_verifybackup"));
    cmd.arg("--no-parse-wal")
        .arg("-m")
        .arg(manifest)
        .arg(data_dir);
    let out = tokio::time::timeout(Duration::from_secs(3600), reaper.output(&mut cmd))
        .await
        .map_err(|_| BackupError::TimedOut("pg_verifybackup did not finish within 1 h".into()))?
        .map_err(BackupError::io("cannot run pg_verifybackup"))?;
    if out.status != ExitStatus::Exited(0) {
        return Err(BackupError::Postgres(format!(
            "pg_verifybackup found the restored files differ from the backup's manifest: {}",
            format!("{}\n{}", out.stdout.trim(), out.stderr.trim()).trim()
        )));
    }
    Ok(())
}
