//! The PodMonitor and the PrometheusRule are well formed, every alert passes its promtool unit
//! test, and the alerts and the dashboard query only metrics pgwarden exports.

use super::*;

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
