//! The reporter: this instance's own `status.instances.<name>` entry and its Pod's labels.
//!
//! The entry is written with a JSON merge patch on the status subresource, which merges maps
//! key by key, so instances reporting at the same time never overwrite each other. It is sent
//! on every change (at most once a second) and at least every `status_interval`. The primary
//! also writes the cluster-level fields.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::Api;
use serde_json::json;
use tokio::sync::watch;

use super::crd::InstanceStatus;
use super::events::Events;
use super::Shared;
use crate::health::{Assessor, Health};
use crate::logging::now_rfc3339;
use crate::monitor::snapshot::Role;
use crate::monitor::Observation;
use crate::supervisor::postmaster::Status;

/// Fewest seconds between two reports caused by changes.
const MIN_GAP: Duration = Duration::from_secs(1);

pub struct Reporter {
    pub clusters: Api<DynamicObject>,
    pub pods: Api<Pod>,
    pub shared: Arc<Shared>,
    pub events: Events,
    pub status: watch::Receiver<Status>,
    pub observation: watch::Receiver<Observation>,
    pub assessor: Assessor,
    pub interval: Duration,
    pub timeout: Duration,
}

/// What is reported, without the timestamp (so that "changed" means a real change).
#[derive(PartialEq, Clone)]
struct Report {
    entry: InstanceStatus,
    role_label: &'static str,
}

impl Reporter {
    pub async fn run(mut self) {
        let mut last: Option<Report> = None;
        // "Long ago", without underflowing on a young monotonic clock.
        let mut last_sent = Instant::now()
            .checked_sub(self.interval)
            .unwrap_or_else(Instant::now);
        let mut label_sent: Option<&'static str> = None;
        let mut health_seen: Option<Health> = None;
        let mut crashes_seen = self.status.borrow().crashes;
        loop {
            // Every crash, counted, not sampled: the first one in the window restarts at once,
            // so "restarting" may never be seen by a report.
            let crashes = self.status.borrow().crashes;
            if crashes > crashes_seen {
                let id = &self.shared.identity.pod;
                self.events
                    .warning(
                        "PostgresCrashed",
                        format!("postgres on {id} exited unexpectedly; restarting"),
                    )
                    .await;
                crashes_seen = crashes;
            }
            let report = self.report();
            let changed = last.as_ref() != Some(&report);
            if changed || last_sent.elapsed() >= self.interval {
                if changed && last_sent.elapsed() < MIN_GAP {
                    tokio::time::sleep(MIN_GAP - last_sent.elapsed()).await;
                    continue; // re-read: more may have changed meanwhile
                }
                let health = report.entry.health.clone();
                if health_seen.map(|h| h.as_str()) != Some(health.as_str()) {
                    self.lifecycle_event(health_seen, &report).await;
                    health_seen = Health::ALL.into_iter().find(|h| h.as_str() == health);
                }
                if self.send_status(&report).await {
                    last = Some(report.clone());
                    last_sent = Instant::now();
                }
                if label_sent != Some(report.role_label)
                    && self.send_labels(report.role_label).await
                {
                    label_sent = Some(report.role_label);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval.saturating_sub(last_sent.elapsed()).max(MIN_GAP)) => {}
                _ = self.status.changed() => {}
                _ = self.observation.changed() => {}
                _ = self.shared.report_now.notified() => {}
            }
        }
    }

