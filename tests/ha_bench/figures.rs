//! The figures: one run's outcome, each scenario's figures and their table, the idle
//! footprint, and the `ha-bench-figure` lines for `bench/ha.sh --with-patroni`.

use super::*;

/// What one run measured.
pub(crate) struct Outcome {
    /// The failure (or the request).
    pub(crate) t0: Instant,
    /// The first acknowledged write after it that counts (on the new or restarted primary).
    pub(crate) first: Ack,
    /// What [`watch_sync`] saw on that primary.
    pub(crate) sync: (Option<Instant>, Option<Instant>),
}

#[derive(Default)]
pub(crate) struct Figures {
    /// The headline figure of each run, in seconds.
    pub(crate) seconds: Vec<f64>,
    /// Acknowledged commits found missing.
    pub(crate) lost: usize,
    /// Seconds from the failure until the primary had a synchronous standby streaming.
    pub(crate) sync_seconds: Vec<f64>,
    /// Runs where it had none within a minute.
    pub(crate) sync_never: usize,
    /// Writes the primary acknowledged before it had a synchronous standby.
    pub(crate) unprotected: usize,
    /// The longest gap between acknowledged writes after the first one that counts, until every
    /// instance streamed again.
    pub(crate) stall: Vec<f64>,
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

pub(crate) fn print_table(
    setup: Setup,
    figures: &[(Scenario, Figures)],
    runs: usize,
    total_acks: usize,
    lost: usize,
) {
    println!();
    println!(
        "HA figures: 3 instances, {}, {runs} runs per scenario",
        setup.describe()
    );
    println!(
        "{:<42} {:>4} {:>7} {:>7} {:>7} {:>7} {:>8} {:>5}  verdict (max)",
        "scenario", "runs", "min s", "median", "p90", "max s", "target", "lost"
    );
    for (s, f) in figures {
        let mut v = f.seconds.clone();
        v.sort_by(f64::total_cmp);
        let (target, at_most) = s.target(setup);
        let target_text = format!("{}{target:.0} s", if at_most { "<=" } else { "<" });
        if v.is_empty() {
            println!("{:<42} {:>4} {:>39}", s.label(), 0, "-");
            continue;
        }
        let max = v[v.len() - 1];
        let ok = if at_most { max <= target } else { max < target };
        println!(
            "{:<42} {:>4} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>8} {:>5}  {}",
            s.label(),
            v.len(),
            v[0],
            median(&v),
            percentile(&v, 0.9),
            max,
            target_text,
            f.lost,
            if ok { "OK" } else { "MISS" }
        );
    }
    println!(
        "acknowledged commits lost: {lost} of {total_acks} acknowledged (target 0): {}",
        if lost == 0 { "OK" } else { "MISS" }
    );
    println!();
    println!(
        "(info) after the first write that counts: the longest gap between writes until every \
         instance streamed again; when that primary had a synchronous standby streaming (seconds \
         after the failure) and how many writes it acknowledged before"
    );
    println!(
        "{:<42} {:>4} {:>13} {:>13} {:>6} {:>12}",
        "scenario", "runs", "gap med/max", "sync med/max", "never", "acked before"
    );
    let pair = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        match v.last() {
            Some(max) => format!("{:.2}/{max:.2}", median(&v)),
            None => "-".to_string(),
        }
    };
    for (s, f) in figures {
        println!(
            "{:<42} {:>4} {:>13} {:>13} {:>6} {:>12}",
            s.label(),
            f.stall.len(),
            pair(&f.stall),
            pair(&f.sync_seconds),
            f.sync_never,
            f.unprotected
        );
    }
}

/// One pgwarden process's footprint while the cluster is idle.
pub(crate) struct Footprint {
    /// Whether the instance was the primary during the measurement.
    pub(crate) primary: bool,
    /// `VmRSS` at the end of the idle period, in KiB.
    pub(crate) rss_kib: u64,
    /// utime + stime over the idle period, in clock ticks, and as a percentage of one core.
    pub(crate) ticks: u64,
    pub(crate) cpu_percent: f64,
}

