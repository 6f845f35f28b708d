//! The elector loop: observe (the Lease, the local postmaster and monitor, the peers' live
//! status, the PostgresCluster), decide with the pure [`decide`], then carry the action out
//! through the postmaster actor, the Lease client and the data-directory operations.
//!
//! It ticks every retry period and at once when something it depends on changes (the Lease,
//! the PostgresCluster, the postmaster's state). While this instance is the primary it also
//! wakes at its renew deadline, so a primary that could not renew stops taking writes on time
//! even when nothing else happens.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease as K8sLease;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::runtime::watcher;
use kube::Api;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::decide::{self, Action, Local, Observed, Peer, Sync, Timings};
use super::lease::LeaseClient;
use super::peers::{self, Member};
use super::quorum::{self, Step};
use super::replica::{self, Address};
use super::{HaStatus, FENCED_ANNOTATION, SWITCHOVER_ANNOTATION};
use crate::config::PostgresConfig;
use crate::health::{Assessor, Health};
use crate::k8s::crd::{self, PostgresClusterSpec};
use crate::k8s::events::Events;
use crate::k8s::Shared;
use crate::monitor::snapshot::Role;
use crate::monitor::Observation;
use crate::postgres::binaries::Binaries;
use crate::postgres::conf::{Replication, Upstream};
use crate::postgres::datadir::{self, DataDir};
use crate::supervisor::postmaster::{Handle, State, Status, StopMode};
use crate::supervisor::reaper::Reaper;

/// Requests from the rest of pgwarden.
pub enum Command {
    /// pgwarden is stopping: a primary hands over to the best standby (or releases the
    /// Lease); then the elector stops acting.
    Shutdown(oneshot::Sender<()>),
}

/// How long a peer's `/pg/status` may take.
const PEER_TIMEOUT: Duration = Duration::from_millis(800);
/// A switchover target must be at most this far behind (unless the spec's maximum lag is set).
const SWITCHOVER_MAX_LAG: u64 = 16 << 20;
/// How long a switchover waits for the target to receive the old primary's last WAL.
const SWITCHOVER_CATCH_UP: Duration = Duration::from_secs(10);
/// A standby not streaming from a healthy primary for this long has diverged from it.
const STUCK_AFTER: Duration = Duration::from_secs(30);
/// How often the primary looks for instances whose Pod is gone.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// How long the elector waits for a starting standby before it decides again.
const STANDBY_START_WAIT: Duration = Duration::from_secs(10);
/// pg_rewind attempts against a healthy primary before the directory is moved aside.
const REWIND_ATTEMPTS: u32 = 3;

pub struct Elector {
    pub me: String,
    pub lease: LeaseClient,
    pub postmaster: Handle,
    pub status: watch::Receiver<Status>,
    pub observation: watch::Receiver<Observation>,
    pub assessor: Assessor,
    pub shared: Arc<Shared>,
    pub events: Events,
    pub clusters: Api<DynamicObject>,
    pub leases: Api<K8sLease>,
    pub pods: Api<k8s_openapi::api::core::v1::Pod>,
    pub pg: PostgresConfig,
    pub binaries: Binaries,
    pub reaper: Reaper,
    pub http: reqwest::Client,
    pub max_crashes: u32,
    pub api_timeout: Duration,
    /// When the last failsafe round that confirmed this primary was sent.
    pub failsafe_at: Option<Instant>,
    /// Stops writes at the renew deadline, whatever this loop is waiting for.
    pub fence: super::fence::FenceTimer,
    /// The last Lease read got no answer.
    pub api_down: bool,
    pub server_log: crate::postgres::log::ServerLog,
}

/// What the elector remembers between ticks.
#[derive(Default)]
struct Memory {
    /// Postgres was last started (or reconfigured) as a standby of this instance.
    following: Option<String>,
    /// ... at this address (a primary rescheduled to a new address must be followed there).
    following_address: Option<Address>,
    /// Postgres runs with a standby configuration (even without an upstream).
    standby: bool,
    /// What the Lease says of the synchronous set (as this leader wrote it).
    published: Option<Sync>,
    /// What Postgres uses.
    applied: Sync,
    degraded: bool,
    rewind_failures: u32,
    fenced_reported: Option<String>,
    last_action: Option<Action>,
    /// Since when this standby has neither streamed from the primary it follows nor replayed
    /// anything, and where its replay stands.
    not_streaming_since: Option<Instant>,
    stuck_at: Option<crate::postgres::lsn::Lsn>,
    /// When departed instances were last looked for.
    pruned_at: Option<Instant>,
    /// The foreign-primary report last made (made once).
    foreign_reported: Option<String>,
    /// The report of a standby that cannot connect, last made (made once).
    cannot_stream_reported: Option<String>,
    /// After a failed clone, rewind or start, the next attempt waits until then (wakes from
    /// status changes would otherwise retry in a tight loop).
    retry_at: Option<Instant>,
}

