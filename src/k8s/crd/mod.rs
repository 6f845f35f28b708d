//! The `PostgresCluster` custom resource (group `pgwarden.dev`, version `v1`).
//!
//! The schema carries what the API server can check (types, bounds, CEL rules); [`validate`]
//! checks the rest again in pgwarden, so a spec that slipped past the schema (or an API server
//! without validation) is still refused with a precise message.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool, JSON,
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::ParamValue;

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pgwarden.dev",
    version = "v1",
    kind = "PostgresCluster",
    plural = "postgresclusters",
    shortname = "pgc",
    namespaced,
    status = "PostgresClusterStatus",
    printcolumn = r#"{"name":"Primary","type":"string","jsonPath":".status.currentPrimary"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyInstances"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PostgresClusterSpec {
    /// Number of instances; matches the StatefulSet's replicas.
    #[schemars(range(min = 1, max = 16))]
    pub instances: u32,
    #[serde(default)]
    pub postgresql: PostgresqlSpec,
    #[serde(default)]
    pub synchronous: SynchronousSpec,
    #[serde(default)]
    pub failover: FailoverSpec,
    #[serde(default)]
    pub probes: ProbesSpec,
    #[serde(default)]
    pub monitoring: MonitoringSpec,
    pub secrets: SecretsSpec,
    /// How changes that need a restart are applied.
    #[serde(default)]
    pub update_strategy: UpdateStrategy,
    /// WAL archiving; each field set here replaces pgwarden's `[wal]` setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_archive: Option<WalArchiveSpec>,
    /// Scheduled base backups; each field set here replaces pgwarden's `[backup]` setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::backup::spec::BackupSpec>,
    /// How a new cluster gets its data: initdb, or a restore (`recovery`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<crate::backup::bootstrap::BootstrapSpec>,
}

/// WAL archiving to a filesystem or S3-compatible object storage. Credentials come from the
/// pod: `AWS_*` environment variables (for example `envFrom` a Secret) or a Secret mounted at
/// pgwarden's `wal.s3.credentials_dir`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalArchiveSpec {
    /// `s3://bucket/prefix` or `file:///path` (a mounted volume); archiving is off when
    /// neither this nor pgwarden's configuration sets one. An empty string turns it off.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub destination: Option<String>,
    /// zstd (default), gzip or none.
    #[serde(default)]
    pub compression: Option<crate::wal::format::Compression>,
    /// Parallel uploads and prefetch downloads.
    #[serde(default)]
    #[schemars(range(min = 1, max = 64))]
    pub parallelism: Option<u32>,
    /// Segments fetched ahead during recovery (0: off).
    #[serde(default)]
    #[schemars(range(min = 0, max = 64))]
    pub prefetch: Option<u32>,
    #[serde(default)]
    pub s3: Option<WalS3Spec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalS3Spec {
    /// Endpoint of an S3-compatible service (default: AWS).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Allow a plain http:// endpoint.
    #[serde(default)]
    pub allow_http: Option<bool>,
    /// A Secret in the cluster's namespace with the keys `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and optionally `AWS_SESSION_TOKEN`. pgwarden reads it through
    /// the API, keeps a private copy for the archive commands, and follows its rotations.
    #[serde(default)]
    pub credentials_secret: Option<String>,
}

