//! Custom metric queries from a ConfigMap (`spec.monitoring.customQueries`), handed to the
//! monitoring task whenever the ConfigMap changes. A malformed file is reported (condition and
//! Event) and the queries in use stay.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use tokio::sync::watch;

use super::crd::KeyRef;
use super::events::Events;
use super::follow;
use super::Shared;
use crate::monitor::queries::{self, QuerySpec};

pub struct QueriesTask {
    pub client: Client,
    pub shared: Arc<Shared>,
    pub events: Events,
    pub out: watch::Sender<Vec<QuerySpec>>,
}

impl QueriesTask {
    pub async fn run(self, source: watch::Receiver<Option<KeyRef>>) {
        let me = &self;
        follow::current(
            source,
            |r| async move { me.follow(&r).await },
            || {
                me.out.send_replace(Vec::new());
            },
        )
        .await;
    }

    async fn follow(&self, r: &KeyRef) {
        let api: Api<ConfigMap> =
            Api::namespaced(self.client.clone(), &self.shared.identity.namespace);
        let mut stream = std::pin::pin!(follow::named(api, &r.name, self.shared.clone()));
        while let Some(result) = stream.next().await {
            let Ok(cm) = result else { continue };
            let text = cm.data.as_ref().and_then(|d| d.get(&r.key)).cloned();
            let parsed = match text {
                Some(text) => queries::parse(&text),
                None => Err(format!("has no key {:?}", r.key)),
            };
            match parsed {
                Ok(specs) => {
                    let message =
                        format!("{} custom queries from ConfigMap {}", specs.len(), r.name);
                    tracing::info!(configmap = %r.name, queries = specs.len(), "custom metric queries loaded");
                    for s in specs.iter().filter(|s| s.invalid.is_some()) {
                        tracing::error!(query = %s.name, reason = ?s.invalid, "custom metric query cannot be used");
                    }
                    self.out.send_replace(specs);
                    self.shared.set_condition(
                        "CustomQueriesLoaded",
                        true,
                        "Loaded",
                        &message,
                        None,
                    );
                }
                Err(e) => {
                    let message = format!("ConfigMap {} key {}: {e}", r.name, r.key);
                    tracing::error!(%message, "custom metric queries rejected; keeping the ones in use");
                    self.shared.set_condition(
                        "CustomQueriesLoaded",
                        false,
                        "InvalidQueries",
                        &message,
                        None,
                    );
                    self.events.warning("InvalidQueries", message).await;
                }
            }
        }
    }
}
