//! Renders `postgresql.conf` (and, through [`super::hba`], `pg_hba.conf` and `pg_ident.conf`)
//! from pgwarden's configuration.
//!
//! The files are rewritten before every start and on every reload, atomically (temporary file
//! and rename), so Postgres never reads a half-written file. Parameters that pgwarden must own
//! are refused when a user sets them, with the reason.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::config::{ParamValue, PostgresConfig};

/// Parameters pgwarden owns, with the reason a user may not set them.
const FORBIDDEN: &[(&str, &str)] = &[
    (
        "listen_addresses",
        "set by pgwarden from postgres.listen_addresses",
    ),
    ("port", "set by pgwarden from postgres.port"),
    (
        "unix_socket_directories",
        "pgwarden connects through this socket; set postgres.run_dir",
    ),
    (
        "data_directory",
        "pgwarden manages the data directory; set postgres.data_dir",
    ),
    (
        "config_file",
        "pgwarden renders the configuration files itself",
    ),
    (
        "hba_file",
        "pgwarden renders pg_hba.conf; use postgres.pg_hba",
    ),
    ("ident_file", "pgwarden renders pg_ident.conf"),
    ("include", "includes would bypass pgwarden's validation"),
    ("include_dir", "includes would bypass pgwarden's validation"),
    (
        "include_if_exists",
        "includes would bypass pgwarden's validation",
    ),
    ("archive_mode", "pgwarden owns WAL archiving"),
    ("archive_command", "pgwarden owns WAL archiving"),
    ("archive_library", "pgwarden owns WAL archiving"),
    ("restore_command", "pgwarden owns WAL restore"),
    ("primary_conninfo", "pgwarden owns replication"),
    ("primary_slot_name", "pgwarden owns replication slots"),
    ("promote_trigger_file", "pgwarden owns promotion"),
    ("recovery_target_timeline", "pgwarden owns recovery"),
    (
        "synchronous_standby_names",
        "pgwarden owns synchronous replication",
    ),
    (
        "logging_collector",
        "pgwarden re-emits the server log on its stdout",
    ),
    (
        "log_destination",
        "pgwarden re-emits the server log on its stdout",
    ),
    (
        "log_directory",
        "pgwarden re-emits the server log on its stdout",
    ),
    (
        "log_filename",
        "pgwarden re-emits the server log on its stdout",
    ),
    (
        "log_rotation_age",
        "pgwarden re-emits the server log on its stdout",
    ),
    (
        "log_rotation_size",
        "pgwarden re-emits the server log on its stdout",
    ),
    (
        "log_truncate_on_rotation",
        "pgwarden re-emits the server log on its stdout",
    ),
    (
        "log_file_mode",
        "pgwarden re-emits the server log on its stdout",
    ),
];

/// Defaults that serve a container; a user parameter of the same name replaces them.
const DEFAULTS: &[(&str, &str)] = &[
    ("max_connections", "100"),
    ("shared_buffers", "'128MB'"),
    ("dynamic_shared_memory_type", "posix"),
    ("wal_level", "replica"),
    ("max_wal_senders", "10"),
    ("max_replication_slots", "10"),
    ("hot_standby", "on"),
    ("wal_log_hints", "on"),
    ("timezone", "'UTC'"),
    ("log_timezone", "'UTC'"),
    // A standby's WAL receiver retries its upstream (and the archive) this often; Postgres's
    // 5 s makes every standby lag up to 5 s behind a new primary, and with quorum commit the
    // first commits after a failover or switchover wait for one.
    ("wal_retrieve_retry_interval", "'200ms'"),
];

/// The low-privilege role (member of `pg_monitor`) pgwarden's monitoring connection uses.
pub const MONITOR_ROLE: &str = "pgwarden_monitor";

/// Name of the pipes under `<run_dir>/log` the logging collector writes to.
pub const LOG_FILE_STEM: &str = "postgresql";

