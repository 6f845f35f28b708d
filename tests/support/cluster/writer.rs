//! The writer: increasing ids inserted on whichever instance is writable, every acknowledged
//! commit recorded.

use super::*;

/// A background task inserting increasing ids into `ha_writes` on whichever instance is
/// writable, reconnecting on failure, recording every id whose commit was acknowledged. Each id
/// is tried once: an unacknowledged attempt (error, timeout) is never retried with the same id.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i64>>>,
    attempts: Arc<AtomicU64>,
    task: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts writing; the table must exist (see [`Cluster::writer`]).
    pub fn start(ports: Vec<u16>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<i64>>> = Arc::default();
        let attempts = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(write_loop(
            ports,
            stop.clone(),
            acked.clone(),
            attempts.clone(),
        ));
        Writer {
            stop,
            acked,
            attempts,
            task: Some(task),
        }
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Waits until `more` further commits have been acknowledged.
    pub async fn wait_progress(&self, more: usize, within: Duration) {
        let target = self.acked_count() + more;
        let what = format!(
            "{more} more acknowledged writes (at {})",
            self.acked_count()
        );
        eventually(&what, within, async || {
            (self.acked_count() >= target).then_some(())
        })
        .await;
    }

    /// Stops the writer and returns the acknowledged ids.
    pub async fn stop(mut self) -> Vec<i64> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            let stopped = timeout(Duration::from_secs(30), task).await;
            assert!(stopped.is_ok(), "the writer did not stop within 30 s");
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        eprintln!(
            "writer: {} commits acknowledged of {} attempts",
            acked.len(),
            self.attempts()
        );
        acked
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The first writable instance, trying `preferred` first.
async fn find_writable(ports: &[u16], preferred: usize) -> Option<(usize, tokio_postgres::Client)> {
    for k in 0..ports.len() {
        let i = (preferred + k) % ports.len();
        let Some(c) = connect_within(ports[i], Duration::from_secs(1), Some("10s")).await else {
            continue;
        };
        if is_writable(&c, Duration::from_secs(1)).await == Some(true) {
            return Some((i, c));
        }
    }
    None
}

async fn write_loop(
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i64>>>,
    attempts: Arc<AtomicU64>,
) {
    let deadline = Instant::now() + BACKGROUND_LIMIT;
    let mut next: i64 = 1;
    let mut preferred = 0;
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let c = match client.take() {
            Some(c) => c,
            None => match find_writable(&ports, preferred).await {
                Some((i, c)) => {
                    preferred = i;
                    c
                }
                None => {
                    sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let id = next;
        next += 1;
        attempts.fetch_add(1, Ordering::Relaxed);
        // Dropping the future on timeout sends no cancel request: a commit waiting for a
        // synchronous standby is left waiting, never "acknowledged with a warning".
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
        let insert = c.execute("INSERT INTO ha_writes (id) VALUES ($1)", &params);
        match timeout(Duration::from_secs(5), insert).await {
            Ok(Ok(1)) => {
                acked.lock().unwrap().push(id);
                client = Some(c);
                sleep(Duration::from_millis(10)).await;
            }
            _ => sleep(Duration::from_millis(100)).await,
        }
    }
}
