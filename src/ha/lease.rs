//! The leader Lease (`coordination.k8s.io/v1`, `<cluster>-leader`): reading it, taking it,
//! renewing it, giving it up.
//!
//! Expiry is judged on this instance's monotonic clock from the moment it last *saw* the Lease
//! change, never from the timestamps written in it. The leader records when it *sent* each
//! renewal that succeeded; if that is older than the renew deadline it has already stopped
//! writing (see `decide`). Taking the Lease is a replace preconditioned on the
//! resourceVersion that was observed, so exactly one candidate can win.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::chrono::Utc;
use kube::api::PostParams;
use kube::Api;

use super::decide::{self, Timings};
use super::fence::FenceTimer;

/// Lease annotations with the synchronous set the holder relies on (see `quorum`).
pub const SYNC_NUMBER: &str = "pgwarden.dev/sync-number";
pub const SYNC_SET: &str = "pgwarden.dev/sync-standbys";
/// Lease annotations with the holder's database: its system identifier and timeline.
pub const SYSTEM_IDENTIFIER: &str = "pgwarden.dev/system-identifier";
pub const TIMELINE: &str = "pgwarden.dev/timeline";

/// What was last observed of the Lease.
#[derive(Debug, Clone)]
struct Seen {
    resource_version: Option<String>,
    holder: Option<String>,
    at: Instant,
    lease: Lease,
}

pub struct LeaseClient {
    api: Api<Lease>,
    name: String,
    me: String,
    timings: Timings,
    timeout: Duration,
    seen: Option<Seen>,
    /// When the last renewal (or acquisition) that succeeded was sent.
    renewed_at: Option<Instant>,
    /// Armed with every renewal that succeeded: it stops writes at the renew deadline even
    /// while this client waits for an API server that does not answer.
    fence: FenceTimer,
    /// This instance's database, published with every renewal.
    position: Option<decide::Position>,
    /// Time a renewal leaves before the renew deadline (see [`LeaseClient::reserve`]).
    reserve: Duration,
}

/// The shortest wait a renewal is given when a reserve shortens it.
const MIN_RENEW_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the API server did not answer in time")]
    Timeout,
    #[error(transparent)]
    Api(#[from] kube::Error),
}

