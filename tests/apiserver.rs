//! The embedded API server (src/demo/apiserver.rs, used by the tests and `pgwarden demo`) behaves like a real kube-apiserver for the
//! real `kube` client, and its faults are observable from the client side.

mod support;

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

#[tokio::test]
async fn create_get_list_replace_delete_follow_the_conventions() {
    let env = Env::new();
    bounded(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(env.client("a").await);
        let created = cms
            .create(
                &PostParams::default(),
                &config_map("one", json!({}), json!({"k": "v"})),
            )
            .await
            .unwrap();
        let meta = &created.metadata;
        assert!(meta.uid.as_ref().is_some_and(|uid| uid.len() == 36));
        assert!(meta.creation_timestamp.is_some());
        assert_eq!(meta.generation, Some(1));
        assert_eq!(meta.namespace.as_deref(), Some("default"));
        let rv1: u64 = meta.resource_version.as_ref().unwrap().parse().unwrap();

        // As on a real server, whose storage layer refuses it.
        let with_rv = api_error(cms.create(&PostParams::default(), &created.clone()).await);
        assert_eq!(
            with_rv.message,
            "resourceVersion should not be set on objects to be created"
        );
        let mut again = created.clone();
        again.metadata.resource_version = None;
        let exists = api_error(cms.create(&PostParams::default(), &again).await);
        assert_eq!(
            (exists.code, exists.reason.as_str()),
            (409, "AlreadyExists")
        );

        assert_eq!(cms.get("one").await.unwrap().data, created.data);
        let missing = api_error(cms.get("nope").await);
        assert_eq!(
            (
                missing.code,
                missing.reason.as_str(),
                missing.status.as_str()
            ),
            (404, "NotFound", "Failure")
        );
        assert_eq!(missing.message, r#"configmaps "nope" not found"#);

        // Optimistic concurrency: a write based on a stale resourceVersion is refused.
        let mut fresh = created.clone();
        fresh.data = Some([("k".to_string(), "v2".to_string())].into());
        let replaced = cms
            .replace("one", &PostParams::default(), &fresh)
            .await
            .unwrap();
        let rv2: u64 = replaced.resource_version().unwrap().parse().unwrap();
        assert!(rv2 > rv1);
        let conflict = api_error(cms.replace("one", &PostParams::default(), &fresh).await);
        assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
        // Without a resourceVersion the write is unconditional; one that changes nothing is no new version.
        let mut unconditional = replaced.clone();
        unconditional.metadata.resource_version = None;
        let same = cms
            .replace("one", &PostParams::default(), &unconditional)
            .await
            .unwrap();
        assert_eq!(same.resource_version(), replaced.resource_version());

        cms.create(
            &PostParams::default(),
            &config_map("two", json!({}), json!({})),
        )
        .await
        .unwrap();
        let list = cms.list(&ListParams::default()).await.unwrap();
        assert_eq!(names(&list.items), ["one", "two"]);
        let list_rv: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
        assert!(list_rv > rv2);

        let deleted = cms
            .delete("one", &DeleteParams::default())
            .await
            .unwrap()
            .left()
            .unwrap();
        assert_eq!(deleted.name_any(), "one");
        assert_eq!(api_error(cms.get("one").await).code, 404);
        assert_eq!(
            api_error(cms.delete("one", &DeleteParams::default()).await).code,
            404
        );
        assert_eq!(env.server.count("a", "create", "configmaps"), 4);
        assert_eq!(env.server.count("a", "delete", "configmaps"), 2);
    })
    .await;
}

