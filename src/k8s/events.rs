//! Kubernetes Events about the PostgresCluster, published best-effort: an unreachable API
//! server delays or drops an Event, never the action it describes.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;

use super::Identity;

#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
    reference: ObjectReference,
    timeout: Duration,
}

impl Events {
    pub fn new(client: Client, id: &Identity, timeout: Duration) -> Events {
        let reporter = Reporter {
            controller: "pgwarden".into(),
            instance: Some(id.pod.clone()),
        };
        Events {
            recorder: Recorder::new(client, reporter),
            reference: ObjectReference {
                api_version: Some("pgwarden.dev/v1".into()),
                kind: Some("PostgresCluster".into()),
                name: Some(id.cluster.clone()),
                namespace: Some(id.namespace.clone()),
                ..ObjectReference::default()
            },
            timeout,
        }
    }

    pub async fn normal(&self, reason: &str, note: String) {
        self.publish(EventType::Normal, reason, note).await;
    }

    pub async fn warning(&self, reason: &str, note: String) {
        self.publish(EventType::Warning, reason, note).await;
    }

    async fn publish(&self, type_: EventType, reason: &str, note: String) {
        // The API limits an Event's note to 1 kB.
        let note: String = note.chars().take(1000).collect();
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        match tokio::time::timeout(self.timeout, self.recorder.publish(&event, &self.reference))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, reason, "cannot publish an Event"),
            Err(_) => tracing::warn!(reason, "publishing an Event timed out"),
        }
    }
}
