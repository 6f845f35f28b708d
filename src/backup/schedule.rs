//! Scheduled backups in `pgwarden run`: `[backup] schedule` (cron, UTC, through `croner`),
//! taken by one instance (see below), at most once per slot across the whole cluster, with the
//! recovery window `[backup] retention` applied after each.
//!
//! Once per slot: before it starts, the primary claims the slot by writing
//! `<prefix>/schedule/<slot>` create-only (a no-clobber rename, `If-None-Match: *` on S3).
//! Whoever writes it first takes the backup; an instance that finds it there (a new primary
//! after a failover during the slot, or this one restarted) does not. A slot that passes while
//! no instance is primary is skipped, not made up later. With `target: prefer-standby` a
//! streaming standby claims first and the primary only after [`standby::GRACE`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use super::config::{parse_schedule, BackupConfig};
use super::metrics::BackupMetrics;
use super::spec::BackupOutcome;
use super::standby::{self, BackupTarget};
use super::take::{self, TakeOptions, PART_SIZE};
use super::{catalog, info, prune, BackupError};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::monitor::snapshot::Role;
use crate::monitor::Observation;
use crate::supervisor::reaper::Reaper;
use crate::wal::format::{self, Compression};
use crate::wal::store::{Put, Store};
use crate::wal::{self, Settings};

/// The next slot after `after`, and the time to the one after it (the period).
fn next_slot(
    cron: &croner::Cron,
    after: chrono::DateTime<chrono::Utc>,
) -> Option<(chrono::DateTime<chrono::Utc>, Duration)> {
    let next = cron.find_next_occurrence(&after, false).ok()?;
    let then = cron.find_next_occurrence(&next, false).ok()?;
    Some((next, (then - next).to_std().ok()?))
}

/// Claims `slot` for this instance: true when it is ours to take.
pub async fn claim(store: &Store, slot: &str, instance: &str) -> Result<bool, BackupError> {
    let text = serde_json::json!({ "slot": slot, "instance": instance }).to_string();
    let object = Bytes::from(
        format::encode(text.as_bytes(), Compression::None)
            .map_err(|e| BackupError::Internal(format!("encoding the claim of {slot}: {e}")))?,
    );
    Ok(store
        .put_object(&format!("schedule/{slot}"), object)
        .await?
        == Put::Created)
}

/// Starts the scheduler task: when `[backup] schedule` is set, and with Kubernetes (where
/// `spec.backup` and the `pgwarden.dev/backup` annotation may ask for backups).
pub fn start(
    config: &Config,
    reaper: Reaper,
    wal: Option<wal::Handle>,
    observation: watch::Receiver<Observation>,
    metrics: &Metrics,
    k8s: Option<Arc<crate::k8s::Shared>>,
) -> anyhow::Result<()> {
    if config.backup.schedule.is_none() && k8s.is_none() {
        return Ok(());
    }
    let Some(wal) = wal else {
        anyhow::bail!(
            "backup.schedule needs WAL archiving (wal.destination): backups go to its destination"
        );
    };
    let events = k8s.as_ref().map(|k| {
        crate::k8s::events::Events::new(
            k.client.clone(),
            &k.identity,
            config.kubernetes.api_timeout,
        )
    });
    let s = Scheduler {
        config: config.clone(),
        reaper,
        wal,
        observation,
        metrics: BackupMetrics::new(metrics)?,
        k8s,
        events,
    };
    tokio::spawn(s.run());
    Ok(())
}

struct Scheduler {
    config: Config,
    reaper: Reaper,
    wal: wal::Handle,
    observation: watch::Receiver<Observation>,
    metrics: BackupMetrics,
    k8s: Option<Arc<crate::k8s::Shared>>,
    events: Option<crate::k8s::events::Events>,
}

/// Waits for a change of `rx`; never returns once it is closed (or when there is none).
async fn changed<T>(rx: &mut Option<watch::Receiver<T>>) {
    let closed = match rx.as_mut() {
        Some(r) => r.changed().await.is_err(),
        None => true,
    };
    if !closed {
        return;
    }
    *rx = None;
    std::future::pending::<()>().await
}

