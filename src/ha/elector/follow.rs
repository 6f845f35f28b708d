//! Following and rejoining: a standby of the primary, the stuck-stream watchdog, rewind before reclone, never over another database.

use super::*;

impl Elector {
    /// A standby that cannot stream from a healthy primary for long has diverged from it (for
    /// example a timeline it cannot follow): it is stopped, its data directory moved aside
    /// (kept) and the next tick clones afresh, when the spec allows it.
    pub(super) async fn watch_stream(&mut self, tick: &Tick, memory: &mut Memory) {
        let Some(primary) = memory.following.clone() else {
            memory.not_streaming_since = None;
            return;
        };
        let (streaming, replayed) = {
            let obs = self.observation.borrow();
            let pg = obs.pg.as_deref();
            (
                pg.and_then(|p| p.wal_receiver.as_ref())
                    .is_some_and(|w| w.status == "streaming"),
                pg.and_then(|p| p.lsn.replayed),
            )
        };
        // Replaying (from the archive, say) is progress, not divergence.
        if replayed != memory.stuck_at {
            memory.stuck_at = replayed;
            memory.not_streaming_since = None;
        }
        let source_ok = tick
            .peers
            .iter()
            .any(|p| p.name == primary && p.healthy && p.primary);
        if streaming {
            memory.stream_rewinds = 0;
        }
        if streaming && memory.cannot_stream_reported.take().is_some() {
            self.shared
                .set_condition("Streaming", true, "Streaming", "", None);
        }
        if streaming || !source_ok || tick.observed.local != Local::Replica {
            memory.not_streaming_since = None;
            return;
        }
        let since = *memory.not_streaming_since.get_or_insert_with(Instant::now);
        if since.elapsed() < STUCK_AFTER {
            return;
        }
        memory.not_streaming_since = None;
        let mine = self.observed_system_identifier();
        if self.foreign_primary(&primary, mine, tick, memory).await {
            return;
        }
        // A new copy cures divergence, never trouble connecting: a standby that cannot connect
        // (a password, a slot, pg_hba.conf, the network) would be recloned again and again,
        // filling the volume with copies kept aside. That is reported and retried.
        let mut wal_gone = false;
        let evidence = match crate::ha::stream::classify(&self.server_log.recent()) {
            crate::ha::stream::Trouble::Diverged(line) => line,
            crate::ha::stream::Trouble::WalGone(line) => {
                wal_gone = true;
                line
            }
            crate::ha::stream::Trouble::Unknown => "no message from Postgres says why".to_string(),
            crate::ha::stream::Trouble::Connecting(cause) => {
                let message = format!(
                    "{} has not streamed from the healthy primary {primary} for {STUCK_AFTER:?} and cannot connect: {cause}; retrying, not recloning",
                    self.me
                );
                if memory.cannot_stream_reported.as_deref() != Some(message.as_str()) {
                    tracing::error!("{message}");
                    self.shared
                        .set_condition("Streaming", false, "CannotConnect", &message, None);
                    self.events.warning("CannotStream", message.clone()).await;
                    memory.cannot_stream_reported = Some(message);
                }
                return;
            }
        };
        let what = format!(
            "{} has not streamed from the healthy primary {primary} for {STUCK_AFTER:?} ({evidence})",
            self.me
        );
        // Not now (no address for the primary yet, or other work under way): the next tick
        // tries again, without waiting another STUCK_AFTER.
        let Some(address) = tick.address(&primary).filter(|_| memory.task.is_none()) else {
            tracing::debug!(
                "{what}; rewinding once the primary's address is known and no other work runs"
            );
            memory.not_streaming_since = Some(since);
            return;
        };
        // pg_rewind first: it brings back only what diverged, where a new copy moves the
        // whole directory aside. When it ends the next decision starts the standby again.
        let reclone = tick.spec.failover.reclone_on_rewind_failure;
        if wal_gone || memory.stream_rewinds >= STREAM_REWINDS {
            // The WAL it needs is gone from the primary, or it was rewound already without
            // streaming again since: only a new copy can help.
            self.postmaster.halt(StopMode::Fast, false).await;
            memory.following = None;
            let why = if wal_gone {
                format!("{what}; the primary no longer has the WAL it needs")
            } else {
                format!("{what}; rewound {STREAM_REWINDS} times without streaming again")
            };
            memory.stream_rewinds = 0;
            self.reclone(why, reclone, memory).await;
            return;
        }
        tracing::error!("{what}; stopping it to rewind onto the primary");
        self.postmaster.halt(StopMode::Fast, false).await;
        memory.following = None;
        memory.stream_rewinds += 1;
        self.spawn_rewind(&primary, &address, reclone, memory);
    }

