//! High availability with three real instances against the test API server: bootstrap,
//! failover after kill -9, a hung primary, a partitioned primary, switchover (annotation, CLI,
//! SIGTERM), fencing, quorum commit, the lag limit on promotion, and a chaos loop. Acknowledged
//! commits are never lost, and no two instances are ever writable at once.

#[path = "../support/mod.rs"]
mod support;

mod chaos;
mod failover;
mod lifecycle;
mod outage;
mod quorum;
mod rejoin;

use std::time::Duration;

use serde_json::{json, Value};
use support::apiserver::Fault;
use support::cluster::{
    cluster_object, connect_within, eventually, quorum, slot_name, Cluster, Rng, SplitBrainChecker,
    Writer, FENCED_INSTANCES, NS, PGC, SWITCHOVER_TO,
};
use tokio::time::{sleep, timeout};

/// Upper bound for a wait: catches hangs, asserts nothing about speed.
const LONG: Duration = Duration::from_secs(120);

fn no_change(_: &mut Value) {}

/// After a promotion Postgres re-reads a configuration in which nothing it cannot change
/// without a restart has changed: no instance logs "contains errors".
fn assert_no_configuration_errors(c: &Cluster) {
    for i in 0..c.len() {
        let out = c.output(i);
        assert!(!out.contains("contains errors"), "{}:\n{out}", c.name(i));
    }
}

/// libpq variables as images commonly set them, each of which broke a clone (or the standby's
/// stream) while pgwarden's children inherited them (issue 11).
const HOSTILE_LIBPQ_ENV: &[(&str, &str)] = &[
    ("PGPASSWORD", "wrong"),
    ("PGUSER", "nobody"),
    ("PGHOST", "/nonexistent"),
    ("PGSSLMODE", "require"),
    ("PGSERVICE", "none"),
    ("PGOPTIONS", "-cstatement_timeout=1"),
];

/// Requests a switchover to `target` until it is done: one to a standby that is not caught up
/// yet is refused (the annotation goes, with an Event), and a user asks again.
async fn ask_for_switchover(c: &Cluster, target: usize) {
    for _ in 0..5 {
        c.annotate(SWITCHOVER_TO, Some(c.name(target)));
        eventually("the switchover done or refused", LONG, async || {
            c.annotation(SWITCHOVER_TO).is_none().then_some(())
        })
        .await;
        let taken = eventually("a Lease holder", LONG, async || c.lease_holder()).await;
        if taken == c.name(target) {
            return;
        }
    }
}

/// The usual opening: a writer recording every acknowledged commit and a checker that flags
/// two writable instances, once the writer has `commits` acknowledged.
async fn writing(c: &Cluster, commits: usize) -> (Writer, SplitBrainChecker) {
    let writer = c.writer().await;
    let checker = c.checker();
    writer.wait_progress(commits, LONG).await;
    (writer, checker)
}

/// The usual ending: the writer stopped, every commit it saw acknowledged is on each instance
/// of `on`, and no two instances were ever writable at once.
async fn no_loss_on(c: &Cluster, writer: Writer, checker: SplitBrainChecker, on: &[usize]) {
    let acked = writer.stop().await;
    for &i in on {
        c.assert_no_loss(&acked, i).await;
    }
    checker.assert_clean().await;
}

/// [`no_loss_on`] when `lossless` (quorum mode); otherwise (asynchronous mode may lose what no
/// standby had received) only that no two instances were ever writable at once.
async fn ending(
    c: &Cluster,
    writer: Writer,
    checker: SplitBrainChecker,
    on: &[usize],
    lossless: bool,
) {
    if lossless {
        no_loss_on(c, writer, checker, on).await;
    } else {
        writer.stop().await;
        checker.assert_clean().await;
    }
}
