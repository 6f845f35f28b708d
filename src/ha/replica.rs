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
use crate::postgres::conf::{SslFiles, Upstream};
use crate::postgres::connect::{connect_timeout, Target};
use crate::postgres::datadir::{self, DataDir};
use crate::supervisor::reaper::{ExitStatus, Reaper};

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

/// libpq connection string to `to` as the replication role; with TLS on (`ssl`), verified
/// TLS: the peer's certificate must chain to the cluster CA and name `to.host` (the
/// certificates carry the pod IP and advertise address as SANs).
pub fn conninfo(
    to: &Address,
    me: &str,
    run_dir: &Path,
    dbname: Option<&str>,
    ssl: Option<&SslFiles>,
) -> String {
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
    if let Some(f) = ssl {
        // The instance's own certificate as the client's: a proof of membership, and libpq
        // otherwise looks for ~/.postgresql/postgresql.crt (unreadable in a container's HOME
        // fails the connection).
        s.push_str(&format!(
            " sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            q(&f.ca.to_string_lossy()),
            q(&f.cert.to_string_lossy()),
            q(&f.key.to_string_lossy())
        ));
    }
    s
}

/// The standby settings that stream from `to` through this instance's slot.
pub fn upstream(to: &Address, me: &str, run_dir: &Path, ssl: Option<&SslFiles>) -> Upstream {
    Upstream {
        conninfo: conninfo(to, me, run_dir, None, ssl),
        slot: Some(slot_name(me)),
    }
}

/// Why a clone or a rewind did not complete. The elector decides on the difference: trouble
/// reaching the primary is retried and never counts towards giving up on a rewind (which
/// moves the data aside for a new copy); only a rewind that ran and failed does.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The data directory is not one this may work on.
    #[error("{0}")]
    Refused(String),
    /// The tool could not reach the primary: the network, authentication, or a primary not
    /// (yet) accepting connections.
    #[error("{tool} cannot reach the primary: {detail}")]
    Unreachable { tool: &'static str, detail: String },
    /// The tool ran against the primary and failed.
    #[error("{tool} failed ({status}): {detail}")]
    Failed {
        tool: &'static str,
        status: ExitStatus,
        detail: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl PrepareError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PrepareError {
        let what = what.into();
        move |source| PrepareError::Io { what, source }
    }

    /// A tool's failure, told apart by what libpq printed: it names the server it could not
    /// connect to ("connection to server at ... failed", "could not connect to server").
    fn from_tool(tool: &'static str, status: ExitStatus, said: &str) -> Self {
        let detail = said.trim().to_string();
        if connection_failed(&detail) {
            PrepareError::Unreachable { tool, detail }
        } else {
            PrepareError::Failed {
                tool,
                status,
                detail,
            }
        }
    }
}

fn connection_failed(said: &str) -> bool {
    // Cannot connect, or the connection was lost on the way (a network blip mid-rewind is
    // no reason to give the data directory up).
    [
        "connection to server",
        "could not connect to server",
        "server closed the connection unexpectedly",
        "SSL SYSCALL error",
        "could not receive data from server",
        "no connection to the server",
    ]
    .iter()
    .any(|m| said.contains(m))
}

/// What a clone or a rewind works with, owned so that either runs as a task.
pub struct Prepare {
    pub reaper: Reaper,
    pub bins: Binaries,
    /// pgwarden's Postgres settings, with TLS as it is now.
    pub pg: PostgresConfig,
    /// The primary's Postgres.
    pub from: Address,
    /// This instance's name (its slot, its certificate).
    pub me: String,
}

impl Prepare {
    /// The connection string to the primary, as this instance (`dbname`, for pg_rewind's
    /// ordinary connection).
    fn conninfo(&self, dbname: Option<&str>) -> String {
        conninfo(
            &self.from,
            &self.me,
            &self.pg.run_dir,
            dbname,
            self.pg.ssl.files.as_ref(),
        )
    }
}

/// Clones the primary at `from` into the (missing or empty) data directory.
pub async fn clone(p: &Prepare) -> Result<(), PrepareError> {
    let data = &p.pg.data_dir;
    // Checked again right before, like initdb: only a missing or empty directory is cloned
    // into. An unreadable or foreign one is reported every time instead of copying the whole
    // primary only to fail at the rename.
    match datadir::inspect(data).await {
        Ok(DataDir::Empty) => {}
        Ok(DataDir::Cluster { .. }) => {
            return Err(PrepareError::Refused(format!(
                "{} already holds a cluster; not cloning over it",
                data.display()
            )))
        }
        Err(e) => return Err(PrepareError::Refused(format!("not cloning: {e}"))),
    }
    let staging = sibling(data, "clone");
    // Our own unfinished clone from an earlier attempt: never a usable cluster.
    datadir::remove_staging(&staging)
        .await
        .map_err(PrepareError::io(format!(
            "cannot remove the unfinished clone {}",
            staging.display()
        )))?;
    let mut cmd = crate::postgres::command(p.bins.tool("pg_basebackup"));
    cmd.arg("--pgdata")
        .arg(&staging)
        .arg("--dbname")
        .arg(p.conninfo(None))
        .args(["--wal-method=stream", "--checkpoint=fast", "--no-password"]);
    tracing::info!(from = %format!("{}:{}", p.from.host, p.from.port), "cloning the primary with pg_basebackup");
    let out = p
        .reaper
        .output(&mut cmd)
        .await
        .map_err(PrepareError::io("cannot run pg_basebackup"))?;
    if !out.status.success() {
        let _ = datadir::remove_staging(&staging).await;
        return Err(PrepareError::from_tool(
            "pg_basebackup",
            out.status,
            &out.stderr,
        ));
    }
    // An empty directory may already be there (a fresh volume's mount point subdirectory).
    if data.exists() {
        std::fs::remove_dir(data).map_err(PrepareError::io(format!(
            "cannot replace {} with the clone (not empty?)",
            data.display()
        )))?;
    }
    // A standby's from the first moment it is in place: should pgwarden restart before the
    // standby starts, the copy is started as one, never taken for a former primary.
    std::fs::write(staging.join("standby.signal"), b"")
        .map_err(PrepareError::io("cannot mark the clone as a standby's"))?;
    std::fs::rename(&staging, data).map_err(PrepareError::io(format!(
        "cannot move the clone into {}",
        data.display()
    )))?;
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700)).map_err(
        PrepareError::io(format!("cannot set the mode of {}", data.display())),
    )?;
    tracing::info!(data_dir = %data.display(), "clone complete");
    Ok(())
}

