//! What the demo shows of the cluster: each instance's live `/pg/status` and the leader Lease,
//! read every second.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::apiserver::ApiServer;
use super::instance::Instance;
use super::setup::{lease_name, NAMESPACE};

/// How long one `/pg/status` request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest status document read.
const MAX_STATUS: u64 = 4 << 20;

/// The cluster as seen in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// Per instance, in words: "primary", "standby, streaming from pg-0", "down", ...
    pub states: Vec<String>,
    /// The instance that says it is the primary, runs as one and holds the Lease.
    pub primary: Option<usize>,
    /// A primary, and every other instance streaming from it.
    pub ready: bool,
}

impl View {
    /// One line: `pg-0 primary | pg-1 standby, streaming from pg-0 | ...`.
    pub fn line(&self, names: &[String]) -> String {
        let parts: Vec<String> = names
            .iter()
            .zip(&self.states)
            .map(|(name, state)| format!("{name} {state}"))
            .collect();
        parts.join(" | ")
    }
}

pub async fn observe(instances: &[Instance], server: &ApiServer) -> View {
    let statuses =
        futures::future::join_all(instances.iter().map(|i| status(i.ports.status))).await;
    let lease = server.get("coordination.k8s.io/v1", "leases", NAMESPACE, &lease_name());
    let holder = lease
        .ok()
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string));
    let states: Vec<String> = instances
        .iter()
        .zip(&statuses)
        .map(|(instance, status)| describe(instance, status.as_ref()))
        .collect();
    let claims: Vec<usize> = (0..instances.len())
        .filter(|&i| states[i] == "primary")
        .collect();
    let primary = match claims[..] {
        [i] if holder.as_deref() == Some(instances[i].name.as_str()) => Some(i),
        _ => None,
    };
    let ready = primary.is_some_and(|p| {
        (0..instances.len())
            .filter(|&i| i != p)
            .all(|i| states[i].starts_with("standby, streaming"))
    });
    View {
        states,
        primary,
        ready,
    }
}

/// An instance's state in words.
fn describe(instance: &Instance, status: Option<&Value>) -> String {
    if !instance.is_running() {
        return match instance.restart_at {
            Some(_) => "down (restarting soon)".to_string(),
            None => "down".to_string(),
        };
    }
    let Some(s) = status else {
        return "not answering".to_string();
    };
    let health = s["health"].as_str().unwrap_or("unknown");
    let (ha_role, pg_role) = (s["ha"]["role"].as_str(), s["postgres"]["role"].as_str());
    match (ha_role, pg_role) {
        (Some("primary"), Some("primary")) => "primary".to_string(),
        (_, Some("replica")) => {
            if s["postgres"]["wal_receiver"]["status"] == "streaming" {
                match s["ha"]["following"].as_str() {
                    Some(upstream) => format!("standby, streaming from {upstream}"),
                    None => "standby, streaming".to_string(),
                }
            } else {
                "standby, not streaming yet".to_string()
            }
        }
        _ => health.replace('_', " "),
    }
}

/// `GET /pg/status` on the loopback port; None when it does not answer 200 in time.
async fn status(port: u16) -> Option<Value> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request = "GET /pg/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.take(MAX_STATUS).read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if head.split_whitespace().nth(1) != Some("200") {
            return None;
        }
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(STATUS_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}
