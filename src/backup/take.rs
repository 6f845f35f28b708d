//! Taking a base backup of the local instance.
//!
//! `pg_basebackup -D - -Ft -X none` streams one tar to pgwarden's pipe; it is cut into
//! `part_size` parts, each compressed and checksummed on the blocking pool and uploaded with
//! at most `wal.parallelism` uploads at once (a bounded channel holds the reader back when
//! the uploads fall behind). The manifest pg_basebackup appends to the stream is also stored
//! on its own. The backup is complete, and `backup.info` written, once PostgreSQL's
//! `backup_manifest` is stored and every WAL segment from its start to its end is archived.

use std::io::Read;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::info::{self, BackupInfo, ObjectInfo};
use super::{backup_prefix, info_key, split, BackupError};
use crate::config::Config;
use crate::postgres::binaries::Binaries;
use crate::postgres::connect::{self, Target};
use crate::supervisor::reaper::{ExitStatus, Reaper};
use crate::wal::format::{self, Compression};
use crate::wal::store::{Put, Store};

/// Default size of one part of the tar stream (before compression).
pub const PART_SIZE: usize = 16 << 20;

pub struct TakeOptions {
    /// The instance (`postgres`), the destination and its settings (`wal`), the source name
    /// (`instance_name`).
    pub config: Config,
    pub destination: String,
    pub part_size: usize,
    /// Bound for pg_basebackup as a whole.
    pub timeout: Duration,
    /// Bound for the backup's WAL to reach the archive once pg_basebackup is done.
    pub wal_timeout: Duration,
    /// pg_basebackup's `--max-rate` (e.g. `100M`): spares the source's disks.
    pub max_rate: Option<String>,
    /// From a standby: the key that names the last segment the backup needs, for the primary
    /// to switch WAL ([`super::standby`]).
    pub wal_request: Option<String>,
}

/// What the instance says about itself.
struct Source {
    /// A standby's backup ends in a segment only the primary archives: the WAL wait lasts
    /// until the primary has finished that segment (a switch, a full segment, or
    /// `archive_timeout`).
    standby: bool,
    segment_size: u64,
    system_identifier: String,
    server_version: String,
    major: u32,
}

async fn source(config: &Config) -> Result<Source, BackupError> {
    let pg = &config.postgres;
    let what = |e: tokio_postgres::Error| {
        BackupError::Postgres(format!(
            "cannot ask the instance on {} port {}: {e}",
            pg.run_dir.display(),
            pg.port
        ))
    };
    let c = connect::connect(&Target::admin(pg)).await.map_err(what)?;
    let row = c
        .query_one(
            "SELECT pg_is_in_recovery(), pg_size_bytes(current_setting('wal_segment_size')), \
             (SELECT system_identifier::text FROM pg_control_system()), \
             current_setting('server_version'), current_setting('server_version_num')::int",
            &[],
        )
        .await
        .map_err(what)?;
    Ok(Source {
        standby: row.get(0),
        segment_size: row.get::<_, i64>(1) as u64,
        system_identifier: row.get(2),
        server_version: row.get(3),
        major: (row.get::<_, i32>(4) / 10000) as u32,
    })
}

