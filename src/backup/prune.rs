//! Retention as a recovery window: every moment from `now - retention` to now must stay
//! reachable. That takes every complete backup that ends inside the window, the newest one
//! that ends before it (the start for the window's first moments), and the WAL from that
//! backup's start on. Everything older goes: complete backups, interrupted ones that were
//! last written to before the window, and WAL segments before the oldest kept backup's start.
//! The newest complete backup is always kept, however old. History files always stay (tiny,
//! and a restore following a timeline needs them).

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::catalog::{self, Entry};
use super::{backup_prefix, info, info_key, BackupError};
use crate::wal::names::{self, Kind};
use crate::wal::store::{Listed, Store};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Backups kept, oldest first.
    pub keep: Vec<String>,
    /// Backups deleted (complete or not).
    pub delete_backups: Vec<String>,
    /// WAL files deleted (keys).
    pub delete_wal: Vec<String>,
    /// Claims of scheduled slots before the window (a past slot is never claimed again;
    /// the claims of `pgwarden.dev/backup` requests stay, as the annotation may).
    pub delete_claims: Vec<String>,
}

/// What retention `retention` deletes at `now` (pure).
pub fn plan(entries: &[Entry], wal: &[Listed], now: SystemTime, retention: Duration) -> Plan {
    let window = now.checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut complete: Vec<_> = entries.iter().filter_map(Entry::complete).collect();
    complete.sort_by_key(|i| i.end_lsn);
    // The newest that ends before the window, and everything after it.
    let first_kept = complete
        .iter()
        .rposition(|i| i.end_time <= window)
        .unwrap_or(0);
    let Some(oldest) = complete.get(first_kept) else {
        // Without a complete backup nothing is recoverable, so nothing is needed: and
        // nothing is deleted either, as the archive may be all there is.
        return Plan::default();
    };
    let keep: Vec<String> = complete[first_kept..]
        .iter()
        .map(|i| i.id.clone())
        .collect();
    let delete_backups = entries
        .iter()
        .filter(|e| !keep.contains(&e.id))
        .filter(|e| match e.complete() {
            Some(_) => true,
            // Interrupted (or still running): gone once nothing was written to it since
            // before the window, and it started before the oldest kept backup.
            None => e.id < oldest.id && e.last_modified.is_some_and(|t| t < window),
        })
        .map(|e| e.id.clone())
        .collect();
    let size = oldest.wal_segment_size;
    let start = info::segno(oldest.start_lsn, size);
    let delete_wal = wal
        .iter()
        .filter(|o| {
            let Some(name) = o.key.strip_prefix("wal/") else {
                return false;
            };
            let segment = match names::kind(name) {
                Some(Kind::Segment) => name,
                Some(Kind::Partial | Kind::Backup) => &name[..24],
                Some(Kind::History) | None => return false,
            };
            info::parse_segment(segment, size).is_some_and(|(_, segno)| segno < start)
        })
        .map(|o| o.key.clone())
        .collect();
    Plan {
        keep,
        delete_backups,
        delete_wal,
        delete_claims: Vec::new(),
    }
}

/// The slot claims (`schedule/<id>`, with a standby's WAL request `schedule/<id>.wal`) from
/// before the window.
pub fn old_claims(claims: &[Listed], now: SystemTime, retention: Duration) -> Vec<String> {
    let window = now.checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
    claims
        .iter()
        .filter(|o| {
            o.key
                .strip_prefix("schedule/")
                .map(|k| k.strip_suffix(".wal").unwrap_or(k))
                .and_then(info::parse_id)
                .is_some_and(|t| t < window)
        })
        .map(|o| o.key.clone())
        .collect()
}

