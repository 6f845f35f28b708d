//! `pgwarden switchover --to <instance>`: the command-line side of a planned switchover.
//!
//! It only sets the `pgwarden.dev/switchover-to` annotation (what `kubectl annotate` would do)
//! and waits for the outcome; the primary's elector does the work and removes the annotation.
//! Obvious refusals (unknown instance, not a ready standby) are answered before asking.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};

use super::SWITCHOVER_ANNOTATION;

pub struct Request {
    pub cluster: String,
    pub namespace: Option<String>,
    pub to: String,
    pub timeout: Duration,
}

/// Runs the switchover; `Ok` once `to` holds the Lease and is the cluster's primary.
pub async fn run(r: Request) -> anyhow::Result<()> {
    let (client, namespace) = crate::k8s::cli_client(r.namespace.clone()).await?;
    let clusters = crate::k8s::clusters(&client, &namespace);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let lease_name = format!("{}-leader", r.cluster);

    let cluster = clusters
        .get(&r.cluster)
        .await
        .with_context(|| format!("cannot read PostgresCluster {namespace}/{}", r.cluster))?;
    if holder(&leases, &lease_name).await.as_deref() == Some(r.to.as_str()) {
        println!("{} is already the primary", r.to);
        return Ok(());
    }
    precheck(&cluster.data, &r.to)?;

    let patch = Patch::Merge(json!({"metadata": {"annotations": {SWITCHOVER_ANNOTATION: r.to}}}));
    clusters
        .patch(&r.cluster, &PatchParams::default(), &patch)
        .await
        .context("cannot annotate the PostgresCluster")?;
    println!("switchover to {} requested", r.to);

    let started = Instant::now();
    let mut asked = true;
    while started.elapsed() < r.timeout {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(cluster) = clusters.get(&r.cluster).await else {
            continue;
        };
        let primary = cluster
            .data
            .pointer("/status/currentPrimary")
            .and_then(Value::as_str);
        if holder(&leases, &lease_name).await.as_deref() == Some(r.to.as_str())
            && primary == Some(r.to.as_str())
        {
            println!(
                "{} is the primary (after {:.1} s)",
                r.to,
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        // The primary removes the annotation when it is done, successful or not.
        asked = annotation(&cluster).is_some();
        if !asked && started.elapsed() > Duration::from_secs(2) {
            if let Some(reason) = refusal(&client, &namespace, &r.to).await {
                bail!("switchover refused: {reason}");
            }
        }
    }
    if asked {
        let _ = clusters
            .patch(
                &r.cluster,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {SWITCHOVER_ANNOTATION: null}}})),
            )
            .await;
        bail!(
            "no primary took the request within {:?} (is the primary's pgwarden running?); request withdrawn",
            r.timeout
        );
    }
    bail!("{} did not become the primary within {:?}", r.to, r.timeout)
}

/// Refuses what the cluster's status already rules out.
fn precheck(cluster: &Value, to: &str) -> anyhow::Result<()> {
    let Some(entry) = cluster.pointer(&format!("/status/instances/{to}")) else {
        bail!("switchover refused: {to} is not an instance of this cluster");
    };
    if entry.get("role").and_then(Value::as_str) != Some("replica") {
        bail!("switchover refused: {to} is not a standby");
    }
    if entry.get("ready") != Some(&Value::Bool(true)) {
        bail!("switchover refused: {to} is not ready");
    }
    Ok(())
}

fn annotation(cluster: &DynamicObject) -> Option<String> {
    cluster
        .metadata
        .annotations
        .as_ref()?
        .get(SWITCHOVER_ANNOTATION)
        .cloned()
}

async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get_opt(name).await.ok()??.spec?.holder_identity
}

/// The newest `SwitchoverRefused` Event about `to`.
async fn refusal(client: &Client, namespace: &str, to: &str) -> Option<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = events.list(&ListParams::default()).await.ok()?;
    list.items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("SwitchoverRefused"))
        .filter_map(|e| Some((e.event_time.clone(), e.note?)))
        .filter(|(_, note)| note.starts_with(&format!("switchover to {to}:")))
        .max_by(|a, b| a.0.as_ref().map(|t| t.0).cmp(&b.0.as_ref().map(|t| t.0)))
        .map(|(_, note)| note)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prechecks_name_the_reason() {
        let c = json!({"status": {"instances": {
            "pg-1": {"role": "replica", "ready": true},
            "pg-2": {"role": "replica", "ready": false},
            "pg-0": {"role": "primary", "ready": true}
        }}});
        assert!(precheck(&c, "pg-1").is_ok());
        let msg = |to| precheck(&c, to).map_err(|e| e.to_string()).err();
        assert_eq!(
            msg("pg-2").as_deref(),
            Some("switchover refused: pg-2 is not ready")
        );
        assert_eq!(
            msg("pg-0").as_deref(),
            Some("switchover refused: pg-0 is not a standby")
        );
        assert_eq!(
            msg("pg-9").as_deref(),
            Some("switchover refused: pg-9 is not an instance of this cluster")
        );
    }
}
