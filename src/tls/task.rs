//! The TLS task: follows `spec.postgresql.tls` and keeps this instance's certificate current.
//!
//! Self-issued (the default): the CA from `<cluster>-ca` (created once), a serving
//! certificate issued at start, again at two thirds of its lifetime and whenever the CA Secret
//! holds another CA (it is watched). From Secrets
//! (`certificateSecret`, `caSecret`): their contents, followed by a watch. Either way each
//! new certificate is written to the files, published to the HTTP servers and the peer
//! client, and Postgres reloads it (SIGHUP, no restart).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch;

use super::ca::{self, CaError};
use super::issue::{self, KeyAndCert, Names, Whereabouts};
use super::Material;
use crate::k8s::crd::{PostgresClusterSpec, TlsMode, TlsSpec};
use crate::k8s::events::Events;
use crate::k8s::follow::{self, Seen};
use crate::k8s::Shared;
use crate::supervisor::postmaster;

pub struct TlsTask {
    pub client: Client,
    pub shared: Arc<Shared>,
    pub events: Events,
    pub postmaster: postmaster::Handle,
    pub run_dir: PathBuf,
    /// The advertise address and the pod IP, for the certificate's names.
    pub addresses: Vec<String>,
    pub api_timeout: Duration,
}

/// Longest pause between two attempts to get a certificate.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Shortest time a certificate is used before the next is issued.
const MIN_RENEWAL: Duration = Duration::from_secs(10);

impl TlsTask {
    pub async fn run(self) {
        let mut spec = self.shared.spec.subscribe();
        loop {
            let wanted = tls_of(&spec.borrow_and_update());
            match &wanted {
                Some(t) if t.mode != TlsMode::Off => {
                    tokio::select! {
                        () = self.keep(t) => {}
                        () = until_changed(&mut spec, &wanted) => {}
                    }
                    continue;
                }
                Some(_) => self.turn_off().await,
                None => {}
            }
            until_changed(&mut spec, &wanted).await;
        }
    }

