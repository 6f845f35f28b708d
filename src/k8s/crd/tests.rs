use super::*;
use serde_json::json;

fn base() -> serde_json::Value {
    json!({
        "instances": 1,
        "secrets": {"superuser": {"name": "su"}, "replication": {"name": "repl"}}
    })
}

#[test]
fn defaults_fill_in() {
    let spec = parse_spec(&base()).unwrap().spec;
    assert_eq!(spec.failover.lease_duration_seconds, 10);
    assert_eq!(spec.secrets.superuser.key, "password");
    assert_eq!(spec.update_strategy, UpdateStrategy::Restart);
    assert!(validate(&spec).is_ok());
}

#[test]
fn unknown_fields_are_collected_not_refused() {
    let mut v = base();
    v["postgresql"] = json!({"parameters": {"work_mem": "4MB"}, "bogus": 1});
    v["futureFeature"] = json!({"enabled": true});
    let parsed = parse_spec(&v).unwrap();
    assert_eq!(
        parsed.unknown,
        ["spec.futureFeature", "spec.postgresql.bogus"],
    );
    assert_eq!(
        parsed.spec.postgresql.parameters["work_mem"],
        SpecParam(ParamValue::Str("4MB".into()))
    );
    assert!(validate(&parsed.spec).is_ok());
}

#[test]
fn bad_input_names_the_field() {
    let mut v = base();
    v["instances"] = json!("three");
    assert!(parse_spec(&v).unwrap_err().contains("spec.instances"));

    let mut v = base();
    v["postgresql"] = json!({"parameters": {"port": 5433}});
    let problems = validate(&parse_spec(&v).unwrap().spec).unwrap_err();
    assert!(
        problems[0].starts_with("spec.postgresql.parameters.port"),
        "{problems:?}"
    );

    let mut v = base();
    v["failover"] = json!({"leaseDurationSeconds": 8, "renewDeadlineSeconds": 6});
    let problems = validate(&parse_spec(&v).unwrap().spec).unwrap_err();
    assert!(problems[0].contains("leaseDurationSeconds"), "{problems:?}");

    let mut v = base();
    v["postgresql"] = json!({"tls": {"replicationAuth": "certificate"}});
    let problems = validate(&parse_spec(&v).unwrap().spec).unwrap_err();
    assert!(problems[0].contains("replicationAuth"), "{problems:?}");
}

#[test]
fn wal_archive_is_layered_and_checked() {
    let mut v = base();
    v["walArchive"] = json!({"destination": "s3://bkt/pg", "parallelism": 8, "s3": {"endpoint": "http://minio:9000", "allowHttp": true}});
    let spec = parse_spec(&v).unwrap().spec;
    assert!(validate(&spec).is_ok());
    let w = spec.wal_archive.unwrap().apply(
        &crate::config::WalConfig::default(),
        std::path::Path::new("/run/creds"),
    );
    assert_eq!(w.destination.as_deref(), Some("s3://bkt/pg"));
    assert_eq!(w.parallelism, 8);
    assert_eq!(w.prefetch, 8);
    assert!(w.s3.allow_http);
    let mut v = base();
    v["walArchive"] = json!({"destination": "ftp://x"});
    let problems = validate(&parse_spec(&v).unwrap().spec).unwrap_err();
    assert!(
        problems[0].starts_with("spec.walArchive.destination"),
        "{problems:?}"
    );
    let mut v = base();
    v["walArchive"] = json!({"compression": "lz4"});
    assert!(parse_spec(&v).unwrap_err().contains("spec.walArchive"));
}

#[test]
fn bootstrap_recovery_is_checked_with_the_field_named() {
    let mut v = base();
    v["bootstrap"] = json!({"recovery": {
        "source": {"destination": "s3://bkt/old", "s3": {"credentialsSecret": "old-s3"}},
        "backup": "20261201T030000Z",
        "target": {"name": "before-migration"}
    }});
    let spec = parse_spec(&v).unwrap().spec;
    assert!(validate(&spec).is_ok());
    v["bootstrap"]["recovery"]["target"] = json!({"time": "2026-12-01T14:04:59Z", "xid": 7});
    let problems = validate(&parse_spec(&v).unwrap().spec).unwrap_err();
    assert!(
        problems[0].starts_with("spec.bootstrap.recovery.target:"),
        "{problems:?}"
    );
    v["bootstrap"]["recovery"] = json!({"source": {"destination": "ftp://x"}});
    let problems = validate(&parse_spec(&v).unwrap().spec).unwrap_err();
    assert!(
        problems[0].starts_with("spec.bootstrap.recovery.source.destination"),
        "{problems:?}"
    );
}

#[test]
fn committed_crd_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/crd.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == crd_yaml(),
        "config/crd.yaml is stale: run `pgwarden crd > config/crd.yaml`"
    );
}

#[test]
fn crd_has_the_cel_rule_and_printer_columns() {
    let y = crd_yaml();
    assert!(y.contains("x-kubernetes-validations"));
    assert!(y.contains("renewDeadlineSeconds + self.retryPeriodSeconds"));
    assert!(y.contains("currentPrimary"));
    assert!(y.contains("shortNames"));
    assert!(y.contains("subresources"));
}
