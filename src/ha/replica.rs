//! The data-directory side of HA: cloning a primary, rewinding a former primary, moving a
//! directory that cannot be rewound aside, and the primary's replication slots.
//!
//! These run while the postmaster actor holds Postgres stopped; nothing here starts it. A
//! clone is made in a sibling directory and renamed into place only when complete, so a
//! clone cut short never looks like a cluster. Nothing is ever deleted but an unfinished
//! clone of our own.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::PostgresConfig;
use crate::k8s::secrets::REPLICATION_ROLE;
use crate::postgres::binaries::Binaries;
use crate::postgres::conf::Upstream;
use crate::postgres::connect::{connect_timeout, Target};
use crate::postgres::datadir::{self, DataDir};
use crate::supervisor::reaper::Reaper;

/// A peer's Postgres address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub host: String,
    pub port: u16,
}

impl Address {
    /// Parses `host:port` (the status entry's `postgresAddress`).
    pub fn parse(s: &str) -> Option<Address> {
        let (host, port) = s.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse().ok()?;
        (!host.is_empty()).then(|| Address {
            host: host.to_string(),
            port,
        })
    }
}

/// Prefix of the slots pgwarden owns (it never touches other slots).
const SLOT_PREFIX: &str = "pgwarden_";

/// The slot a standby streams through: `pgwarden_` and its name, as Postgres allows it
/// (`[a-z0-9_]`).
pub fn slot_name(instance: &str) -> String {
    let name: String = instance
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    format!("{SLOT_PREFIX}{name}")
}

/// The passfile standbys, pg_basebackup and pg_rewind authenticate with (never on a command
/// line or in postgresql.conf).
pub fn passfile(run_dir: &Path) -> PathBuf {
    run_dir.join("replication.pgpass")
}

/// Writes the passfile (mode 0600, atomically).
pub fn write_passfile(run_dir: &Path, password: &str) -> std::io::Result<()> {
    let escape = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    let path = passfile(run_dir);
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!("*:*:*:{REPLICATION_ROLE}:{}\n", escape(password)),
    )?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, &path)
}

/// libpq connection string to `to` as the replication role.
pub fn conninfo(to: &Address, me: &str, run_dir: &Path, dbname: Option<&str>) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut s = format!(
        "host={} port={} user={REPLICATION_ROLE} passfile={} application_name={} connect_timeout=5 keepalives=1 keepalives_idle=5 keepalives_interval=2 keepalives_count=3",
        q(&to.host),
        to.port,
        q(&passfile(run_dir).to_string_lossy()),
        q(me),
    );
    if let Some(db) = dbname {
        s.push_str(&format!(" dbname={}", q(db)));
    }
    s
}

/// The standby settings that stream from `to` through this instance's slot.
pub fn upstream(to: &Address, me: &str, run_dir: &Path) -> Upstream {
    Upstream {
        conninfo: conninfo(to, me, run_dir, None),
        slot: Some(slot_name(me)),
    }
}

/// Clones the primary at `from` into the (missing or empty) data directory.
pub async fn clone(
    reaper: &Reaper,
    bins: &Binaries,
    pg: &PostgresConfig,
    from: &Address,
    me: &str,
) -> Result<(), String> {
    let data = &pg.data_dir;
    // Checked again right before, like initdb: only a missing or empty directory is cloned
    // into. An unreadable or foreign one is reported every time instead of copying the whole
    // primary only to fail at the rename.
    match datadir::inspect(data).await {
        Ok(DataDir::Empty) => {}
        Ok(DataDir::Cluster { .. }) => {
            return Err(format!(
                "{} already holds a cluster; not cloning over it",
                data.display()
            ))
        }
        Err(e) => return Err(format!("not cloning: {e}")),
    }
    let staging = sibling(data, "clone");
    // Our own unfinished clone from an earlier attempt: never a usable cluster.
    datadir::remove_staging(&staging).await.map_err(|e| {
        format!(
            "cannot remove the unfinished clone {}: {e}",
            staging.display()
        )
    })?;
    let mut cmd = crate::postgres::command(bins.tool("pg_basebackup"));
    cmd.arg("--pgdata")
        .arg(&staging)
        .arg("--dbname")
        .arg(conninfo(from, me, &pg.run_dir, None))
        .args(["--wal-method=stream", "--checkpoint=fast", "--no-password"]);
    tracing::info!(from = %format!("{}:{}", from.host, from.port), "cloning the primary with pg_basebackup");
    let out = reaper
        .output(&mut cmd)
        .await
        .map_err(|e| format!("cannot run pg_basebackup: {e}"))?;
    if !out.status.success() {
        let _ = datadir::remove_staging(&staging).await;
        return Err(format!(
            "pg_basebackup failed ({}): {}",
            out.status,
            out.stderr.trim()
        ));
    }
    // An empty directory may already be there (a fresh volume's mount point subdirectory).
    if data.exists() {
        std::fs::remove_dir(data).map_err(|e| {
            format!(
                "cannot replace {} with the clone (not empty?): {e}",
                data.display()
            )
        })?;
    }
    std::fs::rename(&staging, data)
        .map_err(|e| format!("cannot move the clone into {}: {e}", data.display()))?;
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot set the mode of {}: {e}", data.display()))?;
    tracing::info!(data_dir = %data.display(), "clone complete");
    Ok(())
}