/// Beside the data directory while pg_rewind runs on it (inside, pg_rewind would remove it as
/// a file the source lacks): a directory pg_rewind did not finish with may mix blocks of both
/// histories and is never started, only rewound again or recloned.
fn rewinding(data: &Path) -> PathBuf {
    sibling(data, "rewinding")
}

/// Whether a pg_rewind of `data` was interrupted or failed.
pub fn rewind_unfinished(data: &Path) -> bool {
    rewinding(data).exists()
}

/// Rewinds a stopped former primary onto the timeline of the primary at `from`. pg_rewind
/// runs crash recovery first when the directory was not shut down cleanly.
pub async fn rewind(p: &Prepare) -> Result<(), PrepareError> {
    let mut cmd = crate::postgres::command(p.bins.tool("pg_rewind"));
    cmd.arg("--target-pgdata")
        .arg(&p.pg.data_dir)
        .arg(format!("--source-server={}", p.conninfo(Some("postgres"))));
    tracing::info!(from = %format!("{}:{}", p.from.host, p.from.port), "rewinding with pg_rewind");
    let marker = rewinding(&p.pg.data_dir);
    std::fs::write(&marker, b"").map_err(PrepareError::io(format!(
        "cannot write {}",
        marker.display()
    )))?;
    let out = p
        .reaper
        .output(&mut cmd)
        .await
        .map_err(PrepareError::io("cannot run pg_rewind"))?;
    let said = format!("{} {}", out.stdout.trim(), out.stderr.trim());
    if !out.status.success() {
        return Err(PrepareError::from_tool("pg_rewind", out.status, &said));
    }
    // Rewound onto the primary's history: a standby's data now (see `clone`).
    std::fs::write(p.pg.data_dir.join("standby.signal"), b"").map_err(PrepareError::io(
        "cannot mark the rewound directory as a standby's",
    ))?;
    std::fs::remove_file(&marker).map_err(PrepareError::io(format!(
        "cannot remove {}",
        marker.display()
    )))?;
    tracing::info!(output = %said.trim(), "pg_rewind done");
    Ok(())
}