impl Scheduler {
    /// `[backup]` with the last valid spec's `spec.backup` over it (the reconciler validated
    /// it: a spec whose schedule does not parse never becomes the last valid one).
    fn effective(&self) -> BackupConfig {
        let spec = self.k8s.as_ref().and_then(|k| k.spec.borrow().clone());
        match spec.as_ref().and_then(|s| s.backup.as_ref()) {
            Some(b) => b.apply(&self.config.backup).unwrap_or_else(|(key, e)| {
                tracing::error!(key, error = %e, "spec.backup ignored");
                self.config.backup.clone()
            }),
            None => self.config.backup.clone(),
        }
    }

    fn primary(&self) -> bool {
        self.observation
            .borrow()
            .pg
            .as_ref()
            .is_some_and(|p| p.role == Role::Primary)
    }

    /// How long this instance waits before it claims a slot or a request (`None`: it does
    /// not): a streaming standby at once under `prefer-standby`, the primary after the grace
    /// when a standby may claim first, else at once.
    fn claim_delay(&self, effective: &BackupConfig) -> Option<Duration> {
        let observation = self.observation.borrow();
        let pg = observation.pg.as_deref();
        let primary = pg.is_some_and(|p| p.role == Role::Primary);
        match effective.target {
            BackupTarget::Primary => primary.then_some(Duration::ZERO),
            BackupTarget::PreferStandby if standby::qualifies(pg) => Some(Duration::ZERO),
            BackupTarget::PreferStandby
                if primary && (standby::has_streaming_standby(pg) || self.standbys_expected()) =>
            {
                Some(standby::GRACE)
            }
            BackupTarget::PreferStandby => primary.then_some(Duration::ZERO),
        }
    }

    /// The spec asks for standbys. Their streaming may not show yet in this primary's last
    /// observation (a standby that has just connected), or the standby's own: the primary
    /// then still leaves them the grace rather than take the backup itself at once.
    fn standbys_expected(&self) -> bool {
        self.k8s
            .as_ref()
            .and_then(|k| k.spec.borrow().as_ref().map(|s| s.instances > 1))
            .unwrap_or(false)
    }

