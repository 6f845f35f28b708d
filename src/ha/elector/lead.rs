//! Leading: renewing the Lease, the synchronous set (published before Postgres uses a larger one, after it uses a smaller one), slots of departed instances.

use super::*;

impl Elector {
    /// The leader's routine: renew (publishing the synchronous set), keep the slots, serve a
    /// requested switchover.
    pub(super) async fn lead(&mut self, tick: &Tick, memory: &mut Memory) {
        let streaming = self.streaming();
        let standbys: Vec<String> = tick.members.iter().map(|m| m.name.clone()).collect();
        let number = match tick.spec.synchronous.mode {
            crd::SynchronousMode::Off => 0,
            crd::SynchronousMode::Quorum => tick.spec.synchronous.number as usize,
        };
        let previous = memory.applied.bound().clone();
        let (target, degraded) = quorum::target(
            number,
            tick.spec.synchronous.allow_degraded,
            &streaming,
            &previous,
            &standbys,
        );
        let published = memory
            .published
            .clone()
            .unwrap_or_else(|| self.lease.published_sync());
        let renewed = match quorum::next_step(&published, &memory.applied, &target) {
            Step::Publish(sync) => {
                let r = self.lease.renew_publishing(&sync).await;
                if matches!(r, Ok(true)) {
                    memory.published = Some(sync);
                }
                r
            }
            Step::Apply(sync) => {
                let r = self.lease.renew_publishing(&published).await;
                if matches!(r, Ok(true)) {
                    let replication = Replication {
                        standby: None,
                        synchronous_standby_names: quorum::standby_names(&sync),
                    };
                    let sent = self.postmaster.set_replication(replication).await;
                    // In force once Postgres shows it, not when the SIGHUP was sent: a
                    // smaller set published next must never precede it. Until then (and
                    // after a failed write, which may have written the files) Postgres may
                    // use either set.
                    let shown = sent.is_ok() && self.in_force(quorum::standby_names(&sync)).await;
                    match sent {
                        Ok(()) if shown => {
                            tracing::info!(synchronous_standby_names = ?quorum::standby_names(&sync), "synchronous standbys set")
                        }
                        Ok(()) => tracing::info!(
                            "synchronous standbys sent, not yet in force; checking again next time"
                        ),
                        Err(ref e) => {
                            tracing::error!(error = %e, "cannot set the synchronous standbys")
                        }
                    }
                    memory.applied.sent(sync, shown);
                }
                r
            }
            // Renewing more often than the retry period buys nothing (and every renewal wakes
            // the other instances' Lease watches).
            Step::Done
                if self
                    .lease
                    .since_renew()
                    .is_some_and(|s| s < tick.observed.timings.retry.mul_f32(0.9)) =>
            {
                Ok(true)
            }
            Step::Done => self.lease.renew_publishing(&published).await,
        };
        memory.following = None;
        match renewed {
            Ok(true) => {}
            Ok(false) => tracing::warn!("the Lease changed under me; re-reading"),
            Err(e) => tracing::warn!(error = %e, "cannot renew the Lease"),
        }
        if degraded != memory.degraded {
            memory.degraded = degraded;
            let (ok, reason, message) = if degraded {
                (false, "Degraded", format!("fewer than {number} synchronous standbys: commits no longer wait for them (allowDegraded)"))
            } else {
                (
                    true,
                    "Synchronous",
                    "synchronous standbys as requested".to_string(),
                )
            };
            self.shared
                .set_condition("SynchronousReplication", ok, reason, &message, None);
            if degraded {
                self.events.warning("SynchronousDegraded", message).await;
            } else {
                self.events.normal("SynchronousRestored", message).await;
            }
        }
        if memory.slots.as_ref().is_none_or(|t| t.is_finished()) {
            let pg = self.pg.clone();
            memory.slots = Some(tokio::spawn(async move {
                if let Err(e) = replica::sync_slots(&pg, &standbys).await {
                    tracing::warn!(error = %e, "cannot maintain the replication slots");
                }
            }));
        }
        // On a task of its own, as the slots: each silent member costs up to two API calls.
        if memory.pruned_at.is_none_or(|t| t.elapsed() > PRUNE_EVERY)
            && memory.pruning.as_ref().is_none_or(|t| t.is_finished())
        {
            memory.pruned_at = Some(Instant::now());
            memory.pruning = Some(tokio::spawn(self.prune(tick)));
        }
        if let Some(target) = switchover_request(tick.cluster.metadata.annotations.as_ref()) {
            self.switchover(&target, tick, memory, false).await;
        }
    }

