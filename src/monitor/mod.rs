//! The monitoring task: the only code that queries Postgres for state.
//!
//! It keeps one persistent connection (as the `pgwarden_monitor` role, a member of
//! `pg_monitor`, when the cluster has it) and refreshes an [`Observation`] every interval,
//! published on a watch channel for probes and `/pg/status`. Metric queries run in the same
//! task, on demand from a scrape, at most once per TTL: scrapes never run queries themselves,
//! never concurrently, and wait for a refresh only up to a bound.

pub mod queries;
pub mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, MonitorConfig};
use crate::metrics::families::Sample;
use crate::metrics::Metrics;
use crate::postgres::conf::MONITOR_ROLE;
use crate::postgres::connect::{
    connect_timeout, ConnectError, Connection, Target, CONNECT_TIMEOUT,
};
use crate::supervisor::postmaster::{State, Status};
use queries::{Databases, QuerySpec};
use snapshot::{PgState, Role};

/// Most databases a `target_databases: ["*"]` query keeps a connection to.
const MAX_DATABASES: usize = 16;
const DEFAULT_DB: &str = "postgres";

/// What the monitoring loop last saw.
#[derive(Debug, Clone)]
pub struct Observation {
    /// When the loop last ran (its heartbeat).
    pub heartbeat: Instant,
    /// When Postgres last answered.
    pub refreshed: Option<Instant>,
    /// Why the last refresh failed, if it did.
    pub error: Option<String>,
    /// The last state read, `None` while Postgres is not running.
    pub pg: Option<Arc<PgState>>,
}

/// Result of the last metric collection.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    pub at: Option<Instant>,
    pub samples: Vec<Sample>,
}

/// Handle for readers: probes read the observation, scrapes ask for fresh metrics.
#[derive(Clone)]
pub struct MonitorHandle {
    pub observation: watch::Receiver<Observation>,
    collected: Arc<Mutex<Collected>>,
    requests: mpsc::Sender<oneshot::Sender<()>>,
    /// Requests for a new observation now (a switchover's old primary asks its target for the
    /// WAL it has received); a queue of their own, so that they never crowd out metrics.
    refreshes: mpsc::Sender<oneshot::Sender<()>>,
    ttl: Duration,
}

/// Requested observations come at most this often: asking faster gets the last one.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);

impl MonitorHandle {
    /// The cached metric samples. When they are older than the TTL a refresh is requested;
    /// the scrape waits for it (up to `wait`) only when nothing was collected yet, and
    /// otherwise answers at once with the previous values (stale-while-revalidate), so a
    /// scrape's latency never includes the queries.
    pub async fn samples(&self, wait: Duration) -> Vec<Sample> {
        let (stale, empty) = {
            let c = self.lock();
            (c.at.is_none_or(|t| t.elapsed() > self.ttl), c.at.is_none())
        };
        if stale {
            let (tx, rx) = oneshot::channel();
            // A full queue means a refresh is already requested.
            if self.requests.try_send(tx).is_ok() && empty {
                let _ = tokio::time::timeout(wait, rx).await;
            }
        }
        self.lock().samples.clone()
    }

