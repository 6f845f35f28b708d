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

/// Whether a failsafe round confirms `primary`: every other instance of the `instances` the
/// spec asks for is listed and answered that it cannot reach the API server either and has
/// promised not to compete. An instance missing from the list could reach the API server and
/// take the Lease, so nobody listed confirms nothing, unless there is nobody who could take
/// over (one instance).
pub fn failsafe_confirmed(
    primary: &str,
    members: &[Member],
    instances: usize,
    docs: &BTreeMap<String, Value>,
) -> bool {
    if instances <= 1 {
        return true;
    }
    members.len() + 1 >= instances
        && members.iter().all(|m| {
            docs.get(&m.name)
                .is_some_and(|d| api_unreachable(d) && promised_to(d, primary))
        })
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
    let flag = |key: &str| {
        doc.get("ha")
            .and_then(|h| h.get(key))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    // One standing down after repeated crashes is out of the running, as a fenced one is.
    let fenced = flag("fenced") || flag("standing_down");
    let has_data = doc.pointer("/ha/has_data").and_then(Value::as_bool) == Some(true);
    let health = doc.get("health").and_then(Value::as_str);
    // On its way up (not yet started, starting, recovering), not one that keeps crashing or
    // hangs: a primary that gave the Lease up after repeated crashes must not hold up the
    // failover away from it.
    let coming_up = matches!(health, Some("stopped" | "starting" | "crash_recovery"));
    Peer {
        name: name.to_string(),
        healthy: health == Some("ready"),
        fenced,
        starting: has_data && !fenced && newest.is_none() && coming_up,
        replica: pg.and_then(|p| p.get("role")).and_then(Value::as_str) == Some("replica"),
        primary: doc
            .get("ha")
            .and_then(|h| h.get("role"))
            .and_then(Value::as_str)
            == Some("primary"),
        lsn: newest,
        replayed: lsn("replayed"),
        timeline: pg
            .and_then(|p| p.get("timeline"))
            .and_then(Value::as_u64)
            .and_then(|t| u32::try_from(t).ok()),
    }
}

/// How long a member that did not answer the last round gets in the next ones.
pub const SILENT_TIMEOUT: Duration = Duration::from_millis(250);

/// Which members did not answer, round after round: a dead peer (a hung node black-holes its
/// connections) costs the full timeout once, not at every tick, and not at the tick that
/// matters (a standby deciding at the Lease's expiry, another following the new primary).
/// Every third round it gets the full timeout again, so that a slow but live peer is heard.
#[derive(Debug, Default)]
pub struct Silence {
    rounds: BTreeMap<String, u32>,
}

impl Silence {
    /// The timeout for `member` this round.
    pub fn timeout(&self, member: &str, full: Duration) -> Duration {
        match self.rounds.get(member) {
            Some(n) if n % 3 != 0 => SILENT_TIMEOUT.min(full),
            _ => full,
        }
    }

    /// Records who answered.
    pub fn heard(&mut self, members: &[Member], docs: &BTreeMap<String, Value>) {
        for m in members {
            if docs.contains_key(&m.name) {
                self.rounds.remove(&m.name);
            } else {
                *self.rounds.entry(m.name.clone()).or_default() += 1;
            }
        }
        self.rounds
            .retain(|name, _| members.iter().any(|m| &m.name == name));
    }
}

/// The client for the peers' `/pg/status`: plain HTTP, or while TLS is on HTTPS that
/// verifies each peer's certificate against the cluster CA (and its address against the
/// certificate's names).
pub struct PeerClient {
    plain: reqwest::Client,
    tls: crate::tls::Current,
    /// The HTTPS client for the material it was built from.
    cached: std::sync::Mutex<Option<(std::sync::Arc<crate::tls::Material>, reqwest::Client)>>,
}

impl PeerClient {
    pub fn new(plain: reqwest::Client, tls: crate::tls::Current) -> PeerClient {
        PeerClient {
            plain,
            tls,
            cached: std::sync::Mutex::default(),
        }
    }

    /// The scheme and client to use now.
    fn current(&self) -> (&'static str, reqwest::Client) {
        let Some(material) = self.tls.borrow().clone() else {
            return ("http", self.plain.clone());
        };
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((m, client)) = cached.as_ref() {
            if std::sync::Arc::ptr_eq(m, &material) {
                return ("https", client.clone());
            }
        }
        let built = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .tls_backend_preconfigured((*material.client_config).clone())
            .build();
        match built {
            Ok(client) => {
                *cached = Some((material, client.clone()));
                ("https", client)
            }
            Err(e) => {
                // Never plain text to a peer that expects TLS: its answers would be refused.
                tracing::error!(error = %e, "cannot build the HTTPS client for peers");
                ("https", self.plain.clone())
            }
        }
    }
}

/// What a peer round asks of the members besides their status.
#[derive(Debug, Clone, Copy)]
pub enum Ask<'a> {
    /// Their status as they last observed it.
    Status,
    /// The failsafe promise to `primary`, with its token (see `elector` and `failsafe`).
    Failsafe { primary: &'a str, token: &'a str },
    /// Their status from a new observation (a switchover waiting for its target's WAL).
    Fresh,
}

