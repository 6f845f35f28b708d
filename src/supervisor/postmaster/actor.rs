//! The actor itself: its state, its events, and what it does on each.

use super::*;

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
    start_waiters: Vec<Reply<Result<(), PostmasterError>>>,
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
                    let _ = reply.send(Err(PostmasterError::ShuttingDown));
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
            Command::SetSsl(files, reply) => {
                self.spec.settings.ssl.files = files;
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
    fn promote(&mut self, names: Option<String>, reply: Reply<Result<(), PostmasterError>>) {
        let Some(pid) = self
            .child
            .as_ref()
            .map(|c| c.pid)
            .filter(|_| matches!(self.phase, Phase::Running))
        else {
            let _ = reply.send(Err(PostmasterError::NotRunning));
            return;
        };
        // A standby's files usually hold the set already (see the elector): then nothing
        // needs re-reading before the first commit.
        let reload =
            names.is_some() && names != self.spec.settings.replication.synchronous_standby_names;
        self.spec.settings.replication.synchronous_standby_names = names;
        if let Err(e) = self.render() {
            let _ = reply.send(Err(e));
            return;
        }
        if reload {
            if let Err(e) = kill(pid, Signal::SIGHUP) {
                let _ = reply.send(Err(PostmasterError::Io(format!(
                    "cannot signal the postmaster: {e}"
                ))));
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
            let _ = reply.send(
                server::promote(&run_dir, port, &user)
                    .await
                    .map_err(PostmasterError::Promote),
            );
        });
    }

    /// Applies new settings only when Postgres accepts them: the candidate postgresql.conf is
    /// checked by `postgres -C` first, so a rejected value is reported with Postgres's own
    /// message and the running configuration stays as it was.
    async fn reload(
        &mut self,
        settings: Option<Box<PostgresConfig>>,
    ) -> Result<(), PostmasterError> {
        if let Some(settings) = settings {
            let mut settings = settings;
            // The HA elector owns replication; a reload of the user's settings keeps it.
            settings.replication = self.spec.settings.replication.clone();
            // The TLS task owns the certificate files (the spec only says whether required).
            settings.ssl.files = self.spec.settings.ssl.files.clone();
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
                .map_err(|e| PostmasterError::Io(format!("cannot signal the postmaster: {e}"))),
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
    async fn check_hba(&self) -> Result<(), PostmasterError> {
        if !matches!(self.phase, Phase::Running) {
            return Ok(());
        }
        self.render()?;
        Ok(server::hba_errors(&crate::postgres::connect::Target::admin(
            &self.spec.settings,
        ))
        .await?)
    }

    fn render(&self) -> Result<(), PostmasterError> {
        let s = &self.spec.settings;
        // Not a cluster yet (the elector is about to initdb or clone into it): nothing to
        // render into; every start renders first anyway.
        if !s.data_dir.join("PG_VERSION").exists() {
            return Ok(());
        }
        conf::render(s, &self.spec.os_user)
            .write(&s.data_dir)
            .map_err(|e| {
                PostmasterError::Io(format!(
                    "cannot write configuration into {}: {e}",
                    s.data_dir.display()
                ))
            })
    }

    fn start(&mut self) {
        // Anything but a clean stop, an unreadable control file included, means crash recovery
        // may run.
        let crash_recovery = !crate::postgres::control::read(&self.spec.settings.data_dir)
            .is_ok_and(|c| c.state.clean());
        if let Err(e) = self
            .render()
            .map_err(|e| e.to_string())
            .and_then(|()| self.spawn_postgres())
        {
            tracing::error!(error = %e, "cannot start postgres");
            self.on_crash(e);
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
        let probe = tokio::spawn(server::wait_ready(
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
        // the exit is noticed) so that reports and the shutdown log carry them. Not after the
        // death of a running server: that restarts at once, and its log keeps flowing.
        if !matches!(self.phase, Phase::Running) {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
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
        // The first crash in the window restarts at once (a one-off, such as an OOM kill,
        // should cost no more than the restart); the backoff doubles from the second on.
        let delay = match n {
            0 | 1 => Duration::ZERO,
            n => sv
                .backoff_initial
                .saturating_mul(1u32 << (n - 2).min(16))
                .min(sv.backoff_max),
        };
        tracing::error!(crashes_in_window = n, retry_in = ?delay, postgres = ?messages, "{what}");
        self.phase = Phase::Backoff { until: now + delay };
        self.publish(State::Restarting {
            crashes_in_window: n,
        });
    }

    fn fail_start_waiters(&mut self, reason: &str) {
        for w in self.start_waiters.drain(..) {
            let _ = w.send(Err(PostmasterError::Start(reason.to_string())));
        }
    }
}
