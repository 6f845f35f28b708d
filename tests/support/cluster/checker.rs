//! The split-brain checker: a write attempted on every instance every 50 ms; any moment two
//! instances acknowledged writes is flagged.

use super::*;

/// Consecutive writable answers from one instance.
#[derive(Debug, Clone, Copy)]
struct Stretch {
    instance: usize,
    /// The first and last sample: each from just before the query was sent to its answer.
    first: (Instant, Instant),
    last: (Instant, Instant),
    samples: u32,
}

impl Stretch {
    /// When the instance was certainly writable, assuming it stayed writable between two
    /// writable answers: from the first answer to the sending of the last query.
    fn certain(&self) -> Option<(Instant, Instant)> {
        (self.samples >= 2 && self.first.1 <= self.last.0).then_some((self.first.1, self.last.0))
    }

    /// Whether both instances were certainly writable at one moment. A single sample says
    /// "writable at some instant within the sample": that counts when the sample lies wholly
    /// inside the other's certain interval. Latency alone never makes two back-to-back stretches
    /// (a switchover) look simultaneous.
    fn simultaneous(&self, other: &Stretch) -> bool {
        let inside = |s: (Instant, Instant), c: (Instant, Instant)| c.0 <= s.0 && s.1 <= c.1;
        match (self.certain(), other.certain()) {
            (Some(a), Some(b)) => a.0 <= b.1 && b.0 <= a.1,
            (None, Some(b)) => inside(self.first, b),
            (Some(a), None) => inside(other.first, a),
            (None, None) => false,
        }
    }
}

#[derive(Default)]
struct CheckerState {
    closed: Vec<Stretch>,
    open: Vec<Option<Stretch>>,
    samples: Vec<u64>,
    writable_samples: Vec<u64>,
}

/// Attempts a write on every instance every ~50 ms (each on its own task, with 1 s connect and
/// query timeouts and a kept session that is dropped on any failure). An instance counts as
/// writable when the write was acknowledged. Consecutive writable
/// answers form a stretch; two instances whose stretches make them writable at the same moment
/// are a split brain.
pub struct SplitBrainChecker {
    names: Vec<String>,
    started: Instant,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<CheckerState>>,
    tasks: Vec<JoinHandle<()>>,
}

impl SplitBrainChecker {
    pub fn start(instances: Vec<(String, u16)>) -> SplitBrainChecker {
        let n = instances.len();
        let state = Arc::new(Mutex::new(CheckerState {
            open: vec![None; n],
            samples: vec![0; n],
            writable_samples: vec![0; n],
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = instances
            .iter()
            .enumerate()
            .map(|(i, (name, port))| {
                tokio::spawn(poll_loop(
                    i,
                    name.clone(),
                    *port,
                    stop.clone(),
                    state.clone(),
                ))
            })
            .collect();
        SplitBrainChecker {
            names: instances.into_iter().map(|(name, _)| name).collect(),
            started: Instant::now(),
            stop,
            state,
            tasks,
        }
    }

    /// Every moment seen with two or more writable instances, described.
    pub fn violations(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        let all: Vec<Stretch> = state
            .closed
            .iter()
            .copied()
            .chain(state.open.iter().flatten().copied())
            .collect();
        let at = |t: Instant| t.saturating_duration_since(self.started).as_secs_f64();
        let mut out = Vec::new();
        for (k, a) in all.iter().enumerate() {
            for b in &all[k + 1..] {
                if a.instance != b.instance && a.simultaneous(b) {
                    out.push(format!(
                        "{} writable {:.2}s..{:.2}s ({} samples) and {} writable {:.2}s..{:.2}s ({} samples)",
                        self.names[a.instance],
                        at(a.first.0),
                        at(a.last.1),
                        a.samples,
                        self.names[b.instance],
                        at(b.first.0),
                        at(b.last.1),
                        b.samples
                    ));
                }
            }
        }
        out
    }

    /// (samples, writable samples) per instance so far.
    pub fn counts(&self) -> Vec<(u64, u64)> {
        let state = self.state.lock().unwrap();
        state
            .samples
            .iter()
            .copied()
            .zip(state.writable_samples.iter().copied())
            .collect()
    }

    /// Stops polling; returns the violations seen.
    pub async fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks.drain(..) {
            let _ = timeout(Duration::from_secs(10), t).await;
        }
        eprintln!(
            "split-brain checker: (samples, writable) per instance {:?}",
            self.counts()
        );
        self.violations()
    }

    /// Stops polling and asserts that no two instances were ever writable at once, and that the
    /// checker did see a writable instance (it was working).
    pub async fn assert_clean(self) {
        let counts = self.counts();
        let violations = self.stop().await;
        assert!(
            violations.is_empty(),
            "two writable instances at once:\n{}",
            violations.join("\n")
        );
        assert!(
            counts.iter().any(|&(_, w)| w > 0),
            "the checker never saw a writable instance: {counts:?}"
        );
    }
}

impl Drop for SplitBrainChecker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn poll_loop(
    i: usize,
    name: String,
    port: u16,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<CheckerState>>,
) {
    let deadline = Instant::now() + BACKGROUND_LIMIT;
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        if client.is_none() {
            client = connect_within(port, Duration::from_secs(1), Some("1s")).await;
        }
        let start = Instant::now();
        let answer = match &client {
            Some(c) => write_acknowledged(c, &name, Duration::from_secs(1)).await,
            None => None,
        };
        let end = Instant::now();
        if answer.is_none() {
            client = None;
        }
        {
            let mut s = state.lock().unwrap();
            if answer.is_some() {
                s.samples[i] += 1;
            }
            if answer == Some(true) {
                s.writable_samples[i] += 1;
                let stretch = match s.open[i] {
                    Some(mut st) => {
                        st.last = (start, end);
                        st.samples += 1;
                        st
                    }
                    None => Stretch {
                        instance: i,
                        first: (start, end),
                        last: (start, end),
                        samples: 1,
                    },
                };
                s.open[i] = Some(stretch);
            } else if let Some(st) = s.open[i].take() {
                s.closed.push(st);
            }
        }
        sleep(Duration::from_millis(50)).await;
    }
    let mut s = state.lock().unwrap();
    if let Some(st) = s.open[i].take() {
        s.closed.push(st);
    }
}