/// Takes a backup; `reaper` collects pg_basebackup (the process has one reaper only).
pub async fn take(o: &TakeOptions, reaper: &Reaper) -> Result<BackupInfo, BackupError> {
    let wal = &o.config.wal;
    // A restored cluster's backups never go into its source's archive, as its WAL never does:
    // they would be listed as the source's (same system identifier, same timeline IDs).
    let (data_dir, destination) = (o.config.postgres.data_dir.clone(), o.destination.clone());
    tokio::task::spawn_blocking(move || crate::wal::check_restored_from(&data_dir, &destination))
        .await
        .map_err(|e| BackupError::Internal(e.to_string()))?
        .map_err(BackupError::Refused)?;
    let store =
        Store::open(&o.destination, &wal.s3, wal.io_timeout).map_err(BackupError::Refused)?;
    let src = source(&o.config).await?;
    // Nor into another database's: the destination belongs to the system that claimed it.
    crate::wal::identity::claim_for(&store, src.system_identifier.clone())
        .await
        .map_err(|e| BackupError::Refused(e.to_string()))?;
    let bin = Binaries::locate(
        reaper,
        o.config.postgres.bin_dir.as_deref(),
        Some(src.major),
    )
    .await
    .map_err(|e| BackupError::Postgres(e.to_string()))?;

    let (id, start_time) = new_id(&store).await?;
    tracing::info!(id, destination = %o.destination, standby = src.standby, "backup started");
    let streamed = tokio::time::timeout(o.timeout, stream(o, &store, reaper, &bin, &id)).await;
    let (parts, stored_bytes, split) = streamed.map_err(|_| {
        BackupError::TimedOut(format!(
            "pg_basebackup did not finish within {:?}",
            o.timeout
        ))
    })??;
    let end_time = SystemTime::now();

    let manifest_text = split.manifest.ok_or_else(|| {
        BackupError::Postgres("pg_basebackup's stream has no backup_manifest".into())
    })?;
    let summary = info::summarize_manifest(&manifest_text).map_err(BackupError::Postgres)?;
    let manifest_key = format!("{}backup_manifest", backup_prefix(&id));
    let (manifest, manifest_stored) =
        upload(&store, manifest_key, manifest_text, wal.compression).await?;

    let size = src.segment_size;
    let (first, last) = info::wal_range(summary.start_lsn, summary.end_lsn, size);
    let mut wanted: Vec<String> = (first..=last)
        .map(|s| info::segment_name(summary.timeline, s, size))
        .collect();
    if summary.timeline > 1 {
        wanted.push(format!("{:08X}.history", summary.timeline));
    }
    if let (true, Some(key)) = (src.standby, &o.wal_request) {
        let segment = info::segment_name(summary.timeline, last, size);
        super::standby::request_wal(&store, key, &segment).await?;
    }
    wait_archived(&store, &wanted, o.wal_timeout, src.standby).await?;

    let info = BackupInfo {
        format: info::INFO_FORMAT,
        id: id.clone(),
        source: o.config.instance_name.clone(),
        standby: src.standby,
        system_identifier: src.system_identifier,
        server_version: src.server_version,
        timeline: summary.timeline,
        start_lsn: summary.start_lsn,
        end_lsn: summary.end_lsn,
        start_time,
        end_time,
        wal_segment_size: size,
        compression: wal.compression,
        files: summary.files,
        bytes: split.bytes,
        stored_bytes: stored_bytes + manifest_stored,
        parts,
        manifest,
        first_wal: info::segment_name(summary.timeline, first, size),
        last_wal: info::segment_name(summary.timeline, last, size),
    };
    let text = serde_json::to_vec_pretty(&info)
        .map_err(|e| BackupError::Internal(format!("cannot write backup.info: {e}")))?;
    upload(&store, info_key(&id), text, wal.compression).await?;
    tracing::info!(
        id,
        bytes = info.bytes,
        stored = info.stored_bytes,
        "backup completed"
    );
    Ok(info)
}

