//! The processes of an instance, from /proc: for the demo and the test harness, which kill,
//! freeze and wait for whole process trees (pgwarden, its Postgres, orphans in the data
//! directory) as a lost node would lose them.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Alive and not a zombie.
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain anything.
    match stat.rsplit_once(')') {
        Some((_, rest)) => !matches!(rest.trim_start().chars().next(), Some('Z' | 'X') | None),
        None => false,
    }
}

/// Every process whose parent is `pid` (any of its threads), and theirs.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let path = task.path().join("children");
            let Ok(text) = std::fs::read_to_string(path) else {
                continue;
            };
            for child in text.split_whitespace().filter_map(|c| c.parse().ok()) {
                // Bounded by the process table; a pid cannot repeat in a tree.
                if !out.contains(&child) {
                    out.push(child);
                    frontier.push(child);
                }
            }
        }
    }
    out
}

/// Processes whose working directory is `dir`.
pub fn processes_in(dir: &Path) -> Vec<i32> {
    let Ok(wanted) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == wanted))
        .collect()
}

pub fn signal_all(pids: &[i32], sig: Signal) {
    for &p in pids {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

/// pgwarden (`root`), its descendants, and every process whose working directory is the data
/// directory, with theirs: alive, each once.
pub fn tree(root: Option<i32>, data_dir: &Path) -> Vec<i32> {
    let mut found = Vec::new();
    for pid in root.into_iter().chain(processes_in(data_dir)) {
        found.push(pid);
        found.extend(descendants(pid));
    }
    let mut seen = std::collections::BTreeSet::new();
    found.retain(|&p| seen.insert(p) && alive(p));
    found
}

/// SIGSTOPs what `processes` lists, again and again until it lists nothing new (a running
/// postmaster may fork while we go; bounded to ten rounds). Returns every pid stopped.
pub fn freeze(mut processes: impl FnMut() -> Vec<i32>) -> Vec<i32> {
    let mut all: Vec<i32> = Vec::new();
    for _ in 0..10 {
        let new: Vec<i32> = processes()
            .into_iter()
            .filter(|p| !all.contains(p))
            .collect();
        if new.is_empty() {
            break;
        }
        signal_all(&new, Signal::SIGSTOP);
        all.extend(new);
    }
    all
}

/// Waits (bounded) until none of `pids` is alive; returns those still alive.
pub fn wait_gone_blocking(pids: &[i32], within: Duration) -> Vec<i32> {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until none of `pids` is alive; returns those still alive.
pub async fn wait_gone(pids: &[i32], within: Duration) -> Vec<i32> {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The arguments of a process, for messages.
pub fn command_line(pid: i32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.join(" ")
}
