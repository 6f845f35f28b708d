//! Long work as tasks: initialising, starting, promoting; and what follows when a task ends.

use super::*;

impl Elector {
    /// Starts the promotion of this standby as a task, once the Lease is renewed with the
    /// synchronous set it starts with; [`Elector::finished`] completes it.
    pub(super) async fn promote(&mut self, tick: &Tick, memory: &mut Memory, why: &'static str) {
        if tick.observed.local != Local::Replica {
            return; // a stopped or crashed holder is started by the next tick's decision
        }
        let starting = memory
            .task
            .as_ref()
            .is_some_and(|t| matches!(t.work(), Work::Start { .. }));
        if memory.task.is_some() && !starting {
            return;
        }
        if starting || !matches!(self.status.borrow().state, State::Running { .. }) {
            // Still recovering to a consistent state, which may never come (the WAL it needs
            // may be on an instance that is down): renewing the Lease meanwhile would keep
            // everyone else from taking over. It is given up; this standby competes again
            // once ready.
            if self.lease.held_by_me() {
                tracing::warn!(
                    "cannot promote a standby that is not ready yet; giving the Lease up"
                );
                self.give_up_lease().await;
            }
            return;
        }
        if let Some(published) = tick.observed.published.as_ref() {
            let mine = self.observation.borrow().pg.as_ref().map(|p| p.timeline);
            if mine.is_some_and(|t| t < published.timeline) {
                // Its promotion may pick a timeline ID the last primary used already (when
                // that primary's history file never reached this instance): the former
                // primary then rejoins by a new copy, never by a rewind that finds nothing
                // to do.
                tracing::warn!(
                    timeline = ?mine,
                    last_primary_timeline = published.timeline,
                    "promoting from a timeline older than the last primary's"
                );
                let mine = mine.unwrap_or_default();
                self.events
                    .warning(
                        "TimelineMayBeReused",
                        format!(
                            "{} promotes from timeline {mine}, older than the last primary's {}: \
                             the new timeline may take an ID already used, so the former primary \
                             rejoins by a new copy, not a rewind",
                            self.me, published.timeline
                        ),
                    )
                    .await;
            }
        }
        let Some(sync) = self.first_sync(tick).await else {
            return;
        };
        memory.published = Some(sync.clone());
        memory.prepared = None;
        let postmaster = self.postmaster.clone();
        let names = quorum::standby_names(&sync);
        let pg = self.pg.clone();
        let standbys: Vec<String> = tick.members.iter().map(|m| m.name.clone()).collect();
        memory.task = Some(Task::spawn(
            Work::Promote { sync, why },
            memory.wake.clone(),
            async move {
                postmaster.promote(names).await?;
                // The standbys' slots at once: a standby's walreceiver is refused until its
                // slot exists, and with quorum commit the first commit waits for one; the
                // leader's routine would create them only at its first tick.
                if let Err(e) = replica::sync_slots(&pg, &standbys).await {
                    tracing::warn!(error = %e, "cannot create the standbys' replication slots yet");
                }
                Ok::<(), crate::supervisor::postmaster::PostmasterError>(())
            },
        ));
    }

    /// Completes a task that ended.
    pub(super) async fn finished(
        &mut self,
        work: Work,
        outcome: Result<(), TaskError>,
        memory: &mut Memory,
    ) {
        match (work, outcome) {
            (Work::Promote { sync, why }, Ok(())) => {
                let primary = Replication {
                    standby: None,
                    synchronous_standby_names: quorum::standby_names(&sync),
                };
                if let Err(e) = self.postmaster.set_replication(primary).await {
                    tracing::error!(error = %e, "cannot render the primary's settings");
                }
                memory.following = None;
                memory.standby = false;
                memory.applied = quorum::InForce::seen(sync);
                self.events
                    .normal(
                        "Promoted",
                        format!("{} promoted to primary ({why})", self.me),
                    )
                    .await;
                self.shared.report_now.notify_one();
            }
            (Work::Promote { .. }, Err(e)) => {
                tracing::error!(error = %e, "promotion failed");
                self.events
                    .warning("PromotionFailed", format!("{}: {e}", self.me))
                    .await;
            }
            (work @ (Work::Initialise | Work::Restore), Ok(())) => {
                if work == Work::Initialise {
                    self.events
                        .normal(
                            "Initialized",
                            format!("{} initialised the cluster", self.me),
                        )
                        .await;
                }
                // Writable only on a Lease renewed just now; else the next decision starts it
                // (as a standby, promoted once renewed).
                let renewed = matches!(self.lease.renew().await, Ok(true));
                if work == Work::Restore {
                    // The restored copy becomes the data directory only under the Lease: one
                    // that was lost meanwhile may be restoring elsewhere. The copy stays in
                    // staging, which the next attempt clears.
                    if !renewed {
                        tracing::warn!("the Lease was not renewed after the restore: the restored copy is not used");
                        memory.retry_at = Some(Instant::now() + crate::ha::bootstrap::RETRY);
                        return;
                    }
                    if let Err(e) = crate::backup::bootstrap::commit(&self.pg).await {
                        self.restore_failed(&e, memory).await;
                        return;
                    }
                    memory.restore_failures = 0;
                }
                if !renewed {
                    return;
                }
                if let Err(e) = self
                    .postmaster
                    .set_replication(Replication::default())
                    .await
                {
                    tracing::error!(error = %e, "cannot configure the new primary");
                    return;
                }
                memory.standby = false;
                self.start(Work::Start { primary: true }, memory);
            }
            (Work::Initialise, Err(e)) => {
                tracing::error!(error = %e, "initdb failed");
                self.events.warning("InitdbFailed", e.to_string()).await;
            }
            (Work::Restore, Err(e)) => self.restore_failed(&e.to_string(), memory).await,
            (Work::Clone { primary }, Ok(())) => {
                self.events
                    .normal("Cloned", format!("{} cloned from {primary}", self.me))
                    .await;
                memory.prepared = Some(primary);
                memory.retry_at = None;
            }
            (Work::Clone { .. }, Err(e)) => tracing::warn!(error = %e, "clone failed; retrying"),
            (Work::Rewind { primary, .. }, Ok(())) => {
                memory.rewind_failures = 0;
                memory.rewind_unreachable = None;
                self.events
                    .normal("Rewound", format!("{} rewound onto {primary}", self.me))
                    .await;
                memory.prepared = Some(primary);
                memory.retry_at = None;
            }
            (Work::Rewind { .. }, Err(TaskError::Unreachable(e))) => {
                // Not the data's fault: retried, and never counted towards a new copy; said
                // once per cause where an operator looks.
                tracing::warn!(error = %e, "pg_rewind cannot reach the primary; retrying");
                if memory.rewind_unreachable.as_deref() != Some(e.as_str()) {
                    self.events
                        .warning("CannotRewind", format!("{}: {e}; retrying", self.me))
                        .await;
                    memory.rewind_unreachable = Some(e);
                }
            }
            (Work::Rewind { reclone, .. }, Err(TaskError::Failed(e))) => {
                memory.rewind_failures += 1;
                tracing::error!(error = %e, attempt = memory.rewind_failures, "pg_rewind failed");
                if memory.rewind_failures >= REWIND_ATTEMPTS {
                    self.reclone(e, reclone, memory).await;
                }
            }
            (Work::Start { .. }, Ok(())) => {}
            (Work::Start { primary }, Err(e)) => {
                tracing::warn!(error = %e, primary, "postgres did not start");
                // Not following anyone: the next decision starts it again.
                memory.following = None;
            }
        }
    }