#[tokio::test]
async fn unknown_resources_get_a_404_status() {
    let env = Env::new();
    bounded(async {
        let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
        let widgets: Api<DynamicObject> =
            Api::default_namespaced_with(env.client("a").await, &ApiResource::from_gvk(&gvk));
        let error = api_error(widgets.list(&ListParams::default()).await);
        assert_eq!((error.code, error.reason.as_str()), (404, "NotFound"));
    })
    .await;
}

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    let env = Env::new();
    bounded(async {
        let secrets: Api<Secret> = Api::default_namespaced(env.client("a").await);
        let secret: Secret = from_json(json!({
            "metadata": { "name": "s", "labels": { "keep": "1", "drop": "1" } },
            "stringData": { "password": "x" },
        }));
        let created = secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        let pp = PatchParams::default();

        let merge = Patch::Merge(json!({ "metadata": { "labels": { "drop": null, "new": "2" } } }));
        let patched = secrets.patch("s", &pp, &merge).await.unwrap();
        assert_eq!(patched.labels().len(), 2);
        assert_eq!(patched.labels()["new"], "2");
        assert!(!patched.labels().contains_key("drop"));

        let ops = json!([
            { "op": "test", "path": "/metadata/labels/keep", "value": "1" },
            { "op": "replace", "path": "/metadata/labels/keep", "value": "3" },
            { "op": "add", "path": "/metadata/annotations", "value": { "a/b": "c" } },
            { "op": "remove", "path": "/metadata/labels/new" },
        ]);
        let patched = secrets
            .patch("s", &pp, &Patch::Json::<()>(from_json(ops)))
            .await
            .unwrap();
        assert_eq!(patched.labels().len(), 1);
        assert_eq!(patched.labels()["keep"], "3");
        assert_eq!(patched.annotations()["a/b"], "c");

        let failing = json!([{ "op": "test", "path": "/metadata/labels/keep", "value": "1" }]);
        let error = api_error(
            secrets
                .patch("s", &pp, &Patch::Json::<()>(from_json(failing)))
                .await,
        );
        assert_eq!((error.code, error.reason.as_str()), (422, "Invalid"));

        // A resourceVersion in a patch is a precondition.
        let stale =
            Patch::Merge(json!({ "metadata": { "resourceVersion": created.resource_version() } }));
        assert_eq!(api_error(secrets.patch("s", &pp, &stale).await).code, 409);

        let strategic = Patch::Strategic(json!({ "metadata": { "labels": { "s": "1" } } }));
        assert_eq!(
            secrets.patch("s", &pp, &strategic).await.unwrap().labels()["s"],
            "1"
        );

        let apply = Patch::Apply(json!({ "apiVersion": "v1", "kind": "Secret" }));
        assert_eq!(
            api_error(secrets.patch("s", &PatchParams::apply("t"), &apply).await).code,
            415
        );
        assert_eq!(
            api_error(secrets.patch("missing", &pp, &merge).await).code,
            404
        );
    })
    .await;
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let env = Env::new();
    bounded(async {
        let api = clusters(env.client("a").await);
        let mut obj: DynamicObject = from_json(json!({
            "apiVersion": "pgwarden.dev/v1", "kind": "PostgresCluster",
            "metadata": { "name": "pg" }, "status": { "phase": "Made up" },
            "spec": { "instances": 1, "secrets": { "superuser": { "name": "s" }, "replication": { "name": "r" } } },
        }));
        let created = api.create(&PostParams::default(), &obj).await.unwrap();
        assert_eq!(created.metadata.generation, Some(1));
        assert!(created.data.get("status").is_none(), "a create drops the status");

        // Writes to the main resource ignore status; a spec change bumps the generation.
        obj = created.clone();
        obj.data["spec"]["instances"] = json!(3);
        obj.data["status"] = json!({ "phase": "Ignored" });
        let replaced = api.replace("pg", &PostParams::default(), &obj).await.unwrap();
        assert_eq!(replaced.metadata.generation, Some(2));
        assert!(replaced.data.get("status").is_none());

        // Writes to /status change only the status, and not the generation.
        let status = Patch::Merge(json!({ "spec": { "instances": 9 }, "status": { "phase": "Running" } }));
        let patched = api.patch_status("pg", &PatchParams::default(), &status).await.unwrap();
        assert_eq!(patched.data["status"]["phase"], "Running");
        assert_eq!(patched.data["spec"]["instances"], 3);
        assert_eq!(patched.metadata.generation, Some(2));
        assert!(patched.resource_version() > replaced.resource_version());
        let mut whole = patched.clone();
        whole.data["status"]["phase"] = json!("Replaced");
        let replaced = api.replace_status("pg", &PostParams::default(), serde_json::to_vec(&whole).unwrap()).await.unwrap();
        assert_eq!(replaced.data["status"]["phase"], "Replaced");
        let stale = api.replace_status("pg", &PostParams::default(), serde_json::to_vec(&whole).unwrap()).await;
        assert_eq!(api_error(stale).code, 409);

        // A metadata-only change keeps the generation.
        let labels = Patch::Merge(json!({ "metadata": { "labels": { "x": "y" } } }));
        assert_eq!(api.patch("pg", &PatchParams::default(), &labels).await.unwrap().metadata.generation, Some(2));
        assert_eq!(env.server.count("a", "patch", "postgresclusters/status"), 1);

        // Pods have the subresource too.
        let pods: Api<Pod> = Api::default_namespaced(env.client("a").await);
        pods.create(&PostParams::default(), &from_json(json!({ "metadata": { "name": "p" }, "spec": { "containers": [] } })))
            .await
            .unwrap();
        let status = Patch::Merge(json!({ "status": { "podIP": "10.0.0.1" } }));
        let pod = pods.patch_status("p", &PatchParams::default(), &status).await.unwrap();
        assert_eq!(pod.status.unwrap().pod_ip.as_deref(), Some("10.0.0.1"));
    })
    .await;
}