/// One tick's observations.
struct Tick {
    spec: PostgresClusterSpec,
    cluster: Arc<DynamicObject>,
    members: Vec<Member>,
    peers: Vec<Peer>,
    observed: Observed,
    /// This tick's failsafe round confirmed the leadership (the API server is silent).
    in_failsafe: bool,
    /// The database system identifier each peer running Postgres reports.
    system_ids: std::collections::BTreeMap<String, String>,
}

impl Elector {
    pub fn spawn(self) -> mpsc::Sender<Command> {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(self.run(rx));
        tx
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let wake = Arc::new(Notify::new());
        tokio::spawn(watch_lease(
            self.leases.clone(),
            self.lease.name().to_string(),
            wake.clone(),
        ));
        let mut memory = Memory {
            // What the data directory says at start: a standby's keeps its standby.signal.
            standby: self.pg.data_dir.join("standby.signal").exists(),
            ..Memory::default()
        };
        let mut cluster = self.shared.cluster.subscribe();
        let mut spec = self.shared.spec.subscribe();
        let mut status = self.status.clone();
        loop {
            let timings = self.timings();
            if let Some(mut tick) = self.observe().await {
                let moved = tick.members.iter().any(|m| {
                    Some(&m.name) == memory.following.as_ref()
                        && m.postgres.is_some()
                        && m.postgres != memory.following_address
                });
                tick.observed.following = memory.following.clone().filter(|_| !moved);
                let action = decide::decide(&tick.observed);
                self.report(&tick, &action, &mut memory);
                self.act(action.clone(), &tick, &mut memory).await;
                self.watch_stream(&tick, &mut memory).await;
                // Again with Postgres's state after the action (a fenced primary must stop
                // saying "primary" at once, not a tick later).
                self.report(&tick, &action, &mut memory);
            }
            // The primary must notice its renew deadline even if nothing else happens.
            let deadline = self
                .lease
                .since_renew()
                .and_then(|since| timings.renew_deadline.checked_sub(since))
                .unwrap_or(timings.retry)
                .min(timings.retry);
            tokio::select! {
                _ = tokio::time::sleep(deadline.max(Duration::from_millis(20))) => {}
                _ = wake.notified() => {}
                _ = cluster.changed() => {}
                _ = spec.changed() => {}
                _ = status.changed() => {}
                cmd = commands.recv() => {
                    if let Some(Command::Shutdown(done)) = cmd {
                        self.shutdown(&mut memory).await;
                        let _ = done.send(());
                    }
                    return;
                }
            }
        }
    }

    /// The PostgresCluster and the last valid spec: a later spec that is invalid, or that
    /// this version cannot parse, never stops HA (the reconciler reports it).
    fn spec(&self) -> Option<(Arc<DynamicObject>, PostgresClusterSpec)> {
        let cluster = self.shared.cluster.borrow().clone()?;
        let spec = self.shared.spec.borrow().clone()?;
        Some((cluster, PostgresClusterSpec::clone(&spec)))
    }

    fn timings(&self) -> Timings {
        self.spec()
            .map_or_else(Timings::default, |(_, s)| timings(&s))
    }