    /// Starts Postgres as a task (with the files as configured).
    pub(super) fn start(&self, work: Work, memory: &mut Memory) {
        let postmaster = self.postmaster.clone();
        memory.task = Some(Task::spawn(work, memory.wake.clone(), async move {
            postmaster.start().await
        }));
    }

    /// Holding the Lease with Postgres stopped (pgwarden restarted in place, or its first
    /// start): a former primary starts as a standby and is promoted, after a renewal, once it
    /// has recovered; never writable on the strength of a Lease this process has not renewed.
    pub(super) async fn start_primary(&mut self, tick: &Tick, memory: &mut Memory) {
        // Confirm the Lease first: this process may just have started (and an API server that
        // did not answer this tick's read would only hold the loop up).
        if tick.unanswered || !matches!(self.lease.renew().await, Ok(true)) {
            return;
        }
        if !tick.observed.has_data {
            if tick.observed.initialized {
                tracing::error!("holding the Lease without data; giving it up");
                self.give_up_lease().await;
            } else {
                self.initialise(&tick.spec, memory);
            }
            return;
        }
        tracing::info!("holding the Lease: starting as a standby, promoting once recovered");
        self.start_standby(None, tick, memory).await;
    }

    pub(super) async fn bootstrap(&mut self, spec: &PostgresClusterSpec, memory: &mut Memory) {
        match self.lease.acquire().await {
            Ok(true) => self.initialise(spec, memory),
            Ok(false) => tracing::info!("another instance is initialising the cluster"),
            Err(e) => tracing::warn!(error = %e, "cannot create the Lease"),
        }
    }

    /// Runs initdb as a task (the Lease is kept meanwhile); the first start follows it.
    /// With `spec.bootstrap.recovery`, a restore instead, never initdb.
    pub(super) fn initialise(&self, spec: &PostgresClusterSpec, memory: &mut Memory) {
        if memory.task.is_some() {
            return;
        }
        let context = crate::ha::bootstrap::Context {
            me: self.me.clone(),
            shared: self.shared.clone(),
            events: self.events.clone(),
            wal: self.wal.clone(),
            pg: self.pg.clone(),
            reaper: self.reaper.clone(),
        };
        if let Some(job) = crate::ha::bootstrap::job(spec, context) {
            memory.task = Some(Task::spawn(Work::Restore, memory.wake.clone(), job));
            return;
        }
        let (reaper, binaries, pg) = (self.reaper.clone(), self.binaries.clone(), self.pg.clone());
        memory.task = Some(Task::spawn(
            Work::Initialise,
            memory.wake.clone(),
            async move {
                datadir::initdb(&reaper, &binaries, &pg)
                    .await
                    .map_err(|e| e.to_string())?;
                let dir = pg.data_dir.clone();
                tokio::task::spawn_blocking(move || datadir::ensure_mode(&dir))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("cannot set the data directory's mode: {e}"))
            },
        ));
    }

    async fn restore_failed(&self, error: &str, memory: &mut Memory) {
        memory.restore_failures += 1;
        let retry = crate::ha::bootstrap::retry_after(memory.restore_failures);
        memory.retry_at = Some(Instant::now() + retry);
        crate::ha::bootstrap::failed(&self.shared, &self.events, &self.me, error, retry).await;
    }
}