#[tokio::test]
async fn label_and_field_selectors_on_lists() {
    let env = Env::new();
    bounded(async {
        let client = env.client("a").await;
        let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
        for (name, labels) in [("a", json!({"app": "pg", "role": "primary"})), ("b", json!({"app": "pg"})), ("c", json!({}))] {
            cms.create(&PostParams::default(), &config_map(name, labels, json!({}))).await.unwrap();
        }
        env.server.create(json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "d", "namespace": "other", "labels": {"app": "pg"} } }));
        let select = |labels: &str, fields: &str| {
            let cms = cms.clone();
            let lp = ListParams::default().labels(labels).fields(fields);
            async move { names(&cms.list(&lp).await.unwrap().items) }
        };
        assert_eq!(select("app=pg", "").await, ["a", "b"]);
        assert_eq!(select("app==pg,role!=primary", "").await, ["b"]);
        assert_eq!(select("role!=primary", "").await, ["b", "c"]);
        assert_eq!(select("role", "").await, ["a"]);
        assert_eq!(select("!app", "").await, ["c"]);
        assert_eq!(select("", "metadata.name=b").await, ["b"]);
        assert_eq!(select("app=pg", "metadata.name!=a,metadata.namespace=default").await, ["b"]);
        let all: Api<ConfigMap> = Api::all(client);
        assert_eq!(names(&all.list(&ListParams::default().labels("app=pg")).await.unwrap().items), ["a", "b", "d"]);

        let bad = api_error(cms.list(&ListParams::default().fields("data.k=v")).await);
        assert_eq!((bad.code, bad.reason.as_str()), (400, "BadRequest"));
        assert_eq!(api_error(cms.list(&ListParams::default().labels("a b")).await).code, 400);
    })
    .await;
}

#[tokio::test]
async fn watches_apply_selectors_and_show_objects_entering_and_leaving() {
    let env = Env::new();
    bounded(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(env.client("a").await);
        let wp = WatchParams::default().labels("app=pg").disable_bookmarks();
        let mut stream = cms.watch(&wp, "0").await.unwrap().boxed();
        let cm = cms
            .create(
                &PostParams::default(),
                &config_map("x", json!({}), json!({})),
            )
            .await
            .unwrap();
        let labelled = Patch::Merge(json!({ "metadata": { "labels": { "app": "pg" } } }));
        cms.patch("x", &PatchParams::default(), &labelled)
            .await
            .unwrap();
        cms.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": { "k": "v" } })),
        )
        .await
        .unwrap();
        cms.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": null } })),
        )
        .await
        .unwrap();
        cms.create(
            &PostParams::default(),
            &config_map("y", json!({"app": "pg"}), json!({})),
        )
        .await
        .unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(next_summary(&mut stream).await);
        }
        let expected = [
            ("ADDED", "x"),
            ("MODIFIED", "x"),
            ("DELETED", "x"),
            ("ADDED", "y"),
        ];
        assert_eq!(seen, expected.map(|(t, n)| (t.to_string(), n.to_string())));
        drop(cm);

        let wp = WatchParams::default()
            .fields("metadata.name=y")
            .disable_bookmarks();
        let mut by_name = cms.watch(&wp, "0").await.unwrap().boxed();
        assert_eq!(
            next_summary(&mut by_name).await,
            ("ADDED".into(), "y".into())
        );
    })
    .await;
}

