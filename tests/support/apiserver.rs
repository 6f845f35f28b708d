//! The project's embedded Kubernetes API server ([`pgwarden::demo::apiserver`]), with the
//! conveniences tests want: it starts with the PostgresCluster CRD of `config/crd.yaml`
//! installed (as in a cluster pgwarden runs in), starting it, writing a kubeconfig and seeding
//! or changing fixtures panic on failure (a failure there is a bug in the test or its machine),
//! and a resource type the server lacks is a bug in the test.

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use pgwarden::demo::apiserver::*;

type Server = pgwarden::demo::apiserver::ApiServer;

/// The embedded API server; every other method is the library's (through `Deref`).
pub struct ApiServer(Server);

impl std::ops::Deref for ApiServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

fn known(api_version: &str, plural: &str) {
    assert!(
        Server::serves(api_version, plural),
        "the API server has no {plural} in {api_version}"
    );
}

/// The PostgresCluster CustomResourceDefinition, as `config/crd.yaml` has it.
pub fn crd() -> Value {
    serde_norway::from_str(include_str!("../../config/crd.yaml")).expect("config/crd.yaml is YAML")
}

impl ApiServer {
    /// The server with the PostgresCluster CRD installed.
    pub fn start() -> ApiServer {
        let server = ApiServer::bare();
        server.create(crd());
        server
    }

    /// The server without any CRD: PostgresClusters are not served.
    pub fn bare() -> ApiServer {
        ApiServer(Server::start().expect("start the API server"))
    }

    /// Writes a kubeconfig for the client identified by `token`, in namespace "default".
    pub fn kubeconfig(&self, dir: &Path, token: &str) -> PathBuf {
        self.0.kubeconfig(dir, token).expect("write the kubeconfig")
    }

    pub fn create(&self, obj: Value) -> Value {
        self.0.create(obj).unwrap_or_else(|e| panic!("create: {e}"))
    }

    pub fn get(&self, api_version: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        known(api_version, plural);
        self.0.get(api_version, plural, ns, name).ok()
    }

    pub fn list(&self, api_version: &str, plural: &str, ns: &str) -> Vec<Value> {
        known(api_version, plural);
        self.0.list(api_version, plural, ns).unwrap_or_default()
    }

    pub fn update_with(
        &self,
        api_version: &str,
        plural: &str,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Value {
        let result = self.0.update_with(api_version, plural, ns, name, f);
        result.unwrap_or_else(|e| panic!("writing {plural} {name}: {e}"))
    }

    pub fn patch_status(
        &self,
        api_version: &str,
        plural: &str,
        ns: &str,
        name: &str,
        status: Value,
    ) -> Value {
        let result = self.0.patch_status(api_version, plural, ns, name, status);
        result.unwrap_or_else(|e| panic!("writing {plural} {name}: {e}"))
    }

    pub fn delete(&self, api_version: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        known(api_version, plural);
        self.0.delete(api_version, plural, ns, name).ok()
    }

    /// A one-instance PostgresCluster `cluster` with its password Secrets (both passwords
    /// [`super::PASSWORD`]) and the Pod `pod`.
    pub fn seed_single(&self, ns: &str, cluster: &str, pod: &str) {
        for name in ["pg-superuser", "pg-replication"] {
            self.create(serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": ns},
                "data": {"password": "dGVzdC1zdXBlcnVzZXItcGFzc3dvcmQ="}
            }));
        }
        self.create(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": ns},
            "spec": {"containers": [{"name": "postgres", "image": "pgwarden"}]}
        }));
        self.create(serde_json::json!({
            "apiVersion": "pgwarden.dev/v1", "kind": "PostgresCluster",
            "metadata": {"name": cluster, "namespace": ns},
            "spec": {
                "instances": 1,
                "secrets": {"superuser": {"name": "pg-superuser"}, "replication": {"name": "pg-replication"}}
            }
        }));
    }
}