/// Reads the catalog and the WAL, and deletes what [`plan`] says unless `dry_run`.
pub async fn prune(store: &Store, retention: Duration, dry_run: bool) -> Result<Plan, BackupError> {
    let entries = catalog::list(store).await?;
    let wal = store.list("wal/").await?;
    let now = SystemTime::now();
    let mut plan = plan(&entries, &wal, now, retention);
    plan.delete_claims = old_claims(&store.list("schedule/").await?, now, retention);
    if dry_run {
        return Ok(plan);
    }
    for id in &plan.delete_backups {
        // backup.info first: a backup half deleted is never listed as complete.
        store.delete(&info_key(id)).await?;
        for o in store.list(&backup_prefix(id)).await? {
            store.delete(&o.key).await?;
        }
        tracing::info!(id, "retention: backup deleted");
    }
    for key in plan.delete_wal.iter().chain(&plan.delete_claims) {
        store.delete(key).await?;
    }
    tracing::info!(
        backups = plan.delete_backups.len(),
        wal = plan.delete_wal.len(),
        kept = plan.keep.len(),
        "retention applied"
    );
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::catalog::tests::backup;
    use std::time::UNIX_EPOCH;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn wal(names: &[&str]) -> Vec<Listed> {
        names
            .iter()
            .map(|n| Listed {
                key: format!("wal/{n}"),
                size: 1,
                last_modified: at(0),
            })
            .collect()
    }

    fn incomplete(id: &str, written_s: u64) -> Entry {
        Entry {
            info: None,
            status: "incomplete",
            last_modified: Some(at(written_s)),
            ..backup(id, 1, 1)
        }
    }

    #[test]
    fn the_window_keeps_the_backup_before_it_and_the_wal_after_that() {
        let entries = vec![
            backup("a", 100, 2),
            incomplete("a2", 150),
            backup("b", 200, 5),
            backup("c", 300, 9),
            incomplete("c2", 310),
        ];
        let archive = wal(&[
            "000000010000000000000002",
            "000000010000000000000004",
            "000000010000000000000004.00000028.backup",
            "000000010000000000000005",
            "000000010000000000000005.00000028.backup",
            "00000001000000000000000A.partial",
            "00000002.history",
            "000000020000000000000003",
            "00000002000000000000000B",
        ]);
        // Window from 250: b is the start for 250..300, c for the rest.
        let p = plan(&entries, &archive, at(350), Duration::from_secs(100));
        assert_eq!(p.keep, ["b", "c"]);
        assert_eq!(p.delete_backups, ["a", "a2"]);
        assert_eq!(
            p.delete_wal,
            [
                "wal/000000010000000000000002",
                "wal/000000010000000000000004",
                "wal/000000010000000000000004.00000028.backup",
                "wal/000000020000000000000003",
            ]
        );
        // A window that starts exactly at b's end still needs b.
        let p = plan(&entries, &archive, at(300), Duration::from_secs(100));
        assert_eq!(p.keep, ["b", "c"]);
        // A window past every backup: the newest stays, and so does the running c2.
        let p = plan(&entries, &archive, at(10_000), Duration::from_secs(60));
        assert_eq!(p.keep, ["c"]);
        assert_eq!(p.delete_backups, ["a", "a2", "b"]);
        assert!(p
            .delete_wal
            .contains(&"wal/000000010000000000000005".to_string()));
        assert!(!p
            .delete_wal
            .iter()
            .any(|k| k.ends_with("0A.partial") || k.ends_with(".history")));
        // A window covering everything deletes nothing.
        let p = plan(&entries, &archive, at(350), Duration::from_secs(1000));
        assert_eq!(p.keep, ["a", "b", "c"]);
        assert!(p.delete_backups.is_empty() && p.delete_wal.is_empty());
        // Slot claims before the window go; request claims stay (at(0) is 08:00:00).
        let claims: Vec<Listed> = [
            "schedule/20270115T080000Z",
            "schedule/20270115T080000Z.wal",
            "schedule/20270115T080020Z",
            "schedule/request-0123456789abcdef",
        ]
        .iter()
        .map(|k| Listed {
            key: k.to_string(),
            size: 1,
            last_modified: at(0),
        })
        .collect();
        let p = old_claims(&claims, at(30), Duration::from_secs(15));
        assert_eq!(
            p,
            ["schedule/20270115T080000Z", "schedule/20270115T080000Z.wal"]
        );
        // No complete backup: nothing goes.
        let p = plan(
            &[incomplete("x", 0)],
            &archive,
            at(10_000),
            Duration::from_secs(1),
        );
        assert_eq!(p, Plan::default());
    }
}
