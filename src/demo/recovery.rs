//! The demo's `backup` and `restore TIME`: drop a table, get it back.
//!
//! The demo's cluster archives its WAL to `<dir>/archive`. `backup` runs `pgwarden backup
//! --cluster pg` against the embedded API server (the annotation, answered by a streaming
//! standby under `target: prefer-standby`) and waits for it. `restore TIME` makes the primary
//! switch WAL and waits until that segment is archived (so the archive holds everything up to
//! now), runs `pgwarden restore --target-time TIME` into `<dir>/pg-restored/data`, and starts
//! that instance on its own (no Kubernetes, no archiving): the cluster is left as it was, and
//! the rows of the restored instance can be looked at or copied back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::Signal;

use super::instance::{Instance, Launch};
use super::setup::{self, Layout, Ports, CLUSTER, NAMESPACE};

/// The restored instance's name (and directory).
pub const RESTORED: &str = "pg-restored";
/// Bound for a backup, and for a restore's replay.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(300);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound for the primary's WAL switch to reach the archive.
const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the cluster archives, under the demo's directory.
pub fn archive_dir(dir: &Path) -> PathBuf {
    dir.join("archive")
}

pub fn destination(dir: &Path) -> String {
    format!("file://{}", archive_dir(dir).display())
}

/// `pgwarden <args>` run to its end (as the demo's own user unless `as_instances`); its
/// output, or an error with it.
async fn pgwarden(
    launch: &Launch,
    args: &[&std::ffi::OsStr],
    env: Option<(&str, &Path)>,
    as_instances: bool,
    within: Duration,
) -> anyhow::Result<String> {
    let mut cmd = match as_instances {
        true => launch.command(args),
        false => {
            let mut c = std::process::Command::new(&launch.binary);
            c.args(["--log-format", "human"])
                .args(args)
                .stdin(std::process::Stdio::null());
            c
        }
    };
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(within, launch.reaper.output(&mut cmd))
        .await
        .context("it did not finish in time")?
        .with_context(|| format!("cannot run {}", launch.binary.display()))?;
    let text = format!("{}\n{}", out.stdout.trim(), out.stderr.trim())
        .trim()
        .to_string();
    if !out.status.success() {
        bail!("it ended with {}: {text}", out.status);
    }
    Ok(text)
}

/// The `backup` command: says what happens and how it went.
pub async fn backup_command(launch: &Launch, admin_kubeconfig: &Path) {
    super::say("backup: asking for one (pgwarden backup --cluster pg), a few seconds...");
    match backup(launch, admin_kubeconfig).await {
        Ok(lines) => super::say_lines(&lines),
        Err(e) => super::say(&format!("{e:#}")),
    }
}

/// The `restore TIME` command: says what happens and how it went; the restored instance.
pub async fn restore_command(input: RestoreInput<'_>) -> Option<Instance> {
    let time = input.time.to_string();
    let password = input.password.to_string();
    super::say(&format!(
        "restore: archiving the latest WAL, then restoring the newest backup before {time} \
         and replaying the archive to it, a few seconds..."
    ));
    match restore(input).await {
        Ok(instance) => {
            super::say_lines(&[
                format!(
                    "restored to {time}: {RESTORED} runs on its own (not part of the cluster), \
                     starting now"
                ),
                format!(
                    "  {RESTORED}  psql \"host=127.0.0.1 port={} user=postgres password={password}\"",
                    instance.ports.postgres
                ),
            ]);
            Some(instance)
        }
        Err(e) => {
            super::say(&format!("{e:#}"));
            None
        }
    }
}

