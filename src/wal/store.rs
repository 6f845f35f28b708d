//! The archive's storage: a thin wrapper over `object_store` (a local directory, or S3 and
//! compatible services), with every call bounded by a timeout.
//!
//! Objects live at `<prefix>/wal/<file name>`, in the format of [`super::format`]. An upload
//! never replaces an object: it first reads the header of what is there (same checksum:
//! already archived; different: refused), then writes with "create only" (a no-clobber rename
//! on a filesystem, `If-None-Match: *` on S3), so a writer racing us cannot be overwritten
//! either where the store supports it.
//!
//! Base backups (see `crate::backup`) live beside the WAL, at `<prefix>/base/<id>/...`, and go
//! through the same calls by key ([`Store::put_object`], [`Store::get_object`], [`Store::list`],
//! [`Store::delete`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::format::{self, Header, HEADER_LEN};
use crate::config::S3Config;

/// Where the archive is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    File(std::path::PathBuf),
    S3 { bucket: String, prefix: String },
}

/// Parses `file:///abs/path` or `s3://bucket[/prefix]`.
pub fn parse_destination(s: &str) -> Result<Destination, String> {
    if let Some(path) = s.strip_prefix("file://") {
        let p = std::path::PathBuf::from(path);
        if !p.is_absolute() {
            return Err(format!(
                "{s:?}: a file destination is file:///absolute/path"
            ));
        }
        return Ok(Destination::File(p));
    }
    if let Some(rest) = s.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid_bucket {
            return Err(format!("{s:?}: {bucket:?} is not a valid bucket name"));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(format!("{s:?}: the prefix may not contain . or .."));
        }
        return Ok(Destination::S3 {
            bucket: bucket.to_string(),
            prefix,
        });
    }
    Err(format!(
        "{s:?}: use file:///absolute/path or s3://bucket/prefix"
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} did not answer within {1:?}")]
    TimedOut(String, Duration),
    #[error("{0}")]
    Store(String),
}

/// The result of an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Written now.
    Created,
    /// The archive already had this exact content.
    AlreadyArchived,
    /// The archive has different content under this name; nothing was written.
    Conflict { existing: [u8; 32] },
}

/// An object found by [`Store::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The key below the destination's prefix, e.g. `wal/000000010000000000000001`.
    pub key: String,
    pub size: u64,
    pub last_modified: SystemTime,
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    timeout: Duration,
    /// For messages: the destination URL (no credentials are ever part of it).
    pub url: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

