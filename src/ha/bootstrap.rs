//! The elector's side of `spec.bootstrap.recovery`: the restore that replaces initdb for the
//! first instance of a new cluster, run as a task like initdb (never inside the loop that
//! keeps the Lease), with its condition `Restore` and its Events. The restore itself is
//! [`crate::backup::bootstrap`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::backup::bootstrap::restore_cluster;
use crate::config::{PostgresConfig, WalConfig};
use crate::k8s::crd::PostgresClusterSpec;
use crate::k8s::events::Events;
use crate::k8s::Shared;
use crate::supervisor::reaper::Reaper;

/// After a failed restore, the next attempt waits this long: each attempt lists the source,
/// and a restore that got far downloaded a whole backup.
pub const RETRY: Duration = Duration::from_secs(30);

/// The condition an instance reports about its restore.
const CONDITION: &str = "Restore";

/// What the restore task needs of the elector.
pub struct Context {
    pub me: String,
    pub shared: Arc<Shared>,
    pub events: Events,
    pub wal: WalConfig,
    pub pg: PostgresConfig,
    pub reaper: Reaper,
}

/// The restore task when the spec asks for one (`None`: initdb).
pub fn job(
    spec: &PostgresClusterSpec,
    c: Context,
) -> Option<impl Future<Output = Result<(), String>> + Send + 'static> {
    let recovery = spec.bootstrap.as_ref()?.recovery.clone()?;
    Some(async move {
        let from = recovery.source.destination.clone().unwrap_or_default();
        let started = format!("{} restoring the new cluster from {from}", c.me);
        tracing::info!(%from, "bootstrap: restoring instead of initdb");
        c.shared
            .set_condition(CONDITION, false, "Restoring", &started, None);
        c.events.normal("RestoreStarted", started).await;
        let r = restore_cluster(&recovery, &c.wal, &c.pg, &c.reaper).await?;
        let message = format!(
            "{} restored backup {} of {from} to {}{}",
            c.me,
            r.backup,
            r.target,
            r.timeline
                .map(|t| format!(", promoted onto timeline {t}"))
                .unwrap_or_default()
        );
        tracing::info!(%message, "bootstrap: restored");
        c.shared
            .set_condition(CONDITION, true, "Restored", &message, None);
        c.events.normal("Restored", message).await;
        Ok(())
    })
}

/// How long to wait after the `failures`-th failed restore in a row: [`RETRY`], doubling up
/// to 32 times that (each attempt downloads the whole backup again).
pub fn retry_after(failures: u32) -> Duration {
    RETRY * 2u32.pow(failures.saturating_sub(1).min(5))
}

/// Reports a failed restore: the data directory is as it was (empty), the next attempt comes
/// after `retry`.
pub async fn failed(shared: &Shared, events: &Events, me: &str, error: &str, retry: Duration) {
    let message = format!(
        "{me}: the restore failed, the data directory was left as it was; retrying in {}s: \
         {error}",
        retry.as_secs()
    );
    tracing::error!(%message, "bootstrap: restore failed");
    shared.set_condition(CONDITION, false, "RestoreFailed", &message, None);
    events.warning("RestoreFailed", message).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restores_are_retried_ever_less_often() {
        assert_eq!(retry_after(1), RETRY);
        assert_eq!(retry_after(2), RETRY * 2);
        assert_eq!(retry_after(6), RETRY * 32);
        assert_eq!(retry_after(60), RETRY * 32);
    }
}