    async fn observe(&mut self) -> Option<Tick> {
        // Nothing is decided without a valid spec: it says how many instances, which
        // synchronous mode and which timings.
        let (cluster, spec) = self.spec()?;
        self.lease.set_timings(timings(&spec));
        let status = self.status.borrow().clone();
        let obs = self.observation.borrow().clone();
        let fenced = fenced(cluster.metadata.annotations.as_ref(), &self.me);
        let members = peers::members(&cluster.data, &self.me);
        // A primary asks its peers for the failsafe promise along with their status.
        let leading = self.lease.held_by_me();
        let token = self
            .shared
            .replication_password
            .borrow()
            .as_deref()
            .map(|pw| super::failsafe::token(pw, &self.shared.identity.cluster, &self.me));
        let failsafe = token
            .as_deref()
            .filter(|_| leading)
            .map(|t| (self.me.as_str(), t));
        // The Lease read and the peer round at once: a silent API server costs one timeout,
        // not a timeout plus the round. While it has been silent, the read is a probe bounded
        // by the retry period (an API server that is back answers at once), so that failsafe
        // rounds come well within the renew deadline.
        let read_within = if self.api_down {
            self.api_timeout.min(timings(&spec).retry)
        } else {
            self.api_timeout
        };
        let sent = Instant::now();
        let ((lease, result), docs) = tokio::join!(
            self.lease.observe_within(read_within),
            peers::fetch(&self.http, &members, PEER_TIMEOUT, failsafe),
        );
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
            && (!members.is_empty() || spec.instances == 1)
            && docs.len() == members.len()
            && docs
                .values()
                .all(|d| peers::api_unreachable(d) && peers::promised_to(d, &self.me))
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
        let has_data = matches!(
            datadir::inspect(&self.pg.data_dir).await,
            Ok(DataDir::Cluster { .. })
        );
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
            timings: {
                // Expiry is judged by the longer of our lease duration and the one its holder
                // wrote: during a change of timings, a holder on the old (longer) value must
                // not be taken over early.
                let mut t = timings(&spec);
                t.lease_duration = t.lease_duration.max(self.lease.written_duration());
                t
            },
            following: None,
            peers: list.clone(),
            sync: self.lease.published_sync(),
            max_lag_bytes: spec.failover.maximum_lag_bytes,
            max_local_restarts: self.max_crashes.saturating_sub(1),
            has_data,
            initialized,
            others_data: peers::others_data(&docs, spec.instances as usize),
        };
        Some(Tick {
            spec,
            cluster,
            members,
            peers: list,
            observed,
            in_failsafe,
            system_ids,
        })
    }

    /// What Postgres is doing here, from the postmaster's state, what this elector configured
    /// and what the monitor last read (either saying "primary" makes it one: a promotion by
    /// hand must not go unnoticed).
    fn local(&self, status: &Status, obs: &Observation) -> Local {
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
    fn since_confirmed(&self) -> Option<std::time::Duration> {
        let failsafe = self.failsafe_at.map(|t| t.elapsed());
        match (self.lease.since_renew(), failsafe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The Lease as this instance must treat it: a failsafe promise given to its holder
    /// counts as a change seen at that moment (no competing for a lease duration after it).
    fn promised(&self, lease: decide::Lease) -> decide::Lease {
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

    fn pg_standby_configured(&self) -> bool {
        self.pg.data_dir.join("standby.signal").exists()
    }

    fn own_peer(&self, status: &Status, obs: &Observation, fenced: bool) -> Peer {
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
        }
    }

    fn report(&self, tick: &Tick, action: &Action, memory: &mut Memory) {
        let leader = match &tick.observed.lease {
            decide::Lease::Held { holder, .. } if !holder.is_empty() => Some(holder.clone()),
            _ => None,
        };
        let local = self.local(&self.status.borrow(), &self.observation.borrow());
        let role = match (tick.observed.fenced, local) {
            (true, _) => "fenced",
            (_, Local::Primary) if leader.as_deref() == Some(self.me.as_str()) => "primary",
            (_, Local::Primary) => "unknown",
            (_, Local::Replica) => "replica",
            (_, Local::Stopped) if self.status.borrow().fenced => "fenced",
            _ => "stopped",
        };
        let doc = HaStatus {
            role: role.into(),
            leader,
            fenced: tick.observed.fenced,
            following: memory.following.clone(),
            action: describe(action),
            synchronous_standby_names: quorum::standby_names(&memory.applied),
            degraded: memory.degraded,
            has_data: tick.observed.has_data,
        };
        let changed = self.shared.ha.send_if_modified(|cur| {
            let changed = cur.as_ref() != Some(&doc);
            *cur = Some(doc.clone());
            changed
        });
        if changed {
            self.shared.report_now.notify_one();
        }
        if memory.last_action.as_ref() != Some(action) {
            match action {
                Action::Wait(reason) => tracing::info!(%reason, "HA: waiting"),
                other => tracing::info!(action = %describe(other), "HA: acting"),
            }
            memory.last_action = Some(action.clone());
        }
    }

    async fn act(&mut self, action: Action, tick: &Tick, memory: &mut Memory) {
        let heavy = matches!(
            action,
            Action::Follow { .. } | Action::StartPrimary | Action::StartStandby | Action::Bootstrap
        ) && tick.observed.local == Local::Stopped;
        if heavy {
            if memory.retry_at.is_some_and(|t| Instant::now() < t) {
                return;
            }
            memory.retry_at = Some(Instant::now() + tick.observed.timings.retry);
        }
        match action {
            // Fenced before Postgres ever ran here: say so (health `fenced`).
            Action::Wait(_) if tick.observed.fenced && !self.status.borrow().fenced => {
                self.postmaster.halt(StopMode::Fast, true).await;
            }
            Action::Wait(_) | Action::RestartLocally => {}
            // A renewal would only wait for the silent API server, and delay the next round.
            Action::Renew if tick.in_failsafe => {}
            Action::Renew => self.lead(tick, memory).await,
            Action::Fence(reason) => {
                tracing::error!(%reason, "stopping writes: fencing myself");
                self.postmaster.halt(StopMode::Immediate, true).await;
                memory.following = None;
                if memory.fenced_reported.as_deref() != Some(reason.as_str()) {
                    self.events
                        .warning(
                            "SelfFenced",
                            format!("{}: {reason}; Postgres stopped", self.me),
                        )
                        .await;
                    memory.fenced_reported = Some(reason);
                }
            }
            Action::FenceAndRelease => {
                self.postmaster.halt(StopMode::Fast, true).await;
                memory.following = None;
                if self.lease.held_by_me() {
                    let _ = self.lease.release().await;
                }
                self.events
                    .normal("Fenced", format!("{} fenced: Postgres stopped", self.me))
                    .await;
            }
            Action::Acquire => match self.lease.acquire().await {
                Ok(true) => {
                    tracing::warn!("took the expired Lease; promoting");
                    self.promote(tick, memory, "failover").await;
                }
                Ok(false) => tracing::info!("another instance took the Lease first"),
                Err(e) => tracing::warn!(error = %e, "cannot take the Lease"),
            },
            Action::Promote => self.promote(tick, memory, "switchover").await,
            Action::Demote { primary } => {
                tracing::warn!(%primary, "another instance leads: stopping to rejoin as its standby");
                self.postmaster.halt(StopMode::Fast, false).await;
                self.events
                    .normal(
                        "Demoted",
                        format!("{} stopped as primary; {primary} leads", self.me),
                    )
                    .await;
                self.follow(&primary, tick, memory).await;
            }
            Action::Follow { primary } => self.follow(&primary, tick, memory).await,
            Action::Release => {
                tracing::error!("postgres keeps crashing: giving the Lease up");
                self.postmaster.halt(StopMode::Immediate, false).await;
                let _ = self.lease.release().await;
            }
            Action::StartPrimary => self.start_primary(tick, memory).await,
            Action::Bootstrap => self.bootstrap(memory).await,
            Action::StartStandby => {
                self.start_standby(None, memory).await;
            }
        }
    }

    /// The leader's routine: renew (publishing the synchronous set), keep the slots, serve a
    /// requested switchover.
    async fn lead(&mut self, tick: &Tick, memory: &mut Memory) {
        let streaming = self.streaming();
        let standbys: Vec<String> = tick.members.iter().map(|m| m.name.clone()).collect();
        let number = match tick.spec.synchronous.mode {
            crd::SynchronousMode::Off => 0,
            crd::SynchronousMode::Quorum => tick.spec.synchronous.number as usize,
        };
        let previous = memory.applied.clone();
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
                    match self.postmaster.set_replication(replication).await {
                        // In force once Postgres shows it, not when the SIGHUP was sent: a
                        // smaller set published next must never precede it.
                        Ok(()) if self.in_force(quorum::standby_names(&sync)).await => {
                            tracing::info!(synchronous_standby_names = ?quorum::standby_names(&sync), "synchronous standbys set");
                            memory.applied = sync;
                        }
                        Ok(()) => tracing::info!(
                            "synchronous standbys sent, not yet in force; checking again next time"
                        ),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot set the synchronous standbys")
                        }
                    }
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
        if let Err(e) = replica::sync_slots(&self.pg, &standbys).await {
            tracing::warn!(error = %e, "cannot maintain the replication slots");
        }
        if memory.pruned_at.is_none_or(|t| t.elapsed() > PRUNE_EVERY) {
            memory.pruned_at = Some(Instant::now());
            self.prune(tick).await;
        }
        if let Some(target) = switchover_request(tick.cluster.metadata.annotations.as_ref()) {
            self.switchover(&target, tick, memory, false).await;
        }
    }

    /// Removes the status entries of instances whose Pod is gone (a scale-down): their slots
    /// would otherwise keep WAL forever. Only members that did not answer are looked at, and
    /// only a 404 for their Pod counts.
    async fn prune(&self, tick: &Tick) {
        for m in &tick.members {
            if tick.peers.iter().any(|p| p.name == m.name) {
                continue;
            }
            let gone = matches!(
                tokio::time::timeout(self.api_timeout, self.pods.get_opt(&m.name)).await,
                Ok(Ok(None))
            );
            if !gone {
                continue;
            }
            let patch = Patch::Merge(json!({"status": {"instances": {m.name.clone(): null}}}));
            let result = tokio::time::timeout(
                self.api_timeout,
                self.clusters.patch_status(
                    &self.shared.identity.cluster,
                    &PatchParams::default(),
                    &patch,
                ),
            )
            .await;
            if matches!(result, Ok(Ok(_))) {
                tracing::info!(instance = %m.name, "its Pod is gone: status entry removed, its slot follows");
                self.events
                    .normal(
                        "InstanceRemoved",
                        format!(
                            "{}: its Pod is gone; status entry and replication slot removed",
                            m.name
                        ),
                    )
                    .await;
            }
        }
    }

    /// A standby that cannot stream from a healthy primary for long has diverged from it (for
    /// example a timeline it cannot follow): it is stopped, its data directory moved aside
    /// (kept) and the next tick clones afresh, when the spec allows it.
    async fn watch_stream(&self, tick: &Tick, memory: &mut Memory) {
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
        let mine = self
            .observation
            .borrow()
            .pg
            .as_deref()
            .map(|p| p.system_identifier.clone());
        if self.foreign_primary(&primary, mine, tick, memory).await {
            return;
        }
        // A new copy cures divergence, never trouble connecting: a standby that cannot connect
        // (a password, a slot, pg_hba.conf, the network) would be recloned again and again,
        // filling the volume with copies kept aside. That is reported and retried.
        let evidence = match super::stream::classify(&self.server_log.recent()) {
            super::stream::Trouble::Diverged(line) => line,
            super::stream::Trouble::Unknown => "no message from Postgres says why".to_string(),
            super::stream::Trouble::Connecting(cause) => {
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
            "{} has not streamed from the healthy primary {primary} for {STUCK_AFTER:?}: diverged ({evidence})",
            self.me
        );
        if !tick.spec.failover.reclone_on_rewind_failure {
            tracing::error!("{what}; recloneOnRewindFailure is off: leaving it as it is");
            self.events.warning("Diverged", what).await;
            return;
        }
        tracing::error!("{what}; moving the data directory aside and cloning afresh");
        self.postmaster.halt(StopMode::Fast, false).await;
        match replica::move_aside(&self.pg.data_dir) {
            Ok(to) => {
                memory.following = None;
                self.events
                    .warning(
                        "Recloning",
                        format!(
                            "{what}; data directory kept at {} and cloned afresh",
                            to.display()
                        ),
                    )
                    .await;
            }
            Err(e) => tracing::error!(error = %e, "cannot move the data directory aside"),
        }
    }

    /// Whether Postgres shows `names` as its `synchronous_standby_names` (read on a new
    /// session, which sees the configuration the postmaster reloaded), within about a second.
    async fn in_force(&self, names: Option<String>) -> bool {
        let want = names.unwrap_or_default();
        let target = crate::postgres::connect::Target::admin(&self.pg);
        for _ in 0..20 {
            if let Ok(conn) = crate::postgres::connect::connect_timeout(&target).await {
                let shown = tokio::time::timeout(
                    Duration::from_secs(1),
                    conn.query_one("SHOW synchronous_standby_names", &[]),
                )
                .await;
                if let Ok(Ok(row)) = shown {
                    if row.try_get::<_, String>(0).is_ok_and(|v| v == want) {
                        return true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Standbys streaming from this primary right now.
    fn streaming(&self) -> Vec<String> {
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
    async fn first_sync(&mut self, tick: &Tick) -> Option<Sync> {
        let s = &tick.spec.synchronous;
        let sync = if s.mode != crd::SynchronousMode::Quorum || s.number == 0 {
            Sync::Off
        } else {
            let others: Vec<String> = tick.members.iter().map(|m| m.name.clone()).collect();
            quorum::target(
                s.number as usize,
                s.allow_degraded,
                &[],
                &Sync::Off,
                &others,
            )
            .0
        };
        if !matches!(self.lease.renew_publishing(&sync).await, Ok(true)) {
            tracing::warn!("cannot renew the Lease (and publish the synchronous set) before taking writes; retrying");
            return None;
        }
        Some(sync)
    }

    async fn promote(&mut self, tick: &Tick, memory: &mut Memory, why: &str) {
        if tick.observed.local != Local::Replica {
            return; // a stopped or crashed holder is started by the next tick's decision
        }
        if !matches!(self.status.borrow().state, State::Running { .. }) {
            // Still recovering to a consistent state, which may never come (the WAL it needs
            // may be on an instance that is down): renewing the Lease meanwhile would keep
            // everyone else from taking over. It is given up; this standby competes again
            // once ready.
            if self.lease.held_by_me() {
                tracing::warn!(
                    "cannot promote a standby that is not ready yet; giving the Lease up"
                );
                let _ = self.lease.release().await;
            }
            return;
        }
        let Some(sync) = self.first_sync(tick).await else {
            return;
        };
        match self.postmaster.promote(quorum::standby_names(&sync)).await {
            Ok(()) => {
                let primary = Replication {
                    standby: None,
                    synchronous_standby_names: quorum::standby_names(&sync),
                };
                if let Err(e) = self.postmaster.set_replication(primary).await {
                    tracing::error!(error = %e, "cannot render the primary's settings");
                }
                memory.following = None;
                memory.standby = false;
                memory.applied = sync.clone();
                memory.published = Some(sync);
                self.events
                    .normal(
                        "Promoted",
                        format!("{} promoted to primary ({why})", self.me),
                    )
                    .await;
                let standbys: Vec<String> = tick.members.iter().map(|m| m.name.clone()).collect();
                if let Err(e) = replica::sync_slots(&self.pg, &standbys).await {
                    tracing::warn!(error = %e, "cannot create the replication slots yet");
                }
                self.shared.report_now.notify_one();
            }
            Err(e) => {
                tracing::error!(error = %e, "promotion failed");
                self.events
                    .warning("PromotionFailed", format!("{}: {e}", self.me))
                    .await;
            }
        }
    }

    /// Streams from `primary`: reconfigures a running standby, or prepares the data directory
    /// (clone, rewind) and starts one.
    async fn follow(&mut self, primary: &str, tick: &Tick, memory: &mut Memory) {
        let Some(address) = tick
            .members
            .iter()
            .find(|m| m.name == primary)
            .and_then(|m| m.postgres.clone())
        else {
            tracing::debug!(%primary, "the primary's address is not known yet");
            return;
        };
        let Some(upstream) = self.upstream(&address) else {
            return;
        };
        match tick.observed.local {
            Local::Replica | Local::Crashed { .. } => {
                if memory.following.as_deref() != Some(primary)
                    || memory.following_address.as_ref() != Some(&address)
                {
                    match self.postmaster.set_replication(standby(upstream)).await {
                        Ok(()) => {
                            tracing::info!(%primary, "now following");
                            memory.following = Some(primary.to_string());
                            memory.following_address = Some(address);
                        }
                        Err(e) => tracing::error!(error = %e, "cannot repoint the standby"),
                    }
                }
            }
            Local::Primary => {} // decide() demotes it first
            Local::Stopped => {
                if !tick.observed.has_data {
                    if let Err(e) =
                        replica::clone(&self.reaper, &self.binaries, &self.pg, &address, &self.me)
                            .await
                    {
                        tracing::warn!(error = %e, "clone failed; retrying");
                        return;
                    }
                    self.events
                        .normal("Cloned", format!("{} cloned from {primary}", self.me))
                        .await;
                } else if !self.pg_standby_configured()
                    && !self.rewind(primary, &address, tick, memory).await
                {
                    return;
                }
                if self.start_standby(Some(upstream), memory).await {
                    memory.following = Some(primary.to_string());
                    memory.following_address = Some(address);
                }
            }
        }
    }

    /// The standby settings to stream from `address`, with the passfile they authenticate
    /// with written; `None` until the replication password is known.
    fn upstream(&self, address: &Address) -> Option<Upstream> {
        let Some(password) = self.shared.replication_password.borrow().clone() else {
            tracing::info!("waiting for the replication password (spec.secrets.replication)");
            return None;
        };
        if let Err(e) = replica::write_passfile(&self.pg.run_dir, &password) {
            tracing::error!(error = %e, "cannot write the replication passfile");
            return None;
        }
        Some(replica::upstream(address, &self.me, &self.pg.run_dir))
    }

    /// Brings a former primary's data onto `primary`'s timeline; false when it could not
    /// (yet). After repeated failures against a healthy primary the directory is moved aside
    /// and the next tick clones afresh, when the spec allows it.
    async fn rewind(
        &mut self,
        primary: &str,
        address: &Address,
        tick: &Tick,
        memory: &mut Memory,
    ) -> bool {
        // Its elector says "primary" only once the promotion's checkpoint is done: before
        // that, pg_rewind would read the old timeline from its control file and wrongly
        // find nothing to rewind.
        let source_ready = tick
            .peers
            .iter()
            .any(|p| p.name == primary && p.healthy && p.primary);
        if !source_ready {
            tracing::info!(%primary, "waiting for the new primary to accept writes before rewinding");
            return false;
        }
        if self.foreign_primary(primary, None, tick, memory).await {
            return false;
        }
        match replica::rewind(&self.reaper, &self.binaries, &self.pg, address, &self.me).await {
            Ok(()) => {
                memory.rewind_failures = 0;
                self.events
                    .normal("Rewound", format!("{} rewound onto {primary}", self.me))
                    .await;
                true
            }
            Err(e) => {
                memory.rewind_failures += 1;
                tracing::error!(error = %e, attempt = memory.rewind_failures, "pg_rewind failed");
                if memory.rewind_failures < REWIND_ATTEMPTS {
                    return false;
                }
                if !tick.spec.failover.reclone_on_rewind_failure {
                    self.events
                        .warning(
                            "RewindFailed",
                            format!(
                                "{}: {e}; staying stopped (recloneOnRewindFailure is off)",
                                self.me
                            ),
                        )
                        .await;
                    return false;
                }
                match replica::move_aside(&self.pg.data_dir) {
                    Ok(to) => {
                        memory.rewind_failures = 0;
                        self.events
                            .warning(
                                "Recloning",
                                format!(
                                    "{}: {e}; data directory kept at {} and cloned afresh",
                                    self.me,
                                    to.display()
                                ),
                            )
                            .await;
                    }
                    Err(e) => tracing::error!(error = %e, "cannot move the data directory aside"),
                }
                false
            }
        }
    }

    async fn start_standby(&mut self, upstream: Option<Upstream>, memory: &mut Memory) -> bool {
        let upstream = upstream.unwrap_or(Upstream {
            conninfo: String::new(),
            slot: None,
        });
        if let Err(e) = self.postmaster.set_replication(standby(upstream)).await {
            tracing::error!(error = %e, "cannot configure the standby");
            return false;
        }
        memory.standby = true;
        // A standby is ready once consistent, which may need WAL from an upstream that went
        // away meanwhile: the elector goes on after a while (Postgres keeps starting, as a
        // replica in the next decision, which repoints it to whoever leads by then).
        match tokio::time::timeout(STANDBY_START_WAIT, self.postmaster.start()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "standby did not start");
                false
            }
            Err(_) => {
                tracing::info!("the standby is still recovering to a consistent state; going on");
                true
            }
        }
    }

    async fn start_primary(&mut self, tick: &Tick, memory: &mut Memory) {
        // Confirm the Lease before taking writes: this process may just have started.
        if !matches!(self.lease.renew().await, Ok(true)) {
            return;
        }
        if !tick.observed.has_data {
            if tick.observed.initialized {
                tracing::error!("holding the Lease without data; giving it up");
                let _ = self.lease.release().await;
            } else {
                self.initialise(memory).await;
            }
            return;
        }
        if self.pg_standby_configured() {
            // A standby's data: promote it properly (a new timeline) rather than starting it
            // as a primary on the old one.
            if self.start_standby(None, memory).await {
                let tick = Tick {
                    observed: Observed {
                        local: Local::Replica,
                        ..tick.observed.clone()
                    },
                    spec: tick.spec.clone(),
                    cluster: tick.cluster.clone(),
                    members: tick.members.clone(),
                    peers: tick.peers.clone(),
                    in_failsafe: tick.in_failsafe,
                    system_ids: tick.system_ids.clone(),
                };
                self.promote(&tick, memory, "restart").await;
            }
            return;
        }
        let Some(sync) = self.first_sync(tick).await else {
            return;
        };
        let primary = Replication {
            standby: None,
            synchronous_standby_names: quorum::standby_names(&sync),
        };
        if let Err(e) = self.postmaster.set_replication(primary).await {
            tracing::error!(error = %e, "cannot configure the primary");
            return;
        }
        memory.applied = sync.clone();
        memory.published = Some(sync);
        if let Err(e) = self.postmaster.start().await {
            tracing::warn!(error = %e, "primary did not start");
        }
    }

    async fn bootstrap(&mut self, memory: &mut Memory) {
        match self.lease.acquire().await {
            Ok(true) => self.initialise(memory).await,
            Ok(false) => tracing::info!("another instance is initialising the cluster"),
            Err(e) => tracing::warn!(error = %e, "cannot create the Lease"),
        }
    }

    async fn initialise(&mut self, memory: &mut Memory) {
        if let Err(e) = datadir::initdb(&self.reaper, &self.binaries, &self.pg).await {
            tracing::error!(error = %e, "initdb failed");
            self.events.warning("InitdbFailed", e.to_string()).await;
            return;
        }
        if let Err(e) = datadir::ensure_mode(&self.pg.data_dir) {
            tracing::error!(error = %e, "cannot set the data directory's mode");
            return;
        }
        self.events
            .normal(
                "Initialized",
                format!("{} initialised the cluster", self.me),
            )
            .await;
        let _ = self.lease.renew().await;
        let _ = self
            .postmaster
            .set_replication(Replication::default())
            .await;
        memory.standby = false;
        if let Err(e) = self.postmaster.start().await {
            tracing::warn!(error = %e, "first start failed");
        }
    }

    /// Hands the primary role to `target`: stop taking writes (a clean, checkpointed
    /// shutdown), wait until the target received everything, pass it the Lease, and follow
    /// it. Refused, with the reason in an Event, when the target is not a healthy, caught-up
    /// standby.
    async fn switchover(
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
    fn switchover_bounds(&self, tick: &Tick) -> (Option<crate::postgres::lsn::Lsn>, u64) {
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

    async fn try_switchover(
        &mut self,
        target: &str,
        tick: &Tick,
        memory: &mut Memory,
        stopping: bool,
    ) -> Result<(), String> {
        let (own, max_lag) = self.switchover_bounds(tick);
        decide::switchover_check(target, &tick.peers, own, max_lag)?;
        // It must be streaming from this primary, or it could never receive the last WAL.
        if !self.streaming().iter().any(|s| s == target) {
            return Err(format!("{target} is not streaming from the primary"));
        }
        let address = tick
            .members
            .iter()
            .find(|m| m.name == target)
            .and_then(|m| m.postgres.clone())
            .ok_or("its Postgres address is unknown")?;
        tracing::info!(%target, "switchover: stopping writes");
        let outcome = self.postmaster.halt(StopMode::Fast, false).await;
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
        let retry = tick.observed.timings.retry;
        loop {
            // Still the leader while waiting (Postgres is stopped: renewing is safe), so that
            // the Lease cannot expire into a failover in the middle of the switchover.
            if self.lease.since_renew().is_none_or(|s| s >= retry) {
                let _ = self.lease.renew().await;
            }
            let docs = peers::fetch(&self.http, &member, PEER_TIMEOUT, None).await;
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
        memory.applied = Sync::Off;
        memory.published = None;
        if !stopping {
            if let Some(upstream) = self.upstream(&address) {
                if self.start_standby(Some(upstream), memory).await {
                    memory.following = Some(target.to_string());
                    memory.following_address = Some(address);
                }
            }
        }
        Ok(())
    }

    /// The position of the shutdown checkpoint (the last record a clean stop wrote).
    async fn last_checkpoint(&self) -> Result<crate::postgres::lsn::Lsn, String> {
        let value = self.control_field("Latest checkpoint location:").await?;
        value
            .parse()
            .map_err(|_| format!("pg_controldata gave no checkpoint location: {value:?}"))
    }

    /// One field of `pg_controldata`'s report on the local data directory.
    async fn control_field(&self, field: &str) -> Result<String, String> {
        let mut cmd = crate::postgres::command(self.binaries.tool("pg_controldata"));
        cmd.arg("-D").arg(&self.pg.data_dir).env("LC_ALL", "C");
        let out = self
            .reaper
            .output(&mut cmd)
            .await
            .map_err(|e| format!("cannot run pg_controldata: {e}"))?;
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| format!("pg_controldata gave no {field} {}", out.stderr.trim()))
    }

    /// Whether `primary`'s cluster is another database than the one in this data directory
    /// (another system identifier): then nothing may rewind onto it or reclone from it, which
    /// would replace this data with that database. Reported once; it waits for a human.
    async fn foreign_primary(
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
            None => match self.control_field("Database system identifier:").await {
                Ok(mine) => mine,
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

    async fn clear_switchover_request(&self) {
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
    async fn shutdown(&mut self, memory: &mut Memory) {
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
                .max_by(|a, b| a.lsn.cmp(&b.lsn).then_with(|| b.name.cmp(&a.name)))
                .map(|p| p.name.clone());
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

/// A Lease call that got no answer (as opposed to an answer such as a conflict).
fn unanswered(e: &super::lease::LeaseError) -> bool {
    use crate::k8s::Reachability;
    match e {
        super::lease::LeaseError::Timeout => true,
        super::lease::LeaseError::Api(e) => !e.answered(),
    }
}

fn standby(upstream: Upstream) -> Replication {
    Replication {
        standby: Some(upstream),
        synchronous_standby_names: None,
    }
}

fn timings(spec: &PostgresClusterSpec) -> Timings {
    let f = &spec.failover;
    Timings {
        lease_duration: Duration::from_secs(f.lease_duration_seconds.into()),
        renew_deadline: Duration::from_secs(f.renew_deadline_seconds.into()),
        retry: Duration::from_secs(f.retry_period_seconds.into()),
    }
}

/// Whether `me` is listed in the fencing annotation (a JSON list of names, `*` for all). An
/// unreadable annotation fences nobody and is logged.
pub fn fenced(annotations: Option<&Annotations>, me: &str) -> bool {
    let Some(raw) = annotations.and_then(|a| a.get(FENCED_ANNOTATION)) else {
        return false;
    };
    match serde_json::from_str::<Vec<String>>(raw) {
        Ok(list) => list.iter().any(|n| n == me || n == "*"),
        Err(e) => {
            tracing::error!(annotation = FENCED_ANNOTATION, value = %raw, error = %e, "not a JSON list of instance names; ignored");
            false
        }
    }
}

type Annotations = std::collections::BTreeMap<String, String>;

fn switchover_request(annotations: Option<&Annotations>) -> Option<String> {
    annotations?
        .get(SWITCHOVER_ANNOTATION)
        .filter(|s| !s.is_empty())
        .cloned()
}

fn describe(action: &Action) -> String {
    match action {
        Action::Wait(reason) => format!("wait: {reason}"),
        Action::Renew => "lead".into(),
        Action::Fence(reason) => format!("fence: {reason}"),
        Action::FenceAndRelease => "fenced".into(),
        Action::Acquire => "take the expired Lease".into(),
        Action::Promote => "promote".into(),
        Action::Demote { primary } => format!("demote and follow {primary}"),
        Action::Follow { primary } => format!("follow {primary}"),
        Action::RestartLocally => "restart Postgres locally".into(),
        Action::Release => "give the Lease up".into(),
        Action::StartPrimary => "start as primary".into(),
        Action::Bootstrap => "initialise the cluster".into(),
        Action::StartStandby => "start as a standby to compete".into(),
    }
}

/// Wakes the elector whenever the Lease changes hands (a handover must be noticed at once,
/// not at the next retry period); renewals do not wake it.
async fn watch_lease(api: Api<K8sLease>, name: String, wake: Arc<Notify>) {
    use kube::runtime::WatchStreamExt;
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(crate::k8s::WATCH_TIMEOUT.as_secs() as u32);
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut holder: Option<Option<String>> = None;
    while let Some(event) = stream.next().await {
        let now = match event {
            Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l)) => {
                l.spec.and_then(|s| s.holder_identity)
            }
            Ok(watcher::Event::Delete(_)) => None,
            _ => continue,
        };
        if holder.as_ref() != Some(&now) {
            holder = Some(now);
            wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_annotation() {
        let with = |k: &str, v: &str| Annotations::from([(k.to_string(), v.to_string())]);
        let fence = |v: &str| with(FENCED_ANNOTATION, v);
        assert!(fenced(Some(&fence(r#"["pg-1"]"#)), "pg-1"));
        assert!(!fenced(Some(&fence(r#"["pg-1"]"#)), "pg-2"));
        assert!(fenced(Some(&fence(r#"["*"]"#)), "pg-2"));
        assert!(!fenced(Some(&fence("pg-1")), "pg-1"), "not JSON: ignored");
        assert!(!fenced(None, "pg-1"));
        assert_eq!(
            switchover_request(Some(&with(SWITCHOVER_ANNOTATION, "pg-2"))),
            Some("pg-2".into())
        );
    }
}