#[tokio::test]
async fn watches_resume_from_a_resource_version_and_see_store_helper_writes() {
    let env = Env::new();
    bounded(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(env.client("a").await);
        let first = env.server.create(
            json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "a" } }),
        );
        let from = first["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        env.server.create(
            json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "b" } }),
        );
        let updated = env
            .server
            .update_with("v1", "configmaps", "default", "a", |cm| {
                cm["data"] = json!({ "k": "v" })
            });
        assert_eq!(updated["metadata"]["generation"], 2);
        env.server
            .delete("v1", "configmaps", "default", "b")
            .unwrap();

        let wp = WatchParams::default().disable_bookmarks();
        let mut resumed = cms.watch(&wp, &from).await.unwrap().boxed();
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(next_summary(&mut resumed).await);
        }
        let expected = [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")];
        assert_eq!(seen, expected.map(|(t, n)| (t.to_string(), n.to_string())));

        // From "0": the current objects as ADDED, then the changes.
        let mut fresh = cms.watch(&wp, "0").await.unwrap().boxed();
        assert_eq!(next_summary(&mut fresh).await, ("ADDED".into(), "a".into()));
        env.server
            .update_with("v1", "configmaps", "default", "a", |cm| {
                cm["data"]["k"] = json!("w")
            });
        assert_eq!(
            next_summary(&mut fresh).await,
            ("MODIFIED".into(), "a".into())
        );
        let live = next_summary(&mut resumed).await;
        assert_eq!(live, ("MODIFIED".into(), "a".into()));
        assert_eq!(env.server.list("v1", "configmaps", "default").len(), 1);
    })
    .await;
}

#[tokio::test]
async fn compaction_expires_old_watches_and_the_watcher_relists() {
    let env = Env::new();
    bounded(async {
        let leases: Api<Lease> = Api::default_namespaced(env.client("w").await);
        let lease: Lease = from_json(
            json!({ "metadata": { "name": "leader" }, "spec": { "holderIdentity": "a" } }),
        );
        let created = leases.create(&PostParams::default(), &lease).await.unwrap();
        let old_rv = created.resource_version().unwrap();

        let mut events = watcher(leases.clone(), watcher::Config::default()).boxed();
        while !matches!(
            next_event(&mut events).await,
            Some(Ok(watcher::Event::InitDone))
        ) {}
        assert_eq!(env.server.count("w", "list", "leases"), 1);

        // Another client's watch stays open through compaction; "w" is cut off, and the
        // change it misses is made with no history from before it.
        let other: Api<Lease> = Api::default_namespaced(env.client("other").await);
        let mut open = other
            .watch(&WatchParams::default().disable_bookmarks(), &old_rv)
            .await
            .unwrap()
            .boxed();
        env.server.compact();
        env.server.set_fault("w", Fault::Refuse);
        env.server.update_with(
            "coordination.k8s.io/v1",
            "leases",
            "default",
            "leader",
            |l| l["spec"]["holderIdentity"] = json!("b"),
        );
        env.server.set_fault("w", Fault::None);
        assert!(matches!(
            next_event(&mut open).await,
            Some(Ok(WatchEvent::Modified(_)))
        ));

        let expired = leases
            .watch(&WatchParams::default(), &old_rv)
            .await
            .unwrap()
            .boxed()
            .next()
            .await
            .unwrap()
            .unwrap();
        match expired {
            WatchEvent::Error(status) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
            }
            other => panic!("expected 410 Expired, got {other:?}"),
        }
        // The watcher resumes, is told 410, relists, and sees the change it missed.
        loop {
            if let Some(Ok(watcher::Event::InitApply(lease))) = next_event(&mut events).await {
                assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("b"));
                break;
            }
        }
        assert_eq!(env.server.count("w", "list", "leases"), 2);
    })
    .await;
}

