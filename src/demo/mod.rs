//! `pgwarden demo`: a three-instance cluster on this machine, without Kubernetes.
//!
//! The demo starts the embedded API server ([`apiserver`]) on 127.0.0.1 and creates in it what
//! `config/` creates in a real cluster: the password Secrets, the Pods and the PostgresCluster
//! `pg` (three instances, quorum commit, quick failover timings). It then runs three
//! `pgwarden run` children of its own binary, `pg-0` to `pg-2`, each with its own directory,
//! ports, configuration file and kubeconfig, their output prefixed with their names. Every
//! second it reads each instance's `/pg/status` and the leader Lease, and says when the
//! cluster's state or its primary changes.
//!
//! Commands on stdin: `kill` (SIGKILL the primary's pgwarden and Postgres: a lost node; it is
//! started again once another instance has taken over, and rejoins as a standby), `kill NAME`,
//! `start NAME`, `status`, `backup` and `restore TIME` ([`recovery`]: drop a table, get it
//! back), `help`, `stop`. Ctrl-C (SIGINT), SIGTERM or SIGHUP stop the
//! standbys, then the primary, with SIGTERM (clean shutdowns), kill whatever is left after
//! 30 s, and the demo exits 0 once no process of it remains.

pub mod apiserver;
mod commands;
mod instance;
mod observe;
pub mod process;
mod recovery;
mod setup;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use self::apiserver::ApiServer;
use self::instance::{Instance, Launch};
use self::observe::View;
use self::setup::{Layout, Ports, Workdir, CLUSTER, INSTANCES, LEASE_SECONDS};
use crate::supervisor::reaper::Reaper;

/// `pgwarden demo`'s options.
pub struct Options {
    /// The directory for the instances (new or empty); None: a new temporary directory,
    /// removed at the end.
    pub dir: Option<PathBuf>,
    /// Instance `i` listens on `base_port + i` (Postgres), `+ 10 + i` (status), `+ 20 + i`
    /// (metrics); 0 picks free ports.
    pub base_port: u16,
    /// The instances' `--log-level`.
    pub log_level: String,
}

/// A killed instance is started again no sooner than this...
const RESTART_DELAY: Duration = Duration::from_secs(5);
/// ...and, when it was the primary, once another instance has taken over or after this.
const RESTART_LATEST: Duration = Duration::from_secs(60);
/// How long a clean stop of the instances may take before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the pre-flight `check-config` may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the demo; returns the exit code.
pub fn main(opts: Options) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgwarden demo: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgwarden demo: {e:#}");
            1
        }
    }
}

/// One line of the demo's own, marked as such among the instances' output.
fn say(text: &str) {
    say_lines(&[text.to_string()]);
}

/// Lines printed together: no instance's output lands between them.
fn say_lines(lines: &[String]) {
    let mut out = std::io::stdout().lock();
    for line in lines {
        // A closed stdout is no reason to stop the demo (or to leave its cluster running).
        let _ = writeln!(out, "[demo] {line}");
    }
    let _ = out.flush();
}

struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next stop request, named.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "Ctrl-C",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

async fn run(opts: Options) -> anyhow::Result<i32> {
    // First: from here on Ctrl-C is handled, and stops whatever was started.
    let mut signals = Signals::install().context("cannot install the signal handlers")?;
    // A subreaper: the Postgres processes of a killed pgwarden become the demo's, which reaps
    // them and finds them all at the end.
    let reaper = Reaper::start().context("cannot install the SIGCHLD handler")?;
    // Before anything is created: without PostgreSQL, one line that says what to install.
    crate::postgres::binaries::Binaries::locate(&reaper, None, None)
        .await?
        .check_tools()?;
    let run_as = setup::run_as()?;
    let ports = setup::ports(opts.base_port)?;
    let workdir = setup::workdir(opts.dir.as_deref(), run_as.as_ref())?;
    let mut demo = Demo {
        workdir,
        launch: Launch {
            binary: std::env::current_exe().context("cannot find the pgwarden binary")?,
            run_as,
            log_level: opts.log_level.clone(),
            reaper,
        },
        server: None,
        instances: Vec::new(),
        names: Vec::new(),
        password: String::new(),
        password_file: PathBuf::new(),
        admin_kubeconfig: PathBuf::new(),
        view: None,
        announced: None,
        shown_ready: false,
        primary_killed_at: None,
        restored: None,
    };
    let outcome = match demo.start(ports).await {
        Ok(()) => demo.watch(&mut signals).await,
        Err(e) => Err(e),
    };
    let failed = match outcome {
        Ok(()) => false,
        Err(e) => {
            say(&format!("error: {e:#}"));
            true
        }
    };
    let clean = demo.stop(&mut signals).await;
    demo.leave(clean);
    Ok(if clean && !failed { 0 } else { 1 })
}

