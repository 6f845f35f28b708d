//! Passwords from Kubernetes Secrets: the superuser's and the replication user's, applied with
//! `ALTER ROLE` whenever they change.
//!
//! The password is never logged, never put in an Event, and never sent to Postgres in clear
//! text: pgwarden sends the SCRAM-SHA-256 verifier, so even a failing statement logged by the
//! server shows no password.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::sync::watch;

use super::crd::{KeyRef, SecretsSpec};
use super::events::Events;
use super::follow;
use super::Shared;
use crate::config::PostgresConfig;
use crate::monitor::snapshot::Role;
use crate::monitor::Observation;
use crate::postgres::connect::{connect_timeout, Target};

/// The role standbys replicate as.
pub const REPLICATION_ROLE: &str = "streaming_replica";

pub struct SecretsTask {
    pub client: Client,
    pub shared: Arc<Shared>,
    pub events: Events,
    pub pg: PostgresConfig,
    pub observation: watch::Receiver<Observation>,
}

/// Which role a Secret is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Purpose {
    Superuser,
    Replication,
}

impl SecretsTask {
    pub async fn run(self, spec: watch::Receiver<Option<SecretsSpec>>) {
        let me = &self;
        follow::current(spec, |s| async move { me.follow(&s).await }, || {}).await;
    }

    /// Watches both Secrets and applies their passwords until the references change.
    async fn follow(&self, refs: &SecretsSpec) {
        let api: Api<Secret> =
            Api::namespaced(self.client.clone(), &self.shared.identity.namespace);
        let watch_one = |purpose: Purpose, r: &KeyRef| {
            let key = r.key.clone();
            follow::named(api.clone(), &r.name, self.shared.clone())
                .map(move |r| (purpose, key.clone(), r))
        };
        let mut stream = std::pin::pin!(futures::stream::select(
            watch_one(Purpose::Superuser, &refs.superuser),
            watch_one(Purpose::Replication, &refs.replication),
        ));
        // Last password applied per role, to act on changes only.
        let mut applied: BTreeMap<Purpose, String> = BTreeMap::new();
        let mut pending: BTreeMap<Purpose, (String, String)> = BTreeMap::new();
        let mut retry = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                Some((purpose, key, result)) = stream.next() => {
                    let Ok(secret) = result else { continue };
                    let name = secret.metadata.name.clone().unwrap_or_default();
                    match password(&secret, &key) {
                        Ok(pw) => {
                            if purpose == Purpose::Replication {
                                // Every instance needs it: standbys to stream and clone.
                                self.shared.replication_password.send_replace(Some(pw.clone()));
                            }
                            pending.insert(purpose, (name, pw));
                        }
                        Err(problem) => {
                            tracing::error!(secret = %name, %problem, "unusable password Secret");
                            self.events.warning("InvalidSecret", format!("Secret {name}: {problem}")).await;
                            continue;
                        }
                    }
                }
                _ = retry.tick() => {}
            }
            // Passwords are set on the primary only; standbys receive them by replication.
            let primary = self
                .observation
                .borrow()
                .pg
                .as_ref()
                .is_some_and(|p| p.role == Role::Primary);
            if !primary {
                continue;
            }
            for (purpose, (secret, pw)) in std::mem::take(&mut pending) {
                if applied.get(&purpose) == Some(&pw) {
                    continue;
                }
                match self.apply(purpose, &pw).await {
                    Ok(role) => {
                        tracing::info!(%role, %secret, "password applied from the Secret");
                        self.events
                            .normal(
                                "PasswordChanged",
                                format!("password of role {role} set from Secret {secret}"),
                            )
                            .await;
                        applied.insert(purpose, pw);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, %secret, "cannot apply the password yet; retrying");
                        pending.insert(purpose, (secret, pw));
                    }
                }
            }
        }
    }

    async fn apply(&self, purpose: Purpose, password: &str) -> Result<String, String> {
        let target = Target::admin(&self.pg);
        let conn = connect_timeout(&target).await.map_err(|e| e.to_string())?;
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        let (role, setup) = match purpose {
            Purpose::Superuser => (self.pg.superuser.clone(), String::new()),
            Purpose::Replication => (
                REPLICATION_ROLE.to_string(),
                format!(
                    "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{REPLICATION_ROLE}') THEN CREATE ROLE {REPLICATION_ROLE} WITH REPLICATION LOGIN; END IF; END $$; \
                     GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean), pg_catalog.pg_stat_file(text, boolean), pg_catalog.pg_read_binary_file(text), pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {REPLICATION_ROLE};"
                ),
            ),
        };
        // The verifier has only base64 characters, '$', ':' and digits: no quoting issue.
        // `synchronous_commit = local`: in quorum mode a commit waits for standbys, and the
        // standbys need this role to connect at all.
        let sql = format!(
            "SET synchronous_commit = local; {setup} ALTER ROLE \"{role}\" PASSWORD '{verifier}'"
        );
        tokio::time::timeout(Duration::from_secs(5), conn.batch_execute(&sql))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| {
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_string())
            })?;
        Ok(role)
    }
}

/// The password under `key`, checked to be usable.
fn password(secret: &Secret, key: &str) -> Result<String, String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.clone().into_bytes())
        })
        .ok_or_else(|| format!("has no key {key:?}"))?;
    let pw = String::from_utf8(bytes).map_err(|_| format!("key {key:?} is not UTF-8"))?;
    let pw = pw.trim_end_matches(['\n', '\r']).to_string();
    if pw.is_empty() {
        return Err(format!("key {key:?} is empty"));
    }
    Ok(pw)
}
