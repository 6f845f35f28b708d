//! The catalog is the destination itself: backups are the `base/<id>/` prefixes, complete
//! when their `backup.info` is there; WAL is what `wal/` holds. Also: reading one object
//! back with its checks, and choosing the backup a recovery target starts from (pure).

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;

use super::info::{self, format_time, BackupInfo, ObjectInfo};
use super::{info_key, BackupError};
use crate::postgres::lsn::Lsn;
use crate::wal::format;
use crate::wal::store::{Listed, Store};

/// A backup as found in the destination.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub id: String,
    /// `complete`, `incomplete` (no `backup.info`: interrupted, or still running) or
    /// `invalid` (a `backup.info` that cannot be read).
    pub status: &'static str,
    /// Set when complete.
    pub info: Option<BackupInfo>,
    /// Objects stored under its prefix, and their bytes (compressed).
    pub objects: usize,
    pub stored_bytes: u64,
    #[serde(skip)]
    pub last_modified: Option<SystemTime>,
    /// Why an invalid backup is invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl Entry {
    pub fn complete(&self) -> Option<&BackupInfo> {
        self.info.as_ref()
    }
}

/// Downloads `key` and decodes it: the content, verified against the object's own header.
pub async fn fetch_object(store: &Store, key: &str) -> Result<Vec<u8>, BackupError> {
    Ok(fetch_verified(store, key).await?.1)
}

/// [`fetch_object`] with the header the content was verified against.
async fn fetch_verified(
    store: &Store,
    key: &str,
) -> Result<(format::Header, Vec<u8>), BackupError> {
    let object = store
        .get_object(key)
        .await?
        .ok_or_else(|| BackupError::Missing {
            object: key.to_string(),
        })?;
    decode(key, object).await
}

async fn decode(key: &str, object: Bytes) -> Result<(format::Header, Vec<u8>), BackupError> {
    tokio::task::spawn_blocking(move || format::decode(&object))
        .await
        .map_err(|e| BackupError::Internal(format!("verifying {key}: {e}")))?
        .map_err(|e| BackupError::Corrupt {
            object: key.to_string(),
            error: e.to_string(),
        })
}

/// [`fetch_object`], also checked against what `backup.info` recorded of it. The content was
/// hashed once, off the runtime's thread, and found equal to its header: comparing the header
/// with `backup.info` needs no second pass over it.
pub async fn fetch_part(store: &Store, part: &ObjectInfo) -> Result<Vec<u8>, BackupError> {
    let (header, content) = fetch_verified(store, &part.key).await?;
    let sha = format::hex(&header.sha256);
    if header.length != part.length || sha != part.sha256 {
        return Err(BackupError::Corrupt {
            object: part.key.clone(),
            error: format!(
                "holds {} bytes with sha256 {sha}; backup.info says {} bytes with sha256 {}",
                content.len(),
                part.length,
                part.sha256
            ),
        });
    }
    Ok(content)
}

