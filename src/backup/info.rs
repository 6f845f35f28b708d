//! What the catalog records about a backup: `backup.info`, written last, and what pgwarden
//! reads from PostgreSQL's `backup_manifest`. Pure: no I/O here.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::postgres::lsn::Lsn;
use crate::wal::format::Compression;

/// Version of the `backup.info` document.
pub const INFO_FORMAT: u32 = 1;

/// One stored object of a backup, with the checksum of its content (the object's header
/// carries the same one; the two must agree).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// Key below the destination, e.g. `base/20261201T110600Z/base.tar.00000`.
    pub key: String,
    /// Uncompressed bytes.
    pub length: u64,
    /// SHA-256 of the uncompressed content, hex.
    pub sha256: String,
}

/// `base/<id>/backup.info`: its presence is what makes a backup complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub format: u32,
    pub id: String,
    /// The instance it was taken from (`instance_name`).
    pub source: String,
    /// Taken from a standby.
    #[serde(default)]
    pub standby: bool,
    /// `pg_control_system().system_identifier`: which database's history this is.
    pub system_identifier: String,
    pub server_version: String,
    pub timeline: u32,
    #[serde(with = "lsn_text")]
    pub start_lsn: Lsn,
    #[serde(with = "lsn_text")]
    pub end_lsn: Lsn,
    #[serde(with = "humantime_serde")]
    pub start_time: SystemTime,
    /// When pg_basebackup returned: the backup is consistent at a moment before this.
    #[serde(with = "humantime_serde")]
    pub end_time: SystemTime,
    pub wal_segment_size: u64,
    pub compression: Compression,
    /// The data directory's files (from the manifest).
    pub files: u64,
    /// Uncompressed bytes of the tar stream.
    pub bytes: u64,
    /// Bytes stored, after compression.
    pub stored_bytes: u64,
    /// The tar stream, in order.
    pub parts: Vec<ObjectInfo>,
    pub manifest: ObjectInfo,
    /// The WAL files replay needs to reach consistency, first to last.
    pub first_wal: String,
    pub last_wal: String,
}

