//! The postmaster actor: the one task that owns the `postgres` child process.
//!
//! Everything else sends it [`Command`]s and watches its [`Status`]. It renders the
//! configuration before every start, spawns `postgres -D` directly, declares it ready only
//! after `postmaster.pid` says so *and* a real connection succeeds, restarts it with
//! exponential backoff when it dies unexpectedly, and gives up (state [`State::Failed`]) after
//! too many crashes in a window, so that pgwarden exits and the kubelet restarts the container.

use std::collections::VecDeque;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::sleep_until;

use crate::config::{PostgresConfig, ShutdownConfig, SupervisionConfig};
use crate::postgres::binaries::Binaries;
use crate::postgres::conf;
use crate::postgres::log::ServerLog;
use crate::supervisor::reaper::{ExitStatus, Reaper};

/// Postgres's three shutdown modes, in increasing severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopMode {
    /// Wait for clients to disconnect (SIGTERM).
    Smart,
    /// Disconnect clients, checkpoint (SIGINT).
    Fast,
    /// Exit at once; crash recovery on the next start (SIGQUIT).
    Immediate,
}

impl StopMode {
    fn signal(self) -> Signal {
        match self {
            StopMode::Smart => Signal::SIGTERM,
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        }
    }
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOutcome {
    /// The most severe mode that was needed; `None` when nothing was running.
    pub mode: Option<StopMode>,
    /// Whether the postmaster had to be killed with SIGKILL.
    pub killed: bool,
    pub status: Option<ExitStatus>,
}

impl StopOutcome {
    /// A stop that left a consistent data directory: nothing ran, or a smart or fast shutdown
    /// that exited 0.
    pub fn clean(&self) -> bool {
        match (self.mode, self.status) {
            (None, _) => true,
            (Some(mode), Some(status)) => {
                !self.killed && mode <= StopMode::Fast && status.success()
            }
            _ => false,
        }
    }
}

/// The postmaster's lifecycle, as seen by everyone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Before the first start: the data directory is being prepared.
    Initializing,
    /// Not running, on purpose (after a stop).
    Stopped,
    /// Spawned, not yet accepting connections. `crash_recovery` when the data directory was
    /// not shut down cleanly, so WAL replay (of unknown length) comes first.
    Starting { pid: i32, crash_recovery: bool },
    /// Accepting connections since `since`.
    Running { pid: i32, since: Instant },
    /// Shutting down in the given mode.
    Stopping { pid: i32, mode: StopMode },
    /// Died unexpectedly; restarting after a backoff.
    Restarting { crashes_in_window: u32 },
    /// Died too often; pgwarden gives up.
    Failed { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// Unexpected postmaster exits since pgwarden started.
    pub crashes: u64,
    /// Postmaster starts since pgwarden started.
    pub starts: u64,
    /// Whether Postgres has accepted connections at least once.
    pub ever_ready: bool,
    /// Held stopped by fencing (manual or self-fencing) until the next start.
    pub fenced: bool,
}

type Reply<T> = oneshot::Sender<T>;

pub enum Command {
    /// Start if not running; replies once ready or when the start failed.
    Start(Reply<Result<(), String>>),
    /// Stop, escalating smart -> fast -> immediate -> SIGKILL on the configured timeouts.
    Stop(StopMode, Reply<StopOutcome>),
    /// Fast stop, then start; replies once ready again.
    Restart(Reply<Result<(), String>>),
    /// Re-render the configuration files (with new settings when given) and signal a reload.
    Reload(Option<Box<PostgresConfig>>, Reply<Result<(), String>>),
    /// Stop and stay stopped until the next Start (HA: fencing, demotion, rewind, clone);
    /// unlike Stop, pgwarden is not shutting down. `fenced` is reported in the status.
    Halt {
        mode: StopMode,
        fenced: bool,
        reply: Reply<StopOutcome>,
    },
    /// Replace the replication settings (standby upstream, synchronous standbys) and reload.
    SetReplication(conf::Replication, Reply<Result<(), String>>),
    /// Promote the running standby, with these `synchronous_standby_names` in force from its
    /// first write; replies once it accepts writes.
    Promote(Option<String>, Reply<Result<(), String>>),
}

/// Handle used to talk to the actor.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }
    pub async fn start(&self) -> Result<(), String> {
        self.call(Command::Start)
            .await
            .unwrap_or_else(|| Err("postmaster actor is gone".into()))
    }
    /// Sends a stop and returns the receiver of its outcome without waiting for it.
    pub async fn begin_stop(&self, mode: StopMode) -> Option<oneshot::Receiver<StopOutcome>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Stop(mode, tx)).await.ok()?;
        Some(rx)
    }
    pub async fn restart(&self) -> Result<(), String> {
        self.call(Command::Restart)
            .await
            .unwrap_or_else(|| Err("postmaster actor is gone".into()))
    }
    pub async fn reload(&self, settings: Option<PostgresConfig>) -> Result<(), String> {
        self.call(|r| Command::Reload(settings.map(Box::new), r))
            .await
            .unwrap_or_else(|| Err("postmaster actor is gone".into()))
    }
    /// Stops Postgres and keeps it stopped until the next start.
    pub async fn halt(&self, mode: StopMode, fenced: bool) -> Option<StopOutcome> {
        self.call(|reply| Command::Halt {
            mode,
            fenced,
            reply,
        })
        .await
    }
    pub async fn set_replication(&self, r: conf::Replication) -> Result<(), String> {
        self.call(|reply| Command::SetReplication(r, reply))
            .await
            .unwrap_or_else(|| Err("postmaster actor is gone".into()))
    }
    pub async fn promote(&self, synchronous_standby_names: Option<String>) -> Result<(), String> {
        self.call(|r| Command::Promote(synchronous_standby_names, r))
            .await
            .unwrap_or_else(|| Err("postmaster actor is gone".into()))
    }
}

