//! Whose history a destination holds: `<prefix>/system`, the database system identifier of the
//! cluster whose WAL and backups it keeps, written create-only by the first archiver and
//! compared by every later one. Two databases' WAL under one prefix would share segment names
//! (each starts at timeline 1) and be mistaken for each other at a restore; a cluster pointed
//! at another's destination (a copied spec, a reused bucket) is refused and says so.
//!
//! A cluster restored from a backup keeps its source's system identifier, so this check cannot
//! tell it from its source: that case is caught by `wal::RESTORED_FROM`.

use std::path::Path;

use bytes::Bytes;

use super::format::{self, Compression};
use super::store::{Put, Store, StoreError};
use crate::postgres::control;

/// The object's key below the destination's prefix.
pub const KEY: &str = "system";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The destination holds another database's history: never archived into.
    #[error(
        "{url} holds the WAL of database system {theirs}, this data directory is database \
         system {mine}: not archiving into another cluster's history; give this cluster a \
         destination of its own (wal.destination or spec.walArchive.destination)"
    )]
    Foreign {
        url: String,
        theirs: String,
        mine: String,
    },
    /// Not decided yet (the store or the control file could not be read): retried.
    #[error("cannot check whose WAL {url} holds: {reason}")]
    Unknown { url: String, reason: String },
}

/// Claims `store` for the database in `data_dir`, or confirms an earlier claim.
pub async fn claim(store: &Store, data_dir: &Path) -> Result<(), IdentityError> {
    let mine = control::read_async(data_dir)
        .await
        .map_err(|e| IdentityError::Unknown {
            url: store.url.clone(),
            reason: e.to_string(),
        })?
        .system_identifier
        .to_string();
    claim_for(store, mine).await
}

/// Claims `store` for the database system `mine` (its identifier as Postgres prints it), or
/// confirms an earlier claim.
pub async fn claim_for(store: &Store, mine: String) -> Result<(), IdentityError> {
    let unknown = |reason: String| IdentityError::Unknown {
        url: store.url.clone(),
        reason,
    };
    let object =
        format::encode(mine.as_bytes(), Compression::None).map_err(|e| unknown(e.to_string()))?;
    match store.put_object(KEY, Bytes::from(object)).await {
        Ok(Put::Created) => {
            tracing::info!(destination = %store.url, system_identifier = %mine, "destination claimed for this database");
            Ok(())
        }
        Ok(Put::AlreadyArchived) => Ok(()),
        Ok(Put::Conflict { .. }) => Err(IdentityError::Foreign {
            url: store.url.clone(),
            theirs: holder(store)
                .await
                .unwrap_or_else(|e| format!("unknown ({e})")),
            mine,
        }),
        Err(e) => Err(unknown(e.to_string())),
    }
}

/// The system identifier the destination was claimed for.
async fn holder(store: &Store) -> Result<String, StoreError> {
    let object = store
        .get_object(KEY)
        .await?
        .ok_or_else(|| StoreError::Store(format!("{KEY} is gone")))?;
    let (_, content) = format::decode(&object).map_err(|e| StoreError::Store(e.to_string()))?;
    Ok(String::from_utf8_lossy(&content).trim().to_string())
}
