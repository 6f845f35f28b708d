//! Metrics derived from the latest observation and the postmaster's status: computed at scrape
//! time from state in memory, without touching Postgres.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::health::Health;
use crate::metrics::families::Sample;
use crate::monitor::snapshot::{PgState, Role};
use crate::monitor::Observation;
use crate::supervisor::postmaster::Status;

pub struct Context<'a> {
    pub health: Health,
    pub status: &'a Status,
    pub observation: &'a Observation,
    pub postgres_up: bool,
    pub orphans_reaped: u64,
    pub postgres_version: &'a str,
}

pub fn samples(c: &Context<'_>) -> Vec<Sample> {
    let mut out = vec![
        Sample::gauge(
            "pgwarden_build_info",
            "pgwarden's version and the PostgreSQL it runs",
            1.0,
        )
        .label("version", env!("CARGO_PKG_VERSION"))
        .label("postgres_version", c.postgres_version),
        Sample::counter(
            "pgwarden_postmaster_crashes_total",
            "Unexpected postmaster exits",
            c.status.crashes as f64,
        ),
        Sample::counter(
            "pgwarden_postmaster_starts_total",
            "Postmaster starts",
            c.status.starts as f64,
        ),
        Sample::counter(
            "pgwarden_orphans_reaped_total",
            "Orphaned processes reaped by pgwarden as PID 1 or subreaper",
            c.orphans_reaped as f64,
        ),
        Sample::gauge(
            "pgwarden_postgres_up",
            "1 when Postgres answered the monitoring loop recently",
            f64::from(u8::from(c.postgres_up)),
        ),
    ];
    for h in Health::ALL {
        out.push(
            Sample::gauge(
                "pgwarden_health_state",
                "The instance's health state (1 for the current one)",
                f64::from(u8::from(h == c.health)),
            )
            .label("state", h.as_str()),
        );
    }
    if let Some(t) = c.observation.refreshed {
        out.push(Sample::gauge(
            "pgwarden_monitor_last_refresh_age_seconds",
            "Seconds since Postgres last answered the monitoring loop",
            Instant::now().saturating_duration_since(t).as_secs_f64(),
        ));
    }
    if let Some(pg) = &c.observation.pg {
        postgres(pg, &mut out);
    }
    out
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn postgres(pg: &PgState, out: &mut Vec<Sample>) {
    let now = unix_now();
    for role in [Role::Primary, Role::Replica] {
        let name = if role == Role::Primary {
            "primary"
        } else {
            "replica"
        };
        out.push(
            Sample::gauge(
                "pgwarden_postgres_role",
                "The instance's role (1 for the current one)",
                f64::from(u8::from(pg.role == role)),
            )
            .label("role", name),
        );
    }
    out.push(Sample::gauge(
        "pgwarden_postgres_start_time_seconds",
        "Unix time the postmaster started",
        pg.postmaster_start_time,
    ));
    out.push(Sample::gauge(
        "pgwarden_postgres_uptime_seconds",
        "Seconds since the postmaster started",
        (now - pg.postmaster_start_time).max(0.0),
    ));
    out.push(Sample::gauge(
        "pgwarden_postgres_timeline",
        "Current timeline",
        f64::from(pg.timeline),
    ));
    out.push(Sample::gauge(
        "pgwarden_postgres_pending_restart",
        "1 when a changed parameter waits for a restart",
        f64::from(u8::from(pg.pending_restart)),
    ));
    for (kind, lsn) in [
        ("current", pg.lsn.current),
        ("received", pg.lsn.received),
        ("replayed", pg.lsn.replayed),
    ] {
        if let Some(lsn) = lsn {
            out.push(
                Sample::gauge(
                    "pgwarden_postgres_wal_position_bytes",
                    "WAL position as a byte offset",
                    lsn.0 as f64,
                )
                .label("kind", kind),
            );
        }
    }
    if let Some(lag) = pg.standby_lag_bytes() {
        out.push(Sample::gauge(
            "pgwarden_postgres_replay_lag_bytes",
            "Standby: WAL known upstream but not yet replayed",
            lag as f64,
        ));
    }
    if let Some(delay) = pg.replay_delay_seconds {
        out.push(Sample::gauge(
            "pgwarden_postgres_replay_delay_seconds",
            "Standby: seconds since the last replayed transaction committed",
            delay.max(0.0),
        ));
    }
    out.push(Sample::gauge(
        "pgwarden_postgres_replication_standbys",
        "Standbys connected to this instance",
        pg.replication.len() as f64,
    ));
    for s in &pg.replication {
        let tag = |sample: Sample| {
            sample
                .label("application_name", s.application_name.clone())
                .label("client_addr", s.client_addr.clone())
        };
        if let Some(lag) = s.lag_bytes {
            out.push(tag(Sample::gauge(
                "pgwarden_postgres_replication_lag_bytes",
                "Bytes between this primary's position and a standby's replay position",
                lag as f64,
            )));
        }
        for (kind, secs) in [
            ("write", s.write_lag_seconds),
            ("flush", s.flush_lag_seconds),
            ("replay", s.replay_lag_seconds),
        ] {
            out.push(
                tag(Sample::gauge(
                    "pgwarden_postgres_replication_lag_seconds",
                    "A standby's write/flush/replay lag in seconds",
                    secs.unwrap_or(0.0),
                ))
                .label("kind", kind),
            );
        }
        out.push(tag(Sample::gauge(
            "pgwarden_postgres_replication_sync",
            "1 when the standby is synchronous or quorum",
            f64::from(u8::from(matches!(s.sync_state.as_str(), "sync" | "quorum"))),
        )));
    }
    for slot in &pg.slots {
        let tag = |sample: Sample| {
            sample
                .label("slot_name", slot.name.clone())
                .label("slot_type", slot.slot_type.clone())
        };
        out.push(tag(Sample::gauge(
            "pgwarden_postgres_replication_slot_active",
            "1 when a client uses the slot",
            f64::from(u8::from(slot.active)),
        )));
        if let Some(bytes) = slot.retained_bytes {
            out.push(tag(Sample::gauge(
                "pgwarden_postgres_replication_slot_retained_bytes",
                "WAL kept on disk for the slot",
                bytes as f64,
            )));
        }
    }
    let a = &pg.archiver;
    out.push(Sample::counter(
        "pgwarden_postgres_archiver_archived_total",
        "WAL files archived",
        a.archived_count as f64,
    ));
    out.push(Sample::counter(
        "pgwarden_postgres_archiver_failed_total",
        "Failed WAL archive attempts",
        a.failed_count as f64,
    ));
    if let Some(t) = a.last_archived_time {
        out.push(Sample::gauge(
            "pgwarden_postgres_archiver_last_archive_age_seconds",
            "Seconds since the last successful archive",
            (now - t).max(0.0),
        ));
    }
    if let Some(t) = a.last_failed_time {
        out.push(Sample::gauge(
            "pgwarden_postgres_archiver_last_failure_age_seconds",
            "Seconds since the last failed archive",
            (now - t).max(0.0),
        ));
    }
    out.push(Sample::gauge(
        "pgwarden_postgres_wal_ready_segments",
        "WAL segments waiting to be archived",
        a.ready_count as f64,
    ));
    out.push(Sample::gauge(
        "pgwarden_postgres_wal_oldest_ready_age_seconds",
        "Age of the oldest WAL segment waiting to be archived (0 when none)",
        a.oldest_ready_age_seconds.unwrap_or(0.0),
    ));
}