struct Demo {
    workdir: Workdir,
    launch: Launch,
    server: Option<ApiServer>,
    instances: Vec<Instance>,
    names: Vec<String>,
    password: String,
    password_file: PathBuf,
    admin_kubeconfig: PathBuf,
    /// The last round's view.
    view: Option<View>,
    /// The primary last announced.
    announced: Option<usize>,
    /// Whether the banner was shown (once the cluster was first ready).
    shown_ready: bool,
    /// When the demo last killed the primary, until another one is announced.
    primary_killed_at: Option<Instant>,
    /// The instance `restore TIME` made, beside the cluster.
    restored: Option<Instance>,
}

impl Demo {
    /// The API server, its objects, the instances' files, and the instances.
    async fn start(&mut self, ports: Vec<Ports>) -> anyhow::Result<()> {
        let run_as = self.launch.run_as.clone();
        let run_as = run_as.as_ref();
        let dir = self.workdir.path.clone();
        self.password = setup::random_hex(20)?;
        self.password_file = dir.join("superuser-password");
        setup::write_file(&self.password_file, &self.password, 0o600, run_as)?;

        let server = ApiServer::start().context("cannot start the embedded API server")?;
        self.names = (0..INSTANCES).map(|i| format!("{CLUSTER}-{i}")).collect();
        let archive = recovery::archive_dir(&dir);
        std::fs::create_dir(&archive)
            .with_context(|| format!("cannot create {}", archive.display()))?;
        setup::give(&archive, run_as)?;
        setup::seed(
            &server,
            &self.names,
            &self.password,
            &setup::random_hex(20)?,
            &recovery::destination(&dir),
        )
        .context("cannot create the cluster's objects")?;
        self.admin_kubeconfig = server
            .kubeconfig(&dir, "admin")
            .context("cannot write a kubeconfig")?;
        for (name, ports) in self.names.iter().zip(ports) {
            let layout = Layout {
                dir: dir.join(name),
            };
            std::fs::create_dir(&layout.dir)
                .with_context(|| format!("cannot create {}", layout.dir.display()))?;
            setup::give(&layout.dir, run_as)?;
            let text = setup::config_text(name, &layout, ports, &self.password_file);
            setup::write_file(&layout.config(), &text, 0o644, run_as)?;
            let kubeconfig = server
                .kubeconfig(&layout.dir, name)
                .context("cannot write a kubeconfig")?;
            setup::give(&kubeconfig, run_as)?;
            self.instances
                .push(Instance::new(name.clone(), layout, ports, kubeconfig));
        }
        let url = server.url();
        self.server = Some(server);
        self.preflight().await?;

        say_lines(&[
            format!(
                "pgwarden demo: the PostgresCluster {CLUSTER:?} with {} instances ({}), against an \
                 embedded Kubernetes API server at {url}",
                INSTANCES,
                self.names.join(", ")
            ),
            format!(
                "files in {} (per instance: pgwarden.toml, data/, run/){}",
                dir.display(),
                match &self.launch.run_as {
                    Some(u) => format!("; the instances run as the user {}", u.name),
                    None => String::new(),
                }
            ),
            "the instances' logs follow, each line prefixed with its name; lines from the demo \
             start with [demo]"
                .to_string(),
            "waiting for a primary and two streaming standbys (initdb, then two clones)..."
                .to_string(),
        ]);
        for i in 0..self.instances.len() {
            self.instances[i].spawn(&self.launch)?;
        }
        Ok(())
    }

    /// Checks that the instances' user can run the binary and read the files (as root, the
    /// binary may sit in a directory only root can reach: then a copy is used).
    async fn preflight(&mut self) -> anyhow::Result<()> {
        let Some(first) = self.instances.first() else {
            return Ok(());
        };
        let config = first.layout.config();
        let first_try = self.check_config(&config).await;
        let Err(e) = first_try else { return Ok(()) };
        let Some(user) = self.launch.run_as.clone() else {
            return Err(e);
        };
        let copy = self.workdir.path.join("pgwarden");
        std::fs::copy(&self.launch.binary, &copy).with_context(|| {
            format!(
                "cannot copy {} to {}",
                self.launch.binary.display(),
                copy.display()
            )
        })?;
        setup::give(&copy, Some(&user))?;
        let original = std::mem::replace(&mut self.launch.binary, copy);
        self.check_config(&config).await.with_context(|| {
            format!(
                "the user {} cannot run {} nor a copy of it in {} (the directory must be \
                 reachable by that user)",
                user.name,
                original.display(),
                self.workdir.path.display()
            )
        })
    }