/// Checks a user parameter: a valid name, not owned by pgwarden, a value that can be quoted.
pub fn check_user_parameter(name: &str, value: &ParamValue) -> Result<(), String> {
    let valid_name = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !valid_name {
        return Err(format!("{name:?} is not a valid PostgreSQL parameter name"));
    }
    let lower = name.to_ascii_lowercase();
    if let Some((_, reason)) = FORBIDDEN.iter().find(|(n, _)| *n == lower) {
        return Err(format!("may not be set by the user: {reason}"));
    }
    if let ParamValue::Str(s) = value {
        if s.contains(['\n', '\r', '\0']) {
            return Err("value may not contain a line break or NUL".into());
        }
    }
    if let ParamValue::Float(x) = value {
        if !x.is_finite() {
            return Err("value must be a finite number".into());
        }
    }
    Ok(())
}

/// Checks one extra pg_hba.conf rule: one line, a known connection type.
pub fn check_hba_rule(rule: &str) -> Result<(), String> {
    if rule.contains(['\n', '\r', '\0']) {
        return Err("a rule is a single line".into());
    }
    let first = rule.split_whitespace().next().unwrap_or("");
    const TYPES: &[&str] = &[
        "local",
        "host",
        "hostssl",
        "hostnossl",
        "hostgssenc",
        "hostnogssenc",
    ];
    if !TYPES.contains(&first) {
        return Err(format!(
            "{rule:?} must start with a connection type ({})",
            TYPES.join(", ")
        ));
    }
    if rule.split_whitespace().count() < 4 {
        return Err(format!(
            "{rule:?} has too few fields for a pg_hba.conf rule"
        ));
    }
    Ok(())
}

/// Quotes a value for postgresql.conf: numbers and booleans bare, strings single-quoted.
fn quote(value: &ParamValue) -> String {
    match value {
        ParamValue::Str(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''")),
        other => other.to_string(),
    }
}

/// WAL archiving as rendered in the managed section (see `crate::wal::commands`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveCommands {
    pub archive_command: String,
    pub restore_command: String,
}

/// Replication as the HA elector decides it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Replication {
    /// Set: start (and stay) a standby of this upstream (`standby.signal` is written).
    pub standby: Option<Upstream>,
    /// Primary: `synchronous_standby_names`, e.g. `ANY 1 ("pg-1", "pg-2")`.
    pub synchronous_standby_names: Option<String>,
}

/// Where a standby streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// libpq connection string; empty for a standby that waits without streaming.
    pub conninfo: String,
    pub slot: Option<String>,
}

/// TLS for client and replication connections.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ssl {
    /// `spec.postgresql.tls.mode: required` (from the reconciler): the default rules take
    /// TLS connections only (`hostssl`); without certificate files yet, none at all.
    pub required: bool,
    /// The certificate files, once issued (from the TLS task): `ssl = on`.
    pub files: Option<SslFiles>,
    /// `spec.postgresql.tls.replicationAuth: certificate` (from the reconciler): the
    /// certificate names (pg_ident.conf system users, `/regex` allowed) the replication role
    /// logs in with, by certificate only. Empty: by password.
    pub replication_certificates: Vec<String>,
}

/// Where the server's certificate, key (mode 0600) and the cluster CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SslFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Everything the rendered files depend on.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Whether `standby.signal` belongs in the data directory.
    pub standby: bool,
    pub postgresql_conf: String,
    pub pg_hba_conf: String,
    pub pg_ident_conf: String,
}

/// Where the logging collector writes: pipes that pgwarden reads.
pub fn log_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("log")
}

