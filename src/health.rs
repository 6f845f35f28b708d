//! The instance's health: one explicit state, derived by a pure function from what the
//! postmaster actor and the monitoring loop report. Probes, `/pg/status` and the
//! `pgwarden_health_state` metric all read it from here.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::supervisor::postmaster::State as Postmaster;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Preparing the data directory (initdb) before the first start.
    Initializing,
    /// Postgres is starting from a clean shutdown.
    Starting,
    /// Postgres is replaying WAL after an unclean stop; can take long, and is intentional.
    CrashRecovery,
    /// Accepting connections and answering the monitor.
    Ready,
    /// Running but not answering the monitor in time (hung or overloaded).
    Unresponsive,
    /// Died unexpectedly; pgwarden restarts it.
    Restarting,
    Stopping,
    /// Stopped on purpose.
    Stopped,
    /// Died too often; pgwarden gives up and exits.
    Failed,
    /// pgwarden's own monitoring loop missed its deadline.
    Wedged,
    /// Held stopped by fencing (manual, or a primary that lost its Lease): alive, not ready.
    Fenced,
}

impl Health {
    pub const ALL: [Health; 11] = [
        Health::Initializing,
        Health::Starting,
        Health::CrashRecovery,
        Health::Ready,
        Health::Unresponsive,
        Health::Restarting,
        Health::Stopping,
        Health::Stopped,
        Health::Failed,
        Health::Wedged,
        Health::Fenced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Initializing => "initializing",
            Health::Starting => "starting",
            Health::CrashRecovery => "crash_recovery",
            Health::Ready => "ready",
            Health::Unresponsive => "unresponsive",
            Health::Restarting => "restarting",
            Health::Stopping => "stopping",
            Health::Stopped => "stopped",
            Health::Failed => "failed",
            Health::Wedged => "wedged",
            Health::Fenced => "fenced",
        }
    }

    /// Liveness: false only when pgwarden is wedged or Postgres is dead and not coming back.
    pub fn live(self) -> bool {
        !matches!(self, Health::Failed | Health::Wedged)
    }

    /// Startup: passes once the first start finished, and while a long intentional operation
    /// (initdb, crash recovery) runs, so that it does not get the container killed.
    pub fn started(self, ever_ready: bool) -> bool {
        match self {
            // Fenced on purpose: restarting the container would not unfence it.
            Health::Initializing | Health::CrashRecovery | Health::Fenced => true,
            Health::Failed | Health::Wedged => false,
            _ => ever_ready,
        }
    }
}

/// The thresholds of [`assess`], bound once at start.
#[derive(Debug, Clone, Copy)]
pub struct Assessor {
    /// The monitoring loop is wedged when its heartbeat is older than this.
    pub heartbeat_deadline: Duration,
    /// Postgres is unresponsive when it has not answered for this long.
    pub freshness: Duration,
}

impl Assessor {
    pub fn assess(
        &self,
        status: &crate::supervisor::postmaster::Status,
        observation: &crate::monitor::Observation,
    ) -> Health {
        assess(&Inputs {
            postmaster: &status.state,
            fenced: status.fenced,
            monitor_heartbeat: observation.heartbeat,
            monitor_refreshed: observation.refreshed,
            now: Instant::now(),
            heartbeat_deadline: self.heartbeat_deadline,
            freshness: self.freshness,
        })
    }
}

/// What the health is derived from.
pub struct Inputs<'a> {
    pub postmaster: &'a Postmaster,
    /// Held stopped by fencing.
    pub fenced: bool,
    /// When the monitoring loop last ran (its heartbeat).
    pub monitor_heartbeat: Instant,
    /// When the monitoring loop last read Postgres successfully.
    pub monitor_refreshed: Option<Instant>,
    pub now: Instant,
    /// The monitoring loop is wedged when its heartbeat is older than this.
    pub heartbeat_deadline: Duration,
    /// Postgres is unresponsive when its last successful read is older than this.
    pub freshness: Duration,
}

