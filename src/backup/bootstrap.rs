//! `spec.bootstrap.recovery`: a new cluster created from a backup instead of initdb.
//!
//! The first instance (the one that would otherwise run initdb, as a task of the elector
//! while it keeps the Lease) restores the chosen backup with [`super::restore`] into a
//! staging directory beside the data directory, recovers it to the target, promotes it and
//! shuts it down cleanly; only then is the staging directory renamed into place. A restore
//! that fails or is killed half-way therefore never leaves anything where the data
//! directory is: the staging directory is pgwarden's own and is removed (by the failed
//! restore itself, or by the next attempt), exactly like an unfinished initdb's. The data
//! directory itself is never written to, moved or deleted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::catalog::Target;
use super::restore::{self, RestoreOptions, Restored};
use crate::config::{PostgresConfig, WalConfig};
use crate::k8s::crd::WalArchiveSpec;
use crate::postgres::datadir::{self, DataDir};
use crate::supervisor::reaper::Reaper;

/// How a new cluster's first instance gets its data.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// Restore a backup (and the WAL after it) instead of running initdb. Read only when the
    /// cluster is created: an instance that has data never restores over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoverySpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySpec {
    /// The archive to restore from, usually another cluster's `walArchive`: the same fields
    /// (a `destination` is required; `s3.credentialsSecret` names the Secret with its
    /// credentials). Nothing is ever written there.
    pub source: WalArchiveSpec,
    /// The backup to start from; default: the newest complete one that ends before the
    /// target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub backup: Option<String>,
    /// Where recovery stops: at most one field; none means the end of the archived WAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<RecoveryTargetSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryTargetSpec {
    /// A UTC time, RFC 3339 (`2026-12-01T11:06:00Z`): commits up to it are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub time: Option<String>,
    /// A WAL position (`0/5000100`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub lsn: Option<String>,
    /// A transaction id (`txid_current()`), its commit included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid: Option<u64>,
    /// A restore point made with `pg_create_restore_point`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub name: Option<String>,
    /// The end of the backup: the first consistent moment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immediate: Option<bool>,
}

impl RecoveryTargetSpec {
    /// The target; errors name the field below `target.`.
    pub fn target(&self) -> Result<Target, (String, String)> {
        let set = [
            self.time.is_some(),
            self.lsn.is_some(),
            self.xid.is_some(),
            self.name.is_some(),
            self.immediate == Some(true),
        ];
        if set.iter().filter(|s| **s).count() > 1 {
            return Err((
                "target".into(),
                "set at most one of time, lsn, xid, name and immediate".into(),
            ));
        }
        let field = |f: &str| format!("target.{f}");
        if let Some(t) = &self.time {
            return super::info::parse_time(t)
                .map(Target::Time)
                .map_err(|e| (field("time"), e));
        }
        if let Some(l) = &self.lsn {
            return l
                .parse()
                .map(Target::Lsn)
                .map_err(|e: String| (field("lsn"), e));
        }
        if let Some(x) = self.xid {
            return Ok(Target::Xid(x));
        }
        if let Some(n) = &self.name {
            return Ok(Target::Name(n.clone()));
        }
        Ok(match self.immediate {
            Some(true) => Target::Immediate,
            _ => Target::Latest,
        })
    }
}

impl RecoverySpec {
    /// The target (latest when none is set).
    pub fn target(&self) -> Result<Target, (String, String)> {
        self.target
            .as_ref()
            .map_or(Ok(Target::Latest), RecoveryTargetSpec::target)
    }