/// Renders the three files. `os_user` is the operating-system user pgwarden runs as; it is
/// mapped to the superuser for pgwarden's own peer-authenticated connection.
pub fn render(pg: &PostgresConfig, os_user: &str) -> Rendered {
    let mut conf = String::new();
    conf.push_str(
        "# Generated by pgwarden before every start and on every reload: do not edit.\n\
         # Set parameters in pgwarden's configuration (postgres.parameters).\n\n",
    );

    let user: BTreeMap<String, &ParamValue> = pg
        .parameters
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();

    conf.push_str("#---------------------------------------------------------------------\n");
    conf.push_str("# DEFAULTS (replaced by a user parameter of the same name)\n");
    conf.push_str("#---------------------------------------------------------------------\n");
    for (name, value) in DEFAULTS {
        if !user.contains_key(*name) {
            let _ = writeln!(conf, "{name} = {value}");
        }
    }

    conf.push_str("\n#---------------------------------------------------------------------\n");
    conf.push_str("# USER PARAMETERS\n");
    conf.push_str("#---------------------------------------------------------------------\n");
    for (name, value) in &user {
        let _ = writeln!(conf, "{name} = {}", quote(value));
    }

    let pq = |s: &str| quote(&ParamValue::Str(s.to_string()));
    conf.push_str("\n#---------------------------------------------------------------------\n");
    conf.push_str("# MANAGED BY PGWARDEN (last, so nothing above can override it)\n");
    conf.push_str("#---------------------------------------------------------------------\n");
    let _ = writeln!(conf, "listen_addresses = {}", pq(&pg.listen_addresses));
    let _ = writeln!(conf, "port = {}", pg.port);
    let _ = writeln!(
        conf,
        "unix_socket_directories = {}",
        pq(&pg.run_dir.to_string_lossy())
    );
    let _ = writeln!(
        conf,
        "hba_file = {}",
        pq(&pg.data_dir.join("pg_hba.conf").to_string_lossy())
    );
    let _ = writeln!(
        conf,
        "ident_file = {}",
        pq(&pg.data_dir.join("pg_ident.conf").to_string_lossy())
    );
    conf.push_str("logging_collector = on\n");
    conf.push_str("log_destination = 'jsonlog'\n");
    let _ = writeln!(
        conf,
        "log_directory = {}",
        pq(&log_dir(&pg.run_dir).to_string_lossy())
    );
    let _ = writeln!(conf, "log_filename = '{LOG_FILE_STEM}.log'");
    conf.push_str("log_rotation_age = 0\n");
    conf.push_str("log_rotation_size = 0\n");
    conf.push_str("log_truncate_on_rotation = off\n");
    if let Some(a) = &pg.archive {
        // Postgres itself archives only as a primary (archive_mode = on), and uses the
        // restore command in archive recovery and as a standby's fallback to streaming.
        conf.push_str("archive_mode = on\n");
        let _ = writeln!(conf, "archive_command = {}", pq(&a.archive_command));
        let _ = writeln!(conf, "restore_command = {}", pq(&a.restore_command));
    }

    // The same for a primary and a standby: it can change only at a restart, and a promoted
    // standby's reload must not log "contains errors" for a line that went away.
    conf.push_str("recovery_target_timeline = 'latest'\n");
    let r = &pg.replication;
    if let Some(up) = &r.standby {
        let _ = writeln!(conf, "primary_conninfo = {}", pq(&up.conninfo));
        if let Some(slot) = &up.slot {
            let _ = writeln!(conf, "primary_slot_name = {}", pq(slot));
        }
    }
    if let Some(names) = &r.synchronous_standby_names {
        let _ = writeln!(conf, "synchronous_standby_names = {}", pq(names));
    }
    // ssl and its files are reloadable: a renewed certificate takes a SIGHUP, no restart.
    if let Some(f) = &pg.ssl.files {
        conf.push_str("ssl = on\n");
        let _ = writeln!(conf, "ssl_cert_file = {}", pq(&f.cert.to_string_lossy()));
        let _ = writeln!(conf, "ssl_key_file = {}", pq(&f.key.to_string_lossy()));
        let _ = writeln!(conf, "ssl_ca_file = {}", pq(&f.ca.to_string_lossy()));
        conf.push_str("ssl_min_protocol_version = 'TLSv1.2'\n");
    }

    let (hba, ident) = super::hba::render(pg, os_user);
    Rendered {
        standby: r.standby.is_some(),
        postgresql_conf: conf,
        pg_hba_conf: hba,
        pg_ident_conf: ident,
    }
}

impl Rendered {
    /// Writes the files into the data directory, each atomically.
    pub fn write(&self, data_dir: &Path) -> std::io::Result<()> {
        let signal = data_dir.join("standby.signal");
        if self.standby {
            if !signal.exists() {
                std::fs::write(&signal, "")?;
            }
        } else if let Err(e) = std::fs::remove_file(&signal) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e);
            }
        }
        write_atomic(&data_dir.join("postgresql.conf"), &self.postgresql_conf)?;
        write_atomic(&data_dir.join("pg_hba.conf"), &self.pg_hba_conf)?;
        write_atomic(&data_dir.join("pg_ident.conf"), &self.pg_ident_conf)
    }
}

