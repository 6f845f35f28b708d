//! `target: prefer-standby`: scheduled and requested backups taken by a streaming standby when
//! one qualifies, by the primary otherwise.
//!
//! Nothing new decides who takes a slot: the create-only claim in the destination
//! (`schedule/<slot>`, see [`super::schedule::claim`]) still makes it exactly once, across
//! failovers too. What changes is who tries first: a standby that streams claims at once, and
//! a primary that has a streaming standby waits [`GRACE`] before it claims, so that it takes
//! the backup only when no standby did. A standby that claimed and then fails reports the
//! failure; the slot is not retried (as when a primary fails mid-backup).
//!
//! A standby's backup ends in a segment only the primary archives, once it is full or
//! switched. The standby therefore writes `schedule/<claim>.wal` (the last segment it needs)
//! when pg_basebackup is done, and the primary, which lost the claim, watches for that
//! object and switches WAL once if it is still writing that segment.

use std::time::{Duration, Instant};

use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::BackupError;
use crate::config::PostgresConfig;
use crate::monitor::snapshot::{PgState, Role};
use crate::postgres::connect::{self, Target};
use crate::wal::format::{self, Compression};
use crate::wal::store::Store;

/// Where scheduled and requested backups are taken: `prefer-standby`, a streaming standby when
/// one qualifies, else the primary; or `primary`, always the primary.
// No doc comments on the variants: schemars would describe each in an `anyOf`, which is not a
// structural schema.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BackupTarget {
    #[default]
    PreferStandby,
    Primary,
}

/// How long a primary with a streaming standby leaves the claim to the standbys.
pub const GRACE: Duration = Duration::from_secs(10);

/// This instance is a standby that streams from its primary.
pub fn qualifies(pg: Option<&PgState>) -> bool {
    pg.is_some_and(|p| streams(&p.role, p.wal_receiver.as_ref().map(|w| w.status.as_str())))
}

/// This instance is a primary with at least one streaming standby.
pub fn has_streaming_standby(pg: Option<&PgState>) -> bool {
    pg.is_some_and(|p| serves(&p.role, p.replication.iter().map(|s| s.state.as_str())))
}

fn streams(role: &Role, receiver: Option<&str>) -> bool {
    *role == Role::Replica && receiver == Some("streaming")
}

fn serves<'a>(role: &Role, mut states: impl Iterator<Item = &'a str>) -> bool {
    *role == Role::Primary && states.any(|s| s == "streaming")
}

/// The key a standby's backup under `claim` names its last WAL segment in.
pub fn wal_request_key(claim: &str) -> String {
    format!("schedule/{claim}.wal")
}

/// Written by the standby once pg_basebackup is done: `segment` must be archived.
pub async fn request_wal(store: &Store, key: &str, segment: &str) -> Result<(), BackupError> {
    let text = serde_json::json!({ "segment": segment }).to_string();
    let object = format::encode(text.as_bytes(), Compression::None)
        .map_err(|e| BackupError::Internal(format!("encoding {key}: {e}")))?;
    store.put_object(key, Bytes::from(object)).await?;
    Ok(())
}

/// Written by a standby whose backup failed, so that the primary stops waiting (nothing
/// happens when the request was written already).
pub async fn request_no_wal(store: &Store, key: &str) {
    let text = serde_json::json!({ "segment": null }).to_string();
    let object = match format::encode(text.as_bytes(), Compression::None) {
        Ok(object) => Bytes::from(object),
        Err(e) => {
            tracing::warn!(key, error = %e, "cannot encode the no-WAL-switch note");
            return;
        }
    };
    if let Err(e) = store.put_object(key, object).await {
        tracing::warn!(key, error = %e, "cannot tell the primary the backup needs no WAL switch");
    }
}

/// The instance that claimed `claim` (`schedule/<claim>`), when it can be read.
pub async fn claimed_by(store: &Store, claim: &str) -> Option<String> {
    let content = super::catalog::fetch_object(store, &format!("schedule/{claim}"))
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&content).ok()?;
    v["instance"].as_str().map(str::to_string)
}

/// What came of a standby's backup, as the primary sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// The standby named its last segment (pg_basebackup is done): WAL was switched if needed.
    Asked,
    /// The standby's backup failed before that.
    Failed,
    /// Nothing within the bound (or the request could not be read).
    Unanswered,
}

/// How long the standby that took a backup may be gone from the primary's replication
/// before the primary stops waiting for it (a standby lost mid-backup would otherwise hold the
/// primary's wait for the whole backup timeout, hours).
pub const GONE_AFTER: Duration = Duration::from_secs(60);

