//! Hand-over: a switchover to a caught-up standby, and a primary stopping (SIGTERM) hands over first.

use super::*;

impl Elector {
    /// Hands the primary role to `target`: stop taking writes (a clean, checkpointed
    /// shutdown), wait until the target received everything, pass it the Lease, and follow
    /// it. Refused, with the reason in an Event, when the target is not a healthy, caught-up
    /// standby.
    pub(super) async fn switchover(
        &mut self,
        target: &str,
        tick: &Tick,
        memory: &mut Memory,
        stopping: bool,
    ) -> bool {
        let result = self.try_switchover(target, tick, memory, stopping).await;
        if !stopping {
            self.clear_switchover_request().await;
        }
        match result {
            Ok(()) => {
                self.events
                    .normal(
                        "SwitchedOver",
                        format!("{} handed the primary role to {target}", self.me),
                    )
                    .await;
                true
            }
            Err(reason) => {
                tracing::warn!(%target, %reason, "switchover refused");
                self.events
                    .warning(
                        "SwitchoverRefused",
                        format!("switchover to {target}: {reason}"),
                    )
                    .await;
                false
            }
        }
    }

    /// This primary's WAL position, and how far behind it a switchover target may be.
    pub(super) fn switchover_bounds(
        &self,
        tick: &Tick,
    ) -> (Option<crate::postgres::lsn::Lsn>, u64) {
        let own = tick
            .peers
            .iter()
            .find(|p| p.name == self.me)
            .and_then(|p| p.lsn);
        let max_lag = tick
            .spec
            .failover
            .maximum_lag_bytes
            .unwrap_or(SWITCHOVER_MAX_LAG);
        (own, max_lag)
    }

    pub(super) async fn try_switchover(
        &mut self,
        target: &str,
        tick: &Tick,
        memory: &mut Memory,
        stopping: bool,
    ) -> Result<(), String> {
        let (own, max_lag) = self.switchover_bounds(tick);
        decide::switchover_check(target, &tick.peers, own, max_lag)?;
        // It must be streaming from this primary, or it could never receive the last WAL. The
        // monitor's reading can be an interval old (a standby that just connected, a request
        // made right after): Postgres is asked before refusing.
        if !self.streaming().iter().any(|s| s == target) {
            let admin = crate::postgres::connect::Target::admin(&self.pg);
            match crate::postgres::server::streams_to(&admin, target).await {
                Ok(true) => {}
                Ok(false) => return Err(format!("{target} is not streaming from the primary")),
                Err(e) => return Err(format!("cannot tell whether {target} streams: {e}")),
            }
        }
        let address = tick
            .address(target)
            .ok_or("its Postgres address is unknown")?;
        let retry = tick.observed.timings.retry;
        // The long part of a clean stop is its checkpoint, which nothing renews through on its
        // own: most of it is done here, while Postgres still takes writes and the Lease is
        // renewed, so that the shutdown checkpoint has little left.
        tracing::info!(%target, "switchover: checkpointing");
        let admin = crate::postgres::connect::Target::admin(&self.pg);
        let checkpoint = crate::postgres::server::checkpoint(&admin, SWITCHOVER_CHECKPOINT);
        if let Err(e) = renewing(&mut self.lease, retry, checkpoint).await {
            tracing::warn!(error = %e, "switchover: checkpoint before stopping did not finish");
        }
        let renewed = self
            .lease
            .since_renew()
            .is_some_and(|s| s < tick.observed.timings.renew_deadline);
        if !self.lease.held_by_me() || !renewed {
            return Err("the Lease could not be renewed while checkpointing".into());
        }
        tracing::info!(%target, "switchover: stopping writes");
        // Renewed while it stops too (Postgres takes no writes once asked to stop, and the stop
        // is bounded by the postmaster's escalation): the fence timer must not cut a clean
        // stop short, nor the Lease expire into a failover meanwhile.
        let postmaster = self.postmaster.clone();
        let halt = postmaster.halt(StopMode::Fast, false);
        let outcome = renewing(&mut self.lease, retry, halt).await;
        if !outcome.is_some_and(|o| o.clean()) {
            return Err("the primary did not shut down cleanly; it restarts as primary".into());
        }
        let last = self.last_checkpoint().await?;
        let member: Vec<Member> = tick
            .members
            .iter()
            .filter(|m| m.name == target)
            .cloned()
            .collect();
        let deadline = Instant::now() + SWITCHOVER_CATCH_UP;
        loop {
            // Still the leader while waiting (Postgres is stopped: renewing is safe), so that
            // the Lease cannot expire into a failover in the middle of the switchover.
            if self.lease.since_renew().is_none_or(|s| s >= retry) {
                // Not decisive here: the hand-over below is preconditioned on the Lease as
                // last seen, so it fails if the Lease changed or the API server stays away.
                match self.lease.renew().await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!("switchover: the Lease was not renewed"),
                    Err(e) => tracing::warn!(error = %e, "switchover: cannot renew the Lease"),
                }
            }
            // From a new observation: the target's status is otherwise up to a monitor
            // interval old, and the writes wait for this.
            let docs = peers::fetch(&self.http, &member, |_| PEER_TIMEOUT, peers::Ask::Fresh).await;
            let received = docs.get(target).and_then(|d| {
                let p = peers::from_status(target, d);
                p.lsn
            });
            if received.is_some_and(|r| r > last) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "it did not receive the final WAL position {last} in time"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match self.lease.hand_over(target).await {
            Ok(true) => {}
            Ok(false) => return Err("the Lease changed meanwhile".into()),
            Err(e) => return Err(format!("cannot pass the Lease: {e}")),
        }
        tracing::info!(%target, "switchover: Lease passed");
        memory.applied = quorum::InForce::seen(Sync::Off);
        memory.published = None;
        if !stopping {
            if let Some(upstream) = self.upstream(&address) {
                let tls = self.ssl_files().is_some();
                if self.start_standby(Some(upstream), tick, memory).await {
                    memory.following = Some(target.to_string());
                    memory.following_address = Some(address);
                    memory.following_tls = tls;
                }
            }
        }
        Ok(())
    }

