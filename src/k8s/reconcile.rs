//! The reconcile loop: watch this instance's PostgresCluster (a field selector on its name:
//! no polling) and apply its spec to the instance.
//!
//! The watch comes from kube-runtime's watcher, which resumes from the last resourceVersion,
//! relists on `410 Gone`, uses bookmarks and backs off on errors. Each new generation is
//! parsed and validated; a bad spec is reported (condition and Event) and changes nothing. A
//! valid one becomes the instance's settings through the postmaster actor, which asks Postgres
//! to check them first; a change that needs a restart is applied by a restart when the update
//! strategy allows it, else reported.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::DynamicObject;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::watch;

use super::crd::{self, KeyRef, PostgresClusterSpec, SecretsSpec, UpdateStrategy};
use super::events::Events;
use super::Shared;
use crate::config::PostgresConfig;
use crate::postgres::connect::{connect_timeout, Target};
use crate::supervisor::postmaster::{self, PostmasterError};

pub struct Reconciler {
    pub api: Api<DynamicObject>,
    pub shared: Arc<Shared>,
    pub events: Events,
    /// Settings from pgwarden's own configuration; the spec is layered on top.
    pub base: PostgresConfig,
    pub postmaster: postmaster::Handle,
    pub secrets: watch::Sender<Option<SecretsSpec>>,
    pub queries: watch::Sender<Option<KeyRef>>,
    /// The Secret with the WAL archive's S3 credentials, for its follower.
    pub wal_credentials: watch::Sender<Option<String>>,
    /// The Secret of `spec.bootstrap.recovery.source`'s credentials.
    pub source_credentials: watch::Sender<Option<String>>,
    pub max_standby_lag: watch::Sender<Option<u64>>,
    pub default_max_standby_lag: Option<u64>,
    /// The WAL archiver and pgwarden's own `[wal]` settings, which `spec.walArchive` layers on.
    pub wal: Option<crate::wal::Handle>,
    pub base_wal: crate::config::WalConfig,
    /// The settings and generation last applied.
    pub applied: Option<(i64, PostgresConfig)>,
    /// A generation already reported as invalid (reported once).
    pub invalid_generation: Option<i64>,
    /// pgwarden's `kubernetes.api_timeout`, which the spec's renew deadline must exceed.
    pub api_timeout: Duration,
}

impl Reconciler {
    pub async fn run(mut self) {
        let config = watcher::Config::default()
            .fields(&format!("metadata.name={}", self.shared.identity.cluster))
            .timeout(super::WATCH_TIMEOUT.as_secs() as u32);
        let stream = watcher(self.api.clone(), config).default_backoff();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            self.shared.api_result(&event);
            match event {
                Ok(watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) => {
                    let obj = Arc::new(obj);
                    self.shared.cluster.send_replace(Some(obj.clone()));
                    self.reconcile(&obj).await;
                }
                Ok(watcher::Event::Delete(_)) => {
                    tracing::warn!(
                        "the PostgresCluster was deleted; keeping the running configuration"
                    );
                    self.shared.cluster.send_replace(None);
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(e) => tracing::debug!(error = %e, "watch interrupted; resuming"),
            }
        }
    }

