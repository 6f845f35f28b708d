//! Probes and role endpoints: answered from the current health, in microseconds.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{AppState, View};
use crate::health::Health;
use crate::monitor::snapshot::Role;

#[derive(Serialize)]
struct ProbeBody {
    ok: bool,
    health: Health,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

fn answer(
    state: &AppState,
    probe: &'static str,
    ok: bool,
    view: &View,
    reason: Option<String>,
) -> Response {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    state
        .inner
        .metrics
        .probe_requests
        .with_label_values(&[probe, code.as_str()])
        .inc();
    (
        code,
        Json(ProbeBody {
            ok,
            health: view.health,
            reason,
        }),
    )
        .into_response()
}

pub async fn healthz(State(state): State<AppState>) -> Response {
    let view = state.inner.view();
    let ok = view.health.live();
    let reason = match view.health {
        Health::Wedged => Some("the monitoring loop missed its deadline".into()),
        Health::Failed => Some("postgres died too often and will not be restarted".into()),
        _ => None,
    };
    answer(&state, "healthz", ok, &view, reason)
}

#[derive(Deserialize)]
pub struct ReadyQuery {
    /// Largest acceptable standby replay lag in bytes for this request.
    lag: Option<u64>,
}

pub async fn readyz(State(state): State<AppState>, Query(q): Query<ReadyQuery>) -> Response {
    let view = state.inner.view();
    let (ok, reason) = ready(&view, q.lag.or(*state.inner.max_standby_lag_bytes.borrow()));
    answer(&state, "readyz", ok, &view, reason)
}

/// Ready: accepting connections, answering, and (for a standby) within the lag bound.
fn ready(view: &View, max_lag: Option<u64>) -> (bool, Option<String>) {
    if view.health != Health::Ready {
        return (false, Some(format!("health is {}", view.health.as_str())));
    }
    let Some(pg) = &view.observation.pg else {
        return (false, Some("no state read yet".into()));
    };
    if let (Role::Replica, Some(max)) = (&pg.role, max_lag) {
        match pg.standby_lag_bytes() {
            Some(lag) if lag > max => {
                return (false, Some(format!("replay lag {lag} bytes exceeds {max}")));
            }
            None => return (false, Some("replay position unknown".into())),
            _ => {}
        }
    }
    (true, None)
}

pub async fn startupz(State(state): State<AppState>) -> Response {
    let view = state.inner.view();
    let ok = view.health.started(view.status.ever_ready);
    answer(&state, "startupz", ok, &view, None)
}

fn role_probe(state: &AppState, probe: &'static str, want: Role) -> Response {
    let view = state.inner.view();
    let role = view.observation.pg.as_ref().map(|p| p.role.clone());
    let ok = view.health == Health::Ready && role.as_ref() == Some(&want);
    let reason = (!ok).then(|| match role {
        Some(Role::Primary) => "this instance is the primary".to_string(),
        Some(Role::Replica) => "this instance is a replica".to_string(),
        None => format!("health is {}", view.health.as_str()),
    });
    answer(state, probe, ok, &view, reason)
}

pub async fn primary(State(state): State<AppState>) -> Response {
    role_probe(&state, "primary", Role::Primary)
}

pub async fn replica(State(state): State<AppState>) -> Response {
    role_probe(&state, "replica", Role::Replica)
}
