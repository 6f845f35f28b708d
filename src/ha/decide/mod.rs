//! The HA step as a pure function: what this instance should do, given what it observes.
//!
//! Everything the decision needs is in [`Observed`]; [`decide`] returns one [`Action`] and the
//! elector loop carries it out. No clock is read here: durations since the relevant events
//! (the last successful lease renewal, the last observed lease change) are inputs, measured on
//! the local monotonic clock by the caller. Wall clocks are never compared.

use std::collections::BTreeMap;
use std::time::Duration;

use super::quorum::{self, Refusal};
use crate::postgres::lsn::Lsn;

/// Leadership timing, validated so that `renew_deadline + retry < lease_duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(6),
            retry: Duration::from_secs(2),
        }
    }
}

impl Timings {
    /// The timings a standby judges the Lease with: expiry by the longer of its own lease
    /// duration and the one the holder wrote in the Lease, so that during a change of timings
    /// a holder still on the old (longer) value is not taken over early.
    pub fn judging(self, written: Duration) -> Timings {
        Timings {
            lease_duration: self.lease_duration.max(written),
            ..self
        }
    }
}

/// What Postgres is doing here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Accepting writes.
    Primary,
    /// In recovery (streaming or catching up).
    Replica,
    /// Not running because pgwarden stopped it (fenced, being rewound, before the first start).
    Stopped,
    /// Died unexpectedly; `crashes` within the supervision window so far.
    Crashed { crashes: u32 },
}

/// The Lease as this instance sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// Never read successfully (API unreachable since start).
    Unknown,
    /// No Lease object exists.
    Absent,
    Held {
        holder: String,
        /// Time since this instance last saw the Lease change (local monotonic clock).
        unchanged_for: Duration,
    },
}

/// A peer's (or this instance's own) last report, from its `/pg/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub healthy: bool,
    pub fenced: bool,
    pub replica: bool,
    /// Its elector reports it as the primary: promoted, checkpointed, holding the Lease.
    pub primary: bool,
    /// The newest WAL position it has (received or replayed).
    pub lsn: Option<Lsn>,
    /// How far it has replayed (a promotion must replay the rest first).
    pub replayed: Option<Lsn>,
    /// The timeline of that position: positions compare by (timeline, LSN), never by a bare
    /// LSN across timelines.
    pub timeline: Option<u32>,
    /// It answered, holds data and is not fenced, but has no WAL position yet (Postgres
    /// stopped or starting): it may be the most advanced of all.
    pub starting: bool,
}

impl Peer {
    /// Where its WAL stands, comparable across peers.
    pub fn position(&self) -> Option<(u32, Lsn)> {
        Some((self.timeline.unwrap_or(0), self.lsn?))
    }
}

/// Long work under way on this instance, run as a task while the elector keeps deciding
/// (renewing the Lease, fencing at the deadline, reporting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// initdb of a new cluster, under the Lease this instance created.
    Initialising,
    /// Postgres starting (crash recovery, recovery to a consistent state), for this long.
    Starting { for_: Duration },
    /// `pg_promote` and the checkpoint after it.
    Promoting,
    /// A clone or a rewind of the data directory, Postgres stopped.
    Preparing,
}

/// The database the Lease's holder last said it runs (published with every renewal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub system_identifier: String,
    pub timeline: u32,
}

/// Synchronous replication as published in the Lease.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Sync {
    #[default]
    Off,
    Quorum {
        number: usize,
        set: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub me: String,
    pub local: Local,
    /// This instance is listed in the fencing annotation (or `*` is).
    pub fenced: bool,
    pub lease: Lease,
    pub api_reachable: bool,
    /// Leader only: time since the last renewal that succeeded was *sent*.
    pub since_renew: Option<Duration>,
    pub timings: Timings,
    /// Who the local standby currently follows, if anyone.
    pub following: Option<String>,
    /// Peers that answered, this instance included.
    pub peers: Vec<Peer>,
    pub sync: Sync,
    /// Asynchronous mode: a candidate further behind the most advanced peer is not eligible.
    pub max_lag_bytes: Option<u64>,
    /// Local restarts allowed before the leader gives the Lease up.
    pub max_local_restarts: u32,
    /// The local data directory holds a cluster.
    pub has_data: bool,
    /// Inspecting the local data directory failed (unreadable, not a cluster, another major
    /// version): what is there is unknown, which is never "no data".
    pub data_unusable: Option<String>,
    /// The cluster was initialised before (its status names a primary): never initdb again.
    pub initialized: bool,
    /// What the other instances say of their data directories.
    pub others_data: OthersData,
    /// Long work under way here.
    pub busy: Option<Busy>,
    /// This data directory's database system identifier, when known.
    pub system_identifier: Option<String>,
    /// What the Lease's holder last published of its database.
    pub published: Option<Position>,
    /// How long this instance has seen the Lease free (expired, released or absent) while
    /// it could compete (a healthy, unfenced standby).
    pub lease_free_for: Duration,
    /// This instance gave the Lease up after repeated crashes, moments ago: it does not compete
    /// (it would win again with the newest WAL, and crash again).
    pub standing_down: bool,
}