/// utime + stime (fields 14 and 15 of /proc/PID/stat) of the process itself, all its threads,
/// not its children (Postgres), in clock ticks.
pub(crate) fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // The fields after the command name, which is in parentheses and may contain anything.
    let (_, rest) = stat.rsplit_once(')').expect("a /proc/PID/stat line");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state).
    let field = |n: usize| -> u64 { fields[n - 3].parse().expect("a number of ticks") };
    field(14) + field(15)
}

/// `VmRSS` of the process, in KiB.
pub(crate) fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Every instance streaming and no writes: each pgwarden's CPU time over `idle`, and its
/// resident size at the end.
pub(crate) async fn idle_footprint(c: &mut Cluster, idle: Duration) -> Vec<Footprint> {
    let p = c.wait_all_streaming(LONG).await;
    // Let the last writes' replication and status updates settle.
    sleep(Duration::from_secs(5)).await;
    let pids: Vec<i32> = (0..c.len())
        .map(|i| {
            let w = c.nodes[i].warden.as_ref().expect("every pgwarden running");
            w.pid().as_raw()
        })
        .collect();
    eprintln!(
        "ha-bench: idle footprint of every pgwarden over {} s",
        idle.as_secs()
    );
    // Clock ticks per second of /proc/PID/stat (USER_HZ, 100 on Linux).
    let hz: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    let before: Vec<u64> = pids.iter().map(|&pid| cpu_ticks(pid)).collect();
    let t = Instant::now();
    sleep(idle).await;
    let elapsed = t.elapsed().as_secs_f64();
    let now_primary = c.wait_all_streaming(LONG).await;
    assert_eq!(
        p,
        now_primary,
        "the primary changed during the idle period ({} -> {})",
        c.name(p),
        c.name(now_primary)
    );
    pids.iter()
        .zip(before)
        .enumerate()
        .map(|(i, (&pid, b))| {
            let ticks = cpu_ticks(pid) - b;
            Footprint {
                primary: i == p,
                rss_kib: rss_kib(pid),
                ticks,
                cpu_percent: ticks as f64 / hz / elapsed * 100.0,
            }
        })
        .collect()
}

pub(crate) fn print_footprint(c: &Cluster, fp: &[Footprint], idle_seconds: u64) {
    println!();
    println!(
        "footprint of each pgwarden process alone (not Postgres), idle for {idle_seconds} s, \
         writer stopped"
    );
    println!(
        "{:<10} {:<8} {:>10} {:>7} {:>12}",
        "instance", "role", "VmRSS MiB", "ticks", "CPU % core"
    );
    for (i, f) in fp.iter().enumerate() {
        println!(
            "{:<10} {:<8} {:>10.1} {:>7} {:>12.3}",
            c.name(i),
            if f.primary { "primary" } else { "standby" },
            f.rss_kib as f64 / 1024.0,
            f.ticks,
            f.cpu_percent
        );
    }
}

/// The figures as `ha-bench-figure` lines (one per scenario: key, lost commits, and every run's
/// seconds; then the footprint), the format `bench/ha.sh --with-patroni` reads from both sides.
pub(crate) fn print_figure_lines(
    setup: Setup,
    runs: usize,
    figures: &[(Scenario, Figures)],
    footprint: Option<&Vec<Footprint>>,
) {
    println!();
    println!(
        "ha-bench-figure setup manager=pgwarden mode={} profile={} lease={} renew_deadline={} \
         retry={} runs={runs}",
        setup.mode(),
        setup.profile(),
        setup.lease,
        setup.renew_deadline,
        setup.retry
    );
    let join = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(",");
    for (s, f) in figures {
        let seconds = join(&mut f.seconds.iter().map(|x| format!("{x:.3}")));
        println!(
            "ha-bench-figure scenario {} lost={} seconds={}",
            s.key(),
            f.lost,
            if seconds.is_empty() { "-" } else { &seconds }
        );
    }
    if let Some(fp) = footprint {
        let rss = join(
            &mut fp
                .iter()
                .map(|f| format!("{:.1}", f.rss_kib as f64 / 1024.0)),
        );
        let cpu = join(&mut fp.iter().map(|f| format!("{:.3}", f.cpu_percent)));
        println!("ha-bench-figure footprint rss_mib={rss} cpu_percent={cpu}");
    }
}
