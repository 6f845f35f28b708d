//! The cluster CA in its Secret `<cluster>-ca` (keys `ca.crt`, `tls.crt`, `tls.key`, as
//! cert-manager writes a CA): read it, or create it once.
//!
//! Creation is create-only (a POST, never an update): when instances start at once, exactly
//! one create succeeds and the others get `409 AlreadyExists` and read the winner's. A CA
//! that exists is never replaced, whoever made it (cert-manager included).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;

use super::issue::{self, KeyAndCert};

/// The CA Secret's name.
pub fn secret_name(cluster: &str) -> String {
    format!("{cluster}-ca")
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot read or create Secret {name}: {source}")]
    Api {
        name: String,
        source: Box<kube::Error>,
    },
    #[error("Secret {name}: {problem}")]
    Unusable { name: String, problem: String },
    #[error(transparent)]
    Issue(#[from] issue::IssueError),
}

impl crate::k8s::Reachability for CaError {
    fn answered(&self) -> bool {
        match self {
            CaError::Timeout(_) => false,
            CaError::Api { source, .. } => source.answered(),
            CaError::Unusable { .. } | CaError::Issue(_) => true,
        }
    }
}

/// `key` of a Secret as UTF-8 text.
pub fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// The CA certificate a CA Secret holds: `tls.crt`, else `ca.crt` (what [`ensure`] uses).
pub fn certificate(secret: &Secret) -> Option<String> {
    text(secret, "tls.crt").or_else(|| text(secret, "ca.crt"))
}

/// The CA (certificate and key) a Secret holds: `tls.crt` and `tls.key`, `ca.crt` for the
/// certificate when `tls.crt` is missing.
fn from_secret(name: &str, secret: &Secret) -> Result<KeyAndCert, CaError> {
    let unusable = |problem: &str| CaError::Unusable {
        name: name.to_string(),
        problem: problem.to_string(),
    };
    let cert_pem = certificate(secret).ok_or_else(|| unusable("has neither tls.crt nor ca.crt"))?;
    let key_pem = text(secret, "tls.key").ok_or_else(|| unusable("has no tls.key"))?;
    issue::info(&cert_pem).map_err(|e| unusable(&e.to_string()))?;
    Ok(KeyAndCert { cert_pem, key_pem })
}

/// What [`ensure`] found.
#[derive(Debug)]
pub struct Found {
    pub ca: KeyAndCert,
    /// Whether this call created the Secret.
    pub created: bool,
}

/// The cluster's CA: read from `<cluster>-ca`, or created there when it does not exist.
pub async fn ensure(api: &Api<Secret>, cluster: &str, timeout: Duration) -> Result<Found, CaError> {
    let name = secret_name(cluster);
    let api_err = |source| CaError::Api {
        name: name.clone(),
        source: Box::new(source),
    };
    if let Some(secret) = bounded(timeout, api.get_opt(&name))
        .await?
        .map_err(api_err)?
    {
        return Ok(Found {
            ca: from_secret(&name, &secret)?,
            created: false,
        });
    }
    let ca = issue::new_ca(cluster, SystemTime::now())?;
    let data = BTreeMap::from([
        (
            "ca.crt".to_string(),
            ByteString(ca.cert_pem.clone().into_bytes()),
        ),
        (
            "tls.crt".to_string(),
            ByteString(ca.cert_pem.clone().into_bytes()),
        ),
        (
            "tls.key".to_string(),
            ByteString(ca.key_pem.clone().into_bytes()),
        ),
    ]);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".into(), "pgwarden".into()),
                ("pgwarden.dev/cluster".into(), cluster.to_string()),
            ])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    match bounded(timeout, api.create(&PostParams::default(), &secret)).await? {
        Ok(_) => Ok(Found { ca, created: true }),
        // Another instance created it first: theirs is the cluster's CA.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let secret = bounded(timeout, api.get(&name)).await?.map_err(api_err)?;
            Ok(Found {
                ca: from_secret(&name, &secret)?,
                created: false,
            })
        }
        Err(e) => Err(api_err(e)),
    }
}

async fn bounded<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = T>,
) -> Result<T, CaError> {
    tokio::time::timeout(timeout, f)
        .await
        .map_err(|_| CaError::Timeout(timeout))
}
