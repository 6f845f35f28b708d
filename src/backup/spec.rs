//! `spec.backup` of the PostgresCluster: scheduled backups, layered over pgwarden's `[backup]`
//! like `spec.walArchive` over `[wal]`, and the annotation that asks for one backup now.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::config::BackupConfig;

/// Any new value asks the primary for a backup now; the value is echoed in the `Backup`
/// condition of the instance that takes it, and in its Events.
pub const BACKUP_ANNOTATION: &str = "pgwarden.dev/backup";

/// Base backups into the WAL archive's destination. Each field set here replaces pgwarden's
/// `[backup]` setting.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Cron schedule in UTC (`0 3 * * *`; six fields with seconds first), taken once per slot
    /// (by a streaming standby or the primary, see `target`); an empty string turns scheduled backups off.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub schedule: Option<String>,
    /// Recovery window kept after each scheduled backup, e.g. `7d`; an empty string keeps
    /// everything.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub retention: Option<String>,
    /// Where scheduled and requested backups are taken: `prefer-standby` (default: a
    /// streaming standby when one qualifies, else the primary) or `primary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<super::standby::BackupTarget>,
}

impl BackupSpec {
    /// `base` with the fields this spec sets; errors name the field below `spec.backup.`.
    pub fn apply(&self, base: &BackupConfig) -> Result<BackupConfig, (String, String)> {
        let mut c = base.clone();
        if let Some(s) = &self.schedule {
            c.schedule = Some(s.clone()).filter(|s| !s.is_empty());
        }
        if let Some(r) = &self.retention {
            c.retention = match r.as_str() {
                "" => None,
                text => Some(
                    humantime_serde::re::humantime::parse_duration(text)
                        .map_err(|e| ("retention".to_string(), format!("{text:?}: {e}")))?,
                ),
            };
        }
        if let Some(t) = self.target {
            c.target = t;
        }
        c.validate()?;
        Ok(c)
    }
}

/// `status.backups`, written by the primary: what the catalog holds, and how the last
/// backups went.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupsStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful: Option<BackupOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed: Option<BackupOutcome>,
    /// The end of the oldest complete backup: the earliest point a restore reaches (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_recoverable_point: Option<String>,
    /// When the newest archived WAL was archived: about the latest point a restore reaches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recoverable_point: Option<String>,
    /// Complete backups in the destination.
    #[serde(default)]
    pub complete: u32,
}

/// One backup's outcome.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupOutcome {
    /// RFC 3339.
    pub time: String,
    /// The backup's id (when it got one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What asked for it (a slot, a request) and what happened.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_spec_replaces_what_it_sets() {
        let base = BackupConfig {
            schedule: Some("0 3 * * *".into()),
            retention: Some(Duration::from_secs(86_400)),
            ..Default::default()
        };
        let spec = BackupSpec {
            schedule: None,
            retention: Some("7d".into()),
            target: None,
        };
        let c = spec.apply(&base).unwrap();
        assert_eq!(c.schedule.as_deref(), Some("0 3 * * *"));
        assert_eq!(c.retention, Some(Duration::from_secs(7 * 86_400)));
        let off = BackupSpec {
            schedule: Some(String::new()),
            retention: Some(String::new()),
            target: Some(super::super::standby::BackupTarget::Primary),
        };
        let c = off.apply(&base).unwrap();
        assert_eq!((c.schedule, c.retention), (None, None));
        assert_eq!(c.target, super::super::standby::BackupTarget::Primary);
        let bad = BackupSpec {
            schedule: Some("nightly".into()),
            retention: None,
            target: None,
        };
        assert_eq!(bad.apply(&base).unwrap_err().0, "schedule");
        let bad = BackupSpec {
            schedule: None,
            retention: Some("a week".into()),
            target: None,
        };
        assert_eq!(bad.apply(&base).unwrap_err().0, "retention");
    }
}