/// What the actor needs to run Postgres.
pub struct Spec {
    pub settings: PostgresConfig,
    pub binaries: Binaries,
    pub os_user: String,
    pub shutdown: ShutdownConfig,
    pub supervision: SupervisionConfig,
}

/// The status channel, created before the actor so that probes can report the bootstrap.
pub fn status_channel() -> (watch::Sender<Status>, watch::Receiver<Status>) {
    watch::channel(Status {
        state: State::Initializing,
        crashes: 0,
        starts: 0,
        ever_ready: false,
        fenced: false,
    })
}

/// Starts the actor, which publishes on `status_tx`.
pub fn spawn(
    spec: Spec,
    reaper: Reaper,
    log: ServerLog,
    status_tx: watch::Sender<Status>,
) -> Handle {
    let (tx, rx) = mpsc::channel(16);
    let actor = Actor {
        spec,
        reaper,
        log,
        status: status_tx,
        phase: Phase::Stopped,
        child: None,
        crash_times: VecDeque::new(),
        start_waiters: Vec::new(),
        stop_waiters: Vec::new(),
        shutting_down: false,
        reload_when_ready: false,
    };
    tokio::spawn(actor.run(rx));
    Handle { tx }
}

struct ChildProc {
    pid: Pid,
    exit: oneshot::Receiver<ExitStatus>,
}

enum Phase {
    Stopped,
    Starting {
        ready: oneshot::Receiver<()>,
        probe: tokio::task::JoinHandle<()>,
    },
    Running,
    Stopping {
        mode: StopMode,
        killed: bool,
        deadline: Option<Instant>,
        then_start: bool,
    },
    Backoff {
        until: Instant,
    },
    Failed,
}

enum Event {
    Command(Option<Command>),
    Exited(ExitStatus),
    Ready,
    Timer,
}

