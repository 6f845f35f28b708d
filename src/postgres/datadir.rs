//! What the data directory holds, and bootstrapping an empty one.
//!
//! The rule: initialise only an empty (or missing) directory; use a cluster of our major
//! version; refuse anything else. pgwarden never overwrites, moves or deletes data here.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::PostgresConfig;
use crate::postgres::binaries::Binaries;
use crate::supervisor::reaper::Reaper;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDir {
    /// Missing or empty: ready for initdb.
    Empty,
    /// A cluster of this major version.
    Cluster { major: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data directory {path} holds files that are not a PostgreSQL cluster ({entries}); refusing to initialise over them: {hint}")]
    Foreign {
        path: PathBuf,
        entries: String,
        hint: &'static str,
    },
    #[error("data directory {path} has PG_VERSION but no global/pg_control: an incomplete or damaged cluster; refusing to touch it")]
    Incomplete { path: PathBuf },
    #[error("data directory {path} has an unreadable PG_VERSION ({content:?})")]
    BadVersion { path: PathBuf, content: String },
    #[error("data directory {path} holds a PostgreSQL {found} cluster but the binaries are PostgreSQL {expected}; upgrade it with pg_upgrade or point postgres.bin_dir at version {found}")]
    VersionMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path} exists and is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("data directory {path} is a symbolic link to nothing (an unmounted volume?); refusing to initialise or clone in its place")]
    DanglingLink { path: PathBuf },
    /// Reading failed (EACCES, EIO, ...): what is there is unknown, so it is never taken
    /// for empty, which would lead to initdb or a clone.
    #[error("cannot read data directory {path}: {source}; not treating it as empty (no initdb, no clone)")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot prepare data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initdb failed ({status}): {stderr}")]
    Initdb { status: String, stderr: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unreadable(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Unreadable {
        path: path.to_path_buf(),
        source,
    }
}

/// [`classify`] on the blocking pool: a slow or hung volume must not stall the
/// single-threaded runtime (and with it the probes).
pub async fn inspect(path: &Path) -> Result<DataDir, DataDirError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || classify(&owned))
        .await
        .map_err(|e| unreadable(path)(std::io::Error::other(e)))?
}

/// Classifies the data directory without changing it. Only a missing or truly empty
/// directory is [`DataDir::Empty`]; any error reading it is [`DataDirError::Unreadable`].
pub fn classify(path: &Path) -> Result<DataDir, DataDirError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A link whose target is missing is not a missing directory: initdb would put a
            // new cluster where the operator pointed at other storage.
            return match std::fs::symlink_metadata(path) {
                Ok(_) => Err(DataDirError::DanglingLink {
                    path: path.to_path_buf(),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DataDir::Empty),
                Err(e) => Err(unreadable(path)(e)),
            };
        }
        Err(e) => return Err(unreadable(path)(e)),
    };
    if !meta.is_dir() {
        return Err(DataDirError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    let version_file = path.join("PG_VERSION");
    match std::fs::read_to_string(&version_file) {
        Ok(content) => {
            let major = content
                .trim()
                .parse::<u32>()
                .map_err(|_| DataDirError::BadVersion {
                    path: path.to_path_buf(),
                    content: content.chars().take(40).collect(),
                })?;
            if !path.join("global/pg_control").is_file() {
                return Err(DataDirError::Incomplete {
                    path: path.to_path_buf(),
                });
            }
            Ok(DataDir::Cluster { major })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Every entry must be read: skipping one that fails could make a full directory
            // look empty.
            let mut names = std::fs::read_dir(path)
                .and_then(|entries| {
                    entries
                        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect::<std::io::Result<Vec<String>>>()
                })
                .map_err(unreadable(path))?;
            if names.is_empty() {
                return Ok(DataDir::Empty);
            }
            names.sort();
            let hint = if names == ["lost+found"] {
                "this looks like the root of a volume; point postgres.data_dir at a subdirectory of it"
            } else {
                "move them away or point postgres.data_dir at an empty directory"
            };
            let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
            let more = names.len().saturating_sub(5);
            Err(DataDirError::Foreign {
                path: path.to_path_buf(),
                entries: if more > 0 {
                    format!("{} and {more} more", shown.join(", "))
                } else {
                    shown.join(", ")
                },
                hint,
            })
        }
        Err(e) => Err(unreadable(&version_file)(e)),
    }
}

/// Checks that an existing cluster matches the binaries.
pub fn check_version(path: &Path, found: u32, bins: &Binaries) -> Result<(), DataDirError> {
    if found != bins.major {
        return Err(DataDirError::VersionMismatch {
            path: path.to_path_buf(),
            found,
            expected: bins.major,
        });
    }
    Ok(())
}

/// Postgres refuses a data directory readable by others; fix a mode such as 0777 left by a
/// volume's fsGroup handling, which is safe because it only removes access.
pub fn ensure_mode(path: &Path) -> Result<(), DataDirError> {
    let mode = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode != 0o700 && mode != 0o750 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "tightening data directory mode to 0700");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))?;
    }
    Ok(())
}