    /// Streams from `primary`: reconfigures a running standby, or prepares the data directory
    /// (clone, rewind) and starts one.
    pub(super) async fn follow(&mut self, primary: &str, tick: &Tick, memory: &mut Memory) {
        let Some(address) = tick.address(primary) else {
            tracing::debug!(%primary, "the primary's address is not known yet");
            return;
        };
        let Some(upstream) = self.upstream(&address) else {
            return;
        };
        let tls = self.ssl_files().is_some();
        match tick.observed.local {
            Local::Replica | Local::Crashed { .. } => {
                if memory.following.as_deref() != Some(primary)
                    || memory.following_address.as_ref() != Some(&address)
                    || memory.following_tls != tls
                {
                    // Streaming another database's WAL would fail at best; never point at it.
                    let mine = self.observed_system_identifier();
                    if self.foreign_primary(primary, mine, tick, memory).await {
                        return;
                    }
                    match self
                        .postmaster
                        .set_replication(standby(upstream, tick))
                        .await
                    {
                        Ok(()) => {
                            tracing::info!(%primary, "now following");
                            memory.following = Some(primary.to_string());
                            memory.following_address = Some(address);
                            memory.following_tls = tls;
                        }
                        Err(e) => tracing::error!(error = %e, "cannot repoint the standby"),
                    }
                }
            }
            Local::Primary => {} // decide() demotes it first
            Local::Stopped => {
                if memory.task.is_some() {
                    return;
                }
                // Cloned or rewound onto this primary by a task that ended: start.
                let prepared = memory.prepared.take().is_some_and(|p| p == primary);
                if !prepared && !tick.observed.has_data {
                    let work = Work::Clone {
                        primary: primary.to_string(),
                    };
                    self.spawn_prepare(work, &address, memory);
                    return;
                }
                // A former primary's data is rewound first; so is one whose pg_rewind did not
                // finish (never started as it is).
                if replica::rewind_unfinished(&self.pg.data_dir)
                    || (!prepared && !self.pg_standby_configured())
                {
                    self.rewind(primary, &address, tick, memory).await;
                    return;
                }
                if self.foreign_primary(primary, None, tick, memory).await {
                    return;
                }
                if self.start_standby(Some(upstream), tick, memory).await {
                    memory.following = Some(primary.to_string());
                    memory.following_address = Some(address);
                    memory.following_tls = tls;
                }
            }
        }
    }

    /// The standby settings to stream from `address`, with the passfile they authenticate
    /// with written; `None` until the replication password is known (or, with
    /// `replicationAuth: certificate`, the certificate: no password is needed then).
    pub(super) fn upstream(&self, address: &Address) -> Option<Upstream> {
        let ssl = self.ssl_files();
        let by_certificate = ssl.is_some()
            && self.shared.spec.borrow().as_ref().is_some_and(|s| {
                s.postgresql.tls.replication_auth == crate::k8s::crd::ReplicationAuth::Certificate
            });
        match self.shared.replication_password.borrow().clone() {
            Some(password) => {
                // Written even when unused: the primary may not take certificates yet.
                if let Err(e) = replica::write_passfile(&self.pg.run_dir, &password) {
                    tracing::error!(error = %e, "cannot write the replication passfile");
                    return None;
                }
            }
            None if by_certificate => {}
            None => {
                tracing::info!("waiting for the replication password (spec.secrets.replication)");
                return None;
            }
        }
        Some(replica::upstream(
            address,
            &self.me,
            &self.pg.run_dir,
            ssl.as_ref(),
        ))
    }