/// What the other instances of the cluster said of their data directories: an empty volume
/// is initialised only when none of them holds data (a re-created PostgresCluster has lost its
/// status and Lease, not its instances' data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OthersData {
    /// Every other instance answered: none has data.
    AllEmpty,
    /// These instances have data.
    Present(Vec<String>),
    /// Not every other instance has answered yet.
    Unheard { heard: usize, expected: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do now.
    Wait(String),
    /// Renew the Lease this instance holds.
    Renew,
    /// Only renew the Lease while this long work runs here (nothing else is started).
    Hold(String),
    /// Stop taking writes at once (stop Postgres); the reason is reported.
    Fence(String),
    /// Start (or keep) Postgres stopped because of manual fencing, and give the Lease up.
    FenceAndRelease,
    /// Try to take the expired Lease (preconditioned on its resourceVersion), then promote.
    Acquire,
    /// Holding the Lease as a replica: promote.
    Promote,
    /// A primary that lost the Lease: stop, rewind against `primary`, rejoin as its standby.
    Demote { primary: String },
    /// A standby (or a stopped instance) that should stream from `primary`.
    Follow { primary: String },
    /// Postgres crashed on the leader: restart it here, keeping the Lease.
    RestartLocally,
    /// Postgres keeps crashing on the leader: give the Lease up so a standby takes over.
    Release,
    /// Holding the Lease with Postgres stopped (before the first start, after a restart of
    /// pgwarden): start it as the primary.
    StartPrimary,
    /// No Lease, a cluster never initialised, no local data: take the Lease (creating it,
    /// which only one instance can) and initialise the cluster.
    Bootstrap,
    /// Nobody leads and Postgres is stopped here with data: start it as a standby (streaming
    /// from nobody) to learn its WAL position and compete.
    StartStandby,
}