    async fn turn_off(&self) {
        if self.shared.tls.borrow().is_none() {
            return;
        }
        self.shared.tls.send_replace(None);
        if let Err(e) = self.postmaster.set_ssl(None).await {
            tracing::warn!(error = %e, "cannot turn TLS off in Postgres");
        }
        let dir = self.run_dir.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || super::remove_files(&dir)).await {
            tracing::warn!(error = %e, "cannot remove the TLS files");
        }
        tracing::info!("TLS turned off");
    }

    /// Gets, publishes and renews the certificate; never returns.
    async fn keep(&self, t: &TlsSpec) {
        match &t.certificate_secret {
            Some(name) => {
                self.follow_secrets(t.mode, name, t.ca_secret.as_deref())
                    .await
            }
            None => {
                let lifetime = t
                    .certificate_duration_seconds
                    .map_or(issue::SERVER_VALIDITY, |s| Duration::from_secs(s.into()));
                self.self_issued(t.mode, lifetime).await
            }
        }
    }

    async fn self_issued(&self, mode: TlsMode, lifetime: Duration) {
        let id = &self.shared.identity;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &id.namespace);
        let name = ca::secret_name(&id.cluster);
        // Followed from the start: another CA in it (replaced by hand or by cert-manager, or
        // created anew after a deletion) is followed at once, so that the instances keep
        // trusting each other without a restart.
        let mut ca_seen = std::pin::pin!(follow::named_or_gone(api, &name, self.shared.clone()));
        let mut backoff = Duration::from_secs(1);
        loop {
            let issued = SystemTime::now();
            match self.issue(mode, issued, lifetime).await {
                Ok(m) => {
                    backoff = Duration::from_secs(1);
                    // From the moment of issue, not the backdated notBefore: a short lifetime
                    // must not come out as "renew at once".
                    let renew = issue::renew_at(issued, m.info.not_after);
                    let ca_in_use = m.ca_pem.clone();
                    self.publish(m).await;
                    let wait = renew.duration_since(SystemTime::now()).unwrap_or_default();
                    self.until_renewal_or_new_ca(
                        &mut ca_seen,
                        &name,
                        &ca_in_use,
                        wait.max(MIN_RENEWAL),
                    )
                    .await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot get a TLS certificate yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Returns after `wait`, or as soon as the CA Secret holds a CA other than `in_use`. A
    /// deleted CA Secret is reported; the certificate in use stays (the next issue creates a
    /// new CA, which the other instances then follow).
    async fn until_renewal_or_new_ca(
        &self,
        seen: &mut (impl futures::Stream<Item = Result<Seen<Secret>, watcher::Error>> + Unpin),
        name: &str,
        in_use: &str,
        wait: Duration,
    ) {
        let renewal = tokio::time::sleep(wait);
        tokio::pin!(renewal);
        let mut gone = false;
        loop {
            tokio::select! {
                () = &mut renewal => return,
                Some(result) = seen.next() => match result {
                    Ok(Seen::Applied(secret)) => {
                        gone = false;
                        if ca::certificate(&secret).is_some_and(|c| c != in_use) {
                            tracing::info!(secret = %name, "the cluster CA changed; issuing a certificate from it");
                            return;
                        }
                    }
                    Ok(Seen::Gone) if !gone => {
                        gone = true;
                        let message = format!("Secret {name} with the cluster CA is gone; keeping the certificate in use until the next renewal creates a new CA");
                        tracing::warn!(secret = %name, "{message}");
                        self.events.warning("CASecretMissing", message).await;
                    }
                    Ok(Seen::Gone) | Err(_) => {}
                },
            }
        }
    }

    async fn issue(
        &self,
        mode: TlsMode,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Material, String> {
        let id = &self.shared.identity;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &id.namespace);
        let result = ca::ensure(&api, &id.cluster, self.api_timeout).await;
        self.shared.api_result(&result);
        let found = result.map_err(|e: CaError| e.to_string())?;
        if found.created {
            let name = ca::secret_name(&id.cluster);
            tracing::info!(secret = %name, "created the cluster CA");
            self.events
                .normal(
                    "CACreated",
                    format!("created the cluster CA in Secret {name}"),
                )
                .await;
        }
        let names = Names::for_instance(&Whereabouts {
            cluster: &id.cluster,
            namespace: &id.namespace,
            pod: &id.pod,
            addresses: &self.addresses,
        });
        let server = issue::issue_server(&found.ca, &id.pod, &names, now, lifetime)
            .map_err(|e| e.to_string())?;
        Material::new(mode, found.ca.cert_pem, server).map_err(|e| e.to_string())
    }

    /// Follows the spec-named Secrets: every change of their content is a new certificate; a
    /// Secret that is gone is reported, and the certificate in use stays.
    async fn follow_secrets(&self, mode: TlsMode, cert: &str, ca_name: Option<&str>) {
        let api: Api<Secret> =
            Api::namespaced(self.client.clone(), &self.shared.identity.namespace);
        let watch_one = |name: &str, is_ca: bool| {
            follow::named_or_gone(api.clone(), name, self.shared.clone())
                .map(move |r| (is_ca, r))
                .boxed()
        };
        let ca_stream = match ca_name {
            Some(name) => watch_one(name, true),
            None => futures::stream::pending().boxed(),
        };
        let mut stream = futures::stream::select(watch_one(cert, false), ca_stream);
        let (mut server, mut ca_secret): (Option<Secret>, Option<Secret>) = (None, None);
        // Whether each was reported missing (once per absence, not at every re-list).
        let mut missing = [false; 2];
        while let Some((is_ca, result)) = stream.next().await {
            let Ok(seen) = result else { continue };
            let slot = if is_ca { &mut ca_secret } else { &mut server };
            match seen {
                Seen::Applied(secret) => {
                    missing[usize::from(is_ca)] = false;
                    *slot = Some(secret);
                }
                Seen::Gone => {
                    *slot = None;
                    if !std::mem::replace(&mut missing[usize::from(is_ca)], true) {
                        let name = if is_ca { ca_name.unwrap_or(cert) } else { cert };
                        let message = if self.shared.tls.borrow().is_some() {
                            format!("Secret {name} is gone; keeping the certificate in use")
                        } else {
                            format!("Secret {name} does not exist; no TLS until it does")
                        };
                        tracing::warn!(secret = %name, "{message}");
                        self.events.warning("TLSSecretMissing", message).await;
                    }
                    continue;
                }
            }
            let Some(s) = &server else { continue };
            let ca_source = if ca_name.is_some() {
                ca_secret.as_ref()
            } else {
                Some(s)
            };
            let Some(ca_source) = ca_source else { continue };
            match from_secrets(mode, cert, s, ca_source) {
                Ok(m) => {
                    let same = self
                        .shared
                        .tls
                        .borrow()
                        .as_ref()
                        .is_some_and(|cur| cur.server == m.server && cur.ca_pem == m.ca_pem);
                    if !same {
                        self.publish(m).await;
                    }
                }
                Err(problem) => {
                    tracing::error!(%problem, "unusable TLS Secret; keeping the current certificate");
                    self.events.warning("InvalidTLSSecret", problem).await;
                }
            }
        }
    }

    /// Writes the files, publishes the material and has Postgres reload it.
    async fn publish(&self, m: Material) {
        let m = Arc::new(m);
        // Written and fsynced off the runtime's thread: a slow disk must not hold up probes or
        // the Lease.
        let (dir, material) = (self.run_dir.clone(), m.clone());
        let written = tokio::task::spawn_blocking(move || super::write_files(&dir, &material))
            .await
            .map_err(|e| e.to_string());
        let files = match written {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot write the TLS files");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write the TLS files");
                return;
            }
        };
        let not_after = chrono::DateTime::<chrono::Utc>::from(m.info.not_after).to_rfc3339();
        let serial = m.info.serial.clone();
        self.shared.tls.send_replace(Some(m));
        if let Err(e) = self.postmaster.set_ssl(Some(files)).await {
            tracing::warn!(error = %e, "Postgres did not reload the certificate");
        }
        tracing::info!(%serial, %not_after, "TLS certificate in use");
        self.events
            .normal(
                "CertificateInUse",
                format!("serving certificate {serial}, valid until {not_after}"),
            )
            .await;
    }
}

