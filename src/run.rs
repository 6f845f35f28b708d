//! `pgwarden run`: bootstrap, start the tasks, turn signals into orderly actions.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::config::Config;
use crate::ha;
use crate::health;
use crate::http;
use crate::k8s;
use crate::logging::LogFormat;
use crate::metrics::Metrics;
use crate::monitor::{self, queries, queries::QuerySpec};
use crate::postgres::binaries::Binaries;
use crate::postgres::datadir::{self, DataDir};
use crate::postgres::log::ServerLog;
use crate::supervisor::postmaster::{self, Handle, State, Status, StopMode};
use crate::supervisor::reaper::Reaper;
use crate::wal;

/// Exit code when Postgres could not be kept running (the kubelet restarts the container).
pub const EXIT_POSTGRES_FAILED: i32 = 3;
/// Exit code when the shutdown was not clean (immediate or killed).
pub const EXIT_UNCLEAN_STOP: i32 = 4;

pub struct Options {
    pub config: Config,
    pub config_path: Option<PathBuf>,
    pub log_format: LogFormat,
}

/// Runs until a signal stops us or Postgres cannot be kept alive; returns the exit code.
pub async fn run(opts: Options) -> anyhow::Result<i32> {
    let config = opts.config;
    let pg = &config.postgres;
    let reaper = Reaper::start().context("cannot install the SIGCHLD handler")?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        instance = %config.instance_name,
        pid = std::process::id(),
        "pgwarden starting"
    );
    let user_queries = load_user_queries(&config)?;
    let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);

    // Probes answer from the first moment, bootstrap included.
    let (status_tx, status_rx) = postmaster::status_channel();
    let (cluster_queries_tx, cluster_queries_rx) = watch::channel(Vec::new());
    let (max_lag_tx, max_lag_rx) = watch::channel(config.probes.max_standby_lag_bytes);
    let monitor = monitor::spawn(
        &config,
        user_queries,
        cluster_queries_rx,
        status_rx.clone(),
        metrics.clone(),
    );
    let (version_tx, version_rx) = watch::channel(String::from("unknown"));
    let (stop_http, stop_http_rx) = watch::channel(false);
    let assessor = health::Assessor {
        heartbeat_deadline: monitor::heartbeat_deadline(&config.monitor),
        freshness: monitor::freshness(&config.monitor),
    };
    let observations = monitor.observation.clone();
    // Filled by the TLS task (Kubernetes only); read by the HTTP servers from the start.
    let (tls_tx, tls_rx) = watch::channel(None);
    let state = http::AppState {
        inner: Arc::new(http::Shared {
            instance: config.instance_name.clone(),
            postgres_version: version_rx,
            postmaster: status_rx.clone(),
            monitor,
            metrics,
            reaper: reaper.clone(),
            max_standby_lag_bytes: max_lag_rx,
            assessor,
            kubernetes: std::sync::OnceLock::new(),
            wal: std::sync::OnceLock::new(),
            tls: tls_rx,
            scrape_wait: config.http.request_timeout / 2,
        }),
    };
    let servers = http::serve(
        state.clone(),
        config.http.status_listen,
        config.http.metrics_listen,
        config.http.request_timeout,
        stop_http_rx,
    )
    .await?;

    // Anything but a missing or empty directory or a cluster (unreadable, foreign files)
    // stops pgwarden here with the reason, before anything could initialise or clone over it.
    let found = datadir::inspect(&pg.data_dir).await?;
    let preferred = match found {
        DataDir::Cluster { major } => Some(major),
        DataDir::Empty => None,
    };
    let binaries = Binaries::locate(&reaper, pg.bin_dir.as_deref(), preferred).await?;
    binaries.check_tools()?;
    tracing::info!(bin_dir = %binaries.dir.display(), version = %binaries.version, "using PostgreSQL");
    let _ = version_tx.send(binaries.version.clone());
    // With Kubernetes the HA elector decides what an empty volume becomes (the first instance
    // initialises the cluster, the others clone it) and in which role Postgres starts.
    let ha = config.kubernetes.cluster.is_some();
    match found {
        DataDir::Empty if ha => {
            tracing::info!("empty data directory: the elector initialises or clones it")
        }
        DataDir::Empty => datadir::initdb(&reaper, &binaries, pg).await?,
        DataDir::Cluster { major } => {
            datadir::check_version(&pg.data_dir, major, &binaries)?;
            tracing::info!(data_dir = %pg.data_dir.display(), "using the existing cluster");
        }
    }
    if !matches!(found, DataDir::Empty) || !ha {
        datadir::ensure_mode(&pg.data_dir)?;
    }

    std::fs::create_dir_all(&pg.run_dir)
        .with_context(|| format!("cannot create run directory {}", pg.run_dir.display()))?;
    std::fs::set_permissions(&pg.run_dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot set the mode of {}", pg.run_dir.display()))?;
    let server_log = ServerLog::start(&pg.run_dir, opts.log_format)
        .context("cannot set up the server log pipes")?;
    // WAL archiving: the daemon listens before Postgres starts, which asks it from its first
    // archive or restore; Postgres gets archive_command / restore_command when configured.
    let wal = if wal::wanted(&config) {
        let w = wal::start(&config, &state.inner.metrics, observations.clone())?;
        let _ = state.inner.wal.set(w.clone());
        Some(w)
    } else {
        None
    };
    let mut pg_settings = pg.clone();
    // A standby's data directory stays one: the first rendering of the files must not drop
    // its standby.signal before the elector has said where to stream from.
    if pg.data_dir.join("standby.signal").exists() {
        pg_settings.replication.standby = Some(crate::postgres::conf::Upstream {
            conninfo: String::new(),
            slot: None,
        });
    }
    pg_settings.archive = wal
        .as_ref()
        .and_then(|w| w.settings())
        .map(|_| wal::commands(&wal::own_binary(), &wal::settings_path(&pg.run_dir)));

    let spec = postmaster::Spec {
        settings: pg_settings.clone(),
        binaries: binaries.clone(),
        os_user: os_user_name(),
        shutdown: config.shutdown.clone(),
        supervision: config.supervision.clone(),
    };
    let postmaster = postmaster::spawn(spec, reaper.clone(), server_log.clone(), status_tx);
    let kubernetes = k8s::start(k8s::Start {
        config: config.clone(),
        base: pg_settings.clone(),
        postmaster: postmaster.clone(),
        status: status_rx.clone(),
        observation: observations,
        assessor,
        cluster_queries: cluster_queries_tx,
        max_standby_lag: max_lag_tx,
        wal: wal.clone(),
        tls: tls_tx,
    })
    .await?;
    crate::backup::schedule::start(
        &config,
        reaper.clone(),
        wal.clone(),
        state.inner.monitor.observation.clone(),
        &state.inner.metrics,
        kubernetes.clone(),
    )?;
    let mut elector = None;
    if let Some(k) = kubernetes {
        if let Some(w) = &wal {
            wal::report_condition(w.state.clone(), k.clone());
        }
        elector = Some(ha::start(ha::Start {
            config: &config,
            shared: k.clone(),
            postmaster: postmaster.clone(),
            status: status_rx.clone(),
            observation: state.inner.monitor.observation.clone(),
            assessor,
            pg: pg_settings.clone(),
            binaries,
            reaper: reaper.clone(),
            server_log,
        }));
        let _ = state.inner.kubernetes.set(k);
    } else {
        // Not awaited: signals must be handled while Postgres starts (or recovers).
        let starter = postmaster.clone();
        tokio::spawn(async move {
            if let Err(e) = starter.start().await {
                tracing::warn!(error = %e, "first start did not succeed");
            }
        });
    }

    let mut signals = Signals::install()?;
    let mut reloader = Reloader {
        kubernetes: config.kubernetes.cluster.is_some(),
        current: config.clone(),
        path: opts.config_path,
    };
    let code = supervise(
        &postmaster,
        &reaper,
        status_rx,
        &mut signals,
        &mut reloader,
        elector,
    )
    .await;
    // Postgres has stopped (its own archiver ran until the end, served by the daemon): upload
    // what is still waiting, bounded by wal.drain_timeout.
    if let Some(w) = &wal {
        w.drain().await;
    }
    let _ = stop_http.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        for s in servers {
            let _ = s.await;
        }
    })
    .await;
    code
}

