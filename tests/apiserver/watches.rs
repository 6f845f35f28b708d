//! Watches: selectors, resuming from a resource version, compaction (410) and relists,
//! bookmarks and timeouts.

use super::*;

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
