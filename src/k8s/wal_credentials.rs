//! S3 credentials for WAL archiving from a Kubernetes Secret (`spec.walArchive.s3.
//! credentialsSecret`), kept as private files in the run directory, where the archiver and the
//! `wal-archive`/`wal-restore` commands read them at every connection. Rotations are followed;
//! the values are never logged or put in an Event.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::sync::watch;

use super::events::Events;
use super::follow;
use super::Shared;

/// Keys copied from the Secret; the first two are required.
const KEYS: [&str; 3] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// Where the copy lives.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("wal").join("credentials")
}

pub struct WalCredentialsTask {
    pub client: Client,
    pub shared: Arc<Shared>,
    pub events: Events,
    pub dir: PathBuf,
}

impl WalCredentialsTask {
    pub async fn run(self, source: watch::Receiver<Option<String>>) {
        let me = &self;
        follow::current(source, |name| async move { me.follow(&name).await }, || {}).await;
    }

    async fn follow(&self, name: &str) {
        let api: Api<Secret> =
            Api::namespaced(self.client.clone(), &self.shared.identity.namespace);
        let mut stream = std::pin::pin!(follow::named(api, name, self.shared.clone()));
        while let Some(result) = stream.next().await {
            let Ok(secret) = result else { continue };
            match self.write(&secret) {
                Ok(()) => tracing::info!(secret = %name, "WAL archive credentials updated"),
                Err(problem) => {
                    let message = format!("Secret {name}: {problem}");
                    tracing::error!(%message, "unusable WAL archive credentials");
                    self.events.warning("InvalidSecret", message).await;
                }
            }
        }
    }

    /// Writes each key to its own file (mode 0600), atomically; an absent optional key removes
    /// a stale file.
    fn write(&self, secret: &Secret) -> Result<(), String> {
        let data = secret.data.clone().unwrap_or_default();
        for required in &KEYS[..2] {
            if !data.contains_key(*required) {
                return Err(format!("has no key {required}"));
            }
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let _ = std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700));
        for key in KEYS {
            let path = self.dir.join(key);
            match data.get(key) {
                Some(value) => {
                    let tmp = self.dir.join(format!(".{key}.tmp"));
                    std::fs::write(&tmp, &value.0)
                        .map_err(|e| format!("cannot write {key}: {e}"))?;
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| format!("cannot protect {key}: {e}"))?;
                    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {key}: {e}"))?;
                }
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(())
    }
}