#[tokio::test]
async fn bookmarks_arrive_and_timeouts_end_watches() {
    let env = Env::new();
    bounded(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(env.client("a").await);
        let cm = cms
            .create(
                &PostParams::default(),
                &config_map("x", json!({}), json!({})),
            )
            .await
            .unwrap();
        let mut stream = cms
            .watch(&WatchParams::default(), &cm.resource_version().unwrap())
            .await
            .unwrap()
            .boxed();
        let other = env
            .server
            .create(json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "s" } }));
        match next_event(&mut stream).await.unwrap().unwrap() {
            // Bookmarks carry the latest resourceVersion, even of changes to other resources.
            WatchEvent::Bookmark(b) => assert_eq!(
                b.metadata.resource_version,
                other["metadata"]["resourceVersion"]
            ),
            other => panic!("expected a bookmark, got {other:?}"),
        }

        let started = Instant::now();
        let wp = WatchParams::default().timeout(1).disable_bookmarks();
        let mut short = cms
            .watch(&wp, &cm.resource_version().unwrap())
            .await
            .unwrap()
            .boxed();
        assert!(
            next_event(&mut short).await.is_none(),
            "the watch should end cleanly"
        );
        assert!(started.elapsed() >= Duration::from_millis(900));
    })
    .await;
}

#[tokio::test]
async fn latency_fault_delays_every_response_of_only_that_client() {
    const LATENCY: Duration = Duration::from_millis(300);
    let env = Env::new();
    bounded(async {
        let (slow, mut open) = watching(&env, "slow").await;
        let fast: Api<ConfigMap> = Api::default_namespaced(env.client("fast").await);
        let wp = WatchParams::default().disable_bookmarks();
        env.server.set_fault("slow", Fault::Latency(LATENCY));
        let started = Instant::now();
        slow.list(&ListParams::default()).await.unwrap();
        assert!(started.elapsed() >= LATENCY, "a list");
        let started = Instant::now();
        assert_eq!(api_error(slow.get("x").await).code, 404);
        assert!(started.elapsed() >= LATENCY, "an error");
        let started = Instant::now();
        let mut fresh = slow.watch(&wp, "0").await.unwrap().boxed();
        assert!(started.elapsed() >= LATENCY, "a watch's first bytes");

        // An event reaches both watches, the one opened before the fault too, late.
        let started = Instant::now();
        env.server.create(
            json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "x" } }),
        );
        for stream in [&mut open, &mut fresh] {
            let event = next_summary(stream).await;
            assert_eq!(event, ("ADDED".into(), "x".into()));
            assert!(started.elapsed() >= LATENCY, "an event");
        }
        let started = Instant::now();
        fast.list(&ListParams::default()).await.unwrap();
        assert!(started.elapsed() < LATENCY, "another client");
    })
    .await;
}

#[tokio::test]
async fn server_error_fault_answers_with_that_code() {
    let env = Env::new();
    bounded(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(env.client("a").await);
        env.server.set_fault("a", Fault::ServerError(503));
        let error = api_error(
            cms.create(
                &PostParams::default(),
                &config_map("x", json!({}), json!({})),
            )
            .await,
        );
        assert_eq!(
            (error.code, error.reason.as_str(), error.status.as_str()),
            (503, "ServiceUnavailable", "Failure")
        );
        assert!(env.server.get("v1", "configmaps", "default", "x").is_none());
        assert_eq!(env.server.requests("a"), 1);
        env.server.set_fault("a", Fault::None);
        cms.create(
            &PostParams::default(),
            &config_map("x", json!({}), json!({})),
        )
        .await
        .unwrap();
    })
    .await;
}

