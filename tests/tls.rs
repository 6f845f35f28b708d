//! TLS with real instances against the test API server: clients with `sslmode=verify-full`
//! against the CA from the Secret, plain connections refused in `required` mode, replication
//! over verified TLS through a failover, a certificate rotated in its Secret picked up without a
//! restart, refused control requests (counted) that leave a member free to compete, and one CA
//! for instances that start at once.

mod support;

use std::time::Duration;

use pgwarden::tls::issue::KeyAndCert;
use serde_json::{json, Value};
use support::cluster::{
    base64_encode, connect_within, eventually, Cluster, NS, REPLICATION_PASSWORD,
};
use support::tls::*;

fn tls(mode: &str) -> impl FnOnce(&mut Value) {
    let mode = mode.to_string();
    move |spec: &mut Value| spec["postgresql"] = json!({"tls": {"mode": mode}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn required_mode_takes_verified_tls_only_renews_and_keeps_keys_private() {
    // Certificates of 30 s: renewed after 20 s, within the test.
    let c = Cluster::start(1, |spec: &mut Value| {
        spec["postgresql"] = json!({"tls": {"mode": "required", "certificateDurationSeconds": 30}});
    });
    let ca = eventually("the CA Secret", LONG, async || ca_from_secret(&c)).await;
    let first = wait_serving(&c, 0, &ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca).unwrap();

    // The README's command: psql with sslmode=verify-full and the CA from the Secret, by IP
    // and by a name the certificate carries.
    for host in ["127.0.0.1", "localhost"] {
        let row = eventually("psql over verified TLS", LONG, async || {
            psql(
                c.port(0),
                &ca_file,
                host,
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            )
            .ok()
        })
        .await;
        assert!(row.starts_with("t|TLSv1."), "{host}: {row}");
    }
    // Another CA does not vouch for this server.
    let stranger = pgwarden::tls::issue::new_ca("pg", std::time::SystemTime::now()).unwrap();
    let stranger_file = dir.path().join("stranger.crt");
    std::fs::write(&stranger_file, &stranger.cert_pem).unwrap();
    let refused = psql(c.port(0), &stranger_file, "127.0.0.1", "SELECT 1").unwrap_err();
    assert!(refused.contains("certificate verify failed"), "{refused}");
    // A plain connection finds no rule.
    let mut plain = tokio_postgres::Config::new();
    plain
        .host("127.0.0.1")
        .port(c.port(0))
        .user("postgres")
        .password(support::PASSWORD)
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(5));
    let err = plain
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("a plain connection is refused");
    let message = err
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| err.to_string());
    assert!(message.contains("no encryption"), "{message}");

    // The status port speaks verified HTTPS with the same certificate; probes answer in plain
    // HTTP too, whatever scheme the kubelet uses.
    let (code, body) = https_get(c.status_port(0), &ca, "/pg/status", None)
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(c.http_code(0, "/healthz").await, Some(200));
    let (code, _) = https_get(c.status_port(0), &ca, "/healthz", None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    let (code, metrics) = https_get(c.nodes[0].sb.metrics_port, &ca, "/metrics", None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("pgwarden_http_refused_requests_total"));

    // Private keys: 0600 files in the run directory, never in the status, the log or Events.
    let key = c.nodes[0].sb.run_dir().join("tls/tls.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for (what, text) in [
        ("/pg/status", body),
        ("the log", c.output(0)),
        (
            "Events",
            serde_json::to_string(&c.server.list("events.k8s.io/v1", "events", NS)).unwrap(),
        ),
        ("the cluster", c.cluster().to_string()),
    ] {
        assert!(!text.contains("PRIVATE KEY"), "a private key in {what}");
    }

    // Renewal: a new certificate from the same CA, served by the same postmaster.
    let pid = c.status(0).await["postmaster"]["pid"].as_i64();
    assert!(pid.is_some());
    let second = eventually("the renewed certificate", LONG, async || {
        let (_, serial) = verified(c.port(0), &ca, true).await.ok()?;
        (serial != first).then_some(serial)
    })
    .await;
    let status = c.status(0).await;
    assert_eq!(status["postmaster"]["pid"].as_i64(), pid, "no restart");
    assert_eq!(status["tls"]["serial"], second.as_str(), "{status}");
    assert_eq!(ca_from_secret(&c), Some(ca), "the CA stays");
    let row = psql(
        c.port(0),
        &ca_file,
        "127.0.0.1",
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    assert_eq!(row.as_deref(), Ok("t"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_replicate_over_verified_tls_share_one_ca_and_fail_over() {
    // Started at once: the three race to create the CA; one wins and all use its CA.
    let mut c = Cluster::start(3, tls("preferred"));
    let p = c.wait_all_streaming(LONG).await;
    let ca = eventually("the CA Secret", LONG, async || ca_from_secret(&c)).await;
    let created = || {
        let events = c.server.list("events.k8s.io/v1", "events", NS);
        events.iter().filter(|e| e["reason"] == "CACreated").count()
    };
    eventually("the CACreated Event", LONG, async || {
        (created() > 0).then_some(())
    })
    .await;
    assert_eq!(created(), 1, "exactly one instance created the CA");
    for i in 0..3 {
        wait_serving(&c, i, &ca).await;
    }
    let walsenders_over_tls = async |c: &Cluster, p: usize| -> Option<()> {
        let n: i64 = c
            .query_value(
                p,
                "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE s.ssl AND r.state = 'streaming'",
            )
            .await?;
        (n == 2).then_some(())
    };
    eventually("both standbys streaming over TLS", LONG, async || {
        walsenders_over_tls(&c, p).await
    })
    .await;
    let s = c.others(p)[0];
    let conninfo: String = c.query_value(s, "SHOW primary_conninfo").await.unwrap();
    assert!(conninfo.contains("sslmode=verify-full"), "{conninfo}");

    // Control requests need a member's proof; a member cut off from the API server would
    // promise the primary not to compete, but not to a request without the token.
    c.partition(s, true);
    let primary = c.name(p).to_string();
    let path = format!("/pg/status?failsafe={primary}");
    let refused =
        |reason: &str| format!("pgwarden_http_refused_requests_total{{reason=\"{reason}\"}}");
    let (code, body) = https_get(c.status_port(s), &ca, &path, None).await.unwrap();
    assert_eq!(code, 401, "{body}");
    let (code, _) = https_get(
        c.status_port(s),
        &ca,
        &path,
        Some(("x-pgwarden-failsafe", "00ff")),
    )
    .await
    .unwrap();
    assert_eq!(code, 403);
    // The right token, but over plain HTTP while TLS is on: refused all the same.
    let token = pgwarden::ha::failsafe::token(
        REPLICATION_PASSWORD,
        "pg",
        &primary,
        std::time::SystemTime::now(),
    );
    assert_eq!(
        plain_status_code(c.status_port(s), &path, &token).await,
        Some(403),
        "the token over plain HTTP"
    );
    assert_eq!(metric(&c, s, &refused("missing_credentials")), Some(1.0));
    assert_eq!(metric(&c, s, &refused("invalid_credentials")), Some(1.0));
    assert_eq!(metric(&c, s, &refused("plaintext")), Some(1.0));
    // Refused: no promise was made. The read-only status stays open.
    let (code, body) = https_get(c.status_port(s), &ca, "/pg/status", None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(!body.contains("failsafe_promised_to"), "{body}");
    c.partition(s, false);

    // The primary dies: a standby that only ever got refused requests competes and wins; the
    // other one streams from it over verified TLS.
    c.kill9(p);
    let q = c.wait_new_primary(p, LONG).await;
    let other = (0..3).find(|&i| i != p && i != q).unwrap();
    c.wait_streaming(other, LONG).await;
    eventually("the standby streaming from the new primary over TLS", LONG, async || {
        let n: i64 = c
            .query_value(q, "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE s.ssl AND r.state = 'streaming'")
            .await?;
        (n >= 1).then_some(())
    })
    .await;
    // A member's proof is taken: a client certificate from the cluster CA, or the token of
    // the replication Secret. Cut off from the API server, the standby then promises.
    c.partition(other, true);
    let path = format!("/pg/status?failsafe={}", c.name(q));
    let ca_pair = KeyAndCert {
        cert_pem: from_ca_secret(&c, "tls.crt").unwrap(),
        key_pem: from_ca_secret(&c, "tls.key").unwrap(),
    };
    let names = pgwarden::tls::issue::Names::default();
    let member = pgwarden::tls::issue::issue_server(
        &ca_pair,
        "member",
        &names,
        std::time::SystemTime::now(),
        Duration::from_secs(600),
    )
    .unwrap();
    let stranger_ca = pgwarden::tls::issue::new_ca("pg", std::time::SystemTime::now()).unwrap();
    let stranger = pgwarden::tls::issue::issue_server(
        &stranger_ca,
        "member",
        &names,
        std::time::SystemTime::now(),
        Duration::from_secs(600),
    )
    .unwrap();
    // rustls refuses a certificate another CA signed during the handshake.
    assert!(
        https_get_as(c.status_port(other), &ca, &path, None, Some(&stranger))
            .await
            .is_err()
    );
    let promised = |body: &str| {
        serde_json::from_str::<Value>(body)
            .ok()
            .map(|d| d["kubernetes"]["failsafe_promised_to"].clone())
    };
    let (code, body) = eventually("a promise to a member's certificate", LONG, async || {
        let (code, body) = https_get_as(c.status_port(other), &ca, &path, None, Some(&member))
            .await
            .ok()?;
        (promised(&body) == Some(json!(c.name(q)))).then_some((code, body))
    })
    .await;
    assert_eq!(code, 200, "{body}");
    let token = pgwarden::ha::failsafe::token(
        REPLICATION_PASSWORD,
        "pg",
        c.name(q),
        std::time::SystemTime::now(),
    );
    let (code, body) = https_get(
        c.status_port(other),
        &ca,
        &path,
        Some(("x-pgwarden-failsafe", &token)),
    )
    .await
    .unwrap();
    assert_eq!(code, 200);
    assert_eq!(promised(&body), Some(json!(c.name(q))), "{body}");
    c.partition(other, false);

    // The CA is replaced in its Secret: the instances follow it without a restart, each
    // serving a certificate from the new CA.
    let pid = c.status(q).await["postmaster"]["pid"].as_i64();
    let replacement = pgwarden::tls::issue::new_ca("pg", std::time::SystemTime::now()).unwrap();
    c.server.update_with("v1", "secrets", NS, "pg-ca", |s| {
        s["data"] = json!({
            "ca.crt": base64_encode(&replacement.cert_pem),
            "tls.crt": base64_encode(&replacement.cert_pem),
            "tls.key": base64_encode(&replacement.key_pem),
        })
    });
    for i in [q, other] {
        wait_serving(&c, i, &replacement.cert_pem).await;
    }
    assert_eq!(c.status(q).await["postmaster"]["pid"].as_i64(), pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_rotated_in_its_secret_is_served_without_a_restart() {
    use pgwarden::tls::issue::{issue_server, new_ca, Names};
    let ca = new_ca("pg", std::time::SystemTime::now()).unwrap();
    let (secret, first) = tls_secret("pg-server-tls", &ca);
    let ca_secret = |ca: &KeyAndCert| {
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "pg-ca-public", "namespace": NS},
            "data": {"ca.crt": base64_encode(&ca.cert_pem)}
        })
    };
    let c = Cluster::start(1, |spec: &mut Value| {
        spec["postgresql"] = json!({"tls": {
            "mode": "required", "certificateSecret": "pg-server-tls", "caSecret": "pg-ca-public"
        }});
    });
    c.server.create(secret);
    c.server.create(ca_secret(&ca));
    let serial = wait_serving(&c, 0, &ca.cert_pem).await;
    assert_eq!(serial, first);
    let pid = eventually("the postmaster's pid", LONG, async || {
        c.status(0).await["postmaster"]["pid"].as_i64()
    })
    .await;
    assert!(
        c.server.get("v1", "secrets", NS, "pg-ca").is_none(),
        "no CA of its own"
    );

    // cert-manager renews, from a new CA: both Secrets change, Postgres and the status port
    // serve the new certificate, the new CA vouches for members, and the postmaster is the
    // same process.
    let new = new_ca("pg", std::time::SystemTime::now()).unwrap();
    let (renewed, second) = tls_secret("pg-server-tls", &new);
    assert_ne!(first, second);
    c.server
        .update_with("v1", "secrets", NS, "pg-ca-public", |s| {
            s["data"] = ca_secret(&new)["data"].clone()
        });
    c.server
        .update_with("v1", "secrets", NS, "pg-server-tls", |s| {
            s["data"] = renewed["data"].clone()
        });
    eventually(
        "the renewed certificate on the Postgres port",
        LONG,
        async || {
            let (_, serial) = verified(c.port(0), &new.cert_pem, true).await.ok()?;
            (serial == second).then_some(())
        },
    )
    .await;
    let member = |ca: &KeyAndCert| {
        let validity = Duration::from_secs(600);
        issue_server(
            ca,
            "member",
            &Names::default(),
            std::time::SystemTime::now(),
            validity,
        )
        .unwrap()
    };
    let (by_new, by_old) = (member(&new), member(&ca));
    eventually(
        "the new certificate and CA on the status port",
        LONG,
        async || {
            let (_, serial) = verified(c.status_port(0), &new.cert_pem, false)
                .await
                .ok()?;
            let (code, _) = https_get_as(
                c.status_port(0),
                &new.cert_pem,
                "/pg/status",
                None,
                Some(&by_new),
            )
            .await
            .ok()?;
            (serial == second && code == 200).then_some(())
        },
    )
    .await;
    // The old CA no longer vouches for a client.
    assert!(https_get_as(
        c.status_port(0),
        &new.cert_pem,
        "/pg/status",
        None,
        Some(&by_old)
    )
    .await
    .is_err());
    let status = c.status(0).await;
    assert_eq!(
        status["postmaster"]["pid"].as_i64(),
        Some(pid),
        "no restart"
    );
    assert_eq!(status["tls"]["serial"], second, "{status}");
    assert_eq!(status["tls"]["mode"], "required");
    // Still TLS only.
    assert!(connect_within(c.port(0), Duration::from_secs(5), None)
        .await
        .is_none());

    // The Secret is deleted: a warning, and the certificate in use stays.
    c.server.delete("v1", "secrets", NS, "pg-server-tls");
    eventually("the TLSSecretMissing Event", LONG, async || {
        let events = c.server.list("events.k8s.io/v1", "events", NS);
        events
            .iter()
            .any(|e| {
                e["reason"] == "TLSSecretMissing"
                    && e["note"].as_str().is_some_and(|n| n.contains("keeping"))
            })
            .then_some(())
    })
    .await;
    let (_, serial) = verified(c.port(0), &new.cert_pem, true).await.unwrap();
    assert_eq!(serial, second);
}

/// `psql` as the replication role over a replication connection to 127.0.0.1:`port` with the
/// replication password and no client certificate: the error Postgres answers (or the output).
fn replication_psql(port: u16, sslmode: &str) -> Result<String, String> {
    let home = tempfile::tempdir().map_err(|e| e.to_string())?;
    let conninfo = format!(
        "host=127.0.0.1 port={port} user=streaming_replica dbname=postgres replication=database sslmode={sslmode} connect_timeout=5"
    );
    let out = std::process::Command::new(PSQL)
        .args([&conninfo, "-XAtc", "IDENTIFY_SYSTEM"])
        .env("PGPASSWORD", REPLICATION_PASSWORD)
        // No ~/.postgresql/postgresql.crt to fall back to.
        .env("HOME", home.path())
        .env_remove("PGSSLMODE")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_certificate_authentication_standbys_replicate_without_a_password() {
    let mut c = Cluster::start(2, |spec: &mut Value| {
        spec["postgresql"] =
            json!({"tls": {"mode": "preferred", "replicationAuth": "certificate"}});
    });
    let p = c.wait_all_streaming(LONG).await;
    let s = c.others(p)[0];
    // The replication role takes no password, even the right one, with TLS or without.
    let refused = replication_psql(c.port(p), "require").unwrap_err();
    assert!(
        refused.contains("requires a valid client certificate"),
        "{refused}"
    );
    let refused = replication_psql(c.port(p), "disable").unwrap_err();
    assert!(refused.contains("pg_hba.conf rejects"), "{refused}");

    // The primary forgets the password the standbys were given (once pgwarden has set it:
    // it would set it again otherwise).
    let set = "SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = 'streaming_replica'";
    eventually("the replication password set", LONG, async || {
        c.query_value::<bool>(p, set).await.filter(|b| *b)
    })
    .await;
    let client = c.client(p).await.unwrap();
    client
        .batch_execute("ALTER ROLE streaming_replica PASSWORD NULL")
        .await
        .unwrap();
    // A fresh clone (pg_basebackup) and the stream after it get in by certificate alone.
    c.kill9(s);
    std::fs::remove_dir_all(c.data_dir(s)).unwrap();
    c.restart(s);
    assert_eq!(c.wait_streaming(s, LONG).await, p);
    let by_certificate = format!(
        "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE s.ssl AND r.state = 'streaming' AND s.client_dn = '/CN={}'",
        c.name(s)
    );
    eventually(
        "the standby streaming with its certificate",
        LONG,
        async || {
            let n: i64 = c.query_value(p, &by_certificate).await?;
            (n == 1).then_some(())
        },
    )
    .await;
    // The primary fails: the former one is rewound (pg_rewind) by certificate too.
    c.kill9(p);
    assert_eq!(c.wait_new_primary(p, LONG).await, s);
    c.restart(p);
    assert_eq!(c.wait_streaming(p, LONG).await, s);
    assert!(c.output(p).contains("rewinding with pg_rewind"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_creating_the_ca_at_once_end_with_one() {
    use k8s_openapi::api::core::v1::Secret;
    use pgwarden::demo::apiserver::Fault;
    let server = support::apiserver::ApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut apis = Vec::new();
    for i in 0..3 {
        let token = support::cluster::instance_name(i);
        // Every request waits before it is handled: the three reads all find no CA before
        // any create is handled, so that the three creates race.
        server.set_fault(&token, Fault::Latency(Duration::from_millis(300)));
        let kubeconfig =
            kube::config::Kubeconfig::read_from(server.kubeconfig(dir.path(), &token)).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let api: kube::Api<Secret> =
            kube::Api::namespaced(kube::Client::try_from(config).unwrap(), NS);
        apis.push((token, api));
    }
    let found = futures::future::join_all(
        apis.iter()
            .map(|(_, api)| pgwarden::tls::ca::ensure(api, "pg", Duration::from_secs(10))),
    )
    .await;
    for (token, _) in &apis {
        assert_eq!(
            server.count(token, "create", "secrets"),
            1,
            "{token} tried to create"
        );
    }
    let found: Vec<_> = found.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        found.iter().filter(|f| f.created).count(),
        1,
        "one create won"
    );
    let stored = key_of_ca_secret(&server, "ca.crt").unwrap();
    for f in &found {
        assert_eq!(f.ca.cert_pem, stored, "every instance uses the stored CA");
    }
}
