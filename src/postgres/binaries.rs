//! Finding the PostgreSQL binaries and their major version.

use std::path::{Path, PathBuf};

use crate::supervisor::reaper::Reaper;

/// Where Debian's packages install each major version.
const DEBIAN_LAYOUT: &str = "/usr/lib/postgresql";

#[derive(Debug, Clone)]
pub struct Binaries {
    pub dir: PathBuf,
    /// Full version string, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub version: String,
    pub major: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    #[error("postgres binary not found at {0} (check postgres.bin_dir)")]
    Missing(PathBuf),
    #[error("PostgreSQL is not installed (nothing under {DEBIAN_LAYOUT}, no pg_config on PATH): install it (on Debian: `apt-get install postgresql-15`) or set postgres.bin_dir")]
    NotFound,
    #[error("{0} is missing beside postgres: install PostgreSQL's server package completely (on Debian: `apt-get install postgresql-15`)")]
    Tool(PathBuf),
    #[error("cannot run {path}: {source}")]
    Run {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unexpected output of `{path} --version`: {output:?}")]
    Version { path: PathBuf, output: String },
}

impl Binaries {
    pub fn postgres(&self) -> PathBuf {
        self.dir.join("postgres")
    }
    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The tools pgwarden runs besides `postgres`: a missing one is found at start, not at
    /// the first failover.
    pub fn check_tools(&self) -> Result<(), BinariesError> {
        for name in ["initdb", "pg_basebackup", "pg_rewind"] {
            let path = self.tool(name);
            if !path.is_file() {
                return Err(BinariesError::Tool(path));
            }
        }
        Ok(())
    }

    /// Uses `configured` when set; otherwise the Debian layout (preferring `preferred_major`,
    /// the version of an existing data directory, then the newest), then `pg_config --bindir`.
    pub async fn locate(
        reaper: &Reaper,
        configured: Option<&Path>,
        preferred_major: Option<u32>,
    ) -> Result<Binaries, BinariesError> {
        let dir = match configured {
            Some(dir) => dir.to_path_buf(),
            None => match debian_bin_dir(Path::new(DEBIAN_LAYOUT), preferred_major) {
                Some(dir) => dir,
                None => pg_config_bindir(reaper)
                    .await
                    .ok_or(BinariesError::NotFound)?,
            },
        };
        let postgres = dir.join("postgres");
        if !postgres.is_file() {
            return Err(BinariesError::Missing(postgres));
        }
        let out = reaper
            .output(crate::postgres::command(&postgres).arg("--version"))
            .await
            .map_err(|source| BinariesError::Run {
                path: postgres.clone(),
                source,
            })?;
        let (version, major) =
            parse_version(&out.stdout).ok_or_else(|| BinariesError::Version {
                path: postgres.clone(),
                output: out.stdout.trim().to_string(),
            })?;
        Ok(Binaries {
            dir,
            version,
            major,
        })
    }
}

fn debian_bin_dir(root: &Path, preferred: Option<u32>) -> Option<PathBuf> {
    let mut majors: Vec<u32> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|m: &u32| root.join(m.to_string()).join("bin/postgres").is_file())
        .collect();
    majors.sort_unstable();
    let pick = preferred
        .filter(|p| majors.contains(p))
        .or(majors.last().copied())?;
    Some(root.join(pick.to_string()).join("bin"))
}

async fn pg_config_bindir(reaper: &Reaper) -> Option<PathBuf> {
    let out = reaper
        .output(crate::postgres::command("pg_config").arg("--bindir"))
        .await
        .ok()?;
    let dir = out.stdout.trim();
    (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Parses `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`.
fn parse_version(output: &str) -> Option<(String, u32)> {
    let version = output.trim().strip_prefix("postgres (PostgreSQL) ")?;
    let major = version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((version.to_string(), major))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(("15.18 (Debian 15.18-0+deb12u1)".into(), 15))
        );
        assert_eq!(
            parse_version("postgres (PostgreSQL) 17beta1"),
            Some(("17beta1".into(), 17))
        );
        assert_eq!(parse_version("bash: postgres: not found"), None);
    }

    #[test]
    fn debian_layout_prefers_the_data_directory_version() {
        let root = tempfile::tempdir().unwrap();
        for m in ["14", "15", "16"] {
            let bin = root.path().join(m).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join("postgres"), "").unwrap();
        }
        std::fs::create_dir_all(root.path().join("17")).unwrap(); // no binary: ignored
        assert_eq!(
            debian_bin_dir(root.path(), Some(15)).unwrap(),
            root.path().join("15/bin")
        );
        assert_eq!(
            debian_bin_dir(root.path(), None).unwrap(),
            root.path().join("16/bin")
        );
        assert_eq!(
            debian_bin_dir(root.path(), Some(12)).unwrap(),
            root.path().join("16/bin")
        );
    }
}
