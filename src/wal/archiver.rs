//! The archiver daemon: uploads WAL files ahead of Postgres's own archiver.
//!
//! One task owns the queue. It scans `pg_wal/archive_status/*.ready` every 250 ms (on a
//! primary only: a standby's WAL is the primary's to archive), keeps up to `parallelism`
//! uploads running, and answers `wal-archive` requests: at once when the file is archived
//! already, else the file jumps the queue and the answer waits for its upload. A failed upload
//! is retried with exponential backoff; a file the archive holds with different content is
//! refused (never overwritten) and reported. After Postgres stopped, [`super::Handle::drain`]
//! uploads what is left, bounded by the drain timeout.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::format::{self, Compression};
use super::identity;
use super::names;
use super::socket::{Call, Request, Response};
use super::store::{self, Put, Store};
use super::{Settings, WalMetrics, WalState};
use crate::monitor::snapshot::Role;
use crate::monitor::Observation;

const SCAN_INTERVAL: Duration = Duration::from_millis(250);

/// A file's place in the queue.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Queued,
    Uploading,
    Archived,
    Failed {
        attempts: u32,
        retry_at: Instant,
        error: String,
        conflict: bool,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    seg: Seg,
    /// Postgres asked for it: it goes before everything else.
    urgent: bool,
}

/// Queue key: history files first, then by name (WAL order).
type Key = (u8, String);

fn key(name: &str) -> Key {
    let (p, n) = names::priority(name);
    (p, n.to_string())
}

/// The next file to upload: an urgent one (even one waiting for its retry: Postgres asks
/// again, so try again), else the first queued one, or failed one whose retry is due.
fn pick(entries: &BTreeMap<Key, Entry>, now: Instant) -> Option<Key> {
    let eligible = |e: &Entry, urgent: bool| match &e.seg {
        Seg::Queued => true,
        Seg::Failed { retry_at, .. } => urgent || *retry_at <= now,
        _ => false,
    };
    entries
        .iter()
        .find(|(_, e)| e.urgent && eligible(e, true))
        .or_else(|| entries.iter().find(|(_, e)| eligible(e, false)))
        .map(|(k, _)| k.clone())
}

/// Delay before the next attempt after `attempts` failures.
pub fn backoff(attempts: u32, initial: Duration, max: Duration) -> Duration {
    initial
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
        .min(max)
}

/// One successful upload.
#[derive(Debug, Clone, Copy)]
pub struct Uploaded {
    pub put: Put,
    pub content_len: u64,
    pub object_len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The file is no longer in pg_wal (Postgres archived and recycled it).
    #[error("{0}")]
    SourceGone(String),
    /// The archive holds different content under this name.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
}

