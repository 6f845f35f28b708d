//! The renew deadline as a timer.
//!
//! A primary must stop taking writes once it last confirmed its leadership (a Lease renewal
//! that succeeded, or a failsafe round) longer than the renew deadline ago, because from
//! `lease duration` after that moment another instance may take the Lease and promote. The
//! elector also decides to fence when it sees the deadline passed, but it looks only between
//! its awaits: a Lease read, a peer round and a renew that each wait for a silent API server
//! can hold it up for seconds past the deadline. This task is armed with the time of each
//! confirmation and halts Postgres itself when the deadline passes, whatever the elector is
//! waiting for; the postmaster actor stops it at once (immediate mode).
//!
//! It is disarmed only where Postgres cannot take writes any more: after a hand-over or a
//! release of the Lease (both come after Postgres was stopped) and after it has fired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::supervisor::postmaster::{Handle, StopMode};

/// The last confirmation of leadership and the deadline that runs from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Armed {
    confirmed_at: Instant,
    renew_deadline: Duration,
}

impl Armed {
    fn expires(&self) -> Instant {
        self.confirmed_at + self.renew_deadline
    }
}

/// A handle on the fence timer; clones share it.
#[derive(Clone)]
pub struct FenceTimer {
    armed: Arc<watch::Sender<Option<Armed>>>,
    fired: Arc<watch::Sender<u64>>,
}

impl FenceTimer {
    /// Starts the timer task, which halts Postgres through `postmaster` when it fires.
    pub fn spawn(postmaster: Handle) -> FenceTimer {
        let timer = FenceTimer::detached();
        tokio::spawn(run(timer.clone(), postmaster));
        timer
    }

    /// A timer without a task (it never fires): for a Lease client used on its own.
    pub fn detached() -> FenceTimer {
        FenceTimer {
            armed: Arc::new(watch::channel(None).0),
            fired: Arc::new(watch::channel(0).0),
        }
    }

    /// Leadership was confirmed by something sent at `at`: writes may go on until
    /// `at + renew_deadline`. An older confirmation never shortens a newer one.
    pub fn confirmed(&self, at: Instant, renew_deadline: Duration) {
        let new = Armed {
            confirmed_at: at,
            renew_deadline,
        };
        self.armed.send_if_modified(|current| match current {
            Some(old) if old.expires() >= new.expires() => false,
            _ => {
                *current = Some(new);
                true
            }
        });
    }

    /// Postgres no longer takes writes because of this instance's leadership.
    pub fn disarm(&self) {
        self.armed
            .send_if_modified(|current| current.take().is_some());
    }

    /// When the current deadline passes, if armed.
    pub fn deadline(&self) -> Option<Instant> {
        self.armed.borrow().map(|a| a.expires())
    }

    /// How many times the timer fenced this instance (watch it to wake on a fence).
    pub fn fired(&self) -> watch::Receiver<u64> {
        self.fired.subscribe()
    }
}

async fn run(timer: FenceTimer, postmaster: Handle) {
    let mut armed = timer.armed.subscribe();
    loop {
        let current = *armed.borrow_and_update();
        let Some(a) = current else {
            if armed.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            () = tokio::time::sleep_until(a.expires().into()) => {}
            changed = armed.changed() => {
                if changed.is_err() {
                    return;
                }
                continue; // renewed (or disarmed) in time
            }
        }
        // Disarmed first, so that a confirmation arriving while Postgres stops arms anew.
        timer
            .armed
            .send_if_modified(|c| (*c == Some(a)).then(|| c.take()).is_some());
        let late = a.confirmed_at.elapsed();
        tracing::error!(
            "fence timer: lease not renewed for {:.3}s (renew deadline {}s): stopping writes",
            late.as_secs_f64(),
            a.renew_deadline.as_secs_f64()
        );
        postmaster.halt(StopMode::Immediate, true).await;
        timer.fired.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_confirmation_extends_and_an_older_one_does_not_shorten() {
        let t = FenceTimer::detached();
        let now = Instant::now();
        let d = Duration::from_secs(6);
        assert_eq!(t.deadline(), None);
        t.confirmed(now, d);
        assert_eq!(t.deadline(), Some(now + d));
        t.confirmed(now + Duration::from_secs(2), d);
        assert_eq!(t.deadline(), Some(now + Duration::from_secs(8)));
        t.confirmed(now + Duration::from_secs(1), d);
        assert_eq!(t.deadline(), Some(now + Duration::from_secs(8)));
        t.disarm();
        assert_eq!(t.deadline(), None);
    }
}