/// Every backup in the destination, oldest first.
pub async fn list(store: &Store) -> Result<Vec<Entry>, BackupError> {
    let mut by_id: BTreeMap<String, Vec<Listed>> = BTreeMap::new();
    for o in store.list("base/").await? {
        if let Some(id) = o
            .key
            .strip_prefix("base/")
            .and_then(|k| k.split('/').next())
        {
            by_id.entry(id.to_string()).or_default().push(o);
        }
    }
    let mut out = Vec::with_capacity(by_id.len());
    for (id, objects) in by_id {
        let has_info = objects.iter().any(|o| o.key == info_key(&id));
        let (info, problem) = if has_info {
            match read_info(store, &id).await {
                Ok(i) => (Some(i), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        let status = match (&info, &problem) {
            (Some(_), _) => "complete",
            (None, Some(_)) => "invalid",
            (None, None) => "incomplete",
        };
        out.push(Entry {
            status,
            info,
            objects: objects.len(),
            stored_bytes: objects.iter().map(|o| o.size).sum(),
            last_modified: objects.iter().map(|o| o.last_modified).max(),
            problem,
            id,
        });
    }
    Ok(out)
}

/// Reads and checks `backup.info` of `id`.
pub async fn read_info(store: &Store, id: &str) -> Result<BackupInfo, BackupError> {
    let key = info_key(id);
    let text = fetch_object(store, &key).await?;
    let info: BackupInfo = serde_json::from_slice(&text).map_err(|e| BackupError::Corrupt {
        object: key.clone(),
        error: e.to_string(),
    })?;
    if info.format != info::INFO_FORMAT || info.id != id {
        return Err(BackupError::Corrupt {
            object: key,
            error: format!(
                "format {} of backup {:?}; expected format {} of {id}",
                info.format,
                info.id,
                info::INFO_FORMAT
            ),
        });
    }
    Ok(info)
}

/// The archived WAL segments, by (segment number, timeline).
#[derive(Debug, Default)]
pub struct WalIndex {
    pub segment_size: u64,
    pub segments: BTreeMap<(u64, u32), Listed>,
}

impl WalIndex {
    pub async fn load(store: &Store, segment_size: u64) -> Result<WalIndex, BackupError> {
        Ok(WalIndex::from_listing(
            store.list("wal/").await?,
            segment_size,
        ))
    }

    pub fn from_listing(listing: Vec<Listed>, segment_size: u64) -> WalIndex {
        let segments = listing
            .into_iter()
            .filter_map(|o| {
                let name = o.key.strip_prefix("wal/")?;
                let (tli, segno) = info::parse_segment(name, segment_size)?;
                Some(((segno, tli), o))
            })
            .collect();
        WalIndex {
            segment_size,
            segments,
        }
    }

    /// The newest segment: (its name, where its WAL ends, when it was archived).
    pub fn newest(&self) -> Option<(String, Lsn, SystemTime)> {
        let (&(segno, tli), o) = self.segments.iter().next_back()?;
        Some((
            info::segment_name(tli, segno, self.segment_size),
            Lsn((segno + 1) * self.segment_size),
            o.last_modified,
        ))
    }

    /// The first segment from `from` through `to` that the archive has on no timeline from
    /// `timeline` on: the name it would have on `timeline`.
    pub fn first_gap(&self, timeline: u32, from: u64, to: u64) -> Option<String> {
        (from..=to)
            .find(|&segno| {
                self.segments
                    .range((segno, timeline)..=(segno, u32::MAX))
                    .next()
                    .is_none()
            })
            .map(|segno| info::segment_name(timeline, segno, self.segment_size))
    }
}

/// Where a recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The end of the archived WAL.
    Latest,
    /// The end of the backup: the first consistent moment.
    Immediate,
    Time(SystemTime),
    Lsn(Lsn),
    /// A restore point made with `pg_create_restore_point`.
    Name(String),
    /// The commit of this transaction (`txid_current()`), included.
    Xid(u64),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Latest => write!(f, "latest"),
            Target::Immediate => write!(f, "immediate"),
            Target::Time(t) => write!(f, "time {}", format_time(*t)),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Name(n) => write!(f, "restore point {n:?}"),
            Target::Xid(x) => write!(f, "transaction {x}"),
        }
    }
}

/// The backups to try, in order: `id` alone when given; for a restore point's name or a
/// transaction id, which no catalog entry can place in time, every complete backup from the
/// newest to the oldest (a restore that ends before reaching the target tries the next);
/// otherwise the newest complete backup that ends before the target.
pub fn candidates<'a>(
    entries: &'a [Entry],
    id: Option<&str>,
    target: &Target,
    destination: &str,
) -> Result<Vec<&'a BackupInfo>, BackupError> {
    let first = choose(entries, id, target, destination)?;
    if id.is_some() || !matches!(target, Target::Name(_) | Target::Xid(_)) {
        return Ok(vec![first]);
    }
    let mut complete: Vec<&BackupInfo> = entries.iter().filter_map(Entry::complete).collect();
    complete.sort_by_key(|i| std::cmp::Reverse(i.end_lsn));
    Ok(complete)
}

