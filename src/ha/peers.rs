//! The other instances as they describe themselves: their status entries in the
//! PostgresCluster (where to reach them) and their live `/pg/status` (fetched directly, with
//! short timeouts, because a failover decision must not trust a report that may be seconds old).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::decide::{OthersData, Peer};
use super::replica::Address;
use crate::postgres::lsn::Lsn;

/// Where an instance says it can be reached (from `status.instances.<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub postgres: Option<Address>,
    pub status: Option<String>,
}

/// The members listed in the cluster's status, this instance excluded.
pub fn members(cluster: &Value, me: &str) -> Vec<Member> {
    let Some(instances) = cluster
        .get("status")
        .and_then(|s| s.get("instances"))
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    instances
        .iter()
        .filter(|(name, _)| name.as_str() != me)
        .map(|(name, e)| Member {
            name: name.clone(),
            postgres: e
                .get("postgresAddress")
                .and_then(Value::as_str)
                .and_then(Address::parse),
            status: e
                .get("statusAddress")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
        .collect()
}

/// What the other instances said of their data directories, from their `/pg/status`: one
/// that runs Postgres, or whose elector says so, has data; one that says nothing of it (an
/// older pgwarden) counts as having data, so that nobody initialises on a guess.
pub fn others_data(docs: &BTreeMap<String, Value>, instances: usize) -> OthersData {
    let present: Vec<String> = docs
        .iter()
        .filter(|(_, doc)| {
            let running = doc.get("postgres").is_some_and(|p| !p.is_null());
            let said = doc.pointer("/ha/has_data").and_then(Value::as_bool);
            running || said != Some(false)
        })
        .map(|(name, _)| name.clone())
        .collect();
    let expected = instances.saturating_sub(1);
    if !present.is_empty() {
        OthersData::Present(present)
    } else if docs.len() < expected {
        OthersData::Unheard {
            heard: docs.len(),
            expected,
        }
    } else {
        OthersData::AllEmpty
    }
}

/// Whether a peer promised `primary` not to compete (the answer to its failsafe request).
pub fn promised_to(doc: &Value, primary: &str) -> bool {
    doc.pointer("/kubernetes/failsafe_promised_to")
        .and_then(Value::as_str)
        == Some(primary)
}

/// Whether a peer says it cannot reach the API server either.
pub fn api_unreachable(doc: &Value) -> bool {
    doc.pointer("/kubernetes/api/reachable") == Some(&Value::Bool(false))
}

/// A peer's live state, as far as the decision needs it.
pub fn from_status(name: &str, doc: &Value) -> Peer {
    let pg = doc.get("postgres").filter(|p| !p.is_null());
    let lsn = |key: &str| -> Option<Lsn> { pg?.get("lsn")?.get(key)?.as_str()?.parse().ok() };
    let newest = [lsn("current"), lsn("received"), lsn("replayed")]
        .into_iter()
        .flatten()
        .max();
    Peer {
        name: name.to_string(),
        healthy: doc.get("health").and_then(Value::as_str) == Some("ready"),
        fenced: doc
            .get("ha")
            .and_then(|h| h.get("fenced"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        replica: pg.and_then(|p| p.get("role")).and_then(Value::as_str) == Some("replica"),
        primary: doc
            .get("ha")
            .and_then(|h| h.get("role"))
            .and_then(Value::as_str)
            == Some("primary"),
        lsn: newest,
        replayed: lsn("replayed"),
    }
}

/// Fetches every member's `/pg/status` at once; members that do not answer in `timeout` are
/// left out (a candidate decides from those it heard). `failsafe` names the primary asking
/// for the failsafe promise and carries its token (see `elector` and `failsafe`).
pub async fn fetch(
    http: &reqwest::Client,
    members: &[Member],
    timeout: Duration,
    failsafe: Option<(&str, &str)>,
) -> BTreeMap<String, Value> {
    let query = failsafe.map_or_else(String::new, |(p, _)| format!("?failsafe={p}"));
    let token = failsafe.map(|(_, t)| t.to_string());
    let calls = members.iter().filter_map(|m| {
        let url = format!("http://{}/pg/status{query}", m.status.as_ref()?);
        let name = m.name.clone();
        let token = token.clone();
        Some(async move {
            let doc = async {
                let mut request = http.get(&url).timeout(timeout);
                if let Some(token) = token {
                    request = request.header(super::failsafe::HEADER, token);
                }
                let response = request.send().await.ok()?;
                let body = response.bytes().await.ok()?;
                serde_json::from_slice::<Value>(&body).ok()
            };
            (
                name,
                tokio::time::timeout(timeout, doc).await.ok().flatten(),
            )
        })
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .filter_map(|(name, doc)| Some((name, doc?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn members_and_peers_from_documents() {
        let cluster = json!({"status": {"instances": {
            "pg-0": {"postgresAddress": "10.0.0.1:5432", "statusAddress": "10.0.0.1:8000"},
            "pg-1": {"role": "replica"},
            "me": {"postgresAddress": "10.0.0.3:5432"}
        }}});
        let m = members(&cluster, "me");
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].postgres.as_ref().map(|a| a.port), Some(5432));
        assert_eq!(m[0].status.as_deref(), Some("10.0.0.1:8000"));
        assert_eq!(m[1].postgres, None);

        let doc = json!({"health": "ready", "ha": {"fenced": false},
            "postgres": {"role": "replica", "lsn": {"current": null, "received": "0/3000100", "replayed": "0/3000000"}}});
        let p = from_status("pg-1", &doc);
        assert!(p.healthy && p.replica && !p.fenced);
        assert_eq!(p.lsn, Some(Lsn(0x3000100)));
        let stopped = from_status(
            "pg-2",
            &json!({"health": "fenced", "ha": {"fenced": true}, "postgres": null}),
        );
        assert!(!stopped.healthy && stopped.fenced && stopped.lsn.is_none());
    }

    #[test]
    fn data_elsewhere_from_documents() {
        let empty = json!({"ha": {"has_data": false}, "postgres": null});
        let docs = |list: &[(&str, Value)]| -> BTreeMap<String, Value> {
            list.iter()
                .map(|(n, d)| (n.to_string(), d.clone()))
                .collect()
        };
        let two_empty = docs(&[("b", empty.clone()), ("c", empty.clone())]);
        assert_eq!(others_data(&two_empty, 3), OthersData::AllEmpty);
        assert_eq!(
            others_data(&docs(&[("b", empty.clone())]), 3),
            OthersData::Unheard {
                heard: 1,
                expected: 2
            }
        );
        assert_eq!(others_data(&BTreeMap::new(), 1), OthersData::AllEmpty);
        let with = docs(&[
            ("b", empty.clone()),
            ("c", json!({"ha": {"has_data": true}, "postgres": null})),
        ]);
        assert_eq!(others_data(&with, 3), OthersData::Present(vec!["c".into()]));
        let running = docs(&[("b", json!({"ha": null, "postgres": {"role": "replica"}}))]);
        assert_eq!(
            others_data(&running, 2),
            OthersData::Present(vec!["b".into()])
        );
        let silent = docs(&[("b", json!({"ha": null, "postgres": null}))]);
        assert_eq!(
            others_data(&silent, 2),
            OthersData::Present(vec!["b".into()])
        );
    }
}
