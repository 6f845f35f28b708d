//! TLS: the cluster CA and the instances' certificates, for Postgres (clients and
//! replication), the status and metrics endpoints, and the peers' calls.
//!
//! One task ([`task`]) owns the certificates: it follows `spec.postgresql.tls`, gets the CA
//! (creates `<cluster>-ca` once, create-only, or reads it), issues this instance's serving
//! certificate ([`issue`]), writes the files Postgres reads (0600, in the run directory),
//! tells the postmaster actor to reload, and publishes the [`Material`] on a watch channel
//! for the HTTP servers and the elector's peer client. Private keys exist only in Secrets,
//! in those files and in memory; they are never logged or reported.

pub mod ca;
pub mod issue;
pub mod task;

use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::k8s::crd::TlsMode;
use crate::postgres::conf::SslFiles;
use issue::{CertInfo, KeyAndCert};

/// What TLS is in force, published by the TLS task.
pub type Current = tokio::sync::watch::Receiver<Option<Arc<Material>>>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Issue(#[from] issue::IssueError),
    #[error("not a usable PEM {what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("rustls refused the {what}: {reason}")]
    Rustls { what: &'static str, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// This instance's certificate and the CA that verifies the cluster's.
pub struct Material {
    pub mode: TlsMode,
    /// PEM of the CA certificate(s) peers and clients verify with.
    pub ca_pem: String,
    pub server: KeyAndCert,
    pub info: CertInfo,
    /// For the HTTPS listeners.
    pub server_config: Arc<rustls::ServerConfig>,
    /// For calls to peers: verifies their certificates against the CA.
    pub client_config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("mode", &self.mode)
            .field("serial", &self.info.serial)
            .finish_non_exhaustive()
    }
}

/// The certificate in use, as `/pg/status` shows it.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct TlsDoc {
    /// `preferred` or `required`.
    pub mode: TlsMode,
    /// The serving certificate's serial (hex, as `openssl x509 -serial` prints it).
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    pub not_after: String,
}

impl Material {
    pub fn doc(&self) -> TlsDoc {
        let time = |t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339();
        TlsDoc {
            mode: self.mode,
            serial: self.info.serial.clone(),
            not_before: time(self.info.not_before),
            not_after: time(self.info.not_after),
        }
    }

    pub fn new(mode: TlsMode, ca_pem: String, server: KeyAndCert) -> Result<Material, TlsError> {
        let info = issue::info(&server.cert_pem)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certs(&server.cert_pem, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).map_err(|e| {
            TlsError::Pem {
                what: "private key",
                reason: e.to_string(),
            }
        })?;
        // A client may present a certificate from the CA (a member proving it is one, see
        // http::status); probes, Prometheus and curl present none and are served all the same.
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(&ca_pem)?.into(),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Rustls {
            what: "CA certificate",
            reason: e.to_string(),
        })?;
        let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| rustls_error("server configuration", e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)
            .map_err(|e| rustls_error("certificate and key", e))?;
        // Calls to peers present this instance's certificate.
        let client_config = client_config(&ca_pem, Some(&server))?;
        Ok(Material {
            mode,
            ca_pem,
            server,
            info,
            server_config: Arc::new(server_config),
            client_config: Arc::new(client_config),
        })
    }
}

fn rustls_error(what: &'static str, e: rustls::Error) -> TlsError {
    TlsError::Rustls {
        what,
        reason: e.to_string(),
    }
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

fn roots(ca_pem: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca_pem, "CA certificate")? {
        roots
            .add(cert)
            .map_err(|e| rustls_error("CA certificate", e))?;
    }
    Ok(roots)
}

/// A client configuration that trusts only the certificates in `ca_pem` and presents
/// `identity` (a certificate and key) when given.
pub fn client_config(
    ca_pem: &str,
    identity: Option<&KeyAndCert>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| rustls_error("client configuration", e))?
    .with_root_certificates(roots(ca_pem)?);
    let Some(id) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: "private key",
        reason: e.to_string(),
    })?;
    builder
        .with_client_auth_cert(certs(&id.cert_pem, "certificate")?, key)
        .map_err(|e| rustls_error("client certificate", e))
}

/// The directory of the files Postgres reads: `<run_dir>/tls`.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("tls")
}

/// The files' paths, as Postgres and libpq are given them.
pub fn files(run_dir: &Path) -> SslFiles {
    let d = dir(run_dir);
    SslFiles {
        cert: d.join("tls.crt"),
        key: d.join("tls.key"),
        ca: d.join("ca.crt"),
    }
}

/// Writes the certificate, key and CA, each atomically and readable by this user only
/// (Postgres refuses a key file others can read).
pub fn write_files(run_dir: &Path, m: &Material) -> Result<SslFiles, TlsError> {
    let d = dir(run_dir);
    let write = |path: &Path, content: &str| -> Result<(), TlsError> {
        let err = |source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("tmp");
        // Created 0600 before anything is written into it.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        std::io::Write::write_all(&mut f, content.as_bytes()).map_err(err)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    };
    std::fs::create_dir_all(&d).map_err(|source| TlsError::Write {
        path: d.clone(),
        source,
    })?;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        TlsError::Write {
            path: d.clone(),
            source,
        }
    })?;
    let f = files(run_dir);
    write(&f.ca, &m.ca_pem)?;
    write(&f.key, &m.server.key_pem)?;
    write(&f.cert, &m.server.cert_pem)?;
    Ok(f)
}

/// Removes the files (TLS turned off).
pub fn remove_files(run_dir: &Path) {
    let _ = std::fs::remove_dir_all(dir(run_dir));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn files_are_written_for_the_owner_only() {
        let now = SystemTime::now();
        let ca = issue::new_ca("pg", now).unwrap();
        let names = issue::Names::for_instance(&issue::Whereabouts {
            cluster: "pg",
            namespace: "ns",
            pod: "pg-0",
            addresses: &[],
        });
        let server = issue::issue_server(&ca, "pg-0", &names, now, issue::SERVER_VALIDITY).unwrap();
        let m = Material::new(TlsMode::Required, ca.cert_pem.clone(), server).unwrap();
        let run = tempfile::tempdir().unwrap();
        let f = write_files(run.path(), &m).unwrap();
        for path in [&f.cert, &f.key, &f.ca] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        let dir_mode = std::fs::metadata(dir(run.path()))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert_eq!(std::fs::read_to_string(&f.ca).unwrap(), ca.cert_pem);
        assert!(!format!("{m:?}").contains("PRIVATE"));
        remove_files(run.path());
        assert!(!dir(run.path()).exists());
    }
}