/// On the primary, while a standby takes the backup of `claim`: waits (up to `within`, and
/// while `streams()` says the standby still streams from it, or did within `gone_after`;
/// [`GONE_AFTER`] in use) for its WAL request, and switches WAL once if the segment it names
/// is still being written.
pub async fn serve_wal_request(
    store: &Store,
    pg: &PostgresConfig,
    claim: &str,
    within: Duration,
    (streams, gone_after): (impl Fn() -> bool, Duration),
) -> Served {
    let key = wal_request_key(claim);
    let deadline = Instant::now() + within;
    let mut seen = Instant::now();
    let segment = loop {
        if streams() {
            seen = Instant::now();
        } else if seen.elapsed() >= gone_after {
            tracing::warn!(
                claim,
                "the standby taking the backup stopped streaming; not waiting for it"
            );
            return Served::Unanswered;
        }
        match super::catalog::fetch_object(store, &key).await {
            Ok(content) => {
                let v: serde_json::Value = serde_json::from_slice(&content).unwrap_or_default();
                match v["segment"].as_str() {
                    Some(s) => break s.to_string(),
                    None => {
                        tracing::info!(claim, "the standby's backup failed");
                        return Served::Failed;
                    }
                }
            }
            Err(BackupError::Missing { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_secs(2)).await
            }
            Err(e) => {
                tracing::info!(claim, error = %e, "no WAL request from the standby's backup");
                return Served::Unanswered;
            }
        }
    };
    match switch_if_writing(pg, &segment).await {
        Ok(true) => tracing::info!(claim, segment, "WAL switched for a standby's backup"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(claim, segment, error = %e, "cannot switch WAL for a standby's backup")
        }
    }
    Served::Asked
}

/// The ids of the complete backups (to tell a new one later).
pub async fn complete_ids(store: &Store) -> Vec<String> {
    match super::catalog::list(store).await {
        Ok(entries) => entries
            .iter()
            .filter(|e| e.complete().is_some())
            .map(|e| e.id.clone())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Waits (up to `within`) until a complete backup taken by `by` and not in `before` is listed.
pub async fn wait_complete(store: &Store, by: &str, before: &[String], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(entries) = super::catalog::list(store).await {
            let new = entries
                .iter()
                .filter_map(|e| e.complete())
                .any(|i| i.source == by && !before.contains(&i.id));
            if new {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `status.backups.lastSuccessful` from the catalog when its newest complete backup is newer
/// than the one recorded (a standby's backup is recorded by the primary that way: only the
/// primary writes `status.backups`).
pub fn newer_success(
    newest: Option<&super::info::BackupInfo>,
    recorded: Option<&super::spec::BackupOutcome>,
) -> Option<super::spec::BackupOutcome> {
    let newest = newest?;
    let known = recorded.and_then(|r| r.id.as_deref());
    if known.is_some_and(|id| id >= newest.id.as_str()) {
        return None;
    }
    Some(super::spec::BackupOutcome {
        time: super::info::format_time(newest.end_time),
        id: Some(newest.id.clone()),
        message: format!(
            "backup {} complete, taken by {}{}",
            newest.id,
            newest.source,
            if newest.standby { " (a standby)" } else { "" }
        ),
    })
}

/// `pg_switch_wal()` when the current segment is `segment` or an earlier one.
async fn switch_if_writing(pg: &PostgresConfig, segment: &str) -> Result<bool, String> {
    let c = connect::connect_timeout(&Target::admin(pg))
        .await
        .map_err(|e| e.to_string())?;
    let current: String = c
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    // Same width, hexadecimal upper case: names order as the segments do.
    if current.as_str() > segment {
        return Ok(false);
    }
    c.batch_execute("SELECT pg_switch_wal()")
        .await
        .map_err(|e| e.to_string())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_standby_gone_mid_backup_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = Store::open(&url, &Default::default(), Duration::from_secs(5)).unwrap();
        let pg = PostgresConfig::default();
        let started = Instant::now();
        let gone = (|| false, Duration::from_millis(300));
        let served = serve_wal_request(&store, &pg, "slot", Duration::from_secs(600), gone).await;
        assert_eq!(served, Served::Unanswered);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn who_qualifies() {
        assert!(streams(&Role::Replica, Some("streaming")));
        assert!(!streams(&Role::Replica, Some("waiting")));
        assert!(!streams(&Role::Replica, None));
        assert!(!streams(&Role::Primary, Some("streaming")));
        assert!(serves(&Role::Primary, ["catchup", "streaming"].into_iter()));
        assert!(!serves(&Role::Primary, ["catchup"].into_iter()));
        assert!(!serves(&Role::Replica, ["streaming"].into_iter()));
        assert!(!qualifies(None) && !has_streaming_standby(None));
    }

    #[test]
    fn the_newest_complete_backup_becomes_the_last_success_once() {
        let entry = crate::backup::catalog::tests::backup("20270115T080000Z", 10, 2);
        let newest = entry.complete();
        let o = newer_success(newest, None).unwrap();
        assert_eq!(o.id.as_deref(), Some("20270115T080000Z"));
        assert!(o.message.contains("taken by pg-0"), "{}", o.message);
        // What this instance recorded itself (with why it was taken) stays.
        assert_eq!(newer_success(newest, Some(&o)), None);
        let older = crate::backup::spec::BackupOutcome {
            id: Some("20270114T080000Z".into()),
            ..o.clone()
        };
        assert!(newer_success(newest, Some(&older)).is_some());
        assert_eq!(newer_success(None, Some(&older)), None);
    }

    #[test]
    fn targets_spell_as_in_the_spec() {
        let t: BackupTarget = serde_json::from_str("\"prefer-standby\"").unwrap();
        assert_eq!(t, BackupTarget::PreferStandby);
        let t: BackupTarget = serde_json::from_str("\"primary\"").unwrap();
        assert_eq!(t, BackupTarget::Primary);
        assert_eq!(BackupTarget::default(), BackupTarget::PreferStandby);
    }
}
