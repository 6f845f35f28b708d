//! The Kubernetes side against the project's test API server and a real PostgreSQL 15: spec
//! changes applied (or rejected with Postgres's message), restarts for restart-only
//! parameters, status entries and Pod labels, Secret rotation, bad specs, and API trouble.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use support::apiserver::{ApiServer, Fault};
use support::{http_json, Sandbox, Warden};

const LONG: Duration = Duration::from_secs(60);
const NS: &str = "default";
const CLUSTER: &str = "pg";
const PGC: (&str, &str) = ("pgwarden.dev/v1", "postgresclusters");

fn cluster(parameters: Value) -> Value {
    json!({
        "apiVersion": "pgwarden.dev/v1",
        "kind": "PostgresCluster",
        "metadata": {"name": CLUSTER, "namespace": NS},
        "spec": {
            "instances": 1,
            "postgresql": {"parameters": parameters},
            "secrets": {
                "superuser": {"name": "pg-superuser"},
                "replication": {"name": "pg-replication"}
            }
        }
    })
}

fn secret(name: &str, password: &str) -> Value {
    use base64_encode as b64;
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {"password": b64(password)}
    })
}

/// Standard base64, enough for test passwords.
fn base64_encode(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | (u32::from(c) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "pg"}},
        "spec": {"containers": [{"name": "postgres", "image": "pgwarden"}]}
    })
}

/// A cluster object, its Secrets and a Pod for `pods`.
fn seed(server: &ApiServer, parameters: Value, pods: &[&str], superuser_pw: &str) {
    server.create(secret("pg-superuser", superuser_pw));
    server.create(secret("pg-replication", "replication-secret-pw"));
    for p in pods {
        server.create(pod(p));
    }
    server.create(cluster(parameters));
}

/// Starts pgwarden as `pod` following the cluster, with its own API identity (token).
fn start(sb: &mut Sandbox, server: &ApiServer, pod: &str, extra: &str) -> Warden {
    sb.extra = format!(
        "[kubernetes]\ncluster = \"{CLUSTER}\"\nnamespace = \"{NS}\"\npod_name = \"{pod}\"\npod_ip = \"127.0.0.1\"\nstatus_interval = \"1s\"\napi_timeout = \"2s\"\n[monitor]\ninterval = \"300ms\"\nquery_timeout = \"500ms\"\n{extra}"
    );
    let kubeconfig = server.kubeconfig(sb.dir.path(), pod);
    support::chown(&kubeconfig);
    let mut cmd = std::process::Command::new(support::binary());
    cmd.arg("run")
        .arg("--config")
        .arg(sb.config())
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE");
    sb.spawn(cmd)
}

fn get_cluster(server: &ApiServer) -> Value {
    server
        .get(PGC.0, PGC.1, NS, CLUSTER)
        .expect("cluster exists")
}

fn set_spec(server: &ApiServer, f: impl FnOnce(&mut Value)) {
    server.update_with(PGC.0, PGC.1, NS, CLUSTER, |obj| f(&mut obj["spec"]));
}

fn entry(server: &ApiServer, pod: &str) -> Value {
    get_cluster(server)["status"]["instances"][pod].clone()
}