    async fn reconcile(&mut self, obj: &DynamicObject) {
        let generation = obj.metadata.generation.unwrap_or(0);
        if self.applied.as_ref().is_some_and(|(g, _)| *g == generation)
            || self.invalid_generation == Some(generation)
        {
            return; // a status update or a resync: nothing new in the spec
        }
        let parsed = match parse(obj, self.api_timeout) {
            Ok(parsed) => parsed,
            Err(problems) => {
                self.invalid_generation = Some(generation);
                let kept = match &self.applied {
                    Some((g, _)) => format!("generation {g} stays in force"),
                    None => "no valid spec yet".to_string(),
                };
                let message = format!("{}; {kept}", problems.join("; "));
                tracing::error!(generation, %message, "invalid PostgresCluster spec; keeping the last valid one");
                self.shared.set_condition(
                    "SpecValid",
                    false,
                    "InvalidSpec",
                    &message,
                    Some(generation),
                );
                self.events.warning("InvalidSpec", message).await;
                return;
            }
        };
        let spec = parsed.spec;
        self.shared.spec.send_replace(Some(Arc::new(spec.clone())));
        if parsed.unknown.is_empty() {
            self.shared.set_condition(
                "SpecValid",
                true,
                "Valid",
                "the spec is valid",
                Some(generation),
            );
        } else {
            // Reported once per generation (the reconciler sees each generation once).
            let message = format!(
                "ignored, unknown to pgwarden {}: {}",
                env!("CARGO_PKG_VERSION"),
                parsed.unknown.join(", ")
            );
            tracing::warn!(generation, %message, "the spec has fields this version does not know");
            self.shared.set_condition(
                "SpecValid",
                true,
                "UnknownFields",
                &message,
                Some(generation),
            );
            self.events.warning("UnknownSpecField", message).await;
        }
        send_if_changed(&self.secrets, Some(spec.secrets.clone()));
        send_if_changed(&self.queries, spec.monitoring.custom_queries.clone());
        send_if_changed(
            &self.wal_credentials,
            spec.wal_archive
                .as_ref()
                .and_then(|w| w.s3.as_ref())
                .and_then(|s3| s3.credentials_secret.clone()),
        );
        send_if_changed(
            &self.source_credentials,
            spec.bootstrap
                .as_ref()
                .and_then(|b| b.recovery.as_ref())
                .and_then(|r| r.source.s3.as_ref())
                .and_then(|s3| s3.credentials_secret.clone()),
        );
        send_if_changed(
            &self.max_standby_lag,
            spec.probes
                .max_standby_lag_bytes
                .or(self.default_max_standby_lag),
        );
        let desired = self.desired(&spec);
        if self.applied.as_ref().map(|(_, s)| s) == Some(&desired) {
            self.applied = Some((generation, desired));
            return;
        }
        self.apply(generation, desired, spec.update_strategy).await;
    }

    /// pgwarden's own settings with the spec's parameters and rules on top.
    fn desired(&self, spec: &PostgresClusterSpec) -> PostgresConfig {
        let mut s = self.base.clone();
        for (name, value) in &spec.postgresql.parameters {
            s.parameters.insert(name.clone(), value.0.clone());
        }
        s.pg_hba.extend(spec.postgresql.pg_hba.iter().cloned());
        // The certificate files come from the TLS task (the postmaster actor keeps them).
        let tls = &spec.postgresql.tls;
        s.ssl.required = tls.mode == crd::TlsMode::Required;
        if tls.mode != crd::TlsMode::Off
            && tls.replication_auth == crd::ReplicationAuth::Certificate
        {
            s.ssl.replication_certificates =
                crate::postgres::hba::replication_certificates(&self.shared.identity.cluster);
        }
        // WAL archiving: the daemon takes the layered settings; Postgres gets the commands
        // (archive_mode needs a restart, which the pending-restart logic below applies).
        let wal = match &spec.wal_archive {
            Some(w) => w.apply(
                &self.base_wal,
                &super::wal_credentials::dir(&self.base.run_dir),
            ),
            None => self.base_wal.clone(),
        };
        let settings = crate::wal::Settings::resolve(&wal, &s);
        s.archive = settings.as_ref().map(|_| {
            crate::wal::commands(
                &crate::wal::own_binary(),
                &crate::wal::settings_path(&s.run_dir),
            )
        });
        if let Some(h) = &self.wal {
            h.set(settings);
        }
        s
    }

    async fn apply(&mut self, generation: i64, desired: PostgresConfig, strategy: UpdateStrategy) {
        if let Err(e) = self.postmaster.reload(Some(desired.clone())).await {
            let message = e.to_string();
            // Postgres refusing a value is the spec's fault; trouble writing or signalling is
            // not, and says so.
            let reason = match e {
                PostmasterError::Rejected(_) => {
                    tracing::error!(generation, %message, "Postgres rejected the configuration; keeping the running one");
                    // Not asked again for this generation (every status update would).
                    self.invalid_generation = Some(generation);
                    "ConfigRejected"
                }
                PostmasterError::ShuttingDown => return,
                _ => {
                    tracing::error!(generation, %message, "cannot apply the configuration; keeping the running one");
                    "ApplyFailed"
                }
            };
            self.shared
                .set_condition("ConfigApplied", false, reason, &message, Some(generation));
            self.events
                .warning(reason, format!("generation {generation}: {message}"))
                .await;
            // Not recorded as applied: a later generation that fixes it is tried again, and
            // after a failure to apply, the next event of the PostgresCluster too.
            return;
        }
        self.applied = Some((generation, desired));
        tracing::info!(generation, "configuration applied");
        self.shared.set_condition(
            "ConfigApplied",
            true,
            "Applied",
            &format!("generation {generation} applied"),
            Some(generation),
        );
        self.events
            .normal("ConfigApplied", format!("generation {generation} applied"))
            .await;

        let pending = self.pending_restart().await;
        if pending.is_empty() {
            self.shared
                .set_condition("PendingRestart", false, "NoneNeeded", "", Some(generation));
            return;
        }
        let names = pending.join(", ");
        match strategy {
            UpdateStrategy::Restart => {
                tracing::info!(parameters = %names, "restarting to apply parameters that need it");
                match self.postmaster.restart().await {
                    Ok(()) => {
                        self.shared.set_condition(
                            "PendingRestart",
                            false,
                            "Restarted",
                            &format!("restarted to apply {names}"),
                            Some(generation),
                        );
                        self.events
                            .normal("Restarted", format!("restarted to apply {names}"))
                            .await;
                    }
                    Err(e) => {
                        self.shared.set_condition(
                            "PendingRestart",
                            true,
                            "RestartFailed",
                            &e.to_string(),
                            Some(generation),
                        );
                        self.events
                            .warning(
                                "RestartFailed",
                                format!("restart to apply {names} failed: {e}"),
                            )
                            .await;
                    }
                }
            }
            UpdateStrategy::Manual => {
                self.shared.set_condition(
                    "PendingRestart",
                    true,
                    "RestartRequired",
                    &format!("{names} need a restart (updateStrategy: manual)"),
                    Some(generation),
                );
                self.events
                    .normal("RestartRequired", format!("{names} need a restart"))
                    .await;
            }
        }
    }

