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
use super::tasks::{Task, TaskError, Work};
use super::{FENCED_ANNOTATION, SWITCHOVER_ANNOTATION};
use crate::config::PostgresConfig;
use crate::health::{Assessor, Health};
use crate::k8s::crd::{self, PostgresClusterSpec};
use crate::k8s::events::Events;
use crate::k8s::Shared;
use crate::monitor::snapshot::Role;
use crate::monitor::Observation;
use crate::postgres::binaries::Binaries;
use crate::postgres::conf::{Replication, Upstream};
use crate::postgres::control;
use crate::postgres::datadir::{self, DataDir};
use crate::supervisor::postmaster::{Handle, State, Status, StopMode};
use crate::supervisor::reaper::Reaper;

mod follow;
mod handover;
mod lead;
mod observe;
mod promote;
mod report;

use lead::starting_sync;

/// Requests from the rest of pgwarden.
pub enum Command {
    /// pgwarden is stopping: a primary hands over to the best standby (or releases the
    /// Lease); then the elector stops acting.
    Shutdown(oneshot::Sender<()>),
}

/// How long a peer's `/pg/status` may take.
const PEER_TIMEOUT: Duration = Duration::from_millis(800);

/// What a failsafe round may take: the peers' timeout and time to act on the answers.
const FAILSAFE_ROUND: Duration = Duration::from_millis(1000);
/// A switchover target must be at most this far behind (unless the spec's maximum lag is set).
const SWITCHOVER_MAX_LAG: u64 = 16 << 20;
/// How long a switchover waits for the target to receive the old primary's last WAL.
const SWITCHOVER_CATCH_UP: Duration = Duration::from_secs(10);
/// How long a switchover lets the checkpoint before its stop run (a SIGTERM's hand-over has
/// the pod's grace period for all of it).
const SWITCHOVER_CHECKPOINT: Duration = Duration::from_secs(10);
/// A standby not streaming from a healthy primary for this long has diverged from it.
const STUCK_AFTER: Duration = Duration::from_secs(30);
/// How long a primary that gave the Lease up after repeated crashes stays out of the running.
const STAND_DOWN: Duration = Duration::from_secs(60);
/// How often the primary looks for instances whose Pod is gone.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// pg_rewind attempts against a healthy primary before the directory is moved aside.
const REWIND_ATTEMPTS: u32 = 3;
/// Rewinds of a stuck standby that did not get it streaming again, before it is recloned.
const STREAM_REWINDS: u32 = 2;

pub struct Elector {
    me: String,
    lease: LeaseClient,
    postmaster: Handle,
    status: watch::Receiver<Status>,
    observation: watch::Receiver<Observation>,
    assessor: Assessor,
    shared: Arc<Shared>,
    events: Events,
    clusters: Api<DynamicObject>,
    leases: Api<K8sLease>,
    pods: Api<k8s_openapi::api::core::v1::Pod>,
    pg: PostgresConfig,
    /// pgwarden's `[wal]`: the settings a restore from `spec.bootstrap.recovery` starts from.
    wal: crate::config::WalConfig,
    binaries: Binaries,
    reaper: Reaper,
    http: super::peers::PeerClient,
    max_crashes: u32,
    api_timeout: Duration,
    /// When the last failsafe round that confirmed this primary was sent.
    failsafe_at: Option<Instant>,
    /// Stops writes at the renew deadline, whatever this loop is waiting for.
    fence: super::fence::FenceTimer,
    /// The last Lease read got no answer.
    api_down: bool,
    server_log: crate::postgres::log::ServerLog,
    /// Which members did not answer the last peer rounds.
    silence: peers::Silence,
}

