//! Base backups and point-in-time recovery, on the WAL archive's destination.
//!
//! A backup is `pg_basebackup`'s tar stream (`-D - -Ft -X none`), cut into parts that are
//! stored in the WAL objects' self-verifying format, beside its `backup_manifest`, under
//! `<prefix>/base/<id>/`. `backup.info` is written last, and only once every WAL segment from
//! the backup's start to its end is in the archive: an interrupted backup has none and is
//! never taken for a complete one. The catalog is the object store itself (no state
//! anywhere else), so an archive is usable from a machine that knows nothing but its URL.
//!
//! | module | role |
//! |---|---|
//! | [`info`] | `backup.info`, the manifest's WAL range, segment names, ids and times (pure) |
//! | [`split`] | the tar stream cut into parts as it is read, and put back together (blocking) |
//! | [`catalog`] | listing backups and WAL from the store, choosing a backup for a target |
//! | [`take`] | taking a backup: pg_basebackup, parallel uploads, WAL wait, `backup.info` |
//! | [`verify`] | reading a backup back and checking every object |
//! | [`prune`] | the recovery-window retention: what may go (pure), and deleting it |
//! | [`restore`] | a backup into an empty data directory, checked by `pg_verifybackup` |
//! | [`recovery`] | archive recovery to the target with a prefetching restore command |
//! | [`bootstrap`] | `spec.bootstrap.recovery`: a new cluster's first instance restored instead of initdb |
//! | [`config`] | `[backup]` in the configuration file, checked at load |
//! | [`schedule`] | scheduled backups in `pgwarden run`: a streaming standby or the primary, one per slot |
//! | [`standby`] | `target: prefer-standby`: who claims first, and the primary switching WAL for a standby's backup |
//! | [`spec`] | `spec.backup` over `[backup]`, and the `pgwarden.dev/backup` annotation |
//! | [`request`] | `pgwarden backup --cluster NAME`: the annotation, and waiting for the outcome |
//! | [`metrics`] | the backup metrics of `pgwarden run` |
//! | [`cli`] | the `pgwarden backup` and `pgwarden restore` commands |

pub mod bootstrap;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod info;
pub mod metrics;
pub mod prune;
pub mod recovery;
pub mod request;
pub mod restore;
pub mod schedule;
pub mod spec;
pub mod split;
pub mod standby;
pub mod take;
pub mod verify;

use crate::wal::store::StoreError;

/// Why a backup, a verification, a pruning or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An object that does not verify; named by its key.
    #[error("{object} is corrupt: {error}")]
    Corrupt { object: String, error: String },
    #[error("{object} is missing from the archive")]
    Missing { object: String },
    /// pg_basebackup, pg_verifybackup or postgres failed; with what they said.
    #[error("{0}")]
    Postgres(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("there is no backup {id} in {destination}")]
    UnknownBackup { id: String, destination: String },
    #[error("{0} holds no complete backup")]
    NoBackups(String),
    /// A recovery target no backup or no archived WAL can reach.
    #[error("{0}")]
    Target(String),
    /// Refused before anything was changed (a data directory that is not empty, ...).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    TimedOut(String),
    /// The Kubernetes side of `pgwarden backup --cluster`.
    #[error("{0}")]
    Kubernetes(String),
    /// A task of pgwarden's own that failed (a panic on the blocking pool): a bug.
    #[error("{0}")]
    Internal(String),
}

impl BackupError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
        let what = what.into();
        move |source| BackupError::Io { what, source }
    }
}

/// The key of everything belonging to backup `id`.
pub fn backup_prefix(id: &str) -> String {
    format!("base/{id}/")
}

/// The key of backup `id`'s `backup.info`.
pub fn info_key(id: &str) -> String {
    format!("base/{id}/backup.info")
}
