//! `pgwarden backup verify ID`: every object of the backup is read back, decompressed and
//! checked against its own header and against `backup.info`, and every WAL segment the backup
//! needs to reach consistency is read back the same way.

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::catalog::{self, fetch_part};
use super::info::{self, BackupInfo};
use super::BackupError;
use crate::wal::restore::{fetch, RestoreError};
use crate::wal::store::Store;

#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub id: String,
    /// Objects of the backup read and checked (parts, manifest, `backup.info`).
    pub objects: usize,
    /// Their uncompressed bytes.
    pub bytes: u64,
    /// WAL segments read and checked.
    pub wal_segments: usize,
}

pub async fn verify(store: &Store, id: &str, parallelism: usize) -> Result<Verified, BackupError> {
    let info = match catalog::read_info(store, id).await {
        Err(BackupError::Missing { .. }) => {
            return Err(
                match store.list(&super::backup_prefix(id)).await?.is_empty() {
                    true => BackupError::UnknownBackup {
                        id: id.to_string(),
                        destination: store.url.clone(),
                    },
                    false => BackupError::Missing {
                        object: super::info_key(id),
                    },
                },
            )
        }
        other => other?,
    };
    let objects: Vec<_> = info.parts.iter().chain([&info.manifest]).collect();
    let bytes: u64 = futures::stream::iter(objects.iter().map(|o| fetch_part(store, o)))
        .buffer_unordered(parallelism.max(1))
        .map_ok(|content| content.len() as u64)
        .try_fold(0, |sum, n| async move { Ok(sum + n) })
        .await?;
    let wal = wal_names(&info);
    futures::stream::iter(wal.iter().map(|name| check_wal(store, name)))
        .buffer_unordered(parallelism.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(Verified {
        id: id.to_string(),
        objects: objects.len() + 1,
        bytes,
        wal_segments: wal.len(),
    })
}

fn wal_names(info: &BackupInfo) -> Vec<String> {
    let size = info.wal_segment_size;
    let (first, last) = info::wal_range(info.start_lsn, info.end_lsn, size);
    (first..=last)
        .map(|s| info::segment_name(info.timeline, s, size))
        .collect()
}

async fn check_wal(store: &Store, name: &str) -> Result<(), BackupError> {
    let object = format!("wal/{name}");
    match fetch(store, name).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(BackupError::Missing { object }),
        Err(RestoreError::Corrupt(error)) => Err(BackupError::Corrupt { object, error }),
        Err(RestoreError::Failed(e)) => {
            Err(BackupError::Store(crate::wal::store::StoreError::Store(e)))
        }
    }
}
