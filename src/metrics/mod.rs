//! Prometheus metrics, prefix `pgwarden_`.
//!
//! Three sources, all cheap at scrape time: pgwarden's own counters and histograms (kept in a
//! registry), the instance's state (derived from the latest observation and postmaster status,
//! see [`instance`]), and the query-based metrics cached by the monitoring task.

pub mod families;
pub mod instance;

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry, TextEncoder,
};

use families::{to_families, Sample};

pub struct Metrics {
    registry: Registry,
    pub loop_duration: HistogramVec,
    pub query_errors: IntCounterVec,
    pub probe_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Control requests refused, by reason (see [`REFUSAL_REASONS`]).
    pub http_refused: IntCounterVec,
    pub scrapes: IntCounter,
}

/// Why a request that would change what the instance does was refused: no credentials
/// (401), wrong ones (403), or plain HTTP while TLS is on (403).
pub const REFUSAL_REASONS: [&str; 3] = ["missing_credentials", "invalid_credentials", "plaintext"];

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let loop_duration = HistogramVec::new(
            HistogramOpts::new(
                "pgwarden_loop_duration_seconds",
                "Duration of one run of a background loop",
            )
            .buckets(exponential_buckets(0.0005, 4.0, 9)?),
            &["loop"],
        )?;
        let query_errors = IntCounterVec::new(
            Opts::new("pgwarden_query_errors_total", "Failed metric query runs"),
            &["query"],
        )?;
        let probe_requests = IntCounterVec::new(
            Opts::new(
                "pgwarden_probe_requests_total",
                "Probe requests answered, by probe and status code",
            ),
            &["probe", "code"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "pgwarden_http_request_duration_seconds",
                "Latency of pgwarden's HTTP responses",
            )
            .buckets(exponential_buckets(0.0001, 4.0, 9)?),
            &["server", "path", "code"],
        )?;
        let http_refused = IntCounterVec::new(
            Opts::new(
                "pgwarden_http_refused_requests_total",
                "Control requests (the failsafe promise) refused for want of a member's proof, by reason",
            ),
            &["reason"],
        )?;
        for reason in REFUSAL_REASONS {
            http_refused.with_label_values(&[reason]);
        }
        let scrapes = IntCounter::new("pgwarden_scrapes_total", "Metric scrapes served")?;
        registry.register(Box::new(loop_duration.clone()))?;
        registry.register(Box::new(query_errors.clone()))?;
        registry.register(Box::new(probe_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(http_refused.clone()))?;
        registry.register(Box::new(scrapes.clone()))?;
        Ok(Metrics {
            registry,
            loop_duration,
            query_errors,
            probe_requests,
            http_duration,
            http_refused,
            scrapes,
        })
    }

    /// Adds a collector of another part of pgwarden (the WAL archiver's).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.registry.register(c)
    }

    /// The exposition text: the registry plus the given samples.
    pub fn render(&self, samples: Vec<Sample>) -> String {
        let mut families = self.registry.gather();
        families.extend(to_families(samples));
        families.sort_by(|a, b| a.get_name().cmp(b.get_name()));
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
