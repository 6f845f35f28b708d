//! Probes, `/pg/status` and `/metrics` against a real PostgreSQL 15: every state's answers,
//! a hung Postgres, the schema, promtool, custom queries, and no backend per request.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use support::{http_get, http_json, Sandbox};

const LONG: Duration = Duration::from_secs(60);
const FAST_MONITOR: &str = "[monitor]\ninterval = \"300ms\"\nquery_timeout = \"500ms\"\n";

fn wait_http(port: u16, path: &str, code: u16, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        if let Ok((c, body)) = http_get(port, path) {
            if c == code {
                return serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
            }
        }
        assert!(Instant::now() < deadline, "{path} never answered {code}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn validate_status(doc: &serde_json::Value) {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/status.schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}\n{doc}");
}

#[tokio::test]
async fn endpoints_answer_for_each_state() {
    let mut sb = Sandbox::new();
    sb.extra = format!(
        "{FAST_MONITOR}[supervision]\nbackoff_initial = \"4s\"\nbackoff_max = \"4s\"\n[shutdown]\nsmart_timeout = \"3s\"\n"
    );
    let mut warden = sb.start();
    let sp = sb.status_port;

    // From the first moment: the bootstrap (initdb) is visible and not ready.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + LONG;
    loop {
        if let Ok((code, body)) = http_get(sp, "/readyz") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let health = v["health"].as_str().unwrap().to_string();
            if health == "ready" {
                assert_eq!(code, 200);
                break;
            }
            assert_eq!(code, 503, "not ready while {health}");
            seen.insert(health);
        }
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(seen.contains("initializing"), "saw {seen:?}");

    // Ready primary.
    for (path, code) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/startupz", 200),
        ("/primary", 200),
        ("/replica", 503),
    ] {
        assert_eq!(http_get(sp, path).unwrap().0, code, "{path}");
    }
    let (code, doc) = http_json(sp, "/pg/status");
    assert_eq!(code, 200);
    assert_eq!(doc["health"], "ready");
    assert_eq!(doc["postgres"]["role"], "primary");
    assert_eq!(doc["postgres"]["timeline"], 1);
    assert!(doc["postgres"]["lsn"]["current"]
        .as_str()
        .unwrap()
        .contains('/'));
    assert_eq!(doc["postgres"]["archiver"]["ready_count"], 0);
    assert_eq!(doc["instance"], "pg-test");
    validate_status(&doc);
    // A standby lag bound does not concern a primary.
    assert_eq!(http_get(sp, "/readyz?lag=0").unwrap().0, 200);

    // Postgres killed: restarted at once (the first crash in the window), so in crash
    // recovery, or restarting after a backoff should that start fail while the killed
    // postmaster's children exit; alive, not ready, still started.
    let recovering = |h: &Value| h == "crash_recovery" || h == "restarting";
    let pid = sb.postmaster_pid().unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let v = wait_http(sp, "/readyz", 503, LONG);
    assert!(recovering(&v["health"]), "{v}");
    assert_eq!(http_get(sp, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(sp, "/startupz").unwrap().0, 200);
    assert_eq!(http_get(sp, "/primary").unwrap().0, 503);
    let (_, doc) = http_json(sp, "/pg/status");
    // A restart attempt may fail once more while the killed postmaster's children exit.
    assert!(doc["postmaster"]["crashes"].as_u64().unwrap() >= 1, "{doc}");
    if recovering(&doc["health"]) {
        assert!(doc["postgres"].is_null(), "{doc}");
    }
    validate_status(&doc);

    // Back after crash recovery.
    wait_http(sp, "/readyz", 200, LONG);
    let (_, doc) = http_json(sp, "/pg/status");
    assert!(doc["postmaster"]["starts"].as_u64().unwrap() >= 2, "{doc}");

    // Stopping: a smart shutdown held by a client.
    let idle = sb.wait_client(LONG).await;
    warden.signal(Signal::SIGTERM);
    let v = wait_http(sp, "/readyz", 503, LONG);
    assert_eq!(v["health"], "stopping", "{v}");
    assert_eq!(http_get(sp, "/healthz").unwrap().0, 200);
    assert_eq!(warden.wait_exit(LONG).code(), Some(0));
    drop(idle);
}