/// Reads, encodes and uploads one file: the whole archiving of one WAL file, shared by the
/// daemon and the stand-alone `wal-archive`.
pub async fn archive_file(
    store: &Store,
    compression: Compression,
    name: &str,
    path: &Path,
    io_timeout: Duration,
) -> Result<Uploaded, ArchiveError> {
    let p = path.to_path_buf();
    let encoded = tokio::time::timeout(
        io_timeout,
        tokio::task::spawn_blocking(move || {
            std::fs::read(&p)
                .map(|content| (content.len() as u64, format::encode(&content, compression)))
        }),
    )
    .await;
    let (content_len, object) = match encoded {
        Err(_) => {
            return Err(ArchiveError::Failed(format!(
                "reading {} took longer than {io_timeout:?}",
                path.display()
            )))
        }
        Ok(Err(e)) => return Err(ArchiveError::Failed(format!("encoding {name}: {e}"))),
        Ok(Ok(Err(e))) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ArchiveError::SourceGone(format!(
                "{} does not exist",
                path.display()
            )))
        }
        Ok(Ok(Err(e))) => {
            return Err(ArchiveError::Failed(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
        Ok(Ok(Ok((content_len, Ok(object))))) => (content_len, object),
        Ok(Ok(Ok((_, Err(e))))) => {
            return Err(ArchiveError::Failed(format!("encoding {name}: {e}")))
        }
    };
    let object_len = object.len() as u64;
    let mine = format::sha256_of_object(&object);
    match store.put_new(name, Bytes::from(object)).await {
        Ok(Put::Conflict { existing }) => Err(ArchiveError::Conflict(format!(
            "{name}: the archive holds different content under this name (sha256 {}…, this file {}…); refusing to overwrite it",
            store::short(&existing),
            store::short(&mine),
        ))),
        Ok(put) => Ok(Uploaded {
            put,
            content_len,
            object_len,
        }),
        Err(e) => Err(ArchiveError::Failed(e.to_string())),
    }
}

type Outcome = (String, Result<Uploaded, ArchiveError>, Duration);

pub struct Archiver {
    data_dir: PathBuf,
    settings: watch::Receiver<Option<Arc<Settings>>>,
    current: Option<(Arc<Settings>, Result<Store, String>)>,
    /// When an unusable destination is tried again.
    store_retry_at: Option<Instant>,
    /// The destination confirmed to hold this database's history (see `wal::identity`):
    /// nothing is uploaded anywhere else.
    claimed: Option<String>,
    /// When a claim that could not be decided (the store or pg_control unreadable) is tried
    /// again.
    claim_retry_at: Option<Instant>,
    state: watch::Sender<WalState>,
    metrics: WalMetrics,
    observation: watch::Receiver<Observation>,
    entries: BTreeMap<Key, Entry>,
    waiters: HashMap<String, Vec<oneshot::Sender<Response>>>,
    uploads: JoinSet<Outcome>,
    draining: Option<Drain>,
    archived: u64,
    failures: u64,
    conflicts: u64,
    last_archived: Option<(String, Instant)>,
    last_error: Option<(String, String, Instant)>,
}

struct Drain {
    deadline: Instant,
    scanned: bool,
    reply: oneshot::Sender<u64>,
}

impl Archiver {
    pub fn new(
        data_dir: PathBuf,
        settings: watch::Receiver<Option<Arc<Settings>>>,
        state: watch::Sender<WalState>,
        metrics: WalMetrics,
        observation: watch::Receiver<Observation>,
    ) -> Archiver {
        Archiver {
            data_dir,
            settings,
            current: None,
            store_retry_at: None,
            claimed: None,
            claim_retry_at: None,
            state,
            metrics,
            observation,
            entries: BTreeMap::new(),
            waiters: HashMap::new(),
            uploads: JoinSet::new(),
            draining: None,
            archived: 0,
            failures: 0,
            conflicts: 0,
            last_archived: None,
            last_error: None,
        }
    }

    pub async fn run(
        mut self,
        mut calls: mpsc::Receiver<Call>,
        mut drains: mpsc::Receiver<(Duration, oneshot::Sender<u64>)>,
    ) {
        self.reconfigure();
        let mut tick = tokio::time::interval(SCAN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.dispatch();
            self.check_drain();
            self.publish();
            tokio::select! {
                Some((req, reply)) = calls.recv() => self.request(req, reply),
                Some(done) = self.uploads.join_next(), if !self.uploads.is_empty() => match done {
                    Ok(outcome) => self.finished(outcome),
                    Err(e) => tracing::error!(error = %e, "WAL upload task failed"),
                },
                _ = tick.tick() => self.scan().await,
                Ok(()) = self.settings.changed() => self.reconfigure(),
                Some((timeout, reply)) = drains.recv() => {
                    tracing::info!(timeout = ?timeout, "draining the WAL archive backlog");
                    self.draining = Some(Drain { deadline: Instant::now() + timeout, scanned: false, reply });
                    self.scan().await;
                }
            }
        }
    }

    fn reconfigure(&mut self) {
        let new = self.settings.borrow_and_update().clone();
        self.current = new.map(|s| {
            let store = s.open_archive();
            match &store {
                Ok(st) => tracing::info!(destination = %st.url, compression = s.wal.compression.as_str(), parallelism = s.parallelism(), "WAL archiving on"),
                Err(e) => tracing::error!(error = %e, "WAL archive destination unusable"),
            }
            (s, store)
        });
        if self.current.is_none() {
            tracing::info!("WAL archiving off");
        }
    }

    /// A destination that could not be opened (credentials not written yet, a Secret being
    /// rotated) is tried again every few seconds instead of staying unusable until the next
    /// configuration change.
    fn retry_unusable_store(&mut self) {
        const RETRY: Duration = Duration::from_secs(3);
        let Some((settings, Err(_))) = &self.current else {
            return;
        };
        if self.store_retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        self.store_retry_at = Some(Instant::now() + RETRY);
        if let Ok(store) = settings.open_archive() {
            tracing::info!(destination = %store.url, "WAL archive destination usable now");
            let settings = settings.clone();
            self.current = Some((settings, Ok(store)));
        }
    }

    /// Whether this instance archives ahead: a primary (a standby's WAL is the primary's to
    /// archive; Postgres with archive_mode = on asks nothing of a standby).
    fn primary(&self) -> bool {
        if let Some(pg) = &self.observation.borrow().pg {
            return pg.role == Role::Primary;
        }
        !["standby.signal", "recovery.signal"]
            .iter()
            .any(|f| self.data_dir.join(f).exists())
    }

    async fn scan(&mut self) {
        if self.current.is_none() {
            return;
        }
        self.retry_unusable_store();
        let upload_ahead = self
            .current
            .as_ref()
            .is_some_and(|(s, _)| s.wal.upload_ahead);
        let ahead = upload_ahead && (self.draining.is_some() || self.primary());
        let dir = self.data_dir.join("pg_wal/archive_status");
        let listed = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::task::spawn_blocking(move || ready_files(&dir)),
        )
        .await;
        let Ok(Ok(ready)) = listed else {
            tracing::warn!("cannot list pg_wal/archive_status in time");
            return;
        };
        let wal_dir = self.data_dir.join("pg_wal");
        // Files Postgres no longer lists were archived (through us or not): forget them,
        // unless someone waits for them or they are being uploaded.
        let waiters = &self.waiters;
        self.entries.retain(|(_, name), e| {
            ready.contains(name)
                || e.seg == Seg::Uploading
                || e.urgent && e.seg != Seg::Archived
                || waiters.contains_key(name)
        });
        if ahead {
            for name in &ready {
                self.entries.entry(key(name)).or_insert_with(|| Entry {
                    path: wal_dir.join(name),
                    seg: Seg::Queued,
                    urgent: false,
                });
            }
        }
        if let Some(d) = &mut self.draining {
            d.scanned = true;
        }
        self.claim().await;
    }

    fn request(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let Request::Archive { name, path } = req else {
            let _ = reply.send(Response::Failed {
                error: "not an archive request".into(),
            });
            return;
        };
        if let Err(error) = super::serviceable(&name, &self.current) {
            let _ = reply.send(Response::Failed { error });
            return;
        }
        let entry = self.entries.entry(key(&name)).or_insert_with(|| Entry {
            path: path.clone(),
            seg: Seg::Queued,
            urgent: true,
        });
        if entry.seg == Seg::Archived {
            let _ = reply.send(Response::Archived);
            return;
        }
        entry.urgent = true;
        self.waiters.entry(name).or_default().push(reply);
    }

    /// Confirms (once per destination) that the destination holds this database's history;
    /// one that holds another's becomes unusable, tried again a minute later.
    async fn claim(&mut self) {
        const FOREIGN_RETRY: Duration = Duration::from_secs(60);
        let Some((settings, Ok(store))) = &self.current else {
            return;
        };
        const UNDECIDED_RETRY: Duration = Duration::from_secs(3);
        if self.claimed.as_deref() == Some(store.url.as_str()) {
            return;
        }
        // Claimed by whoever has WAL to upload (the primary, or a standby draining): never by
        // an instance with nothing to archive, which might hold another database's data.
        let work = self
            .entries
            .values()
            .any(|e| matches!(e.seg, Seg::Queued | Seg::Failed { .. }));
        if !work || self.claim_retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        match identity::claim(store, &self.data_dir).await {
            Ok(()) => self.claimed = Some(store.url.clone()),
            Err(e @ identity::IdentityError::Foreign { .. }) => {
                tracing::error!(error = %e, "WAL archive destination refused");
                let error = e.to_string();
                // archive_command calls waiting for an upload get the refusal now, not
                // their own timeout.
                for reply in self.waiters.drain().flat_map(|(_, r)| r) {
                    let _ = reply.send(Response::Failed {
                        error: error.clone(),
                    });
                }
                self.current = Some((settings.clone(), Err(error)));
                self.store_retry_at = Some(Instant::now() + FOREIGN_RETRY);
            }
            Err(e) => {
                tracing::warn!(error = %e, "WAL archiving waits");
                self.claim_retry_at = Some(Instant::now() + UNDECIDED_RETRY);
            }
        }
    }

    fn dispatch(&mut self) {
        let Some((settings, Ok(store))) = &self.current else {
            return;
        };
        if self.claimed.as_deref() != Some(store.url.as_str()) {
            return;
        }
        let now = Instant::now();
        while self.uploads.len() < settings.parallelism() {
            let Some(k) = pick(&self.entries, now) else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&k) else {
                break;
            };
            entry.seg = Seg::Uploading;
            let (store, name, path) = (store.clone(), k.1.clone(), entry.path.clone());
            let (compression, timeout) = (settings.wal.compression, settings.wal.io_timeout);
            self.uploads.spawn(async move {
                let started = Instant::now();
                let r = archive_file(&store, compression, &name, &path, timeout).await;
                (name, r, started.elapsed())
            });
        }
    }

    fn finished(&mut self, (name, result, took): Outcome) {
        let k = key(&name);
        let reply = match result {
            Ok(up) => {
                self.metrics.upload_seconds.observe(took.as_secs_f64());
                self.metrics.archived.inc();
                if up.put == Put::Created {
                    self.metrics.archived_bytes.inc_by(up.content_len);
                    self.metrics.uploaded_bytes.inc_by(up.object_len);
                }
                self.archived += 1;
                self.last_archived = Some((name.clone(), Instant::now()));
                if let Some(e) = self.entries.get_mut(&k) {
                    if let Seg::Failed { attempts, .. } = e.seg {
                        tracing::info!(wal = %name, attempts, "WAL file archived after failed attempts");
                    }
                    e.seg = Seg::Archived;
                }
                tracing::debug!(wal = %name, took = ?took, put = ?up.put, "WAL file archived");
                Response::Archived
            }
            Err(ArchiveError::SourceGone(error)) => {
                self.entries.remove(&k);
                Response::Failed { error }
            }
            Err(e) => {
                let conflict = matches!(e, ArchiveError::Conflict(_));
                let error = e.to_string();
                self.failures += 1;
                self.metrics
                    .failures
                    .with_label_values(&[if conflict { "conflict" } else { "error" }])
                    .inc();
                if conflict {
                    self.conflicts += 1;
                }
                self.last_error = Some((name.clone(), error.clone(), Instant::now()));
                let (initial, max) = self.current.as_ref().map_or(
                    (Duration::from_secs(1), Duration::from_secs(30)),
                    |(s, _)| (s.wal.retry_initial, s.wal.retry_max),
                );
                if let Some(entry) = self.entries.get_mut(&k) {
                    let attempts = match &entry.seg {
                        Seg::Failed {
                            attempts,
                            error: previous,
                            ..
                        } => {
                            if *previous != error {
                                tracing::warn!(wal = %name, %error, "WAL upload failed");
                            }
                            attempts + 1
                        }
                        _ => {
                            if conflict {
                                tracing::error!(wal = %name, %error, "WAL file refused by the archive");
                            } else {
                                tracing::warn!(wal = %name, %error, "WAL upload failed; retrying");
                            }
                            1
                        }
                    };
                    entry.seg = Seg::Failed {
                        attempts,
                        retry_at: Instant::now() + backoff(attempts, initial, max),
                        error: error.clone(),
                        conflict,
                    };
                    entry.urgent = false;
                }
                Response::Failed { error }
            }
        };
        for w in self.waiters.remove(&name).unwrap_or_default() {
            let _ = w.send(reply.clone());
        }
    }

    fn pending(&self) -> u64 {
        self.entries
            .values()
            .filter(|e| e.seg != Seg::Archived)
            .count() as u64
    }

    fn check_drain(&mut self) {
        let Some(d) = &self.draining else {
            return;
        };
        let pending = self.pending();
        let done = d.scanned && pending == 0;
        if done || Instant::now() >= d.deadline {
            if let Some(d) = self.draining.take() {
                if pending == 0 {
                    tracing::info!("WAL archive backlog drained");
                } else {
                    tracing::warn!(
                        pending,
                        "WAL files still not archived at the drain deadline; Postgres archives them after its next start"
                    );
                }
                let _ = d.reply.send(pending);
            }
        }
    }

    fn publish(&self) {
        let settings = self.current.as_ref().map(|(s, _)| s.clone());
        let mut failing = 0;
        let mut conflict = None;
        for e in self.entries.values() {
            if let Seg::Failed {
                conflict: c, error, ..
            } = &e.seg
            {
                failing += 1;
                if *c && conflict.is_none() {
                    conflict = Some(error.clone());
                }
            }
        }
        let queued = self
            .entries
            .values()
            .filter(|e| matches!(e.seg, Seg::Queued | Seg::Failed { .. }))
            .count() as u64;
        let store_error = match &self.current {
            Some((_, Err(e))) => Some(("-".to_string(), e.clone(), Instant::now())),
            _ => None,
        };
        self.state.send_modify(|s| {
            s.settings = settings;
            s.queued = queued;
            s.in_flight = self.uploads.len() as u64;
            s.archived = self.archived;
            s.failures = self.failures;
            s.conflicts = self.conflicts;
            s.last_archived = self.last_archived.clone();
            s.failing = failing + u64::from(store_error.is_some());
            s.last_error = store_error.or_else(|| self.last_error.clone());
            s.conflict = conflict;
        });
    }
}

/// Names of the `.ready` files (valid WAL names only).
fn ready_files(dir: &Path) -> HashSet<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let f = e.file_name();
            let name = f.to_str()?.strip_suffix(".ready")?.to_string();
            names::kind(&name).map(|_| name)
        })
        .collect()
}

#[cfg(test)]
mod tests;
