//! What one tick sees: the Lease and the peers read at once (a silent API server costs one timeout), the failsafe promise, and this instance as its peers see it.

use super::*;

impl Elector {
    pub(super) async fn observe(&mut self) -> Option<Tick> {
        // Nothing is decided without a valid spec: it says how many instances, which
        // synchronous mode and which timings.
        let (cluster, spec) = self.spec()?;
        self.lease.set_timings(timings(&spec));
        let status = self.status.borrow().clone();
        let obs = self.observation.borrow().clone();
        // Published with the next renewal (only a primary's database counts).
        self.lease.set_position(
            obs.pg
                .as_ref()
                .filter(|p| p.role == Role::Primary)
                .map(|p| decide::Position {
                    system_identifier: p.system_identifier.clone(),
                    timeline: p.timeline,
                }),
        );
        let fenced = fenced(cluster.metadata.annotations.as_ref(), &self.me);
        let members = peers::members(&cluster.data, &self.me);
        // A primary asks its peers for the failsafe promise along with their status.
        let leading = self.lease.held_by_me();
        let token = self
            .shared
            .replication_password
            .borrow()
            .as_deref()
            .map(|pw| {
                crate::ha::failsafe::token(
                    pw,
                    &self.shared.identity.cluster,
                    &self.me,
                    std::time::SystemTime::now(),
                )
            });
        // Only when its own access is in doubt (the last read got no answer, or a renewal is
        // due): each such request makes every member probe the API server.
        let retry = timings(&spec).retry;
        let in_doubt = self.api_down
            || self
                .since_confirmed()
                .is_none_or(|s| s >= retry.mul_f32(0.9));
        let failsafe = token
            .as_deref()
            .filter(|_| leading && in_doubt)
            .map(|t| (self.me.as_str(), t));
        // The Lease read and the peer round at once: a silent API server costs one timeout,
        // not a timeout plus the round. While it has been silent, the read is a probe bounded
        // by the retry period (an API server that is back answers at once), so that failsafe
        // rounds come well within the renew deadline.
        let mut read_within = if self.api_down {
            self.api_timeout.min(retry)
        } else {
            self.api_timeout
        };
        // A leader's read must end in time for a failsafe round to count before its renew
        // deadline: at the onset of a black hole this read is the one that finds out. A round
        // that asks for the promise is that round; one that does not must leave time for the
        // next, which will.
        if let Some(since) = self.since_confirmed().filter(|_| leading) {
            let rounds = if failsafe.is_some() { 1 } else { 2 };
            let left = timings(&spec)
                .renew_deadline
                .saturating_sub(since)
                .saturating_sub(FAILSAFE_ROUND * rounds);
            read_within = read_within.min(left).max(Duration::from_millis(300));
        }
        let sent = Instant::now();
        // A failsafe round gives everyone the full time (each member probes the API server
        // before it answers); otherwise a member silent last round gets a short one.
        let silence = &self.silence;
        let timeout = |m: &str| {
            if failsafe.is_some() {
                PEER_TIMEOUT
            } else {
                silence.timeout(m, PEER_TIMEOUT)
            }
        };
        let ((lease, result), docs) = tokio::join!(
            self.lease.observe_within(read_within),
            peers::fetch(
                &self.http,
                &members,
                timeout,
                failsafe.map_or(peers::Ask::Status, |(primary, token)| {
                    peers::Ask::Failsafe { primary, token }
                }),
            ),
        );
        self.silence.heard(&members, &docs);
        if let Err(e) = &result {
            tracing::debug!(error = %e, "cannot read the Lease");
        }
        self.api_down = result.as_ref().is_err_and(unanswered);
        let mut in_failsafe = false;
        // Failsafe: cut off from the API server, a primary keeps its writes while every
        // member answers that it is cut off too (so none can take the Lease) and has promised
        // not to compete for a lease duration. It counts as a renewal sent at `sent`.
        // With no member listed nobody has confirmed anything, unless there is nobody to
        // confirm: a one-instance cluster has no one who could take over.
        if leading
            && result.as_ref().is_err_and(unanswered)
            && peers::failsafe_confirmed(&self.me, &members, spec.instances as usize, &docs)
        {
            // Once per episode (rounds come every retry period while it lasts).
            if self
                .failsafe_at
                .is_none_or(|t| t.elapsed() > timings(&spec).lease_duration)
            {
                tracing::warn!(members = members.len(), "API server unreachable; every member confirms it cannot reach it either: keeping writes (failsafe)");
            }
            // It ages out by itself: when the API server is back, the first renewal must not
            // find the last one too old.
            self.failsafe_at = Some(sent);
            self.fence.confirmed(sent, timings(&spec).renew_deadline);
            in_failsafe = true;
        }
        let lease = self.promised(lease);
        let system_ids = docs
            .iter()
            .filter_map(|(name, doc)| {
                let id = doc.pointer("/postgres/system_identifier")?.as_str()?;
                Some((name.clone(), id.to_string()))
            })
            .collect();
        let mut list: Vec<Peer> = docs
            .iter()
            .map(|(name, doc)| peers::from_status(name, doc))
            .collect();
        let local = self.local(&status, &obs);
        list.push(self.own_peer(&status, &obs, fenced));
        // An error is not "no data": it is kept apart, so that nothing initialises or clones
        // over a directory nobody could read.
        let (has_data, data_unusable) = match datadir::inspect(&self.pg.data_dir).await {
            Ok(DataDir::Cluster { .. }) => (true, None),
            Ok(DataDir::Empty) => (false, None),
            Err(e) => (false, Some(e.to_string())),
        };
        let initialized = cluster
            .data
            .get("status")
            .and_then(|s| s.get("currentPrimary"))
            .is_some_and(|p| p.is_string());
        let observed = Observed {
            me: self.me.clone(),
            local,
            fenced,
            lease,
            api_reachable: result.is_ok(),
            since_renew: self.since_confirmed(),
            timings: timings(&spec).judging(self.lease.written_duration()),
            following: None,
            peers: list.clone(),
            sync: self.lease.published_sync(),
            max_lag_bytes: spec.failover.maximum_lag_bytes,
            max_local_restarts: self.max_crashes.saturating_sub(1),
            has_data,
            data_unusable,
            initialized,
            others_data: peers::others_data(&docs, spec.instances as usize),
            busy: None,
            system_identifier: obs.pg.as_ref().map(|p| p.system_identifier.clone()),
            published: self.lease.published_position(),
            lease_free_for: Duration::ZERO,
            standing_down: false,
        };
        Some(Tick {
            spec,
            cluster,
            members,
            peers: list,
            observed,
            in_failsafe,
            unanswered: self.api_down,
            system_ids,
        })
    }

