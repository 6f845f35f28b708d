//! The deployment files in `config/`: every YAML parses; every manifest names only fields
//! Kubernetes has (k8s-openapi types, the generated CRD's schema); the StatefulSet agrees with
//! what pgwarden serves, the image and the other manifests; the kustomizations list every file;
//! the PodMonitor and PrometheusRule are well formed; every alert passes `promtool test rules`;
//! the alerts and the dashboard query only metrics pgwarden exports.

mod support;

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

/// The manifests whose kinds k8s-openapi knows, checked field by field.
#[test]
fn every_manifest_names_only_fields_kubernetes_has() {
    let all = manifests();
    let mut kinds = BTreeSet::new();
    for m in &all {
        kinds.insert(m.kind().to_string());
        match (m.api_version(), m.kind()) {
            ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(m)),
            ("v1", "Secret") => drop(typed::<Secret>(m)),
            ("v1", "ConfigMap") => drop(typed::<ConfigMap>(m)),
            ("v1", "Service") => drop(typed::<Service>(m)),
            ("apps/v1", "StatefulSet") => drop(typed::<StatefulSet>(m)),
            ("policy/v1", "PodDisruptionBudget") => drop(typed::<PodDisruptionBudget>(m)),
            ("rbac.authorization.k8s.io/v1", "Role") => drop(typed::<Role>(m)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => drop(typed::<RoleBinding>(m)),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                drop(typed::<CustomResourceDefinition>(m))
            }
            // Checked against the CRD, by hand, and as kustomizations by the tests below.
            ("pgwarden.dev/v1", "PostgresCluster")
            | ("monitoring.coreos.com/v1", "PodMonitor" | "PrometheusRule")
            | ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {}
            (api, kind) => panic!("{}: unexpected {api} {kind}", m.file.display()),
        }
        if m.kind() != "Kustomization" {
            assert!(
                !m.name().is_empty(),
                "{}: no metadata.name",
                m.file.display()
            );
            assert!(
                m.value["metadata"].get("namespace").is_none(),
                "{}: {} {} sets a namespace; the manifests deploy into the current one",
                m.file.display(),
                m.kind(),
                m.name()
            );
        }
    }
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Secret",
        "ConfigMap",
        "PostgresCluster",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "PodMonitor",
        "PrometheusRule",
        "Kustomization",
    ] {
        assert!(kinds.contains(kind), "no {kind} in config/");
    }
}

/// kubectl reads YAML 1.1, where a bare `off`, `yes` or `0440` is a boolean or an octal number;
/// serde_norway (YAML 1.2) reads them as a string and a decimal. Such values must be quoted (or
/// written in decimal) so that both read the same.
#[test]
fn no_value_reads_differently_in_yaml_1_1() {
    const BOOLEANS: [&str; 6] = ["y", "n", "yes", "no", "on", "off"];
    let mut found = Vec::new();
    for file in yaml_files(&config_dir()) {
        // Generated by `pgwarden crd` (serde_norway writes `off` bare); `kubectl apply -k` reads it
        // through kustomize, which reads YAML 1.2 and quotes such values before kubectl sees them.
        if file.ends_with("config/crd.yaml") {
            continue;
        }
        for (i, line) in read(&file).lines().enumerate() {
            let code = line.split(" #").next().unwrap().trim();
            let value = match code.split_once(": ") {
                Some((_, value)) => value,
                None => match code.strip_prefix("- ") {
                    Some(item) => item,
                    None => continue,
                },
            }
            .trim();
            let octal = value.len() > 1
                && value.starts_with('0')
                && value.chars().all(|c| c.is_ascii_digit());
            if octal || BOOLEANS.contains(&value.to_ascii_lowercase().as_str()) {
                found.push(format!("{}:{}: {line}", file.display(), i + 1));
            }
        }
    }
    assert!(found.is_empty(), "quote these values: {found:#?}");
}

