//! What pgwarden asks of a running server, apart from monitoring: whether it is ready,
//! promote it, whether it accepts its pg_hba.conf. The postmaster actor
//! ([`crate::supervisor::postmaster`]) keeps the lifecycle; these are its SQL and files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::oneshot;

use super::conf::CheckError;
use super::connect::{connect_timeout, ping, Target};

/// `pg_promote`, bounded: the server ends recovery and accepts writes before it returns.
pub async fn promote(run_dir: &Path, port: u16, user: &str) -> Result<(), String> {
    let target = Target {
        socket_dir: run_dir,
        port,
        user,
        dbname: "postgres",
        application_name: "pgwarden",
        statement_timeout: PROMOTE_TIMEOUT + Duration::from_secs(5),
    };
    let conn = connect_timeout(&target)
        .await
        .map_err(|e| format!("cannot connect to promote: {e}"))?;
    let sql = format!("SELECT pg_promote(true, {})", PROMOTE_TIMEOUT.as_secs());
    let row = tokio::time::timeout(
        PROMOTE_TIMEOUT + Duration::from_secs(5),
        conn.query_one(&sql, &[]),
    )
    .await
    .map_err(|_| "pg_promote did not return in time".to_string())?
    .map_err(|e| format!("pg_promote failed: {e}"))?;
    if row.try_get::<_, bool>(0).unwrap_or(false) {
        tracing::info!("postgres promoted: accepting writes");
        // The new timeline reaches pg_control only with a checkpoint; pg_rewind on a former
        // primary reads it from there (writes are accepted meanwhile).
        if let Err(e) =
            tokio::time::timeout(PROMOTE_TIMEOUT, conn.batch_execute("CHECKPOINT")).await
        {
            tracing::warn!(error = %e, "checkpoint after promotion did not finish in time");
        }
        Ok(())
    } else {
        Err(format!(
            "postgres did not finish promoting within {PROMOTE_TIMEOUT:?}"
        ))
    }
}

const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// A `CHECKPOINT`, bounded by `within` (the checkpointer carries on with a request whose
/// session went away, so even a cut-short one shortens the next).
pub async fn checkpoint(target: &Target<'_>, within: Duration) -> Result<(), String> {
    let target = Target {
        statement_timeout: within + Duration::from_secs(5),
        ..*target
    };
    let conn = connect_timeout(&target)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    tokio::time::timeout(within, conn.batch_execute("CHECKPOINT"))
        .await
        .map_err(|_| format!("not done within {within:?}"))?
        .map_err(|e| e.to_string())
}

/// Whether `standby` streams from this server now, by its `application_name` (a direct
/// reading, not the monitor's, which can be an interval old).
pub async fn streams_to(target: &Target<'_>, standby: &str) -> Result<bool, String> {
    let conn = connect_timeout(target)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let sql = "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'";
    let row = tokio::time::timeout(Duration::from_secs(2), conn.query_one(sql, &[&standby]))
        .await
        .map_err(|_| "pg_stat_replication did not answer in time".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(row.try_get::<_, i64>(0).is_ok_and(|n| n > 0))
}

/// Polls until `postmaster.pid` says ready (or standby) and a real connection succeeds.
pub async fn wait_ready(
    data_dir: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    user: String,
    done: oneshot::Sender<()>,
) {
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if !matches!(
            pid_file_status(&data_dir).as_deref(),
            Some("ready" | "standby")
        ) {
            continue;
        }
        if ping(&socket_dir, port, &user).await.is_ok() {
            let _ = done.send(());
            return;
        }
    }
}

/// The status word on line 8 of `postmaster.pid` (`starting`, `ready`, `standby`, `stopping`).
pub fn pid_file_status(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().nth(7).map(|s| s.trim().to_string())
}

/// Asks a running server whether it accepts the pg_hba.conf on disk (`pg_hba_file_rules`
/// parses the file anew): the errors, one per line, joined.
pub async fn hba_errors(target: &Target<'_>) -> Result<(), CheckError> {
    let unchecked = |e: String| CheckError::Unchecked(format!("cannot check pg_hba.conf: {e}"));
    let conn = connect_timeout(target)
        .await
        .map_err(|e| unchecked(e.to_string()))?;
    let rows = tokio::time::timeout(
        Duration::from_secs(5),
        conn.query(
            "SELECT line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL ORDER BY 1",
            &[],
        ),
    )
    .await
    .map_err(|_| unchecked("timed out".into()))?
    .map_err(|e| unchecked(e.to_string()))?;
    if rows.is_empty() {
        return Ok(());
    }
    let problems: Vec<String> = rows
        .iter()
        .map(|r| {
            let line: Option<i32> = r.try_get(0).ok();
            let error: String = r.try_get(1).unwrap_or_default();
            format!("pg_hba.conf line {}: {error}", line.unwrap_or(0))
        })
        .collect();
    Err(CheckError::Rejected(problems.join("; ")))
}