/// Why a candidate configuration was not taken: Postgres refused it, or it could not be asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckError {
    /// Postgres's own messages about the values it refuses.
    #[error("{0}")]
    Rejected(String),
    /// The candidate could not be written, or Postgres could not be run or asked.
    #[error("{0}")]
    Unchecked(String),
}

/// Asks Postgres itself whether it accepts a candidate postgresql.conf (`postgres -C`, which
/// parses and validates every value without touching the running server). Returns Postgres's
/// own messages when it does not.
pub async fn check(
    reaper: &crate::supervisor::reaper::Reaper,
    postgres: &Path,
    pg: &PostgresConfig,
    candidate: &Rendered,
) -> Result<(), CheckError> {
    let path = pg.run_dir.join("postgresql.conf.candidate");
    write_atomic(&path, &candidate.postgresql_conf)
        .map_err(|e| CheckError::Unchecked(format!("cannot write {}: {e}", path.display())))?;
    let mut cmd = crate::postgres::command(postgres);
    cmd.arg("-D")
        .arg(&pg.data_dir)
        .arg("-c")
        .arg(format!("config_file={}", path.display()))
        .args(["-C", "port"]);
    let out = reaper
        .output(&mut cmd)
        .await
        .map_err(|e| CheckError::Unchecked(format!("cannot run {}: {e}", postgres.display())));
    let _ = std::fs::remove_file(&path);
    let out = out?;
    if out.status.success() {
        return Ok(());
    }
    let messages: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.contains("contains errors"))
        .filter_map(|l| {
            ["LOG:  ", "FATAL:  ", "ERROR:  ", "DETAIL:  ", "HINT:  "]
                .iter()
                .find_map(|tag| l.find(tag).map(|at| l[at + tag.len()..].trim()))
        })
        .collect();
    Err(CheckError::Rejected(if messages.is_empty() {
        format!("postgres rejected the configuration: {}", out.stderr.trim())
    } else {
        messages.join("; ")
    }))
}

