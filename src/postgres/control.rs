//! The control file, `global/pg_control`, read directly.
//!
//! pgwarden needs four of its fields: the system identifier (which database this is), the
//! state (was the last stop clean), and the latest checkpoint's location and timeline (where
//! a former primary stands). Reading them from the file, rather than running
//! `pg_controldata` and parsing its report, costs no fork and no locale-dependent text.
//!
//! The layout of the leading fields of `ControlFileData` (`src/include/catalog/pg_control.h`)
//! has been the same since PostgreSQL 11 (`pg_control_version` 1100), which dropped
//! `prevCheckPoint`: all in the server's native byte order and alignment,
//!
//! | offset | field |
//! |---|---|
//! | 0 | `system_identifier` (uint64) |
//! | 8 | `pg_control_version` (uint32) |
//! | 16 | `state` (`DBState`, an enum) |
//! | 32 | `checkPoint` (XLogRecPtr) |
//! | 40 | `checkPointCopy.redo` (XLogRecPtr) |
//! | 48 | `checkPointCopy.ThisTimeLineID` (uint32) |

use std::path::Path;

use super::lsn::Lsn;

/// `pg_control_version` of PostgreSQL 11, the first with this layout.
const FIRST_VERSION: u32 = 1100;

/// What the control file says of the cluster's last state (`DBState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbState {
    Startup,
    Shutdowned,
    ShutdownedInRecovery,
    Shutdowning,
    InCrashRecovery,
    InArchiveRecovery,
    InProduction,
    Unknown(u32),
}

impl DbState {
    fn from_raw(raw: u32) -> DbState {
        match raw {
            0 => DbState::Startup,
            1 => DbState::Shutdowned,
            2 => DbState::ShutdownedInRecovery,
            3 => DbState::Shutdowning,
            4 => DbState::InCrashRecovery,
            5 => DbState::InArchiveRecovery,
            6 => DbState::InProduction,
            other => DbState::Unknown(other),
        }
    }

    /// Shut down cleanly, as a primary or in recovery: no crash recovery will run.
    pub fn clean(self) -> bool {
        matches!(self, DbState::Shutdowned | DbState::ShutdownedInRecovery)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlFile {
    pub system_identifier: u64,
    pub state: DbState,
    /// The latest checkpoint record.
    pub checkpoint: Lsn,
    /// The timeline of the latest checkpoint.
    pub checkpoint_timeline: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is too short ({len} bytes) to be a control file")]
    Truncated { path: String, len: usize },
    #[error("{path} has pg_control_version {version}: not a layout this pgwarden reads (PostgreSQL 11 or newer)")]
    Version { path: String, version: u32 },
}

/// Reads the control file of `data_dir`. Blocking file I/O: call from a blocking thread.
pub fn read(data_dir: &Path) -> Result<ControlFile, ControlError> {
    let path = data_dir.join("global/pg_control");
    let bytes = std::fs::read(&path).map_err(|source| ControlError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(&bytes).map_err(|e| match e {
        Invalid::Truncated => ControlError::Truncated {
            path: path.display().to_string(),
            len: bytes.len(),
        },
        Invalid::Version(version) => ControlError::Version {
            path: path.display().to_string(),
            version,
        },
    })
}

/// Reads the control file of `data_dir` on a blocking thread.
pub async fn read_async(data_dir: &Path) -> Result<ControlFile, ControlError> {
    let dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || read(&dir))
        .await
        .unwrap_or_else(|e| {
            Err(ControlError::Io {
                path: "global/pg_control".into(),
                source: std::io::Error::other(e),
            })
        })
}

enum Invalid {
    Truncated,
    Version(u32),
}

fn parse(bytes: &[u8]) -> Result<ControlFile, Invalid> {
    let u32_at = |at: usize| -> Result<u32, Invalid> {
        let b = bytes.get(at..at + 4).ok_or(Invalid::Truncated)?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| -> Result<u64, Invalid> {
        let b = bytes.get(at..at + 8).ok_or(Invalid::Truncated)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_ne_bytes(a))
    };
    // Everything read below lies in the first 52 bytes.
    if bytes.len() < 52 {
        return Err(Invalid::Truncated);
    }
    let version = u32_at(8)?;
    // A version from the far future (or another byte order) is not one to guess at.
    if !(FIRST_VERSION..10_000).contains(&version) {
        return Err(Invalid::Version(version));
    }
    Ok(ControlFile {
        system_identifier: u64_at(0)?,
        state: DbState::from_raw(u32_at(16)?),
        checkpoint: Lsn(u64_at(32)?),
        checkpoint_timeline: u32_at(48)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(version: u32, state: u32) -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[0..8].copy_from_slice(&7_300_000_000_000_000_001u64.to_ne_bytes());
        b[8..12].copy_from_slice(&version.to_ne_bytes());
        b[16..20].copy_from_slice(&state.to_ne_bytes());
        b[32..40].copy_from_slice(&0x3_0000_0028u64.to_ne_bytes());
        b[48..52].copy_from_slice(&4u32.to_ne_bytes());
        b
    }

    #[test]
    fn the_fields_pgwarden_uses() {
        let Ok(c) = parse(&sample(1300, 1)) else {
            panic!("a PostgreSQL 15 control file parses");
        };
        assert_eq!(c.system_identifier, 7_300_000_000_000_000_001);
        assert_eq!(c.state, DbState::Shutdowned);
        assert!(c.state.clean());
        assert_eq!(c.checkpoint.to_string(), "3/28");
        assert_eq!(c.checkpoint_timeline, 4);
        let Ok(c) = parse(&sample(1300, 6)) else {
            panic!("in production parses");
        };
        assert!(!c.state.clean());
    }

    #[test]
    fn what_is_not_a_control_file_is_refused() {
        assert!(matches!(parse(&[0u8; 20]), Err(Invalid::Truncated)));
        assert!(matches!(
            parse(&sample(1002, 1)),
            Err(Invalid::Version(1002))
        ));
        assert!(matches!(
            parse(&sample(1300u32.swap_bytes(), 1)),
            Err(Invalid::Version(_))
        ));
    }
}