/// Rewinds a stopped former primary onto the timeline of the primary at `from`. pg_rewind
/// runs crash recovery first when the directory was not shut down cleanly.
pub async fn rewind(
    reaper: &Reaper,
    bins: &Binaries,
    pg: &PostgresConfig,
    from: &Address,
    me: &str,
) -> Result<(), String> {
    let mut cmd = crate::postgres::command(bins.tool("pg_rewind"));
    cmd.arg("--target-pgdata").arg(&pg.data_dir).arg(format!(
        "--source-server={}",
        conninfo(from, me, &pg.run_dir, Some("postgres"))
    ));
    tracing::info!(from = %format!("{}:{}", from.host, from.port), "rewinding with pg_rewind");
    let out = reaper
        .output(&mut cmd)
        .await
        .map_err(|e| format!("cannot run pg_rewind: {e}"))?;
    let said = format!("{} {}", out.stdout.trim(), out.stderr.trim());
    if !out.status.success() {
        return Err(format!(
            "pg_rewind failed ({}): {}",
            out.status,
            said.trim()
        ));
    }
    tracing::info!(output = %said.trim(), "pg_rewind done");
    Ok(())
}

/// Moves a data directory that cannot rejoin aside (never deletes it); returns where it went.
pub fn move_aside(data: &Path) -> Result<PathBuf, String> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let to = sibling(data, &format!("diverged-{secs}"));
    std::fs::rename(data, &to).map_err(|e| {
        format!(
            "cannot move {} aside to {}: {e}",
            data.display(),
            to.display()
        )
    })?;
    tracing::warn!(from = %data.display(), to = %to.display(), "data directory moved aside; it is kept for inspection");
    Ok(to)
}

fn sibling(data: &Path, suffix: &str) -> PathBuf {
    crate::postgres::datadir::staging_dir(data, suffix)
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// On the primary: one physical slot per standby in `wanted`; slots of instances that left
/// (pgwarden's own slots only, never a user's) are dropped when inactive.
pub async fn sync_slots(pg: &PostgresConfig, wanted: &[String]) -> Result<(), String> {
    let target = Target::admin(pg);
    let conn = connect_timeout(&target).await.map_err(|e| e.to_string())?;
    let rows = bounded(conn.query(
        "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_type = 'physical' AND slot_name LIKE 'pgwarden\\_%'",
        &[],
    ))
    .await?;
    let existing: Vec<(String, bool)> = rows
        .iter()
        .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
        .collect();
    let wanted: Vec<String> = wanted.iter().map(|w| slot_name(w)).collect();
    for w in &wanted {
        if !existing.iter().any(|(n, _)| n == w) {
            bounded(conn.execute("SELECT pg_create_physical_replication_slot($1, true)", &[w]))
                .await?;
            tracing::info!(slot = %w, "replication slot created");
        }
    }
    for (name, active) in &existing {
        if !active && !wanted.contains(name) {
            bounded(conn.execute("SELECT pg_drop_replication_slot($1)", &[name])).await?;
            tracing::info!(slot = %name, "replication slot of a departed instance dropped");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names() {
        assert_eq!(
            Address::parse("10.0.0.7:5432"),
            Some(Address {
                host: "10.0.0.7".into(),
                port: 5432
            })
        );
        assert_eq!(
            Address::parse("[fd00::1]:5433").map(|a| a.host),
            Some("fd00::1".into())
        );
        assert_eq!(Address::parse("nohost"), None);
        assert_eq!(Address::parse(":5432"), None);
        assert_eq!(slot_name("pg-1"), "pgwarden_pg_1");
        let c = conninfo(
            &Address::parse("pg-0.pg:5432").unwrap_or_else(|| unreachable!()),
            "pg-1",
            Path::new("/run/x"),
            None,
        );
        assert!(c.starts_with("host='pg-0.pg' port=5432 user=streaming_replica passfile='/run/x/replication.pgpass' application_name='pg-1'"));
    }
}