pub fn decide(o: &Observed) -> Action {
    let holder = match &o.lease {
        Lease::Held { holder, .. } => Some(holder.as_str()),
        _ => None,
    };
    let leader = holder == Some(o.me.as_str());

    // Safety first: a primary may take writes only while it holds the Lease *and* a renewal
    // sent within the renew deadline succeeded. Anything else (never renewed in this process,
    // renewal too old, Lease unknown, absent, expired or held by another) stops the writes.
    if o.local == Local::Primary {
        let renewed = o
            .since_renew
            .is_some_and(|since| since <= o.timings.renew_deadline);
        if leader && !renewed {
            return Action::Fence(not_renewed(o));
        }
        if !leader
            && !matches!(&o.lease, Lease::Held { unchanged_for, .. } if *unchanged_for <= o.timings.lease_duration)
        {
            return Action::Fence("primary without a confirmed lease".into());
        }
    }
    // A promotion that outlived the Lease (deleted or taken meanwhile) may make Postgres
    // writable any moment.
    if o.busy == Some(Busy::Promoting) && !leader {
        return Action::Fence("promoting without the Lease".into());
    }
    if o.fenced {
        return match (leader, o.local) {
            (_, Local::Primary | Local::Replica) => Action::FenceAndRelease,
            (true, _) => Action::FenceAndRelease,
            _ => Action::Wait("fenced".into()),
        };
    }
    if let Some(why) = data_blocked(o) {
        // Neither initdb nor a clone over it, and no start of Postgres on it; a holder does
        // not renew, so the Lease expires to a standby that can take over.
        return Action::Wait(format!(
            "the data directory cannot be used ({why}): no initdb, clone or start; waiting for a human"
        ));
    }
    if leader {
        // A promotion may make Postgres writable at any moment: the deadline holds for it as
        // for a primary.
        let renewed = o
            .since_renew
            .is_some_and(|since| since <= o.timings.renew_deadline);
        match o.busy {
            Some(Busy::Promoting) if !renewed => return Action::Fence(not_renewed(o)),
            Some(Busy::Promoting) => return Action::Hold("promoting".into()),
            Some(Busy::Initialising) => return Action::Hold("initialising the cluster".into()),
            // A holder that cannot reach a consistent state within a lease duration gives the
            // Lease up (the promotion below refuses a standby that is not ready): everyone
            // else would wait on it.
            Some(Busy::Starting { for_ }) if for_ <= o.timings.lease_duration => {
                return Action::Hold("starting Postgres".into())
            }
            _ => {}
        }
        return match o.local {
            Local::Primary => Action::Renew,
            Local::Replica => Action::Promote,
            Local::Crashed { crashes } if crashes <= o.max_local_restarts => Action::RestartLocally,
            Local::Crashed { .. } => Action::Release,
            Local::Stopped => Action::StartPrimary,
        };
    }

    match &o.lease {
        Lease::Held {
            holder,
            unchanged_for,
        } if *unchanged_for <= o.timings.lease_duration => {
            return match o.local {
                Local::Primary => Action::Demote {
                    primary: holder.clone(),
                },
                _ if o.following.as_deref() == Some(holder.as_str()) => {
                    Action::Wait(format!("following {holder}"))
                }
                _ => Action::Follow {
                    primary: holder.clone(),
                },
            };
        }
        Lease::Unknown => return Action::Wait("the Lease has not been read yet".into()),
        _ => {}
    }
    if !o.api_reachable {
        return Action::Wait("the API server is unreachable".into());
    }
    // The Lease is absent or expired.
    if !o.has_data {
        // Creating the Lease is the race only one instance wins; the cluster's status keeps a
        // later instance with an empty volume from initialising a second, divergent cluster
        // should the Lease ever be deleted.
        // A released Lease (no holder) is as good as none: an instance stopped during initdb
        // gives its Lease up, and the next one must still be able to initialise.
        let vacant = match &o.lease {
            Lease::Absent => true,
            Lease::Held { holder, .. } => holder.is_empty(),
            Lease::Unknown => false,
        };
        if vacant && !o.initialized && o.local == Local::Stopped {
            return match &o.others_data {
                OthersData::AllEmpty => Action::Bootstrap,
                OthersData::Present(names) => Action::Wait(format!(
                    "no data here, but {} has data: never initialise a new cluster beside it; waiting for a primary",
                    names.join(", ")
                )),
                OthersData::Unheard { heard, expected } => Action::Wait(format!(
                    "no data here: waiting to hear from every instance ({heard} of {expected}) before initialising"
                )),
            };
        }
        return Action::Wait("no data here: waiting for a primary to clone".into());
    }
    if o.standing_down {
        return Action::Wait("standing down after repeated crashes as primary".into());
    }
    if o.local == Local::Stopped {
        return Action::StartStandby;
    }
    match candidacy(o) {
        Ok(()) => Action::Acquire,
        Err(reason) => Action::Wait(reason),
    }
}

/// Why the local data directory keeps this instance waiting: it could not be inspected while
/// Postgres is stopped here and no task is working on it (initdb, a clone and a rewind work in
/// staging or in place, and are judged when they end).
pub fn data_blocked(o: &Observed) -> Option<&str> {
    o.data_unusable
        .as_deref()
        .filter(|_| o.local == Local::Stopped && o.busy.is_none())
}

fn not_renewed(o: &Observed) -> String {
    match o.since_renew {
        Some(since) => format!(
            "lease not renewed for {since:?} (renew deadline {:?})",
            o.timings.renew_deadline
        ),
        None => "lease held but not renewed by this process".into(),
    }
}

/// Whether `target` may receive the primary role in a planned switchover: a healthy, unfenced
/// standby at most `max_lag` bytes behind the primary's position.
pub fn switchover_check(
    target: &str,
    peers: &[Peer],
    primary_lsn: Option<Lsn>,
    max_lag: u64,
) -> Result<(), String> {
    let p = peers
        .iter()
        .find(|p| p.name == target)
        .ok_or_else(|| format!("{target} did not answer"))?;
    if p.fenced {
        return Err(format!("{target} is fenced"));
    }
    if !p.healthy {
        return Err(format!("{target} is not healthy"));
    }
    if !p.replica {
        return Err(format!("{target} is not a standby"));
    }
    let lsn = p
        .lsn
        .ok_or_else(|| format!("{target}'s WAL position is unknown"))?;
    if let Some(own) = primary_lsn {
        let lag = own.bytes_after(lsn);
        if lag > max_lag {
            return Err(format!(
                "{target} is {lag} bytes behind (at most {max_lag} allowed): not caught up"
            ));
        }
    }
    Ok(())
}