    /// While long work runs under the Lease: renew it every retry period, publishing the
    /// synchronous set as it stands, and nothing else.
    pub(super) async fn keep_lease(&mut self, tick: &Tick, memory: &Memory) {
        if self
            .lease
            .since_renew()
            .is_some_and(|s| s < tick.observed.timings.retry.mul_f32(0.9))
        {
            return;
        }
        let published = memory
            .published
            .clone()
            .unwrap_or_else(|| self.lease.published_sync());
        match self.lease.renew_publishing(&published).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!("the Lease changed under me; re-reading"),
            Err(e) => tracing::warn!(error = %e, "cannot renew the Lease"),
        }
    }

    /// Removes the status entries of instances whose Pod is gone (a scale-down): their slots
    /// would otherwise keep WAL forever. Only members that did not answer are looked at, and
    /// only a 404 for their Pod counts. The work is returned to run on a task.
    pub(super) fn prune(&self, tick: &Tick) -> impl std::future::Future<Output = ()> + 'static {
        let silent: Vec<String> = tick
            .members
            .iter()
            .filter(|m| !tick.peers.iter().any(|p| p.name == m.name))
            .map(|m| m.name.clone())
            .collect();
        let (pods, clusters, events) = (
            self.pods.clone(),
            self.clusters.clone(),
            self.events.clone(),
        );
        let (cluster, timeout) = (self.shared.identity.cluster.clone(), self.api_timeout);
        async move {
            for name in silent {
                let gone = matches!(
                    tokio::time::timeout(timeout, pods.get_opt(&name)).await,
                    Ok(Ok(None))
                );
                if !gone {
                    continue;
                }
                let patch = Patch::Merge(json!({"status": {"instances": {name.clone(): null}}}));
                let result = tokio::time::timeout(
                    timeout,
                    clusters.patch_status(&cluster, &PatchParams::default(), &patch),
                )
                .await;
                if matches!(result, Ok(Ok(_))) {
                    tracing::info!(instance = %name, "its Pod is gone: status entry removed, its slot follows");
                    events
                        .normal(
                            "InstanceRemoved",
                            format!(
                                "{name}: its Pod is gone; status entry and replication slot removed"
                            ),
                        )
                        .await;
                }
            }
        }
    }

    /// Whether Postgres shows `names` as its `synchronous_standby_names` (read on a new
    /// session, which sees the configuration the postmaster reloaded), within about a second.
    pub(super) async fn in_force(&self, names: Option<String>) -> bool {
        let want = names.unwrap_or_default();
        let target = crate::postgres::connect::Target::admin(&self.pg);
        // Bounded as a whole: a postmaster slow to accept connections must not hold up the
        // loop that keeps the Lease (the next tick checks again).
        let check = async {
            loop {
                if let Ok(conn) = crate::postgres::connect::connect_timeout(&target).await {
                    let shown = conn.query_one("SHOW synchronous_standby_names", &[]).await;
                    if shown.is_ok_and(|row| row.try_get::<_, String>(0).is_ok_and(|v| v == want)) {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(1), check)
            .await
            .is_ok()
    }

    /// Standbys streaming from this primary right now.
    pub(super) fn streaming(&self) -> Vec<String> {
        let obs = self.observation.borrow();
        let mut names: BTreeSet<String> = BTreeSet::new();
        if let Some(pg) = obs.pg.as_deref() {
            for s in &pg.replication {
                if s.state == "streaming" {
                    names.insert(s.application_name.clone());
                }
            }
        }
        names.into_iter().collect()
    }

    /// The synchronous set a new primary starts with, published in the Lease before Postgres
    /// uses it: in quorum mode commits wait for any N of the other instances from the first
    /// write on (the usual set changes follow from there). `None` when it cannot be published.
    ///
    /// Publishing is a renewal of this process's own, which every new primary needs before
    /// it takes writes, in either mode: a switchover target was handed the Lease without
    /// renewing it, and only a renewal arms the fence timer.
    pub(super) async fn first_sync(&mut self, tick: &Tick) -> Option<Sync> {
        let sync = starting_sync(tick);
        if !matches!(self.lease.renew_publishing(&sync).await, Ok(true)) {
            tracing::warn!("cannot renew the Lease (and publish the synchronous set) before taking writes; retrying");
            return None;
        }
        Some(sync)
    }
}

/// The synchronous set a new primary starts with: in quorum mode, any N of the others.
pub(super) fn starting_sync(tick: &Tick) -> Sync {
    let s = &tick.spec.synchronous;
    if s.mode != crd::SynchronousMode::Quorum || s.number == 0 {
        return Sync::Off;
    }
    let others: Vec<String> = tick.members.iter().map(|m| m.name.clone()).collect();
    quorum::target(
        s.number as usize,
        s.allow_degraded,
        &[],
        &Sync::Off,
        &others,
    )
    .0
}
