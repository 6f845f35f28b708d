//! pgwarden's own configuration: a TOML file overridden by `PGWARDEN_*` environment
//! variables, validated once at start. Every error names the key it is about.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod env;
use env::apply_env;

/// Environment variables with this prefix override keys of the configuration file.
/// Nested keys are separated by a double underscore: `PGWARDEN_POSTGRES__PORT=5433`.
pub const ENV_PREFIX: &str = "PGWARDEN_";

/// Variables with the prefix that belong to the command line, not to the file.
const RESERVED_ENV: &[&str] = &[
    "PGWARDEN_CONFIG",
    "PGWARDEN_LOG_FORMAT",
    "PGWARDEN_LOG_LEVEL",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("configuration key `{key}`: {message}")]
    Key { key: String, message: String },
}

impl ConfigError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name of this instance (the pod name in Kubernetes).
    pub instance_name: String,
    pub postgres: PostgresConfig,
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
    pub supervision: SupervisionConfig,
    pub monitor: MonitorConfig,
    pub probes: ProbesConfig,
    pub kubernetes: KubernetesConfig,
    pub wal: WalConfig,
    /// Scheduled base backups (`crate::backup::schedule`).
    pub backup: crate::backup::config::BackupConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// The data directory (PGDATA). Point it at a subdirectory of a volume, not at its root.
    pub data_dir: PathBuf,
    /// Directory with `postgres` and `initdb`; found from the Debian layout or `pg_config` when unset.
    pub bin_dir: Option<PathBuf>,
    /// Runtime directory: the unix socket and the server-log pipes live here.
    pub run_dir: PathBuf,
    pub listen_addresses: String,
    pub port: u16,
    /// Name of the bootstrap superuser created by initdb, used by pgwarden over the unix socket.
    pub superuser: String,
    /// File holding the superuser password set at initdb (a mounted Secret); no password when unset.
    pub superuser_password_file: Option<PathBuf>,
    pub locale: String,
    pub encoding: String,
    /// User parameters for postgresql.conf.
    pub parameters: BTreeMap<String, ParamValue>,
    /// Extra pg_hba.conf rules, placed after pgwarden's own rule and before the defaults.
    pub pg_hba: Vec<String>,
    /// archive_mode / archive_command / restore_command, set by pgwarden when WAL archiving
    /// is configured (never from the file).
    #[serde(skip)]
    pub archive: Option<crate::postgres::conf::ArchiveCommands>,
    /// Streaming and synchronous replication, owned by the HA elector (never from the file).
    #[serde(skip)]
    pub replication: crate::postgres::conf::Replication,
    /// TLS, from `spec.postgresql.tls` and the certificates pgwarden issued (never from the
    /// file).
    #[serde(skip)]
    pub ssl: crate::postgres::conf::Ssl,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Probes and the status API.
    pub status_listen: SocketAddr,
    /// Prometheus metrics.
    pub metrics_listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long a smart shutdown (waits for clients to disconnect) may take before escalating to fast.
    #[serde(with = "humantime_serde")]
    pub smart_timeout: Duration,
    /// How long a fast shutdown (disconnects clients, checkpoints) may take before escalating to immediate.
    #[serde(with = "humantime_serde")]
    pub fast_timeout: Duration,
    /// How long an immediate shutdown may take before the postmaster is killed.
    #[serde(with = "humantime_serde")]
    pub immediate_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    /// pgwarden exits non-zero when the postmaster died this many times within `crash_window`.
    pub max_crashes: u32,
    #[serde(with = "humantime_serde")]
    pub crash_window: Duration,
    /// First delay before restarting a crashed postmaster; doubles per crash in the window.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// How often the monitoring loop refreshes the state that probes and /pg/status answer from.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Bound for each monitoring query (also the session's statement_timeout).
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// A scrape re-runs the metric queries only when the cached result is older than this.
    #[serde(with = "humantime_serde")]
    pub metrics_ttl: Duration,
    /// Custom metric queries in the postgres_exporter / CloudNativePG YAML format.
    pub queries_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// A standby whose replay is further behind than this is not ready (`/readyz`);
    /// `/readyz?lag=<bytes>` sets the bound per request.
    pub max_standby_lag_bytes: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Name of the PostgresCluster this instance follows; the Kubernetes integration is on when
    /// set. The API server is found from `KUBECONFIG` / `~/.kube/config` or the in-cluster
    /// service account.
    pub cluster: Option<String>,
    /// Default: the `POD_NAMESPACE` environment variable (downward API), else the kubeconfig's.
    pub namespace: Option<String>,
    /// Default: the `POD_NAME` environment variable (downward API), else `instance_name`.
    pub pod_name: Option<String>,
    /// The pod's IP. Default: the `POD_IP` environment variable.
    pub pod_ip: Option<String>,
    /// Host the other instances reach this one at (its Postgres and status ports are
    /// advertised with it), e.g. the StatefulSet DNS name `$(POD_NAME).<headless service>`.
    /// Default: the pod IP.
    pub advertise_address: Option<String>,
    /// The instance's status entry is refreshed at least this often (and on every change).
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// Bound for every API call but the watches.
    #[serde(with = "humantime_serde")]
    pub api_timeout: Duration,
}

