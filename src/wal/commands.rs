//! `pgwarden wal-archive` and `pgwarden wal-restore`: what Postgres runs as its
//! `archive_command` and `restore_command`.
//!
//! Both ask the running pgwarden over its unix socket. When nobody answers there (pgwarden is
//! not running, or this is `pg_rewind --restore-target-wal` on a stopped instance) they do the
//! work themselves: one file, verified the same way. Messages go to stderr, which Postgres's
//! logging collector passes on to pgwarden's log. Exit status 0 is success; 1 is "failed"
//! (archive) or "not found / not usable" (restore), which Postgres retries or treats as the
//! end of the archive.

use std::path::{Path, PathBuf};

use super::archiver::{archive_file, ArchiveError};
use super::restore::{self, RestoreError};
use super::socket::{self, CallError, Request, Response};
use super::{names, Settings};

fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| eprintln!("pgwarden: cannot start the async runtime: {e}"))
        .ok()
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// `pgwarden wal-archive --settings FILE %p`.
pub fn wal_archive(settings_file: &Path, wal_path: &Path) -> i32 {
    let settings = match Settings::load(settings_file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pgwarden wal-archive: {e}");
            return 1;
        }
    };
    let Some(name) = wal_path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| names::kind(n).is_some())
        .map(str::to_string)
    else {
        eprintln!(
            "pgwarden wal-archive: {} is not a WAL file",
            wal_path.display()
        );
        return 1;
    };
    let path = absolute(wal_path);
    let Some(rt) = runtime() else { return 1 };
    rt.block_on(async {
        let req = Request::Archive {
            name: name.clone(),
            path: path.clone(),
        };
        match socket::call(&settings.socket, &req, settings.wal.command_timeout).await {
            Ok(Response::Archived) => 0,
            Ok(Response::Failed { error }) => {
                eprintln!("pgwarden wal-archive: {error}");
                1
            }
            Ok(other) => {
                eprintln!("pgwarden wal-archive: unexpected answer {other:?}");
                1
            }
            Err(CallError::Unreachable(..)) => archive_alone(&settings, &name, &path).await,
            Err(CallError::Failed(e)) => {
                eprintln!("pgwarden wal-archive: {name}: {e}");
                1
            }
        }
    })
}

/// Archives one file without the daemon.
async fn archive_alone(settings: &Settings, name: &str, path: &Path) -> i32 {
    let store = match settings.open_archive() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pgwarden wal-archive: {e}");
            return 1;
        }
    };
    if let Err(e) = super::identity::claim(&store, &settings.data_dir).await {
        eprintln!("pgwarden wal-archive: {e}");
        return 1;
    }
    match archive_file(
        &store,
        settings.wal.compression,
        name,
        path,
        settings.wal.io_timeout,
    )
    .await
    {
        Ok(_) => 0,
        Err(ArchiveError::Conflict(e)) => {
            eprintln!("pgwarden wal-archive: refused: {e}");
            1
        }
        Err(e) => {
            eprintln!("pgwarden wal-archive: {e}");
            1
        }
    }
}

/// `pgwarden wal-restore --settings FILE %f %p`.
pub fn wal_restore(settings_file: &Path, name: &str, dest: &Path) -> i32 {
    let settings = match Settings::load(settings_file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pgwarden wal-restore: {e}");
            return 1;
        }
    };
    if names::kind(name).is_none() {
        eprintln!("pgwarden wal-restore: {name:?} is not a WAL file name");
        return 1;
    }
    let dest = absolute(dest);
    let Some(rt) = runtime() else { return 1 };
    rt.block_on(async {
        let req = Request::Restore {
            name: name.to_string(),
        };
        match socket::call(&settings.socket, &req, settings.wal.command_timeout).await {
            Ok(Response::Restored { path }) => match restore::hand_over(&path, &dest) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!(
                        "pgwarden wal-restore: cannot move {} to {}: {e}",
                        path.display(),
                        dest.display()
                    );
                    1
                }
            },
            // Quietly: the end of the archive is the normal end of archive recovery.
            Ok(Response::NotFound) => 1,
            Ok(Response::Failed { error }) => {
                eprintln!("pgwarden wal-restore: {error}");
                1
            }
            Ok(other) => {
                eprintln!("pgwarden wal-restore: unexpected answer {other:?}");
                1
            }
            Err(CallError::Unreachable(..)) => restore_alone(&settings, name, &dest).await,
            Err(CallError::Failed(e)) => {
                eprintln!("pgwarden wal-restore: {name}: {e}");
                1
            }
        }
    })
}

async fn restore_alone(settings: &Settings, name: &str, dest: &Path) -> i32 {
    let store = match settings.open_store() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pgwarden wal-restore: {e}");
            return 1;
        }
    };
    match restore::fetch(&store, name).await {
        Ok(Some((_, content))) => match restore::write_atomic(dest, &content) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("pgwarden wal-restore: cannot write {}: {e}", dest.display());
                1
            }
        },
        Ok(None) => 1,
        Err(RestoreError::Corrupt(e)) | Err(RestoreError::Failed(e)) => {
            eprintln!("pgwarden wal-restore: {e}");
            1
        }
    }
}