/// rustls needs a process-wide crypto provider for reqwest's TLS (installed once, `ring`).
fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Store {
    pub fn open(url: &str, s3: &S3Config, timeout: Duration) -> Result<Store, String> {
        let (inner, prefix): (Arc<dyn ObjectStore>, String) = match parse_destination(url)? {
            Destination::File(dir) => {
                std::fs::create_dir_all(dir.join("wal"))
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| format!("cannot use {}: {e}", dir.display()))?
                    .with_fsync(true);
                (Arc::new(fs), String::new())
            }
            Destination::S3 { bucket, prefix } => {
                ensure_crypto_provider();
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&bucket)
                    .with_allow_http(s3.allow_http)
                    .with_retry(object_store::RetryConfig {
                        backoff: object_store::BackoffConfig {
                            init_backoff: Duration::from_millis(100),
                            max_backoff: Duration::from_secs(2),
                            base: 2.0,
                        },
                        // pgwarden retries whole uploads itself, with its own backoff.
                        max_retries: 2,
                        retry_timeout: timeout,
                    })
                    .with_client_options(
                        object_store::ClientOptions::new()
                            .with_timeout(timeout)
                            .with_connect_timeout(timeout.min(Duration::from_secs(10)))
                            .with_allow_http(s3.allow_http),
                    );
                if let Some(e) = &s3.endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(r) = &s3.region {
                    b = b.with_region(r);
                }
                if let Some(dir) = &s3.credentials_dir {
                    let read = |name: &str| {
                        std::fs::read_to_string(dir.join(name))
                            .map(|s| s.trim().to_string())
                            .ok()
                            .filter(|s| !s.is_empty())
                    };
                    let (Some(id), Some(secret)) =
                        (read("AWS_ACCESS_KEY_ID"), read("AWS_SECRET_ACCESS_KEY"))
                    else {
                        return Err(format!(
                            "{} must hold AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                            dir.display()
                        ));
                    };
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                    if let Some(token) = read("AWS_SESSION_TOKEN") {
                        b = b.with_token(token);
                    }
                }
                let store = b.build().map_err(|e| format!("cannot use {url}: {e}"))?;
                (Arc::new(store), prefix)
            }
        };
        Ok(Store {
            inner,
            prefix,
            timeout,
            url: url.to_string(),
        })
    }

    /// The object path of `key` (relative to the destination).
    fn key_path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// The key of the WAL file `name`.
    pub fn wal_key(name: &str) -> String {
        format!("wal/{name}")
    }

    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, object_store::Error> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(object_store::Error::Generic {
                store: "pgwarden",
                source: format!(
                    "{what} on {} did not finish within {:?}",
                    self.url, self.timeout
                )
                .into(),
            }),
        }
    }

    /// The header of the archived object `name`, `None` when there is none.
    pub async fn header(&self, name: &str) -> Result<Option<Result<Header, String>>, StoreError> {
        self.header_at(&Store::wal_key(name), name).await
    }

    /// The header of the object at `key` (`name` for messages).
    async fn header_at(
        &self,
        key: &str,
        name: &str,
    ) -> Result<Option<Result<Header, String>>, StoreError> {
        let path = self.key_path(key);
        let r = self
            .bounded("read", self.inner.get_range(&path, 0..HEADER_LEN as u64))
            .await;
        match r {
            Ok(bytes) => Ok(Some(Header::parse(&bytes).map_err(|e| e.to_string()))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::Store(format!("cannot read {name}: {e}"))),
        }
    }

    /// Uploads an encoded object unless the archive already has `name` (identical: success;
    /// different: [`Put::Conflict`], nothing written).
    pub async fn put_new(&self, name: &str, object: Bytes) -> Result<Put, StoreError> {
        self.put_object(&Store::wal_key(name), object).await
    }

    /// [`Store::put_new`] for any key: create-only, the same content is success.
    pub async fn put_object(&self, key: &str, object: Bytes) -> Result<Put, StoreError> {
        let name = key;
        let want = Header::parse(&object).map_err(|e| StoreError::Store(e.to_string()))?;
        if let Some(existing) = self.header_at(key, name).await? {
            return Ok(compare(want, existing));
        }
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let r = self
            .bounded(
                "upload",
                self.inner
                    .put_opts(&self.key_path(key), PutPayload::from(object.clone()), opts),
            )
            .await;
        match r {
            Ok(_) => Ok(Put::Created),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {
                // Someone wrote it meanwhile: decide on its content.
                match self.header_at(key, name).await? {
                    Some(existing) => Ok(compare(want, existing)),
                    None => Err(StoreError::Store(format!(
                        "{name}: the store reported it exists but it cannot be read"
                    ))),
                }
            }
            Err(object_store::Error::NotImplemented { .. }) => {
                // A store without create-only writes: the check above is all we can do.
                self.bounded(
                    "upload",
                    self.inner
                        .put(&self.key_path(key), PutPayload::from(object)),
                )
                .await
                .map_err(|e| StoreError::Store(format!("cannot upload {name}: {e}")))?;
                Ok(Put::Created)
            }
            Err(e) => Err(StoreError::Store(format!("cannot upload {name}: {e}"))),
        }
    }

    /// The whole object `name`, `None` when the archive does not have it.
    pub async fn get(&self, name: &str) -> Result<Option<Bytes>, StoreError> {
        self.get_object(&Store::wal_key(name)).await
    }

    /// The whole object at `key`, `None` when there is none.
    pub async fn get_object(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let name = key;
        let path = self.key_path(key);
        let inner = self.inner.clone();
        let r = self
            .bounded(
                "download",
                async move { inner.get(&path).await?.bytes().await },
            )
            .await;
        match r {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::Store(format!("cannot download {name}: {e}"))),
        }
    }
}