/// Why a data directory was not moved aside.
#[derive(Debug, thiserror::Error)]
pub enum AsideError {
    /// At most one copy is kept: each reclone would otherwise keep another full copy on the
    /// volume until it is full. A human decides what becomes of the one kept.
    #[error("a copy of the data directory is kept aside already at {0}; not moving a second one aside (move or remove it to allow a new clone)")]
    AlreadyKept(PathBuf),
    #[error("cannot move {from} aside to {to}: {source}")]
    Io {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

/// Moves a data directory that cannot rejoin aside (never deletes it); returns where it went.
/// Refused while an earlier copy is kept aside.
pub fn move_aside(data: &Path) -> Result<PathBuf, AsideError> {
    if let Some(kept) = kept_aside(data) {
        return Err(AsideError::AlreadyKept(kept));
    }
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let to = sibling(data, &format!("{DIVERGED}{secs}"));
    std::fs::rename(data, &to).map_err(|source| AsideError::Io {
        from: data.to_path_buf(),
        to: to.clone(),
        source,
    })?;
    // An unfinished rewind concerned the directory that went aside.
    let _ = std::fs::remove_file(rewinding(data));
    tracing::warn!(from = %data.display(), to = %to.display(), "data directory moved aside; it is kept for inspection");
    Ok(to)
}

const DIVERGED: &str = "diverged-";

/// A copy of `data` moved aside earlier, if one is there.
pub fn kept_aside(data: &Path) -> Option<PathBuf> {
    let prefix = sibling(data, DIVERGED);
    let prefix = prefix.file_name()?.to_str()?.to_string();
    let parent = data.parent()?;
    std::fs::read_dir(parent)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .map(|e| e.path())
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
    fn trouble_connecting_is_told_from_a_failed_run() {
        let status = ExitStatus::Exited(1);
        for said in [
            // PostgreSQL 15's pg_rewind and pg_basebackup print libpq's message as it is.
            "pg_rewind: error: connection to server at \"10.0.0.7\", port 5432 failed: Connection refused",
            "pg_basebackup: error: connection to server at \"pg-0\" (10.0.0.7), port 5432 failed: FATAL:  password authentication failed for user \"streaming_replica\"",
            "pg_rewind: error: could not connect to server: timeout expired",
            "pg_rewind: error: could not fetch file list: server closed the connection unexpectedly",
        ] {
            let e = PrepareError::from_tool("pg_rewind", status, said);
            assert!(matches!(e, PrepareError::Unreachable { .. }), "{said}: {e}");
        }
        let said = "pg_rewind: error: could not find previous WAL record at 0/3000028";
        let e = PrepareError::from_tool("pg_rewind", status, said);
        assert!(matches!(e, PrepareError::Failed { .. }), "{e}");
        assert!(e.to_string().contains("could not find previous WAL record"));
    }

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
            None,
        );
        assert!(c.starts_with("host='pg-0.pg' port=5432 user=streaming_replica passfile='/run/x/replication.pgpass' application_name='pg-1'"));
        assert!(!c.contains("sslmode"));
        let files = crate::tls::files(Path::new("/run/x"));
        let c = conninfo(
            &Address::parse("10.0.0.7:5432").unwrap_or_else(|| unreachable!()),
            "pg-1",
            Path::new("/run/x"),
            None,
            Some(&files),
        );
        assert!(
            c.ends_with(" sslmode=verify-full sslrootcert='/run/x/tls/ca.crt' sslcert='/run/x/tls/tls.crt' sslkey='/run/x/tls/tls.key'"),
            "{c}"
        );
    }

    #[test]
    fn at_most_one_copy_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        let kept = move_aside(&data).unwrap();
        assert!(kept.join("PG_VERSION").exists());
        assert_eq!(kept_aside(&data), Some(kept.clone()));
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        match move_aside(&data) {
            Err(AsideError::AlreadyKept(at)) => assert_eq!(at, kept),
            other => panic!("a second copy moved aside: {other:?}"),
        }
        assert!(data.join("PG_VERSION").exists(), "the data directory stays");
    }
}
