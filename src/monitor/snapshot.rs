//! The instance's live state, read by the monitoring loop on every interval. Probes and
//! `/pg/status` answer from the last snapshot; they never query Postgres themselves.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio_postgres::{Client, Row};

use crate::postgres::lsn::Lsn;

const INSTANCE: &str = "
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery()
            -- A standby's newest timeline: its WAL receiver's, the last restartpoint's (which
            -- lags), or the newest history file it holds (received before it follows a
            -- timeline switch): without a receiver, as during a failover, the restartpoint
            -- alone would understate it.
            THEN greatest((SELECT received_tli FROM pg_stat_wal_receiver),
                          (SELECT timeline_id FROM pg_control_checkpoint()),
                          (SELECT max(('x' || substr(name, 1, 8))::bit(32)::int)
                             FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{8}[.]history$'))
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END,
       (SELECT system_identifier FROM pg_control_system())::text,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
       pg_last_wal_receive_lsn()::text,
       pg_last_wal_replay_lsn()::text,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8,
       extract(epoch FROM pg_postmaster_start_time())::float8,
       (SELECT count(*) FROM pg_settings WHERE pending_restart) > 0,
       current_setting('server_version'),
       (SELECT latest_end_lsn::text FROM pg_stat_wal_receiver),
       (SELECT status FROM pg_stat_wal_receiver),
       (SELECT sender_host FROM pg_stat_wal_receiver)";

const REPLICATION: &str = "
SELECT application_name, coalesce(client_addr::text, 'local'), state, sync_state,
       write_lsn::text, flush_lsn::text, replay_lsn::text,
       extract(epoch FROM write_lag)::float8, extract(epoch FROM flush_lag)::float8,
       extract(epoch FROM replay_lag)::float8
FROM pg_stat_replication ORDER BY application_name, client_addr";

const SLOTS: &str = "
SELECT slot_name::text, slot_type, active, restart_lsn::text, wal_status
FROM pg_replication_slots ORDER BY slot_name";

const ARCHIVER: &str = "
SELECT archived_count, last_archived_wal, extract(epoch FROM last_archived_time)::float8,
       failed_count, last_failed_wal, extract(epoch FROM last_failed_time)::float8
FROM pg_stat_archiver";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct PgState {
    pub role: Role,
    pub server_version: String,
    pub timeline: u32,
    pub system_identifier: String,
    /// Unix time the postmaster started.
    pub postmaster_start_time: f64,
    pub pending_restart: bool,
    pub lsn: Lsns,
    /// Standby only: seconds since the last replayed transaction committed on the primary.
    pub replay_delay_seconds: Option<f64>,
    /// Standby only: the WAL receiver, when it runs.
    pub wal_receiver: Option<WalReceiver>,
    pub replication: Vec<Standby>,
    pub slots: Vec<Slot>,
    pub archiver: Archiver,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Lsns {
    /// Primary only: the current write position.
    pub current: Option<Lsn>,
    /// Standby only: last position received and flushed by the WAL receiver.
    pub received: Option<Lsn>,
    /// Standby only: last position replayed.
    pub replayed: Option<Lsn>,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct WalReceiver {
    pub status: String,
    pub sender_host: Option<String>,
    /// Last position the primary reported to this standby.
    pub upstream_lsn: Option<Lsn>,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Standby {
    pub application_name: String,
    pub client_addr: String,
    pub state: String,
    pub sync_state: String,
    pub write_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// Bytes between the primary's current position and the standby's replay position.
    pub lag_bytes: Option<u64>,
    pub write_lag_seconds: Option<f64>,
    pub flush_lag_seconds: Option<f64>,
    pub replay_lag_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Slot {
    pub name: String,
    pub slot_type: String,
    pub active: bool,
    pub restart_lsn: Option<Lsn>,
    /// WAL kept on disk for this slot.
    pub retained_bytes: Option<u64>,
    pub wal_status: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct Archiver {
    pub archived_count: i64,
    pub last_archived_wal: Option<String>,
    /// Unix time.
    pub last_archived_time: Option<f64>,
    pub failed_count: i64,
    pub last_failed_wal: Option<String>,
    pub last_failed_time: Option<f64>,
    /// Segments waiting to be archived (`.ready` files in `pg_wal/archive_status`).
    pub ready_count: u64,
    /// Age of the oldest waiting segment.
    pub oldest_ready_age_seconds: Option<f64>,
}

impl PgState {
    /// How far replay is behind what this standby knows exists upstream.
    pub fn standby_lag_bytes(&self) -> Option<u64> {
        let replayed = self.lsn.replayed?;
        let upstream = [
            self.lsn.received,
            self.wal_receiver.as_ref().and_then(|w| w.upstream_lsn),
        ]
        .into_iter()
        .flatten()
        .max()?;
        Some(upstream.bytes_after(replayed))
    }
}

fn lsn(row: &Row, i: usize) -> Result<Option<Lsn>, String> {
    row.try_get::<_, Option<String>>(i)
        .map_err(|e| e.to_string())?
        .map(|s| s.parse())
        .transpose()
}

/// Reads the snapshot over `client` (pipelined: one round trip's worth of waiting).
pub async fn read(client: &Client, data_dir: &Path) -> Result<PgState, String> {
    let e = |e: tokio_postgres::Error| e.to_string();
    let (inst, repl, slots, arch) = tokio::try_join!(
        client.query_one(INSTANCE, &[]),
        client.query(REPLICATION, &[]),
        client.query(SLOTS, &[]),
        client.query_one(ARCHIVER, &[]),
    )
    .map_err(e)?;
    let in_recovery: bool = inst.try_get(0).map_err(e)?;
    let current = lsn(&inst, 3)?;
    let received = lsn(&inst, 4)?;
    let replayed = lsn(&inst, 5)?;
    // The newest position this instance has: current on a primary, received or replayed on a
    // standby; slots retain WAL from their restart position up to it.
    let head = current.or(received.max(replayed));
    let wal_receiver = match inst.try_get::<_, Option<String>>(11).map_err(e)? {
        Some(status) => Some(WalReceiver {
            status,
            sender_host: inst.try_get(12).map_err(e)?,
            upstream_lsn: lsn(&inst, 10)?,
        }),
        None => None,
    };
    let mut replication = Vec::with_capacity(repl.len());
    for r in &repl {
        let replay_lsn = lsn(r, 6)?;
        replication.push(Standby {
            application_name: r.try_get(0).map_err(e)?,
            client_addr: r.try_get(1).map_err(e)?,
            state: r
                .try_get::<_, Option<String>>(2)
                .map_err(e)?
                .unwrap_or_default(),
            sync_state: r
                .try_get::<_, Option<String>>(3)
                .map_err(e)?
                .unwrap_or_default(),
            write_lsn: lsn(r, 4)?,
            flush_lsn: lsn(r, 5)?,
            replay_lsn,
            lag_bytes: current.zip(replay_lsn).map(|(c, r)| c.bytes_after(r)),
            write_lag_seconds: r.try_get(7).map_err(e)?,
            flush_lag_seconds: r.try_get(8).map_err(e)?,
            replay_lag_seconds: r.try_get(9).map_err(e)?,
        });
    }
    let mut slot_list = Vec::with_capacity(slots.len());
    for r in &slots {
        let restart_lsn = lsn(r, 3)?;
        slot_list.push(Slot {
            name: r.try_get(0).map_err(e)?,
            slot_type: r.try_get(1).map_err(e)?,
            active: r.try_get(2).map_err(e)?,
            restart_lsn,
            retained_bytes: head.zip(restart_lsn).map(|(h, r)| h.bytes_after(r)),
            wal_status: r.try_get(4).map_err(e)?,
        });
    }
    let dir = data_dir.join("pg_wal/archive_status");
    let (ready_count, oldest) = tokio::task::spawn_blocking(move || ready_segments(&dir))
        .await
        .unwrap_or((0, None));
    Ok(PgState {
        role: if in_recovery {
            Role::Replica
        } else {
            Role::Primary
        },
        server_version: inst.try_get(9).map_err(e)?,
        timeline: inst.try_get::<_, i32>(1).map_err(e)?.max(0) as u32,
        system_identifier: inst.try_get(2).map_err(e)?,
        postmaster_start_time: inst.try_get(7).map_err(e)?,
        pending_restart: inst.try_get(8).map_err(e)?,
        lsn: Lsns {
            current,
            received,
            replayed,
        },
        replay_delay_seconds: inst.try_get(6).map_err(e)?,
        wal_receiver,
        replication,
        slots: slot_list,
        archiver: Archiver {
            archived_count: arch.try_get(0).map_err(e)?,
            last_archived_wal: arch.try_get(1).map_err(e)?,
            last_archived_time: arch.try_get(2).map_err(e)?,
            failed_count: arch.try_get(3).map_err(e)?,
            last_failed_wal: arch.try_get(4).map_err(e)?,
            last_failed_time: arch.try_get(5).map_err(e)?,
            ready_count,
            oldest_ready_age_seconds: oldest.map(|d| d.as_secs_f64()),
        },
    })
}

/// Counts `.ready` files and the age of the oldest one.
pub fn ready_segments(dir: &Path) -> (u64, Option<Duration>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, None);
    };
    let now = SystemTime::now();
    let mut count = 0;
    let mut oldest: Option<Duration> = None;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().ends_with(".ready") {
            continue;
        }
        count += 1;
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok());
        if let Some(age) = age {
            oldest = Some(oldest.map_or(age, |o| o.max(age)));
        }
    }
    (count, oldest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ready_files_only() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(ready_segments(&d.path().join("missing")), (0, None));
        for f in [
            "000000010000000000000001.ready",
            "000000010000000000000002.ready",
            "000000010000000000000000.done",
        ] {
            std::fs::write(d.path().join(f), "").unwrap();
        }
        let (n, oldest) = ready_segments(d.path());
        assert_eq!(n, 2);
        assert!(oldest.is_some());
    }
}