/// A request sent as is: the status, a header and the body, whatever they are.
async fn raw(client: &Client, path: &str, header: &str) -> (u16, String, String) {
    let request = hyper::Request::get(path)
        .body(kube::client::Body::empty())
        .unwrap();
    let response = client.send(request).await.unwrap();
    let code = response.status().as_u16();
    let value = response.headers().get(header).map(|v| v.to_str().unwrap());
    let value = value.unwrap_or_default().to_string();
    let body = response.into_body().collect_bytes().await.unwrap();
    (code, value, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn a_server_error_storm_fails_new_requests_while_open_watches_deliver() {
    let env = Env::new();
    bounded(async {
        let a = env.client("a").await;
        let cms: Api<ConfigMap> = Api::default_namespaced(a.clone());
        let other: Api<ConfigMap> = Api::default_namespaced(env.client("b").await);
        let wp = WatchParams::default().disable_bookmarks();
        let mut open = cms.watch(&wp, "0").await.unwrap().boxed();
        let path = "/api/v1/namespaces/default/configmaps/x";
        // The Status of each error as apimachinery builds it (and Retry-After when it says so).
        let etcd = "etcdserver: request timed out";
        let timeout = "request did not complete within requested timeout";
        let storms = [
            (500, json!({
                "reason": "InternalError", "message": format!("Internal error occurred: {etcd}"),
                "details": { "causes": [{ "message": etcd }] },
            })),
            (503, json!({
                "reason": "ServiceUnavailable",
                "message": "the server is currently unable to handle the request",
            })),
            (504, json!({
                "reason": "Timeout",
                "message": format!("Timeout: {timeout} - context deadline exceeded"),
                "details": {},
            })),
        ];
        for (code, mut want) in storms {
            env.server.set_fault("a", Fault::ServerError(code));
            let (got, retry_after, body) = raw(&a, path, "retry-after").await;
            let status: Value = serde_json::from_str(&body).unwrap();
            let common = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "code": code,
            });
            for (field, value) in common.as_object().unwrap() {
                want[field] = value.clone();
            }
            assert_eq!((got, retry_after.as_str(), &status), (code, "", &want));
            // New watches fail too; the one opened before goes on, served from the cache.
            let refused = cms.watch(&wp, "0").await.unwrap().boxed().next().await;
            let refused = refused.expect("the error");
            assert_eq!(api_error(refused.map(drop)).code, code);
            let name = format!("during-{code}");
            other
                .create(&PostParams::default(), &config_map(&name, json!({}), json!({})))
                .await
                .unwrap();
            let event = next_summary(&mut open).await;
            assert_eq!(event, ("ADDED".into(), name));
        }
        // APF sheds load with plain text and Retry-After, not a Status.
        env.server.set_fault("a", Fault::ServerError(429));
        let (code, retry_after, body) = raw(&a, path, "retry-after").await;
        assert_eq!(
            (code, retry_after.as_str(), body.as_str()),
            (429, "1", "Too many requests, please try again later.\n")
        );
        assert_eq!(api_error(cms.get("x").await).code, 429);
        env.server.delete("v1", "configmaps", "default", "during-500");
        let event = next_summary(&mut open).await;
        assert_eq!(event, ("DELETED".into(), "during-500".into()));

        env.server.set_fault("a", Fault::None);
        assert_eq!(api_error(cms.get("x").await).code, 404);
    })
    .await;
}

#[tokio::test]
async fn refuse_fault_fails_requests_quickly() {
    let env = Env::new();
    bounded(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(env.client("a").await);
        cms.list(&ListParams::default()).await.unwrap(); // leaves a pooled connection to be refused on
        env.server.set_fault("a", Fault::Refuse);
        let result = tokio::time::timeout(CLIENT_PATIENCE, cms.get("x"))
            .await
            .expect("refusal should be quick");
        assert!(dropped(&result), "{result:?}");
        assert!(env.server.count("a", "get", "configmaps") >= 1);
        env.server.set_fault("a", Fault::None);
        assert_eq!(api_error(cms.get("x").await).code, 404);
    })
    .await;
}

#[tokio::test]
async fn blackhole_fault_never_answers_nor_applies() {
    let env = Env::new();
    bounded(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(env.client("a").await);
        env.server.set_fault("a", Fault::Blackhole);
        let (pp, cm) = (PostParams::default(), config_map("x", json!({}), json!({})));
        let create = cms.create(&pp, &cm);
        assert!(
            tokio::time::timeout(CLIENT_PATIENCE, create).await.is_err(),
            "the client should give up"
        );
        assert_eq!(env.server.count("a", "create", "configmaps"), 1);
        assert!(env.server.get("v1", "configmaps", "default", "x").is_none());
        env.server.set_fault("a", Fault::None);
        cms.create(
            &PostParams::default(),
            &config_map("x", json!({}), json!({})),
        )
        .await
        .unwrap();
    })
    .await;
}

/// Whether a request failed because its connection was dropped (not answered).
fn dropped<T: std::fmt::Debug>(result: &kube::Result<T>) -> bool {
    matches!(
        result,
        Err(kube::Error::HyperError(_) | kube::Error::Service(_))
    )
}

