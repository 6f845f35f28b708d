//! `pgwarden backup [list | verify ID | prune]` and `pgwarden restore`.
//!
//! The destination and its credentials come from pgwarden's configuration file (`[wal]`,
//! the same file `pgwarden run` reads, `PGWARDEN_*` variables included) and can be given or
//! overridden on the command line, so an archive is usable from any machine that has its URL.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::catalog::{self, Target};
use super::info::{format_time, parse_time};
use super::restore::{self, RestoreOptions};
use super::take::{self, TakeOptions};
use super::{prune, verify, BackupError};
use crate::config::Config;
use crate::supervisor::reaper::Reaper;
use crate::wal::store::Store;

/// Where the archive is, and how to reach it.
#[derive(Args, Debug, Clone)]
pub struct ArchiveArgs {
    /// pgwarden's configuration file; its `[wal]` section gives the destination, the S3
    /// settings and the parallelism.
    #[arg(long, env = "PGWARDEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// `file:///absolute/path` or `s3://bucket/prefix` (default: `wal.destination`).
    #[arg(long, visible_alias = "from")]
    pub destination: Option<String>,
    /// S3 endpoint URL (default: `wal.s3.endpoint`, or AWS).
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    #[arg(long)]
    pub s3_region: Option<String>,
    /// Allow a plain http:// S3 endpoint.
    #[arg(long)]
    pub s3_allow_http: bool,
    /// Directory with files AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (default: the
    /// environment's credentials).
    #[arg(long)]
    pub s3_credentials_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl ArchiveArgs {
    /// The configuration with the command line's overrides, and the destination.
    fn resolve(&self) -> Result<(Config, String), String> {
        let mut config = Config::load(self.config.as_deref(), std::env::vars())
            .map_err(|e| format!("invalid configuration: {e}"))?;
        let s3 = &mut config.wal.s3;
        if let Some(e) = &self.s3_endpoint {
            s3.endpoint = Some(e.clone());
        }
        if let Some(r) = &self.s3_region {
            s3.region = Some(r.clone());
        }
        s3.allow_http |= self.s3_allow_http;
        if let Some(d) = &self.s3_credentials_dir {
            s3.credentials_dir = Some(d.clone());
        }
        let destination = self
            .destination
            .clone()
            .or_else(|| config.wal.destination.clone())
            .filter(|d| !d.is_empty())
            .ok_or("no destination: pass --destination or set wal.destination")?;
        crate::wal::store::parse_destination(&destination)?;
        Ok((config, destination))
    }

    /// The destination, for reading: a directory that does not exist is an error (opening a
    /// file destination creates it, which only archiving should).
    fn resolve_existing(&self) -> Result<(Config, String), String> {
        let (config, destination) = self.resolve()?;
        if let crate::wal::store::Destination::File(dir) =
            crate::wal::store::parse_destination(&destination)?
        {
            if !dir.is_dir() {
                return Err(format!("{destination}: {} does not exist", dir.display()));
            }
        }
        Ok((config, destination))
    }

    fn store(&self) -> Result<(Config, Store), String> {
        let (config, destination) = self.resolve_existing()?;
        let store = Store::open(&destination, &config.wal.s3, config.wal.io_timeout)?;
        Ok((config, store))
    }
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: Option<BackupCommand>,
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// Bound for pg_basebackup.
    #[arg(long, default_value = "6h", value_parser = duration)]
    pub timeout: Duration,
    /// How long the backup's WAL may take to reach the archive after pg_basebackup.
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub wal_timeout: Duration,
    /// Size of each stored part of the tar stream, in MiB (before compression).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub part_mib: u32,
    /// Passed to pg_basebackup: the most it reads per second from the source (e.g. `100M`).
    #[arg(long)]
    pub max_rate: Option<String>,
    /// Ask this PostgresCluster's primary for a backup (the `pgwarden.dev/backup`
    /// annotation) and wait, at most `--timeout`, for the outcome.
    #[arg(long)]
    pub cluster: Option<String>,
    /// The PostgresCluster's namespace (default: the kubeconfig's).
    #[arg(long, requires = "cluster")]
    pub namespace: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// List the destination's backups: id, status, times, LSNs, timeline, size, source.
    List(ArchiveArgs),
    /// Read every object of a backup back and check it, with the WAL it needs.
    Verify {
        id: String,
        #[command(flatten)]
        archive: ArchiveArgs,
    },
    /// Delete the backups and WAL a recovery window no longer needs.
    Prune {
        /// The recovery window, e.g. `7d`.
        #[arg(long, value_parser = duration)]
        retention: Duration,
        /// Show what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        archive: ArchiveArgs,
    },
}

#[derive(Args, Debug)]
#[group(multiple = false)]
pub struct TargetArgs {
    /// Stop before the first transaction committed after this UTC time
    /// (2026-12-01T11:06:00Z).
    #[arg(long)]
    pub target_time: Option<String>,
    /// Stop at this WAL position (0/5000100).
    #[arg(long)]
    pub target_lsn: Option<String>,
    /// Stop at this restore point (`pg_create_restore_point`).
    #[arg(long)]
    pub target_name: Option<String>,
    /// Stop after this transaction's commit (`txid_current()`).
    #[arg(long)]
    pub target_xid: Option<u64>,
    /// `immediate`: the end of the backup; `latest`: the end of the archived WAL (default).
    #[arg(long, value_parser = ["immediate", "latest"])]
    pub target: Option<String>,
}

impl TargetArgs {
    fn target(&self) -> Result<Target, String> {
        if let Some(t) = &self.target_time {
            return parse_time(t).map(Target::Time);
        }
        if let Some(l) = &self.target_lsn {
            return l.parse().map(Target::Lsn);
        }
        if let Some(n) = &self.target_name {
            return Ok(Target::Name(n.clone()));
        }
        if let Some(x) = self.target_xid {
            return Ok(Target::Xid(x));
        }
        Ok(match self.target.as_deref() {
            Some("immediate") => Target::Immediate,
            _ => Target::Latest,
        })
    }
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// The backup to start from (default: the newest that ends before the target).
    #[arg(long)]
    pub backup: Option<String>,
    #[command(flatten)]
    pub target: TargetArgs,
    /// The data directory to create: it must be empty or absent.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Bound for replaying the WAL to the target.
    #[arg(long, default_value = "6h", value_parser = duration)]
    pub recovery_timeout: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Runs `f` on a new runtime; prints its error. Exit status: 0, 1 (failed), 2 (bad input).
fn run<T>(
    json: bool,
    setup: impl FnOnce() -> Result<T, String>,
    f: impl AsyncFnOnce(T) -> Result<String, BackupError>,
) -> i32 {
    let input = match setup() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("pgwarden: {e}");
            return 2;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgwarden: {e}");
            return 1;
        }
    };
    match rt.block_on(f(input)) {
        Ok(out) => {
            print!("{out}");
            0
        }
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
            }
            eprintln!("pgwarden: {e}");
            1
        }
    }
}

fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
}

pub fn backup(args: BackupArgs) -> i32 {
    match args.command {
        None if args.cluster.is_some() => run(
            false,
            || {
                Ok(super::request::Request {
                    cluster: args.cluster.clone().unwrap_or_default(),
                    namespace: args.namespace.clone(),
                    timeout: args.timeout,
                })
            },
            async |r| {
                super::request::run(r)
                    .await
                    .map(|m| m + "\n")
                    .map_err(|e| BackupError::Kubernetes(format!("{e:#}")))
            },
        ),
        None => {
            let json = args.archive.json;
            run(
                json,
                || {
                    let (config, destination) = args.archive.resolve()?;
                    Ok(TakeOptions {
                        config,
                        destination,
                        part_size: args.part_mib as usize * (1 << 20),
                        timeout: args.timeout,
                        wal_timeout: args.wal_timeout,
                        max_rate: args.max_rate.clone(),
                        wal_request: None,
                    })
                },
                async |o| {
                    let reaper =
                        Reaper::start().map_err(BackupError::io("cannot watch child processes"))?;
                    let i = take::take(&o, &reaper).await?;
                    Ok(match json {
                        true => to_json(&i),
                        false => format!(
                            "backup {} complete: {} to {} on timeline {}, {} bytes stored as {}\n",
                            i.id, i.start_lsn, i.end_lsn, i.timeline, i.bytes, i.stored_bytes
                        ),
                    })
                },
            )
        }
        Some(BackupCommand::List(a)) => run(
            a.json,
            || a.store(),
            async |(_, store)| {
                let entries = catalog::list(&store).await?;
                Ok(match a.json {
                    true => to_json(&entries),
                    false => table(&entries),
                })
            },
        ),
        Some(BackupCommand::Verify { id, archive }) => run(
            archive.json,
            || archive.store(),
            async |(config, store)| {
                let v = verify::verify(&store, &id, config.wal.parallelism as usize).await?;
                Ok(match archive.json {
                    true => to_json(&v),
                    false => format!(
                        "backup {} verified: {} objects ({} bytes) and {} WAL segments\n",
                        v.id, v.objects, v.bytes, v.wal_segments
                    ),
                })
            },
        ),
        Some(BackupCommand::Prune {
            retention,
            dry_run,
            archive,
        }) => run(
            archive.json,
            || archive.store(),
            async |(_, store)| {
                let p = prune::prune(&store, retention, dry_run).await?;
                if archive.json {
                    return Ok(to_json(&p));
                }
                let verb = if dry_run { "would delete" } else { "deleted" };
                let mut out = String::new();
                for id in &p.keep {
                    out.push_str(&format!("keep backup {id}\n"));
                }
                for id in &p.delete_backups {
                    out.push_str(&format!("{verb} backup {id}\n"));
                }
                out.push_str(&format!(
                    "{verb} {} backups and {} WAL files\n",
                    p.delete_backups.len(),
                    p.delete_wal.len()
                ));
                Ok(out)
            },
        ),
    }
}