    /// The source's archive settings over pgwarden's `[wal]` (timeouts, parallelism, ...);
    /// its Secret's credentials are read from `credentials_dir`.
    pub fn source_wal(
        &self,
        base: &WalConfig,
        credentials_dir: &Path,
    ) -> Result<WalConfig, (String, String)> {
        let mut base = base.clone();
        // The cluster's own destination is never the source by default.
        base.destination = None;
        let wal = self.source.apply(&base, credentials_dir);
        if wal.destination.is_none() {
            return Err((
                "source.destination".into(),
                "is required: the archive holding the backups to restore".into(),
            ));
        }
        wal.validate()
            .map_err(|(key, reason)| (format!("source.{key}"), reason))?;
        Ok(wal)
    }

    /// Every problem, with its field below `spec.bootstrap.recovery.`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.target()?;
        self.source_wal(&WalConfig::default(), Path::new("/"))?;
        Ok(())
    }
}

/// Where pgwarden keeps its copy of the source's credentials (`source.s3.credentialsSecret`).
pub fn source_credentials_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("wal").join("source-credentials")
}

/// How long a restore waits for pgwarden's copy of `source.s3.credentialsSecret`: the task
/// that copies it starts with the spec, as the elector does, and may be a round trip behind.
const CREDENTIALS_WAIT: Duration = Duration::from_secs(30);