pub fn assess(i: &Inputs<'_>) -> Health {
    if i.now.saturating_duration_since(i.monitor_heartbeat) > i.heartbeat_deadline {
        return Health::Wedged;
    }
    match i.postmaster {
        Postmaster::Initializing => Health::Initializing,
        Postmaster::Starting {
            crash_recovery: true,
            ..
        } => Health::CrashRecovery,
        Postmaster::Starting { .. } => Health::Starting,
        Postmaster::Running { since, .. } => {
            let fresh = i
                .monitor_refreshed
                .is_some_and(|t| t >= *since && i.now.saturating_duration_since(t) <= i.freshness);
            // Right after a start the monitor has not read yet: not unresponsive, just new.
            let new = i.now.saturating_duration_since(*since) <= i.freshness;
            match (fresh, new) {
                (true, _) => Health::Ready,
                (false, true) => Health::Starting,
                (false, false) => Health::Unresponsive,
            }
        }
        Postmaster::Restarting { .. } => Health::Restarting,
        Postmaster::Stopping { .. } => Health::Stopping,
        Postmaster::Stopped if i.fenced => Health::Fenced,
        Postmaster::Stopped => Health::Stopped,
        Postmaster::Failed { .. } => Health::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::postmaster::StopMode;

    fn assess_at(pm: Postmaster, heartbeat_ago: u64, refreshed_ago: Option<u64>) -> Health {
        let now = Instant::now() + Duration::from_secs(1000);
        assess(&Inputs {
            postmaster: &pm,
            fenced: false,
            monitor_heartbeat: now - Duration::from_secs(heartbeat_ago),
            monitor_refreshed: refreshed_ago.map(|s| now - Duration::from_secs(s)),
            now,
            heartbeat_deadline: Duration::from_secs(20),
            freshness: Duration::from_secs(6),
        })
    }

    #[test]
    fn table() {
        let t0 = Instant::now(); // "since" far in the past relative to `now` above
        let running = || Postmaster::Running { pid: 7, since: t0 };
        let cases: Vec<(Postmaster, u64, Option<u64>, Health)> = vec![
            (Postmaster::Initializing, 0, None, Health::Initializing),
            (
                Postmaster::Starting {
                    pid: 7,
                    crash_recovery: false,
                },
                0,
                None,
                Health::Starting,
            ),
            (
                Postmaster::Starting {
                    pid: 7,
                    crash_recovery: true,
                },
                0,
                None,
                Health::CrashRecovery,
            ),
            (running(), 1, Some(1), Health::Ready),
            (running(), 1, Some(7), Health::Unresponsive),
            (running(), 1, None, Health::Unresponsive),
            (running(), 30, Some(1), Health::Wedged),
            (
                Postmaster::Restarting {
                    crashes_in_window: 1,
                },
                0,
                None,
                Health::Restarting,
            ),
            (
                Postmaster::Stopping {
                    pid: 7,
                    mode: StopMode::Smart,
                },
                0,
                Some(1),
                Health::Stopping,
            ),
            (Postmaster::Stopped, 0, None, Health::Stopped),
            (
                Postmaster::Failed { reason: "x".into() },
                0,
                None,
                Health::Failed,
            ),
        ];
        for (pm, hb, refreshed, want) in cases {
            assert_eq!(
                assess_at(pm.clone(), hb, refreshed),
                want,
                "{pm:?} hb={hb} refreshed={refreshed:?}"
            );
        }
    }

    #[test]
    fn a_fresh_start_is_not_unresponsive_before_the_first_read() {
        let now = Instant::now();
        let pm = Postmaster::Running { pid: 1, since: now };
        let h = assess(&Inputs {
            postmaster: &pm,
            fenced: false,
            monitor_heartbeat: now,
            monitor_refreshed: None,
            now,
            heartbeat_deadline: Duration::from_secs(20),
            freshness: Duration::from_secs(6),
        });
        assert_eq!(h, Health::Starting);
    }

    #[test]
    fn probe_rules() {
        assert!(Health::Restarting.live());
        assert!(!Health::Failed.live() && !Health::Wedged.live());
        assert!(Health::CrashRecovery.started(false));
        assert!(Health::Initializing.started(false));
        assert!(!Health::Starting.started(false));
        assert!(Health::Stopping.started(true));
        assert!(!Health::Failed.started(true));
        assert!(Health::Fenced.live() && Health::Fenced.started(true));
    }

    #[test]
    fn fencing_shows_once_stopped() {
        let now = Instant::now();
        let at = |pm: Postmaster| {
            assess(&Inputs {
                postmaster: &pm,
                fenced: true,
                monitor_heartbeat: now,
                monitor_refreshed: None,
                now,
                heartbeat_deadline: Duration::from_secs(20),
                freshness: Duration::from_secs(6),
            })
        };
        assert_eq!(at(Postmaster::Stopped), Health::Fenced);
        assert_eq!(
            at(Postmaster::Stopping {
                pid: 7,
                mode: StopMode::Fast
            }),
            Health::Stopping
        );
    }
}