/// Kubernetes prunes (or, with strict field validation, refuses) fields a structural schema
/// does not declare; report them as the API server would.
fn undeclared_fields(schema: &Value, value: &Value, path: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
                return;
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (k, v) in map {
                let p = format!("{path}.{k}");
                match (props.and_then(|p| p.get(k)), additional) {
                    (Some(s), _) => undeclared_fields(s, v, p, out),
                    (None, Some(s)) if s.is_object() => undeclared_fields(s, v, p, out),
                    (None, Some(Value::Bool(true))) => {}
                    // The API server's own: the type and an ObjectMeta.
                    (None, _)
                        if path.is_empty()
                            && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) => {}
                    (None, _) => out.push(p),
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    undeclared_fields(s, v, format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

#[test]
fn the_example_postgres_cluster_matches_the_generated_crd() {
    let all = manifests();
    let crd: CustomResourceDefinition = typed(&find(
        &all,
        "CustomResourceDefinition",
        "postgresclusters.pgwarden.dev",
    ));
    let cluster = find(&all, "PostgresCluster", "");
    let (group, version) = cluster.api_version().split_once('/').unwrap();
    assert_eq!(crd.spec.group, group);
    assert_eq!(crd.spec.names.kind, cluster.kind());
    let served = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == version && v.served)
        .expect("the CRD serves the example's version");
    let schema = serde_json::to_value(
        served
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("an openAPIV3Schema"),
    )
    .unwrap();

    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&cluster.value)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "cluster.yaml against the CRD: {errors:#?}"
    );
    let mut undeclared = Vec::new();
    undeclared_fields(&schema, &cluster.value, String::new(), &mut undeclared);
    assert!(
        undeclared.is_empty(),
        "cluster.yaml: fields the CRD does not declare: {undeclared:?}"
    );

    // The CEL rule of the schema (not evaluated by the JSON Schema validator).
    let f = &cluster.value["spec"]["failover"];
    let n = |k: &str| f[k].as_u64().unwrap();
    assert!(n("renewDeadlineSeconds") + n("retryPeriodSeconds") < n("leaseDurationSeconds"));
    // Zero data loss in the example: quorum commit over the standbys (instances - 1 of them).
    let sync = &cluster.value["spec"]["synchronous"];
    assert_eq!(sync["mode"], "quorum");
    let number = sync["number"].as_u64().unwrap();
    let instances = cluster.value["spec"]["instances"].as_u64().unwrap();
    assert!((1..instances).contains(&number), "{sync}");
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

fn unquote(s: &str) -> &str {
    s.trim_matches('"')
}

fn seconds(s: &str) -> u64 {
    s.strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{s} is not whole seconds"))
}

fn port_of(listen: &str) -> i32 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

/// The image's environment defaults (`ENV` in docker/Dockerfile) and user.
fn dockerfile() -> (BTreeMap<String, String>, String) {
    let text = read(&root().join("docker/Dockerfile"));
    // The ENV instructions, with their continuation lines.
    let mut env = BTreeMap::new();
    let mut in_env = false;
    for line in text.lines() {
        if line.starts_with("ENV ") {
            in_env = true;
        }
        if in_env {
            for word in line.split_whitespace() {
                if let Some((k, v)) = word.split_once('=') {
                    if k.starts_with("PGWARDEN_") {
                        env.insert(k.to_string(), v.to_string());
                    }
                }
            }
            in_env = line.trim_end().ends_with('\\');
        }
    }
    let users: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .map(|u| u.trim().to_string())
        .collect();
    assert_eq!(users.len(), 1, "one USER in the Dockerfile: {users:?}");
    (env, users.into_iter().next().unwrap())
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

/// Is `path` inside `dir` (or `dir` itself)?
fn under(path: &str, dir: &str) -> bool {
    Path::new(path).starts_with(dir)
}

#[test]
fn the_statefulset_agrees_with_pgwarden_the_image_and_the_other_manifests() {
    let all = manifests();
    let sts: StatefulSet = typed(&find(&all, "StatefulSet", "pg"));
    let cluster = find(&all, "PostgresCluster", "");
    let spec = sts.spec.as_ref().unwrap();
    let sts_name = sts.metadata.name.clone().unwrap();
    let replicas = spec.replicas.unwrap();
    assert_eq!(
        i64::from(replicas),
        cluster.value["spec"]["instances"].as_i64().unwrap(),
        "StatefulSet replicas and PostgresCluster instances"
    );
    let template = spec.template.metadata.as_ref().unwrap();
    let pod_labels = template.labels.clone().unwrap();
    let selector = spec.selector.match_labels.clone().unwrap();
    assert!(labels_match(&selector, &pod_labels), "selector vs template");
    assert!(
        !pod_labels.contains_key("pgwarden.dev/role")
            && !selector.contains_key("pgwarden.dev/role"),
        "pgwarden owns the role label"
    );
    assert_eq!(
        pod_labels.get("pgwarden.dev/cluster").map(String::as_str),
        Some(cluster.name())
    );

    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert!(
        c.command.is_none() && c.args.is_none(),
        "the image's entrypoint (pgwarden run) must run as it is"
    );
    let script = read(&root().join("docker/build-offline.sh"));
    let default_image = script
        .lines()
        .find_map(|l| l.strip_prefix("image="))
        .expect("the offline script's default image tag");
    assert_eq!(c.image.as_deref(), Some(default_image));
    assert_eq!(pod.enable_service_links, Some(false));

    // The environment: downward API, the cluster, and keys pgwarden accepts.
    let mut env = BTreeMap::new();
    for e in c.env.iter().flatten() {
        match (&e.value, &e.value_from) {
            (Some(v), None) => {
                env.insert(e.name.clone(), v.clone());
            }
            (None, Some(from)) => {
                let field = &from.field_ref.as_ref().expect("a fieldRef").field_path;
                let expected = match e.name.as_str() {
                    "POD_NAME" => "metadata.name",
                    "POD_NAMESPACE" => "metadata.namespace",
                    "POD_IP" => "status.podIP",
                    other => panic!("unexpected variable from the downward API: {other}"),
                };
                assert_eq!(field, expected, "{}", e.name);
                let example = match e.name.as_str() {
                    "POD_NAME" => "pg-0",
                    "POD_NAMESPACE" => "default",
                    _ => "10.0.0.7",
                };
                env.insert(e.name.clone(), example.to_string());
            }
            _ => panic!("{}: a value or a fieldRef", e.name),
        }
    }
    for var in ["POD_NAME", "POD_NAMESPACE", "POD_IP"] {
        assert!(env.contains_key(var), "{var} missing");
    }
    assert_eq!(
        env.get("PGWARDEN_KUBERNETES__CLUSTER").map(String::as_str),
        Some(cluster.name())
    );
    let (image_env, image_user) = dockerfile();
    let mut effective = image_env.clone();
    effective.extend(env.clone());
    // The pod's host name is its name, which pgwarden takes as instance_name.
    effective.insert("PGWARDEN_INSTANCE_NAME".into(), format!("{sts_name}-0"));
    let conf = check_config(&effective);
    let status_port = port_of(setting(&conf, "status_listen"));
    let metrics_port = port_of(setting(&conf, "metrics_listen"));
    let pg_port: i32 = setting(&conf, "port").parse().unwrap();
    let data_dir = unquote(setting(&conf, "data_dir")).to_string();
    let run_dir = unquote(setting(&conf, "run_dir")).to_string();
    let password_file = unquote(setting(&conf, "superuser_password_file")).to_string();
    let shutdown: u64 = ["smart_timeout", "fast_timeout", "immediate_timeout"]
        .iter()
        .map(|k| seconds(setting(&conf, k)))
        .sum();

    // Ports and probes.
    let named = |name: &str| container_port(c, &IntOrString::String(name.into()));
    assert_eq!(named("postgres"), pg_port);
    assert_eq!(named("status"), status_port);
    assert_eq!(named("metrics"), metrics_port);
    for (probe, path) in [
        (&c.startup_probe, "/startupz"),
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let probe = probe
            .as_ref()
            .unwrap_or_else(|| panic!("no probe for {path}"));
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(container_port(c, &get.port), status_port, "{path}");
        let period = probe.period_seconds.unwrap();
        let timeout = probe.timeout_seconds.unwrap();
        assert!(
            (1..=period.max(3)).contains(&timeout),
            "{path}: timeout {timeout}"
        );
        assert!((1..=10).contains(&period), "{path}: period {period}");
    }
    let startup = c.startup_probe.as_ref().unwrap();
    assert!(
        startup.period_seconds.unwrap() * startup.failure_threshold.unwrap() >= 120,
        "the startup probe must leave a first start time"
    );
    let grace = pod.termination_grace_period_seconds.unwrap() as u64;
    assert!(
        (shutdown + 2..=shutdown + 30).contains(&grace),
        "terminationGracePeriodSeconds {grace} vs pgwarden's {shutdown} s of shutdown"
    );

    // Security context: the image's user.
    let psc = pod.security_context.as_ref().unwrap();
    let (uid, gid) = image_user.split_once(':').expect("a numeric USER uid:gid");
    assert_eq!(psc.run_as_user.map(|u| u.to_string()).as_deref(), Some(uid));
    assert_eq!(
        psc.run_as_group.map(|g| g.to_string()).as_deref(),
        Some(gid)
    );
    assert_eq!(psc.fs_group.map(|g| g.to_string()).as_deref(), Some(gid));
    assert_eq!(psc.run_as_non_root, Some(true));

    // Volumes: the data directory is a subdirectory of the claim's mount, and with a read-only
    // root file system everything pgwarden and Postgres write is on a writable volume; the run
    // directory below a mount (pgwarden sets its mode, which it cannot on a mount's root).
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let mount_of = |path: &str| {
        mounts
            .iter()
            .filter(|m| under(path, &m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{path} is on no volume"))
            .clone()
    };
    let data = mount_of(&data_dir);
    assert_ne!(
        data.mount_path, data_dir,
        "data_dir must be below the volume's root"
    );
    let claims = spec.volume_claim_templates.clone().unwrap_or_default();
    assert!(claims
        .iter()
        .any(|t| t.metadata.name.as_deref() == Some(data.name.as_str())));
    let csc = c.security_context.as_ref().unwrap();
    if csc.read_only_root_filesystem == Some(true) {
        for dir in [&data_dir, &run_dir, "/tmp"] {
            assert_ne!(
                mount_of(dir).read_only,
                Some(true),
                "{dir} must be writable"
            );
        }
        assert_ne!(mount_of(&run_dir).mount_path, run_dir);
    }
    let volumes = pod.volumes.clone().unwrap_or_default();

    // The superuser password: the Secret the cluster names, mounted where pgwarden reads it.
    let su = &cluster.value["spec"]["secrets"]["superuser"];
    let su_name = su["name"].as_str().unwrap();
    let su_key = su["key"].as_str().unwrap_or("password");
    let pw_mount = mount_of(&password_file);
    let pw_volume = volumes.iter().find(|v| v.name == pw_mount.name).unwrap();
    let secret = pw_volume.secret.as_ref().expect("a Secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some(su_name));
    let item = secret
        .items
        .iter()
        .flatten()
        .find(|i| i.key == su_key)
        .expect("the key is mounted");
    assert_eq!(
        Path::new(&pw_mount.mount_path).join(&item.path),
        Path::new(&password_file)
    );

    // The Secrets and the ConfigMap the cluster names exist, with their keys.
    for which in ["superuser", "replication"] {
        let s = &cluster.value["spec"]["secrets"][which];
        let secret: Secret = typed(&find(&all, "Secret", s["name"].as_str().unwrap()));
        let key = s["key"].as_str().unwrap_or("password");
        assert!(
            secret.string_data.iter().flatten().any(|(k, _)| k == key)
                || secret.data.iter().flatten().any(|(k, _)| k == key),
            "Secret {} has no key {key}",
            s["name"]
        );
    }
    let cq = &cluster.value["spec"]["monitoring"]["customQueries"];
    let cm: ConfigMap = typed(&find(&all, "ConfigMap", cq["name"].as_str().unwrap()));
    assert!(cm.data.unwrap().contains_key(cq["key"].as_str().unwrap()));

    // RBAC: the Pod's service account, and the names config/rbac.yaml pins.
    let sa: ServiceAccount = typed(&find(&all, "ServiceAccount", ""));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let binding: RoleBinding = typed(&find(&all, "RoleBinding", ""));
    let role: Role = typed(&find(&all, "Role", ""));
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    assert!(binding
        .subjects
        .iter()
        .flatten()
        .any(|s| s.kind == "ServiceAccount" && Some(&s.name) == sa.metadata.name.as_ref()));
    let names_for = |resource: &str| -> BTreeSet<String> {
        role.rules
            .iter()
            .flatten()
            .filter(|r| r.resources.iter().flatten().any(|x| x == resource))
            .flat_map(|r| r.resource_names.clone().unwrap_or_default())
            .collect()
    };
    let pods: BTreeSet<String> = (0..replicas).map(|i| format!("{sts_name}-{i}")).collect();
    assert_eq!(names_for("pods"), pods, "the Role's Pod names");
    let secrets = names_for("secrets");
    for which in ["superuser", "replication"] {
        let name = cluster.value["spec"]["secrets"][which]["name"]
            .as_str()
            .unwrap();
        assert!(secrets.contains(name), "the Role cannot read Secret {name}");
    }
    // TLS: the cluster CA is read by name and created (create-only) by the first instance;
    // no rule updates or deletes a Secret.
    assert!(secrets.contains(&format!("{}-ca", cluster.name())));
    let secret_verbs: BTreeSet<String> = role
        .rules
        .iter()
        .flatten()
        .filter(|r| r.resources.iter().flatten().any(|x| x == "secrets"))
        .flat_map(|r| r.verbs.clone())
        .collect();
    let expected: BTreeSet<String> = ["create", "get", "list", "watch"].map(String::from).into();
    assert_eq!(secret_verbs, expected);
    assert!(names_for("configmaps").contains(cq["name"].as_str().unwrap()));
    assert!(names_for("leases").contains(&format!("{}-leader", cluster.name())));

    // Anti-affinity over nodes, for these pods.
    let anti = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .expect("pod anti-affinity");
    let terms: Vec<_> = anti
        .preferred_during_scheduling_ignored_during_execution
        .iter()
        .flatten()
        .map(|w| w.pod_affinity_term.clone())
        .chain(
            anti.required_during_scheduling_ignored_during_execution
                .iter()
                .flatten()
                .cloned(),
        )
        .collect();
    assert!(terms.iter().any(|t| {
        t.topology_key == "kubernetes.io/hostname"
            && t.label_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(|s| labels_match(s, &pod_labels))
    }));

    // The disruption budget covers these pods.
    let pdb: PodDisruptionBudget = typed(&find(&all, "PodDisruptionBudget", ""));
    let pdb_spec = pdb.spec.unwrap();
    assert!(labels_match(
        &pdb_spec.selector.unwrap().match_labels.unwrap(),
        &pod_labels
    ));
    assert_eq!(pdb_spec.max_unavailable, Some(IntOrString::Int(1)));

    // Services: rw and ro by the role label pgwarden sets, the headless one for the pod names.
    let service = |name: &str| -> Service { typed(&find(&all, "Service", name)) };
    let role_labelled = |role: &str| {
        let mut l = pod_labels.clone();
        l.insert("pgwarden.dev/role".into(), role.into());
        l
    };
    for (name, role) in [
        (format!("{}-rw", cluster.name()), "primary"),
        (format!("{}-ro", cluster.name()), "replica"),
    ] {
        let s = service(&name).spec.unwrap();
        let sel = s.selector.unwrap();
        assert_eq!(sel.get("pgwarden.dev/role").map(String::as_str), Some(role));
        assert!(
            labels_match(&sel, &role_labelled(role)),
            "{name} selects the pods"
        );
        for other in ["primary", "replica"].iter().filter(|r| **r != role) {
            assert!(!labels_match(&sel, &role_labelled(other)));
        }
        for p in s.ports.unwrap() {
            assert_eq!(container_port(c, p.target_port.as_ref().unwrap()), pg_port);
        }
    }
    let headless = service(&spec.service_name.clone().unwrap()).spec.unwrap();
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.publish_not_ready_addresses, Some(true));
    assert!(labels_match(&headless.selector.unwrap(), &pod_labels));
}

fn kustomization_resources(dir: &Path) -> (Vec<String>, Vec<String>) {
    let k = single(&dir.join("kustomization.yaml"));
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let resources = strings(&k["resources"]);
    let generated: Vec<String> = k["configMapGenerator"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| strings(&g["files"]))
        .collect();
    (resources, generated)
}

#[test]
fn the_kustomizations_list_every_manifest() {
    let config = config_dir();
    let dirs = [config.clone(), config.join("monitoring")];
    let mut listed = BTreeSet::new();
    for dir in &dirs {
        let (resources, generated) = kustomization_resources(dir);
        for file in resources.iter().chain(&generated) {
            let path = dir.join(file);
            assert!(path.is_file(), "{} lists a missing {file}", dir.display());
            assert!(listed.insert(path), "{file} listed twice");
        }
    }
    for file in yaml_files(&config) {
        let is_manifest = documents(&file).iter().any(|d| d.get("kind").is_some());
        let name = file.file_name().unwrap().to_str().unwrap();
        if name == "kustomization.yaml" {
            continue;
        }
        if is_manifest {
            assert!(
                listed.contains(&file),
                "{} is in no kustomization",
                file.display()
            );
        } else {
            // The plain rules file and its tests are no Kubernetes objects.
            assert!(
                ["alerts.yaml", "alerts_test.yaml"].contains(&name),
                "{} is neither a manifest nor known",
                file.display()
            );
        }
    }
    assert!(listed.contains(&config.join("monitoring/grafana-dashboard.json")));

    // kubectl's own kustomize, where kubectl is installed: it builds, and the objects are the
    // ones the files hold.
    let Ok(out) = Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
    else {
        eprintln!("kubectl is not installed: `kubectl kustomize` not tried");
        return;
    };
    assert!(out.status.success());
    let all = manifests();
    for (dir, extra) in [(&dirs[0], 0), (&dirs[1], 1)] {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let built: BTreeSet<(String, String)> =
            serde_norway::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout))
                .map(|d| {
                    let v: Value = serde::Deserialize::deserialize(d).unwrap();
                    (
                        v["kind"].as_str().unwrap().to_string(),
                        v["metadata"]["name"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
        let expected: BTreeSet<(String, String)> = all
            .iter()
            .filter(|m| m.file.parent() == Some(dir.as_path()) && m.kind() != "Kustomization")
            .map(|m| (m.kind().to_string(), m.name().to_string()))
            .collect();
        assert!(expected.is_subset(&built), "{expected:?} vs {built:?}");
        assert_eq!(built.len(), expected.len() + extra, "{built:?}");
    }
}

/// The rules file's text, indented under `spec:` of the PrometheusRule.
fn expected_prometheus_rule(alerts: &str) -> String {
    let start = alerts.find("\ngroups:").expect("groups: in alerts.yaml") + 1;
    let mut out = String::from(
        "# Generated from alerts.yaml (what each alert means is there): do not edit; after a change\n\
         # to alerts.yaml, run `PGW_BLESS=1 cargo test --test manifests`.\n\
         # The Prometheus resource must select it (kube-prometheus-stack, for example, selects\n\
         # PrometheusRules labelled `release: <its release name>` unless\n\
         # ruleSelectorNilUsesHelmValues is false).\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: pgwarden\n  labels:\n    app.kubernetes.io/name: pgwarden\n\
         spec:\n",
    );
    for line in alerts[start..].lines() {
        if !line.is_empty() {
            out.push_str("  ");
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[test]
fn the_podmonitor_and_the_prometheusrule_are_well_formed() {
    let all = manifests();
    let dir = config_dir().join("monitoring");

    // PrometheusRule: the groups of alerts.yaml, verbatim.
    let alerts_text = read(&dir.join("alerts.yaml"));
    let expected = expected_prometheus_rule(&alerts_text);
    let path = dir.join("prometheusrule.yaml");
    // (Not PGWARDEN_*: pgwarden would read that as a configuration key.)
    if std::env::var_os("PGW_BLESS").is_some() {
        let staging = path.with_extension("yaml.new");
        std::fs::write(&staging, &expected).unwrap();
        std::fs::rename(&staging, &path).unwrap();
    }
    assert!(
        read(&path) == expected,
        "config/monitoring/prometheusrule.yaml differs from alerts.yaml: \
         run `PGW_BLESS=1 cargo test --test manifests`"
    );
    let rule = find(&all, "PrometheusRule", "pgwarden");
    assert_eq!(rule.api_version(), "monitoring.coreos.com/v1");
    let alerts = single(&dir.join("alerts.yaml"));
    assert_eq!(rule.value["spec"]["groups"], alerts["groups"]);
    let spec_keys: BTreeSet<&str> = rule.value["spec"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(spec_keys, BTreeSet::from(["groups"]));
    for group in alerts["groups"].as_array().unwrap() {
        assert!(group["name"].is_string());
        for r in group["rules"].as_array().unwrap() {
            let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            let allowed = BTreeSet::from(["alert", "expr", "for", "labels", "annotations"]);
            assert!(keys.is_subset(&allowed), "{keys:?}");
            assert!(r["alert"].is_string() && r["expr"].is_string(), "{r}");
            assert!(
                ["warning", "critical"].contains(&r["labels"]["severity"].as_str().unwrap_or("")),
                "{}: a severity",
                r["alert"]
            );
            for a in ["summary", "description"] {
                assert!(r["annotations"][a].is_string(), "{}: {a}", r["alert"]);
            }
        }
    }

    // PodMonitor: selects the StatefulSet's pods, scrapes the port and path pgwarden serves.
    let pm = find(&all, "PodMonitor", "pgwarden");
    assert_eq!(pm.api_version(), "monitoring.coreos.com/v1");
    let sts: StatefulSet = typed(&find(&all, "StatefulSet", "pg"));
    let sts_spec = sts.spec.unwrap();
    let pod_labels = sts_spec.template.metadata.unwrap().labels.unwrap();
    let c = &sts_spec.template.spec.unwrap().containers[0];
    let selector: BTreeMap<String, String> =
        serde_json::from_value(pm.value["spec"]["selector"]["matchLabels"].clone()).unwrap();
    assert!(labels_match(&selector, &pod_labels));
    let endpoints = pm.value["spec"]["podMetricsEndpoints"].as_array().unwrap();
    assert!(!endpoints.is_empty());
    let defaults = check_config(&BTreeMap::from([(
        "PGWARDEN_INSTANCE_NAME".to_string(),
        "pg-0".to_string(),
    )]));
    let metrics_default = port_of(setting(&defaults, "metrics_listen"));
    for e in endpoints {
        let keys: BTreeSet<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        let allowed = BTreeSet::from([
            "port",
            "path",
            "interval",
            "scrapeTimeout",
            "relabelings",
            "metricRelabelings",
            "scheme",
            "honorLabels",
        ]);
        assert!(
            keys.is_subset(&allowed),
            "PodMonitor endpoint fields {keys:?}"
        );
        let port = e["port"].as_str().expect("a port name");
        assert_eq!(
            container_port(c, &IntOrString::String(port.into())),
            metrics_default
        );
        assert_eq!(e["path"], "/metrics");
        for r in e["relabelings"].as_array().into_iter().flatten() {
            let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            let allowed = BTreeSet::from([
                "sourceLabels",
                "separator",
                "targetLabel",
                "regex",
                "modulus",
                "replacement",
                "action",
            ]);
            assert!(keys.is_subset(&allowed), "relabeling fields {keys:?}");
        }
    }
    // The label the alerts group by comes from the Pod label pgwarden.dev/cluster.
    let relabel = endpoints[0]["relabelings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["targetLabel"] == "pgwarden_cluster")
        .expect("a relabeling to pgwarden_cluster");
    assert_eq!(
        relabel["sourceLabels"][0],
        "__meta_kubernetes_pod_label_pgwarden_dev_cluster"
    );
    assert!(pod_labels.contains_key("pgwarden.dev/cluster"));
    assert!(alerts_text.contains("pgwarden_cluster") && alerts_text.contains("job=\"pgwarden\""));
    assert!(endpoints[0]["relabelings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["targetLabel"] == "job" && r["replacement"] == "pgwarden"));
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian package `prometheus`) must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn every_alert_passes_its_promtool_unit_test() {
    let dir = config_dir().join("monitoring");
    promtool(&["check", "rules", "alerts.yaml"], &dir);
    let out = promtool(&["test", "rules", "alerts_test.yaml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");

    // Each alert has a test where it fires and one where it stays quiet.
    let alerts = single(&dir.join("alerts.yaml"));
    let tests = single(&dir.join("alerts_test.yaml"));
    let mut fired = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for t in tests["tests"].as_array().unwrap() {
        for a in t["alert_rule_test"].as_array().into_iter().flatten() {
            let name = a["alertname"].as_str().unwrap().to_string();
            if a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()) {
                fired.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let mut exprs = String::new();
    for group in alerts["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().unwrap();
            assert!(fired.contains(name), "no test where {name} fires");
            assert!(quiet.contains(name), "no test where {name} stays quiet");
            exprs.push_str(r["expr"].as_str().unwrap());
        }
    }
    // The bottlenecks the alerts must cover, by the metric that shows each.
    for metric in [
        "pgwarden_postgres_wal_ready_segments",
        "pgwarden_postgres_wal_oldest_ready_age_seconds",
        "pgwarden_postgres_archiver_failed_total",
        "pgwarden_postgres_replication_lag_bytes",
        "pgwarden_postgres_replay_lag_bytes",
        "pgwarden_postgres_replication_slot_retained_bytes",
        "pgwarden_postgres_role{role=\"primary\"}",
        "pgwarden_ha_fenced",
        "pgwarden_postgres_wal_directory_size_bytes",
        "pgwarden_postgres_up",
        "pgwarden_postmaster_crashes_total",
    ] {
        assert!(exprs.contains(metric), "no alert on {metric}");
    }
}

/// Every metric name pgwarden can export: the names in its source, and the built-in queries'.
fn exported_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut stack = vec![root().join("src")];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = read(&path);
                for piece in text.split('"').skip(1).step_by(2) {
                    if piece.starts_with("pgwarden_")
                        && piece
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    {
                        names.insert(piece.to_string());
                    }
                }
            }
        }
    }
    let builtin: BTreeMap<String, Value> =
        serde_norway::from_str(&read(&root().join("src/monitor/builtin_queries.yaml"))).unwrap();
    for (query, spec) in builtin {
        for column in spec["metrics"].as_array().unwrap() {
            for (col, def) in column.as_object().unwrap() {
                let name = format!("pgwarden_{query}_{col}");
                match def["usage"].as_str().unwrap() {
                    "COUNTER" => names.insert(format!("{name}_total")),
                    "GAUGE" => names.insert(name),
                    _ => false,
                };
            }
        }
    }
    for base in names.clone() {
        if base.ends_with("_seconds") {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{base}{suffix}"));
            }
        }
    }
    names
}

/// The `pgwarden_*` words of a PromQL expression that stand where a metric name stands.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("pgwarden_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let word = &expr[start..end];
        let next = expr[end..].trim_start();
        let is_label = next.starts_with('=')
            || next.starts_with("!=")
            || next.starts_with(',')
            || (next.starts_with(')') && !expr[..start].trim_end().ends_with('('));
        if !is_label && word != "pgwarden_cluster" {
            out.push(word.to_string());
        }
        i = end;
    }
    out
}

/// The dashboard's queries, with Grafana's variables given values so promtool can parse them.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = config_dir().join("monitoring/grafana-dashboard.json");
    let dash: Value = serde_json::from_str(&read(&path)).unwrap();
    assert_eq!(dash["uid"], "pgwarden");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let concrete = expr
                .replace("$__rate_interval", "1m")
                .replace("$namespace", "db")
                .replace("$cluster", "pg")
                .replace("$pod", ".*");
            out.push((p["title"].as_str().unwrap().to_string(), concrete));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(m, _)| m.replace("$namespace", "db").replace("$cluster", "pg"))
                .unwrap();
            out.push((format!("variable {}", v["name"]), inner));
        }
    }
    out
}

#[test]
fn the_alerts_and_the_dashboard_query_only_metrics_pgwarden_exports() {
    let known = exported_metrics();
    assert!(
        known.contains("pgwarden_postgres_database_xact_commit_total"),
        "{known:?}"
    );
    let dir = config_dir().join("monitoring");
    let alerts = single(&dir.join("alerts.yaml"));
    let mut queries: Vec<(String, String)> = alerts["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_string(),
                r["expr"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let dashboard = dashboard_queries();
    queries.extend(dashboard.clone());
    let mut used = BTreeSet::new();
    for (what, expr) in &queries {
        for name in metric_names(expr) {
            assert!(
                known.contains(&name),
                "{what}: {name} is not a pgwarden metric"
            );
            used.insert(name);
        }
    }
    // What the dashboard must show.
    let shown: String = dashboard.iter().map(|(_, e)| e.as_str()).collect();
    for metric in [
        "pgwarden_postgres_role",
        "pgwarden_health_state",
        "pgwarden_postgres_database_xact_commit_total",
        "pgwarden_postgres_connections_backends",
        "pgwarden_postgres_replication_lag_bytes",
        "pgwarden_postgres_wal_bytes_total",
        "pgwarden_postgres_archiver_archived_total",
        "pgwarden_postgres_wal_ready_segments",
        "pgwarden_postgres_checkpoints_timed_total",
        "pgwarden_postgres_checkpoints_requested_total",
        "pgwarden_postgres_timeline",
    ] {
        assert!(
            shown.contains(metric),
            "the dashboard does not show {metric}"
        );
    }

    // Every dashboard query parses as PromQL (as recording rules for promtool).
    let tmp = tempfile::tempdir().unwrap();
    let rules: Vec<Value> = dashboard
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| serde_json::json!({"record": format!("dashboard:query{i}"), "expr": expr}))
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(
        tmp.path().join("dashboard.yaml"),
        serde_norway::to_string(&file).unwrap(),
    )
    .unwrap();
    promtool(&["check", "rules", "dashboard.yaml"], tmp.path());
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
