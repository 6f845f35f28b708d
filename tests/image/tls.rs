//! The image in Kubernetes mode with `spec.postgresql.tls: {mode: required}`, against the test
//! API server, still on a read-only root file system: it creates the cluster CA Secret, gets
//! ready, takes `psql` with `sslmode=verify-full` against that CA and refuses a plain
//! connection, keeps its key files for its own user alone, and writes nothing outside /run,
//! /tmp and the data volume.
//!
//! The API server listens on the host's loopback only, so the container shares the host's
//! network; pgwarden is then told its ports (free ones on the host) instead of having them
//! published.

use super::*;
use support::apiserver::ApiServer;
use support::cluster::{cluster_object, pod, secret, CLUSTER, NS, REPLICATION_PASSWORD};
use support::tls::{key_of_ca_secret, PSQL};

/// Where the kubeconfig is mounted (a real pod uses its service account instead).
const KUBECONFIG: &str = "/etc/pgwarden/kubeconfig";
const POD: &str = "pg-0";

/// Polls `f` every 200 ms until it returns Some; fails with the container's log after `within`
/// or as soon as the container stops.
fn until<T>(c: &Container, what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(c.running(), "the container stopped:\n{}", c.logs());
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `psql` on the host with `conninfo` (host, port, sslmode ...) as the superuser.
fn host_psql(conninfo: &str, sql: &str) -> Output {
    run(
        Command::new(PSQL)
            .args([conninfo, "-XAtc", sql])
            .env("PGPASSWORD", support::PASSWORD)
            .env_remove("PGSSLMODE"),
        SHORT,
    )
}

#[test]
fn the_image_requires_verified_tls_in_kubernetes_mode_on_a_read_only_root() {
    require_docker();
    let id = std::process::id();
    let volume = format!("pgwarden-image-test-{id}-tls");
    let name = format!("pgwarden-image-test-{id}-tls");
    let scratch = tempfile::tempdir().unwrap();
    // Declared before the cleanup: the container goes first, then the API server it talks to.
    let server = ApiServer::start();
    let cleanup = Cleanup {
        containers: vec![name.clone()],
        volume: volume.clone(),
        image: Image::get(),
    };
    let image = &cleanup.image.tag;
    let started = Instant::now();

    server.create(secret("pg-superuser", support::PASSWORD));
    server.create(secret("pg-replication", REPLICATION_PASSWORD));
    server.create(pod(POD));
    let mut cluster = cluster_object(1);
    // The spec's default timings: the harness's fast ones are meant for pgwarden's fast
    // `kubernetes.api_timeout`, and this runs it with its defaults.
    if let Some(spec) = cluster["spec"].as_object_mut() {
        spec.remove("failover");
    }
    cluster["spec"]["postgresql"] = serde_json::json!({"tls": {"mode": "required"}});
    server.create(cluster);
    let kubeconfig = server.kubeconfig(scratch.path(), POD);
    let password_file = scratch.path().join("password");
    std::fs::write(&password_file, support::PASSWORD).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    docker_ok(&["volume", "create", &volume]);

    // The StatefulSet's environment (config/statefulset.yaml), with the kubeconfig standing in
    // for the service account, loopback for the pod IP and the instance name for the pod's
    // host name (the container has the host's).
    let port = support::free_port();
    let env = [
        format!("PGWARDEN_INSTANCE_NAME={POD}"),
        format!("KUBECONFIG={KUBECONFIG}"),
        format!("POD_NAME={POD}"),
        format!("POD_NAMESPACE={NS}"),
        "POD_IP=127.0.0.1".to_string(),
        format!("PGWARDEN_KUBERNETES__CLUSTER={CLUSTER}"),
        "PGWARDEN_POSTGRES__LISTEN_ADDRESSES=127.0.0.1".to_string(),
        format!("PGWARDEN_POSTGRES__PORT={port}"),
    ];
    let mut extra = vec![
        "--volume".to_string(),
        format!("{}:{KUBECONFIG}:ro", kubeconfig.display()),
    ];
    for e in env {
        extra.extend(["--env".to_string(), e]);
    }
    let network = Network::Host {
        status: support::free_port(),
        metrics: support::free_port(),
    };
    let c = start(
        image,
        &name,
        &volume,
        scratch.path(),
        password_file.to_str().unwrap(),
        network,
        &extra,
    );
    c.wait_ready(Duration::from_secs(120));
    eprintln!("ready with TLS in {:.1?}", started.elapsed());

    // The CA pgwarden created, as a client gets it from the Secret.
    let ca = until(&c, "the CA Secret", Duration::from_secs(30), || {
        key_of_ca_secret(&server, "ca.crt")
    });
    let ca_file = scratch.path().join("ca.crt");
    std::fs::write(&ca_file, &ca).unwrap();
    let verified = format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={} connect_timeout=5",
        ca_file.display()
    );
    let row = until(
        &c,
        "psql over verified TLS",
        Duration::from_secs(30),
        || {
            let out = host_psql(
                &verified,
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            );
            out.ok.then(|| out.stdout.trim().to_string())
        },
    );
    assert_eq!(row, "t");
    let plain = host_psql(
        &format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable connect_timeout=5"
        ),
        "SELECT 1",
    );
    assert!(!plain.ok, "a plain connection was taken: {}", plain.stdout);
    assert!(plain.stderr.contains("no encryption"), "{}", plain.stderr);

    // The files Postgres reads: the image's user's alone, in the run directory.
    let out = c.exec(&[
        "sh",
        "-c",
        "stat -c '%n %a %u:%g' /run/pgwarden/tls /run/pgwarden/tls/*",
    ]);
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    let modes: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        modes,
        [
            "/run/pgwarden/tls 700 999:999",
            "/run/pgwarden/tls/ca.crt 600 999:999",
            "/run/pgwarden/tls/tls.crt 600 999:999",
            "/run/pgwarden/tls/tls.key 600 999:999",
        ]
    );
    assert!(
        !c.logs().contains("PRIVATE KEY"),
        "a private key in the log"
    );

    // Nothing in the container's own layer but the mount points Docker made for the two
    // mounted files: every write went to /run, /tmp or the volume.
    let changes = docker_ok(&["diff", &name]);
    let made_by_docker = |path: &str| {
        [KUBECONFIG, PASSWORD_FILE]
            .iter()
            .any(|m| *m == path || m.starts_with(&format!("{path}/")))
    };
    let written: Vec<&str> = changes
        .lines()
        .filter(|l| {
            !l.split_once(' ')
                .is_some_and(|(_, path)| made_by_docker(path))
        })
        .collect();
    assert!(
        written.is_empty(),
        "written outside the mounts: {written:?}"
    );
    eprintln!("TLS phase took {:.1?} after the build", started.elapsed());
}