impl Store {
    /// Every object below `under` (a key prefix ending in `/`), each page of the listing
    /// bounded by the timeout. Keys are relative to the destination.
    pub async fn list(&self, under: &str) -> Result<Vec<Listed>, StoreError> {
        let prefix = self.key_path(under.trim_end_matches('/'));
        let mut stream = self.inner.list(Some(&prefix));
        let mut out = Vec::new();
        loop {
            let next = match tokio::time::timeout(self.timeout, stream.next()).await {
                Ok(n) => n,
                Err(_) => {
                    return Err(StoreError::TimedOut(
                        format!("listing {under}"),
                        self.timeout,
                    ))
                }
            };
            match next {
                None => return Ok(out),
                Some(Ok(meta)) => {
                    let full = meta.location.to_string();
                    let key = match self.prefix.is_empty() {
                        true => full,
                        false => full
                            .strip_prefix(&format!("{}/", self.prefix))
                            .map(str::to_string)
                            .unwrap_or(full),
                    };
                    out.push(Listed {
                        key,
                        size: meta.size,
                        last_modified: meta.last_modified.into(),
                    });
                }
                Some(Err(object_store::Error::NotFound { .. })) => return Ok(out),
                Some(Err(e)) => return Err(StoreError::Store(format!("cannot list {under}: {e}"))),
            }
        }
    }

    /// Deletes the object at `key` (one that is already gone is fine).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self
            .bounded("delete", self.inner.delete(&self.key_path(key)))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::Store(format!("cannot delete {key}: {e}"))),
        }
    }
}

fn compare(want: Header, existing: Result<Header, String>) -> Put {
    match existing {
        Ok(h) if h.sha256 == want.sha256 && h.length == want.length => Put::AlreadyArchived,
        Ok(h) => Put::Conflict { existing: h.sha256 },
        // Not our format: certainly not the same content.
        Err(_) => Put::Conflict {
            existing: [0u8; 32],
        },
    }
}

/// For messages: the short form of a checksum.
pub fn short(sha: &[u8; 32]) -> String {
    format::hex(&sha[..6])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::format::{encode, Compression};

    #[test]
    fn destinations_parse() {
        assert_eq!(
            parse_destination("file:///var/archive").unwrap(),
            Destination::File("/var/archive".into())
        );
        assert_eq!(
            parse_destination("s3://my-bucket/pg/prod/").unwrap(),
            Destination::S3 {
                bucket: "my-bucket".into(),
                prefix: "pg/prod".into()
            }
        );
        assert_eq!(
            parse_destination("s3://my-bucket").unwrap(),
            Destination::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
            }
        );
        for bad in [
            "file://rel/path",
            "s3://",
            "s3://A_B",
            "gs://x",
            "/tmp",
            "s3://bkt/../x",
        ] {
            assert!(parse_destination(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn file_store_refuses_different_content_and_accepts_the_same() {
        let d = tempfile::tempdir().unwrap();
        let url = format!("file://{}", d.path().display());
        let store = Store::open(&url, &S3Config::default(), Duration::from_secs(5)).unwrap();
        let name = "000000010000000000000001";
        assert!(store.get(name).await.unwrap().is_none());
        assert!(store.header(name).await.unwrap().is_none());
        let a = Bytes::from(encode(b"segment a", Compression::Zstd).unwrap());
        assert_eq!(store.put_new(name, a.clone()).await.unwrap(), Put::Created);
        // The same content again, even compressed differently: already archived.
        let a2 = Bytes::from(encode(b"segment a", Compression::None).unwrap());
        assert_eq!(store.put_new(name, a2).await.unwrap(), Put::AlreadyArchived);
        let b = Bytes::from(encode(b"segment b", Compression::Zstd).unwrap());
        assert!(matches!(
            store.put_new(name, b).await.unwrap(),
            Put::Conflict { .. }
        ));
        assert_eq!(store.get(name).await.unwrap().unwrap(), a);
        assert!(d.path().join("wal").join(name).is_file());
    }
}
