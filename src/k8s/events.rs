//! Kubernetes Events (`events.k8s.io/v1`) about the PostgresCluster, published best-effort:
//! an unreachable API server delays or drops an Event, never the action it describes. Each is
//! sent by a task of its own (at most [`IN_FLIGHT`] at once, more are dropped and logged), so
//! that the caller, often the loop that keeps the Lease, never waits on the API server.
//!
//! Each call creates its own Event. kube-runtime's recorder folds Events of the same reason
//! into one series and keeps the first note, which would hide every later rejection message;
//! pgwarden already publishes an Event only on a transition, so no folding is needed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::chrono::Utc;
use kube::api::PostParams;
use kube::{Api, Client};

use super::Identity;

/// Events being sent at most at once.
const IN_FLIGHT: usize = 16;

#[derive(Clone)]
pub struct Events {
    api: Api<Event>,
    reference: ObjectReference,
    pod: String,
    timeout: Duration,
    sequence: Arc<AtomicU64>,
    in_flight: Arc<AtomicUsize>,
}

impl Events {
    pub fn new(client: Client, id: &Identity, timeout: Duration) -> Events {
        Events {
            api: Api::namespaced(client, &id.namespace),
            reference: ObjectReference {
                api_version: Some("pgwarden.dev/v1".into()),
                kind: Some("PostgresCluster".into()),
                name: Some(id.cluster.clone()),
                namespace: Some(id.namespace.clone()),
                ..ObjectReference::default()
            },
            pod: id.pod.clone(),
            timeout,
            sequence: Arc::default(),
            in_flight: Arc::default(),
        }
    }

    /// Waits, at most `within`, for the Events being sent (before pgwarden exits).
    pub async fn flush(&self, within: Duration) {
        let sent = async {
            while self.in_flight.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let _ = tokio::time::timeout(within, sent).await;
    }

    pub async fn normal(&self, reason: &str, note: String) {
        self.publish("Normal", reason, note).await;
    }

    pub async fn warning(&self, reason: &str, note: String) {
        self.publish("Warning", reason, note).await;
    }

    async fn publish(&self, type_: &str, reason: &str, note: String) {
        // Unique per pod and call, like the names the real event recorders generate.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}.{}.{:x}{:02x}",
            self.reference.name.as_deref().unwrap_or("pgwarden"),
            self.pod,
            nanos,
            seq % 256
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: self.reference.namespace.clone(),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(Utc::now())),
            type_: Some(type_.into()),
            reason: Some(reason.into()),
            action: Some(reason.into()),
            // The API limits a note to 1 kB.
            note: Some(note.chars().take(1000).collect()),
            regarding: Some(self.reference.clone()),
            reporting_controller: Some("pgwarden.dev/pgwarden".into()),
            reporting_instance: Some(self.pod.clone()),
            ..Event::default()
        };
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                reason,
                "too many Events waiting for the API server; dropped"
            );
            return;
        }
        let (api, timeout, in_flight) = (self.api.clone(), self.timeout, self.in_flight.clone());
        let reason = reason.to_string();
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, api.create(&PostParams::default(), &event)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, %reason, "cannot publish an Event"),
                Err(_) => tracing::warn!(%reason, "publishing an Event timed out"),
            }
            in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
}
