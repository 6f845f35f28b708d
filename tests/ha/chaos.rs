//! A bounded loop of random kills, hangs and switchovers: no acknowledged commit lost, never two writable primaries.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_loop_loses_no_acknowledged_commit() {
    chaos(quorum, true).await;
}

/// Asynchronous mode may lose commits a standby had not received; it never has two writable
/// primaries, and every instance streams at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_loop_asynchronous_never_has_two_primaries() {
    chaos(no_change, false).await;
}

async fn chaos(spec: fn(&mut Value), lossless: bool) {
    let mut rng = Rng::from_env_or_time();
    // At the default timings and configuration, as users run it: the loop judges safety.
    let mut c = Cluster::start_ready_at_defaults(3, spec).await;
    let (writer, checker) = writing(&c, 50).await;

    const ROUNDS: usize = 10;
    let failures = [
        Failure::Kill9,
        Failure::Hang,
        Failure::Partition,
        Failure::Switchover,
        Failure::SlowApi,
        Failure::HungLeasePut,
        Failure::Sigterm,
    ];
    for round in 0..ROUNDS {
        // Each failure meets a healthy cluster: one that strikes while no standby is caught up
        // (in asynchronous mode one may have diverged and wait to be rewound) leaves nobody to
        // take over, whatever pgwarden does.
        let p = c.wait_all_streaming(Duration::from_secs(180)).await;
        // Mostly the primary: that is where failures matter.
        let target = if rng.below(10) < 6 {
            p
        } else {
            rng.pick(&c.others(p))
        };
        let failure = rng.pick(&failures);
        eprintln!(
            "chaos round {round}: {failure:?} on {} (primary {}), {} commits so far",
            c.name(target),
            c.name(p),
            writer.acked_count()
        );
        match failure {
            Failure::Kill9 => {
                c.kill9(target);
                sleep(rng.millis(0, 5000)).await;
                c.restart(target);
            }
            Failure::Hang => {
                c.stop_node(target);
                if target == p && rng.below(2) == 0 {
                    c.wait_new_primary(p, LONG).await;
                } else {
                    sleep(rng.millis(500, 8000)).await;
                }
                c.cont_node(target).await;
            }
            Failure::Partition => {
                c.partition(target, true);
                if target == p && rng.below(2) == 0 {
                    c.wait_new_primary(p, LONG).await;
                } else {
                    sleep(rng.millis(500, 8000)).await;
                }
                c.partition(target, false);
            }
            Failure::SlowApi => {
                let name = c.name(target).to_string();
                c.server
                    .set_fault(&name, Fault::Latency(rng.millis(1000, 3000)));
                sleep(rng.millis(2000, 8000)).await;
                c.server.clear_faults(&name);
            }
            Failure::HungLeasePut => {
                let name = c.name(target).to_string();
                c.server
                    .set_fault_on(&name, Some("update"), Some("leases"), Fault::Blackhole);
                if target == p && rng.below(2) == 0 {
                    c.wait_new_primary(p, LONG).await;
                } else {
                    sleep(rng.millis(500, 8000)).await;
                }
                c.server.clear_faults(&name);
            }
            Failure::Sigterm => {
                c.sigterm(target);
                c.wait_exit(target, LONG).await;
            }
            Failure::Switchover => {
                let to = rng.pick(&c.others(p));
                c.annotate(SWITCHOVER_TO, Some(c.name(to)));
                eventually("the switchover done or refused", LONG, async || {
                    c.annotation(SWITCHOVER_TO).is_none().then_some(())
                })
                .await;
            }
        }
        // The orchestrator restarts a container whose pgwarden exited.
        for i in 0..c.len() {
            if !c.is_running(i) {
                eprintln!("chaos round {round}: {} exited; restarting it", c.name(i));
                c.restart(i);
            }
        }
        let now = c.wait_primary(LONG).await;
        // Commits go on (with quorum commit, a standby confirms them) before the next failure.
        writer.wait_progress(20, LONG).await;
        eprintln!("chaos round {round}: primary {}", c.name(now));
    }

    let p = c.wait_all_streaming(Duration::from_secs(180)).await;
    writer.wait_progress(20, LONG).await;
    let acked = writer.stop().await;
    if lossless {
        for i in 0..c.len() {
            c.assert_no_loss(&acked, i).await;
        }
    }
    assert_eq!(c.wait_all_streaming(LONG).await, p);
    checker.assert_clean().await;
}

// ---------------------------------------------------------------------------------------------
// The failures, each in both synchronous modes, at the default timings (Lease 10 / 6 / 2 s,
// `api_timeout` 5 s, monitor 2 s).

#[derive(Debug, Clone, Copy)]
enum Failure {
    Kill9,
    Hang,
    Partition,
    Switchover,
    /// Every API request of the instance waits 1 to 3 s.
    SlowApi,
    /// Only its Lease renewals (PUT) hang.
    HungLeasePut,
    /// SIGTERM (a rolling restart): a primary hands over first.
    Sigterm,
}
