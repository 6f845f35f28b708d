//! Kubernetes: the `PostgresCluster` resource and everything that talks to the API server.
//!
//! Three tasks, each with one job: the reconciler watches this instance's PostgresCluster and
//! applies its spec; the secrets task watches the password Secrets and applies them; the
//! reporter writes this instance's own status entry and its Pod's labels. None of them is
//! needed for Postgres to keep serving: when the API server is unreachable they retry with
//! backoff and the status API says so.

pub mod conditions;
pub mod crd;
pub mod events;
pub mod follow;
mod queries;
mod reconcile;
mod report;
pub mod secrets;
pub mod wal_credentials;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kube::api::{ApiResource, DynamicObject};
use kube::{Api, Client};
use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::config::{Config, PostgresConfig};
use crate::monitor::Observation;
use crate::supervisor::postmaster::{self, Status};
use crd::{Condition, PostgresCluster};

/// Who this instance is, from the downward API and the configuration.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cluster: String,
    pub namespace: String,
    pub pod: String,
    /// Host advertised to the other instances (pod IP or DNS name).
    pub address: Option<String>,
    pub postgres_port: u16,
    pub status_port: u16,
}

/// Reachability of the API server, as seen by the last calls.
#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct ApiHealth {
    pub reachable: bool,
    pub last_error: Option<String>,
    #[serde(skip)]
    pub last_success: Option<Instant>,
}

/// How long a member waits for the API server before it answers a failsafe request.
pub const FAILSAFE_PROBE: std::time::Duration = std::time::Duration::from_millis(500);

/// State shared by the Kubernetes tasks.
pub struct Shared {
    pub identity: Identity,
    api_health: Mutex<ApiHealth>,
    /// This instance's conditions (written by the reconciler, reported by the reporter).
    conditions: Mutex<Vec<Condition>>,
    /// Wakes the reporter when something worth reporting changed.
    pub report_now: Notify,
    /// The latest PostgresCluster seen by the reconciler.
    pub cluster: watch::Sender<Option<Arc<DynamicObject>>>,
    /// The last valid spec (parsed and validated by the reconciler). A later spec that cannot
    /// be used leaves this one in force, so that HA never stops on a bad or newer spec.
    pub spec: watch::Sender<Option<Arc<crd::PostgresClusterSpec>>>,
    /// The replication role's password, from its Secret (for standbys' passfile).
    pub replication_password: watch::Sender<Option<String>>,
    /// The HA elector's view, when HA runs.
    pub ha: watch::Sender<Option<crate::ha::HaStatus>>,
    /// Failsafe: the last time this instance, cut off from the API server itself, confirmed
    /// to a primary (by its `/pg/status?failsafe=<primary>` request) that it still follows it.
    /// It then does not compete for the Lease for a lease duration from that moment.
    pub failsafe_ack: Mutex<Option<(String, Instant)>>,
    /// `status.backups`, from the backup scheduler; the reporter sends it while primary.
    pub backups: watch::Sender<Option<crate::backup::spec::BackupsStatus>>,
    /// This instance's certificate and the cluster CA while TLS is on (from the TLS task).
    pub tls: watch::Sender<Option<Arc<crate::tls::Material>>>,
    pub client: Client,
}

