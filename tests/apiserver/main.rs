//! The embedded API server (`src/demo/apiserver/`, used by the tests and `pgwarden demo`)
//! behaves like a real kube-apiserver for the real `kube` client, and its faults are observable
//! from the client side.

#[path = "../support/mod.rs"]
mod support;

mod faults;
mod objects;
mod watches;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::ErrorResponse;
use kube::runtime::watcher;
use kube::{Client, Config, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use support::apiserver::{ApiServer, Fault};

/// Every test finishes within this, whatever the server does.
const TEST_LIMIT: Duration = Duration::from_secs(30);
/// How long a client waits for an answer that a fault withholds.
const CLIENT_PATIENCE: Duration = Duration::from_secs(1);

struct Env {
    server: ApiServer,
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            server: ApiServer::start(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A client configured the way pgwarden is: from a kubeconfig file.
    async fn client(&self, token: &str) -> Client {
        let path = self.server.kubeconfig(self.dir.path(), token);
        let kubeconfig = Kubeconfig::read_from(&path).unwrap();
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
        Client::try_from(config).unwrap()
    }
}

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .expect("the test took too long")
}

fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> ErrorResponse {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn from_json<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).unwrap()
}

fn config_map(name: &str, labels: Value, data: Value) -> ConfigMap {
    from_json(json!({ "metadata": { "name": name, "labels": labels }, "data": data }))
}

fn clusters(client: Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("pgwarden.dev", "v1", "PostgresCluster");
    Api::namespaced_with(
        client,
        "default",
        &ApiResource::from_gvk_with_plural(&gvk, "postgresclusters"),
    )
}

fn names<K: Resource>(items: &[K]) -> Vec<String> {
    items
        .iter()
        .map(|item| item.meta().name.clone().unwrap_or_default())
        .collect()
}

/// The next watch event, or None when the stream ends; fails after a few seconds.
async fn next_event<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("no watch event within 5 s")
}

fn event_summary(event: WatchEvent<ConfigMap>) -> (String, String) {
    match event {
        WatchEvent::Added(cm) => ("ADDED".into(), cm.name_any()),
        WatchEvent::Modified(cm) => ("MODIFIED".into(), cm.name_any()),
        WatchEvent::Deleted(cm) => ("DELETED".into(), cm.name_any()),
        WatchEvent::Bookmark(b) => ("BOOKMARK".into(), b.metadata.resource_version),
        WatchEvent::Error(e) => ("ERROR".into(), e.reason),
    }
}

/// The summary of the next event of a watch that should deliver one.
async fn next_summary<S>(stream: &mut S) -> (String, String)
where
    S: Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin,
{
    event_summary(next_event(stream).await.unwrap().unwrap())
}

type ConfigMapWatch = BoxStream<'static, kube::Result<WatchEvent<ConfigMap>>>;

/// A client's ConfigMaps (`token` names the client) and a watch of them open from the start,
/// without bookmarks: what the fault tests look at a fault through.
async fn watching(env: &Env, token: &str) -> (Api<ConfigMap>, ConfigMapWatch) {
    let cms: Api<ConfigMap> = Api::default_namespaced(env.client(token).await);
    let wp = WatchParams::default().disable_bookmarks();
    let watch = cms.watch(&wp, "0").await.unwrap().boxed();
    (cms, watch)
}

#[tokio::test]
async fn kubeconfig_is_readable_by_everyone_and_names_the_server() {
    let env = Env::new();
    let path = env.server.kubeconfig(env.dir.path(), "pgwarden-a");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        env.server.url()
    );
    assert_eq!(config.default_namespace, "default");
}