fn load_user_queries(config: &Config) -> anyhow::Result<Vec<QuerySpec>> {
    let Some(path) = &config.monitor.queries_file else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read monitor.queries_file {}", path.display()))?;
    let specs = queries::parse(&text).map_err(|e| {
        anyhow::anyhow!(
            "monitor.queries_file {} is not a valid queries file: {e}",
            path.display()
        )
    })?;
    for s in &specs {
        if let Some(reason) = &s.invalid {
            tracing::error!(query = %s.name, %reason, "custom metric query cannot be used");
        }
    }
    tracing::info!(queries = specs.len(), file = %path.display(), "custom metric queries loaded");
    Ok(specs)
}

/// The running phase: returns the exit code.
async fn supervise(
    postmaster: &Handle,
    reaper: &Reaper,
    mut status: watch::Receiver<Status>,
    signals: &mut Signals,
    reloader: &mut Reloader,
    elector: Option<tokio::sync::mpsc::Sender<crate::ha::elector::Command>>,
) -> anyhow::Result<i32> {
    loop {
        tokio::select! {
            _ = signals.term.recv() => {
                if let Some(e) = &elector {
                    hand_over(e).await;
                }
                return Ok(shutdown(postmaster, reaper, StopMode::Smart, signals).await);
            }
            _ = signals.int.recv() => return Ok(shutdown(postmaster, reaper, StopMode::Fast, signals).await),
            _ = signals.quit.recv() => return Ok(shutdown(postmaster, reaper, StopMode::Immediate, signals).await),
            _ = signals.hup.recv() => reloader.reload(postmaster).await,
            changed = status.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the postmaster actor stopped");
                }
                if let State::Failed { reason } = &status.borrow_and_update().state {
                    tracing::error!(%reason, "postgres cannot be kept running; exiting so the container is restarted");
                    return Ok(EXIT_POSTGRES_FAILED);
                }
            }
        }
    }
}