/// A request a fault held, once the fault is lifted: its connection is dropped at once.
async fn assert_released<F, T>(held: F)
where
    F: Future<Output = kube::Result<T>>,
    T: std::fmt::Debug,
{
    let released = tokio::time::timeout(CLIENT_PATIENCE, held).await;
    assert!(
        dropped(released.as_ref().expect("released")),
        "{released:?}"
    );
}

/// Whether a watch was cut: it ended or failed rather than delivered.
async fn cut(watch: &mut ConfigMapWatch) -> bool {
    matches!(next_event(watch).await, None | Some(Err(_)))
}

#[tokio::test]
async fn a_black_hole_holds_requests_and_watches_open_until_lifted() {
    let env = Env::new();
    bounded(async {
        let (a, mut watch_a) = watching(&env, "a").await;
        let (b, mut watch_b) = watching(&env, "b").await;
        env.server.set_fault("a", Fault::Blackhole);
        env.server.create(
            json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "x" } }),
        );
        // Neither an answer nor a closed connection: the client's own timeout is all it gets.
        let get = a.get("x");
        tokio::pin!(get);
        let (held, silent) = tokio::join!(
            tokio::time::timeout(CLIENT_PATIENCE, &mut get),
            tokio::time::timeout(CLIENT_PATIENCE, watch_a.next()),
        );
        assert!(held.is_err(), "answered: {held:?}");
        assert!(silent.is_err(), "the watch delivered or ended: {silent:?}");
        assert_eq!(env.server.count("a", "get", "configmaps"), 1);
        // Another client is served, and so is its watch.
        assert_eq!(
            next_summary(&mut watch_b).await,
            ("ADDED".into(), "x".into())
        );
        b.get("x").await.unwrap();

        // Lifted: what it held is dropped, at once.
        env.server.set_fault("a", Fault::None);
        assert_released(get).await;
        assert!(cut(&mut watch_a).await);
        a.get("x").await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_rule_for_lease_updates_holds_only_them() {
    let env = Env::new();
    bounded(async {
        let leases: Api<Lease> = Api::default_namespaced(env.client("a").await);
        let cms: Api<ConfigMap> = Api::default_namespaced(env.client("a").await);
        env.server.create(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": "leader" }, "spec": { "holderIdentity": "a" },
        }));
        env.server.create(
            json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "x" } }),
        );
        let wp = WatchParams::default().disable_bookmarks();
        let mut watch = leases.watch(&wp, "0").await.unwrap().boxed();
        assert!(matches!(
            next_event(&mut watch).await,
            Some(Ok(WatchEvent::Added(_)))
        ));

        env.server
            .set_fault_on("a", Some("update"), Some("leases"), Fault::Blackhole);
        let lease = leases.get("leader").await.unwrap();
        let pp = PostParams::default();
        let put = leases.replace("leader", &pp, &lease);
        tokio::pin!(put);
        assert!(
            tokio::time::timeout(CLIENT_PATIENCE, &mut put)
                .await
                .is_err(),
            "the renewal should hang"
        );
        assert_eq!(env.server.count("a", "update", "leases"), 1);
        // The same client's other verbs on leases, and updates of other resources, answer.
        let patch = Patch::Merge(json!({ "spec": { "holderIdentity": "b" } }));
        leases
            .patch("leader", &PatchParams::default(), &patch)
            .await
            .unwrap();
        assert!(matches!(
            next_event(&mut watch).await,
            Some(Ok(WatchEvent::Modified(_)))
        ));
        let cm = cms.get("x").await.unwrap();
        cms.replace("x", &PostParams::default(), &cm).await.unwrap();

        // Lifted: the held PUT's connection is dropped; the watch goes on.
        env.server.clear_faults("a");
        assert_released(put).await;
        env.server.update_with(
            "coordination.k8s.io/v1",
            "leases",
            "default",
            "leader",
            |l| l["spec"]["holderIdentity"] = json!("c"),
        );
        assert!(matches!(
            next_event(&mut watch).await,
            Some(Ok(WatchEvent::Modified(_)))
        ));

        // A `None` rule exempts its kind from the client-wide fault.
        env.server.set_fault("a", Fault::ServerError(503));
        env.server.set_fault_on("a", Some("get"), None, Fault::None);
        leases.get("leader").await.unwrap();
        assert_eq!(
            api_error(leases.list(&ListParams::default()).await).code,
            503
        );
    })
    .await;
}