/// Runs initdb on a missing or empty directory: checksums on, scram-sha-256, the configured
/// locale. Checks emptiness again right before, so nothing is ever initialised over data.
/// initdb writes into a sibling directory that is renamed into place once complete, so a pod
/// killed during initdb leaves no half-made cluster where the data directory is.
pub async fn initdb(
    reaper: &Reaper,
    bins: &Binaries,
    pg: &PostgresConfig,
) -> Result<(), DataDirError> {
    let path = &pg.data_dir;
    if inspect(path).await? != DataDir::Empty {
        return Err(DataDirError::Initdb {
            status: "not run".into(),
            stderr: format!("{} is not empty", path.display()),
        });
    }
    let staging = staging_dir(path, "initdb");
    // Our own unfinished initdb from an earlier attempt: never a usable cluster.
    remove_staging(&staging).await.map_err(io(&staging))?;
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
        .map_err(io(&staging))?;

    let mut cmd = crate::postgres::command(bins.tool("initdb"));
    cmd.arg("--pgdata")
        .arg(&staging)
        .arg("--username")
        .arg(&pg.superuser)
        .arg("--data-checksums")
        .arg("--auth-local=peer")
        .arg("--auth-host=scram-sha-256")
        .arg(format!("--locale={}", pg.locale))
        .arg(format!("--encoding={}", pg.encoding))
        .arg("--no-instructions");
    if let Some(pw) = &pg.superuser_password_file {
        cmd.arg(format!("--pwfile={}", pw.display()));
    }
    tracing::info!(data_dir = %path.display(), "initialising a new cluster with initdb");
    let out = reaper
        .output(&mut cmd)
        .await
        .map_err(|e| DataDirError::Initdb {
            status: "could not start".into(),
            stderr: format!("{}: {e}", bins.tool("initdb").display()),
        })?;
    if !out.status.success() {
        return Err(DataDirError::Initdb {
            status: out.status.to_string(),
            stderr: out.stderr.trim().to_string(),
        });
    }
    for line in out.stdout.lines().filter(|l| !l.trim().is_empty()) {
        tracing::debug!(target: "pgwarden::initdb", "{line}");
    }
    // An empty directory may be there (a volume's mount point subdirectory): rmdir only
    // removes it while it is still empty.
    if path.exists() {
        std::fs::remove_dir(path).map_err(io(path))?;
    }
    std::fs::rename(&staging, path).map_err(io(path))?;
    Ok(())
}

/// Removes pgwarden's own staging directory (from an unfinished initdb or clone) if there is
/// one, on the blocking pool: a half-made cluster is thousands of files.
pub async fn remove_staging(staging: &Path) -> std::io::Result<()> {
    let owned = staging.to_path_buf();
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&owned) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    })
    .await
    .map_err(std::io::Error::other)?
}

