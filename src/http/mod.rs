//! pgwarden's two HTTP servers, each on its own listener: the status server (probes, role
//! endpoints, `/pg/status`) and the metrics server. Handlers answer from state in memory and
//! never talk to Postgres; every request is bounded by a timeout.

mod metrics;
mod probes;
pub mod status;
pub mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::health::{self, Health};
use crate::metrics::Metrics;
use crate::monitor::{MonitorHandle, Observation};
use crate::supervisor::postmaster::Status;
use crate::supervisor::reaper::Reaper;

/// Everything the handlers read.
#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Shared>,
}

pub struct Shared {
    pub instance: String,
    pub postgres_version: watch::Receiver<String>,
    pub postmaster: watch::Receiver<Status>,
    pub monitor: MonitorHandle,
    pub metrics: Arc<Metrics>,
    pub reaper: Reaper,
    /// Current bound on a standby's replay lag for `/readyz` (configuration, then the spec).
    pub max_standby_lag_bytes: watch::Receiver<Option<u64>>,
    pub assessor: health::Assessor,
    /// The Kubernetes side, once started (when configured).
    pub kubernetes: std::sync::OnceLock<Arc<crate::k8s::Shared>>,
    /// The WAL archiver, once started (when configured).
    pub wal: std::sync::OnceLock<crate::wal::Handle>,
    /// The certificate while TLS is on: the listeners then speak HTTPS too.
    pub tls: crate::tls::Current,
    /// How long a scrape waits for fresh metric queries before serving the cached ones.
    pub scrape_wait: Duration,
}

/// One consistent view of the state, taken per request.
pub struct View {
    pub health: Health,
    pub status: Status,
    pub observation: Observation,
}

impl Shared {
    pub fn view(&self) -> View {
        let status = self.postmaster.borrow().clone();
        let observation = self.monitor.observation.borrow().clone();
        let health = self.assessor.assess(&status, &observation);
        View {
            health,
            status,
            observation,
        }
    }
}

/// Binds both listeners (so a port in use is reported at start) and serves until `shutdown`
/// turns true.
pub async fn serve(
    state: AppState,
    status_addr: SocketAddr,
    metrics_addr: SocketAddr,
    request_timeout: Duration,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let timeout = tower_http::timeout::TimeoutLayer::with_status_code(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        request_timeout,
    );
    let tls = state.inner.tls.clone();
    let status_app = Router::new()
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/startupz", get(probes::startupz))
        .route("/primary", get(probes::primary))
        .route("/replica", get(probes::replica))
        .route("/pg/status", get(status::handler))
        .layer(timeout)
        .layer(axum::middleware::from_fn_with_state(
            (state.clone(), "status"),
            observe,
        ))
        .with_state(state.clone());
    let metrics_app = Router::new()
        .route("/metrics", get(metrics::handler))
        .layer(timeout)
        .layer(axum::middleware::from_fn_with_state(
            (state.clone(), "metrics"),
            observe,
        ))
        .with_state(state);

    let mut tasks = Vec::new();
    for (name, addr, app) in [
        ("status", status_addr, status_app),
        ("metrics", metrics_addr, metrics_app),
    ] {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the {name} server: {e}"))?;
        tracing::info!(%addr, server = name, "HTTP server listening");
        tasks.push(tokio::spawn(transport::serve(
            listener,
            app,
            tls.clone(),
            shutdown.clone(),
            name,
        )));
    }
    Ok(tasks)
}

/// Records latency per server, route and status code.
async fn observe(
    State((state, server)): State<(AppState, &'static str)>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| match p.as_str() {
            "/healthz" => "/healthz",
            "/readyz" => "/readyz",
            "/startupz" => "/startupz",
            "/primary" => "/primary",
            "/replica" => "/replica",
            "/pg/status" => "/pg/status",
            "/metrics" => "/metrics",
            _ => "other",
        });
    let response = next.run(req).await;
    state
        .inner
        .metrics
        .http_duration
        .with_label_values(&[server, path, response.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}