    /// Waits the claim delay, and tells whether this instance still claims after it (a role
    /// may change meanwhile). A standby that does not stream yet (it has just connected, or
    /// its last observation predates it) keeps looking for up to the grace. The wait ends
    /// early when someone claims `key` meanwhile: a standby's backup may need this primary's
    /// WAL switch soon.
    async fn may_claim(&self, effective: &BackupConfig, store: &Store, key: &str) -> bool {
        let start = Instant::now();
        loop {
            let delay = self.claim_delay(effective);
            match delay {
                Some(d) if start.elapsed() >= d => return true,
                None if !self.may_stream_soon(effective) || start.elapsed() >= standby::GRACE => {
                    return false
                }
                _ => {}
            }
            if standby::claimed_by(store, key).await.is_some() {
                return delay.is_some();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A standby under `prefer-standby` that may qualify once its walreceiver streams.
    fn may_stream_soon(&self, effective: &BackupConfig) -> bool {
        effective.target == BackupTarget::PreferStandby
            && self
                .observation
                .borrow()
                .pg
                .as_ref()
                .is_some_and(|p| p.role == Role::Replica)
    }

    /// After losing the claim `key`: the primary switches WAL for a standby that took it.
    async fn lost_claim(&self, effective: &BackupConfig, store: &Store, key: &str) {
        if !self.primary() {
            return;
        }
        match standby::claimed_by(store, key).await {
            Some(by) if by != self.config.instance_name => {
                tracing::info!(claim = key, standby = by, "backup taken by a standby");
                let before = standby::complete_ids(store).await;
                let within = effective.timeout + effective.wal_timeout;
                let pg = &self.config.postgres;
                let streams = || {
                    self.observation
                        .borrow()
                        .pg
                        .as_ref()
                        .is_some_and(|p| p.replication.iter().any(|r| r.application_name == by))
                };
                match standby::serve_wal_request(
                    store,
                    pg,
                    key,
                    within,
                    (streams, standby::GONE_AFTER),
                )
                .await
                {
                    standby::Served::Asked => {
                        let within = effective.wal_timeout + Duration::from_secs(60);
                        standby::wait_complete(store, &by, &before, within).await;
                    }
                    standby::Served::Failed => self.outcome(
                        false,
                        None,
                        format!("{key}: the backup by {by} failed (its Events say why)"),
                    ),
                    standby::Served::Unanswered => {}
                }
                self.catalog(store).await;
            }
            _ => {}
        }
    }

    fn requested(&self) -> Option<String> {
        let k = self.k8s.as_ref()?;
        let cluster = k.cluster.borrow().clone()?;
        cluster
            .metadata
            .annotations
            .as_ref()?
            .get(super::spec::BACKUP_ANNOTATION)
            .cloned()
    }

    async fn run(self) {
        // The catalog's figures from the start, not only from the first slot on.
        if let Ok((_, store)) = self.store() {
            self.catalog(&store).await;
        }
        let mut spec = self.k8s.as_ref().map(|k| k.spec.subscribe());
        let mut cluster = self.k8s.as_ref().map(|k| k.cluster.subscribe());
        let mut role = Some(self.observation.clone());
        // A request seen but not taken yet (no primary here, or not yet): kept until this
        // instance is primary, when it is claimed, so it is taken once by whoever gets there.
        let mut pending = self.requested();
        let mut last_request = pending.clone();
        let mut schedule = None;
        loop {
            let effective = self.effective();
            if effective.schedule != schedule {
                tracing::info!(schedule = ?effective.schedule, "backup schedule");
                schedule = effective.schedule.clone();
            }
            if let (Some(request), true) = (pending.clone(), self.claim_delay(&effective).is_some())
            {
                pending = None;
                self.request(&effective, &request).await;
                continue;
            }
            let cron = schedule.as_deref().and_then(|p| parse_schedule(p).ok());
            let next = cron.as_ref().and_then(|c| next_slot(c, chrono::Utc::now()));
            if let Some((_, period)) = next {
                self.metrics.period.set(period.as_secs_f64());
            }
            let wait = async {
                match next {
                    Some((slot, _)) => {
                        let d = (slot - chrono::Utc::now()).to_std().unwrap_or_default();
                        tokio::time::sleep(d).await;
                        slot
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                slot = wait => self.slot(&effective, slot).await,
                () = changed(&mut spec) => {}
                () = changed(&mut cluster) => {
                    let now = self.requested();
                    if now.is_some() && now != last_request {
                        pending = now.clone();
                    }
                    last_request = now;
                }
                // Role changes matter only to a pending request.
                () = changed(&mut role), if pending.is_some() => {}
            }
        }
    }

    /// The destination as the archiver has it now (`[wal]`, or the spec's `walArchive`).
    fn store(&self) -> Result<(Arc<Settings>, Store), String> {
        let settings = self
            .wal
            .settings()
            .ok_or("WAL archiving is off, so there is no destination")?;
        let store = settings.open_store()?;
        Ok((settings, store))
    }

    async fn slot(&self, effective: &BackupConfig, slot: chrono::DateTime<chrono::Utc>) {
        let slot = info::backup_id(slot.into());
        let (settings, store) = match self.store() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(slot, error = %e, "scheduled backup: no usable destination");
                self.metrics.failed();
                return;
            }
        };
        if self.may_claim(effective, &store, &slot).await {
            match claim(&store, &slot, &self.config.instance_name).await {
                Ok(true) => {
                    let why = format!("scheduled slot {slot}");
                    let _ = self.backup(effective, &settings, &store, &why, &slot).await;
                }
                Ok(false) => {
                    tracing::info!(slot, "backup slot already claimed: not taken again");
                    self.lost_claim(effective, &store, &slot).await;
                }
                Err(e) => {
                    tracing::error!(slot, error = %e, "scheduled backup: cannot claim the slot");
                    self.metrics.failed();
                }
            }
        }
        self.catalog(&store).await;
    }

    /// A `pgwarden.dev/backup` request, on the primary: claimed like a slot, then taken; the
    /// outcome in the `Backup` condition, with the request's value.
    async fn request(&self, effective: &BackupConfig, value: &str) {
        let k = self.k8s.as_ref();
        let condition = |ok: bool, reason: &str, message: String| {
            if let Some(k) = k {
                k.set_condition("Backup", ok, reason, &message, None);
            }
        };
        let failed = |e: &dyn std::fmt::Display| {
            condition(
                false,
                "BackupFailed",
                format!("{BACKUP_REQUEST}={value}: {e}"),
            )
        };
        let (settings, store) = match self.store() {
            Ok(s) => s,
            Err(e) => return failed(&e),
        };
        let key = format!(
            "request-{}",
            &format::hex(&format::sha256(value.as_bytes()))[..16]
        );
        if !self.may_claim(effective, &store, &key).await {
            return;
        }
        match claim(&store, &key, &self.config.instance_name).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(request = value, "backup request already taken");
                self.lost_claim(effective, &store, &key).await;
                return;
            }
            Err(e) => return failed(&e),
        }
        condition(
            true,
            "BackupRunning",
            format!("{BACKUP_REQUEST}={value}: running"),
        );
        let why = format!("{BACKUP_REQUEST}={value}");
        match self.backup(effective, &settings, &store, &why, &key).await {
            Ok(i) => condition(
                true,
                "BackupCompleted",
                format!(
                    "{why}: backup {} complete, {} bytes stored",
                    i.id, i.stored_bytes
                ),
            ),
            Err(e) => condition(false, "BackupFailed", format!("{why}: {e}")),
        }
        self.catalog(&store).await;
    }

    /// The catalog's figures: metrics, and `status.backups` with Kubernetes.
    async fn catalog(&self, store: &Store) {
        let entries = match catalog::list(store).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the backups");
                return;
            }
        };
        self.metrics.catalog(&entries);
        let Some(k) = &self.k8s else { return };
        let complete: Vec<_> = entries
            .iter()
            .filter_map(catalog::Entry::complete)
            .collect();
        let size = complete.last().map_or(16 << 20, |i| i.wal_segment_size);
        let newest_wal = match catalog::WalIndex::load(store, size).await {
            Ok(w) => w.newest().map(|(_, _, at)| info::format_time(at)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the WAL");
                None
            }
        };
        k.backups.send_modify(|b| {
            let b = b.get_or_insert_with(Default::default);
            if let Some(o) =
                standby::newer_success(complete.last().copied(), b.last_successful.as_ref())
            {
                b.last_successful = Some(o);
            }
            b.complete = complete.len() as u32;
            b.first_recoverable_point = complete
                .iter()
                .map(|i| i.end_time)
                .min()
                .map(info::format_time);
            b.last_recoverable_point = newest_wal;
        });
        k.report_now.notify_one();
    }

    /// Records an outcome in `status.backups`.
    fn outcome(&self, ok: bool, id: Option<String>, message: String) {
        let Some(k) = &self.k8s else { return };
        let o = BackupOutcome {
            time: info::format_time(std::time::SystemTime::now()),
            id,
            message,
        };
        k.backups.send_modify(|b| {
            let b = b.get_or_insert_with(Default::default);
            match ok {
                true => b.last_successful = Some(o),
                false => b.last_failed = Some(o),
            }
        });
        k.report_now.notify_one();
    }

    async fn event(&self, warning: bool, reason: &str, note: String) {
        match (&self.events, warning) {
            (Some(e), false) => e.normal(reason, note).await,
            (Some(e), true) => e.warning(reason, note).await,
            (None, _) => {}
        }
    }

    async fn backup(
        &self,
        effective: &BackupConfig,
        settings: &Settings,
        store: &Store,
        why: &str,
        claim: &str,
    ) -> Result<info::BackupInfo, BackupError> {
        // Asked of a standby's backup only (take knows whether it runs on one).
        let wal_request = standby::wal_request_key(claim);
        let mut config = self.config.clone();
        // The WAL settings in force (the spec's over the file's), destination included.
        config.wal = settings.wal.clone();
        config.wal.destination = Some(settings.destination.clone());
        let o = TakeOptions {
            destination: settings.destination.clone(),
            part_size: PART_SIZE,
            timeout: effective.timeout,
            wal_timeout: effective.wal_timeout,
            max_rate: None,
            wal_request: Some(wal_request.clone()),
            config,
        };
        self.event(false, "BackupStarted", format!("{why}: backup started"))
            .await;
        let started = Instant::now();
        let taken = take::take(&o, &self.reaper).await;
        match &taken {
            Ok(i) => {
                self.metrics.backups.with_label_values(&["success"]).inc();
                self.metrics.duration.set(started.elapsed().as_secs_f64());
                self.metrics.size.set(i.stored_bytes as i64);
                tracing::info!(why, id = i.id, "backup completed");
                let note = format!(
                    "{why}: backup {} complete ({} bytes stored)",
                    i.id, i.stored_bytes
                );
                self.outcome(true, Some(i.id.clone()), note.clone());
                self.event(false, "BackupCompleted", note).await;
            }
            Err(e) => {
                // A primary waiting for this standby's WAL request stops waiting.
                if standby::qualifies(self.observation.borrow().pg.as_deref()) {
                    standby::request_no_wal(store, &wal_request).await;
                }
                self.metrics.failed();
                tracing::error!(why, error = %e, "backup failed");
                self.outcome(false, None, format!("{why}: {e}"));
                self.event(true, "BackupFailed", format!("{why}: {e}"))
                    .await;
            }
        }
        let info = taken?;
        if let Some(retention) = effective.retention {
            self.retention(store, retention).await;
        }
        Ok(info)
    }

    async fn retention(&self, store: &Store, retention: Duration) {
        match prune::prune(store, retention, false).await {
            Ok(p) => {
                let deleted = &self.metrics.deleted;
                deleted
                    .with_label_values(&["backup"])
                    .inc_by(p.delete_backups.len() as u64);
                deleted
                    .with_label_values(&["wal"])
                    .inc_by(p.delete_wal.len() as u64);
                if !p.delete_backups.is_empty() || !p.delete_wal.is_empty() {
                    let note = format!(
                        "retention {}: deleted {} backups and {} WAL files; {} backups kept",
                        humantime_serde::re::humantime::format_duration(retention),
                        p.delete_backups.len(),
                        p.delete_wal.len(),
                        p.keep.len()
                    );
                    self.event(false, "RetentionApplied", note).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "retention failed"),
        }
    }
}