    /// The certificate files while TLS is on (standbys, pg_basebackup and pg_rewind then
    /// verify the primary against the cluster CA).
    pub(super) fn ssl_files(&self) -> Option<crate::postgres::conf::SslFiles> {
        self.shared
            .tls
            .borrow()
            .as_ref()
            .map(|_| crate::tls::files(&self.pg.run_dir))
    }

    /// The settings for a clone or a rewind: pgwarden's, with TLS as it is now.
    fn task_settings(&self) -> crate::config::PostgresConfig {
        let mut pg = self.pg.clone();
        pg.ssl.files = self.ssl_files();
        pg
    }

    /// Brings a former primary's data onto `primary`'s timeline; false when it could not
    /// (yet). After repeated failures against a healthy primary the directory is moved aside
    /// and the next tick clones afresh, when the spec allows it.
    pub(super) async fn rewind(
        &mut self,
        primary: &str,
        address: &Address,
        tick: &Tick,
        memory: &mut Memory,
    ) {
        // Its elector says "primary" only once the promotion's checkpoint is done: before
        // that, pg_rewind would read the old timeline from its control file and wrongly
        // find nothing to rewind.
        let source_ready = tick
            .peers
            .iter()
            .any(|p| p.name == primary && p.healthy && p.primary);
        if !source_ready {
            tracing::info!(%primary, "waiting for the new primary to accept writes before rewinding");
            return;
        }
        if self.foreign_primary(primary, None, tick, memory).await {
            return;
        }
        let reclone = tick.spec.failover.reclone_on_rewind_failure;
        if let Some(collision) = self.timeline_collision(primary, tick).await {
            // pg_rewind would find "nothing to do" and this data would stream from a primary
            // whose history differs from its own under the same timeline ID.
            self.reclone(collision, reclone, memory).await;
            return;
        }
        self.spawn_rewind(primary, address, reclone, memory);
    }

    /// Runs pg_rewind onto `primary` as a task.
    pub(super) fn spawn_rewind(
        &self,
        primary: &str,
        address: &Address,
        reclone: bool,
        memory: &mut Memory,
    ) {
        let work = Work::Rewind {
            primary: primary.to_string(),
            reclone,
        };
        self.spawn_prepare(work, address, memory);
    }

    /// Runs a clone or a rewind from the primary at `address` as a task.
    fn spawn_prepare(&self, work: Work, address: &Address, memory: &mut Memory) {
        let p = replica::Prepare {
            reaper: self.reaper.clone(),
            bins: self.binaries.clone(),
            pg: self.task_settings(),
            from: address.clone(),
            me: self.me.clone(),
        };
        let rewind = matches!(work, Work::Rewind { .. });
        memory.task = Some(Task::spawn(work, memory.wake.clone(), async move {
            if rewind {
                replica::rewind(&p).await
            } else {
                replica::clone(&p).await
            }
        }));
    }

    /// Whether this former primary's timeline is not older than `primary`'s: a second
    /// promotion from one timeline picked the ID this one already wrote on.
    pub(super) async fn timeline_collision(&self, primary: &str, tick: &Tick) -> Option<String> {
        let theirs = tick
            .peers
            .iter()
            .find(|p| p.name == primary)
            .and_then(|p| p.timeline)?;
        let checkpoint = control::read_async(&self.pg.data_dir)
            .await
            .ok()
            .map(|c| c.checkpoint_timeline);
        let data = self.pg.data_dir.clone();
        let wal = tokio::task::spawn_blocking(move || datadir::newest_wal_timeline(&data))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        let mine = checkpoint.max(wal)?;
        (mine >= theirs).then(|| {
            format!("this former primary wrote on timeline {mine} and the primary {primary} runs timeline {theirs}: their histories differ under one timeline ID, which pg_rewind cannot see")
        })
    }