/// The material a `kubernetes.io/tls` Secret (and the CA's Secret) describe.
fn from_secrets(
    mode: TlsMode,
    name: &str,
    server: &Secret,
    ca_source: &Secret,
) -> Result<Material, String> {
    let ca_name = ca_source.metadata.name.clone().unwrap_or_default();
    let cert_pem = ca::text(server, "tls.crt").ok_or(format!("Secret {name} has no tls.crt"))?;
    let key_pem = ca::text(server, "tls.key").ok_or(format!("Secret {name} has no tls.key"))?;
    let ca_pem = ca::text(ca_source, "ca.crt").ok_or(format!("Secret {ca_name} has no ca.crt"))?;
    Material::new(mode, ca_pem, KeyAndCert { cert_pem, key_pem })
        .map_err(|e| format!("Secret {name}: {e}"))
}

fn tls_of(spec: &Option<Arc<PostgresClusterSpec>>) -> Option<TlsSpec> {
    spec.as_ref().map(|s| s.postgresql.tls.clone())
}

/// Returns when `spec.postgresql.tls` differs from `current` (never once the spec channel is
/// gone).
async fn until_changed(
    spec: &mut watch::Receiver<Option<Arc<PostgresClusterSpec>>>,
    current: &Option<TlsSpec>,
) {
    loop {
        if spec.changed().await.is_err() {
            return std::future::pending().await;
        }
        if &tls_of(&spec.borrow_and_update()) != current {
            return;
        }
    }
}
