//! The backup metrics `pgwarden run` exports when backups are scheduled. The catalog's
//! figures (newest and oldest complete backup) come from the destination at every slot, on
//! every instance, so whichever instance is scraped tells the cluster's state, also after a
//! failover to an instance that never took a backup itself.

use prometheus::{Gauge, IntCounterVec, IntGauge, Opts};

use super::catalog::Entry;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct BackupMetrics {
    pub last_success: Gauge,
    pub last_failure: Gauge,
    pub first_recoverable: Gauge,
    pub complete: IntGauge,
    pub duration: Gauge,
    pub size: IntGauge,
    pub period: Gauge,
    pub backups: IntCounterVec,
    pub deleted: IntCounterVec,
}

fn seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl BackupMetrics {
    pub fn new(registry: &Metrics) -> prometheus::Result<BackupMetrics> {
        let m = BackupMetrics {
            last_success: Gauge::new(
                "pgwarden_backup_last_success_timestamp_seconds",
                "End of the newest complete backup in the destination (0: none)",
            )?,
            last_failure: Gauge::new(
                "pgwarden_backup_last_failure_timestamp_seconds",
                "When a scheduled backup by this instance last failed (0: never)",
            )?,
            first_recoverable: Gauge::new(
                "pgwarden_backup_first_recoverable_timestamp_seconds",
                "End of the oldest complete backup: the first point a restore can reach",
            )?,
            complete: IntGauge::new(
                "pgwarden_backup_complete_backups",
                "Complete backups in the destination",
            )?,
            duration: Gauge::new(
                "pgwarden_backup_last_duration_seconds",
                "Duration of this instance's last successful backup",
            )?,
            size: IntGauge::new(
                "pgwarden_backup_last_size_bytes",
                "Bytes stored by this instance's last successful backup",
            )?,
            period: Gauge::new(
                "pgwarden_backup_schedule_period_seconds",
                "Time between two slots of the backup schedule",
            )?,
            backups: IntCounterVec::new(
                Opts::new(
                    "pgwarden_backups_total",
                    "Scheduled backups taken by this instance, by result (success, failure)",
                ),
                &["result"],
            )?,
            deleted: IntCounterVec::new(
                Opts::new(
                    "pgwarden_backup_retention_deleted_total",
                    "Objects retention deleted, by kind (backup, wal)",
                ),
                &["kind"],
            )?,
        };
        // Every series exists from the start: an alert on a rate sees the first one.
        for result in ["success", "failure"] {
            m.backups.with_label_values(&[result]);
        }
        for kind in ["backup", "wal"] {
            m.deleted.with_label_values(&[kind]);
        }
        registry.register(Box::new(m.last_success.clone()))?;
        registry.register(Box::new(m.last_failure.clone()))?;
        registry.register(Box::new(m.first_recoverable.clone()))?;
        registry.register(Box::new(m.complete.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.size.clone()))?;
        registry.register(Box::new(m.period.clone()))?;
        registry.register(Box::new(m.backups.clone()))?;
        registry.register(Box::new(m.deleted.clone()))?;
        Ok(m)
    }

    /// The catalog's figures.
    pub fn catalog(&self, entries: &[Entry]) {
        let ends: Vec<f64> = entries
            .iter()
            .filter_map(Entry::complete)
            .map(|i| seconds(i.end_time))
            .collect();
        self.complete.set(ends.len() as i64);
        self.last_success
            .set(ends.iter().copied().fold(0.0, f64::max));
        self.first_recoverable
            .set(ends.iter().copied().reduce(f64::min).unwrap_or(0.0));
    }

    pub fn failed(&self) {
        self.backups.with_label_values(&["failure"]).inc();
        self.last_failure.set(seconds(std::time::SystemTime::now()));
    }
}