fn condition(server: &ApiServer, pod: &str, type_: &str) -> Value {
    entry(server, pod)["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or(Value::Null)
}

/// Polls `f` until it returns Some, panicking with `what` after `within`.
async fn eventually<T>(what: &str, within: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn show(port: u16, password: &str, param: &str) -> Option<String> {
    let c = support::connect_as(port, "postgres", password).await.ok()?;
    let row = c.query_one(&format!("SHOW {param}"), &[]).await.ok()?;
    Some(row.get(0))
}

/// Waits until `SHOW param` answers `value` (the superuser's password is the test default).
async fn wait_show(port: u16, param: &str, value: &str) {
    eventually(&format!("{param} = {value}"), LONG, async || {
        (show(port, support::PASSWORD, param).await? == value).then_some(())
    })
    .await;
}

/// Event notes with `reason` (events.k8s.io/v1).
fn events(server: &ApiServer, reason: &str) -> Vec<String> {
    server
        .list("events.k8s.io/v1", "events", NS)
        .into_iter()
        .filter(|e| e["reason"] == reason)
        .map(|e| e["note"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn spec_parameters_are_applied_rejected_with_postgres_message_and_restarted() {
    let server = ApiServer::start();
    seed(
        &server,
        json!({"work_mem": "8MB"}),
        &["pg-0"],
        support::PASSWORD,
    );
    let mut sb = Sandbox::new();
    let warden = start(&mut sb, &server, "pg-0", "");
    let port = sb.port;
    let pw = support::PASSWORD;

    wait_show(port, "work_mem", "8MB").await;

    set_spec(&server, |s| {
        s["postgresql"]["parameters"]["work_mem"] = json!("16MB")
    });
    wait_show(port, "work_mem", "16MB").await;
    eventually("ConfigApplied for generation 2", LONG, async || {
        let c = condition(&server, "pg-0", "ConfigApplied");
        (c["status"] == "True" && c["observedGeneration"] == 2).then_some(())
    })
    .await;

    // Rejected by Postgres: reported with its own message; the old value stays live.
    set_spec(&server, |s| {
        s["postgresql"]["parameters"]["work_mem"] = json!("lots")
    });
    let c = eventually("ConfigApplied=False", LONG, async || {
        let c = condition(&server, "pg-0", "ConfigApplied");
        (c["status"] == "False").then_some(c)
    })
    .await;
    let message = c["message"].as_str().unwrap();
    assert!(
        message.contains(r#"invalid value for parameter "work_mem": "lots""#),
        "{c}"
    );
    assert_eq!(c["reason"], "ConfigRejected");
    assert_eq!(c["observedGeneration"], 3);
    let notes = eventually("ConfigRejected event", LONG, async || {
        let n = events(&server, "ConfigRejected");
        (!n.is_empty()).then_some(n)
    })
    .await;
    assert!(
        notes[0].contains(r#"invalid value for parameter "work_mem""#),
        "{notes:?}"
    );
    assert_eq!(show(port, pw, "work_mem").await.unwrap(), "16MB");

    // A restart-only parameter: applied by a restart and reported.
    let pid_before = sb.postmaster_pid().unwrap();
    set_spec(&server, |s| {
        s["postgresql"]["parameters"] = json!({"work_mem": "16MB", "shared_buffers": "64MB"})
    });
    wait_show(port, "shared_buffers", "64MB").await;
    assert_ne!(
        sb.postmaster_pid().unwrap(),
        pid_before,
        "applied by a restart"
    );
    let c = eventually("PendingRestart=False/Restarted", LONG, async || {
        let c = condition(&server, "pg-0", "PendingRestart");
        (c["reason"] == "Restarted").then_some(c)
    })
    .await;
    assert!(
        c["message"].as_str().unwrap().contains("shared_buffers"),
        "{c}"
    );
    eventually("a Restarted Event", LONG, async || {
        events(&server, "Restarted")
            .iter()
            .any(|n| n.contains("shared_buffers"))
            .then_some(())
    })
    .await;
    drop(warden);
}

#[tokio::test]
async fn status_entries_and_pod_labels_follow_state_and_two_instances_keep_both_entries() {
    let server = ApiServer::start();
    seed(&server, json!({}), &["pg-0", "pg-1"], support::PASSWORD);
    set_spec(&server, |s| s["instances"] = json!(2));
    let mut a = Sandbox::new();
    let mut b = Sandbox::new();
    let _wa = start(&mut a, &server, "pg-0", "");
    let _wb = start(
        &mut b,
        &server,
        "pg-1",
        "[supervision]\nbackoff_initial = \"3s\"\nbackoff_max = \"3s\"\n",
    );

    eventually("both entries ready", LONG, async || {
        (entry(&server, "pg-0")["ready"] == true && entry(&server, "pg-1")["ready"] == true)
            .then_some(())
    })
    .await;
    // One of them initialised the cluster and leads; the other cloned it and streams.
    let (primary, replica) = if entry(&server, "pg-0")["role"] == "primary" {
        ("pg-0", "pg-1")
    } else {
        ("pg-1", "pg-0")
    };
    assert_eq!(entry(&server, replica)["role"], "replica");
    let e = entry(&server, primary);
    assert_eq!(e["role"], "primary");
    assert_eq!(e["health"], "ready");
    assert_eq!(e["address"], "127.0.0.1");
    assert_eq!(e["timeline"], 1);
    assert!(e["currentLsn"].as_str().unwrap().contains('/'));
    assert_eq!(e["pgwardenVersion"], env!("CARGO_PKG_VERSION"));
    assert!(e["lastReportTime"].as_str().unwrap().ends_with('Z'));
    for (p, role) in [(primary, "primary"), (replica, "replica")] {
        let labels = eventually("the Pod labels", LONG, async || {
            let labels = server.get("v1", "pods", NS, p)?["metadata"]["labels"].clone();
            (labels["pgwarden.dev/role"] == role).then_some(labels)
        })
        .await;
        assert_eq!(labels["pgwarden.dev/cluster"], CLUSTER, "{labels}");
        assert_eq!(labels["app"], "pg", "existing labels kept");
    }
    // A spec the API server let through but pgwarden refuses is reported; the running roles
    // and their labels stay (a typo must not take the Services' endpoints away).
    set_spec(&server, |s| {
        s["synchronous"] = json!({"mode": "quorum", "number": 2})
    });
    for p in ["pg-0", "pg-1"] {
        let c = eventually("SpecValid false", LONG, async || {
            let c = condition(&server, p, "SpecValid");
            (c["status"] == "False").then_some(c)
        })
        .await;
        assert!(
            c["message"]
                .as_str()
                .unwrap()
                .contains("spec.synchronous.number"),
            "{c}"
        );
    }
    let labels = server.get("v1", "pods", NS, primary).unwrap()["metadata"]["labels"].clone();
    assert_eq!(labels["pgwarden.dev/role"], "primary", "{labels}");
    set_spec(&server, |s| s["instances"] = json!(2));
    // pg-1's Postgres dies: an Event says so (every crash, even one restarted at once), its
    // entry recovers, pg-0's stays; never is either entry lost.
    let crashed = || {
        server
            .list("events.k8s.io/v1", "events", NS)
            .into_iter()
            .filter(|e| {
                e["reason"] == "PostgresCrashed"
                    && e["note"].as_str().is_some_and(|n| n.contains("pg-1"))
            })
            .count()
    };
    kill(Pid::from_raw(b.postmaster_pid().unwrap()), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let instances = get_cluster(&server)["status"]["instances"].clone();
        assert!(
            instances["pg-0"].is_object() && instances["pg-1"].is_object(),
            "{instances}"
        );
        if crashed() > 0 && instances["pg-1"]["ready"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(crashed() >= 1, "pg-1's crash reported");
    assert_eq!(entry(&server, "pg-1")["ready"], true, "and recovered");
}

#[tokio::test]
async fn api_outage_keeps_postgres_serving_and_changes_made_meanwhile_are_caught_up() {
    let server = ApiServer::start();
    seed(
        &server,
        json!({"work_mem": "8MB"}),
        &["pg-0"],
        support::PASSWORD,
    );
    let mut sb = Sandbox::new();
    let _w = start(&mut sb, &server, "pg-0", "");
    let (port, pw) = (sb.port, support::PASSWORD);
    wait_show(port, "work_mem", "8MB").await;

    // The API server is down (connections refused). Under a black hole a lone primary learns
    // of the outage only when its renewal times out, which can be too late for its renew
    // deadline: it then fences, safely (a known limit of the failsafe, see the README).
    server.outage_refuse(true);
    let started = Instant::now();
    // The spec changes while pgwarden cannot see it.
    set_spec(&server, |s| {
        s["postgresql"]["parameters"]["work_mem"] = json!("32MB")
    });
    let client = sb.wait_client(LONG).await;
    client
        .batch_execute("CREATE TABLE during_outage (v int)")
        .await
        .unwrap();
    let mut written = 0;
    while started.elapsed() < Duration::from_secs(30) {
        client
            .execute("INSERT INTO during_outage VALUES (1)", &[])
            .await
            .expect("postgres keeps serving");
        written += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, doc) = http_json(sb.status_port, "/pg/status");
    assert_eq!(doc["kubernetes"]["api"]["reachable"], false, "{doc}");
    assert_eq!(doc["health"], "ready");
    assert_eq!(show(port, pw, "work_mem").await.unwrap(), "8MB");
    server.outage(false);

    wait_show(port, "work_mem", "32MB").await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM during_outage", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, written);
    eventually("API reachable again", LONG, async || {
        (http_json(sb.status_port, "/pg/status").1["kubernetes"]["api"]["reachable"] == true)
            .then_some(())
    })
    .await;

    // 410 Gone: history compacted while the watch is cut; pgwarden relists and catches up.
    let lists_before = server.count("pg-0", "list", "postgresclusters");
    server.compact();
    server.set_fault("pg-0", Fault::Refuse);
    set_spec(&server, |s| {
        s["postgresql"]["parameters"]["work_mem"] = json!("48MB")
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.set_fault("pg-0", Fault::None);
    wait_show(port, "work_mem", "48MB").await;
    assert!(
        server.count("pg-0", "list", "postgresclusters") > lists_before,
        "a relist happened"
    );
}

#[tokio::test]
async fn secret_rotation_changes_passwords_and_never_shows_them() {
    let server = ApiServer::start();
    let first = "first-rotated-password-7f3a";
    let second = "second-rotated-password-9c1d";
    seed(&server, json!({}), &["pg-0"], first);
    let mut sb = Sandbox::new();
    let warden = start(&mut sb, &server, "pg-0", "");
    let port = sb.port;

    eventually("the Secret's password works", LONG, async || {
        support::connect_as(port, "postgres", first).await.ok()
    })
    .await;
    assert!(
        support::connect_as(port, "postgres", support::PASSWORD)
            .await
            .is_err(),
        "the initdb password no longer works"
    );
    eventually(
        "the replication role exists with its password",
        LONG,
        async || {
            support::connect_as(port, "streaming_replica", "replication-secret-pw")
                .await
                .ok()
        },
    )
    .await;

    server.update_with("v1", "secrets", NS, "pg-superuser", |s| {
        s["data"]["password"] = json!(base64_encode(second));
    });
    eventually("the rotated password works", LONG, async || {
        support::connect_as(port, "postgres", second).await.ok()
    })
    .await;
    assert!(
        support::connect_as(port, "postgres", first).await.is_err(),
        "the old password stops working"
    );

    let out = warden.output();
    for pw in [first, second, "replication-secret-pw"] {
        assert!(!out.contains(pw), "a password appeared in the logs");
        for e in server.list("events.k8s.io/v1", "events", NS) {
            assert!(
                !e.to_string().contains(pw),
                "a password appeared in an Event"
            );
        }
    }
    eventually("a PasswordChanged Event", LONG, async || {
        (!events(&server, "PasswordChanged").is_empty()).then_some(())
    })
    .await;
}

type SpecEdit = Box<dyn FnOnce(&mut Value)>;

#[tokio::test]
async fn bad_spec_input_is_rejected_and_nothing_running_is_disturbed() {
    let server = ApiServer::start();
    seed(
        &server,
        json!({"work_mem": "8MB"}),
        &["pg-0"],
        support::PASSWORD,
    );
    let mut sb = Sandbox::new();
    let _w = start(&mut sb, &server, "pg-0", "");
    let (port, pw) = (sb.port, support::PASSWORD);
    wait_show(port, "work_mem", "8MB").await;
    let pid = sb.postmaster_pid().unwrap();

    // Specs the schema admits (the API server refuses the others) and pgwarden does not.
    let cases: Vec<(SpecEdit, &str)> = vec![
        (
            Box::new(|s| s["postgresql"]["pgHba"] = json!(["nonsense"])),
            "spec.postgresql.pgHba[0]: \"nonsense\" must start with a connection type",
        ),
        (
            Box::new(|s| s["postgresql"]["parameters"] = json!({"port": 5999, "work_mem": "1MB"})),
            "spec.postgresql.parameters.port: may not be set by the user",
        ),
        (
            Box::new(|s| s["synchronous"] = json!({"mode": "quorum", "number": 1})),
            "spec.synchronous.number: 1 must be between 1 and instances - 1 (0)",
        ),
    ];
    for (change, expected) in cases {
        let before = get_cluster(&server)["spec"].clone();
        set_spec(&server, change);
        let generation = get_cluster(&server)["metadata"]["generation"].clone();
        let c = eventually(expected, LONG, async || {
            let c = condition(&server, "pg-0", "SpecValid");
            (c["observedGeneration"] == generation).then_some(c)
        })
        .await;
        assert_eq!(c["status"], "False", "{c}");
        assert!(c["message"].as_str().unwrap().contains(expected), "{c}");
        eventually("an InvalidSpec Event", LONG, async || {
            events(&server, "InvalidSpec")
                .iter()
                .any(|n| n.contains(expected))
                .then_some(())
        })
        .await;
        assert_eq!(show(port, pw, "work_mem").await.unwrap(), "8MB");
        assert_eq!(sb.postmaster_pid().unwrap(), pid, "postgres untouched");
        set_spec(&server, move |s| *s = before);
    }
}

#[tokio::test]
async fn custom_queries_come_from_the_clusters_configmap_and_a_broken_file_is_reported() {
    let server = ApiServer::start();
    seed(&server, json!({}), &["pg-0"], support::PASSWORD);
    server.create(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "pg-monitoring", "namespace": NS},
        "data": {"queries.yaml": "from_cm:\n  query: \"SELECT 7 AS answer\"\n  metrics:\n    - answer: {usage: GAUGE, description: \"from a ConfigMap\"}\n"}
    }));
    set_spec(
        &server,
        |s| {
            s["monitoring"] =
                json!({"customQueries": {"name": "pg-monitoring", "key": "queries.yaml"}})
        },
    );
    let mut sb = Sandbox::new();
    let _w = start(&mut sb, &server, "pg-0", "metrics_ttl = \"200ms\"\n");
    let mp = sb.metrics_port;
    eventually("the ConfigMap's metric", LONG, async || {
        let (_, text) = support::http_get(mp, "/metrics").ok()?;
        text.contains("pgwarden_from_cm_answer 7").then_some(())
    })
    .await;

    server.update_with("v1", "configmaps", NS, "pg-monitoring", |cm| {
        cm["data"]["queries.yaml"] = json!("from_cm: [not, a, query");
    });
    let c = eventually("CustomQueriesLoaded=False", LONG, async || {
        let c = condition(&server, "pg-0", "CustomQueriesLoaded");
        (c["status"] == "False").then_some(c)
    })
    .await;
    assert!(
        c["message"].as_str().unwrap().contains("pg-monitoring"),
        "{c}"
    );
    // The queries in use stay.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, text) = support::http_get(mp, "/metrics").unwrap();
    assert!(text.contains("pgwarden_from_cm_answer 7"));
}