/// The text form of `backup list`.
fn table(entries: &[catalog::Entry]) -> String {
    let mut out = format!(
        "{:<17} {:<10} {:<24} {:<24} {:<12} {:<12} {:>3} {:>12} {}\n",
        "ID", "STATUS", "START", "END", "START LSN", "END LSN", "TL", "STORED", "SOURCE"
    );
    for e in entries {
        let dash = || "-".to_string();
        let i = e.info.as_ref();
        out.push_str(&format!(
            "{:<17} {:<10} {:<24} {:<24} {:<12} {:<12} {:>3} {:>12} {}\n",
            e.id,
            e.status,
            i.map_or_else(dash, |i| format_time(i.start_time)),
            i.map_or_else(dash, |i| format_time(i.end_time)),
            i.map_or_else(dash, |i| i.start_lsn.to_string()),
            i.map_or_else(dash, |i| i.end_lsn.to_string()),
            i.map_or_else(dash, |i| i.timeline.to_string()),
            e.stored_bytes,
            i.map_or_else(
                || e.problem.clone().unwrap_or_default(),
                |i| i.source.clone()
            ),
        ));
    }
    out
}

pub fn restore(args: RestoreArgs) -> i32 {
    let json = args.archive.json;
    run(
        json,
        || {
            let (config, destination) = args.archive.resolve_existing()?;
            Ok(RestoreOptions {
                destination,
                backup: args.backup.clone(),
                target: args.target.target()?,
                data_dir: args.data_dir.clone(),
                bin_dir: config.postgres.bin_dir.clone(),
                wal: config.wal,
                recovery_timeout: args.recovery_timeout,
            })
        },
        async |o| {
            let r = restore::restore(&o).await?;
            Ok(match json {
                true => to_json(&r),
                false => format!(
                    "restored backup {} into {} to {}; promoted onto timeline {}\n",
                    r.backup,
                    r.data_dir.display(),
                    r.target,
                    r.timeline.map_or_else(|| "?".into(), |t| t.to_string())
                ),
            })
        },
    )
}
