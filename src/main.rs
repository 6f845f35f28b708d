//! pgwarden: a per-pod PostgreSQL instance manager that runs as PID 1.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use pgwarden::config::Config;
use pgwarden::logging::{self, LogFormat, LogTo};
use pgwarden::{http, k8s, run};

#[derive(Parser)]
#[command(
    name = "pgwarden",
    version,
    about = "Runs and supervises PostgreSQL as PID 1"
)]
struct Cli {
    /// Log format of pgwarden's stdout (Postgres's records included).
    #[arg(
        long,
        global = true,
        env = "PGWARDEN_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `pgwarden=debug`.
    #[arg(
        long,
        global = true,
        env = "PGWARDEN_LOG_LEVEL",
        default_value = "info"
    )]
    log_level: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run and supervise PostgreSQL (the container entrypoint).
    Run {
        /// TOML configuration file; `PGWARDEN_*` environment variables override its keys.
        #[arg(long, env = "PGWARDEN_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and print it as pgwarden understands it.
    CheckConfig {
        #[arg(long, env = "PGWARDEN_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the JSON Schema of the `/pg/status` document.
    StatusSchema,
    /// Print the PostgresCluster CustomResourceDefinition as YAML.
    Crd,
    /// Archive one WAL file (Postgres's archive_command, rendered by pgwarden).
    WalArchive {
        /// The settings file `pgwarden run` writes (`<run_dir>/wal/settings.json`).
        #[arg(long)]
        settings: PathBuf,
        /// `%p`: the file's path, relative to the data directory.
        path: PathBuf,
    },
    /// Hand the primary role to another instance (a planned switchover). Sets the
    /// `pgwarden.dev/switchover-to` annotation on the PostgresCluster and waits for the result.
    Switchover {
        /// The standby to promote.
        #[arg(long)]
        to: String,
        /// The PostgresCluster's name.
        #[arg(long)]
        cluster: String,
        /// Default: the kubeconfig's namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// How long to wait for the new primary.
        #[arg(long, default_value = "60s", value_parser = humantime_duration)]
        timeout: std::time::Duration,
    },
    /// A three-instance cluster on this machine, without Kubernetes: real PostgreSQL, an
    /// embedded API server, failover on demand (type `kill`). Ctrl-C stops it all.
    #[cfg(feature = "demo")]
    Demo {
        /// Directory for the instances' files (new or empty; kept at the end). Default: a new
        /// temporary directory, removed at the end.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Instance N's Postgres listens on BASE+N, its status server on BASE+10+N, its
        /// metrics on BASE+20+N (all on 127.0.0.1); 0 picks any free ports.
        #[arg(long, default_value_t = 15432)]
        base_port: u16,
    },
    /// Base backups into the WAL archive's destination: take one of the local instance, or
    /// list, verify and prune the destination's.
    Backup(pgwarden::backup::cli::BackupArgs),
    /// Restore a base backup into an empty data directory and recover it to a target (a
    /// time, an LSN, a restore point, the end of the backup, or the end of the archive).
    Restore(pgwarden::backup::cli::RestoreArgs),
    /// Restore one WAL file from the archive (Postgres's restore_command).
    WalRestore {
        #[arg(long)]
        settings: PathBuf,
        /// `%f`: the file name wanted.
        name: String,
        /// `%p`: where to put it.
        path: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    // The demo's output is for people: its own log and its instances' logs are human-readable.
    let log_format = match cli.command {
        #[cfg(feature = "demo")]
        Cmd::Demo { .. } => LogFormat::Human,
        _ => cli.log_format,
    };
    let log_to = match cli.command {
        #[cfg(feature = "demo")]
        Cmd::Demo { .. } => LogTo::Stdout,
        Cmd::Run { .. } => LogTo::Stdout,
        _ => LogTo::Stderr,
    };
    logging::init(log_format, &cli.log_level, log_to);
    let code = match cli.command {
        Cmd::Crd => {
            print!("{}", k8s::crd::crd_yaml());
            0
        }
        Cmd::StatusSchema => {
            print!("{}", http::status::schema());
            0
        }
        Cmd::Run { config } => run_main(config, cli.log_format),
        #[cfg(feature = "demo")]
        Cmd::Demo { dir, base_port } => pgwarden::demo::main(pgwarden::demo::Options {
            dir,
            base_port,
            log_level: cli.log_level.clone(),
        }),
        Cmd::Switchover {
            to,
            cluster,
            namespace,
            timeout,
        } => switchover(pgwarden::ha::switchover::Request {
            cluster,
            namespace,
            to,
            timeout,
        }),
        Cmd::Backup(args) => pgwarden::backup::cli::backup(args),
        Cmd::Restore(args) => pgwarden::backup::cli::restore(args),
        Cmd::WalArchive { settings, path } => {
            pgwarden::wal::commands::wal_archive(&settings, &path)
        }
        Cmd::WalRestore {
            settings,
            name,
            path,
        } => pgwarden::wal::commands::wal_restore(&settings, &name, &path),
        Cmd::CheckConfig { config } => match Config::load(config.as_deref(), std::env::vars()) {
            Ok(c) => {
                println!("{c:#?}");
                0
            }
            Err(e) => {
                tracing::error!(error = %e, "invalid configuration");
                2
            }
        },
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

fn humantime_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn switchover(request: pgwarden::ha::switchover::Request) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(pgwarden::ha::switchover::run(request)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e:#}");
            1
        }
    }
}

fn run_main(config_path: Option<PathBuf>, log_format: LogFormat) -> i32 {
    let config = match Config::load(config_path.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return 1;
        }
    };
    let result = runtime.block_on(run::run(run::Options {
        config,
        config_path,
        log_format,
    }));
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "pgwarden cannot run");
            1
        }
    }
}
