//! Restore: fetch a WAL file from the archive, verify it (length and SHA-256 from the
//! object's header), and hand it to Postgres. A corrupt object is reported and never handed
//! over.
//!
//! The [`Restorer`] (in the daemon) answers `wal-restore` requests from a spool directory and
//! prefetches the next `prefetch` segments in parallel, so replay from the archive is not one
//! round trip per segment. "Not found" is answered as soon as the store says so, so a standby
//! falls back to streaming without delay.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::format::{self, Header};
use super::names::{self, Kind};
use super::socket::{Call, Request, Response};
use super::store::Store;
use super::{Settings, WalMetrics, WalState};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The object exists but does not verify.
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Failed(String),
}

/// Downloads and verifies `name`; `None` when the archive does not have it.
pub async fn fetch(store: &Store, name: &str) -> Result<Option<(Header, Vec<u8>)>, RestoreError> {
    let object = store
        .get(name)
        .await
        .map_err(|e| RestoreError::Failed(e.to_string()))?;
    let Some(object) = object else {
        return Ok(None);
    };
    match tokio::task::spawn_blocking(move || format::decode(&object)).await {
        Ok(Ok(decoded)) => Ok(Some(decoded)),
        Ok(Err(e)) => Err(RestoreError::Corrupt(format!(
            "{name} in the archive is corrupt ({e}); not handed to Postgres"
        ))),
        Err(e) => Err(RestoreError::Failed(format!("verifying {name}: {e}"))),
    }
}

/// Writes `content` to `path` through a temporary file in the same directory and a rename,
/// so Postgres never sees a partial file.
pub fn write_atomic(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_name(path);
    let r = std::fs::write(&tmp, content).and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".pgwarden-{}.tmp", std::process::id()));
    PathBuf::from(s)
}

/// The WAL file a temporary name of [`write_atomic`] (`<wal>.pgwarden-<pid>.tmp`) is for.
fn tmp_of(name: &str) -> Option<&str> {
    let (wal, pid) = name.strip_suffix(".tmp")?.rsplit_once(".pgwarden-")?;
    (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && names::kind(wal).is_some())
        .then_some(wal)
}

/// Whether pgwarden may delete `name` from the spool: a WAL file or one of its own
/// temporary files, nothing else (the spool directory may be shared with other files).
fn spool_file(name: &str) -> bool {
    names::kind(name).is_some() || tmp_of(name).is_some()
}

