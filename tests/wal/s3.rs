//! Archiving to S3 (s3s-fs on loopback) through the PostgresCluster's `walArchive`, with the
//! credentials from a Secret, and the destination going down and coming back.

use super::*;

const NS: &str = "default";

const CLUSTER: &str = "pg";

const BUCKET: &str = "pgwarden-test";

fn wal_condition(server: &ApiServer, pod: &str) -> Value {
    server
        .get("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER)
        .and_then(|c| {
            c["status"]["instances"][pod]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "WALArchiving")
                .cloned()
        })
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn archives_to_s3_and_survives_the_destination_going_down() {
    let Some(bin) = support::wal::s3s_fs() else {
        eprintln!("skipped: s3s-fs not found (.ci/run installs it)");
        return;
    };
    let mut sb = Sandbox::new();
    let mut s3 = S3Server::start(&bin, &sb.dir.path().join("s3"), BUCKET);
    let server = ApiServer::start();
    server.seed_single(NS, CLUSTER, "pg-0");
    // The credentials come from a Secret named in the spec, read through the API.
    server.create(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "pg-wal-s3", "namespace": NS},
        "data": {
            "AWS_ACCESS_KEY_ID": support::cluster::base64_encode(support::wal::S3_KEY),
            "AWS_SECRET_ACCESS_KEY": support::cluster::base64_encode(support::wal::S3_SECRET),
        }
    }));
    server.update_with("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER, |c| {
        c["spec"]["walArchive"] = json!({"s3": {"credentialsSecret": "pg-wal-s3"}});
    });
    sb.extra = wal_extra(
        &format!("s3://{BUCKET}/cluster-a"),
        &format!(
            "[wal.s3]\nendpoint = \"{}\"\nallow_http = true\n\
             [kubernetes]\ncluster = \"{CLUSTER}\"\nnamespace = \"{NS}\"\npod_name = \"pg-0\"\n\
             status_interval = \"1s\"\napi_timeout = \"2s\"\n",
            s3.endpoint(),
        ),
    );
    let kubeconfig = server.kubeconfig(sb.dir.path(), "pg-0");
    let mut cmd = std::process::Command::new(support::binary());
    cmd.arg("run")
        .arg("--config")
        .arg(sb.config())
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    let warden = sb.spawn(cmd);
    let c = sb.wait_client(LONG).await;
    let port = sb.port;
    let objects = s3.root.join(BUCKET).join("cluster-a/wal");
    let pg_wal = sb.data_dir().join("pg_wal");

    load(port, &["-i", "-q", "-s", "4"]).await;
    load(port, &["-c", "4", "-j", "2", "-T", "3", "-n"]).await;
    let before = switch(&c).await;
    wait_archived(&c, &before).await;
    let n = check_archive(&objects, &pg_wal, FIRST, &before);
    assert!(n >= 3, "only {n} segments");
    assert_eq!(archiver(&c).await.2, 0, "pg_stat_archiver shows failures");
    eventually("WALArchiving=True", LONG, async || {
        (wal_condition(&server, "pg-0")["status"] == "True").then_some(())
    })
    .await;

    // The destination goes down: the backlog grows and every signal says so.
    s3.stop();
    for _ in 0..4 {
        switch(&c).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let doc = eventually("a visible backlog", LONG, async || {
        let doc = status(&sb);
        let ready = doc["postgres"]["archiver"]["ready_count"].as_u64()?;
        (ready >= 3 && doc["wal"]["state"] == "failing").then_some(doc)
    })
    .await;
    assert!(doc["wal"]["failures"].as_u64().unwrap() > 0, "{doc}");
    assert!(
        doc["wal"]["last_error"]
            .as_str()
            .unwrap()
            .contains("cluster-a"),
        "{doc}"
    );
    // The metrics are a snapshot of their own: they show the failure at their next refresh.
    let m = eventually("the failing metric", LONG, async || {
        let m = metrics(&sb);
        (metric(&m, "pgwarden_wal_archive_failing") == Some(1.0)).then_some(m)
    })
    .await;
    assert!(metric(&m, "pgwarden_postgres_wal_ready_segments").unwrap() >= 3.0);
    assert!(metric(&m, "pgwarden_wal_archive_failures_total{reason=\"error\"}").unwrap() > 0.0);
    let cond = eventually("WALArchiving=False", LONG, async || {
        let c = wal_condition(&server, "pg-0");
        (c["status"] == "False").then_some(c)
    })
    .await;
    assert_eq!(cond["reason"], "ArchiveFailing", "{cond}");

    // Back up: the backlog drains, nothing is lost.
    s3.resume(&bin);
    let last = eventually("the backlog drained", LONG, async || {
        let last = switch(&c).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let doc = status(&sb);
        let ready = doc["postgres"]["archiver"]["ready_count"].as_u64()?;
        (ready == 0 && doc["wal"]["state"] == "ok" && archiver(&c).await.1 >= last).then_some(last)
    })
    .await;
    let n = check_archive(&objects, &pg_wal, FIRST, &last);
    assert!(n >= 7, "{n}");
    eventually("WALArchiving=True again", LONG, async || {
        (wal_condition(&server, "pg-0")["status"] == "True").then_some(())
    })
    .await;
    drop(c);
    stop(warden);
}
