//! Objects: create, get, list, replace and delete by the API conventions, patches, the status
//! subresource and generation, label and field selectors.

use super::*;

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