/// Creates the spool directory, or empties an existing one of what an earlier run left
/// (not trusted): WAL files and pgwarden's temporary files only, never recursively.
pub fn prepare_spool(dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !name.to_str().is_some_and(spool_file) || entry.file_type()?.is_dir() {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Moves a spooled file to where Postgres wants it: a rename on the same filesystem, else a
/// copy (atomic at the destination) and a removal.
pub fn hand_over(src: &Path, dest: &Path) -> std::io::Result<()> {
    match std::fs::rename(src, dest) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            let content = std::fs::read(src)?;
            write_atomic(dest, &content)?;
            let _ = std::fs::remove_file(src);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

type Outcome = (String, Result<Option<u64>, RestoreError>);

pub struct Restorer {
    settings: watch::Receiver<Option<Arc<Settings>>>,
    current: Option<(Arc<Settings>, Result<Store, String>)>,
    state: watch::Sender<WalState>,
    metrics: WalMetrics,
    downloads: JoinSet<Outcome>,
    running: HashSet<String>,
    /// Downloads started by prefetch (a request that finds one running is a prefetch hit).
    ahead: HashSet<String>,
    waiters: HashMap<String, Vec<oneshot::Sender<Response>>>,
    /// Learnt from the first segment restored.
    segment_size: Option<u64>,
    restored: u64,
    failures: u64,
}

impl Restorer {
    pub fn new(
        settings: watch::Receiver<Option<Arc<Settings>>>,
        state: watch::Sender<WalState>,
        metrics: WalMetrics,
    ) -> Restorer {
        Restorer {
            settings,
            current: None,
            state,
            metrics,
            downloads: JoinSet::new(),
            running: HashSet::new(),
            ahead: HashSet::new(),
            waiters: HashMap::new(),
            segment_size: None,
            restored: 0,
            failures: 0,
        }
    }

    pub async fn run(mut self, mut calls: mpsc::Receiver<Call>) {
        self.reconfigure().await;
        loop {
            tokio::select! {
                Some((req, reply)) = calls.recv() => self.request(req, reply),
                Some(done) = self.downloads.join_next(), if !self.downloads.is_empty() => match done {
                    Ok(outcome) => self.finished(outcome),
                    Err(e) => tracing::error!(error = %e, "WAL download task failed"),
                },
                Ok(()) = self.settings.changed() => self.reconfigure().await,
            }
        }
    }

    async fn reconfigure(&mut self) {
        let new = self.settings.borrow_and_update().clone();
        self.current = match new {
            None => None,
            Some(s) => {
                let store = match self.spool(&s).await {
                    Ok(()) => s.open_store(),
                    Err(e) => {
                        tracing::error!(error = %e, "WAL restore from the archive is off");
                        Err(e)
                    }
                };
                Some((s, store))
            }
        };
    }

    /// Checks the spool directory again (the settings may not come from a validated
    /// configuration file) and prepares it on the blocking pool.
    async fn spool(&self, s: &Settings) -> Result<(), String> {
        super::check_spool_dir(&s.spool_dir, &s.data_dir)
            .map_err(|e| format!("wal.spool_dir: {e}"))?;
        let dir = s.spool_dir.clone();
        let removed = tokio::task::spawn_blocking(move || prepare_spool(&dir))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| {
                format!(
                    "cannot prepare the spool directory {}: {e}",
                    s.spool_dir.display()
                )
            })?;
        if removed > 0 {
            tracing::debug!(removed, spool = %s.spool_dir.display(), "stale spooled WAL files removed");
        }
        Ok(())
    }

    fn spooled(&self, name: &str) -> Option<PathBuf> {
        let (s, _) = self.current.as_ref()?;
        let p = s.spool_dir.join(name);
        p.is_file().then_some(p)
    }

    fn request(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let Request::Restore { name } = req else {
            let _ = reply.send(Response::Failed {
                error: "not a restore request".into(),
            });
            return;
        };
        if let Err(error) = super::serviceable(&name, &self.current) {
            let _ = reply.send(Response::Failed { error });
            return;
        }
        if let Some(path) = self.spooled(&name) {
            self.metrics.prefetch_hits.inc();
            self.metrics.restored.inc();
            self.restored += 1;
            let _ = reply.send(Response::Restored { path });
            self.after_restore(&name);
            return;
        }
        self.waiters.entry(name.clone()).or_default().push(reply);
        if !self.running.contains(&name) {
            self.start(name, false);
        }
    }

    fn start(&mut self, name: String, prefetch: bool) {
        let Some((settings, Ok(store))) = &self.current else {
            return;
        };
        if prefetch {
            self.ahead.insert(name.clone());
        }
        let (store, spool) = (store.clone(), settings.spool_dir.clone());
        self.running.insert(name.clone());
        self.downloads.spawn(async move {
            let r = match fetch(&store, &name).await {
                Ok(Some((header, content))) => {
                    let path = spool.join(&name);
                    let write = tokio::task::spawn_blocking(move || write_atomic(&path, &content))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    write
                        .map(|()| Some(header.length))
                        .map_err(|e| RestoreError::Failed(format!("cannot spool {name}: {e}")))
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            (name, r)
        });
    }

    fn finished(&mut self, (name, result): Outcome) {
        self.running.remove(&name);
        let waiters = self.waiters.remove(&name).unwrap_or_default();
        let prefetched = self.ahead.remove(&name);
        let reply = match result {
            Ok(Some(len)) => {
                if names::kind(&name) == Some(Kind::Segment) && self.segment_size.is_none() {
                    self.segment_size = Some(len);
                }
                match self.spooled(&name) {
                    Some(path) => Response::Restored { path },
                    None => Response::Failed {
                        error: format!("{name} vanished from the spool"),
                    },
                }
            }
            Ok(None) => Response::NotFound,
            Err(e) => {
                if !waiters.is_empty() {
                    let reason = match e {
                        RestoreError::Corrupt(_) => "corrupt",
                        RestoreError::Failed(_) => "error",
                    };
                    self.metrics
                        .restore_failures
                        .with_label_values(&[reason])
                        .inc();
                    self.failures += 1;
                    tracing::error!(wal = %name, error = %e, "WAL restore failed");
                    let (n, err) = (name.clone(), e.to_string());
                    let failures = self.failures;
                    self.state.send_modify(|s| {
                        s.restore_failures = failures;
                        s.last_restore_error = Some((n, err, Instant::now()));
                    });
                }
                Response::Failed {
                    error: e.to_string(),
                }
            }
        };
        if waiters.is_empty() {
            return;
        }
        if matches!(reply, Response::Restored { .. }) {
            self.metrics.restored.inc();
            self.restored += 1;
            if prefetched {
                self.metrics.prefetch_hits.inc();
            }
        }
        for w in waiters {
            let _ = w.send(reply.clone());
        }
        if matches!(reply, Response::Restored { .. }) {
            self.after_restore(&name);
        }
    }

    /// After `name` was handed out: drop older spooled segments, fetch the next ones.
    fn after_restore(&mut self, name: &str) {
        let restored = self.restored;
        self.state.send_modify(|s| s.restored = restored);
        let Some((settings, _)) = &self.current else {
            return;
        };
        let (spool, depth, parallel) = (
            settings.spool_dir.clone(),
            settings.prefetch(),
            settings.parallelism(),
        );
        if names::kind(name) != Some(Kind::Segment) {
            return;
        }
        if let Ok(entries) = std::fs::read_dir(&spool) {
            for e in entries.flatten() {
                let f = e.file_name();
                let Some(f) = f.to_str() else { continue };
                let old_segment = names::kind(f) == Some(Kind::Segment) && f < name;
                // A temporary file is left over unless its download still runs; files not
                // named by pgwarden are never touched.
                let stale_tmp = tmp_of(f).is_some_and(|wal| !self.running.contains(wal));
                if (old_segment && !self.running.contains(f)) || stale_tmp {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let Some(size) = self.segment_size else {
            return;
        };
        let mut next = name.to_string();
        for _ in 0..depth {
            let Some(n) = names::next_segment(&next, size) else {
                return;
            };
            if self.running.len() >= parallel {
                return;
            }
            if !self.running.contains(&n) && !spool.join(&n).exists() {
                self.start(n.clone(), true);
            }
            next = n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_over_moves_the_file() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("a");
        write_atomic(&src, b"wal").unwrap();
        let dest = d.path().join("RECOVERYXLOG");
        hand_over(&src, &dest).unwrap();
        assert!(!src.exists());
        assert_eq!(std::fs::read(&dest).unwrap(), b"wal");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn preparing_the_spool_removes_only_wal_and_own_temporary_files() {
        let root = tempfile::tempdir().unwrap();
        let spool = root.path().join("spool");
        assert_eq!(prepare_spool(&spool).unwrap(), 0, "created when missing");
        let ours = [
            "000000010000000000000001",
            "00000002.history",
            "000000010000000000000003.partial",
            "000000010000000000000002.00000028.backup",
            "000000010000000000000004.pgwarden-123.tmp",
        ];
        let foreign = [
            "notes.txt",
            "PG_VERSION",
            "x.tmp",
            "000000010000000000000004.pgwarden-.tmp",
            "000000010000000000000001.ready",
        ];
        for n in ours.iter().chain(&foreign) {
            std::fs::write(spool.join(n), "x").unwrap();
        }
        // A directory is never removed, whatever its name.
        std::fs::create_dir(spool.join("000000010000000000000009")).unwrap();
        std::fs::write(spool.join("000000010000000000000009/f"), "x").unwrap();
        assert_eq!(prepare_spool(&spool).unwrap(), ours.len());
        let mut left: Vec<String> = std::fs::read_dir(&spool)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut expected: Vec<String> = foreign.iter().map(|s| s.to_string()).collect();
        expected.push("000000010000000000000009".into());
        expected.sort();
        assert_eq!(left, expected);
        assert_eq!(
            tmp_of("000000010000000000000004.pgwarden-123.tmp"),
            Some("000000010000000000000004")
        );
    }
}
