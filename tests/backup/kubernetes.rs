//! Backups in Kubernetes: on request (the annotation) and on the spec's schedule.

use super::*;

const NS: &str = "default";

const CLUSTER: &str = "pg";

/// The condition `type_` of instance `pod` in the PostgresCluster's status.
fn condition(server: &support::apiserver::ApiServer, pod: &str, type_: &str) -> Option<Value> {
    let c = server.get("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER)?;
    c["status"]["instances"][pod]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// The reasons of the Events recorded so far.
fn event_reasons(server: &support::apiserver::ApiServer) -> Vec<String> {
    server
        .list("events.k8s.io/v1", "events", NS)
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn kubernetes_backups_on_request_and_on_the_spec_schedule() {
    let archive_dir = tempfile::tempdir().unwrap();
    support::chown(archive_dir.path());
    let destination = format!("file://{}", archive_dir.path().display());
    let server = support::apiserver::ApiServer::start();
    server.seed_single(NS, CLUSTER, "pg-0");
    let a = source(
        &destination,
        &format!(
            "[kubernetes]\ncluster = \"{CLUSTER}\"\nnamespace = \"{NS}\"\npod_name = \"pg-0\"\n\
             status_interval = \"1s\"\napi_timeout = \"2s\"\n"
        ),
    );
    let mut cmd = std::process::Command::new(support::binary());
    cmd.arg("run")
        .arg("--config")
        .arg(a.config())
        .env("KUBECONFIG", server.kubeconfig(a.dir.path(), "pg-0"));
    let warden = a.spawn(cmd);
    let c = a.wait_client(LONG).await;
    exec(&c, "CREATE TABLE t (i int)").await;
    let complete = || {
        let v = pgwarden_json(
            &a,
            &["backup", "list", "--json", "--destination", &destination],
        );
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["status"] == "complete")
            .count()
    };

    // On request: the annotation's value comes back in the condition.
    server.update_with("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER, |c| {
        c["metadata"]["annotations"] = serde_json::json!({"pgwarden.dev/backup": "before-upgrade"});
    });
    let done = eventually("the requested backup", LONG, async || {
        condition(&server, "pg-0", "Backup").filter(|c| c["reason"] == "BackupCompleted")
    })
    .await;
    let message = done["message"].as_str().unwrap();
    assert!(
        message.starts_with("pgwarden.dev/backup=before-upgrade: backup "),
        "{done}"
    );
    assert_eq!(complete(), 1);
    let reasons = event_reasons(&server);
    for r in ["BackupStarted", "BackupCompleted"] {
        assert!(reasons.iter().any(|x| x == r), "no {r} Event: {reasons:?}");
    }

    // The same through the command line, which waits for the outcome.
    let out = std::process::Command::new(support::binary())
        .args([
            "backup",
            "--cluster",
            CLUSTER,
            "--namespace",
            NS,
            "--timeout",
            "60s",
        ])
        .env("KUBECONFIG", server.kubeconfig(a.dir.path(), "cli"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("pgwarden.dev/backup=cli-") && said.contains(" complete"),
        "{said}"
    );
    assert_eq!(complete(), 2);

    // A schedule that does not parse is refused with the field named; a valid one runs.
    server.update_with("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER, |c| {
        c["spec"]["backup"] = serde_json::json!({"schedule": "nightly"});
    });
    let refused = eventually("the bad schedule refused", LONG, async || {
        condition(&server, "pg-0", "SpecValid").filter(|c| c["status"] == "False")
    })
    .await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("spec.backup.schedule"),
        "{refused}"
    );
    server.update_with("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER, |c| {
        c["spec"]["backup"] = serde_json::json!({"schedule": "*/2 * * * * *", "retention": "1h"});
    });
    eventually("two scheduled backups", LONG, async || {
        (complete() >= 3).then_some(())
    })
    .await;
    assert_eq!(
        condition(&server, "pg-0", "SpecValid").unwrap()["status"],
        "True"
    );
    // The primary's status.backups: what the catalog holds and how the last backup went.
    let status = eventually("status.backups", LONG, async || {
        let c = server.get("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER)?;
        let b = c["status"]["backups"].clone();
        (b["complete"].as_u64()? >= 4).then_some(b)
    })
    .await;
    let last = &status["lastSuccessful"];
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .starts_with("scheduled slot "),
        "{status}"
    );
    assert!(
        last["id"].is_string() && status.get("lastFailed").is_none(),
        "{status}"
    );
    let first = status["firstRecoverablePoint"].as_str().unwrap();
    let latest = status["lastRecoverablePoint"].as_str().unwrap();
    assert!(first < latest, "{status}");

    // A window of one second: the backups it no longer needs go, with an Event.
    server.update_with("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER, |c| {
        c["spec"]["backup"] = serde_json::json!({"schedule": "*/2 * * * * *", "retention": "1s"});
    });
    eventually("RetentionApplied", LONG, async || {
        event_reasons(&server)
            .iter()
            .any(|r| r == "RetentionApplied")
            .then_some(())
    })
    .await;
    assert!(complete() >= 1, "the newest backup is kept");

    // A scheduled backup that cannot be stored fails visibly (`status.backups.lastFailed`, a
    // warning Event), and the next one after the cause is gone completes.
    use std::os::unix::fs::PermissionsExt;
    let base = archive_dir.path().join("base");
    let mode = |m: u32| std::fs::set_permissions(&base, std::fs::Permissions::from_mode(m));
    let backups = || {
        server
            .get("pgwarden.dev/v1", "postgresclusters", NS, CLUSTER)
            .map(|c| c["status"]["backups"].clone())
            .unwrap_or_default()
    };
    mode(0o555).unwrap();
    let failed = eventually("a failed backup", LONG, async || {
        let b = backups();
        b["lastFailed"]
            .is_object()
            .then_some(b["lastFailed"].clone())
    })
    .await;
    mode(0o755).unwrap();
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.starts_with("scheduled slot ") && message.contains("Permission denied"),
        "{failed}"
    );
    assert!(
        event_reasons(&server).iter().any(|r| r == "BackupFailed"),
        "no BackupFailed Event"
    );
    let failed_at = failed["time"].as_str().unwrap().to_string();
    eventually("a backup after the failure", LONG, async || {
        let b = backups();
        let done = b["lastSuccessful"]["time"].as_str()?.to_string();
        (done > failed_at).then_some(())
    })
    .await;
    drop(c);
    stop(warden);
}