mod lsn_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::postgres::lsn::Lsn;

    pub fn serialize<S: Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(lsn)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What pgwarden needs from `backup_manifest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSummary {
    pub files: u64,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "Files")]
    files: Vec<serde::de::IgnoredAny>,
    #[serde(rename = "WAL-Ranges")]
    wal_ranges: Vec<WalRange>,
}

#[derive(Deserialize)]
struct WalRange {
    #[serde(rename = "Timeline")]
    timeline: u32,
    #[serde(rename = "Start-LSN")]
    start: String,
    #[serde(rename = "End-LSN")]
    end: String,
}

/// Reads the file count and the WAL range of a backup manifest. A backup taken from a
/// standby that was promoted meanwhile has more than one range; pgwarden refuses it (its WAL
/// would have to be followed across the switch), as PostgreSQL does not produce one when the
/// backup is taken from a primary.
pub fn summarize_manifest(text: &[u8]) -> Result<ManifestSummary, String> {
    let m: Manifest = serde_json::from_slice(text)
        .map_err(|e| format!("backup_manifest is not a PostgreSQL backup manifest: {e}"))?;
    let [range] = m.wal_ranges.as_slice() else {
        return Err(format!(
            "backup_manifest has {} WAL ranges; one was expected (did the source switch \
             timelines during the backup?)",
            m.wal_ranges.len()
        ));
    };
    Ok(ManifestSummary {
        files: m.files.len() as u64,
        timeline: range.timeline,
        start_lsn: range.start.parse()?,
        end_lsn: range.end.parse()?,
    })
}

/// Segment number of `lsn`.
pub fn segno(lsn: Lsn, segment_size: u64) -> u64 {
    lsn.0 / segment_size
}

/// The WAL file name of segment `segno` on `timeline`.
pub fn segment_name(timeline: u32, segno: u64, segment_size: u64) -> String {
    let per_log = 0x1_0000_0000u64 / segment_size;
    format!(
        "{timeline:08X}{:08X}{:08X}",
        segno / per_log,
        segno % per_log
    )
}

/// (timeline, segment number) of a segment file name; `None` for anything else.
pub fn parse_segment(name: &str, segment_size: u64) -> Option<(u32, u64)> {
    if crate::wal::names::kind(name) != Some(crate::wal::names::Kind::Segment) {
        return None;
    }
    let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some((tli, log * (0x1_0000_0000u64 / segment_size) + seg))
}

/// The segments a backup needs: the one holding its start through the one holding the last
/// byte before its end (the one PostgreSQL waits for at the end of a backup).
pub fn wal_range(start: Lsn, end: Lsn, segment_size: u64) -> (u64, u64) {
    let first = segno(start, segment_size);
    let last = segno(Lsn(end.0.saturating_sub(1)), segment_size).max(first);
    (first, last)
}

/// A backup id from its start: `20261201T110600Z` (UTC, sorts by time).
pub fn backup_id(at: SystemTime) -> String {
    humantime_serde::re::humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace(['-', ':'], "")
}

/// The start time a backup id (or a slot's) stands for.
pub fn parse_id(id: &str) -> Option<SystemTime> {
    let b = id.as_bytes();
    if id.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let text = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &id[0..4],
        &id[4..6],
        &id[6..8],
        &id[9..11],
        &id[11..13],
        &id[13..15]
    );
    humantime_serde::re::humantime::parse_rfc3339(&text).ok()
}

/// RFC 3339 in UTC with milliseconds, for people and for PostgreSQL's `timestamptz` input.
pub fn format_time(t: SystemTime) -> String {
    humantime_serde::re::humantime::format_rfc3339_millis(t).to_string()
}

/// Parses `2026-12-01T11:06:00Z` or `2026-12-01 11:06:00.123` (UTC).
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    humantime_serde::re::humantime::parse_rfc3339_weak(s.trim().trim_end_matches('Z'))
        .map_err(|e| format!("{s:?} is not a UTC time such as 2026-12-01T11:06:00Z: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    const SEG: u64 = 16 << 20;

    #[test]
    fn manifest_summary() {
        let text = br#"{ "PostgreSQL-Backup-Manifest-Version": 1,
"Files": [
{ "Path": "backup_label", "Size": 225, "Last-Modified": "2026-12-01 11:06:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "c7a6d2b1" },
{ "Path": "PG_VERSION", "Size": 3, "Last-Modified": "2026-12-01 11:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "64440205" }
],
"WAL-Ranges": [
{ "Timeline": 2, "Start-LSN": "0/5000028", "End-LSN": "0/6000100" }
],
"Manifest-Checksum": "00" }"#;
        let m = summarize_manifest(text).unwrap();
        assert_eq!(
            m,
            ManifestSummary {
                files: 2,
                timeline: 2,
                start_lsn: "0/5000028".parse().unwrap(),
                end_lsn: "0/6000100".parse().unwrap(),
            }
        );
        let two = br#"{"Files": [], "WAL-Ranges": [
            {"Timeline": 1, "Start-LSN": "0/1", "End-LSN": "0/2"},
            {"Timeline": 2, "Start-LSN": "0/2", "End-LSN": "0/3"}]}"#;
        assert!(summarize_manifest(two)
            .unwrap_err()
            .contains("2 WAL ranges"));
        assert!(summarize_manifest(b"not json").is_err());
    }

    #[test]
    fn segments_of_a_backup() {
        // Ends exactly on a segment boundary: the last segment is the one before.
        let (first, last) = wal_range(Lsn(0x5000028), Lsn(0x7000000), SEG);
        assert_eq!((first, last), (5, 6));
        assert_eq!(segment_name(2, first, SEG), "000000020000000000000005");
        let (first, last) = wal_range(Lsn(0x1_FF00_0028), Lsn(0x2_0100_0000), SEG);
        assert_eq!(segment_name(1, first, SEG), "0000000100000001000000FF");
        assert_eq!(segment_name(1, last, SEG), "000000010000000200000000");
        assert_eq!(
            parse_segment("0000000100000001000000FF", SEG),
            Some((1, first))
        );
        assert_eq!(parse_segment("00000002.history", SEG), None);
    }

    #[test]
    fn ids_and_times() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_950_360_250);
        assert_eq!(backup_id(t), "20261129T110600Z");
        assert_eq!(
            parse_id("20261129T110600Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_795_950_360))
        );
        assert_eq!(parse_id("request-0123456789ab"), None);
        assert_eq!(parse_id("2026112XT110600Z"), None);
        assert_eq!(format_time(t), "2026-11-29T11:06:00.250Z");
        assert_eq!(parse_time("2026-11-29T11:06:00.250Z").unwrap(), t);
        assert_eq!(parse_time("2026-11-29 11:06:00.250").unwrap(), t);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn info_round_trips_through_json() {
        let object = |key: &str| ObjectInfo {
            key: key.into(),
            length: 10,
            sha256: "ab".into(),
        };
        let info = BackupInfo {
            format: INFO_FORMAT,
            id: "20261129T110600Z".into(),
            source: "pg-0".into(),
            standby: false,
            system_identifier: "7311".into(),
            server_version: "15.8".into(),
            timeline: 1,
            start_lsn: Lsn(0x5000028),
            end_lsn: Lsn(0x5000100),
            start_time: UNIX_EPOCH + Duration::from_secs(1_795_950_360),
            end_time: UNIX_EPOCH + Duration::from_secs(1_795_950_362),
            wal_segment_size: SEG,
            compression: Compression::Zstd,
            files: 900,
            bytes: 40 << 20,
            stored_bytes: 5 << 20,
            parts: vec![object("base/x/base.tar.00000")],
            manifest: object("base/x/backup_manifest"),
            first_wal: "000000010000000000000005".into(),
            last_wal: "000000010000000000000005".into(),
        };
        let text = serde_json::to_string(&info).unwrap();
        assert!(text.contains(r#""start_lsn":"0/5000028""#), "{text}");
        assert_eq!(serde_json::from_str::<BackupInfo>(&text).unwrap(), info);
    }
}
