//! The leader Lease against the test API server: exactly one winner, renewals seen by
//! followers, expiry judged by observation, a partitioned leader noticing its deadline.

mod support;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use pgwarden::ha::decide::{self, Timings};
use pgwarden::ha::lease::LeaseClient;
use support::apiserver::{ApiServer, Fault};

fn timings() -> Timings {
    Timings {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_millis(1500),
        retry: Duration::from_millis(500),
    }
}

async fn client(server: &ApiServer, dir: &std::path::Path, me: &str) -> LeaseClient {
    let path = server.kubeconfig(dir, me);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let api: Api<Lease> = Api::namespaced(Client::try_from(config).unwrap(), "default");
    LeaseClient::new(api, "pg", me, timings(), Duration::from_millis(800))
}

fn holder(view: &decide::Lease) -> Option<&str> {
    match view {
        decide::Lease::Held { holder, .. } => Some(holder),
        _ => None,
    }
}

#[tokio::test]
async fn exactly_one_candidate_wins_and_followers_see_renewals() {
    let server = ApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut a = client(&server, dir.path(), "a").await;
    let mut b = client(&server, dir.path(), "b").await;
    let mut c = client(&server, dir.path(), "c").await;

    // All three observe the absent Lease, then race to create it.
    for l in [&mut a, &mut b, &mut c] {
        assert_eq!(l.observe().await.0, decide::Lease::Absent);
    }
    let (ra, rb, rc) = tokio::join!(a.acquire(), b.acquire(), c.acquire());
    let wins = [ra.unwrap(), rb.unwrap(), rc.unwrap()];
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "{wins:?}");

    // Everyone agrees on the holder.
    let mut views = Vec::new();
    for l in [&mut a, &mut b, &mut c] {
        views.push(l.observe().await.0);
    }
    let h = holder(&views[0]).unwrap().to_string();
    assert!(
        views.iter().all(|v| holder(v) == Some(h.as_str())),
        "{views:?}"
    );

    // Each renewal is a change a follower observes: the Lease never looks old to it.
    let (mut leader, mut follower) = match h.as_str() {
        "a" => (a, b),
        "b" => (b, c),
        _ => (c, a),
    };
    for _ in 0..6 {
        assert!(leader.renew().await.unwrap());
        let (view, _) = follower.observe().await;
        match view {
            decide::Lease::Held { unchanged_for, .. } => {
                assert!(unchanged_for < Duration::from_millis(300))
            }
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(leader.since_renew().unwrap() < timings().renew_deadline);

    // A stale candidate cannot take it: its observed resourceVersion is gone.
    let mut stale = client(&server, dir.path(), "d").await;
    stale.observe().await.1.unwrap();
    assert!(leader.renew().await.unwrap());
    assert!(
        !stale.acquire().await.unwrap(),
        "a replace at an old resourceVersion conflicts"
    );
}

#[tokio::test]
async fn a_partitioned_leader_passes_its_deadline_before_followers_see_expiry() {
    let server = ApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut leader = client(&server, dir.path(), "a").await;
    let mut follower = client(&server, dir.path(), "b").await;
    leader.observe().await.1.unwrap();
    assert!(leader.acquire().await.unwrap());
    follower.observe().await.1.unwrap();

    server.set_fault("a", Fault::Blackhole);
    let t = timings();
    let mut fenced_at = None;
    let mut expired_at = None;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(8) && expired_at.is_none() {
        let _ = leader.renew().await; // times out
        let since = leader.since_renew().unwrap();
        let decision = decide::decide(&decide::Observed {
            me: "a".into(),
            local: decide::Local::Primary,
            fenced: false,
            lease: decide::Lease::Held {
                holder: "a".into(),
                unchanged_for: since,
            },
            api_reachable: false,
            since_renew: Some(since),
            timings: t,
            following: None,
            peers: vec![],
            sync: decide::Sync::Off,
            max_lag_bytes: None,
            max_local_restarts: 3,
            has_data: true,
            data_unusable: None,
            initialized: true,
            others_data: decide::OthersData::AllEmpty,
            busy: None,
            system_identifier: None,
            published: None,
            lease_free_for: Duration::ZERO,
            standing_down: false,
        });
        if matches!(decision, decide::Action::Fence(_)) && fenced_at.is_none() {
            fenced_at = Some(started.elapsed());
        }
        if let (decide::Lease::Held { unchanged_for, .. }, _) = follower.observe().await {
            if unchanged_for > t.lease_duration {
                expired_at = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fenced_at = fenced_at.expect("the leader decided to fence itself");
    let expired_at = expired_at.expect("the follower saw the Lease expire");
    assert!(
        fenced_at + (t.lease_duration - t.renew_deadline) / 2 < expired_at,
        "fenced at {fenced_at:?}, follower saw expiry at {expired_at:?}"
    );
    // The follower may now take it; the partitioned leader cannot renew any more.
    assert!(follower.acquire().await.unwrap());
    server.set_fault("a", Fault::None);
    leader.observe().await.1.unwrap();
    assert!(!leader.held_by_me());
    assert!(!leader.renew().await.unwrap());
}