/// What the elector remembers between ticks.
#[derive(Default)]
struct Memory {
    /// Since when the Lease has been seen free (expired, released or absent) while this
    /// instance could compete.
    lease_free_since: Option<Instant>,
    /// When this instance gave the Lease up after repeated crashes as primary.
    stood_down_at: Option<Instant>,
    /// Postgres was last started (or reconfigured) as a standby of this instance.
    following: Option<String>,
    /// ... at this address (a primary rescheduled to a new address must be followed there).
    following_address: Option<Address>,
    /// ... over verified TLS (turning TLS on or off repoints the standby).
    following_tls: bool,
    /// Postgres runs with a standby configuration (even without an upstream).
    standby: bool,
    /// What the Lease says of the synchronous set (as this leader wrote it).
    published: Option<Sync>,
    /// What Postgres may be using.
    applied: quorum::InForce,
    degraded: bool,
    rewind_failures: u32,
    /// The last cause reported of a rewind that could not reach the primary.
    rewind_unreachable: Option<String>,
    fenced_reported: Option<String>,
    last_action: Option<Action>,
    /// Since when this standby has neither streamed from the primary it follows nor replayed
    /// anything, and where its replay stands.
    not_streaming_since: Option<Instant>,
    stuck_at: Option<crate::postgres::lsn::Lsn>,
    /// When departed instances were last looked for, and the task looking (a silent API
    /// server must not hold up the renewals).
    pruned_at: Option<Instant>,
    pruning: Option<tokio::task::JoinHandle<()>>,
    /// The replication slots being brought in line with the members, on a task of its own: a
    /// Postgres that accepts no connection must not hold up the renewals.
    slots: Option<tokio::task::JoinHandle<()>>,
    /// The foreign-primary report last made (made once).
    foreign_reported: Option<String>,
    /// The report of a standby that cannot connect, last made (made once).
    cannot_stream_reported: Option<String>,
    /// The report of a reclone refused while a copy is kept aside (made once).
    aside_reported: Option<String>,
    /// The report of a data directory that cannot be used (made once per change).
    data_reported: Option<String>,
    /// After a failed clone, rewind or start, the next attempt waits until then (wakes from
    /// status changes would otherwise retry in a tight loop).
    retry_at: Option<Instant>,
    /// Restores from `spec.bootstrap.recovery` that failed in a row (the next waits longer).
    restore_failures: u32,
    /// Long work under way (initdb, a start, a promotion), run as a task.
    task: Option<Task>,
    /// Wakes the loop (a Lease change, the end of a task).
    wake: Arc<Notify>,
    /// Since when Postgres has been starting.
    starting_since: Option<Instant>,
    /// The primary this data directory was just cloned or rewound onto (by a task).
    prepared: Option<String>,
    /// Rewinds of this stuck standby since it last streamed.
    stream_rewinds: u32,
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
    /// This tick's Lease read got no answer: a renewal would only wait on the same silence
    /// (and delay the next failsafe round).
    unanswered: bool,
    /// The database system identifier each peer running Postgres reports.
    system_ids: std::collections::BTreeMap<String, String>,
}

impl Tick {
    /// Where `instance`'s Postgres listens, as the cluster's status says.
    fn address(&self, instance: &str) -> Option<Address> {
        self.members
            .iter()
            .find(|m| m.name == instance)
            .and_then(|m| m.postgres.clone())
    }
}