    async fn check_config(&self, config: &std::path::Path) -> anyhow::Result<()> {
        let mut cmd = self.launch.command(&[
            "check-config".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ]);
        let output = self.launch.reaper.output(&mut cmd);
        let output = tokio::time::timeout(CHECK_TIMEOUT, output)
            .await
            .context("`pgwarden check-config` did not finish")?
            .with_context(|| format!("cannot run {}", self.launch.binary.display()))?;
        if !output.status.success() {
            bail!(
                "`pgwarden check-config` ended with {}: {}{}",
                output.status,
                output.stdout.trim(),
                output.stderr.trim()
            );
        }
        Ok(())
    }

    /// Until a stop is asked for: commands from stdin, and a look at the cluster every second.
    async fn watch(&mut self, signals: &mut Signals) -> anyhow::Result<()> {
        let (tx, mut commands) = mpsc::channel(16);
        std::thread::Builder::new()
            .name("demo-stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { return };
                    if tx.blocking_send(line).is_err() {
                        return;
                    }
                }
            })
            .context("cannot start the stdin thread")?;
        let mut stdin_open = true;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                why = signals.next() => {
                    say(&format!("{why}: stopping the cluster"));
                    return Ok(());
                }
                line = commands.recv(), if stdin_open => match line {
                    Some(line) => {
                        if !self.command(line.trim()).await {
                            return Ok(());
                        }
                    }
                    None => stdin_open = false,
                },
                _ = tick.tick() => self.round().await?,
            }
        }
    }

    /// One look at the cluster: exits, restarts due, the state, the primary.
    async fn round(&mut self) -> anyhow::Result<()> {
        self.reap_exits();
        let primary = self.view.as_ref().and_then(|v| v.primary);
        for i in 0..self.instances.len() {
            let instance = &self.instances[i];
            let Some(at) = instance.restart_at else {
                continue;
            };
            let now = Instant::now();
            // A killed primary comes back once another instance took over (else its pgwarden,
            // still the Lease holder, would simply start it as the primary again).
            let waiting = instance.wait_for_failover
                && primary.is_none_or(|p| p == i)
                && now < at + RESTART_LATEST;
            if now >= at && !waiting && !instance.is_running() {
                if instance.wait_for_failover && primary.is_none_or(|p| p == i) {
                    say(&format!(
                        "no other instance took over within {} s",
                        RESTART_LATEST.as_secs()
                    ));
                    self.primary_killed_at = None;
                }
                say(&format!(
                    "starting {} again: it rejoins as a standby (pg_rewind first, when it has \
                     diverged)",
                    instance.name
                ));
                if let Err(e) = self.instances[i].spawn(&self.launch) {
                    say(&format!("{e:#}"));
                    self.instances[i].restart_at = None;
                }
            }
        }
        let Some(server) = &self.server else {
            return Ok(());
        };
        let view = observe::observe(&self.instances, server).await;
        if self.view.as_ref().map(|v| &v.states) != Some(&view.states) {
            say(&view.line(&self.names));
        }
        if let Some(p) = view.primary {
            if self.announced != Some(p) {
                let after = match self.primary_killed_at.take() {
                    Some(at) => format!(", {} s after the kill", at.elapsed().as_secs()),
                    None => String::new(),
                };
                say(&match self.announced {
                    Some(old) => format!(
                        "primary is now {} (was {}{after})",
                        self.names[p], self.names[old]
                    ),
                    None => format!("primary is now {}", self.names[p]),
                });
                self.announced = Some(p);
            }
        }
        let first_ready = view.ready && !self.shown_ready;
        self.view = Some(view);
        if first_ready {
            self.shown_ready = true;
            self.banner();
        }
        if self
            .instances
            .iter()
            .all(|i| !i.is_running() && i.restart_at.is_none())
        {
            bail!("every instance has stopped (their logs above say why)");
        }
        Ok(())
    }

    /// Reports the pgwardens that exited on their own.
    fn reap_exits(&mut self) {
        for instance in &mut self.instances {
            if let Some(exit) = instance.poll_exit() {
                if !exit.expected {
                    say(&format!(
                        "{}'s pgwarden exited ({}); `start {}` starts it again",
                        instance.name, exit.status, instance.name
                    ));
                }
            }
        }
    }

    /// Stops every instance: the standbys, then the primary, with SIGTERM (a clean stop);
    /// whatever is left after `STOP_TIMEOUT` (or at a second Ctrl-C) is killed. True when no
    /// process of the demo is left.
    async fn stop(&mut self, signals: &mut Signals) -> bool {
        for instance in &mut self.instances {
            instance.restart_at = None;
        }
        if let Some(r) = self.restored.as_mut() {
            say(&format!("stopping {} (SIGTERM)", recovery::RESTORED));
            recovery::stop(r, STOP_TIMEOUT).await;
        }
        self.reap_exits();
        let running: Vec<usize> = (0..self.instances.len())
            .filter(|&i| self.instances[i].is_running())
            .collect();
        let primary = self
            .view
            .as_ref()
            .and_then(|v| v.primary)
            .filter(|p| running.contains(p));
        // Standbys first: a primary stopped first would hand over to one of them, which is
        // stopping too.
        let groups: Vec<Vec<usize>> = match primary {
            Some(p) => vec![
                running.iter().copied().filter(|&i| i != p).collect(),
                vec![p],
            ],
            None => vec![running],
        };
        let mut hurry = false;
        for group in groups.into_iter().filter(|g| !g.is_empty()) {
            let names: Vec<&str> = group.iter().map(|&i| self.names[i].as_str()).collect();
            say(&format!("stopping {} (SIGTERM)", names.join(", ")));
            for &i in &group {
                self.instances[i].signal(Signal::SIGTERM);
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                for &i in &group {
                    if let Some(exit) = self.instances[i].poll_exit() {
                        say(&format!("{} stopped ({})", self.names[i], exit.status));
                    }
                }
                if group.iter().all(|&i| !self.instances[i].is_running()) {
                    break;
                }
                if Instant::now() > deadline {
                    say(&format!(
                        "still running after {} s: killing",
                        STOP_TIMEOUT.as_secs()
                    ));
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    why = signals.next() => {
                        say(&format!("{why} again: killing everything now"));
                        hurry = true;
                        break;
                    }
                }
            }
            if hurry {
                break;
            }
        }
        // Whatever is left of an instance (a pgwarden, an orphaned Postgres): SIGKILL.
        let mut clean = true;
        for i in 0..self.instances.len() {
            if self.instances[i].processes().is_empty() {
                continue;
            }
            let (killed, left) = self.instances[i].kill().await;
            say(&format!(
                "{}: killed {killed} processes left over",
                self.names[i]
            ));
            if !left.is_empty() {
                say(&format!("{}: still alive: {left:?}", self.names[i]));
                clean = false;
            }
            let _ = self.instances[i].poll_exit();
        }
        // Anything else the demo started, directly or not (it is their subreaper).
        let stray = process::descendants(std::process::id() as i32);
        if !stray.is_empty() {
            for &pid in &stray {
                say(&format!(
                    "killing a leftover process {pid}: {}",
                    process::command_line(pid)
                ));
            }
            process::signal_all(&stray, Signal::SIGKILL);
            let left = process::wait_gone(&stray, Duration::from_secs(10)).await;
            if !left.is_empty() {
                say(&format!("still alive: {left:?}"));
                clean = false;
            }
        }
        for instance in &mut self.instances {
            instance.drain_output(Duration::from_secs(2)).await;
        }
        self.server = None;
        clean
    }

    /// The last words, and the temporary directory removed.
    fn leave(&self, clean: bool) {
        let dir = &self.workdir.path;
        if !clean {
            say(&format!(
                "some processes could not be stopped (see above); {} is kept",
                dir.display()
            ));
            return;
        }
        if self.workdir.temporary {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => say(&format!(
                    "stopped; nothing is left running; removed {}",
                    dir.display()
                )),
                Err(e) => say(&format!(
                    "stopped; nothing is left running; cannot remove {}: {e}",
                    dir.display()
                )),
            }
        } else {
            say(&format!(
                "stopped; nothing is left running; the data stays in {}",
                dir.display()
            ));
        }
    }
}