    /// Moves the data directory aside so that the next tick clones afresh, when the spec
    /// allows it (`allowed`).
    pub(super) async fn reclone(&mut self, why: String, allowed: bool, memory: &mut Memory) {
        if !allowed {
            self.events
                .warning(
                    "RewindFailed",
                    format!(
                        "{}: {why}; staying stopped (recloneOnRewindFailure is off)",
                        self.me
                    ),
                )
                .await;
            return;
        }
        tracing::error!(%why, "moving the data directory aside to clone afresh");
        let data = self.pg.data_dir.clone();
        let moved = tokio::task::spawn_blocking(move || replica::move_aside(&data)).await;
        match moved {
            Ok(Ok(to)) => {
                memory.rewind_failures = 0;
                memory.following = None;
                self.events
                    .warning(
                        "Recloning",
                        format!(
                            "{}: {why}; data directory kept at {} and cloned afresh",
                            self.me,
                            to.display()
                        ),
                    )
                    .await;
            }
            Ok(Err(e)) => {
                let message = format!("{}: {why}; {e}", self.me);
                if memory.aside_reported.as_deref() != Some(message.as_str()) {
                    tracing::error!("{message}");
                    self.shared
                        .set_condition("Streaming", false, "CopyKeptAside", &message, None);
                    self.events.warning("RecloneRefused", message.clone()).await;
                    memory.aside_reported = Some(message);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot move the data directory aside"),
        }
    }

    /// Configures a standby and starts it as a task (a standby is ready once consistent,
    /// which may need WAL from an upstream that went away meanwhile: the decisions go on,
    /// and repoint it to whoever leads). False when it could not be configured.
    pub(super) async fn start_standby(
        &mut self,
        upstream: Option<Upstream>,
        tick: &Tick,
        memory: &mut Memory,
    ) -> bool {
        if memory.task.is_some() {
            return false;
        }
        let upstream = upstream.unwrap_or(Upstream {
            conninfo: String::new(),
            slot: None,
        });
        if let Err(e) = self
            .postmaster
            .set_replication(standby(upstream, tick))
            .await
        {
            tracing::error!(error = %e, "cannot configure the standby");
            return false;
        }
        memory.standby = true;
        memory.prepared = None;
        self.start(Work::Start { primary: false }, memory);
        true
    }

    /// The local database system identifier, as the monitor last read it.
    fn observed_system_identifier(&self) -> Option<String> {
        self.observation
            .borrow()
            .pg
            .as_deref()
            .map(|p| p.system_identifier.clone())
    }

    /// Whether `primary`'s cluster is another database than the one in this data directory
    /// (another system identifier): then nothing may rewind onto it or reclone from it, which
    /// would replace this data with that database. Reported once; it waits for a human.
    pub(super) async fn foreign_primary(
        &self,
        primary: &str,
        mine: Option<String>,
        tick: &Tick,
        memory: &mut Memory,
    ) -> bool {
        let Some(theirs) = tick.system_ids.get(primary) else {
            return false;
        };
        let mine = match mine {
            Some(mine) => mine,
            None => match control::read_async(&self.pg.data_dir).await {
                Ok(c) => c.system_identifier.to_string(),
                Err(_) => return false,
            },
        };
        if &mine == theirs {
            if memory.foreign_reported.take().is_some() {
                self.shared
                    .set_condition("SameDatabase", true, "SameSystemIdentifier", "", None);
            }
            return false;
        }
        let message = format!(
            "{} holds database system {mine} but the primary {primary} runs system {theirs}: \
             not rewinding, recloning or following (it would replace this data); \
             waiting for a human",
            self.me
        );
        if memory.foreign_reported.as_deref() != Some(message.as_str()) {
            tracing::error!("{message}");
            self.shared.set_condition(
                "SameDatabase",
                false,
                "ForeignSystemIdentifier",
                &message,
                None,
            );
            self.events
                .warning("ForeignSystemIdentifier", message.clone())
                .await;
            memory.foreign_reported = Some(message);
        }
        true
    }
}

/// A standby's settings: streaming from `upstream`, with the synchronous set it would start
/// with as a primary already in its files (a standby ignores it), so that a promotion needs
/// no reload before its first commit.
fn standby(upstream: Upstream, tick: &Tick) -> Replication {
    Replication {
        standby: Some(upstream),
        synchronous_standby_names: quorum::standby_names(&starting_sync(tick)),
    }
}