/// The backup to start from: `id` when given (it must be able to reach the target), else
/// the newest complete backup that ends before the target.
pub fn choose<'a>(
    entries: &'a [Entry],
    id: Option<&str>,
    target: &Target,
    destination: &str,
) -> Result<&'a BackupInfo, BackupError> {
    let mut complete: Vec<&BackupInfo> = entries.iter().filter_map(Entry::complete).collect();
    complete.sort_by_key(|i| i.end_lsn);
    let reaches = |i: &BackupInfo| match target {
        Target::Time(t) => i.end_time <= *t,
        Target::Lsn(l) => i.end_lsn <= *l,
        _ => true,
    };
    if let Some(id) = id {
        let Some(i) = complete.iter().find(|i| i.id == id) else {
            return Err(BackupError::UnknownBackup {
                id: id.to_string(),
                destination: destination.to_string(),
            });
        };
        if !reaches(i) {
            return Err(BackupError::Target(format!(
                "backup {id} ends at {} ({}), after the target {target}: choose an older \
                 backup or a later target",
                format_time(i.end_time),
                i.end_lsn
            )));
        }
        return Ok(i);
    }
    let Some(oldest) = complete.first() else {
        return Err(BackupError::NoBackups(destination.to_string()));
    };
    complete
        .iter()
        .rev()
        .find(|i| reaches(i))
        .copied()
        .ok_or_else(|| {
            BackupError::Target(format!(
                "the target {target} is before the end of the oldest backup, {} (ends at {}, \
                 {}): no backup in {destination} can reach it",
                oldest.id,
                format_time(oldest.end_time),
                oldest.end_lsn
            ))
        })
}

