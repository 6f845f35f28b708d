//! `pgwarden backup --cluster NAME`: asks the cluster's primary for a backup through the
//! `pgwarden.dev/backup` annotation (what `kubectl annotate` would do) and waits for the
//! outcome, which the instance that took it reports in its `Backup` condition.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kube::api::{Patch, PatchParams};
use serde_json::{json, Value};

use super::spec::BACKUP_ANNOTATION;

pub struct Request {
    pub cluster: String,
    pub namespace: Option<String>,
    pub timeout: Duration,
}

/// Bound for each API call.
const CALL: Duration = Duration::from_secs(10);

/// The `Backup` condition of any instance that answers the request `value`: (completed, message).
fn outcome(cluster: &Value, value: &str) -> Option<(bool, String)> {
    let prefix = format!("{BACKUP_ANNOTATION}={value}: ");
    let instances = cluster.pointer("/status/instances")?.as_object()?;
    instances.values().find_map(|i| {
        let c = i["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Backup")?;
        let message = c["message"].as_str()?;
        if !message.starts_with(&prefix) {
            return None;
        }
        match c["reason"].as_str()? {
            "BackupCompleted" => Some((true, message.to_string())),
            "BackupFailed" => Some((false, message.to_string())),
            _ => None,
        }
    })
}

/// Requests a backup and waits for it: `Ok` with the instance's message once it completed.
pub async fn run(r: Request) -> anyhow::Result<String> {
    let (client, namespace) = crate::k8s::cli_client(r.namespace.clone()).await?;
    let clusters = crate::k8s::clusters(&client, &namespace);
    // Any new value asks for one; this one also says who asked and when.
    let value = format!(
        "cli-{}",
        super::info::backup_id(std::time::SystemTime::now())
    );
    let patch = Patch::Merge(json!({"metadata": {"annotations": {BACKUP_ANNOTATION: value}}}));
    tokio::time::timeout(
        CALL,
        clusters.patch(&r.cluster, &PatchParams::default(), &patch),
    )
    .await
    .context("the API server did not answer")?
    .with_context(|| format!("cannot annotate PostgresCluster {namespace}/{}", r.cluster))?;
    println!("backup requested ({BACKUP_ANNOTATION}={value})");
    let started = Instant::now();
    while started.elapsed() < r.timeout {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(Ok(cluster)) = tokio::time::timeout(CALL, clusters.get(&r.cluster)).await else {
            continue;
        };
        match outcome(&cluster.data, &value) {
            Some((true, message)) => return Ok(message),
            Some((false, message)) => bail!("{message}"),
            None => {}
        }
    }
    bail!(
        "no instance reported the backup within {:?} (is there a primary? its log tells)",
        r.timeout
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcome_is_read_from_the_answering_instance() {
        let cluster = json!({"status": {"instances": {
            "pg-0": {"conditions": [{"type": "Backup", "reason": "BackupCompleted",
                     "message": "pgwarden.dev/backup=old: backup X complete"}]},
            "pg-1": {"conditions": [{"type": "Backup", "reason": "BackupFailed",
                     "message": "pgwarden.dev/backup=new: no space"}]},
        }}});
        assert_eq!(
            outcome(&cluster, "old"),
            Some((true, "pgwarden.dev/backup=old: backup X complete".into()))
        );
        assert_eq!(
            outcome(&cluster, "new"),
            Some((false, "pgwarden.dev/backup=new: no space".into()))
        );
        assert_eq!(outcome(&cluster, "other"), None);
        assert_eq!(outcome(&json!({}), "old"), None);
    }
}