    /// The position of the shutdown checkpoint (the last record a clean stop wrote).
    pub(super) async fn last_checkpoint(&self) -> Result<crate::postgres::lsn::Lsn, String> {
        control::read_async(&self.pg.data_dir)
            .await
            .map(|c| c.checkpoint)
            .map_err(|e| e.to_string())
    }

    pub(super) async fn clear_switchover_request(&self) {
        let patch =
            Patch::Merge(json!({"metadata": {"annotations": {SWITCHOVER_ANNOTATION: null}}}));
        let result = tokio::time::timeout(
            self.api_timeout,
            self.clusters.patch(
                &self.shared.identity.cluster,
                &PatchParams::default(),
                &patch,
            ),
        )
        .await;
        if !matches!(result, Ok(Ok(_))) {
            tracing::warn!("cannot remove the switchover annotation");
        }
    }

    /// SIGTERM: the primary hands over to the most advanced healthy standby, or gives the
    /// Lease up after its clean stop when there is none.
    pub(super) async fn shutdown(&mut self, memory: &mut Memory) {
        let Some(tick) = self.observe().await else {
            return;
        };
        let leader = self.lease.held_by_me();
        if leader && tick.observed.local == Local::Primary {
            let (own, max_lag) = self.switchover_bounds(&tick);
            let best = tick
                .peers
                .iter()
                .filter(|p| p.name != self.me)
                .filter(|p| decide::switchover_check(&p.name, &tick.peers, own, max_lag).is_ok())
                .map(|p| (p.name.as_str(), p.position()));
            let best = quorum::most_advanced(best).map(str::to_string);
            if let Some(target) = best {
                if self.switchover(&target, &tick, memory, true).await {
                    return;
                }
            }
        }
        if leader {
            self.postmaster.halt(StopMode::Fast, false).await;
            match self.lease.release().await {
                Ok(true) => tracing::info!("Lease released"),
                _ => tracing::warn!("cannot release the Lease; it expires on its own"),
            }
        }
    }
}

/// Runs `work` while renewing the Lease every retry period; a renewal under way when `work`
/// ends is finished, never dropped (its outcome is the Lease's next precondition).
async fn renewing<T>(
    lease: &mut LeaseClient,
    retry: Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    let done = Notify::new();
    let work = async {
        let out = work.await;
        done.notify_one();
        out
    };
    let renew = async {
        let mut due = lease
            .since_renew()
            .map_or(Duration::ZERO, |s| retry.saturating_sub(s));
        loop {
            tokio::select! {
                () = done.notified() => return,
                () = tokio::time::sleep(due) => {}
            }
            due = match lease.renew().await {
                Ok(true) => retry,
                // Not ours any more (or changed meanwhile): asking again changes nothing, and
                // the caller finds out from the Lease.
                Ok(false) => {
                    tracing::warn!("the Lease changed under me");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the Lease");
                    retry / 2
                }
            };
        }
    };
    tokio::join!(work, renew).0
}
