//! Every PostgreSQL program pgwarden runs (postgres itself, initdb, pg_basebackup, pg_rewind,
//! pg_config) starts from [`command`].
//!
//! Children inherit pgwarden's environment, and libpq takes its defaults from variables that
//! images and operators commonly set for their own clients: with `PGPASSWORD` set, libpq
//! prefers it to the passfile pgwarden names in the connection string, and every clone failed
//! with "password authentication failed for user streaming_replica". The server inherits them
//! too and passes them to its own libpq connections (the standby's WAL receiver). So none of
//! them reaches a child; everything a tool needs, pgwarden passes explicitly (command-line
//! options, a connection string with `passfile=`). Other variables (`LC_ALL`, the `AWS_*`
//! credentials the archive commands read, `PGDATA`, which pgwarden never relies on because it
//! always passes `-D`) are left alone.

use std::ffi::OsStr;
use std::process::Command;

/// libpq's environment variables ("Environment Variables" in the libpq documentation, through
/// PostgreSQL 18): connection defaults, service and password files, TLS and GSS settings,
/// session defaults, and where libpq finds its configuration and messages.
pub const LIBPQ_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGREQUIREAUTH",
    "PGCHANNELBINDING",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGAPPNAME",
    "PGSSLMODE",
    "PGSSLNEGOTIATION",
    "PGREQUIRESSL",
    "PGSSLCOMPRESSION",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGSSLCERTMODE",
    "PGSSLROOTCERT",
    "PGSSLCRL",
    "PGSSLCRLDIR",
    "PGSSLSNI",
    "PGREQUIREPEER",
    "PGSSLMINPROTOCOLVERSION",
    "PGSSLMAXPROTOCOLVERSION",
    "PGMINPROTOCOLVERSION",
    "PGMAXPROTOCOLVERSION",
    "PGGSSENCMODE",
    "PGKRBSRVNAME",
    "PGGSSLIB",
    "PGGSSDELEGATION",
    "PGCONNECT_TIMEOUT",
    "PGCLIENTENCODING",
    "PGTARGETSESSIONATTRS",
    "PGLOADBALANCEHOSTS",
    "PGDATESTYLE",
    "PGTZ",
    "PGGEQO",
    "PGSYSCONFDIR",
    "PGLOCALEDIR",
];

/// A [`Command`] for `program` whose child sees none of libpq's environment variables.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    clean_libpq_env(&mut cmd);
    cmd
}

/// Removes libpq's environment variables from what `cmd`'s child inherits (and any set on
/// `cmd` before). Variables set on `cmd` afterwards are kept.
pub fn clean_libpq_env(cmd: &mut Command) {
    for var in LIBPQ_ENV {
        cmd.env_remove(var);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_see_no_libpq_variable_and_keep_the_rest() {
        let mut cmd = Command::new("env");
        for var in LIBPQ_ENV {
            cmd.env(var, "inherited");
        }
        cmd.env("PGDATA", "/kept").env("LC_ALL", "C");
        clean_libpq_env(&mut cmd);
        let out = cmd.output().expect("run env");
        assert!(out.status.success());
        let env = String::from_utf8_lossy(&out.stdout);
        let names: Vec<&str> = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, _)| k)
            .collect();
        for var in LIBPQ_ENV {
            assert!(!names.contains(var), "{var} reached the child");
        }
        assert!(env.lines().any(|l| l == "PGDATA=/kept"), "{env}");
        assert!(env.lines().any(|l| l == "LC_ALL=C"), "{env}");

        // Set explicitly after cleaning: kept.
        let mut cmd = command("env");
        cmd.env("PGPASSFILE", "/run/pass");
        let out = cmd.output().expect("run env");
        assert!(String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == "PGPASSFILE=/run/pass"));
    }
}
