use super::*;

fn load(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgwarden.toml");
    std::fs::write(&path, toml_text).unwrap();
    Config::load(
        Some(&path),
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

#[test]
fn defaults_serve() {
    let c = load("instance_name = \"pg-0\"", &[]).unwrap();
    assert_eq!(c.postgres.port, 5432);
    assert_eq!(c.shutdown.smart_timeout, Duration::from_secs(10));
}

#[test]
fn environment_overrides_file_including_nested_maps() {
    let c = load(
        "instance_name = \"pg-0\"\n[postgres]\nport = 5000\n",
        &[
            ("PGWARDEN_POSTGRES__PORT", "5433"),
            ("PGWARDEN_POSTGRES__PARAMETERS__WORK_MEM", "64MB"),
            ("PGWARDEN_SHUTDOWN__SMART_TIMEOUT", "2s"),
            ("PGWARDEN_CONFIG", "/ignored"),
            ("OTHER", "x"),
        ],
    )
    .unwrap();
    assert_eq!(c.postgres.port, 5433);
    assert_eq!(
        c.postgres.parameters.get("work_mem"),
        Some(&ParamValue::Str("64MB".into()))
    );
    assert_eq!(c.shutdown.smart_timeout, Duration::from_secs(2));
}

#[test]
fn kubernetes_service_links_are_not_configuration() {
    let c = load(
        "instance_name = \"pg-0\"",
        &[
            ("PGWARDEN_SERVICE_HOST", "10.0.0.1"),
            ("PGWARDEN_SERVICE_PORT", "8000"),
            ("PGWARDEN_PORT", "tcp://10.0.0.1:8000"),
            ("PGWARDEN_PORT_8000_TCP_ADDR", "10.0.0.1"),
            ("PGWARDEN_RW_SERVICE_HOST", "10.0.0.2"),
        ],
    );
    assert!(c.is_ok(), "{c:?}");
    assert!(load(
        "instance_name = \"pg-0\"",
        &[("PGWARDEN_POSTGRES__PORT", "x")]
    )
    .is_err());
}

#[test]
fn unknown_keys_are_named() {
    let err = load("instance_name = \"pg-0\"\n[postgres]\nprot = 1\n", &[]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("prot"), "{msg}");
    let err = load("instance_name = \"pg-0\"", &[("PGWARDEN_HTTP__NOPE", "1")]).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn invalid_values_are_named() {
    let err = load(
        "instance_name = \"pg-0\"\n[postgres]\nport = \"abc\"\n",
        &[],
    )
    .unwrap_err();
    assert!(err.to_string().contains("postgres.port"), "{err}");
    let err = load(
        "instance_name = \"pg-0\"\n[shutdown]\nsmart_timeout = \"soon\"\n",
        &[],
    )
    .unwrap_err();
    assert!(err.to_string().contains("shutdown.smart_timeout"), "{err}");
    let err = load("instance_name = \"Bad Name\"", &[]).unwrap_err();
    assert!(err.to_string().contains("instance_name"), "{err}");
}

#[test]
fn forbidden_parameters_are_refused_with_the_reason() {
    let err = load(
        "instance_name = \"pg-0\"\n[postgres.parameters]\narchive_command = \"cp %p /x\"\n",
        &[],
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("postgres.parameters.archive_command"), "{msg}");
    assert!(msg.contains("pgwarden"), "{msg}");
}

/// The example shipped in `config/` must load and must show the defaults.
#[test]
fn example_file_is_valid_and_matches_the_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pgwarden.toml");
    let mut c = Config::load(Some(&path), std::iter::empty()).unwrap();
    c.instance_name = Config::default().instance_name;
    assert_eq!(c, Config::default());
}