/// An id no backup has yet (ids have seconds: a second backup within the same second
/// waits for the next one).
async fn new_id(store: &Store) -> Result<(String, SystemTime), BackupError> {
    for _ in 0..3 {
        let now = SystemTime::now();
        let id = info::backup_id(now);
        if store.list(&backup_prefix(&id)).await?.is_empty() {
            return Ok((id, now));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(BackupError::Refused(format!(
        "{} already holds backups with the ids of the last seconds",
        store.url
    )))
}

type Streamed = (Vec<ObjectInfo>, u64, split::Split);

/// Runs pg_basebackup and uploads its stream.
async fn stream(
    o: &TakeOptions,
    store: &Store,
    reaper: &Reaper,
    bin: &Binaries,
    id: &str,
) -> Result<Streamed, BackupError> {
    let pg = &o.config.postgres;
    let mut cmd = crate::postgres::command(bin.tool("pg_basebackup"));
    cmd.arg("-h")
        .arg(&pg.run_dir)
        .args(["-p", &pg.port.to_string(), "-U", &pg.superuser])
        .args([
            "-D",
            "-",
            "-F",
            "tar",
            "-X",
            "none",
            "-c",
            "fast",
            "--no-password",
        ])
        .args(["-l", &format!("pgwarden {id}")])
        .args(o.max_rate.iter().flat_map(|r| ["--max-rate", r.as_str()]))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = reaper
        .spawn(&mut cmd)
        .map_err(BackupError::io("cannot start pg_basebackup"))?;
    // Whatever happens to this future (an error, the timeout), pg_basebackup goes with it.
    let mut guard = KillOnDrop(Some(child.pid));
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(BackupError::Postgres("pg_basebackup has no pipes".into()));
    };
    let errors = tokio::task::spawn_blocking(move || tail(stderr));
    let (tx, rx) = mpsc::channel(o.config.wal.parallelism.max(1) as usize);
    let part_size = o.part_size;
    let reader = tokio::task::spawn_blocking(move || split::split_tar(stdout, part_size, tx));
    let uploaded = upload_parts(store, id, &o.config.wal, rx).await;
    let split = reader.await;
    let status = (&mut child.exit).await;
    guard.0 = None;
    let stderr = errors.await.unwrap_or_default();
    // A failed upload stops the reader, and so pg_basebackup: the upload's error is the cause.
    let (parts, stored) = uploaded?;
    match status {
        Ok(ExitStatus::Exited(0)) => {}
        Ok(s) => {
            return Err(BackupError::Postgres(format!(
                "pg_basebackup failed ({s}): {}",
                stderr.trim()
            )))
        }
        Err(_) => return Err(BackupError::Postgres("pg_basebackup vanished".into())),
    }
    let split = split
        .map_err(|e| BackupError::Internal(format!("reading pg_basebackup's stream: {e}")))?
        .map_err(BackupError::io("reading pg_basebackup's stream"))?;
    Ok((parts, stored, split))
}

/// Kills the child it holds when dropped; emptied once the child's exit was collected (its
/// pid may then belong to another process).
struct KillOnDrop(Option<nix::unistd::Pid>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The last lines of a child's stderr (at most 64 KiB kept).
fn tail(mut pipe: impl Read) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut buf) {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
        if all.len() > 64 << 10 {
            all.drain(..all.len() - (64 << 10));
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// Uploads the parts as they come, at most `parallelism` at once.
async fn upload_parts(
    store: &Store,
    id: &str,
    wal: &crate::config::WalConfig,
    mut parts: mpsc::Receiver<Vec<u8>>,
) -> Result<(Vec<ObjectInfo>, u64), BackupError> {
    let limit = wal.parallelism.max(1) as usize;
    let mut running = JoinSet::new();
    let mut done = Vec::new();
    let mut stored = 0;
    let mut n = 0usize;
    let mut collect =
        |r: Result<Result<(ObjectInfo, u64), BackupError>, tokio::task::JoinError>| {
            let (o, s) =
                r.map_err(|e| BackupError::Internal(format!("an upload failed: {e}")))??;
            stored += s;
            done.push(o);
            Ok::<(), BackupError>(())
        };
    while let Some(part) = parts.recv().await {
        while running.len() >= limit {
            if let Some(r) = running.join_next().await {
                collect(r)?;
            }
        }
        let key = format!("{}base.tar.{n:05}", backup_prefix(id));
        n += 1;
        let (store, compression) = (store.clone(), wal.compression);
        running.spawn(async move { upload(&store, key, part, compression).await });
    }
    while let Some(r) = running.join_next().await {
        collect(r)?;
    }
    done.sort_by(|a, b| a.key.cmp(&b.key));
    Ok((done, stored))
}

/// Encodes `content` (on the blocking pool) and stores it create-only at `key`: what was
/// recorded, and the bytes stored.
async fn upload(
    store: &Store,
    key: String,
    content: Vec<u8>,
    compression: Compression,
) -> Result<(ObjectInfo, u64), BackupError> {
    let length = content.len() as u64;
    let object = tokio::task::spawn_blocking(move || format::encode(&content, compression))
        .await
        .map_err(|e| BackupError::Internal(format!("compressing {key}: {e}")))?
        .map_err(|e| BackupError::Internal(format!("compressing {key}: {e}")))?;
    let sha256 = format::hex(&format::sha256_of_object(&object));
    let stored = object.len() as u64;
    match store.put_object(&key, Bytes::from(object)).await? {
        Put::Created | Put::AlreadyArchived => Ok((
            ObjectInfo {
                key,
                length,
                sha256,
            },
            stored,
        )),
        Put::Conflict { .. } => Err(BackupError::Refused(format!(
            "{key} already exists with other content"
        ))),
    }
}

/// Waits until every WAL file in `names` is in the archive.
async fn wait_archived(
    store: &Store,
    names: &[String],
    within: Duration,
    standby: bool,
) -> Result<(), BackupError> {
    let hint = match standby {
        true => {
            "the backup was taken from a standby: the primary archives that segment once it is \
             full, at a WAL switch, or after archive_timeout"
        }
        false => "is WAL archiving working?",
    };
    let deadline = Instant::now() + within;
    for name in names {
        loop {
            match store.header(name).await? {
                Some(Ok(_)) => break,
                Some(Err(e)) => {
                    return Err(BackupError::Corrupt {
                        object: format!("wal/{name}"),
                        error: e,
                    })
                }
                None if Instant::now() >= deadline => {
                    return Err(BackupError::TimedOut(format!(
                        "wal/{name}, which the backup needs, was not archived within {within:?} \
                         ({hint}); the backup is not complete"
                    )))
                }
                None => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    Ok(())
}
