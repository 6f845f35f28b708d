//! `/pg/status`: one JSON document describing the instance, with a versioned schema
//! (`docs/status.schema.json`, printed by `pgwarden status-schema`).

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::transport::Transport;
use super::AppState;
use crate::health::Health;
use crate::monitor::snapshot::PgState;
use crate::supervisor::postmaster::State as Postmaster;

/// Bumped on any incompatible change of the document.
pub const SCHEMA_VERSION: u32 = 1;

/// The status document.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct StatusDoc {
    pub schema_version: u32,
    pub pgwarden_version: String,
    pub instance: String,
    pub health: Health,
    pub postmaster: PostmasterDoc,
    pub monitor: MonitorDoc,
    /// The PostgreSQL binaries' version.
    pub postgres_version: String,
    /// Live state; null while Postgres is not running.
    pub postgres: Option<PgState>,
    /// The Kubernetes side; null when pgwarden runs without it.
    pub kubernetes: Option<KubernetesDoc>,
    /// pgwarden's WAL archiver; null when it does not run. The ready backlog (count, oldest
    /// age) is in `postgres.archiver`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<crate::wal::WalDoc>,
    /// High availability (the elector's view); null when it does not run.
    pub ha: Option<crate::ha::HaStatus>,
    /// TLS while it is on: the serving certificate in use (never its key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::TlsDoc>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct KubernetesDoc {
    pub cluster: String,
    pub namespace: String,
    pub pod: String,
    pub api: crate::k8s::ApiHealth,
    pub conditions: Vec<crate::k8s::crd::Condition>,
    /// Set in the answer to a failsafe request this instance granted: the primary it promised
    /// not to compete with for a lease duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_promised_to: Option<String>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct PostmasterDoc {
    pub state: String,
    pub pid: Option<i32>,
    pub starts: u64,
    pub crashes: u64,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct MonitorDoc {
    /// Seconds since Postgres last answered the monitoring loop.
    pub last_refresh_age_seconds: Option<f64>,
    pub error: Option<String>,
}

/// `?failsafe=<primary>`: a primary that cannot reach the API server asks whether its peers
/// cannot either (see `ha::elector`).
#[derive(Debug, serde::Deserialize)]
pub struct Query {
    failsafe: Option<String>,
    /// `fresh=1`: answer from a new observation (waited for up to [`FRESH_WAIT`]), not from the
    /// last one: a switchover's old primary asks its target what WAL it has received.
    fresh: Option<String>,
}

/// How long `?fresh=1` waits for the new observation before answering with what there is.
pub const FRESH_WAIT: Duration = Duration::from_millis(300);