    fn report(&self) -> Report {
        let status = self.status.borrow().clone();
        let obs = self.observation.borrow().clone();
        let health = self.assessor.assess(&status, &obs);
        let pg = obs.pg.as_deref();
        let role = match pg.map(|p| &p.role) {
            Some(Role::Primary) => "primary",
            Some(Role::Replica) => "replica",
            None => "unknown",
        };
        // Under HA the elector's view decides: a primary without the Lease is no primary.
        let ha = self.shared.ha.borrow().clone();
        let role = ha.as_ref().map_or(role, |h| match h.role.as_str() {
            "primary" => "primary",
            "replica" => "replica",
            "fenced" => "fenced",
            _ => "unknown",
        });
        let entry = InstanceStatus {
            role: role.into(),
            health: health.as_str().into(),
            address: self.shared.identity.address.clone(),
            postgres_address: self
                .shared
                .identity
                .address
                .as_ref()
                .map(|a| host_port(a, self.shared.identity.postgres_port)),
            status_address: self
                .shared
                .identity
                .address
                .as_ref()
                .map(|a| host_port(a, self.shared.identity.status_port)),
            timeline: pg.map(|p| p.timeline),
            current_lsn: pg.and_then(|p| p.lsn.current).map(|l| l.to_string()),
            received_lsn: pg.and_then(|p| p.lsn.received).map(|l| l.to_string()),
            replayed_lsn: pg.and_then(|p| p.lsn.replayed).map(|l| l.to_string()),
            ready: health == Health::Ready,
            pending_restart: pg.is_some_and(|p| p.pending_restart),
            pgwarden_version: env!("CARGO_PKG_VERSION").into(),
            last_report_time: String::new(),
            conditions: self.shared.conditions(),
        };
        let spec_valid = self
            .shared
            .conditions()
            .iter()
            .any(|c| c.type_ == "SpecValid" && c.status == "True");
        // Services route by this label. Under HA the elector's role decides (a primary that
        // lost its Lease is no primary, whatever the spec); without it only a role confirmed
        // under a valid spec gets one.
        let role_label = match (role, spec_valid || ha.is_some()) {
            ("primary", true) => "primary",
            ("replica", true) => "replica",
            ("fenced", _) => "fenced",
            _ => "unknown",
        };
        Report { entry, role_label }
    }

    async fn lifecycle_event(&self, before: Option<Health>, report: &Report) {
        let id = &self.shared.identity.pod;
        match (before, report.entry.health.as_str()) {
            (
                None
                | Some(
                    Health::Initializing
                    | Health::Starting
                    | Health::CrashRecovery
                    | Health::Restarting,
                ),
                "ready",
            ) => {
                self.events
                    .normal(
                        "Started",
                        format!("instance {id} is ready as {}", report.entry.role),
                    )
                    .await;
            }
            (_, "failed") => {
                self.events
                    .warning(
                        "PostgresFailed",
                        format!("postgres on {id} keeps crashing; giving up"),
                    )
                    .await;
            }
            _ => {}
        }
    }

    async fn send_status(&self, report: &Report) -> bool {
        let id = &self.shared.identity;
        let mut entry = report.entry.clone();
        entry.last_report_time = now_rfc3339();
        let mut status = json!({ "instances": { id.pod.clone(): entry } });
        if report.role_label == "primary" {
            status["currentPrimary"] = json!(id.pod);
            status["phase"] = json!(if report.entry.ready {
                "Healthy"
            } else {
                "Degraded"
            });
            status["readyInstances"] = json!(self.ready_instances(&id.pod, report.entry.ready));
            if let Some(b) = self.shared.backups.borrow().clone() {
                status["backups"] = json!(b);
            }
        }
        let patch = Patch::Merge(json!({ "status": status }));
        let result = tokio::time::timeout(
            self.timeout,
            self.clusters
                .patch_status(&id.cluster, &PatchParams::default(), &patch),
        )
        .await
        .unwrap_or_else(|_| Err(timeout_error()));
        self.shared.api_result(&result);
        result.is_ok()
    }

    /// Instances whose last report said ready (this one's from now).
    fn ready_instances(&self, me: &str, me_ready: bool) -> u32 {
        let cluster = self.shared.cluster.borrow().clone();
        let others = cluster
            .as_ref()
            .and_then(|c| c.data.get("status")?.get("instances")?.as_object().cloned())
            .unwrap_or_default();
        let others = others
            .iter()
            .filter(|(name, v)| name.as_str() != me && v.get("ready") == Some(&json!(true)))
            .count() as u32;
        others + u32::from(me_ready)
    }

    async fn send_labels(&self, role: &'static str) -> bool {
        let id = &self.shared.identity;
        let patch = Patch::Merge(json!({
            "metadata": { "labels": {
                "pgwarden.dev/cluster": id.cluster,
                "pgwarden.dev/role": role,
            }}
        }));
        let result = tokio::time::timeout(
            self.timeout,
            self.pods.patch(&id.pod, &PatchParams::default(), &patch),
        )
        .await
        .unwrap_or_else(|_| Err(timeout_error()));
        if let Err(e) = &result {
            tracing::warn!(error = %e, pod = %id.pod, "cannot label the Pod");
        }
        self.shared.api_result(&result);
        result.is_ok()
    }
}

/// `host:port`, with brackets around an IPv6 address.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn timeout_error() -> kube::Error {
    kube::Error::Service(Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the API server did not answer in time",
    )))
}
