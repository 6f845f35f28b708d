//! What the WAL daemon knows and counts: its metrics, its state, and the `wal` part of
//! `/pg/status`.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{exponential_buckets, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
use serde::Serialize;

use super::Settings;
use crate::metrics::families::Sample;
use crate::metrics::Metrics;

/// pgwarden's own WAL counters and histogram (registered only when the daemon runs).
#[derive(Clone)]
pub struct WalMetrics {
    pub archived: IntCounter,
    pub archived_bytes: IntCounter,
    pub uploaded_bytes: IntCounter,
    pub failures: IntCounterVec,
    pub upload_seconds: Histogram,
    pub restored: IntCounter,
    pub restore_failures: IntCounterVec,
    pub prefetch_hits: IntCounter,
}

impl WalMetrics {
    pub fn new(registry: &Metrics) -> prometheus::Result<WalMetrics> {
        let m = WalMetrics {
            archived: IntCounter::new(
                "pgwarden_wal_archived_segments_total",
                "WAL files confirmed in the archive by pgwarden (uploaded, or found identical)",
            )?,
            archived_bytes: IntCounter::new(
                "pgwarden_wal_archived_bytes_total",
                "Uncompressed bytes of the WAL files uploaded",
            )?,
            uploaded_bytes: IntCounter::new(
                "pgwarden_wal_uploaded_bytes_total",
                "Bytes sent to the archive (after compression)",
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "pgwarden_wal_archive_failures_total",
                    "Failed archive attempts, by reason (error, conflict)",
                ),
                &["reason"],
            )?,
            upload_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "pgwarden_wal_upload_duration_seconds",
                    "Time to archive one WAL file: read, compress, check, upload",
                )
                .buckets(exponential_buckets(0.005, 2.0, 14)?),
            )?,
            restored: IntCounter::new(
                "pgwarden_wal_restored_segments_total",
                "WAL files handed to Postgres from the archive",
            )?,
            restore_failures: IntCounterVec::new(
                Opts::new(
                    "pgwarden_wal_restore_failures_total",
                    "Failed restores, by reason (error, corrupt)",
                ),
                &["reason"],
            )?,
            prefetch_hits: IntCounter::new(
                "pgwarden_wal_prefetch_hits_total",
                "Restores answered by a prefetch (spooled, or already downloading)",
            )?,
        };
        registry.register(Box::new(m.archived.clone()))?;
        registry.register(Box::new(m.archived_bytes.clone()))?;
        registry.register(Box::new(m.uploaded_bytes.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.upload_seconds.clone()))?;
        registry.register(Box::new(m.restored.clone()))?;
        registry.register(Box::new(m.restore_failures.clone()))?;
        registry.register(Box::new(m.prefetch_hits.clone()))?;
        Ok(m)
    }
}

/// What the daemon knows, for `/pg/status`, metrics and the condition.
#[derive(Debug, Clone, Default)]
pub struct WalState {
    pub settings: Option<Arc<Settings>>,
    /// Files waiting for an upload (or a retry) by pgwarden.
    pub queued: u64,
    pub in_flight: u64,
    pub archived: u64,
    pub failures: u64,
    pub conflicts: u64,
    pub last_archived: Option<(String, Instant)>,
    /// Files whose last attempt failed, with the error of the oldest one.
    pub failing: u64,
    pub last_error: Option<(String, String, Instant)>,
    /// Set while a refused (different content) file is waiting.
    pub conflict: Option<String>,
    pub restored: u64,
    pub restore_failures: u64,
    pub last_restore_error: Option<(String, String, Instant)>,
}

/// The `wal` part of `/pg/status`.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct WalDoc {
    /// Whether archiving is configured.
    pub enabled: bool,
    pub destination: Option<String>,
    pub compression: Option<String>,
    pub parallelism: Option<usize>,
    /// `ok`, `failing` (an upload failed and waits for a retry), `conflict` (the archive holds
    /// different content under a name) or `off`.
    pub state: String,
    pub queued: u64,
    pub in_flight: u64,
    pub archived_segments: u64,
    pub failures: u64,
    pub conflicts: u64,
    pub last_archived_wal: Option<String>,
    pub last_archived_age_seconds: Option<f64>,
    pub last_failed_wal: Option<String>,
    pub last_error: Option<String>,
    pub last_error_age_seconds: Option<f64>,
    pub restored_segments: u64,
    pub restore_failures: u64,
    pub last_restore_error: Option<String>,
}

impl WalState {
    pub fn state(&self) -> &'static str {
        if self.settings.is_none() {
            "off"
        } else if self.conflict.is_some() {
            "conflict"
        } else if self.failing > 0 {
            "failing"
        } else {
            "ok"
        }
    }

    pub fn doc(&self) -> WalDoc {
        let s = self.settings.as_deref();
        WalDoc {
            enabled: s.is_some(),
            destination: s.map(|s| s.destination.clone()),
            compression: s.map(|s| s.wal.compression.as_str().to_string()),
            parallelism: s.map(|s| s.parallelism()),
            state: self.state().to_string(),
            queued: self.queued,
            in_flight: self.in_flight,
            archived_segments: self.archived,
            failures: self.failures,
            conflicts: self.conflicts,
            last_archived_wal: self.last_archived.as_ref().map(|(n, _)| n.clone()),
            last_archived_age_seconds: self
                .last_archived
                .as_ref()
                .map(|(_, t)| t.elapsed().as_secs_f64()),
            last_failed_wal: self.last_error.as_ref().map(|(n, _, _)| n.clone()),
            last_error: self.last_error.as_ref().map(|(_, e, _)| e.clone()),
            last_error_age_seconds: self
                .last_error
                .as_ref()
                .map(|(_, _, t)| t.elapsed().as_secs_f64()),
            restored_segments: self.restored,
            restore_failures: self.restore_failures,
            last_restore_error: self
                .last_restore_error
                .as_ref()
                .map(|(n, e, _)| format!("{n}: {e}")),
        }
    }

    /// Gauges computed at scrape time.
    pub fn samples(&self) -> Vec<Sample> {
        if self.settings.is_none() {
            return Vec::new();
        }
        let mut out = vec![
            Sample::gauge(
                "pgwarden_wal_queued_segments",
                "WAL files waiting for an upload or a retry by pgwarden",
                self.queued as f64,
            ),
            Sample::gauge(
                "pgwarden_wal_uploads_in_flight",
                "Uploads running now",
                self.in_flight as f64,
            ),
            Sample::gauge(
                "pgwarden_wal_archive_failing",
                "1 while an upload failed and waits for a retry (or the archive refused it)",
                f64::from(u8::from(self.failing > 0 || self.conflict.is_some())),
            ),
        ];
        if let Some((_, t)) = &self.last_archived {
            out.push(Sample::gauge(
                "pgwarden_wal_last_archive_age_seconds",
                "Seconds since pgwarden last archived a WAL file successfully",
                t.elapsed().as_secs_f64(),
            ));
        }
        out
    }
}