/// WAL archiving (`[wal]`): off while `destination` is unset. Also the tuning part of the
/// settings file the `wal-archive` and `wal-restore` commands read (`wal::Settings`).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// `file:///absolute/path` or `s3://bucket/optional/prefix`; archiving is off when unset.
    pub destination: Option<String>,
    /// zstd, gzip or none.
    pub compression: crate::wal::format::Compression,
    /// Parallel uploads (and prefetch downloads).
    pub parallelism: u32,
    /// Upload `.ready` files before Postgres asks for them. Off: each `archive_command` call
    /// uploads its one file, serialized as with a plain `cp`-style command (for comparison).
    pub upload_ahead: bool,
    /// Segments fetched ahead into the spool directory during recovery; 0 turns prefetch off.
    pub prefetch: u32,
    /// Where prefetched segments wait; default: `pgwarden-wal-spool` beside the data directory
    /// (the same volume, so handing a segment to Postgres is a rename). Never the data
    /// directory, inside it or above it: pgwarden deletes WAL-named files here.
    pub spool_dir: Option<PathBuf>,
    /// Bound for each call to the destination (one upload, download or lookup).
    #[serde(with = "humantime_serde")]
    pub io_timeout: Duration,
    /// How long `wal-archive` / `wal-restore` wait for an answer from the running pgwarden.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Retry delay after a failed upload, doubling per failure of the same segment up to
    /// `retry_max`.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// After Postgres stopped, how long pgwarden keeps uploading what is still waiting.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    pub s3: S3Config,
}

/// S3-compatible object storage. Credentials come from the environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or the instance/IRSA mechanisms the AWS
/// environment variables select) or from `credentials_dir`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint URL of an S3-compatible service (default: AWS, or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// Default: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Allow a plain `http://` endpoint.
    pub allow_http: bool,
    /// A directory with files `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and optionally
    /// `AWS_SESSION_TOKEN` (a mounted Kubernetes Secret); read at every connection.
    pub credentials_dir: Option<PathBuf>,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            destination: None,
            compression: crate::wal::format::Compression::Zstd,
            parallelism: 4,
            upload_ahead: true,
            prefetch: 8,
            spool_dir: None,
            io_timeout: Duration::from_secs(60),
            command_timeout: Duration::from_secs(120),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            s3: S3Config::default(),
        }
    }
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            cluster: None,
            namespace: None,
            pod_name: None,
            pod_ip: None,
            advertise_address: None,
            status_interval: Duration::from_secs(5),
            api_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            interval: Duration::from_secs(2),
            query_timeout: Duration::from_secs(2),
            metrics_ttl: Duration::from_secs(15),
            queries_file: None,
        }
    }
}

/// A postgresql.conf value as written in TOML (or in the PostgresCluster spec).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{}", if *b { "on" } else { "off" }),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Str(s) => write!(f, "{s}"),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            instance_name: default_instance_name(),
            postgres: PostgresConfig::default(),
            http: HttpConfig::default(),
            shutdown: ShutdownConfig::default(),
            supervision: SupervisionConfig::default(),
            monitor: MonitorConfig::default(),
            probes: ProbesConfig::default(),
            kubernetes: KubernetesConfig::default(),
            wal: WalConfig::default(),
            backup: Default::default(),
        }
    }
}