impl Shared {
    pub fn api_health(&self) -> ApiHealth {
        self.api_health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records the outcome of an API call. Only a call that got no answer (transport error,
    /// timeout) makes the API server unreachable; an error the server answered with (403, 404,
    /// 410, ...) shows it is reachable and is reported by the caller.
    pub fn api_result<T, E: Reachability>(&self, r: &Result<T, E>) {
        let mut h = self.api_health.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Err(e) if !e.answered() => {
                drop(h);
                self.api_silent(&e.to_string());
            }
            _ => {
                if !h.reachable {
                    tracing::info!("Kubernetes API server reachable");
                }
                h.reachable = true;
                h.last_error = None;
                h.last_success = Some(Instant::now());
            }
        }
    }

    /// Records a call that got no answer: the API server is unreachable.
    fn api_silent(&self, error: &str) {
        let mut h = self.api_health.lock().unwrap_or_else(|p| p.into_inner());
        if h.reachable || h.last_error.is_none() {
            tracing::warn!(%error, "Kubernetes API server unreachable; Postgres keeps serving");
        }
        h.reachable = false;
        h.last_error = Some(error.to_string());
    }

    /// Whether the API server answers right now: a read of the leader Lease within
    /// [`FAILSAFE_PROBE`]. Asked before a failsafe promise, so that a member knows it is cut
    /// off within that bound of the primary's question, not only after its own calls have
    /// timed out (a black hole answers nothing and refuses nothing).
    pub async fn api_answers_now(&self) -> bool {
        let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
            kube::Api::namespaced(self.client.clone(), &self.identity.namespace);
        let name = format!("{}-leader", self.identity.cluster);
        let Ok(result) = tokio::time::timeout(FAILSAFE_PROBE, leases.get_opt(&name)).await else {
            self.api_silent(&format!("no answer within {FAILSAFE_PROBE:?}"));
            return false;
        };
        self.api_result(&result);
        match &result {
            Ok(_) => true,
            Err(e) => e.answered(),
        }
    }

    pub fn conditions(&self) -> Vec<Condition> {
        self.conditions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets a condition; wakes the reporter when it changed.
    pub fn set_condition(
        &self,
        type_: &str,
        ok: bool,
        reason: &str,
        message: &str,
        generation: Option<i64>,
    ) {
        let changed = {
            let mut list = self.conditions.lock().unwrap_or_else(|p| p.into_inner());
            conditions::set(&mut list, type_, ok, reason, message, generation)
        };
        if changed {
            self.report_now.notify_one();
        }
    }
}

/// Whether an API error came from the server (it answered) or from getting no answer.
pub trait Reachability: std::fmt::Display {
    fn answered(&self) -> bool;
}

impl Reachability for kube::Error {
    /// An answer that shows the API server can serve requests. 5xx and 429 do not: an API
    /// server whose etcd is down answers them to every request, and is as unusable as a silent
    /// one (Patroni users lose their primary when 5xx is taken for "reachable": patroni#3344).
    fn answered(&self) -> bool {
        matches!(self, kube::Error::Api(s) if s.code < 500 && s.code != 429)
    }
}

impl Reachability for kube::runtime::watcher::Error {
    fn answered(&self) -> bool {
        use kube::runtime::watcher::Error as W;
        match self {
            W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => e.answered(),
            W::WatchError(_) | W::NoResourceVersion => true,
        }
    }
}

/// Inputs of the Kubernetes tasks.
pub struct Start {
    pub config: Config,
    pub base: PostgresConfig,
    pub postmaster: postmaster::Handle,
    pub status: watch::Receiver<Status>,
    pub observation: watch::Receiver<Observation>,
    pub assessor: crate::health::Assessor,
    /// Custom metric queries from the cluster's ConfigMap, for the monitor.
    pub cluster_queries: watch::Sender<Vec<crate::monitor::queries::QuerySpec>>,
    /// `spec.probes.maxStandbyLagBytes` (over pgwarden's own setting), for the probes.
    pub max_standby_lag: watch::Sender<Option<u64>>,
    /// The WAL archiver, which `spec.walArchive` reconfigures.
    pub wal: Option<crate::wal::Handle>,
    /// Where the TLS task publishes the certificates (read by the HTTP servers).
    pub tls: watch::Sender<Option<Arc<crate::tls::Material>>>,
}

/// Connects to the API server (kubeconfig or in-cluster) and starts the tasks. Returns `None`
/// when no cluster is configured.
pub async fn start(s: Start) -> anyhow::Result<Option<Arc<Shared>>> {
    let k = &s.config.kubernetes;
    let Some(cluster) = k.cluster.clone() else {
        return Ok(None);
    };
    let mut kube_config = kube::Config::infer().await.context(
        "cannot find a Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)",
    )?;
    // A watch that stops delivering (a one-way partition) must fail in bounded time; the
    // watches ask the server to end them well before this.
    kube_config.read_timeout = Some(WATCH_TIMEOUT + Duration::from_secs(15));
    kube_config.connect_timeout = Some(k.api_timeout);
    let namespace = k
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| kube_config.default_namespace.clone());
    let pod = k
        .pod_name
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(|| s.config.instance_name.clone());
    let pod_ip = k.pod_ip.clone().or_else(|| std::env::var("POD_IP").ok());
    let address = k.advertise_address.clone().or_else(|| pod_ip.clone());
    // The serving certificate names both (peers may be told either).
    let tls_addresses: Vec<String> = address.iter().chain(pod_ip.iter()).cloned().collect();
    let client = Client::try_from(kube_config).context("cannot build the Kubernetes client")?;
    let identity = Identity {
        cluster,
        namespace,
        pod,
        address,
        postgres_port: s.config.postgres.port,
        status_port: s.config.http.status_listen.port(),
    };
    tracing::info!(cluster = %identity.cluster, namespace = %identity.namespace, pod = %identity.pod, "following the PostgresCluster");
    let (cluster_tx, _) = watch::channel(None);
    let shared = Arc::new(Shared {
        identity,
        api_health: Mutex::default(),
        conditions: Mutex::default(),
        report_now: Notify::new(),
        cluster: cluster_tx,
        spec: watch::channel(None).0,
        replication_password: watch::channel(None).0,
        ha: watch::channel(None).0,
        failsafe_ack: Mutex::default(),
        backups: watch::channel(None).0,
        tls: s.tls,
        client: client.clone(),
    });
    let events = events::Events::new(client.clone(), &shared.identity, k.api_timeout);
    let (secrets_tx, secrets_rx) = watch::channel(None);
    let (queries_tx, queries_rx) = watch::channel(None);
    let (wal_creds_tx, wal_creds_rx) = watch::channel(None);
    let (source_creds_tx, source_creds_rx) = watch::channel(None);

    tokio::spawn(
        reconcile::Reconciler {
            api: clusters(&client, &shared.identity.namespace),
            shared: shared.clone(),
            events: events.clone(),
            base: s.base.clone(),
            postmaster: s.postmaster.clone(),
            secrets: secrets_tx,
            queries: queries_tx,
            wal_credentials: wal_creds_tx,
            source_credentials: source_creds_tx,
            max_standby_lag: s.max_standby_lag,
            default_max_standby_lag: s.config.probes.max_standby_lag_bytes,
            wal: s.wal.clone(),
            base_wal: s.config.wal.clone(),
            applied: None,
            invalid_generation: None,
            api_timeout: k.api_timeout,
        }
        .run(),
    );
    tokio::spawn(
        secrets::SecretsTask {
            client: client.clone(),
            shared: shared.clone(),
            events: events.clone(),
            pg: s.base.clone(),
            observation: s.observation.clone(),
        }
        .run(secrets_rx),
    );
    tokio::spawn(
        wal_credentials::WalCredentialsTask {
            client: client.clone(),
            shared: shared.clone(),
            events: events.clone(),
            dir: wal_credentials::dir(&s.base.run_dir),
        }
        .run(wal_creds_rx),
    );
    // The archive a new cluster is restored from has its own credentials.
    tokio::spawn(
        wal_credentials::WalCredentialsTask {
            client: client.clone(),
            shared: shared.clone(),
            events: events.clone(),
            dir: crate::backup::bootstrap::source_credentials_dir(&s.base.run_dir),
        }
        .run(source_creds_rx),
    );
    tokio::spawn(
        crate::tls::task::TlsTask {
            client: client.clone(),
            shared: shared.clone(),
            events: events.clone(),
            postmaster: s.postmaster.clone(),
            run_dir: s.base.run_dir.clone(),
            addresses: tls_addresses,
            api_timeout: k.api_timeout,
        }
        .run(),
    );
    tokio::spawn(
        queries::QueriesTask {
            client: client.clone(),
            shared: shared.clone(),
            events: events.clone(),
            out: s.cluster_queries,
        }
        .run(queries_rx),
    );
    tokio::spawn(
        report::Reporter {
            clusters: clusters(&client, &shared.identity.namespace),
            pods: Api::namespaced(client, &shared.identity.namespace),
            shared: shared.clone(),
            events,
            status: s.status,
            observation: s.observation,
            assessor: s.assessor,
            interval: k.status_interval,
            timeout: k.api_timeout,
        }
        .run(),
    );
    Ok(Some(shared))
}

/// Watches are asked to end after this long and are then resumed from their resourceVersion.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// For command-line tools (`pgwarden backup --cluster`): a client from the environment
/// (KUBECONFIG, ~/.kube/config or in-cluster) and the namespace, `namespace` or the
/// configuration's.
pub async fn cli_client(namespace: Option<String>) -> anyhow::Result<(Client, String)> {
    use anyhow::Context;
    let config = kube::Config::infer().await.context(
        "cannot find a Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)",
    )?;
    let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).context("cannot build the Kubernetes client")?;
    Ok((client, namespace))
}

pub fn clusters(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let ar = ApiResource::erase::<PostgresCluster>(&());
    Api::namespaced_with(client.clone(), namespace, &ar)
}