/// Before a SIGTERM stops Postgres, a primary passes its role to the best standby (no
/// waiting for the Lease to expire); bounded, so the pod's grace period is kept.
async fn hand_over(elector: &tokio::sync::mpsc::Sender<crate::ha::elector::Command>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if elector
        .send(crate::ha::elector::Command::Shutdown(tx))
        .await
        .is_err()
    {
        return;
    }
    if tokio::time::timeout(HAND_OVER_TIMEOUT, rx).await.is_err() {
        tracing::warn!("handing over took too long; stopping anyway");
    }
}

const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(20);

/// Orderly shutdown; a further SIGINT or SIGQUIT escalates.
async fn shutdown(
    postmaster: &Handle,
    reaper: &Reaper,
    mode: StopMode,
    signals: &mut Signals,
) -> i32 {
    tracing::info!(?mode, "shutdown requested");
    let Some(mut outcome) = postmaster.begin_stop(mode).await else {
        return EXIT_UNCLEAN_STOP;
    };
    let mut current = mode;
    let result = loop {
        tokio::select! {
            r = &mut outcome => break r,
            _ = signals.int.recv() => {
                // Each SIGINT escalates one step: smart -> fast -> immediate.
                current = if current == StopMode::Smart { StopMode::Fast } else { StopMode::Immediate };
                let _ = postmaster.begin_stop(current).await;
            }
            _ = signals.quit.recv() => { let _ = postmaster.begin_stop(StopMode::Immediate).await; }
            _ = signals.term.recv() => tracing::info!("already shutting down"),
            _ = signals.hup.recv() => tracing::info!("shutting down; reload ignored"),
        }
    };
    match result {
        Ok(o) if o.clean() => {
            tracing::info!(
                orphans_reaped = reaper.orphans_reaped(),
                "pgwarden stopped cleanly"
            );
            0
        }
        Ok(o) => {
            tracing::warn!(mode = ?o.mode, killed = o.killed, status = ?o.status.map(|s| s.to_string()), "postgres did not stop cleanly");
            EXIT_UNCLEAN_STOP
        }
        Err(_) => EXIT_UNCLEAN_STOP,
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// SIGHUP: re-read the configuration file; apply what can change while running.
struct Reloader {
    current: Config,
    path: Option<PathBuf>,
    /// With Kubernetes the PostgresCluster owns the Postgres settings.
    kubernetes: bool,
}

impl Reloader {
    async fn reload(&mut self, postmaster: &Handle) {
        let new = match Config::load(self.path.as_deref(), std::env::vars()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "configuration reload rejected; keeping the running configuration");
                return;
            }
        };
        let mut settings = new.postgres.clone();
        let old = &self.current.postgres;
        // Only parameters, pg_hba rules and listen settings can change under a running
        // instance; the rest needs a restart of pgwarden.
        let fixed = [
            ("postgres.data_dir", settings.data_dir != old.data_dir),
            ("postgres.run_dir", settings.run_dir != old.run_dir),
            ("postgres.bin_dir", settings.bin_dir != old.bin_dir),
            ("postgres.superuser", settings.superuser != old.superuser),
            // The monitor, the Kubernetes tasks and the WAL commands connect to this port.
            ("postgres.port", settings.port != old.port),
        ];
        for (key, changed) in fixed {
            if changed {
                tracing::warn!(
                    key,
                    "changing this key needs a restart of pgwarden; ignored"
                );
            }
        }
        settings.data_dir = old.data_dir.clone();
        settings.run_dir = old.run_dir.clone();
        settings.bin_dir = old.bin_dir.clone();
        settings.superuser = old.superuser.clone();
        settings.port = old.port;
        settings.archive = old.archive.clone();
        if new.wal != self.current.wal {
            tracing::warn!("changes of [wal] need a restart of pgwarden; ignored");
        }
        if new.http != self.current.http
            || new.shutdown != self.current.shutdown
            || new.supervision != self.current.supervision
        {
            tracing::warn!("changes outside [postgres] need a restart of pgwarden; ignored");
        }
        if self.kubernetes {
            // The PostgresCluster layers its parameters over these settings; rendering the file
            // alone would drop them. Re-render what runs and let Postgres re-read it.
            tracing::warn!(
                "postgres settings come from the PostgresCluster; SIGHUP only reloads them"
            );
            if let Err(e) = postmaster.reload(None).await {
                tracing::error!(error = %e, "reload failed");
            }
            return;
        }
        // Postgres reads listen_addresses at start only.
        let needs_restart = settings.listen_addresses != old.listen_addresses;
        let result = postmaster.reload(Some(settings.clone())).await;
        if result.is_ok() && needs_restart {
            // In the background: signals must stay handled while Postgres restarts.
            tracing::info!("listen_addresses changed; restarting postgres");
            let pm = postmaster.clone();
            tokio::spawn(async move {
                if let Err(e) = pm.restart().await {
                    tracing::error!(error = %e, "restart for the new listen_addresses failed");
                }
            });
        }
        match result {
            Ok(()) => {
                tracing::info!("configuration reloaded");
                self.current.postgres = settings;
            }
            Err(e) => tracing::error!(error = %e, "reload failed"),
        }
    }
}

fn os_user_name() -> String {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => {
            tracing::warn!(
                uid = uid.as_raw(),
                "no passwd entry for this user: peer authentication will fail"
            );
            uid.to_string()
        }
    }
}
