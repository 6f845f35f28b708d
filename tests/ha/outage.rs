//! The API server out of reach: black holes, 503s and 429s for everyone (failsafe), and renewals that hang (the fence timer).

use super::*;
use support::cluster::{http_get_with, CLUSTER, REPLICATION_PASSWORD};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_api_outage_keeps_the_primary_writing_when_every_member_confirms() {
    full_api_outage(quorum, black_hole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_api_outage_keeps_the_primary_writing_asynchronous() {
    full_api_outage(no_change, black_hole).await;
}

/// Issue 12, item 5: an API server whose etcd is down answers 503 to every request (watches
/// stay open): as unreachable as a silent one, for the primary and for its members.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_server_answering_503_is_an_outage_too() {
    full_api_outage(quorum, etcd_down).await;
}

/// ... and so is one shedding every request with 429 (API Priority and Fairness), here in
/// asynchronous mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_server_answering_429_is_an_outage_too() {
    full_api_outage(no_change, shedding).await;
}

fn black_hole(c: &Cluster, on: bool) {
    c.server.outage(on);
}

fn etcd_down(c: &Cluster, on: bool) {
    answering(c, on, 503);
}

fn shedding(c: &Cluster, on: bool) {
    answering(c, on, 429);
}

/// Every request of every instance answered with `code` (`on`), or answered again.
fn answering(c: &Cluster, on: bool, code: u16) {
    for i in 0..c.len() {
        if on {
            c.server.set_fault(c.name(i), Fault::ServerError(code));
        } else {
            c.server.clear_faults(c.name(i));
        }
    }
}

/// At the default timings, the API server cut off for everyone by `cut`.
async fn full_api_outage(spec: fn(&mut Value), cut: fn(&Cluster, bool)) {
    let c = Cluster::start_ready_at_defaults(3, spec).await;
    let (writer, checker) = writing(&c, 50).await;
    let p = c.wait_primary(LONG).await;

    // Nobody reaches the API server, so nobody can take the Lease: every standby says so to
    // the primary (each probes the API server when asked), which keeps taking writes well
    // past the lease duration (failsafe).
    cut(&c, true);
    sleep(Duration::from_secs(15)).await;
    let before = writer.acked_count();
    writer.wait_progress(50, LONG).await;
    assert!(writer.acked_count() > before);
    assert_eq!(c.writable(p).await, Some(true), "{}", c.describe().await);
    let s = c.status(p).await;
    assert_eq!(s["ha"]["role"], "primary", "{s}");
    assert_eq!(s["kubernetes"]["api"]["reachable"], false, "{s}");
    // Only members may ask for the promise: without the cluster's token a standby refuses
    // (401; and so cannot be made to block failover by anyone who reaches its status port),
    // while its read-only status stays open.
    let standby = c.others(p)[0];
    let forged = format!("/pg/status?failsafe={}", c.name(p));
    assert_eq!(c.http_code(standby, &forged).await, Some(401));
    assert_eq!(c.http_code(standby, "/pg/status").await, Some(200));
    // A member's valid token for an instance that does not hold the Lease gets no promise.
    let other = c.name(c.others(p)[1]);
    let token = pgwarden::ha::failsafe::token(
        REPLICATION_PASSWORD,
        CLUSTER,
        other,
        std::time::SystemTime::now(),
    );
    let (code, body) = http_get_with(
        c.status_port(standby),
        &format!("/pg/status?failsafe={other}"),
        &[(pgwarden::ha::failsafe::HEADER, &token)],
        Duration::from_secs(10),
    )
    .await
    .expect("an answer");
    assert_eq!(code, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        doc["kubernetes"]["failsafe_promised_to"].is_null(),
        "promised to {other}, which does not hold the Lease: {doc}"
    );

    // The API server is back: the same primary renews; nobody failed over.
    cut(&c, false);
    writer.wait_progress(50, LONG).await;
    assert_eq!(c.wait_all_streaming(LONG).await, p);
    assert_eq!(c.lease_holder().as_deref(), Some(c.name(p)));
    no_loss_on(&c, writer, checker, &[p]).await;
}