/// Waits (bounded) until the copy of the source's credentials is in `dir`; past the bound the
/// restore goes on and its store reports what is missing.
async fn wait_for_credentials(dir: &Path) {
    let deadline = tokio::time::Instant::now() + CREDENTIALS_WAIT;
    let key = dir.join("AWS_SECRET_ACCESS_KEY");
    while !tokio::fs::try_exists(&key).await.unwrap_or(false)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Bound for replaying the source's WAL to the target (the Lease is kept meanwhile).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Restores a new cluster from `spec` into the staging directory beside the data directory:
/// recovered, promoted onto a new timeline and cleanly shut down. It becomes the data
/// directory only through [`commit`], which the elector calls under a Lease renewed after the
/// restore: an instance that lost the Lease meanwhile (fenced, stopping) must not turn a copy
/// into the cluster that another instance may be restoring too.
pub async fn restore_cluster(
    spec: &RecoverySpec,
    base_wal: &WalConfig,
    pg: &PostgresConfig,
    reaper: &Reaper,
) -> Result<Restored, String> {
    let field =
        |(key, reason): (String, String)| format!("spec.bootstrap.recovery.{key}: {reason}");
    let target = spec.target().map_err(field)?;
    let wal = spec
        .source_wal(base_wal, &source_credentials_dir(&pg.run_dir))
        .map_err(field)?;
    let destination = wal.destination.clone().unwrap_or_default();
    if let Some(dir) = &wal.s3.credentials_dir {
        wait_for_credentials(dir).await;
    }
    let data = pg.data_dir.clone();
    if datadir::inspect(&data).await.map_err(|e| e.to_string())? != DataDir::Empty {
        return Err(format!(
            "{} is not empty: a cluster is restored only into an empty data directory",
            data.display()
        ));
    }
    let staging = datadir::staging_dir(&data, "restore");
    // What an interrupted attempt left: pgwarden's own, never a usable cluster.
    for dir in [&staging, &restore::work_dir(&staging)] {
        datadir::remove_staging(dir)
            .await
            .map_err(|e| format!("cannot remove {}: {e}", dir.display()))?;
    }
    let options = RestoreOptions {
        destination,
        wal,
        backup: spec.backup.clone(),
        target,
        data_dir: staging.clone(),
        bin_dir: pg.bin_dir.clone(),
        recovery_timeout: RECOVERY_TIMEOUT,
    };
    let restored = restore::restore_with(&options, reaper).await;
    let mut restored = match restored {
        Ok(r) => r,
        Err(e) => {
            let _ = datadir::remove_staging(&staging).await;
            return Err(e.to_string());
        }
    };
    restored.data_dir = data;
    Ok(restored)
}

/// Makes the restored copy the data directory (see [`restore_cluster`]).
pub async fn commit(pg: &PostgresConfig) -> Result<(), String> {
    let data = pg.data_dir.clone();
    let staging = datadir::staging_dir(&data, "restore");
    tokio::task::spawn_blocking(move || move_into_place(&staging, &data))
        .await
        .map_err(|e| e.to_string())?
}

/// Renames the restored directory to the data directory, which must still be empty (an
/// empty directory there, a volume's subdirectory, is removed first: rmdir removes only an
/// empty one).
fn move_into_place(staging: &Path, data: &Path) -> Result<(), String> {
    match datadir::classify(data).map_err(|e| e.to_string())? {
        DataDir::Empty => {}
        DataDir::Cluster { .. } => {
            return Err(format!(
                "{} got a cluster while restoring; the restored copy stays in {}",
                data.display(),
                staging.display()
            ))
        }
    }
    if data.exists() {
        std::fs::remove_dir(data).map_err(|e| format!("cannot replace {}: {e}", data.display()))?;
    }
    std::fs::rename(staging, data).map_err(|e| {
        format!(
            "cannot move {} to {}: {e}",
            staging.display(),
            data.display()
        )
    })?;
    datadir::ensure_mode(data).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> RecoverySpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn targets_and_sources_are_checked_with_the_field_named() {
        let s = spec(serde_json::json!({"source": {"destination": "file:///backups"}}));
        assert_eq!(s.target().unwrap(), Target::Latest);
        assert!(s.validate().is_ok());
        let s = spec(serde_json::json!({
            "source": {"destination": "file:///backups"},
            "target": {"time": "2026-12-01T11:06:00Z"}
        }));
        assert!(matches!(s.target().unwrap(), Target::Time(_)));
        let s = spec(serde_json::json!({
            "source": {"destination": "file:///backups"},
            "target": {"immediate": true}
        }));
        assert_eq!(s.target().unwrap(), Target::Immediate);

        let two = spec(serde_json::json!({
            "source": {"destination": "file:///backups"},
            "target": {"lsn": "0/5000000", "name": "before"}
        }));
        assert_eq!(two.validate().unwrap_err().0, "target");
        let bad = spec(serde_json::json!({
            "source": {"destination": "file:///backups"},
            "target": {"time": "yesterday"}
        }));
        assert_eq!(bad.validate().unwrap_err().0, "target.time");
        let bad = spec(serde_json::json!({
            "source": {"destination": "file:///backups"},
            "target": {"lsn": "five"}
        }));
        assert_eq!(bad.validate().unwrap_err().0, "target.lsn");
        let none = spec(serde_json::json!({"source": {}}));
        assert_eq!(none.validate().unwrap_err().0, "source.destination");
    }

    #[test]
    fn the_source_never_defaults_to_the_clusters_own_destination() {
        let base = WalConfig {
            destination: Some("file:///own".into()),
            parallelism: 7,
            ..WalConfig::default()
        };
        let s = spec(serde_json::json!({"source": {"destination": "file:///theirs"}}));
        let w = s.source_wal(&base, Path::new("/run")).unwrap();
        assert_eq!(w.destination.as_deref(), Some("file:///theirs"));
        assert_eq!(w.parallelism, 7);
        assert!(spec(serde_json::json!({"source": {}}))
            .source_wal(&base, Path::new("/run"))
            .is_err());
    }

    #[test]
    fn a_restored_directory_moves_only_onto_an_empty_data_directory() {
        let root = tempfile::tempdir().unwrap();
        let staging = root.path().join("pgdata.pgwarden-restore");
        let data = root.path().join("pgdata");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("PG_VERSION"), "15\n").unwrap();
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("notes"), "x").unwrap();
        assert!(move_into_place(&staging, &data).is_err());
        assert!(data.join("notes").exists() && staging.join("PG_VERSION").exists());
        std::fs::remove_file(data.join("notes")).unwrap();
        move_into_place(&staging, &data).unwrap();
        assert!(data.join("PG_VERSION").exists() && !staging.exists());
    }
}