fn write_atomic(path: &Path, content: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("pgwarden-tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(content.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg() -> PostgresConfig {
        PostgresConfig::default()
    }

    #[test]
    fn forbidden_and_malformed_parameters_are_refused() {
        let v = ParamValue::Str("x".into());
        for name in [
            "port",
            "PORT",
            "archive_command",
            "log_destination",
            "include",
        ] {
            assert!(check_user_parameter(name, &v).is_err(), "{name}");
        }
        assert!(check_user_parameter("work mem", &v).is_err());
        assert!(check_user_parameter("1abc", &v).is_err());
        assert!(check_user_parameter("work_mem", &ParamValue::Str("a\nb".into())).is_err());
        assert!(check_user_parameter("work_mem", &v).is_ok());
        assert!(check_user_parameter("pg_stat_statements.max", &ParamValue::Int(5)).is_ok());
    }

    #[test]
    fn user_parameters_replace_defaults_and_managed_section_comes_last() {
        let mut cfg = pg();
        cfg.parameters
            .insert("shared_buffers".into(), ParamValue::Str("256MB".into()));
        cfg.parameters
            .insert("search_path".into(), ParamValue::Str("it's".into()));
        cfg.parameters.insert("jit".into(), ParamValue::Bool(false));
        let r = render(&cfg, "postgres");
        let conf = &r.postgresql_conf;
        assert_eq!(conf.matches("shared_buffers").count(), 1);
        assert!(conf.contains("shared_buffers = '256MB'"));
        assert!(conf.contains("search_path = 'it''s'"));
        assert!(conf.contains("jit = off"));
        let user = conf.find("USER PARAMETERS").unwrap();
        let managed = conf.find("MANAGED BY PGWARDEN").unwrap();
        assert!(user < managed);
        assert!(conf[managed..].contains("port = 5432"));
    }

    #[test]
    fn archiving_is_rendered_only_when_configured() {
        let mut cfg = pg();
        assert!(!render(&cfg, "postgres").postgresql_conf.contains("archive"));
        cfg.archive = Some(ArchiveCommands {
            archive_command: "'/bin/pgwarden' wal-archive --settings '/s' %p".into(),
            restore_command: "'/bin/pgwarden' wal-restore --settings '/s' %f %p".into(),
        });
        let conf = render(&cfg, "postgres").postgresql_conf;
        let managed = conf.find("MANAGED BY PGWARDEN").unwrap();
        assert!(conf[managed..].contains("archive_mode = on"));
        assert!(conf[managed..]
            .contains("archive_command = '''/bin/pgwarden'' wal-archive --settings ''/s'' %p'"));
        assert!(conf[managed..].contains("restore_command = '''/bin/pgwarden'' wal-restore"));
    }

    #[test]
    fn standby_settings_are_rendered_only_for_a_standby() {
        let mut cfg = pg();
        let primary = render(&cfg, "postgres");
        assert!(!primary.standby);
        assert!(!primary.postgresql_conf.contains("primary_conninfo"));
        // A restart-only parameter renders the same for both roles (no reload error after a
        // promotion).
        assert!(primary
            .postgresql_conf
            .contains("recovery_target_timeline = 'latest'"));
        cfg.replication.standby = Some(Upstream {
            conninfo: "host=10.0.0.1 port=5432 user=streaming_replica".into(),
            slot: Some("pg_1".into()),
        });
        cfg.replication.synchronous_standby_names = Some("ANY 1 (\"pg-1\")".into());
        let r = render(&cfg, "postgres");
        assert!(r.standby);
        let managed = &r.postgresql_conf[r.postgresql_conf.find("MANAGED BY PGWARDEN").unwrap()..];
        assert!(
            managed.contains("primary_conninfo = 'host=10.0.0.1 port=5432 user=streaming_replica'")
        );
        assert!(managed.contains("primary_slot_name = 'pg_1'"));
        assert!(managed.contains("recovery_target_timeline = 'latest'"));
        assert!(managed.contains("synchronous_standby_names = 'ANY 1 (\"pg-1\")'"));
    }

    #[test]
    fn pgwarden_rule_comes_before_user_rules() {
        let mut cfg = pg();
        cfg.pg_hba = vec!["local all all reject".into()];
        let r = render(&cfg, "alice");
        let own = r.pg_hba_conf.find("peer map=pgwarden").unwrap();
        let user = r.pg_hba_conf.find("reject").unwrap();
        assert!(own < user);
        assert!(r.pg_ident_conf.contains("pgwarden   alice   postgres"));
    }

    #[test]
    fn hba_rules_are_checked() {
        assert!(check_hba_rule("host all all 10.0.0.0/8 scram-sha-256").is_ok());
        assert!(check_hba_rule("hots all all x y").is_err());
        assert!(check_hba_rule("host all all").is_err());
        assert!(check_hba_rule("host all all all trust\nlocal all all trust").is_err());
    }

    #[test]
    fn tls_turns_ssl_on_and_required_takes_only_tls_connections() {
        let mut cfg = pg();
        let plain = render(&cfg, "alice");
        assert!(!plain.postgresql_conf.contains("ssl = on"));
        assert!(plain.pg_hba_conf.contains("\nhost    all "));
        cfg.ssl.files = Some(SslFiles {
            cert: "/run/pg/tls/tls.crt".into(),
            key: "/run/pg/tls/tls.key".into(),
            ca: "/run/pg/tls/ca.crt".into(),
        });
        let preferred = render(&cfg, "alice");
        assert!(preferred.postgresql_conf.contains("ssl = on\nssl_cert_file = '/run/pg/tls/tls.crt'\nssl_key_file = '/run/pg/tls/tls.key'\nssl_ca_file = '/run/pg/tls/ca.crt'\n"));
        assert!(preferred
            .pg_hba_conf
            .contains("\nhost    replication   all          all   scram-sha-256"));
        cfg.ssl.required = true;
        let required = render(&cfg, "alice");
        assert!(required
            .pg_hba_conf
            .contains("\nhostssl all           all          all   scram-sha-256"));
        assert!(required.pg_hba_conf.contains("\nhostssl replication"));
        assert!(!required.pg_hba_conf.contains("\nhost "));
        cfg.ssl.files = None;
        let waiting = render(&cfg, "alice");
        assert!(waiting
            .pg_hba_conf
            .contains("host    all           all          all   reject"));
        assert!(!waiting.pg_hba_conf.contains("scram-sha-256"));
    }
}