/// Refuses a target past the archived WAL, and a gap in the WAL the recovery needs (from
/// the backup's start to the target's segment, or to the newest segment).
pub fn check_wal(backup: &BackupInfo, wal: &WalIndex, target: &Target) -> Result<(), BackupError> {
    let Some((newest, end, archived_at)) = wal.newest() else {
        return Err(BackupError::Missing {
            object: format!("wal/{}", backup.first_wal),
        });
    };
    let late = |what: String| {
        BackupError::Target(format!(
            "the target {target} is after the newest archived WAL: {newest} {what}"
        ))
    };
    match target {
        Target::Time(t) if *t > archived_at => {
            return Err(late(format!(
                "was archived at {}",
                format_time(archived_at)
            )))
        }
        // Reaching an LSN means reading the record there: in the segment that holds it.
        Target::Lsn(l) if *l >= end => return Err(late(format!("ends at {end}"))),
        _ => {}
    }
    let size = backup.wal_segment_size;
    let first = info::segno(backup.start_lsn, size);
    let last = match target {
        Target::Lsn(l) => info::segno(*l, size),
        Target::Immediate => info::wal_range(backup.start_lsn, backup.end_lsn, size).1,
        _ => info::segno(Lsn(end.0 - 1), size),
    };
    match wal.first_gap(backup.timeline, first, last) {
        Some(name) => Err(BackupError::Missing {
            object: format!("wal/{name}"),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wal::format::Compression;
    use std::time::{Duration, UNIX_EPOCH};

    const SEG: u64 = 16 << 20;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    pub(crate) fn backup(id: &str, end_s: u64, start_seg: u64) -> Entry {
        let object = |key: &str| ObjectInfo {
            key: key.into(),
            length: 1,
            sha256: String::new(),
        };
        let start_lsn = Lsn(start_seg * SEG + 0x28);
        let info = BackupInfo {
            format: info::INFO_FORMAT,
            id: id.into(),
            source: "pg-0".into(),
            standby: false,
            system_identifier: "1".into(),
            server_version: "15".into(),
            timeline: 1,
            start_lsn,
            end_lsn: Lsn(start_lsn.0 + 0x100),
            start_time: at(end_s - 1),
            end_time: at(end_s),
            wal_segment_size: SEG,
            compression: Compression::Zstd,
            files: 1,
            bytes: 1,
            stored_bytes: 1,
            parts: vec![object("p")],
            manifest: object("m"),
            first_wal: info::segment_name(1, start_seg, SEG),
            last_wal: info::segment_name(1, start_seg, SEG),
        };
        Entry {
            id: id.into(),
            status: "complete",
            info: Some(info),
            objects: 3,
            stored_bytes: 3,
            last_modified: Some(at(end_s)),
            problem: None,
        }
    }

    fn wal(segments: &[(u32, u64, u64)]) -> WalIndex {
        WalIndex::from_listing(
            segments
                .iter()
                .map(|&(tli, segno, archived_s)| Listed {
                    key: format!("wal/{}", info::segment_name(tli, segno, SEG)),
                    size: 100,
                    last_modified: at(archived_s),
                })
                .chain([Listed {
                    key: "wal/00000002.history".into(),
                    size: 40,
                    last_modified: at(0),
                }])
                .collect(),
            SEG,
        )
    }

    #[test]
    fn the_newest_backup_that_ends_before_the_target_is_chosen() {
        let entries = vec![
            backup("a", 100, 2),
            backup("b", 200, 5),
            backup("c", 300, 9),
        ];
        let pick = |t: &Target| choose(&entries, None, t, "file:///x").map(|i| i.id.clone());
        assert_eq!(pick(&Target::Latest).unwrap(), "c");
        assert_eq!(pick(&Target::Immediate).unwrap(), "c");
        assert_eq!(pick(&Target::Time(at(250))).unwrap(), "b");
        assert_eq!(pick(&Target::Time(at(200))).unwrap(), "b");
        assert_eq!(pick(&Target::Lsn(Lsn(9 * SEG))).unwrap(), "b");
        let early = pick(&Target::Time(at(99))).unwrap_err().to_string();
        assert!(
            early.contains("before the end of the oldest backup, a"),
            "{early}"
        );
        // A chosen backup must reach the target.
        let given = choose(&entries, Some("c"), &Target::Time(at(250)), "u");
        assert!(given.unwrap_err().to_string().contains("backup c ends at"));
        assert!(matches!(
            choose(&entries, Some("zz"), &Target::Latest, "u"),
            Err(BackupError::UnknownBackup { .. })
        ));
        assert!(matches!(
            choose(&[], None, &Target::Latest, "u"),
            Err(BackupError::NoBackups(_))
        ));
    }

    #[test]
    fn names_and_transactions_try_every_backup_newest_first() {
        let entries = vec![
            backup("a", 100, 2),
            backup("c", 300, 9),
            backup("b", 200, 5),
        ];
        let ids = |id: Option<&str>, t: &Target| {
            candidates(&entries, id, t, "u")
                .unwrap()
                .iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(None, &Target::Name("before-b".into())), ["c", "b", "a"]);
        assert_eq!(ids(None, &Target::Xid(42)), ["c", "b", "a"]);
        // Targets the catalog can place, and a chosen backup, give one candidate.
        assert_eq!(ids(None, &Target::Time(at(250))), ["b"]);
        assert_eq!(ids(None, &Target::Latest), ["c"]);
        assert_eq!(ids(Some("b"), &Target::Name("x".into())), ["b"]);
        assert!(matches!(
            candidates(&[], None, &Target::Name("x".into()), "u"),
            Err(BackupError::NoBackups(_))
        ));
    }

    #[test]
    fn wal_past_the_archive_or_with_a_gap_is_refused() {
        let b = backup("b", 200, 5);
        let b = b.info.as_ref().unwrap();
        let full = wal(&[(1, 5, 201), (1, 6, 210), (1, 7, 220), (2, 8, 230)]);
        assert!(check_wal(b, &full, &Target::Latest).is_ok());
        assert!(check_wal(b, &full, &Target::Time(at(229))).is_ok());
        let late = check_wal(b, &full, &Target::Time(at(231)))
            .unwrap_err()
            .to_string();
        assert!(
            late.contains("000000020000000000000008 was archived at"),
            "{late}"
        );
        assert!(check_wal(b, &full, &Target::Lsn(Lsn(9 * SEG - 1))).is_ok());
        let late = check_wal(b, &full, &Target::Lsn(Lsn(9 * SEG))).unwrap_err();
        assert!(late.to_string().contains("ends at 0/9000000"), "{late}");

        let gap = wal(&[(1, 5, 201), (1, 7, 220)]);
        let err = check_wal(b, &gap, &Target::Latest).unwrap_err();
        assert_eq!(
            err.to_string(),
            "wal/000000010000000000000006 is missing from the archive"
        );
        // The end of the backup needs only its own segments.
        assert!(check_wal(b, &gap, &Target::Immediate).is_ok());
        assert!(matches!(
            check_wal(b, &wal(&[]), &Target::Latest),
            Err(BackupError::Missing { .. })
        ));
    }
}