/// An API call bounded by `timeout`.
async fn within<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, LeaseError> {
    tokio::time::timeout(timeout, f)
        .await
        .map_err(|_| LeaseError::Timeout)?
        .map_err(LeaseError::Api)
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl LeaseClient {
    pub fn new(
        api: Api<Lease>,
        cluster: &str,
        me: &str,
        timings: Timings,
        timeout: Duration,
    ) -> LeaseClient {
        LeaseClient {
            api,
            name: format!("{cluster}-leader"),
            me: me.to_string(),
            timings,
            timeout,
            seen: None,
            renewed_at: None,
            fence: FenceTimer::detached(),
            position: None,
            reserve: Duration::ZERO,
        }
    }

    /// Renewals give up this long before the renew deadline (when that still leaves them a
    /// second): a renewal black-holed right after an answered read must not hold the elector
    /// until the deadline, or no failsafe round could confirm in time.
    pub fn reserve(&mut self, reserve: Duration) {
        self.reserve = reserve;
    }

    /// Arms `fence` with every renewal that succeeds from now on.
    pub fn with_fence(mut self, fence: FenceTimer) -> LeaseClient {
        self.fence = fence;
        self
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, LeaseError> {
        within(self.timeout, f).await
    }

    /// Reads the Lease and returns the view the decision uses. Between failed reads the view
    /// keeps ageing from the last observed change, so an unreachable API server makes the
    /// Lease look expired to followers (who then cannot take it) and never younger.
    pub async fn observe(&mut self) -> (decide::Lease, Result<(), LeaseError>) {
        self.observe_within(self.timeout).await
    }

    /// [`LeaseClient::observe`], the read bounded by `timeout`.
    pub async fn observe_within(
        &mut self,
        timeout: Duration,
    ) -> (decide::Lease, Result<(), LeaseError>) {
        let result = within(timeout, self.api.get_opt(&self.name)).await;
        let outcome = match result {
            Ok(Some(lease)) => {
                let rv = lease.metadata.resource_version.clone();
                let changed = self.seen.as_ref().is_none_or(|s| s.resource_version != rv);
                if changed {
                    let holder = lease
                        .spec
                        .as_ref()
                        .and_then(|s| s.holder_identity.clone())
                        .filter(|h| !h.is_empty());
                    self.seen = Some(Seen {
                        resource_version: rv,
                        holder,
                        at: Instant::now(),
                        lease,
                    });
                }
                Ok(())
            }
            Ok(None) => {
                self.seen = None;
                return (decide::Lease::Absent, Ok(()));
            }
            Err(e) => Err(e),
        };
        (self.view(), outcome)
    }

    fn view(&self) -> decide::Lease {
        match &self.seen {
            None => decide::Lease::Unknown,
            Some(Seen { holder: None, .. }) => decide::Lease::Held {
                // Released: as good as expired.
                holder: String::new(),
                unchanged_for: Duration::MAX,
            },
            Some(Seen {
                holder: Some(h),
                at,
                ..
            }) => decide::Lease::Held {
                holder: h.clone(),
                unchanged_for: at.elapsed(),
            },
        }
    }

    /// How long until another holder's Lease, as last observed, expires for this instance
    /// (judged by `lease_duration`); `None` when it is not held by another.
    pub fn until_expiry(&self, lease_duration: Duration) -> Option<Duration> {
        let seen = self.seen.as_ref()?;
        let holder = seen.holder.as_deref()?;
        (holder != self.me).then(|| lease_duration.saturating_sub(seen.at.elapsed()))
    }

    /// The lease duration its holder wrote in the Lease, as last observed (zero if none).
    pub fn written_duration(&self) -> Duration {
        self.seen
            .as_ref()
            .and_then(|s| s.lease.spec.as_ref()?.lease_duration_seconds)
            .and_then(|secs| u64::try_from(secs).ok())
            .map_or(Duration::ZERO, Duration::from_secs)
    }

    /// The Lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adopts new timings (the spec changed).
    pub fn set_timings(&mut self, timings: Timings) {
        self.timings = timings;
    }

    /// Time since the last successful renewal was sent (leader only).
    pub fn since_renew(&self) -> Option<Duration> {
        self.renewed_at.map(|t| t.elapsed())
    }

    /// Whether this instance is the holder of the Lease as last observed.
    pub fn held_by_me(&self) -> bool {
        self.seen.as_ref().and_then(|s| s.holder.as_deref()) == Some(self.me.as_str())
    }

    fn spec(&self, acquire: bool, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Utc::now());
        LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(self.timings.lease_duration.as_secs() as i32),
            acquire_time: acquire.then(|| now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Takes the Lease: creates it when absent, else replaces it at the observed
    /// resourceVersion. `Ok(false)` when someone else got there first.
    pub async fn acquire(&mut self) -> Result<bool, LeaseError> {
        let sent = Instant::now();
        let result = match &self.seen {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(true, 0)),
                };
                self.bounded(self.api.create(&PostParams::default(), &lease))
                    .await
            }
            Some(seen) => {
                let mut lease = seen.lease.clone();
                let transitions = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_transitions)
                    .unwrap_or(0);
                lease.spec = Some(self.spec(true, transitions + 1));
                self.bounded(self.api.replace(&self.name, &PostParams::default(), &lease))
                    .await
            }
        };
        self.settle(result, sent)
    }

    /// What this instance's Postgres runs (published with its renewals).
    pub fn set_position(&mut self, position: Option<decide::Position>) {
        self.position = position;
    }

    /// The database the holder published in the Lease, as last observed.
    pub fn published_position(&self) -> Option<decide::Position> {
        let annotations = self.seen.as_ref()?.lease.metadata.annotations.as_ref()?;
        Some(decide::Position {
            system_identifier: annotations.get(SYSTEM_IDENTIFIER)?.clone(),
            timeline: annotations.get(TIMELINE)?.parse().ok()?,
        })
    }

    /// The synchronous set the holder published in the Lease (annotations), as last observed.
    pub fn published_sync(&self) -> decide::Sync {
        let annotations = self
            .seen
            .as_ref()
            .and_then(|s| s.lease.metadata.annotations.as_ref());
        let get = |k: &str| annotations.and_then(|a| a.get(k));
        match (get(SYNC_NUMBER), get(SYNC_SET)) {
            (Some(n), Some(set)) => match (n.parse(), serde_json::from_str(set)) {
                (Ok(number), Ok(set)) => decide::Sync::Quorum { number, set },
                // Unreadable: a quorum nobody can satisfy, so nobody promotes on a guess.
                _ => decide::Sync::Quorum {
                    number: 0,
                    set: Vec::new(),
                },
            },
            _ => decide::Sync::Off,
        }
    }

    /// Renews the Lease and publishes `sync` in it (the holder's synchronous set).
    pub async fn renew_publishing(&mut self, sync: &decide::Sync) -> Result<bool, LeaseError> {
        self.write_own(|lease| {
            let annotations = lease
                .metadata
                .annotations
                .get_or_insert_with(Default::default);
            match sync {
                decide::Sync::Off => {
                    annotations.remove(SYNC_NUMBER);
                    annotations.remove(SYNC_SET);
                }
                decide::Sync::Quorum { number, set } => {
                    annotations.insert(SYNC_NUMBER.into(), number.to_string());
                    annotations.insert(
                        SYNC_SET.into(),
                        serde_json::to_string(set).unwrap_or_default(),
                    );
                }
            }
        })
        .await
    }

    /// Passes the Lease to `to` (a planned switchover): the target sees itself as the holder
    /// and promotes. Preconditioned on the observed resourceVersion like every write.
    pub async fn hand_over(&mut self, to: &str) -> Result<bool, LeaseError> {
        let to = to.to_string();
        let result = self
            .write_own(move |lease| {
                if let Some(spec) = lease.spec.as_mut() {
                    spec.holder_identity = Some(to);
                    spec.acquire_time = Some(MicroTime(Utc::now()));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
            })
            .await;
        self.renewed_at = None;
        if matches!(result, Ok(true)) {
            // Postgres was stopped before the hand-over: nothing of ours takes writes.
            self.fence.disarm();
        }
        result
    }

    /// The Lease as last seen, when this instance holds it.
    fn held(&self) -> Option<Seen> {
        self.seen
            .clone()
            .filter(|s| s.holder.as_deref() == Some(self.me.as_str()))
    }

    /// Replaces the Lease this instance holds after `edit`, renewing it.
    async fn write_own(&mut self, edit: impl FnOnce(&mut Lease)) -> Result<bool, LeaseError> {
        let Some(seen) = self.held() else {
            return Ok(false);
        };
        let sent = Instant::now();
        let mut lease = seen.lease;
        let mut spec = lease.spec.take().unwrap_or_default();
        spec.renew_time = Some(MicroTime(Utc::now()));
        spec.lease_duration_seconds = Some(self.timings.lease_duration.as_secs() as i32);
        lease.spec = Some(spec);
        if let Some(p) = &self.position {
            let annotations = lease
                .metadata
                .annotations
                .get_or_insert_with(Default::default);
            annotations.insert(SYSTEM_IDENTIFIER.into(), p.system_identifier.clone());
            annotations.insert(TIMELINE.into(), p.timeline.to_string());
        }
        edit(&mut lease);
        // Raced against the renew deadline: an answer after it is worth nothing (the fence
        // timer has stopped writes by then), and waiting for it would hold up what follows.
        let left = self
            .renewed_at
            .map(|t| self.timings.renew_deadline.saturating_sub(t.elapsed()))
            .filter(|left| !left.is_zero());
        let reserve = self.reserve;
        let timeout = left.map_or(self.timeout, |left| {
            let capped = left.saturating_sub(reserve);
            let wait = if capped >= MIN_RENEW_WAIT {
                capped
            } else {
                left
            };
            wait.min(self.timeout)
        });
        let result = within(
            timeout,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await;
        self.settle(result, sent)
    }

    /// Renews the Lease this instance holds, at the observed resourceVersion.
    pub async fn renew(&mut self) -> Result<bool, LeaseError> {
        self.write_own(|_| {}).await
    }

    /// Gives the Lease up (clears the holder) so that a standby need not wait for expiry.
    pub async fn release(&mut self) -> Result<bool, LeaseError> {
        let Some(seen) = self.held() else {
            return Ok(false);
        };
        let mut lease = seen.lease;
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        let result = self
            .bounded(self.api.replace(&self.name, &PostParams::default(), &lease))
            .await;
        self.renewed_at = None;
        let sent = Instant::now();
        let result = self.settle(result, sent);
        if matches!(result, Ok(true)) {
            // Every caller stops Postgres before it gives the Lease up.
            self.fence.disarm();
        }
        result
    }

    /// Records a write's outcome: the new Lease becomes the observation; a conflict means
    /// someone else changed it (re-read on the next observe).
    fn settle(
        &mut self,
        result: Result<Lease, LeaseError>,
        sent: Instant,
    ) -> Result<bool, LeaseError> {
        match result {
            Ok(lease) => {
                let holder = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.clone())
                    .filter(|h| !h.is_empty());
                if holder.as_deref() == Some(self.me.as_str()) {
                    self.renewed_at = Some(sent);
                    self.fence.confirmed(sent, self.timings.renew_deadline);
                }
                self.seen = Some(Seen {
                    resource_version: lease.metadata.resource_version.clone(),
                    holder,
                    at: Instant::now(),
                    lease,
                });
                Ok(true)
            }
            Err(LeaseError::Api(e)) if is_status(&e, 409) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