#[tokio::test]
async fn a_hung_postgres_makes_readyz_fail_while_probes_stay_fast() {
    let mut sb = Sandbox::new();
    sb.extra = FAST_MONITOR.into();
    let _warden = sb.start();
    let sp = sb.status_port;
    wait_http(sp, "/readyz", 200, LONG);

    let pm = sb.postmaster_pid().unwrap();
    let mut hung = vec![pm];
    hung.extend(support::descendants(pm));
    for p in &hung {
        let _ = kill(Pid::from_raw(*p), Signal::SIGSTOP);
    }
    let mut slowest = Duration::ZERO;
    let mut went_unready = None;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        for path in ["/readyz", "/healthz", "/metrics"] {
            let port = if path == "/metrics" {
                sb.metrics_port
            } else {
                sp
            };
            let t = Instant::now();
            let (code, _) = http_get(port, path).unwrap();
            let took = t.elapsed();
            if path != "/metrics" {
                slowest = slowest.max(took);
            }
            if path == "/healthz" {
                assert_eq!(code, 200, "a hung postgres is not a reason to kill the pod");
            }
            if path == "/readyz" && code == 503 && went_unready.is_none() {
                went_unready = Some(started.elapsed());
            }
        }
        if went_unready.is_some_and(|t| started.elapsed() > t + Duration::from_secs(2)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The status document says why.
    let mut doc = serde_json::Value::Null;
    for _ in 0..100 {
        doc = http_json(sp, "/pg/status").1;
        if doc["monitor"]["error"].is_string() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in &hung {
        let _ = kill(Pid::from_raw(*p), Signal::SIGCONT);
    }
    assert!(went_unready.is_some(), "readyz never turned 503");
    assert_eq!(doc["health"], "unresponsive", "{doc}");
    assert!(doc["monitor"]["error"].is_string(), "{doc}");
    assert!(slowest < Duration::from_secs(1), "a probe took {slowest:?}");
    wait_http(sp, "/readyz", 200, LONG);
}

#[tokio::test]
async fn metrics_pass_promtool_and_custom_queries_work_while_a_broken_one_is_reported() {
    let mut sb = Sandbox::new();
    let queries = sb.dir.path().join("queries.yaml");
    std::fs::write(
        &queries,
        r#"
custom:
  query: "SELECT 'x' AS tag, 42 AS answer, 7 AS events"
  metrics:
    - tag: {usage: LABEL, description: "a label"}
    - answer: {usage: GAUGE, description: "The answer"}
    - events: {usage: COUNTER, description: "Events so far"}
per_db:
  query: "SELECT current_database() AS datname, 1 AS present"
  target_databases: ["*"]
  metrics:
    - datname: {usage: LABEL, description: "database"}
    - present: {usage: GAUGE, description: "one per database"}
broken:
  query: "SELECT x FROM no_such_table"
  metrics:
    - x: {usage: GAUGE, description: "never"}
primary_only:
  query: "SELECT 1 AS on_primary"
  primary: true
  metrics:
    - on_primary: {usage: GAUGE, description: "runs on a primary"}
"#,
    )
    .unwrap();
    support::chown(&queries);
    sb.extra = format!(
        "{FAST_MONITOR}metrics_ttl = \"1s\"\nqueries_file = \"{}\"\n",
        queries.display()
    );
    let _warden = sb.start();
    wait_http(sb.status_port, "/readyz", 200, LONG);
    let client = sb.wait_client(LONG).await;
    client.batch_execute("CREATE DATABASE app").await.unwrap();
    // Scrapes answer from the cache and refresh it in the background once past the TTL.
    let deadline = Instant::now() + LONG;
    let text = loop {
        let (code, text) = http_get(sb.metrics_port, "/metrics").unwrap();
        assert_eq!(code, 200);
        if text.contains("database=\"app\"") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the new database never showed up"
        );
        std::thread::sleep(Duration::from_millis(300));
    };

    for needle in [
        "pgwarden_custom_answer{tag=\"x\"} 42",
        "pgwarden_custom_events_total{tag=\"x\"} 7",
        "pgwarden_per_db_present{database=\"postgres\",datname=\"postgres\"} 1",
        "pgwarden_per_db_present{database=\"app\",datname=\"app\"} 1",
        "pgwarden_primary_only_on_primary 1",
        "pgwarden_query_failing{database=\"\",query=\"broken\"} 1",
        "pgwarden_query_failing{database=\"\",query=\"custom\"} 0",
        "pgwarden_postgres_up 1",
        "pgwarden_postgres_role{role=\"primary\"} 1",
        "pgwarden_health_state{state=\"ready\"} 1",
        "pgwarden_postgres_database_xact_commit_total{datname=\"postgres\"}",
        "pgwarden_postgres_wal_ready_segments 0",
        "pgwarden_postgres_wal_directory_size_bytes",
        "pgwarden_postgres_checkpoints_timed_total",
        "pgwarden_postgres_wal_bytes_total",
        "pgwarden_postgres_locks_held{",
        "pgwarden_postgres_connections_backends{state=\"active\"}",
        "pgwarden_postgres_transactions_oldest_age_seconds",
        "pgwarden_build_info{",
        "pgwarden_postmaster_starts_total 1",
        "pgwarden_loop_duration_seconds_count{loop=\"monitor\"}",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }

    let file = sb.dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool (Debian package `prometheus`) must be installed");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn probes_and_scrapes_open_no_new_backends() {
    let mut sb = Sandbox::new();
    // A query timeout long enough that a loaded machine never makes the monitor reconnect.
    sb.extra =
        "[monitor]\ninterval = \"300ms\"\nquery_timeout = \"5s\"\nmetrics_ttl = \"50ms\"\n".into();
    let _warden = sb.start();
    wait_http(sb.status_port, "/readyz", 200, LONG);
    let client = sb.wait_client(LONG).await;
    // Let the first collection open what it keeps open.
    http_get(sb.metrics_port, "/metrics").unwrap();

    let backends = || async {
        client
            .query(
                "SELECT pid, backend_start::text FROM pg_stat_activity WHERE application_name LIKE 'pgwarden%' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
    };
    let connections_before: i64 = client
        .query_one("SELECT sum(numbackends)::bigint FROM pg_stat_database", &[])
        .await
        .unwrap()
        .get(0);
    let before = backends().await;
    assert_eq!(
        before.len(),
        1,
        "one persistent monitoring connection: {before:?}"
    );

    for i in 0..300 {
        let path = ["/healthz", "/readyz", "/startupz", "/primary", "/pg/status"][i % 5];
        assert!(http_get(sb.status_port, path).is_ok());
        if i % 15 == 0 {
            std::thread::sleep(Duration::from_millis(60)); // past the TTL: a real collection
            let (code, _) = http_get(sb.metrics_port, "/metrics").unwrap();
            assert_eq!(code, 200);
        }
    }
    let after = backends().await;
    assert_eq!(before, after, "the same backend, never a new one");
    let role: String = client
        .query_one(
            "SELECT usename::text FROM pg_stat_activity WHERE application_name = 'pgwarden-monitor'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(role, "pgwarden_monitor");
    let connections_after: i64 = client
        .query_one("SELECT sum(numbackends)::bigint FROM pg_stat_database", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(connections_before, connections_after);
}