/// Whether a control request proves it comes from a member of the cluster: a client
/// certificate from the cluster CA, or the failsafe token (an HMAC keyed with the replication
/// Secret), over TLS while TLS is on (plain text would let anyone on the path replay it).
/// Read-only status stays open to anyone.
fn refusal(
    k: &crate::k8s::Shared,
    headers: &HeaderMap,
    transport: Transport,
    primary: &str,
) -> Option<(StatusCode, &'static str, &'static str)> {
    if transport == Transport::Plain && k.tls.borrow().is_some() {
        return Some((
            StatusCode::FORBIDDEN,
            "plaintext",
            "TLS is on: control requests are taken over HTTPS only\n",
        ));
    }
    if transport == (Transport::Tls { member: true }) {
        return None;
    }
    let Some(token) = headers
        .get(crate::ha::failsafe::HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
    else {
        return Some((
            StatusCode::UNAUTHORIZED,
            "missing_credentials",
            "a failsafe request needs the cluster's token\n",
        ));
    };
    let authentic = k
        .replication_password
        .borrow()
        .as_deref()
        .is_some_and(|pw| {
            crate::ha::failsafe::verify(
                pw,
                &k.identity.cluster,
                primary,
                token,
                std::time::SystemTime::now(),
            )
        });
    (!authentic).then_some((
        StatusCode::FORBIDDEN,
        "invalid_credentials",
        "the failsafe token is not the cluster's\n",
    ))
}

pub async fn handler(
    State(state): State<AppState>,
    headers: HeaderMap,
    transport: Option<axum::Extension<Transport>>,
    axum::extract::Query(q): axum::extract::Query<Query>,
) -> Response {
    let shared = &state.inner;
    let mut promised = None;
    if let (Some(primary), Some(k)) = (q.failsafe, shared.kubernetes.get()) {
        let transport = transport.map_or(Transport::Plain, |t| t.0);
        if let Some((code, reason, message)) = refusal(k, &headers, transport, &primary) {
            // Nothing changes: no promise, the member stays free to compete for the Lease.
            tracing::warn!(%primary, reason, "refused a failsafe request");
            shared
                .metrics
                .http_refused
                .with_label_values(&[reason])
                .inc();
            let mut response = (code, message).into_response();
            if code == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static(crate::ha::failsafe::HEADER),
                );
            }
            return response;
        }
        // Only to the instance this one last saw holding the Lease, and only while it cannot
        // reach the API server itself: one that can would see the Lease expire and is free to
        // take it.
        let holder = k.ha.borrow().as_ref().and_then(|h| h.leader.clone());
        if holder.as_deref() == Some(primary.as_str()) && !k.api_answers_now().await {
            *k.failsafe_ack.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((primary.clone(), Instant::now()));
            promised = Some(primary);
        }
    }
    if q.fresh.as_deref() == Some("1") {
        shared.monitor.refresh(FRESH_WAIT).await;
    }
    let view = shared.view();
    let (name, pid) = match &view.status.state {
        Postmaster::Initializing => ("initializing", None),
        Postmaster::Stopped => ("stopped", None),
        Postmaster::Starting { pid, .. } => ("starting", Some(*pid)),
        Postmaster::Running { pid, .. } => ("running", Some(*pid)),
        Postmaster::Stopping { pid, .. } => ("stopping", Some(*pid)),
        Postmaster::Restarting { .. } => ("restarting", None),
        Postmaster::Failed { .. } => ("failed", None),
    };
    Json(StatusDoc {
        schema_version: SCHEMA_VERSION,
        pgwarden_version: env!("CARGO_PKG_VERSION").to_string(),
        instance: shared.instance.clone(),
        health: view.health,
        postmaster: PostmasterDoc {
            state: name.to_string(),
            pid,
            starts: view.status.starts,
            crashes: view.status.crashes,
        },
        monitor: MonitorDoc {
            last_refresh_age_seconds: view
                .observation
                .refreshed
                .map(|t| Instant::now().saturating_duration_since(t).as_secs_f64()),
            error: view.observation.error.clone(),
        },
        postgres_version: shared.postgres_version.borrow().clone(),
        postgres: view.observation.pg.as_deref().cloned(),
        kubernetes: shared.kubernetes.get().map(|k| KubernetesDoc {
            cluster: k.identity.cluster.clone(),
            namespace: k.identity.namespace.clone(),
            pod: k.identity.pod.clone(),
            api: k.api_health(),
            conditions: k.conditions(),
            failsafe_promised_to: promised,
        }),
        wal: shared.wal.get().map(|w| w.state.borrow().doc()),
        ha: shared.kubernetes.get().and_then(|k| k.ha.borrow().clone()),
        tls: shared
            .tls
            .borrow()
            .as_deref()
            .map(crate::tls::Material::doc),
    })
    .into_response()
}

/// The JSON Schema of [`StatusDoc`].
pub fn schema() -> String {
    let schema = schemars::schema_for!(StatusDoc);
    serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_schema_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status.schema.json");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == super::schema(),
            "docs/status.schema.json is stale: run `pgwarden status-schema > docs/status.schema.json`"
        );
    }
}
