//! `/metrics`: pgwarden's registry, the instance's state and the cached query metrics.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::AppState;
use crate::metrics::instance;

pub async fn handler(State(state): State<AppState>) -> impl IntoResponse {
    let shared = &state.inner;
    shared.metrics.scrapes.inc();
    let mut samples = shared.monitor.samples(shared.scrape_wait).await;
    let view = shared.view();
    let version = shared.postgres_version.borrow().clone();
    let postgres_up = view
        .observation
        .refreshed
        .is_some_and(|t| t.elapsed() <= shared.assessor.freshness)
        && view.observation.pg.is_some();
    samples.extend(instance::samples(&instance::Context {
        health: view.health,
        status: &view.status,
        observation: &view.observation,
        postgres_up,
        orphans_reaped: shared.reaper.orphans_reaped(),
        postgres_version: &version,
    }));
    if let Some(w) = shared.wal.get() {
        samples.extend(w.state.borrow().samples());
    }
    if let Some(ha) = shared.kubernetes.get().and_then(|k| k.ha.borrow().clone()) {
        samples.extend(crate::ha::samples(&ha, &shared.instance));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(samples),
    )
}
