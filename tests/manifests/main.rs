//! The deployment files in `config/`: every YAML parses; every manifest names only fields
//! Kubernetes has (k8s-openapi types, the generated CRD's schema); the StatefulSet agrees with
//! what pgwarden serves, the image and the other manifests; the kustomizations list every file;
//! the PodMonitor and PrometheusRule are well formed; every alert passes `promtool test rules`;
//! the alerts and the dashboard query only metrics pgwarden exports.

#[path = "../support/mod.rs"]
mod support;

mod fields;
mod kustomize;
mod monitoring;
mod statefulset;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config_dir() -> PathBuf {
    root().join("config")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `*.yaml` / `*.yml` under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a YAML file, as JSON values (empty documents left out).
fn documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .enumerate()
        .filter_map(|(i, doc)| {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} document {i}: {e}", path.display()));
            (!v.is_null()).then_some(v)
        })
        .collect()
}

fn single(path: &Path) -> Value {
    let mut docs = documents(path);
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

/// A Kubernetes object found in `config/`.
#[derive(Clone)]
struct Manifest {
    file: PathBuf,
    value: Value,
}

impl Manifest {
    fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or("")
    }
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// Every document with a `kind` in every YAML file under `config/`.
fn manifests() -> Vec<Manifest> {
    yaml_files(&config_dir())
        .into_iter()
        .flat_map(|file| {
            documents(&file)
                .into_iter()
                .filter(|v| v.get("kind").is_some())
                .map(move |value| Manifest {
                    file: file.clone(),
                    value,
                })
        })
        .collect()
}

fn find(all: &[Manifest], kind: &str, name: &str) -> Manifest {
    let found: Vec<&Manifest> = all
        .iter()
        .filter(|m| m.kind() == kind && (name.is_empty() || m.name() == name))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind} {name:?} expected");
    found[0].clone()
}

/// Deserialises into the k8s-openapi type (so required fields and value types are checked), then
/// reports every field of the original that the typed value does not carry: an unknown (or
/// misplaced, or misspelt) field, which k8s-openapi would otherwise drop silently.
fn typed<T>(m: &Manifest) -> T
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let t: T = serde_path_to_error::deserialize(m.value.clone()).unwrap_or_else(|e| {
        panic!(
            "{} {} {}: {}: {}",
            m.file.display(),
            m.kind(),
            m.name(),
            e.path(),
            e.inner()
        )
    });
    let back = serde_json::to_value(&t).unwrap();
    let mut problems = Vec::new();
    compare(&m.value, &back, String::new(), &mut problems);
    assert!(
        problems.is_empty(),
        "{} {} {}: fields Kubernetes does not have:\n  {}",
        m.file.display(),
        m.kind(),
        m.name(),
        problems.join("\n  ")
    );
    t
}

fn compare(original: &Value, typed: &Value, path: String, problems: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                let p = format!("{path}.{k}");
                match t.get(k) {
                    _ if v.is_null() => {}
                    Some(tv) => compare(v, tv, p, problems),
                    None => problems.push(format!("{p} (unknown field)")),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) if o.len() == t.len() => {
            for (i, (ov, tv)) in o.iter().zip(t).enumerate() {
                compare(ov, tv, format!("{path}[{i}]"), problems);
            }
        }
        (o, t) if o == t => {}
        (Value::Number(o), Value::Number(t)) if o.as_f64() == t.as_f64() => {}
        (o, t) => problems.push(format!("{path}: {o} reads as {t}")),
    }
}

/// What `pgwarden check-config` prints for the given environment: the configuration as
/// pgwarden understands it (an unknown key or bad value fails).
fn check_config(env: &BTreeMap<String, String>) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .arg("check-config")
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "pgwarden refuses the StatefulSet's environment {env:?}:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `key: value` from check-config's output (Rust's pretty Debug), the first one found; the
/// value of an `Option` that is `Some` is on the next line.
fn setting<'a>(text: &'a str, key: &str) -> &'a str {
    let mut lines = text.lines().map(str::trim);
    let value = lines
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in check-config's output:\n{text}"));
    let value = if value == "Some(" {
        lines.next().unwrap()
    } else {
        value
    };
    value.trim_end_matches(',')
}

fn port_of(listen: &str) -> i32 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn container_port(c: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no container port named {name}"))
                .container_port
        }
    }
}

/// A real pgwarden with the example ConfigMap's custom queries: the StatefulSet's probe paths
/// and the PodMonitor's path answer, and every custom query runs.
#[tokio::test]
async fn pgwarden_serves_the_manifests_paths_and_runs_the_example_queries() {
    let all = manifests();
    let cm = find(&all, "ConfigMap", "pg-monitoring");
    let queries_yaml = cm.value["data"]["queries.yaml"].as_str().unwrap();
    let queries: BTreeMap<String, Value> = serde_norway::from_str(queries_yaml).unwrap();

    let mut sb = support::Sandbox::new();
    let file = sb.dir.path().join("queries.yaml");
    std::fs::write(&file, queries_yaml).unwrap();
    support::chown(&file);
    sb.extra = format!(
        "[monitor]\ninterval = \"300ms\"\nmetrics_ttl = \"50ms\"\nqueries_file = \"{}\"\n",
        file.display()
    );
    let _warden = sb.start();
    let client = sb.wait_client(Duration::from_secs(60)).await;
    client
        .batch_execute(
            "CREATE TABLE accounts (id int primary key); INSERT INTO accounts VALUES (1)",
        )
        .await
        .unwrap();

    let sts: StatefulSet = typed(&find(&all, "StatefulSet", "pg"));
    let c = sts.spec.unwrap().template.spec.unwrap().containers[0].clone();
    let paths: Vec<String> = [&c.startup_probe, &c.liveness_probe, &c.readiness_probe]
        .iter()
        .map(|p| {
            p.as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .clone()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    for path in &paths {
        loop {
            let code = support::http_get(sb.status_port, path)
                .map(|(c, _)| c)
                .unwrap_or(0);
            if code == 200 {
                break;
            }
            assert_ne!(code, 404, "pgwarden does not serve {path}");
            assert!(Instant::now() < deadline, "{path} answers {code}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    let pm = find(&all, "PodMonitor", "pgwarden");
    let metrics_path = pm.value["spec"]["podMetricsEndpoints"][0]["path"]
        .as_str()
        .unwrap();
    let wanted = "pgwarden_pg_stat_user_tables_n_live_tup{";
    let body = loop {
        let (code, body) = support::http_get(sb.metrics_port, metrics_path).unwrap();
        assert_eq!(code, 200, "{metrics_path}");
        if body.contains(wanted) {
            break body;
        }
        assert!(Instant::now() < deadline, "no {wanted} in:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for query in queries.keys() {
        let failing = body.lines().any(|l| {
            (l.starts_with("pgwarden_query_failing{")
                || l.starts_with("pgwarden_query_errors_total{"))
                && l.contains(&format!("query=\"{query}\""))
                && !l.ends_with(" 0")
        });
        assert!(!failing, "the example query {query} fails:\n{body}");
    }
}
