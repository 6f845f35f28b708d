//! `[backup]` in pgwarden's configuration file.

use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::standby::BackupTarget;

/// `[backup]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Cron schedule in UTC: five fields, or six with seconds first; unset: no scheduled
    /// backups. Needs WAL archiving (the backups go to its destination).
    pub schedule: Option<String>,
    /// Recovery window kept after each scheduled backup (e.g. "7d"); unset: nothing is deleted.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// Bound for pg_basebackup.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Bound for the backup's WAL to reach the archive.
    #[serde(with = "humantime_serde")]
    pub wal_timeout: Duration,
    /// Where scheduled and requested backups are taken: `prefer-standby` or `primary`.
    pub target: BackupTarget,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            schedule: None,
            retention: None,
            timeout: Duration::from_secs(6 * 3600),
            wal_timeout: Duration::from_secs(300),
            target: BackupTarget::PreferStandby,
        }
    }
}

impl BackupConfig {
    /// Checks `[backup]`; errors name the key below `backup.`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Some(s) = &self.schedule {
            parse_schedule(s).map_err(|e| ("schedule".to_string(), e))?;
        }
        if self.retention.is_some_and(|r| r.is_zero()) {
            return Err(("retention".into(), "must be greater than zero".into()));
        }
        for (k, d) in [("timeout", self.timeout), ("wal_timeout", self.wal_timeout)] {
            if d.is_zero() {
                return Err((k.into(), "must be greater than zero".into()));
            }
        }
        Ok(())
    }
}

pub fn parse_schedule(s: &str) -> Result<croner::Cron, String> {
    croner::Cron::from_str(s).map_err(|e| format!("{s:?} is not a cron schedule: {e}"))
}