/// Fetches every member's `/pg/status` at once; members that do not answer in their timeout
/// are left out (a candidate decides from those it heard).
pub async fn fetch(
    http: &PeerClient,
    members: &[Member],
    timeout: impl Fn(&str) -> Duration,
    ask: Ask<'_>,
) -> BTreeMap<String, Value> {
    let (query, token) = match ask {
        Ask::Status => (String::new(), None),
        Ask::Failsafe { primary, token } => {
            (format!("?failsafe={primary}"), Some(token.to_string()))
        }
        Ask::Fresh => ("?fresh=1".to_string(), None),
    };
    let (scheme, http) = http.current();
    let http = &http;
    let calls = members.iter().filter_map(|m| {
        let url = format!("{scheme}://{}/pg/status{query}", m.status.as_ref()?);
        let name = m.name.clone();
        let token = token.clone();
        let timeout = timeout(&m.name);
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
        assert!(!stopped.starting, "fenced: not waited for");
        assert!(!p.starting, "it has a position");
        // Data and no position yet: waited for while on its way up, not while crash-looping.
        let doc = |health| json!({"health": health, "ha": {"fenced": false, "has_data": true}, "postgres": null});
        for (health, starting) in [
            ("stopped", true),
            ("starting", true),
            ("crash_recovery", true),
            ("restarting", false),
            ("failed", false),
        ] {
            assert_eq!(
                from_status("pg-2", &doc(health)).starting,
                starting,
                "{health}"
            );
        }
        let down = json!({"health": "stopped", "ha": {"fenced": false, "has_data": true, "standing_down": true}, "postgres": null});
        let down = from_status("pg-2", &down);
        assert!(
            down.fenced && !down.starting,
            "standing down: neither waited for nor eligible"
        );
        let empty = json!({"health": "stopped", "ha": {"fenced": false, "has_data": false}, "postgres": null});
        assert!(
            !from_status("pg-2", &empty).starting,
            "no data: nothing to wait for"
        );
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

    #[test]
    fn failsafe_needs_every_instance_of_the_spec_to_promise() {
        let member = |n: &str| Member {
            name: n.into(),
            postgres: None,
            status: Some("127.0.0.1:1".into()),
        };
        let promised =
            json!({"kubernetes": {"api": {"reachable": false}, "failsafe_promised_to": "a"}});
        let reachable =
            json!({"kubernetes": {"api": {"reachable": true}, "failsafe_promised_to": "a"}});
        let to_other =
            json!({"kubernetes": {"api": {"reachable": false}, "failsafe_promised_to": "x"}});
        let docs = |list: &[(&str, &Value)]| -> BTreeMap<String, Value> {
            list.iter()
                .map(|(n, d)| (n.to_string(), (*d).clone()))
                .collect()
        };
        let (b, c) = (member("b"), member("c"));
        let both = [b.clone(), c.clone()];
        assert!(failsafe_confirmed(
            "a",
            &both,
            3,
            &docs(&[("b", &promised), ("c", &promised)])
        ));
        assert!(
            !failsafe_confirmed("a", &both, 3, &docs(&[("b", &promised)])),
            "c did not answer"
        );
        assert!(!failsafe_confirmed(
            "a",
            &both,
            3,
            &docs(&[("b", &promised), ("c", &reachable)])
        ));
        assert!(!failsafe_confirmed(
            "a",
            &both,
            3,
            &docs(&[("b", &promised), ("c", &to_other)])
        ));
        assert!(
            !failsafe_confirmed("a", &[b], 3, &docs(&[("b", &promised)])),
            "an instance of the spec is not listed: it could take the Lease"
        );
        assert!(
            !failsafe_confirmed("a", &[], 3, &BTreeMap::new()),
            "nobody listed"
        );
        assert!(
            failsafe_confirmed("a", &[], 1, &BTreeMap::new()),
            "one instance"
        );
    }

    #[test]
    fn a_silent_member_gets_a_short_timeout_and_every_third_round_a_full_one() {
        let full = Duration::from_millis(800);
        let members = [Member {
            name: "b".into(),
            postgres: None,
            status: None,
        }];
        let mut silence = Silence::default();
        assert_eq!(silence.timeout("b", full), full);
        let mut timeouts = Vec::new();
        for _ in 0..4 {
            silence.heard(&members, &BTreeMap::new());
            timeouts.push(silence.timeout("b", full));
        }
        assert_eq!(
            timeouts,
            [SILENT_TIMEOUT, SILENT_TIMEOUT, full, SILENT_TIMEOUT]
        );
        let answered = BTreeMap::from([("b".to_string(), json!({}))]);
        silence.heard(&members, &answered);
        assert_eq!(silence.timeout("b", full), full);
    }

    /// A peer on 127.0.0.1 serving `/pg/status` over TLS with `server` (any request, one
    /// answer per connection); its `host:port`.
    async fn https_peer(server: std::sync::Arc<rustls::ServerConfig>) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut request = [0u8; 1024];
                let _ = tls.read(&mut request).await;
                let body = r#"{"name":"peer"}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        address
    }

    #[tokio::test]
    async fn a_peer_whose_certificate_another_ca_signed_is_not_heard() {
        use crate::tls::issue::{issue_server, new_ca, Names, Whereabouts};
        use std::time::SystemTime;
        let now = SystemTime::now();
        let names = Names::for_instance(&Whereabouts {
            cluster: "pg",
            namespace: "ns",
            pod: "pg-1",
            addresses: &[],
        });
        let material = |ca: &crate::tls::issue::KeyAndCert| {
            let cert = issue_server(ca, "pg-1", &names, now, Duration::from_secs(600)).unwrap();
            std::sync::Arc::new(
                crate::tls::Material::new(
                    crate::k8s::crd::TlsMode::Preferred,
                    ca.cert_pem.clone(),
                    cert,
                )
                .unwrap(),
            )
        };
        let (ours, foreign) = (new_ca("pg", now).unwrap(), new_ca("pg", now).unwrap());
        let (mine, peer, impostor) = (material(&ours), material(&ours), material(&foreign));
        let members = [
            Member {
                name: "pg-1".into(),
                postgres: None,
                status: Some(https_peer(peer.server_config.clone()).await),
            },
            Member {
                name: "pg-2".into(),
                postgres: None,
                status: Some(https_peer(impostor.server_config.clone()).await),
            },
        ];
        let (_tx, current) = tokio::sync::watch::channel(Some(mine));
        // The plain client's builder wants a provider installed (see ha::start).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = PeerClient::new(reqwest::Client::new(), current);
        let heard = fetch(&client, &members, |_| Duration::from_secs(5), Ask::Status).await;
        assert_eq!(heard.keys().collect::<Vec<_>>(), ["pg-1"], "{heard:?}");
        assert_eq!(heard["pg-1"]["name"], "peer");
    }
}