    /// Parameters waiting for a restart, read on a fresh connection once the reload landed.
    async fn pending_restart(&self) -> Vec<String> {
        // The postmaster handles SIGHUP asynchronously; a backend started after it sees the
        // new file.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let target = Target::admin(&self.base);
        let Ok(conn) = connect_timeout(&target).await else {
            return Vec::new();
        };
        let rows = tokio::time::timeout(
            Duration::from_secs(5),
            conn.query(
                "SELECT name::text FROM pg_settings WHERE pending_restart ORDER BY 1",
                &[],
            ),
        )
        .await;
        match rows {
            Ok(Ok(rows)) => rows.iter().filter_map(|r| r.try_get(0).ok()).collect(),
            _ => Vec::new(),
        }
    }
}

/// Publishes `value` only when it differs, so followers restart their watches only on change.
fn send_if_changed<T: PartialEq>(tx: &watch::Sender<T>, value: T) {
    tx.send_if_modified(|current| {
        if *current == value {
            return false;
        }
        *current = value;
        true
    });
}

/// Parses and validates the stored spec; every problem names its field.
fn parse(obj: &DynamicObject, api_timeout: Duration) -> Result<crd::ParsedSpec, Vec<String>> {
    let spec = obj
        .data
        .get("spec")
        .ok_or_else(|| vec!["spec: missing".to_string()])?;
    let parsed = crd::parse_spec(spec).map_err(|e| vec![e])?;
    crd::validate(&parsed.spec)?;
    // A renewal that may take as long as the renew deadline can never keep the Lease on a
    // slow API server: every such renewal would end in a fence.
    let deadline = Duration::from_secs(u64::from(parsed.spec.failover.renew_deadline_seconds));
    if api_timeout >= deadline {
        return Err(vec![format!(
            "spec.failover.renewDeadlineSeconds ({}) must be longer than pgwarden's kubernetes.api_timeout ({}s)",
            deadline.as_secs(),
            api_timeout.as_secs_f64()
        )]);
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(renew_deadline: u32) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "pgwarden.dev/v1",
            "kind": "PostgresCluster",
            "metadata": {"name": "pg", "namespace": "default"},
            "spec": {
                "instances": 3,
                "secrets": {"superuser": {"name": "su"}, "replication": {"name": "repl"}},
                "failover": {
                    "leaseDurationSeconds": 20,
                    "renewDeadlineSeconds": renew_deadline,
                    "retryPeriodSeconds": 2
                }
            }
        }))
        .expect("a PostgresCluster")
    }

    /// A renewal allowed to take the whole renew deadline would end every slow renewal in a
    /// fence: such timings are refused, naming both keys.
    #[test]
    fn a_renew_deadline_not_longer_than_api_timeout_is_refused() {
        let timeout = Duration::from_secs(5);
        for deadline in [4, 5] {
            let problems = parse(&object(deadline), timeout).expect_err("refused");
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(
                problems[0].contains("spec.failover.renewDeadlineSeconds")
                    && problems[0].contains("kubernetes.api_timeout"),
                "{problems:?}"
            );
        }
        assert!(parse(&object(6), timeout).is_ok());
        assert!(parse(&object(5), Duration::from_millis(4900)).is_ok());
    }
}
