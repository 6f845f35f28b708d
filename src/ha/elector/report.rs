//! What the elector tells the rest of pgwarden after each decision: the `ha` part of
//! `/pg/status` (and through it the reporter and the metrics), and one log record per new action.

use super::{Elector, Memory, Tick};
use crate::ha::decide::{self, Action, Local};
use crate::ha::quorum;
use crate::ha::tasks::Work;
use crate::ha::HaStatus;

impl Elector {
    /// Publishes this instance's HA status (`/pg/status`, the reporter) and logs a new action.
    pub(super) fn report(&self, tick: &Tick, action: &Action, memory: &mut Memory) {
        let leader = match &tick.observed.lease {
            decide::Lease::Held { holder, .. } if !holder.is_empty() => Some(holder.clone()),
            _ => None,
        };
        let local = self.local(&self.status.borrow(), &self.observation.borrow());
        let promoting = memory
            .task
            .as_ref()
            .is_some_and(|t| matches!(t.work(), Work::Promote { .. }));
        let role = match (tick.observed.fenced, local) {
            (true, _) => "fenced",
            // Until the promotion's checkpoint is done pg_rewind against it would read the old
            // timeline from its control file: a former primary waits for "primary".
            _ if promoting => "promoting",
            (_, Local::Primary) if leader.as_deref() == Some(self.me.as_str()) => "primary",
            (_, Local::Primary) => "unknown",
            (_, Local::Replica) => "replica",
            (_, Local::Stopped) if self.status.borrow().fenced => "fenced",
            _ => "stopped",
        };
        let doc = HaStatus {
            role: role.into(),
            leader,
            fenced: tick.observed.fenced,
            following: memory.following.clone(),
            action: describe(action),
            synchronous_standby_names: quorum::standby_names(memory.applied.bound()),
            degraded: memory.degraded,
            has_data: tick
                .observed
                .data_unusable
                .is_none()
                .then_some(tick.observed.has_data),
            standing_down: tick.observed.standing_down,
        };
        let changed = self.shared.ha.send_if_modified(|cur| {
            let changed = cur.as_ref() != Some(&doc);
            *cur = Some(doc.clone());
            changed
        });
        if changed {
            self.shared.report_now.notify_one();
        }
        if memory.last_action.as_ref() != Some(action) {
            match action {
                Action::Wait(reason) => tracing::info!(%reason, "HA: waiting"),
                other => tracing::info!(action = %describe(other), "HA: acting"),
            }
            memory.last_action = Some(action.clone());
        }
    }
}

fn describe(action: &Action) -> String {
    match action {
        Action::Wait(reason) => format!("wait: {reason}"),
        Action::Renew => "lead".into(),
        Action::Hold(what) => format!("keep the Lease while {what}"),
        Action::Fence(reason) => format!("fence: {reason}"),
        Action::FenceAndRelease => "fenced".into(),
        Action::Acquire => "take the expired Lease".into(),
        Action::Promote => "promote".into(),
        Action::Demote { primary } => format!("demote and follow {primary}"),
        Action::Follow { primary } => format!("follow {primary}"),
        Action::RestartLocally => "restart Postgres locally".into(),
        Action::Release => "give the Lease up".into(),
        Action::StartPrimary => "start as primary".into(),
        Action::Bootstrap => "initialise the cluster".into(),
        Action::StartStandby => "start as a standby to compete".into(),
    }
}