/// Issue 12, item 5: a member whose API access comes back during the failsafe finds no gap.
/// It stops promising, so the primary can no longer confirm a round and stops writes by its
/// deadline; the member takes the Lease only after its last promise has run out. Never two
/// writable instances, no acknowledged commit lost (quorum).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_back_from_an_api_outage_finds_no_gap() {
    let c = Cluster::start_ready_at_defaults(3, quorum).await;
    let (writer, checker) = writing(&c, 20).await;
    let p = c.wait_primary(LONG).await;
    // The member that comes back must be one the quorum rule lets promote: with both standbys
    // in the synchronous set, either is (a standby slow to stream is left out of it for a while).
    let others: Vec<String> = c.others(p).iter().map(|&i| c.name(i).to_string()).collect();
    eventually("both standbys in the synchronous set", LONG, async || {
        let s = c.status(p).await;
        let names = s["ha"]["synchronous_standby_names"].as_str()?.to_string();
        others
            .iter()
            .all(|o| names.contains(o.as_str()))
            .then_some(())
    })
    .await;
    for i in 0..c.len() {
        c.server.set_fault(c.name(i), Fault::Blackhole);
    }
    // Failsafe holds: writes go on past a lease duration.
    sleep(Duration::from_secs(12)).await;
    let before = writer.acked_count();
    writer.wait_progress(20, LONG).await;
    assert!(writer.acked_count() > before);
    assert_eq!(c.primary().await, Some(p), "{}", c.describe().await);

    let back = c.others(p)[0];
    c.server.clear_faults(c.name(back));
    let new = c.wait_new_primary(p, LONG).await;
    assert_eq!(
        new, back,
        "only the member back on the API server can take the Lease"
    );
    for i in 0..c.len() {
        c.server.clear_faults(c.name(i));
    }
    assert_eq!(c.wait_all_streaming(Duration::from_secs(180)).await, new);
    writer.wait_progress(20, LONG).await;
    no_loss_on(&c, writer, checker, &[new]).await;
}

/// How late the fence timer stopped writes, from the instance's log: the seconds since its
/// last confirmed renewal, as pgwarden measured them.
fn fence_timer_lateness(output: &str) -> Option<f64> {
    let rest = output.split("fence timer: lease not renewed for ").nth(1)?;
    rest.split('s').next()?.parse().ok()
}

/// The primary's Lease renewals hang (its reads are answered): it stops writes by its renew
/// deadline, from a timer, although its elector waits on the renewal for `api_timeout`; a
/// standby takes over, never while the old primary still takes writes.
async fn hung_renewals_fence_on_time(spec: fn(&mut Value), lossless: bool) {
    let c = Cluster::start_ready_at_defaults(3, spec).await;
    let (writer, checker) = writing(&c, 20).await;
    let old = c.wait_primary(LONG).await;
    let name = c.name(old).to_string();
    c.server
        .set_fault_on(&name, Some("update"), Some("leases"), Fault::Blackhole);
    let new = c.wait_new_primary(old, LONG).await;
    writer.wait_progress(20, LONG).await;

    let out = c.output(old);
    let late = fence_timer_lateness(&out).unwrap_or_else(|| panic!("no fence timer:\n{out}"));
    // The renew deadline is 6 s; the renewal in flight would have held the elector to 7 s.
    assert!(late < 6.5, "fenced {late}s after the last renewal");

    c.server.clear_faults(&name);
    assert_eq!(c.wait_streaming(old, LONG).await, new);
    let acked = writer.stop().await;
    if lossless {
        c.assert_no_loss(&acked, new).await;
    }
    checker.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_lease_renewals_fence_on_time_asynchronous() {
    hung_renewals_fence_on_time(no_change, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_lease_renewals_fence_on_time_quorum() {
    hung_renewals_fence_on_time(quorum, true).await;
}
