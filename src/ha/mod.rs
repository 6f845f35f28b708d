//! High availability: who leads, when to fence, who may promote. The decisions are pure
//! functions of observed state ([`decide`], [`quorum`]), tested with tables of cases; the
//! Lease client ([`lease`]), the peers' status ([`peers`]) and the data-directory operations
//! ([`replica`]) are the I/O edges; the [`elector`] loop ties them to the postmaster actor.

pub mod bootstrap;
pub mod decide;
pub mod elector;
pub mod failsafe;
pub mod fence;
pub mod lease;
pub mod peers;
pub mod quorum;
pub mod replica;
pub mod stream;
pub mod switchover;
pub mod tasks;

use serde::Serialize;

/// Annotation on the PostgresCluster naming the instance a switchover goes to.
pub const SWITCHOVER_ANNOTATION: &str = "pgwarden.dev/switchover-to";
/// Annotation on the PostgresCluster with a JSON list of fenced instances (`["*"]`: all).
pub const FENCED_ANNOTATION: &str = "pgwarden.dev/fenced-instances";

/// The elector's view, for `/pg/status`, the reporter and the metrics.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct HaStatus {
    /// primary, replica, fenced, stopped or unknown.
    pub role: String,
    /// The Lease holder as last observed.
    pub leader: Option<String>,
    pub fenced: bool,
    /// The primary this standby streams from.
    pub following: Option<String>,
    /// The last decision, in words.
    pub action: String,
    /// Primary in quorum mode: `synchronous_standby_names` in use.
    pub synchronous_standby_names: Option<String>,
    /// Primary: fewer synchronous standbys than asked for, and commits no longer wait for
    /// them (`spec.synchronous.allowDegraded`).
    pub degraded: bool,
    /// The data directory holds a cluster (an empty instance initialises only when no other
    /// instance says so); null when it could not be inspected, which the others count as data.
    #[serde(default)]
    pub has_data: Option<bool>,
    /// It gave the Lease up after repeated crashes and does not compete for a while: the
    /// others do not wait for it.
    #[serde(default)]
    pub standing_down: bool,
}

/// The roles `pgwarden_ha_role` reports (one sample each, 1 for the current one).
const ROLES: [&str; 5] = ["primary", "replica", "fenced", "stopped", "unknown"];

/// HA metrics, from the elector's last view.
pub fn samples(ha: &HaStatus, me: &str) -> Vec<crate::metrics::families::Sample> {
    use crate::metrics::families::Sample;
    let flag = |b: bool| f64::from(u8::from(b));
    let mut out: Vec<Sample> = ROLES
        .iter()
        .map(|role| {
            Sample::gauge(
                "pgwarden_ha_role",
                "The instance's HA role (1 for the current one)",
                flag(ha.role == *role),
            )
            .label("role", *role)
        })
        .collect();
    out.push(Sample::gauge(
        "pgwarden_ha_leader",
        "1 when this instance holds the leader Lease",
        flag(ha.leader.as_deref() == Some(me)),
    ));
    out.push(Sample::gauge(
        "pgwarden_ha_fenced",
        "1 when this instance is fenced (its Postgres held stopped)",
        flag(ha.fenced || ha.role == "fenced"),
    ));
    out.push(Sample::gauge(
        "pgwarden_ha_synchronous_degraded",
        "1 when the primary has fewer synchronous standbys than asked for and commits no longer wait for them",
        flag(ha.degraded),
    ));
    out
}

/// Inputs of the elector.
pub struct Start<'a> {
    pub config: &'a crate::config::Config,
    pub shared: std::sync::Arc<crate::k8s::Shared>,
    pub postmaster: crate::supervisor::postmaster::Handle,
    pub status: tokio::sync::watch::Receiver<crate::supervisor::postmaster::Status>,
    pub observation: tokio::sync::watch::Receiver<crate::monitor::Observation>,
    pub assessor: crate::health::Assessor,
    pub pg: crate::config::PostgresConfig,
    pub binaries: crate::postgres::binaries::Binaries,
    pub reaper: crate::supervisor::reaper::Reaper,
    /// Postgres's recent problems, which tell a standby's divergence from trouble connecting.
    pub server_log: crate::postgres::log::ServerLog,
}

/// Starts the elector; the returned sender asks it to hand over on shutdown.
pub fn start(s: Start<'_>) -> tokio::sync::mpsc::Sender<elector::Command> {
    elector::Elector::new(s).spawn()
}
