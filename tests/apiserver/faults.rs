//! The faults of real networks, seen from the client: latency, 5xx/429 storms, refusals, black
//! holes (per client and per request kind), lost responses, outages.

use super::*;

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