    /// Asks for a new observation and waits for it up to `wait` (a full queue: requests are
    /// pending already, and this one waits for nothing). The monitor takes one at most every
    /// [`MIN_REFRESH_GAP`], so asking often costs a bounded number of query rounds.
    pub async fn refresh(&self, wait: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.refreshes.try_send(tx).is_ok() {
            let _ = tokio::time::timeout(wait, rx).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Collected> {
        self.collected.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts the monitoring task.
pub fn spawn(
    config: &Config,
    user_queries: Vec<QuerySpec>,
    cluster_queries: watch::Receiver<Vec<QuerySpec>>,
    postmaster: watch::Receiver<Status>,
    metrics: Arc<Metrics>,
) -> MonitorHandle {
    let (obs_tx, obs_rx) = watch::channel(Observation {
        heartbeat: Instant::now(),
        refreshed: None,
        error: None,
        pg: None,
    });
    let (req_tx, req_rx) = mpsc::channel(4);
    let (refresh_tx, refresh_rx) = mpsc::channel(2);
    let collected: Arc<Mutex<Collected>> = Arc::default();
    let mut specs = queries::parse(queries::BUILTIN).unwrap_or_default();
    specs.extend(user_queries);
    let monitor = Monitor {
        cfg: config.monitor.clone(),
        socket_dir: config.postgres.run_dir.clone(),
        data_dir: config.postgres.data_dir.clone(),
        port: config.postgres.port,
        superuser: config.postgres.superuser.clone(),
        specs,
        cluster_queries,
        postmaster,
        metrics,
        observation: obs_tx,
        collected: collected.clone(),
        conns: HashMap::new(),
        failing: BTreeMap::new(),
    };
    tokio::spawn(monitor.run(req_rx, refresh_rx));
    MonitorHandle {
        observation: obs_rx,
        collected,
        requests: req_tx,
        refreshes: refresh_tx,
        ttl: config.monitor.metrics_ttl,
    }
}

struct Monitor {
    cfg: MonitorConfig,
    socket_dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    superuser: String,
    /// Built-in and configuration-file queries.
    specs: Vec<QuerySpec>,
    /// Queries from the PostgresCluster's ConfigMap (Kubernetes), replaced as it changes.
    cluster_queries: watch::Receiver<Vec<QuerySpec>>,
    postmaster: watch::Receiver<Status>,
    metrics: Arc<Metrics>,
    observation: watch::Sender<Observation>,
    collected: Arc<Mutex<Collected>>,
    /// Persistent connections by database.
    conns: HashMap<String, Connection>,
    /// Queries currently failing (query, database) -> error, to log transitions only.
    failing: BTreeMap<(String, String), String>,
}

impl Monitor {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<oneshot::Sender<()>>,
        mut refreshes: mpsc::Receiver<oneshot::Sender<()>>,
    ) {
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut postmaster = self.postmaster.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => self.refresh().await,
                // React at once when Postgres becomes ready or goes away.
                Ok(()) = postmaster.changed() => self.refresh().await,
                Some(reply) = requests.recv() => {
                    self.collect_if_stale().await;
                    let _ = reply.send(());
                }
                Some(reply) = refreshes.recv() => {
                    if self.observation.borrow().heartbeat.elapsed() >= MIN_REFRESH_GAP {
                        self.refresh().await;
                    }
                    let _ = reply.send(());
                }
            }
        }
    }

    fn running(&self) -> bool {
        matches!(self.postmaster.borrow().state, State::Running { .. })
    }

    async fn refresh(&mut self) {
        let started = Instant::now();
        let result = if self.running() {
            self.read().await
        } else {
            self.conns.clear();
            Err("postgres is not running".to_string())
        };
        let now = Instant::now();
        self.observation.send_modify(|o| {
            o.heartbeat = now;
            match result {
                Ok(pg) => {
                    o.refreshed = Some(now);
                    o.error = None;
                    o.pg = Some(Arc::new(pg));
                }
                Err(e) => {
                    if o.error.as_ref() != Some(&e) && e != "postgres is not running" {
                        tracing::warn!(error = %e, "monitoring query failed");
                    }
                    if !self.running() {
                        o.pg = None;
                    }
                    o.error = Some(e);
                }
            }
        });
        if self.observation.borrow().error.is_some() {
            // A connection that timed out may be stuck behind a hung server: start afresh.
            self.conns.remove(DEFAULT_DB);
        }
        self.metrics
            .loop_duration
            .with_label_values(&["monitor"])
            .observe(started.elapsed().as_secs_f64());
    }

    /// One snapshot, each step bounded: connecting (when needed) by its own timeout, the
    /// queries by `query_timeout`, so a hung server is reported within that time.
    async fn read(&mut self) -> Result<PgState, String> {
        let data_dir = self.data_dir.clone();
        let timeout = self.cfg.query_timeout;
        let conn = self
            .connection(DEFAULT_DB)
            .await
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(timeout, snapshot::read(conn, &data_dir))
            .await
            .unwrap_or_else(|_| Err(format!("postgres did not answer within {timeout:?}")))
    }

    /// The persistent connection to `db`, opened on first use.
    async fn connection(&mut self, db: &str) -> Result<&Connection, ConnectError> {
        if !self.conns.contains_key(db) {
            if self.conns.len() >= MAX_DATABASES {
                return Err(ConnectError::Failed(format!(
                    "more than {MAX_DATABASES} databases; not connecting to {db}"
                )));
            }
            let conn = self.open(db).await?;
            self.conns.insert(db.to_string(), conn);
        }
        self.conns
            .get(db)
            .ok_or_else(|| ConnectError::Failed("connection vanished".into()))
    }

    /// Connects as the monitoring role; when it does not exist yet, creates it (on a primary)
    /// and uses the superuser for this connection.
    async fn open(&self, db: &str) -> Result<Connection, ConnectError> {
        let target = |user| Target {
            socket_dir: &self.socket_dir,
            port: self.port,
            user,
            dbname: db,
            application_name: "pgwarden-monitor",
            statement_timeout: self.cfg.query_timeout,
        };
        let conn = match connect_timeout(&target(MONITOR_ROLE)).await {
            Ok(c) => c,
            Err(ConnectError::Failed(e))
                if e.contains("does not exist") && e.contains(MONITOR_ROLE) =>
            {
                let admin = connect_timeout(&target(&self.superuser)).await?;
                if create_monitor_role(&admin).await {
                    drop(admin);
                    connect_timeout(&target(MONITOR_ROLE)).await?
                } else {
                    admin
                }
            }
            Err(e) => return Err(e),
        };
        Ok(conn)
    }

    async fn collect_if_stale(&mut self) {
        let fresh = {
            let c = self.collected.lock().unwrap_or_else(|p| p.into_inner());
            c.at.is_some_and(|t| t.elapsed() <= self.cfg.metrics_ttl)
        };
        if fresh {
            return;
        }
        let started = Instant::now();
        // Bounded as a whole so the loop's heartbeat stays fresh even when Postgres hangs.
        let budget = collection_budget(&self.cfg);
        let samples = if self.running() {
            tokio::time::timeout(budget, self.collect())
                .await
                .ok()
                .flatten()
        } else {
            Some(Vec::new())
        };
        let hung = samples.is_none();
        let mut c = self.collected.lock().unwrap_or_else(|p| p.into_inner());
        c.at = Some(Instant::now());
        match samples {
            Some(samples) => c.samples = samples,
            None => {
                tracing::warn!("postgres stopped answering during metric collection; serving the previous values");
                self.conns.clear();
            }
        }
        drop(c);
        if hung {
            let e = "postgres did not answer a metric query in time".to_string();
            self.observation.send_modify(|o| o.error = Some(e));
        }
        self.metrics
            .loop_duration
            .with_label_values(&["metrics"])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Runs every metric query; `None` when Postgres stopped answering midway (the previous
    /// values are then kept rather than a partial set).
    async fn collect(&mut self) -> Option<Vec<Sample>> {
        let is_primary = self
            .observation
            .borrow()
            .pg
            .as_ref()
            .is_some_and(|p| p.role == Role::Primary);
        let mut samples = Vec::new();
        let mut specs = std::mem::take(&mut self.specs);
        let own = specs.len();
        specs.extend(self.cluster_queries.borrow().iter().cloned());
        let mut hung = false;
        'queries: for spec in &specs {
            if spec.primary_only && !is_primary {
                continue;
            }
            let dbs = match &spec.databases {
                Databases::Default => vec![None],
                Databases::Named(names) => names.iter().cloned().map(Some).collect(),
                Databases::All => self.databases().await.into_iter().map(Some).collect(),
            };
            for db in dbs {
                // A long collection must not let the health snapshot go stale.
                if self.observation.borrow().heartbeat.elapsed() >= self.cfg.interval {
                    self.refresh().await;
                }
                let key = (spec.name.clone(), db.clone().unwrap_or_default());
                let failed = match self.run_query(spec, db.as_deref()).await {
                    Ok(mut s) => {
                        samples.append(&mut s);
                        if self.failing.remove(&key).is_some() {
                            tracing::info!(query = %spec.name, database = %key.1, "metric query works again");
                        }
                        false
                    }
                    Err(QueryError::TimedOut) => {
                        hung = true;
                        break 'queries;
                    }
                    Err(QueryError::Failed(e)) => {
                        if self.failing.get(&key) != Some(&e) {
                            tracing::error!(query = %spec.name, database = %key.1, error = %e, "metric query failed");
                        }
                        self.metrics
                            .query_errors
                            .with_label_values(&[&spec.name])
                            .inc();
                        self.failing.insert(key.clone(), e);
                        true
                    }
                };
                samples.push(
                    Sample::gauge(
                        "pgwarden_query_failing",
                        "1 when the metric query failed at the last collection",
                        f64::from(u8::from(failed)),
                    )
                    .label("query", spec.name.clone())
                    .label("database", key.1),
                );
            }
        }
        specs.truncate(own);
        self.specs = specs;
        (!hung).then_some(samples)
    }

    async fn run_query(
        &mut self,
        spec: &QuerySpec,
        db: Option<&str>,
    ) -> Result<Vec<Sample>, QueryError> {
        let name = db.unwrap_or(DEFAULT_DB);
        let timeout = self.cfg.query_timeout;
        let conn = match self.connection(name).await {
            Ok(c) => c,
            Err(ConnectError::TimedOut) => return Err(QueryError::TimedOut),
            Err(ConnectError::Failed(e)) => return Err(QueryError::Failed(e)),
        };
        match tokio::time::timeout(timeout, spec.run(conn, db)).await {
            Ok(result) => result.map_err(QueryError::Failed),
            Err(_) => {
                // The connection may be stuck behind a hung server: never reuse it.
                self.conns.remove(name);
                Err(QueryError::TimedOut)
            }
        }
    }

    async fn databases(&mut self) -> Vec<String> {
        let timeout = self.cfg.query_timeout;
        let rows = tokio::time::timeout(timeout, async {
            let conn = self
                .connection(DEFAULT_DB)
                .await
                .map_err(|e| e.to_string())?;
            conn.query(
                "SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
                &[],
            )
            .await
            .map_err(|e| e.to_string())
        })
        .await;
        match rows {
            Ok(Ok(rows)) => rows.iter().filter_map(|r| r.try_get(0).ok()).collect(),
            _ => Vec::new(),
        }
    }
}

enum QueryError {
    /// No answer in time: Postgres may be hung.
    TimedOut,
    Failed(String),
}

/// Longest a metric collection may take.
fn collection_budget(cfg: &MonitorConfig) -> Duration {
    2 * (cfg.query_timeout + CONNECT_TIMEOUT)
}

/// The monitoring loop is wedged when its heartbeat is older than this: one interval plus the
/// longest bounded piece of work (a refresh or a collection), with a margin.
pub fn heartbeat_deadline(cfg: &MonitorConfig) -> Duration {
    cfg.interval
        + collection_budget(cfg)
        + cfg.query_timeout
        + CONNECT_TIMEOUT
        + Duration::from_secs(1)
}

/// Postgres is unresponsive when it has not answered for this long.
pub fn freshness(cfg: &MonitorConfig) -> Duration {
    2 * cfg.interval + cfg.query_timeout
}

/// Creates the monitoring role on a primary; false when it cannot (a standby of a cluster
/// that lacks it: the superuser then monitors until the role replicates over).
async fn create_monitor_role(conn: &Connection) -> bool {
    // Local commit: in quorum mode this must not wait for standbys that may not exist yet.
    let sql = format!(
        "SET synchronous_commit = local; DO $$ BEGIN
           IF NOT pg_is_in_recovery() AND NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{MONITOR_ROLE}') THEN
             CREATE ROLE {MONITOR_ROLE} LOGIN;
             GRANT pg_monitor TO {MONITOR_ROLE};
           END IF;
         END $$"
    );
    if let Err(e) = conn.batch_execute(&sql).await {
        tracing::warn!(error = %e, "cannot create the monitoring role; monitoring as the superuser");
        return false;
    }
    match conn
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = $1",
            &[&MONITOR_ROLE],
        )
        .await
    {
        Ok(row) if row.get::<_, i64>(0) == 1 => {
            tracing::info!(role = MONITOR_ROLE, "monitoring role ensured");
            true
        }
        _ => false,
    }
}