/// `backup`: one backup now, through the annotation; the lines to say.
async fn backup(launch: &Launch, admin_kubeconfig: &Path) -> anyhow::Result<Vec<String>> {
    let timeout = format!("{}s", BACKUP_TIMEOUT.as_secs());
    let args = [
        "backup",
        "--cluster",
        CLUSTER,
        "--namespace",
        NAMESPACE,
        "--timeout",
        &timeout,
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let out = pgwarden(
        launch,
        &args,
        Some(("KUBECONFIG", admin_kubeconfig)),
        false,
        BACKUP_TIMEOUT + Duration::from_secs(30),
    )
    .await
    .context("the backup failed")?;
    let now = crate::backup::info::format_time(std::time::SystemTime::now());
    Ok(vec![
        format!(
            "backup complete: {}",
            out.lines().last().unwrap_or_default()
        ),
        format!(
            "it is now {now} (UTC). Change something (DROP TABLE ...), then `restore {now}` \
             brings back the database as it was at that moment, in a new instance beside the \
             cluster"
        ),
    ])
}

/// Makes the primary on `port` switch WAL and waits until that segment is archived.
async fn archive_now(port: u16, password: &str) -> anyhow::Result<()> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .context("cannot connect to the primary")?;
    let driver = tokio::spawn(connection);
    let outcome = async {
        let row = client
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await?;
        let segment: String = row.get(0);
        let deadline = Instant::now() + ARCHIVE_TIMEOUT;
        loop {
            let row = client
                .query_one(
                    "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
                    &[],
                )
                .await?;
            let done: String = row.get(0);
            if done.as_str() >= segment.as_str() && !done.ends_with(".history") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(anyhow::anyhow!("{segment} was not archived within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await;
    driver.abort();
    outcome.map_err(|e: anyhow::Error| e.context("cannot archive the latest WAL"))
}

/// What `restore` needs of the demo.
pub struct RestoreInput<'a> {
    pub launch: &'a Launch,
    pub dir: &'a Path,
    pub time: &'a str,
    pub primary_port: u16,
    pub password: &'a str,
    pub password_file: &'a Path,
}

/// `restore TIME`: the restored instance, started.
async fn restore(r: RestoreInput<'_>) -> anyhow::Result<Instance> {
    crate::backup::info::parse_time(r.time).map_err(anyhow::Error::msg)?;
    let run_as = r.launch.run_as.as_ref();
    let layout = Layout {
        dir: r.dir.join(RESTORED),
    };
    if layout.dir.exists() {
        bail!(
            "{} exists: the demo restores once (stop the demo, or look at {RESTORED})",
            layout.dir.display()
        );
    }
    archive_now(r.primary_port, r.password).await?;
    std::fs::create_dir(&layout.dir)
        .with_context(|| format!("cannot create {}", layout.dir.display()))?;
    setup::give(&layout.dir, run_as)?;
    let data = layout.data_dir();
    let timeout = format!("{}s", RESTORE_TIMEOUT.as_secs());
    let destination = destination(r.dir);
    let args: [&std::ffi::OsStr; 9] = [
        "restore".as_ref(),
        "--destination".as_ref(),
        destination.as_ref(),
        "--target-time".as_ref(),
        r.time.as_ref(),
        "--recovery-timeout".as_ref(),
        timeout.as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
    ];
    pgwarden(
        r.launch,
        &args,
        None,
        true,
        RESTORE_TIMEOUT + Duration::from_secs(60),
    )
    .await
    .context("the restore failed")?;
    let ports = setup::ports(0)?
        .into_iter()
        .next()
        .context("no free port")?;
    let text = config_text(&layout, ports, r.password_file);
    setup::write_file(&layout.config(), &text, 0o644, run_as)?;
    // No kubeconfig: the restored instance runs on its own.
    let mut instance = Instance::new(RESTORED.into(), layout, ports, PathBuf::new());
    instance.spawn(r.launch)?;
    Ok(instance)
}

/// The restored instance's configuration: loopback, no Kubernetes, no archiving.
fn config_text(layout: &Layout, ports: Ports, password_file: &Path) -> String {
    format!(
        "# Written by `pgwarden demo restore`: the instance restored to a point in time.\n\
         instance_name = \"{RESTORED}\"\n\
         \n\
         {}",
        super::setup::local_sections(layout, ports, password_file)
    )
}

/// Stops the restored instance (SIGTERM, then SIGKILL after `within`).
pub async fn stop(instance: &mut Instance, within: Duration) {
    if instance.is_running() {
        instance.signal(Signal::SIGTERM);
        let deadline = Instant::now() + within;
        while instance.is_running() && Instant::now() < deadline {
            let _ = instance.poll_exit();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if !instance.processes().is_empty() {
        instance.kill().await;
    }
    let _ = instance.poll_exit();
    instance.drain_output(Duration::from_secs(2)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restored_configuration_is_valid_and_stands_alone() {
        let layout = Layout {
            dir: PathBuf::from("/tmp/demo/pg-restored"),
        };
        let ports = super::super::setup::test_ports(15500);
        let text = config_text(&layout, ports, Path::new("/tmp/demo/superuser-password"));
        let config = super::super::setup::load_config_text(&text);
        assert_eq!(config.instance_name, RESTORED);
        assert_eq!(config.postgres.port, 15500);
        assert!(config.kubernetes.cluster.is_none() && config.wal.destination.is_none());
    }
}