const BACKUP_REQUEST: &str = super::spec::BACKUP_ANNOTATION;

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn schedules_parse_or_are_refused() {
        let cron = parse_schedule("0 3 * * *").unwrap();
        let after = chrono::Utc.with_ymd_and_hms(2026, 12, 1, 11, 0, 0).unwrap();
        let (next, period) = next_slot(&cron, after).unwrap();
        assert_eq!(
            next,
            chrono::Utc.with_ymd_and_hms(2026, 12, 2, 3, 0, 0).unwrap()
        );
        assert_eq!(period, Duration::from_secs(86_400));
        let seconds = parse_schedule("*/5 * * * * *").unwrap();
        assert_eq!(
            next_slot(&seconds, after).unwrap().1,
            Duration::from_secs(5)
        );
        let err = parse_schedule("every night").unwrap_err();
        assert!(err.contains("is not a cron schedule"), "{err}");
        let bad = BackupConfig {
            schedule: Some("61 * * * *".into()),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "schedule");
    }

    #[tokio::test]
    async fn a_slot_is_claimed_once() {
        let d = tempfile::tempdir().unwrap();
        let url = format!("file://{}", d.path().display());
        let store = Store::open(&url, &Default::default(), Duration::from_secs(5)).unwrap();
        assert!(claim(&store, "20261201T030000Z", "pg-0").await.unwrap());
        // Another instance (a new primary after a failover), or the same one again: no.
        assert!(!claim(&store, "20261201T030000Z", "pg-1").await.unwrap());
        assert!(!claim(&store, "20261201T030000Z", "pg-0").await.unwrap());
        assert!(claim(&store, "20261202T030000Z", "pg-1").await.unwrap());
    }
}