    /// Reports a data directory that keeps this instance waiting (see
    /// [`decide::data_blocked`]), once per change: condition `DataDirectory` and an Event.
    pub(super) async fn report_data(&self, tick: &Tick, memory: &mut Memory) {
        let blocked = decide::data_blocked(&tick.observed).map(str::to_string);
        if blocked == memory.data_reported {
            return;
        }
        match &blocked {
            Some(why) => {
                let message = format!(
                    "{}: the data directory cannot be used: {why}; not initialising, cloning or starting Postgres until it is fixed",
                    self.me
                );
                tracing::error!("{message}");
                self.shared
                    .set_condition("DataDirectory", false, "Unusable", &message, None);
                self.events
                    .warning("DataDirectoryUnusable", message.clone())
                    .await;
            }
            None => {
                tracing::info!("the data directory can be used again");
                self.shared
                    .set_condition("DataDirectory", true, "Usable", "", None);
            }
        }
        memory.data_reported = blocked;
    }

    /// What Postgres is doing here, from the postmaster's state, what this elector configured
    /// and what the monitor last read (either saying "primary" makes it one: a promotion by
    /// hand must not go unnoticed).
    pub(super) fn local(&self, status: &Status, obs: &Observation) -> Local {
        match &status.state {
            State::Initializing | State::Stopped => Local::Stopped,
            State::Restarting { crashes_in_window } => Local::Crashed {
                crashes: *crashes_in_window,
            },
            State::Failed { .. } => Local::Crashed { crashes: u32::MAX },
            State::Starting { .. } | State::Running { .. } | State::Stopping { .. } => {
                let configured_standby = self.pg_standby_configured();
                let seen_primary = obs.pg.as_ref().is_some_and(|p| p.role == Role::Primary)
                    && obs.refreshed.is_some_and(|t| match &status.state {
                        State::Running { since, .. } => t >= *since,
                        _ => false,
                    });
                if !configured_standby || seen_primary {
                    Local::Primary
                } else {
                    Local::Replica
                }
            }
        }
    }

    /// Time since leadership was last confirmed: a Lease renewal, or a failsafe round.
    pub(super) fn since_confirmed(&self) -> Option<std::time::Duration> {
        let failsafe = self.failsafe_at.map(|t| t.elapsed());
        match (self.lease.since_renew(), failsafe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The Lease as this instance must treat it: a failsafe promise given to its holder
    /// counts as a change seen at that moment (no competing for a lease duration after it).
    pub(super) fn promised(&self, lease: decide::Lease) -> decide::Lease {
        let ack = self
            .shared
            .failsafe_ack
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match (lease, ack) {
            (
                decide::Lease::Held {
                    holder,
                    unchanged_for,
                },
                Some((promised, at)),
            ) if holder == promised => decide::Lease::Held {
                unchanged_for: unchanged_for.min(at.elapsed()),
                holder,
            },
            (lease, _) => lease,
        }
    }

    pub(super) fn pg_standby_configured(&self) -> bool {
        self.pg.data_dir.join("standby.signal").exists()
    }

    pub(super) fn own_peer(&self, status: &Status, obs: &Observation, fenced: bool) -> Peer {
        let pg = obs.pg.as_deref();
        Peer {
            name: self.me.clone(),
            healthy: self.assessor.assess(status, obs) == Health::Ready,
            fenced,
            replica: pg.is_some_and(|p| p.role == Role::Replica),
            primary: false,
            replayed: pg.and_then(|p| p.lsn.replayed),
            lsn: pg.and_then(|p| {
                [p.lsn.current, p.lsn.received, p.lsn.replayed]
                    .into_iter()
                    .flatten()
                    .max()
            }),
            timeline: pg.map(|p| p.timeline),
            starting: false,
        }
    }
}