struct Actor {
    spec: Spec,
    reaper: Reaper,
    log: ServerLog,
    status: watch::Sender<Status>,
    phase: Phase,
    child: Option<ChildProc>,
    crash_times: VecDeque<Instant>,
    start_waiters: Vec<Reply<Result<(), String>>>,
    stop_waiters: Vec<Reply<StopOutcome>>,
    /// Set by the first Stop: from then on nothing starts Postgres again (a restart that
    /// overlaps a shutdown must not resurrect it).
    shutting_down: bool,
    /// A reload arrived while starting: signal it once ready.
    reload_when_ready: bool,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let event = self.next_event(&mut rx).await;
            match event {
                Event::Command(Some(cmd)) => self.handle(cmd).await,
                Event::Command(None) => {
                    // Every handle is gone: nobody can stop us any more, so stop now.
                    if self.child.is_some() {
                        self.begin_stop(StopMode::Fast, false);
                        continue;
                    }
                    return;
                }
                Event::Exited(status) => self.on_exit(status).await,
                Event::Ready => self.on_ready(),
                Event::Timer => self.on_timer(),
            }
        }
    }

    async fn next_event(&mut self, rx: &mut mpsc::Receiver<Command>) -> Event {
        let deadline = match &self.phase {
            Phase::Stopping { deadline, .. } => *deadline,
            Phase::Backoff { until } => Some(*until),
            _ => None,
        };
        let (child, phase) = (&mut self.child, &mut self.phase);
        let exit = async move {
            match child {
                Some(c) => (&mut c.exit).await.ok(),
                None => std::future::pending().await,
            }
        };
        let ready = async move {
            match phase {
                Phase::Starting { ready, .. } => ready.await.ok(),
                _ => std::future::pending().await,
            }
        };
        let timer = async {
            match deadline {
                Some(t) => sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            cmd = rx.recv() => Event::Command(cmd),
            Some(status) = exit => Event::Exited(status),
            Some(()) = ready => Event::Ready,
            () = timer => Event::Timer,
        }
    }

    fn publish(&self, state: State) {
        self.status.send_modify(|s| s.state = state);
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.pid.as_raw())
    }

    async fn handle(&mut self, cmd: Command) {
        if self.shutting_down {
            match cmd {
                Command::Start(reply) | Command::Restart(reply) => {
                    let _ = reply.send(Err("pgwarden is shutting down".into()));
                    return;
                }
                _ => {}
            }
        }
        match cmd {
            Command::Start(reply) => match self.phase {
                Phase::Running => {
                    let _ = reply.send(Ok(()));
                }
                Phase::Starting { .. } => self.start_waiters.push(reply),
                Phase::Stopping {
                    ref mut then_start, ..
                } => {
                    *then_start = true;
                    self.start_waiters.push(reply);
                }
                Phase::Stopped | Phase::Backoff { .. } | Phase::Failed => {
                    self.start_waiters.push(reply);
                    self.start();
                }
            },
            Command::Stop(mode, reply) => {
                self.shutting_down = true;
                self.fail_start_waiters("stopped on request");
                if let Phase::Stopping { then_start, .. } = &mut self.phase {
                    *then_start = false;
                }
                self.stop_now(mode, reply);
            }
            Command::Restart(reply) => {
                self.start_waiters.push(reply);
                if self.child.is_some() {
                    self.begin_stop(StopMode::Fast, true);
                } else {
                    self.start();
                }
            }
            Command::Reload(settings, reply) => {
                let result = self.reload(settings).await;
                let _ = reply.send(result);
            }
            Command::Halt {
                mode,
                fenced,
                reply,
            } => {
                self.fail_start_waiters("stopped on request");
                if fenced {
                    self.status.send_modify(|s| s.fenced = true);
                }
                if let Phase::Stopping { then_start, .. } = &mut self.phase {
                    *then_start = false;
                }
                self.stop_now(mode, reply);
            }
            Command::SetReplication(r, reply) => {
                self.spec.settings.replication = r;
                let result = self.reload(None).await;
                let _ = reply.send(result);
            }
            Command::Promote(names, reply) => self.promote(names, reply),
        }
    }

    /// Stops the postmaster in `mode`, replying once it exited; with nothing running (a
    /// pending restart included) it replies at once and cancels the restart.
    fn stop_now(&mut self, mode: StopMode, reply: Reply<StopOutcome>) {
        if self.child.is_none() {
            self.phase = Phase::Stopped;
            self.publish(State::Stopped);
            self.fail_start_waiters("stopped on request");
            let _ = reply.send(StopOutcome {
                mode: None,
                killed: false,
                status: None,
            });
        } else {
            self.stop_waiters.push(reply);
            self.begin_stop(mode, false);
        }
    }

    /// Promotes with `pg_promote` (which waits until the server accepts writes). The files
    /// stay as they are meanwhile (Postgres removes `standby.signal` itself, and fails if it
    /// is gone already); the caller renders the primary's settings afterwards. The
    /// synchronous standbys are set and reloaded first, so that no commit of the new primary
    /// is acknowledged before a standby has it (quorum mode).
    fn promote(&mut self, names: Option<String>, reply: Reply<Result<(), String>>) {
        let Some(pid) = self
            .child
            .as_ref()
            .map(|c| c.pid)
            .filter(|_| matches!(self.phase, Phase::Running))
        else {
            let _ = reply.send(Err("postgres is not running".into()));
            return;
        };
        let reload = names.is_some();
        self.spec.settings.replication.synchronous_standby_names = names;
        if let Err(e) = self.render() {
            let _ = reply.send(Err(e));
            return;
        }
        if reload {
            if let Err(e) = kill(pid, Signal::SIGHUP) {
                let _ = reply.send(Err(format!("cannot signal the postmaster: {e}")));
                return;
            }
        }
        let s = &self.spec.settings;
        let (run_dir, port, user) = (s.run_dir.clone(), s.port, s.superuser.clone());
        tokio::spawn(async move {
            if reload {
                // Every process re-reads the file on SIGHUP within milliseconds (the
                // checkpointer publishes whether commits wait); give them that before writes
                // are possible.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = reply.send(promote(&run_dir, port, &user).await);
        });
    }

    /// Applies new settings only when Postgres accepts them: the candidate postgresql.conf is
    /// checked by `postgres -C` first, so a rejected value is reported with Postgres's own
    /// message and the running configuration stays as it was.
    async fn reload(&mut self, settings: Option<Box<PostgresConfig>>) -> Result<(), String> {
        if let Some(settings) = settings {
            let mut settings = settings;
            // The HA elector owns replication; a reload of the user's settings keeps it.
            settings.replication = self.spec.settings.replication.clone();
            if !self.spec.settings.data_dir.join("PG_VERSION").exists() {
                // No cluster yet (initdb or a clone comes first): Postgres cannot check the
                // files without one; they are rendered, and checked by the start.
                self.spec.settings = *settings;
                return Ok(());
            }
            if *settings != self.spec.settings {
                let candidate = conf::render(&settings, &self.spec.os_user);
                conf::check(
                    &self.reaper,
                    &self.spec.binaries.postgres(),
                    &settings,
                    &candidate,
                )
                .await?;
                let previous = std::mem::replace(&mut self.spec.settings, *settings);
                if previous.pg_hba != self.spec.settings.pg_hba {
                    if let Err(e) = self.check_hba().await {
                        // Put the last good files back before anyone reads the bad ones.
                        self.spec.settings = previous;
                        self.render()?;
                        return Err(e);
                    }
                }
            }
        }
        self.render()?;
        match (&self.child, &self.phase) {
            (Some(c), Phase::Running) => kill(c.pid, Signal::SIGHUP)
                .map_err(|e| format!("cannot signal the postmaster: {e}")),
            // A postmaster that has not installed its handlers yet dies of SIGHUP; it reads
            // the files rendered now, and gets a SIGHUP once ready in case it read them early.
            (Some(_), Phase::Starting { .. }) => {
                self.reload_when_ready = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Writes the candidate files and asks the running server whether it accepts the new
    /// pg_hba.conf (`pg_hba_file_rules` parses the file on disk); `postgres -C` does not read
    /// it. Without a running server there is nobody to ask: the next start reports an error.
    async fn check_hba(&self) -> Result<(), String> {
        if !matches!(self.phase, Phase::Running) {
            return Ok(());
        }
        self.render()?;
        let target = crate::postgres::connect::Target::admin(&self.spec.settings);
        let conn = crate::postgres::connect::connect_timeout(&target)
            .await
            .map_err(|e| format!("cannot check pg_hba.conf: {e}"))?;
        let rows = tokio::time::timeout(
            Duration::from_secs(5),
            conn.query(
                "SELECT line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL ORDER BY 1",
                &[],
            ),
        )
        .await
        .map_err(|_| "checking pg_hba.conf timed out".to_string())?
        .map_err(|e| format!("cannot check pg_hba.conf: {e}"))?;
        if rows.is_empty() {
            return Ok(());
        }
        let problems: Vec<String> = rows
            .iter()
            .map(|r| {
                let line: Option<i32> = r.try_get(0).ok();
                let error: String = r.try_get(1).unwrap_or_default();
                format!("pg_hba.conf line {}: {error}", line.unwrap_or(0))
            })
            .collect();
        Err(problems.join("; "))
    }

    fn render(&self) -> Result<(), String> {
        let s = &self.spec.settings;
        // Not a cluster yet (the elector is about to initdb or clone into it): nothing to
        // render into; every start renders first anyway.
        if !s.data_dir.join("PG_VERSION").exists() {
            return Ok(());
        }
        conf::render(s, &self.spec.os_user)
            .write(&s.data_dir)
            .map_err(|e| {
                format!(
                    "cannot write configuration into {}: {e}",
                    s.data_dir.display()
                )
            })
    }

    fn start(&mut self) {
        let crash_recovery = !cleanly_shut_down(&self.spec.settings.data_dir);
        if let Err(message) = self.render().and_then(|()| self.spawn_postgres()) {
            tracing::error!(error = %message, "cannot start postgres");
            self.on_crash(message);
            return;
        }
        let pid = self.pid();
        self.status.send_modify(|s| {
            s.starts += 1;
            s.fenced = false;
            s.state = State::Starting {
                pid,
                crash_recovery,
            };
        });
        let (tx, ready) = oneshot::channel();
        let s = &self.spec.settings;
        let probe = tokio::spawn(wait_ready(
            s.data_dir.clone(),
            s.run_dir.clone(),
            s.port,
            s.superuser.clone(),
            tx,
        ));
        self.phase = Phase::Starting { ready, probe };
        tracing::info!(pid, crash_recovery, "postmaster started");
    }

    fn spawn_postgres(&mut self) -> Result<(), String> {
        self.log.clear_recent();
        // Without libpq's variables: the server passes its environment on to its own libpq
        // connections (the WAL receiver's primary_conninfo) and to archive/restore commands.
        let mut cmd = crate::postgres::command(self.spec.binaries.postgres());
        cmd.arg("-D")
            .arg(&self.spec.settings.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches pgwarden only, which decides.
            .process_group(0);
        let child = self.reaper.spawn(&mut cmd).map_err(|e| {
            format!(
                "cannot execute {}: {e}",
                self.spec.binaries.postgres().display()
            )
        })?;
        if let Some(out) = child.stdout {
            self.log.attach(out, "postgres-stdout");
        }
        if let Some(err) = child.stderr {
            self.log.attach(err, "postgres-stderr");
        }
        self.child = Some(ChildProc {
            pid: child.pid,
            exit: child.exit,
        });
        Ok(())
    }

    fn on_ready(&mut self) {
        // Startup chatter is no longer relevant to a later crash report.
        self.log.clear_recent();
        if std::mem::take(&mut self.reload_when_ready) {
            if let Some(c) = &self.child {
                let _ = kill(c.pid, Signal::SIGHUP);
            }
        }
        self.phase = Phase::Running;
        let pid = self.pid();
        self.status.send_modify(|s| {
            s.ever_ready = true;
            s.state = State::Running {
                pid,
                since: Instant::now(),
            };
        });
        tracing::info!(pid, "postgres is ready to accept connections");
        for w in self.start_waiters.drain(..) {
            let _ = w.send(Ok(()));
        }
    }

    fn begin_stop(&mut self, mode: StopMode, then_start: bool) {
        let Some(pid) = self.child.as_ref().map(|c| c.pid) else {
            return;
        };
        let (current, killed, restart) = match &self.phase {
            Phase::Stopping {
                mode,
                killed,
                then_start,
                ..
            } => (Some(*mode), *killed, *then_start),
            _ => (None, false, false),
        };
        if let Phase::Starting { probe, .. } = &self.phase {
            probe.abort();
        }
        if current.is_some_and(|c| c >= mode) || killed {
            return; // already stopping at least this hard
        }
        tracing::info!(pid = pid.as_raw(), ?mode, "stopping postgres");
        if let Err(e) = kill(pid, mode.signal()) {
            tracing::warn!(error = %e, "cannot signal the postmaster");
        }
        self.phase = Phase::Stopping {
            mode,
            killed: false,
            deadline: Some(Instant::now() + self.timeout(mode)),
            then_start: (then_start || restart) && !self.shutting_down,
        };
        self.publish(State::Stopping {
            pid: pid.as_raw(),
            mode,
        });
    }

    fn timeout(&self, mode: StopMode) -> Duration {
        let t = &self.spec.shutdown;
        match mode {
            StopMode::Smart => t.smart_timeout,
            StopMode::Fast => t.fast_timeout,
            StopMode::Immediate => t.immediate_timeout,
        }
    }

    fn on_timer(&mut self) {
        match self.phase {
            Phase::Backoff { .. } => self.start(),
            Phase::Stopping {
                mode, then_start, ..
            } => {
                let next = match mode {
                    StopMode::Smart => Some(StopMode::Fast),
                    StopMode::Fast => Some(StopMode::Immediate),
                    StopMode::Immediate => None,
                };
                match next {
                    Some(next) => {
                        tracing::warn!(from = ?mode, to = ?next, "shutdown timed out; escalating");
                        self.begin_stop(next, then_start);
                    }
                    None => {
                        tracing::error!("immediate shutdown timed out; killing the postmaster");
                        if let Some(c) = &self.child {
                            let _ = kill(c.pid, Signal::SIGKILL);
                        }
                        self.phase = Phase::Stopping {
                            mode,
                            killed: true,
                            deadline: None,
                            then_start,
                        };
                    }
                }
            }
            _ => {}
        }
    }

    async fn on_exit(&mut self, status: ExitStatus) {
        self.child = None;
        // Let the log pumps drain Postgres's last words (its final FATAL usually comes after
        // the exit is noticed) so that reports and the shutdown log carry them.
        tokio::time::sleep(Duration::from_millis(150)).await;
        match std::mem::replace(&mut self.phase, Phase::Stopped) {
            Phase::Stopping {
                mode,
                killed,
                then_start,
                ..
            } => {
                tracing::info!(%status, ?mode, "postgres stopped");
                let outcome = StopOutcome {
                    mode: Some(mode),
                    killed,
                    status: Some(status),
                };
                for w in self.stop_waiters.drain(..) {
                    let _ = w.send(outcome);
                }
                self.publish(State::Stopped);
                if then_start && !self.shutting_down {
                    self.start();
                }
            }
            Phase::Starting { probe, .. } => {
                probe.abort();
                self.on_crash(format!("postgres exited during startup ({status})"));
            }
            _ => self.on_crash(format!("postgres exited unexpectedly ({status})")),
        }
    }

    fn on_crash(&mut self, what: String) {
        let now = Instant::now();
        let window = self.spec.supervision.crash_window;
        self.crash_times.push_back(now);
        while self
            .crash_times
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.crash_times.pop_front();
        }
        let n = self.crash_times.len() as u32;
        let messages = self.log.recent();
        let reason = if messages.is_empty() {
            what.clone()
        } else {
            format!("{what}: {}", messages.join(" | "))
        };
        self.status.send_modify(|s| s.crashes += 1);
        self.fail_start_waiters(&reason);
        let sv = &self.spec.supervision;
        if n >= sv.max_crashes {
            tracing::error!(crashes = n, window = ?window, postgres = ?messages, "{what}; giving up");
            let reason = format!("{n} crashes within {window:?}; last: {reason}");
            self.phase = Phase::Failed;
            self.publish(State::Failed { reason });
            return;
        }
        let delay = sv
            .backoff_initial
            .saturating_mul(1u32 << (n - 1).min(16))
            .min(sv.backoff_max);
        tracing::error!(crashes_in_window = n, retry_in = ?delay, postgres = ?messages, "{what}");
        self.phase = Phase::Backoff { until: now + delay };
        self.publish(State::Restarting {
            crashes_in_window: n,
        });
    }

    fn fail_start_waiters(&mut self, reason: &str) {
        for w in self.start_waiters.drain(..) {
            let _ = w.send(Err(reason.to_string()));
        }
    }
}

/// `pg_promote`, bounded: the server ends recovery and accepts writes before it returns.
async fn promote(run_dir: &Path, port: u16, user: &str) -> Result<(), String> {
    let target = crate::postgres::connect::Target {
        socket_dir: run_dir,
        port,
        user,
        dbname: "postgres",
        application_name: "pgwarden",
        statement_timeout: PROMOTE_TIMEOUT + Duration::from_secs(5),
    };
    let conn = crate::postgres::connect::connect_timeout(&target)
        .await
        .map_err(|e| format!("cannot connect to promote: {e}"))?;
    let sql = format!("SELECT pg_promote(true, {})", PROMOTE_TIMEOUT.as_secs());
    let row = tokio::time::timeout(
        PROMOTE_TIMEOUT + Duration::from_secs(5),
        conn.query_one(&sql, &[]),
    )
    .await
    .map_err(|_| "pg_promote did not return in time".to_string())?
    .map_err(|e| format!("pg_promote failed: {e}"))?;
    if row.try_get::<_, bool>(0).unwrap_or(false) {
        tracing::info!("postgres promoted: accepting writes");
        // The new timeline reaches pg_control only with a checkpoint; pg_rewind on a former
        // primary reads it from there (writes are accepted meanwhile).
        if let Err(e) =
            tokio::time::timeout(PROMOTE_TIMEOUT, conn.batch_execute("CHECKPOINT")).await
        {
            tracing::warn!(error = %e, "checkpoint after promotion did not finish in time");
        }
        Ok(())
    } else {
        Err(format!(
            "postgres did not finish promoting within {PROMOTE_TIMEOUT:?}"
        ))
    }
}

const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls until `postmaster.pid` says ready (or standby) and a real connection succeeds.
async fn wait_ready(
    data_dir: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    user: String,
    done: oneshot::Sender<()>,
) {
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if !matches!(
            pid_file_status(&data_dir).as_deref(),
            Some("ready" | "standby")
        ) {
            continue;
        }
        if crate::postgres::connect::ping(&socket_dir, port, &user)
            .await
            .is_ok()
        {
            let _ = done.send(());
            return;
        }
    }
}

/// Whether `global/pg_control` says the cluster was shut down cleanly (as a primary or in
/// recovery). Anything else, including an unreadable file, means crash recovery may run.
fn cleanly_shut_down(data_dir: &Path) -> bool {
    // ControlFileData: system_identifier u64, pg_control_version u32, catalog_version_no u32,
    // then `state` (DBState) as a 32-bit value in native byte order.
    const STATE_OFFSET: usize = 16;
    const DB_SHUTDOWNED: u32 = 1;
    const DB_SHUTDOWNED_IN_RECOVERY: u32 = 2;
    let Ok(bytes) = std::fs::read(data_dir.join("global/pg_control")) else {
        return false;
    };
    let Some(raw) = bytes.get(STATE_OFFSET..STATE_OFFSET + 4) else {
        return false;
    };
    let state = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    matches!(state, DB_SHUTDOWNED | DB_SHUTDOWNED_IN_RECOVERY)
}

/// The status word on line 8 of `postmaster.pid` (`starting`, `ready`, `standby`, `stopping`).
pub fn pid_file_status(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().nth(7).map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_stop_rules() {
        let ok = Some(ExitStatus::Exited(0));
        let clean = |mode, killed, status| {
            StopOutcome {
                mode,
                killed,
                status,
            }
            .clean()
        };
        assert!(clean(None, false, None));
        assert!(clean(Some(StopMode::Smart), false, ok));
        assert!(clean(Some(StopMode::Fast), false, ok));
        assert!(!clean(Some(StopMode::Immediate), false, ok));
        assert!(!clean(Some(StopMode::Fast), true, ok));
        assert!(!clean(
            Some(StopMode::Fast),
            false,
            Some(ExitStatus::Exited(1))
        ));
    }
}
