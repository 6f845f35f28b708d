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
    /// The cluster was initialised before (its status names a primary): never initdb again.
    pub initialized: bool,
    /// What the other instances say of their data directories.
    pub others_data: OthersData,
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
            return Action::Fence(match o.since_renew {
                Some(since) => format!(
                    "lease not renewed for {since:?} (renew deadline {:?})",
                    o.timings.renew_deadline
                ),
                None => "lease held but not renewed by this process".into(),
            });
        }
        if !leader
            && !matches!(&o.lease, Lease::Held { unchanged_for, .. } if *unchanged_for <= o.timings.lease_duration)
        {
            return Action::Fence("primary without a confirmed lease".into());
        }
    }
    if o.fenced {
        return match (leader, o.local) {
            (_, Local::Primary | Local::Replica) => Action::FenceAndRelease,
            (true, _) => Action::FenceAndRelease,
            _ => Action::Wait("fenced".into()),
        };
    }
    if leader {
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
        if o.lease == Lease::Absent && !o.initialized && o.local == Local::Stopped {
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
    if o.local == Local::Stopped {
        return Action::StartStandby;
    }
    match candidacy(o) {
        Ok(()) => Action::Acquire,
        Err(reason) => Action::Wait(reason),
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
            let heard: BTreeMap<String, Lsn> = eligible
                .iter()
                .filter_map(|p| Some((p.name.clone(), p.lsn?)))
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
            let newest = eligible
                .iter()
                .filter_map(|p| p.lsn)
                .max()
                .ok_or("no eligible standby")?;
            // Too far behind in replay to promote (losing or delaying too much): out of
            // the running, so that a qualified standby does not wait on it.
            let within = |p: &Peer| {
                o.max_lag_bytes.is_none_or(|max| {
                    newest.bytes_after(p.replayed.or(p.lsn).unwrap_or(Lsn(0))) <= max
                })
            };
            if let Some(max) = o.max_lag_bytes.filter(|_| !within(me)) {
                let lag = newest.bytes_after(my_replayed);
                return Err(format!(
                    "{lag} bytes behind the most advanced standby (max {max})"
                ));
            }
            let best = eligible
                .iter()
                .filter(|p| within(p))
                .max_by(|a, b| a.lsn.cmp(&b.lsn).then_with(|| b.name.cmp(&a.name)))
                .ok_or("no eligible standby")?;
            if best.name != o.me {
                return Err(format!("{} is further ahead", best.name));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    fn peer(name: &str, lsn: u64) -> Peer {
        Peer {
            name: name.into(),
            healthy: true,
            fenced: false,
            replica: true,
            primary: false,
            lsn: Some(Lsn(lsn)),
            replayed: Some(Lsn(lsn)),
        }
    }

    fn base(me: &str) -> Observed {
        Observed {
            me: me.into(),
            local: Local::Replica,
            fenced: false,
            lease: Lease::Held {
                holder: "a".into(),
                unchanged_for: T,
            },
            api_reachable: true,
            since_renew: None,
            timings: Timings::default(),
            following: Some("a".into()),
            peers: vec![peer("b", 100), peer("c", 90)],
            sync: Sync::Off,
            max_lag_bytes: None,
            max_local_restarts: 3,
            has_data: true,
            initialized: true,
            others_data: OthersData::Present(vec!["b".into(), "c".into()]),
        }
    }

    fn expired() -> Lease {
        Lease::Held {
            holder: "a".into(),
            unchanged_for: Duration::from_secs(11),
        }
    }

    fn leader(local: Local, since_renew: u64) -> Observed {
        Observed {
            local,
            since_renew: Some(Duration::from_secs(since_renew)),
            following: None,
            ..base("a")
        }
    }

    #[test]
    fn table() {
        type Case = (&'static str, Observed, Action);
        let fence = |s: &str| Action::Fence(s.into());
        let cases: Vec<Case> = vec![
            ("leader renews", leader(Local::Primary, 1), Action::Renew),
            ("leader past the renew deadline fences itself", leader(Local::Primary, 7),
                fence("lease not renewed for 7s (renew deadline 6s)")),
            ("leader past the deadline fences even with the API down",
                Observed { api_reachable: false, ..leader(Local::Primary, 7) },
                fence("lease not renewed for 7s (renew deadline 6s)")),
            ("leader right at the deadline still renews", leader(Local::Primary, 6), Action::Renew),
            ("new leader promotes", leader(Local::Replica, 0), Action::Promote),
            ("leader restarts a crashed postgres locally", leader(Local::Crashed { crashes: 2 }, 1), Action::RestartLocally),
            ("leader gives up after too many crashes", leader(Local::Crashed { crashes: 4 }, 1), Action::Release),
            ("leader with postgres stopped starts it as primary", leader(Local::Stopped, 1), Action::StartPrimary),
            ("primary that never renewed in this process fences",
                Observed { since_renew: None, ..leader(Local::Primary, 0) },
                fence("lease held but not renewed by this process")),
            ("primary with the lease unknown fences",
                Observed { lease: Lease::Unknown, local: Local::Primary, following: None, ..base("b") },
                fence("primary without a confirmed lease")),
            ("primary with the lease absent fences",
                Observed { lease: Lease::Absent, local: Local::Primary, following: None, ..base("b") },
                fence("primary without a confirmed lease")),
            ("primary seeing the lease expired fences",
                Observed { lease: expired(), local: Local::Primary, following: None, ..base("b") },
                fence("primary without a confirmed lease")),
            ("fenced primary stops and releases", Observed { fenced: true, ..leader(Local::Primary, 1) }, Action::FenceAndRelease),
            ("fenced standby stops", Observed { fenced: true, ..base("b") }, Action::FenceAndRelease),
            ("fenced and stopped waits", Observed { fenced: true, local: Local::Stopped, ..base("b") }, Action::Wait("fenced".into())),
            ("fenced never promotes on expiry", Observed { fenced: true, local: Local::Stopped, lease: expired(), ..base("b") }, Action::Wait("fenced".into())),
            ("standby following the holder waits", base("b"), Action::Wait("following a".into())),
            ("standby following someone else repoints", Observed { following: Some("c".into()), ..base("b") }, Action::Follow { primary: "a".into() }),
            ("stopped instance joins the holder", Observed { local: Local::Stopped, following: None, ..base("b") }, Action::Follow { primary: "a".into() }),
            ("primary that lost the lease demotes", Observed { local: Local::Primary, following: None, ..base("b") }, Action::Demote { primary: "a".into() }),
            ("lease not read yet: wait", Observed { lease: Lease::Unknown, ..base("b") }, Action::Wait("the Lease has not been read yet".into())),
            ("expired, API down: wait", Observed { lease: expired(), api_reachable: false, ..base("b") }, Action::Wait("the API server is unreachable".into())),
            ("expired: most advanced takes it", Observed { lease: expired(), ..base("b") }, Action::Acquire),
            ("expired: the other waits", Observed { lease: expired(), ..base("c") }, Action::Wait("b is further ahead".into())),
            ("expired: equal positions, name decides",
                Observed { lease: expired(), peers: vec![peer("b", 100), peer("c", 100)], ..base("c") },
                Action::Wait("b is further ahead".into())),
            ("expired: unhealthy does not compete",
                Observed { lease: expired(), peers: vec![Peer { healthy: false, ..peer("b", 100) }, peer("c", 90)], ..base("b") },
                Action::Wait("not healthy".into())),
            ("expired: an unhealthy leader-to-be is skipped",
                Observed { lease: expired(), peers: vec![Peer { healthy: false, ..peer("b", 100) }, peer("c", 90)], ..base("c") },
                Action::Acquire),
            ("expired: a fenced peer is skipped",
                Observed { lease: expired(), peers: vec![Peer { fenced: true, ..peer("b", 100) }, peer("c", 90)], ..base("c") },
                Action::Acquire),
            ("expired: lagging beyond the maximum is not eligible",
                Observed { lease: expired(), peers: vec![Peer { healthy: false, ..peer("b", 1000) }, peer("c", 10)], max_lag_bytes: Some(100), ..base("c") },
                Action::Acquire),
            ("expired: lagging behind a reachable better peer",
                Observed { lease: expired(), max_lag_bytes: Some(5), ..base("c") },
                Action::Wait("10 bytes behind the most advanced standby (max 5)".into())),
            ("expired: the most advanced is lagging in replay: the next one takes it",
                Observed { lease: expired(), peers: vec![Peer { replayed: Some(Lsn(20)), ..peer("b", 100) }, peer("c", 90)], max_lag_bytes: Some(50), ..base("c") },
                Action::Acquire),
            ("expired: most advanced received, but replay far behind",
                Observed { lease: expired(), peers: vec![Peer { replayed: Some(Lsn(20)), ..peer("b", 100) }, peer("c", 90)], max_lag_bytes: Some(50), ..base("b") },
                Action::Wait("80 bytes behind the most advanced standby (max 50)".into())),
            ("expired quorum: in S, heard enough, most advanced",
                Observed { lease: expired(), sync: Sync::Quorum { number: 1, set: vec!["b".into(), "c".into()] }, ..base("b") },
                Action::Acquire),
            ("expired quorum: not in S",
                Observed { lease: expired(), sync: Sync::Quorum { number: 1, set: vec!["c".into()] }, ..base("b") },
                Action::Wait("not in the synchronous set".into())),
            ("expired quorum: too few heard",
                Observed { lease: expired(), peers: vec![peer("b", 100)], sync: Sync::Quorum { number: 1, set: vec!["b".into(), "c".into()] }, ..base("b") },
                Action::Wait("heard from 1 of the synchronous set, need 2 to be sure no acknowledged commit is missing".into())),
            ("absent lease, new cluster, empty volume, every other instance empty: bootstrap",
                Observed { lease: Lease::Absent, local: Local::Stopped, has_data: false, initialized: false, following: None, others_data: OthersData::AllEmpty, ..base("b") },
                Action::Bootstrap),
            ("absent lease and status (re-created cluster), empty volume, data elsewhere: never initdb",
                Observed { lease: Lease::Absent, local: Local::Stopped, has_data: false, initialized: false, following: None, others_data: OthersData::Present(vec!["c".into()]), ..base("b") },
                Action::Wait("no data here, but c has data: never initialise a new cluster beside it; waiting for a primary".into())),
            ("absent lease, empty volume, not every instance heard: wait",
                Observed { lease: Lease::Absent, local: Local::Stopped, has_data: false, initialized: false, following: None, others_data: OthersData::Unheard { heard: 1, expected: 2 }, ..base("b") },
                Action::Wait("no data here: waiting to hear from every instance (1 of 2) before initialising".into())),
            ("absent lease but the cluster was initialised: never initdb again",
                Observed { lease: Lease::Absent, local: Local::Stopped, has_data: false, following: None, ..base("b") },
                Action::Wait("no data here: waiting for a primary to clone".into())),
            ("expired lease, empty volume: wait for a primary",
                Observed { lease: expired(), local: Local::Stopped, has_data: false, initialized: false, following: None, ..base("b") },
                Action::Wait("no data here: waiting for a primary to clone".into())),
            ("held lease, empty volume: follow (clone)",
                Observed { local: Local::Stopped, has_data: false, following: None, ..base("b") },
                Action::Follow { primary: "a".into() }),
            ("expired lease, stopped with data: start as a standby to compete",
                Observed { lease: expired(), local: Local::Stopped, following: None, ..base("b") },
                Action::StartStandby),
            ("released lease counts as expired",
                Observed { lease: Lease::Held { holder: String::new(), unchanged_for: Duration::MAX }, ..base("b") },
                Action::Acquire),
            ("crashed standby does not compete",
                Observed { lease: expired(), local: Local::Crashed { crashes: 1 }, peers: vec![Peer { healthy: false, ..peer("b", 100) }, peer("c", 90)], ..base("b") },
                Action::Wait("not healthy".into())),
            ("absent lease with data: the most advanced takes it",
                Observed { lease: Lease::Absent, ..base("b") },
                Action::Acquire),
        ];
        for (name, observed, want) in cases {
            assert_eq!(decide(&observed), want, "{name}");
        }
    }

    #[test]
    fn switchover_targets() {
        let peers = vec![
            peer("b", 100),
            Peer {
                fenced: true,
                ..peer("c", 100)
            },
            Peer {
                healthy: false,
                ..peer("d", 100)
            },
            Peer {
                replica: false,
                ..peer("e", 100)
            },
            peer("f", 10),
        ];
        let check = |t: &str| switchover_check(t, &peers, Some(Lsn(120)), 50);
        assert_eq!(check("b"), Ok(()));
        assert_eq!(check("c"), Err("c is fenced".into()));
        assert_eq!(check("d"), Err("d is not healthy".into()));
        assert_eq!(check("e"), Err("e is not a standby".into()));
        assert_eq!(
            check("f"),
            Err("f is 110 bytes behind (at most 50 allowed): not caught up".into())
        );
        assert_eq!(check("x"), Err("x did not answer".into()));
    }
}