/// How long a candidate in asynchronous mode waits, after the Lease fell free, for an
/// instance that answers with data but has no WAL position yet.
pub const STARTING_PATIENCE: Duration = Duration::from_secs(15);

/// Whether this instance is the one that should take an expired Lease.
fn candidacy(o: &Observed) -> Result<(), String> {
    let me = o
        .peers
        .iter()
        .find(|p| p.name == o.me)
        .ok_or("no state of my own")?;
    if !me.healthy {
        return Err("not healthy".into());
    }
    let my_lsn = me.lsn.ok_or("my WAL position is unknown")?;
    // Promoting another database would replace the cluster's data with it.
    if let (Some(theirs), Some(mine)) = (&o.published, &o.system_identifier) {
        if &theirs.system_identifier != mine {
            return Err(format!(
                "this data is database system {mine}, the cluster's primary ran system {}: never promoting another database",
                theirs.system_identifier
            ));
        }
    }
    // Lag counts what this standby still has to replay to reach the most advanced position
    // known: a standby far behind in replay would take long to promote (or, with its
    // receiver cut, misses data).
    let my_replayed = me.replayed.unwrap_or(my_lsn);
    let eligible: Vec<&Peer> = o
        .peers
        .iter()
        .filter(|p| p.healthy && !p.fenced && p.replica && p.lsn.is_some())
        .collect();
    match &o.sync {
        Sync::Quorum { number, set } => {
            let heard: BTreeMap<String, (u32, Lsn)> = eligible
                .iter()
                .filter_map(|p| Some((p.name.clone(), p.position()?)))
                .collect();
            quorum::may_promote(&o.me, set, *number, &heard).map_err(|r| match r {
                Refusal::NotInSet => "not in the synchronous set".to_string(),
                Refusal::TooFewHeard { heard, needed } => format!(
                    "heard from {heard} of the synchronous set, need {needed} to be sure no acknowledged commit is missing"
                ),
                Refusal::NotMostAdvanced { ahead } => format!("{ahead} is further ahead"),
                Refusal::BadQuorum { number, set } => {
                    format!("published quorum ANY {number} of {set} is inconsistent")
                }
            })
        }
        Sync::Off => {
            // Without a quorum nothing proves who has the newest WAL but asking everyone: an
            // instance that answers with data and no position yet (the whole cluster
            // restarting, each Postgres starting in its own time) may be the most advanced.
            // It gets `STARTING_PATIENCE` to report one, so that a less advanced standby does
            // not fork a new timeline off the newest WAL; one that never starts does not
            // block a failover for longer.
            if o.lease_free_for < STARTING_PATIENCE {
                if let Some(p) = o.peers.iter().find(|p| p.name != o.me && p.starting) {
                    return Err(format!(
                        "{} has data and no WAL position yet; waiting for it to start",
                        p.name
                    ));
                }
            }
            let (newest_timeline, newest) = eligible
                .iter()
                .filter_map(|p| p.position())
                .max()
                .ok_or("no eligible standby")?;
            // Too far behind in replay to promote (losing or delaying too much): out of
            // the running, so that a qualified standby does not wait on it. A standby on an
            // older timeline than the newest is behind by a whole history.
            let within = |p: &Peer| {
                o.max_lag_bytes.is_none_or(|max| {
                    p.timeline.unwrap_or(0) == newest_timeline
                        && newest.bytes_after(p.replayed.or(p.lsn).unwrap_or(Lsn(0))) <= max
                })
            };
            if let Some(max) = o.max_lag_bytes.filter(|_| !within(me)) {
                let mine = me.timeline.unwrap_or(0);
                if mine != newest_timeline {
                    return Err(format!(
                        "on timeline {mine}, behind the most advanced standby's {newest_timeline}"
                    ));
                }
                let lag = newest.bytes_after(my_replayed);
                return Err(format!(
                    "{lag} bytes behind the most advanced standby (max {max})"
                ));
            }
            // A standby on a newer timeline has history the others lack, whatever the LSNs.
            let best = quorum::most_advanced(
                eligible
                    .iter()
                    .filter(|p| within(p))
                    .map(|p| (p.name.as_str(), p.position())),
            )
            .ok_or("no eligible standby")?;
            if best != o.me {
                return Err(format!("{best} is further ahead"));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
