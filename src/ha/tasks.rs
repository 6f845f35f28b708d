//! Long work run as tasks: initdb, a start of Postgres (crash recovery, recovery to a
//! consistent state), a promotion (`pg_promote` and the checkpoint after it), a clone and a
//! rewind can each take from seconds to minutes (a clone, hours). The elector keeps ticking while one runs (renewing the Lease,
//! fencing at the deadline, reporting) and reads its progress as an input to the decision
//! ([`decide::Busy`]); the task wakes the elector when it ends.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{oneshot, Notify};

use super::decide::{self, Busy};
use super::replica::PrepareError;

/// What a task does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// initdb of a new cluster.
    Initialise,
    /// A new cluster restored from a backup (`spec.bootstrap.recovery`) instead of initdb.
    Restore,
    /// A start of Postgres; `primary` when it is the first start of a new cluster.
    Start { primary: bool },
    /// A promotion with this synchronous set (published in the Lease before it began).
    Promote {
        sync: decide::Sync,
        why: &'static str,
    },
    /// A copy of `primary` into the empty data directory.
    Clone { primary: String },
    /// pg_rewind onto `primary`; `reclone` when the spec allows a new copy after repeated
    /// failures.
    Rewind { primary: String, reclone: bool },
}

/// How a task failed, where the elector decides on the difference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// The primary could not be reached (a clone's or a rewind's): retried, and never a
    /// reason to give up on this data directory.
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Failed(String),
}

impl From<String> for TaskError {
    fn from(e: String) -> Self {
        TaskError::Failed(e)
    }
}

impl From<crate::supervisor::postmaster::PostmasterError> for TaskError {
    fn from(e: crate::supervisor::postmaster::PostmasterError) -> Self {
        TaskError::Failed(e.to_string())
    }
}

impl From<PrepareError> for TaskError {
    fn from(e: PrepareError) -> Self {
        match e {
            PrepareError::Unreachable { .. } => TaskError::Unreachable(e.to_string()),
            e => TaskError::Failed(e.to_string()),
        }
    }
}

/// One task under way.
pub struct Task {
    work: Work,
    started: Instant,
    done: oneshot::Receiver<Result<(), TaskError>>,
}

impl Task {
    /// Runs `job` on its own task; `wake` is notified when it ends.
    pub fn spawn<E: Into<TaskError> + 'static>(
        work: Work,
        wake: Arc<Notify>,
        job: impl Future<Output = Result<(), E>> + Send + 'static,
    ) -> Task {
        let (tx, done) = oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(job.await.map_err(Into::into));
            wake.notify_one();
        });
        Task {
            work,
            started: Instant::now(),
            done,
        }
    }

    pub fn work(&self) -> &Work {
        &self.work
    }

    /// What the decision sees of it.
    pub fn busy(&self) -> Busy {
        match self.work {
            Work::Initialise | Work::Restore => Busy::Initialising,
            Work::Start { .. } => Busy::Starting {
                for_: self.started.elapsed(),
            },
            Work::Promote { .. } => Busy::Promoting,
            Work::Clone { .. } | Work::Rewind { .. } => Busy::Preparing,
        }
    }

    /// Its outcome once it has ended, `None` while it runs.
    pub fn finished(&mut self) -> Option<Result<(), TaskError>> {
        match self.done.try_recv() {
            Ok(outcome) => Some(outcome),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(TaskError::Failed(format!(
                "the {:?} task ended without an outcome",
                self.work
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_task_reports_its_progress_and_outcome_and_wakes_the_elector() {
        let wake = Arc::new(Notify::new());
        let (go, gate) = oneshot::channel::<()>();
        let mut task = Task::spawn(Work::Start { primary: false }, wake.clone(), async move {
            let _ = gate.await;
            Err("postgres exited".to_string())
        });
        assert!(task.finished().is_none());
        assert!(matches!(task.busy(), Busy::Starting { .. }));
        let _ = go.send(());
        tokio::time::timeout(Duration::from_secs(5), wake.notified())
            .await
            .expect("woken when the task ends");
        assert_eq!(
            task.finished(),
            Some(Err(TaskError::Failed("postgres exited".to_string())))
        );
    }
}