fn default_instance_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pgwarden".to_string())
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            data_dir: PathBuf::from("/var/lib/postgresql/data/pgdata"),
            bin_dir: None,
            run_dir: PathBuf::from("/run/pgwarden"),
            listen_addresses: "*".into(),
            port: 5432,
            superuser: "postgres".into(),
            superuser_password_file: None,
            locale: "C.UTF-8".into(),
            encoding: "UTF8".into(),
            parameters: BTreeMap::new(),
            pg_hba: Vec::new(),
            archive: None,
            replication: Default::default(),
            ssl: Default::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            status_listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9187)),
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        // 10 + 15 + 3 = 28 s, inside Kubernetes' default 30 s grace period.
        ShutdownConfig {
            smart_timeout: Duration::from_secs(10),
            fast_timeout: Duration::from_secs(15),
            immediate_timeout: Duration::from_secs(3),
        }
    }
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            max_crashes: 5,
            crash_window: Duration::from_secs(300),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Reads the file (when given), applies the environment and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: path.to_path_buf(),
                        message: e.to_string().trim().to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, env)?;
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                ConfigError::key(key, e.into_inner().to_string().trim().to_string())
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.instance_name;
        if name.is_empty()
            || name.len() > 63
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(ConfigError::key(
                "instance_name",
                format!("{name:?} must be 1-63 lowercase letters, digits or '-' (a DNS label)"),
            ));
        }
        let pg = &self.postgres;
        if pg.port == 0 {
            return Err(ConfigError::key(
                "postgres.port",
                "must be between 1 and 65535",
            ));
        }
        for (key, path) in [
            ("postgres.data_dir", &pg.data_dir),
            ("postgres.run_dir", &pg.run_dir),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::key(
                    key,
                    format!("{} must be an absolute path", path.display()),
                ));
            }
        }
        if pg.superuser.is_empty()
            || !pg
                .superuser
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(ConfigError::key(
                "postgres.superuser",
                "must be a non-empty name of letters, digits and '_'",
            ));
        }
        for (key, value) in [
            ("postgres.listen_addresses", &pg.listen_addresses),
            ("postgres.locale", &pg.locale),
            ("postgres.encoding", &pg.encoding),
        ] {
            if value.is_empty() || value.contains(['\'', '\n', '\\']) {
                return Err(ConfigError::key(
                    key,
                    "must be non-empty and contain no quote, backslash or newline",
                ));
            }
        }
        for (name, value) in &pg.parameters {
            crate::postgres::conf::check_user_parameter(name, value).map_err(|reason| {
                ConfigError::key(format!("postgres.parameters.{name}"), reason)
            })?;
        }
        for (i, rule) in pg.pg_hba.iter().enumerate() {
            crate::postgres::conf::check_hba_rule(rule)
                .map_err(|reason| ConfigError::key(format!("postgres.pg_hba[{i}]"), reason))?;
        }
        let sd = &self.shutdown;
        for (key, d) in [
            ("shutdown.smart_timeout", sd.smart_timeout),
            ("shutdown.fast_timeout", sd.fast_timeout),
            ("shutdown.immediate_timeout", sd.immediate_timeout),
            ("http.request_timeout", self.http.request_timeout),
            ("supervision.crash_window", self.supervision.crash_window),
            (
                "supervision.backoff_initial",
                self.supervision.backoff_initial,
            ),
        ] {
            if d.is_zero() {
                return Err(ConfigError::key(key, "must be greater than zero"));
            }
        }
        let sv = &self.supervision;
        if sv.max_crashes == 0 {
            return Err(ConfigError::key(
                "supervision.max_crashes",
                "must be at least 1",
            ));
        }
        if sv.backoff_max < sv.backoff_initial {
            return Err(ConfigError::key(
                "supervision.backoff_max",
                "must not be shorter than supervision.backoff_initial",
            ));
        }
        self.wal
            .validate()
            .map_err(|(key, message)| ConfigError::key(format!("wal.{key}"), message))?;
        self.backup
            .validate()
            .map_err(|(key, message)| ConfigError::key(format!("backup.{key}"), message))?;
        if let Some(spool) = &self.wal.spool_dir {
            crate::wal::check_spool_dir(spool, &pg.data_dir)
                .map_err(|message| ConfigError::key("wal.spool_dir", message))?;
        }
        if self.http.status_listen == self.http.metrics_listen {
            return Err(ConfigError::key(
                "http.metrics_listen",
                "must differ from http.status_listen (each server has its own listener)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