impl Elector {
    /// The elector of this instance, with its Lease client, fence timer and peer client.
    pub fn new(s: super::Start<'_>) -> Elector {
        let k = &s.config.kubernetes;
        let id = &s.shared.identity;
        let client = s.shared.client.clone();
        let timings = Timings::default();
        // reqwest is built without a bundled TLS provider: the plain client's builder still
        // wants one installed (the HTTPS client brings its own, see peers::PeerClient).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = peers::PeerClient::new(
            reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_millis(500))
                .build()
                .unwrap_or_default(),
            s.shared.tls.subscribe(),
        );
        let fence = super::fence::FenceTimer::spawn(s.postmaster.clone());
        Elector {
            me: id.pod.clone(),
            lease: LeaseClient::new(
                kube::Api::namespaced(client.clone(), &id.namespace),
                &id.cluster,
                &id.pod,
                timings,
                k.api_timeout,
            )
            .with_fence(fence.clone()),
            fence,
            postmaster: s.postmaster,
            status: s.status,
            observation: s.observation,
            assessor: s.assessor,
            events: crate::k8s::events::Events::new(client.clone(), id, k.api_timeout),
            clusters: crate::k8s::clusters(&client, &id.namespace),
            leases: kube::Api::namespaced(client.clone(), &id.namespace),
            pods: kube::Api::namespaced(client, &id.namespace),
            shared: s.shared.clone(),
            pg: s.pg,
            wal: s.config.wal.clone(),
            binaries: s.binaries,
            reaper: s.reaper,
            http,
            max_crashes: s.config.supervision.max_crashes,
            api_timeout: k.api_timeout,
            failsafe_at: None,
            api_down: false,
            silence: peers::Silence::default(),
            server_log: s.server_log,
        }
    }

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
            self.me.clone(),
            wake.clone(),
        ));
        let mut memory = Memory {
            // What the data directory says at start: a standby's keeps its standby.signal.
            standby: self.pg.data_dir.join("standby.signal").exists(),
            wake: wake.clone(),
            ..Memory::default()
        };
        let mut cluster = self.shared.cluster.subscribe();
        let mut spec = self.shared.spec.subscribe();
        let mut status = self.status.clone();
        loop {
            let timings = self.timings();
            if let Some(outcome) = memory.task.as_mut().and_then(Task::finished) {
                if let Some(task) = memory.task.take() {
                    self.finished(task.work().clone(), outcome, &mut memory)
                        .await;
                }
            }
            // A start is under way whoever began it (this elector's task, or the postmaster
            // actor restarting Postgres after a crash).
            if matches!(self.status.borrow().state, State::Starting { .. }) {
                memory.starting_since.get_or_insert_with(Instant::now);
            } else {
                memory.starting_since = None;
            }
            if let Some(mut tick) = self.observe().await {
                tick.observed.busy = memory.task.as_ref().map(Task::busy).or_else(|| {
                    memory
                        .starting_since
                        .map(|t| decide::Busy::Starting { for_: t.elapsed() })
                });
                let moved = tick.members.iter().any(|m| {
                    Some(&m.name) == memory.following.as_ref()
                        && m.postgres.is_some()
                        && m.postgres != memory.following_address
                });
                tick.observed.following = memory.following.clone().filter(|_| !moved);
                let held = matches!(&tick.observed.lease,
                    decide::Lease::Held { holder, unchanged_for }
                        if !holder.is_empty() && *unchanged_for <= tick.observed.timings.lease_duration);
                // Counted only while this instance could compete: a wait spent fenced,
                // stopped or starting is no patience given to the others.
                let could_compete = tick.observed.local == Local::Replica
                    && !tick.observed.fenced
                    && tick.observed.lease != decide::Lease::Unknown;
                let free_since = match memory.lease_free_since {
                    _ if held || !could_compete => None,
                    Some(t) => Some(t),
                    None => Some(Instant::now()),
                };
                memory.lease_free_since = free_since;
                tick.observed.lease_free_for = free_since.map_or(Duration::ZERO, |t| t.elapsed());
                tick.observed.standing_down = memory
                    .stood_down_at
                    .is_some_and(|t| t.elapsed() < STAND_DOWN);
                // With members to ask, a renewal that gets no answer leaves time for a
                // failsafe round before the renew deadline.
                self.lease.reserve(if tick.members.is_empty() {
                    Duration::ZERO
                } else {
                    FAILSAFE_ROUND * 2
                });
                let action = decide::decide(&tick.observed);
                self.report_data(&tick, &mut memory).await;
                self.report(&tick, &action, &mut memory);
                self.act(action.clone(), &tick, &mut memory).await;
                self.watch_stream(&tick, &mut memory).await;
                // Again with Postgres's state after the action (a fenced primary must stop
                // saying "primary" at once, not a tick later).
                self.report(&tick, &action, &mut memory);
            }
            // The primary wakes in time for a failsafe round before its renew deadline (the
            // fence timer keeps the deadline itself), and a standby at the expiry of the
            // Lease, not up to a retry period later (the Lease watch wakes it at every
            // renewal, so expiry counts from when the last one was seen).
            let lease_duration = timings
                .judging(self.lease.written_duration())
                .lease_duration;
            let deadline = self
                .since_confirmed()
                .filter(|_| self.lease.held_by_me())
                .and_then(|since| timings.renew_deadline.checked_sub(since))
                .map(|left| left.saturating_sub(FAILSAFE_ROUND * 2))
                .or_else(|| {
                    self.lease
                        .until_expiry(lease_duration)
                        .map(|d| d + Duration::from_millis(10))
                })
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
                        self.events.flush(Duration::from_secs(2)).await;
                        let _ = done.send(());
                    }
                    return;
                }
            }
        }
    }

    /// Gives the Lease up (Postgres was stopped first). When that fails the others take it
    /// at its expiry instead: slower, as safe.
    async fn give_up_lease(&mut self) {
        match self.lease.release().await {
            Ok(true) => tracing::info!("Lease released"),
            Ok(false) => tracing::info!("the Lease is no longer mine: nothing to release"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the Lease: the others take it at its expiry")
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
            Action::Renew | Action::Hold(_) if tick.in_failsafe || tick.unanswered => {}
            Action::Renew => self.lead(tick, memory).await,
            Action::Hold(_) => self.keep_lease(tick, memory).await,
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
                    self.give_up_lease().await;
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
                self.give_up_lease().await;
                memory.stood_down_at = Some(Instant::now());
            }
            Action::StartPrimary => self.start_primary(tick, memory).await,
            Action::Bootstrap => self.bootstrap(&tick.spec, memory).await,
            Action::StartStandby => {
                self.start_standby(None, tick, memory).await;
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

/// Wakes the elector whenever the Lease changes hands (a handover must be noticed at once,
/// not at the next retry period), and a standby at every renewal too: it reads the Lease
/// right after, so that it judges expiry from when the last renewal happened, not from its
/// next poll. The holder's own renewals do not wake it.
async fn watch_lease(api: Api<K8sLease>, name: String, me: String, wake: Arc<Notify>) {
    use kube::runtime::WatchStreamExt;
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(crate::k8s::WATCH_TIMEOUT.as_secs() as u32);
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut last: Option<(Option<String>, Option<String>)> = None;
    while let Some(event) = stream.next().await {
        let now = match event {
            Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l)) => (
                l.spec.and_then(|s| s.holder_identity),
                l.metadata.resource_version,
            ),
            Ok(watcher::Event::Delete(_)) => (None, None),
            _ => continue,
        };
        let handed = last.as_ref().is_none_or(|(holder, _)| *holder != now.0);
        let renewed_by_other = last.as_ref().is_some_and(|(_, rv)| *rv != now.1)
            && now.0.as_deref() != Some(me.as_str());
        if handed || renewed_by_other {
            wake.notify_one();
        }
        last = Some(now);
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