/// A sibling of the data directory for work that is renamed into place when complete.
pub fn staging_dir(data: &Path, purpose: &str) -> PathBuf {
    let name = data
        .file_name()
        .map_or_else(|| "pgdata".into(), |n| n.to_string_lossy().into_owned());
    data.with_file_name(format!("{name}.pgwarden-{purpose}"))
}

/// The newest timeline this data directory's WAL was written on, from the names of the
/// segments and history files in `pg_wal` (the control file's checkpoint may predate a
/// promotion). `None` when `pg_wal` holds neither.
pub fn newest_wal_timeline(data: &Path) -> std::io::Result<Option<u32>> {
    let mut newest = None;
    for entry in std::fs::read_dir(data.join("pg_wal"))? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let tli = match name.split_once('.') {
            Some((tli, "history")) if tli.len() == 8 => tli,
            None if name.len() == 24 => &name[..8],
            _ => continue,
        };
        if let Ok(tli) = u32::from_str_radix(tli, 16) {
            newest = newest.max(Some(tli));
        }
    }
    Ok(newest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_directories() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("data");
        assert_eq!(classify(&d).unwrap(), DataDir::Empty);
        std::fs::create_dir(&d).unwrap();
        assert_eq!(classify(&d).unwrap(), DataDir::Empty);

        std::fs::write(d.join("notes.txt"), "x").unwrap();
        let err = classify(&d).unwrap_err().to_string();
        assert!(
            err.contains("notes.txt") && err.contains("refusing"),
            "{err}"
        );

        std::fs::remove_file(d.join("notes.txt")).unwrap();
        std::fs::create_dir(d.join("lost+found")).unwrap();
        assert!(classify(&d)
            .unwrap_err()
            .to_string()
            .contains("root of a volume"));
        std::fs::remove_dir(d.join("lost+found")).unwrap();

        std::fs::write(d.join("PG_VERSION"), "15\n").unwrap();
        assert!(matches!(classify(&d), Err(DataDirError::Incomplete { .. })));
        std::fs::create_dir(d.join("global")).unwrap();
        std::fs::write(d.join("global/pg_control"), "").unwrap();
        assert_eq!(classify(&d).unwrap(), DataDir::Cluster { major: 15 });

        std::fs::write(d.join("PG_VERSION"), "garbage").unwrap();
        assert!(matches!(classify(&d), Err(DataDirError::BadVersion { .. })));

        let f = root.path().join("file");
        std::fs::write(&f, "").unwrap();
        assert!(matches!(
            classify(&f),
            Err(DataDirError::NotADirectory { .. })
        ));

        let link = root.path().join("link");
        std::os::unix::fs::symlink(root.path().join("unmounted"), &link).unwrap();
        assert!(matches!(
            classify(&link),
            Err(DataDirError::DanglingLink { .. })
        ));
    }

    #[test]
    fn a_read_error_is_never_empty() {
        let root = tempfile::tempdir().unwrap();
        // ENOTDIR: a path below a file, which fails for root too.
        let file = root.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = classify(&file.join("sub")).unwrap_err();
        assert!(matches!(err, DataDirError::Unreadable { .. }), "{err:?}");
        assert!(
            err.to_string().contains("not treating it as empty"),
            "{err}"
        );

        // EACCES: root reads any directory, so this part needs an unprivileged user.
        if nix::unistd::geteuid().is_root() {
            return;
        }
        let d = root.path().join("data");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o000)).unwrap();
        let r = classify(&d);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(r, Err(DataDirError::Unreadable { .. })), "{r:?}");
    }

    #[test]
    fn newest_wal_timeline_reads_segment_and_history_names() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir_all(wal.join("archive_status")).unwrap();
        assert_eq!(newest_wal_timeline(dir.path()).unwrap(), None);
        for name in [
            "000000030000000000000004",
            "00000004.history",
            "000000020000000000000009.partial",
            "000000050000000000000001.00000028.backup",
        ] {
            std::fs::write(wal.join(name), b"").unwrap();
        }
        assert_eq!(newest_wal_timeline(dir.path()).unwrap(), Some(4));
    }
}