#[tokio::test]
async fn response_lost_fault_applies_the_write_but_never_answers() {
    let env = Env::new();
    bounded(async {
        let cms: Api<ConfigMap> = Api::default_namespaced(env.client("a").await);
        env.server.set_fault("a", Fault::ResponseLost);
        let (pp, cm) = (
            PostParams::default(),
            config_map("x", json!({}), json!({"k": "v"})),
        );
        let create = cms.create(&pp, &cm);
        assert!(
            tokio::time::timeout(CLIENT_PATIENCE, create).await.is_err(),
            "the client should give up"
        );
        let stored = env
            .server
            .get("v1", "configmaps", "default", "x")
            .expect("the write was applied");
        assert_eq!(stored["data"]["k"], "v");
        env.server.set_fault("a", Fault::None);
        let retry = api_error(
            cms.create(
                &PostParams::default(),
                &config_map("x", json!({}), json!({})),
            )
            .await,
        );
        assert_eq!(retry.reason, "AlreadyExists");
    })
    .await;
}

#[tokio::test]
async fn a_refusal_cuts_only_that_clients_watches() {
    let env = Env::new();
    bounded(async {
        let (_a, mut watch_a) = watching(&env, "a").await;
        let (_b, mut watch_b) = watching(&env, "b").await;
        env.server.set_fault("a", Fault::Refuse);
        assert!(cut(&mut watch_a).await, "a's watch should be cut");
        env.server.create(
            json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "x" } }),
        );
        assert_eq!(
            next_summary(&mut watch_b).await,
            ("ADDED".into(), "x".into())
        );
    })
    .await;
}

#[tokio::test]
async fn an_outage_black_holes_everyone_until_it_ends() {
    let env = Env::new();
    bounded(async {
        let (a, mut watch_a) = watching(&env, "a").await;
        let (b, mut watch_b) = watching(&env, "b").await;
        env.server.outage(true);
        env.server.create(
            json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "x" } }),
        );
        // Nothing is answered, delivered or closed, for anyone.
        let lp = ListParams::default();
        let list = a.list(&lp);
        tokio::pin!(list);
        let (held, silent_a, silent_b) = tokio::join!(
            tokio::time::timeout(CLIENT_PATIENCE, &mut list),
            tokio::time::timeout(CLIENT_PATIENCE, watch_a.next()),
            tokio::time::timeout(CLIENT_PATIENCE, watch_b.next()),
        );
        assert!(held.is_err(), "answered: {held:?}");
        assert!(
            silent_a.is_err() && silent_b.is_err(),
            "{silent_a:?} {silent_b:?}"
        );
        assert_eq!(env.server.count("a", "list", "configmaps"), 1);

        // Over: what it held is dropped, and everything works again.
        env.server.outage(false);
        assert_released(list).await;
        for stream in [&mut watch_a, &mut watch_b] {
            assert!(cut(stream).await);
        }
        let wp = WatchParams::default().disable_bookmarks();
        let mut watch = b.watch(&wp, "0").await.unwrap().boxed();
        assert_eq!(next_summary(&mut watch).await, ("ADDED".into(), "x".into()));
    })
    .await;
}

#[tokio::test]
async fn a_refusing_outage_cuts_every_watch_and_recovery_works() {
    let env = Env::new();
    bounded(async {
        let (a, mut watch_a) = watching(&env, "a").await;
        let (_b, mut watch_b) = watching(&env, "b").await;
        env.server.outage_refuse(true);
        for stream in [&mut watch_a, &mut watch_b] {
            assert!(cut(stream).await);
        }
        let result = tokio::time::timeout(CLIENT_PATIENCE, a.list(&ListParams::default())).await;
        assert!(
            matches!(result, Ok(Err(_))),
            "requests fail at once: {result:?}"
        );

        env.server.outage_refuse(false);
        a.create(
            &PostParams::default(),
            &config_map("x", json!({}), json!({})),
        )
        .await
        .unwrap();
    })
    .await;
}
