//! Table cases for [`super::decide`].

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
        timeline: Some(1),
        starting: false,
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
        data_unusable: None,
        initialized: true,
        others_data: OthersData::Present(vec!["b".into(), "c".into()]),
        busy: None,
        system_identifier: Some("7000".into()),
        published: Some(Position {
            system_identifier: "7000".into(),
            timeline: 1,
        }),
        lease_free_for: Duration::ZERO,
        standing_down: false,
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
        ("expired, asynchronous: a peer with data and no position yet is waited for",
            Observed { lease: expired(), peers: vec![Peer { starting: true, healthy: false, replica: false, lsn: None, replayed: None, timeline: None, ..peer("b", 0) }, peer("c", 90)], ..base("c") },
            Action::Wait("b has data and no WAL position yet; waiting for it to start".into())),
        ("expired, asynchronous: ...but not beyond the patience",
            Observed { lease: expired(), lease_free_for: STARTING_PATIENCE, peers: vec![Peer { starting: true, healthy: false, replica: false, lsn: None, replayed: None, timeline: None, ..peer("b", 0) }, peer("c", 90)], ..base("c") },
            Action::Acquire),
        ("expired, quorum: the quorum rule alone decides, without waiting on a starting peer",
            Observed { lease: expired(), sync: Sync::Quorum { number: 1, set: vec!["b".into(), "c".into()] }, peers: vec![Peer { starting: true, healthy: false, replica: false, lsn: None, replayed: None, timeline: None, ..peer("b", 0) }, peer("c", 90)], ..base("c") },
            Action::Wait("heard from 1 of the synchronous set, need 2 to be sure no acknowledged commit is missing".into())),
        ("expired: a primary that gave the Lease up after crashes does not compete again at once",
            Observed { lease: expired(), standing_down: true, ..base("b") },
            Action::Wait("standing down after repeated crashes as primary".into())),
        ("expired: ...nor start to compete",
            Observed { lease: expired(), standing_down: true, local: Local::Stopped, ..base("b") },
            Action::Wait("standing down after repeated crashes as primary".into())),
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
        ("a promotion under way keeps the Lease and starts nothing else",
            Observed { busy: Some(Busy::Promoting), ..leader(Local::Replica, 1) },
            Action::Hold("promoting".into())),
        ("a promotion under way that could not renew in time fences (it may be writable already)",
            Observed { busy: Some(Busy::Promoting), ..leader(Local::Replica, 7) },
            fence("lease not renewed for 7s (renew deadline 6s)")),
        ("a primary past its deadline fences even while it promotes",
            Observed { busy: Some(Busy::Promoting), ..leader(Local::Primary, 7) },
            fence("lease not renewed for 7s (renew deadline 6s)")),
        ("initdb under way keeps the Lease",
            Observed { busy: Some(Busy::Initialising), ..leader(Local::Stopped, 1) },
            Action::Hold("initialising the cluster".into())),
        ("a holder restarted as a standby keeps the Lease while Postgres recovers",
            Observed { busy: Some(Busy::Starting { for_: Duration::from_secs(3) }), ..leader(Local::Replica, 1) },
            Action::Hold("starting Postgres".into())),
        ("a holder still recovering after a lease duration no longer holds everyone up",
            Observed { busy: Some(Busy::Starting { for_: Duration::from_secs(11) }), ..leader(Local::Replica, 1) },
            Action::Promote),
        ("a standby's start does not change what a follower does",
            Observed { busy: Some(Busy::Starting { for_: Duration::from_secs(1) }), ..base("b") },
            Action::Wait("following a".into())),
        ("expired: another database never competes",
            Observed { lease: expired(), system_identifier: Some("9999".into()), ..base("b") },
            Action::Wait("this data is database system 9999, the cluster's primary ran system 7000: never promoting another database".into())),
        ("expired: a newer timeline wins over a higher LSN on an older one",
            Observed { lease: expired(), peers: vec![peer("b", 100), Peer { timeline: Some(2), ..peer("c", 90) }], ..base("b") },
            Action::Wait("c is further ahead".into())),
        ("expired: the standby on the newer timeline takes it",
            Observed { lease: expired(), peers: vec![peer("b", 100), Peer { timeline: Some(2), ..peer("c", 90) }], ..base("c") },
            Action::Acquire),
        ("a promotion that outlived the Lease fences",
            Observed { busy: Some(Busy::Promoting), local: Local::Replica, ..base("b") },
            fence("promoting without the Lease")),
        ("a released Lease on a new cluster with every volume empty: bootstrap (an initdb stopped half-way gave it up)",
            Observed { lease: Lease::Held { holder: String::new(), unchanged_for: Duration::MAX }, local: Local::Stopped, has_data: false, initialized: false, following: None, others_data: OthersData::AllEmpty, ..base("b") },
            Action::Bootstrap),
        ("expired: with a lag limit, a standby on an older timeline is behind by a whole history",
            Observed { lease: expired(), peers: vec![peer("b", 900), Peer { timeline: Some(2), ..peer("c", 500) }], max_lag_bytes: Some(100), ..base("c") },
            Action::Acquire),
        ("expired: ... and never takes the Lease itself, whatever its LSN",
            Observed { lease: expired(), peers: vec![peer("b", 900), Peer { timeline: Some(2), ..peer("c", 500) }], max_lag_bytes: Some(100), ..base("b") },
            Action::Wait("on timeline 1, behind the most advanced standby's 2".into())),
        ("expired quorum: a newer timeline wins there too",
            Observed { lease: expired(), peers: vec![peer("b", 100), Peer { timeline: Some(2), ..peer("c", 90) }], sync: Sync::Quorum { number: 1, set: vec!["b".into(), "c".into()] }, ..base("b") },
            Action::Wait("c is further ahead".into())),
        ("an unreadable data directory is not empty: no initdb, even with every other volume empty",
            Observed { lease: Lease::Absent, local: Local::Stopped, has_data: false, data_unusable: Some("EIO".into()), initialized: false, following: None, others_data: OthersData::AllEmpty, ..base("b") },
            Action::Wait("the data directory cannot be used (EIO): no initdb, clone or start; waiting for a human".into())),
        ("an unreadable data directory is not empty: no clone from the holder",
            Observed { local: Local::Stopped, has_data: false, data_unusable: Some("EIO".into()), following: None, ..base("b") },
            Action::Wait("the data directory cannot be used (EIO): no initdb, clone or start; waiting for a human".into())),
        ("a holder with an unusable data directory neither starts nor renews (the Lease expires to a standby)",
            Observed { data_unusable: Some("EIO".into()), has_data: false, ..leader(Local::Stopped, 1) },
            Action::Wait("the data directory cannot be used (EIO): no initdb, clone or start; waiting for a human".into())),
        ("a directory being worked on by a task is judged when the task ends",
            Observed { data_unusable: Some("incomplete".into()), has_data: false, busy: Some(Busy::Initialising), ..leader(Local::Stopped, 1) },
            Action::Hold("initialising the cluster".into())),
        ("Postgres running on it: the inspection's error changes nothing",
            Observed { data_unusable: Some("EIO".into()), ..base("b") },
            Action::Wait("following a".into())),
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

#[test]
fn expiry_is_judged_by_the_longer_lease_duration() {
    let mine = Timings::default();
    let longer = mine.judging(Duration::from_secs(30));
    assert_eq!(longer.lease_duration, Duration::from_secs(30));
    assert_eq!(longer.renew_deadline, mine.renew_deadline);
    assert_eq!(mine.judging(Duration::from_secs(4)), mine);
    assert_eq!(mine.judging(Duration::ZERO), mine);
    // Seen unchanged for 11 s: expired by this instance's 10 s, not by the holder's 30 s.
    let seen = Observed {
        lease: expired(),
        timings: mine.judging(Duration::from_secs(30)),
        ..base("b")
    };
    assert_eq!(decide(&seen), Action::Wait("following a".into()));
}