impl WalArchiveSpec {
    /// `base` (pgwarden's `[wal]`) with the fields this spec sets. Credentials from a Secret
    /// are read from `credentials_dir`, where pgwarden keeps its copy of them.
    pub fn apply(
        &self,
        base: &crate::config::WalConfig,
        credentials_dir: &std::path::Path,
    ) -> crate::config::WalConfig {
        let mut w = base.clone();
        if let Some(d) = &self.destination {
            w.destination = Some(d.clone()).filter(|d| !d.is_empty());
        }
        if let Some(c) = self.compression {
            w.compression = c;
        }
        if let Some(p) = self.parallelism {
            w.parallelism = p;
        }
        if let Some(p) = self.prefetch {
            w.prefetch = p;
        }
        if let Some(s3) = &self.s3 {
            if let Some(e) = &s3.endpoint {
                w.s3.endpoint = Some(e.clone());
            }
            if let Some(r) = &s3.region {
                w.s3.region = Some(r.clone());
            }
            if let Some(a) = s3.allow_http {
                w.s3.allow_http = a;
            }
            if s3.credentials_secret.is_some() {
                w.s3.credentials_dir = Some(credentials_dir.to_path_buf());
            }
        }
        w
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresqlSpec {
    /// postgresql.conf parameters (strings or integers). Parameters pgwarden owns are refused.
    #[serde(default)]
    pub parameters: BTreeMap<String, SpecParam>,
    /// Extra pg_hba.conf rules, after pgwarden's own and before the defaults.
    #[serde(default)]
    pub pg_hba: Vec<String>,
    /// TLS for clients, replication and the status and metrics endpoints.
    #[serde(default)]
    pub tls: TlsSpec,
}

/// `spec.postgresql.tls`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// off: plain text everywhere. preferred: TLS offered to clients (plain still accepted),
    /// standbys and peers use verified TLS. required: as preferred, and the default pg_hba
    /// rules are `hostssl` (plain connections refused).
    #[serde(default)]
    pub mode: TlsMode,
    /// A Secret of type kubernetes.io/tls (tls.crt, tls.key, as cert-manager writes it)
    /// with the instances' serving certificate, followed as it changes. Unset: each
    /// instance issues its own from the cluster CA (the Secret `<cluster>-ca`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_secret: Option<String>,
    /// The Secret whose `ca.crt` verifies the instances' certificates when
    /// `certificateSecret` is set (default: that Secret's own `ca.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<String>,
    /// Lifetime of the certificates pgwarden issues (default 90 days); each is renewed after
    /// two thirds of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30, max = 31536000))]
    pub certificate_duration_seconds: Option<u32>,
    /// How standbys (and their pg_basebackup and pg_rewind) authenticate as
    /// streaming_replica while TLS is on. password (default): the replication Secret's
    /// password. certificate: their certificate from the cluster CA (pg_hba `cert`), and
    /// streaming_replica can log in no other way; no password is sent or needed.
    #[serde(default)]
    pub replication_auth: ReplicationAuth,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ReplicationAuth {
    #[default]
    Password,
    Certificate,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TlsMode {
    #[default]
    Off,
    Preferred,
    Required,
}

/// A parameter value in the spec. The schema says `x-kubernetes-int-or-string` (a structural
/// schema cannot offer "any scalar"); booleans and decimals are written as strings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(transparent)]
pub struct SpecParam(pub ParamValue);

impl JsonSchema for SpecParam {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SpecParam".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SynchronousSpec {
    #[serde(default)]
    pub mode: SynchronousMode,
    /// Quorum mode: how many standbys must confirm each commit.
    #[serde(default)]
    #[schemars(range(min = 0, max = 15))]
    pub number: u32,
    /// Quorum mode: fall back to asynchronous commits when fewer than `number` standbys are
    /// available (reported), instead of making commits wait.
    #[serde(default)]
    pub allow_degraded: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SynchronousMode {
    #[default]
    Off,
    Quorum,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.renewDeadlineSeconds + self.retryPeriodSeconds < self.leaseDurationSeconds").message("renewDeadlineSeconds + retryPeriodSeconds must be less than leaseDurationSeconds"))]
pub struct FailoverSpec {
    #[serde(default = "defaults::lease_duration")]
    #[schemars(range(min = 2, max = 300))]
    pub lease_duration_seconds: u32,
    #[serde(default = "defaults::renew_deadline")]
    #[schemars(range(min = 1, max = 300))]
    pub renew_deadline_seconds: u32,
    #[serde(default = "defaults::retry_period")]
    #[schemars(range(min = 1, max = 60))]
    pub retry_period_seconds: u32,
    /// Asynchronous mode: a standby further behind than this is not promoted.
    #[serde(default)]
    pub maximum_lag_bytes: Option<u64>,
    /// A former primary that pg_rewind cannot bring onto the new timeline has its data
    /// directory moved aside (kept, never deleted) and is cloned afresh. When false it stays
    /// stopped and reports the failure.
    #[serde(default = "defaults::yes")]
    pub reclone_on_rewind_failure: bool,
}

impl Default for FailoverSpec {
    fn default() -> Self {
        FailoverSpec {
            lease_duration_seconds: defaults::lease_duration(),
            renew_deadline_seconds: defaults::renew_deadline(),
            retry_period_seconds: defaults::retry_period(),
            maximum_lag_bytes: None,
            reclone_on_rewind_failure: true,
        }
    }
}

mod defaults {
    pub fn lease_duration() -> u32 {
        10
    }
    pub fn renew_deadline() -> u32 {
        6
    }
    pub fn retry_period() -> u32 {
        2
    }
    pub fn yes() -> bool {
        true
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbesSpec {
    /// A standby whose replay is further behind is not ready.
    #[serde(default)]
    pub max_standby_lag_bytes: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// A ConfigMap key holding custom metric queries (postgres_exporter / CloudNativePG format).
    #[serde(default)]
    pub custom_queries: Option<KeyRef>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretsSpec {
    /// Secret with the superuser password (key `password`).
    pub superuser: KeyRef,
    /// Secret with the replication user's password (key `password`).
    pub replication: KeyRef,
}

/// A key of a Secret or ConfigMap in the cluster's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default = "default_key")]
    pub key: String,
}

fn default_key() -> String {
    "password".into()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum UpdateStrategy {
    /// Restart the instance when a changed parameter needs it.
    #[default]
    Restart,
    /// Report the pending restart and leave it to an operator.
    Manual,
}

/// Cluster status. Each instance writes only its own `instances.<name>` entry (merge patch);
/// cluster-level fields are written by the primary.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_primary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_primary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_instances: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub instances: BTreeMap<String, InstanceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups: Option<crate::backup::spec::BackupsStatus>,
}

/// One instance's report. Unknown values are sent as `null`, which a merge patch turns into
/// removing the field, so nothing stale stays behind.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// primary, replica, fenced or unknown.
    pub role: String,
    pub health: String,
    #[serde(default)]
    pub address: Option<String>,
    /// `host:port` of its Postgres, for standbys to stream from.
    #[serde(default)]
    pub postgres_address: Option<String>,
    /// `host:port` of its status API, for peers to read `/pg/status`.
    #[serde(default)]
    pub status_address: Option<String>,
    #[serde(default)]
    pub timeline: Option<u32>,
    #[serde(default)]
    pub current_lsn: Option<String>,
    #[serde(default)]
    pub received_lsn: Option<String>,
    #[serde(default)]
    pub replayed_lsn: Option<String>,
    pub ready: bool,
    pub pending_restart: bool,
    pub pgwarden_version: String,
    /// RFC 3339.
    pub last_report_time: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A condition, following the Kubernetes API conventions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Checks what the schema cannot express (or an API server did not enforce). Each problem
/// names its field.
pub fn validate(spec: &PostgresClusterSpec) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for (name, value) in &spec.postgresql.parameters {
        if let Err(reason) = crate::postgres::conf::check_user_parameter(name, &value.0) {
            problems.push(format!("spec.postgresql.parameters.{name}: {reason}"));
        }
    }
    for (i, rule) in spec.postgresql.pg_hba.iter().enumerate() {
        if let Err(reason) = crate::postgres::conf::check_hba_rule(rule) {
            problems.push(format!("spec.postgresql.pgHba[{i}]: {reason}"));
        }
    }
    let t = &spec.postgresql.tls;
    if t.ca_secret.is_some() && t.certificate_secret.is_none() {
        problems.push(
            "spec.postgresql.tls.caSecret: needs certificateSecret (without it pgwarden issues the certificates from <cluster>-ca)".into(),
        );
    }
    if t.replication_auth == ReplicationAuth::Certificate && t.mode == TlsMode::Off {
        problems.push(
            "spec.postgresql.tls.replicationAuth: certificate needs TLS (mode preferred or required)".into(),
        );
    }
    let f = &spec.failover;
    if u64::from(f.renew_deadline_seconds) + u64::from(f.retry_period_seconds)
        >= u64::from(f.lease_duration_seconds)
    {
        problems.push(format!(
            "spec.failover: renewDeadlineSeconds ({}) + retryPeriodSeconds ({}) must be less than leaseDurationSeconds ({})",
            f.renew_deadline_seconds, f.retry_period_seconds, f.lease_duration_seconds
        ));
    }
    if !(1..=16).contains(&spec.instances) {
        problems.push(format!(
            "spec.instances: {} is not between 1 and 16",
            spec.instances
        ));
    }
    if let Some(w) = &spec.wal_archive {
        if let Err((key, reason)) = w
            .apply(
                &crate::config::WalConfig::default(),
                std::path::Path::new("/"),
            )
            .validate()
        {
            problems.push(format!("spec.walArchive.{key}: {reason}"));
        }
    }
    if let Some(b) = &spec.backup {
        if let Err((key, reason)) = b.apply(&Default::default()) {
            problems.push(format!("spec.backup.{key}: {reason}"));
        }
    }
    if let Some(r) = spec.bootstrap.as_ref().and_then(|b| b.recovery.as_ref()) {
        if let Err((key, reason)) = r.validate() {
            problems.push(format!("spec.bootstrap.recovery.{key}: {reason}"));
        }
    }
    let s = &spec.synchronous;
    if s.mode == SynchronousMode::Quorum && (s.number == 0 || s.number >= spec.instances) {
        problems.push(format!(
            "spec.synchronous.number: {} must be between 1 and instances - 1 ({})",
            s.number,
            spec.instances.saturating_sub(1)
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// A spec as this version of pgwarden understands it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedSpec {
    pub spec: PostgresClusterSpec,
    /// Fields this version does not know, ignored (`spec.postgresql.newThing`): during a
    /// rolling upgrade the CRD is newer than some instances, and an unknown field must never
    /// stop one.
    pub unknown: Vec<String>,
}

/// Parses a spec as stored in the API server, naming the field of the first error. Unknown
/// fields are not errors: they are collected in [`ParsedSpec::unknown`].
pub fn parse_spec(spec: &serde_json::Value) -> Result<ParsedSpec, String> {
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path| unknown.push(format!("spec.{path}"));
    let deserializer = serde_ignored::Deserializer::new(spec, &mut record);
    let parsed = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            format!("spec: {inner}")
        } else {
            format!("spec.{path}: {inner}")
        }
    })?;
    Ok(ParsedSpec {
        spec: parsed,
        unknown,
    })
}

/// The CustomResourceDefinition, as a real API server accepts it: a structural schema.
///
/// What schemars writes for `Option<Enum>` (`enum: [.., null]`) and for defaults of
/// `Option` fields (`field: null`) is legal but noisy; both are removed, since `nullable:
/// true` already admits null and a missing field means the same as a null one to pgwarden.
pub fn crd() -> CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut crd = PostgresCluster::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            tidy_schema(schema);
        }
    }
    crd
}

fn tidy_schema(s: &mut JSONSchemaProps) {
    if let Some(values) = &mut s.enum_ {
        values.retain(|v| !v.0.is_null());
    }
    if let Some(JSON(serde_json::Value::Object(fields))) = &mut s.default {
        fields.retain(|_, v| !v.is_null());
    }
    let children = s
        .properties
        .iter_mut()
        .flat_map(|p| p.values_mut())
        .chain(match &mut s.additional_properties {
            Some(JSONSchemaPropsOrBool::Schema(schema)) => Some(schema.as_mut()),
            _ => None,
        })
        .chain(match &mut s.items {
            Some(JSONSchemaPropsOrArray::Schema(schema)) => Some(schema.as_mut()),
            _ => None,
        });
    for child in children {
        tidy_schema(child);
    }
}

/// The CRD as YAML, as committed in `config/crd.yaml`.
pub fn crd_yaml() -> String {
    let yaml = serde_norway::to_string(&crd()).unwrap_or_default();
    // YAML 1.1 readers (kubectl apply -f) take a bare `off` for the boolean false.
    let yaml = yaml
        .replace(": off\n", ": \"off\"\n")
        .replace("- off\n", "- \"off\"\n");
    format!("# Generated by `pgwarden crd`: do not edit.\n{yaml}")
}

#[cfg(test)]
mod tests;
