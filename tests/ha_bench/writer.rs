//! The timed writer: increasing ids inserted on whichever instance takes them, every
//! acknowledged commit recorded with its time and session.

use super::*;

/// One acknowledged commit: when the INSERT returned, its id, the instance that took it, and
/// when the session it came on was opened.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ack {
    pub(crate) at: Instant,
    pub(crate) id: i64,
    pub(crate) on: usize,
    pub(crate) session: Instant,
}

/// The writer's session on instance `on`, opened at `opened`.
pub(crate) struct Session {
    pub(crate) on: usize,
    pub(crate) opened: Instant,
    pub(crate) client: Client,
}

/// Inserts increasing ids into [`TABLE`] on whichever instance takes them and records every
/// acknowledged commit with its time. It keeps one session while writes succeed (one INSERT,
/// then [`PACE`]). When that session fails it tries every instance at once, each on its own
/// session retried every [`RETRY`], and keeps the first that acknowledges a write: a hung
/// instance (whose connects and statements only time out) delays no other, and a standby's
/// session, kept across its read-only errors, takes writes the moment it is promoted.
pub(crate) struct TimedWriter {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) acks: Arc<Mutex<Vec<Ack>>>,
    pub(crate) task: Option<JoinHandle<()>>,
}

pub(crate) type Client = tokio_postgres::Client;

impl TimedWriter {
    pub(crate) fn start(ports: Vec<u16>) -> TimedWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
        let task = tokio::spawn(write_loop(ports, stop.clone(), acks.clone()));
        TimedWriter {
            stop,
            acks,
            task: Some(task),
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    pub(crate) fn ids(&self) -> Vec<i64> {
        self.acks.lock().unwrap().iter().map(|a| a.id).collect()
    }

    /// The acknowledgements from `from` (inclusive) to `to` (inclusive), in time order.
    pub(crate) fn between(&self, from: Instant, to: Instant) -> Vec<Ack> {
        let acks = self.acks.lock().unwrap();
        let start = acks.partition_point(|a| a.at < from);
        acks[start..]
            .iter()
            .take_while(|a| a.at <= to)
            .copied()
            .collect()
    }

    /// The last acknowledgement at or before `t`.
    pub(crate) fn last_before(&self, t: Instant) -> Option<Ack> {
        let acks = self.acks.lock().unwrap();
        let end = acks.partition_point(|a| a.at <= t);
        end.checked_sub(1).map(|k| acks[k])
    }

    /// The first acknowledgement after `t` for which `pred` holds, if there is one yet.
    pub(crate) fn first_after(&self, t: Instant, pred: &impl Fn(&Ack) -> bool) -> Option<Ack> {
        let acks = self.acks.lock().unwrap();
        let start = acks.partition_point(|a| a.at <= t);
        acks[start..].iter().find(|a| pred(a)).copied()
    }

    /// How many acknowledgements after `t` satisfy `pred`.
    pub(crate) fn count_after(&self, t: Instant, pred: &impl Fn(&Ack) -> bool) -> usize {
        let acks = self.acks.lock().unwrap();
        let start = acks.partition_point(|a| a.at <= t);
        acks[start..].iter().filter(|a| pred(a)).count()
    }

    pub(crate) async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            assert!(
                timeout(Duration::from_secs(30), task).await.is_ok(),
                "the timed writer did not stop within 30 s"
            );
        }
    }
}

impl Drop for TimedWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// One INSERT of `id`, bounded by [`STATEMENT`] on the client side: `Ok` with the time of the
/// acknowledgement, or `Err(keep)` where `keep` says the session is still usable (a statement
/// error such as "read-only transaction"). The bound is not a server-side `statement_timeout`
/// on purpose: a commit waiting for its synchronous standby that gets cancelled is reported as
/// a success (with a warning) although no standby has it, which would count a commit that
/// quorum commit never promised as "acknowledged". Dropping the future sends no cancel; the
/// session is then dropped and the commit never acknowledged.
pub(crate) async fn insert(c: &Client, id: i64) -> Result<Instant, bool> {
    let sql = format!("INSERT INTO {TABLE} (id) VALUES ($1)");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
    match timeout(STATEMENT, c.execute(sql.as_str(), &params)).await {
        Ok(Ok(1)) => Ok(Instant::now()),
        Ok(Ok(_)) => Err(true),
        Ok(Err(e)) => Err(e.as_db_error().is_some() && !c.is_closed()),
        Err(_) => Err(false),
    }
}

/// Writes on instance `on` (port `port`) until a commit is acknowledged; None once stopped.
pub(crate) async fn attempt_on(
    on: usize,
    port: u16,
    next: &AtomicI64,
    stop: &AtomicBool,
) -> Option<(Session, Ack)> {
    let mut session: Option<Session> = None;
    while !stop.load(Ordering::SeqCst) {
        let Some(s) = session.take() else {
            let opened = Instant::now();
            session = connect_within(port, CONNECT, None)
                .await
                .map(|client| Session { on, opened, client });
            if session.is_none() {
                sleep(RETRY).await;
            }
            continue;
        };
        let id = next.fetch_add(1, Ordering::SeqCst);
        match insert(&s.client, id).await {
            Ok(at) => {
                let ack = Ack {
                    at,
                    id,
                    on,
                    session: s.opened,
                };
                return Some((s, ack));
            }
            Err(keep) => {
                if keep {
                    session = Some(s);
                }
                sleep(RETRY).await;
            }
        }
    }
    None
}

pub(crate) async fn write_loop(ports: Vec<u16>, stop: Arc<AtomicBool>, acks: Arc<Mutex<Vec<Ack>>>) {
    // Whatever the test does, the writer does not outlive this.
    let deadline = Instant::now() + Duration::from_secs(6 * 3600);
    let next = AtomicI64::new(1);
    let mut current: Option<Session> = None;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let Some(s) = current.take() else {
            // Every instance at once; the first acknowledged write wins, the other attempts
            // are dropped (with their sessions: nothing they had in flight was acknowledged).
            type Attempt<'a> = Pin<Box<dyn Future<Output = Option<(Session, Ack)>> + Send + 'a>>;
            let attempts: Vec<Attempt<'_>> = ports
                .iter()
                .enumerate()
                .map(|(i, &port)| Box::pin(attempt_on(i, port, &next, &stop)) as Attempt<'_>)
                .collect();
            let (won, _, _) = futures::future::select_all(attempts).await;
            if let Some((s, ack)) = won {
                acks.lock().unwrap().push(ack);
                current = Some(s);
                sleep(PACE).await;
            }
            continue;
        };
        let id = next.fetch_add(1, Ordering::SeqCst);
        if let Ok(at) = insert(&s.client, id).await {
            acks.lock().unwrap().push(Ack {
                at,
                id,
                on: s.on,
                session: s.opened,
            });
            current = Some(s);
            sleep(PACE).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Waits.

/// Waits for the first acknowledged write after `after` satisfying `pred`.
pub(crate) async fn first_ack(
    c: &Cluster,
    w: &TimedWriter,
    what: &str,
    after: Instant,
    pred: impl Fn(&Ack) -> bool,
) -> Ack {
    let deadline = Instant::now() + LONG;
    loop {
        if let Some(a) = w.first_after(after, &pred) {
            return a;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {LONG:?} waiting for {what} ({} writes acknowledged in all)\n{}",
                w.count(),
                c.describe().await
            );
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// The longest gap between consecutive acknowledged writes from `from` to `to`.
pub(crate) fn longest_gap(w: &TimedWriter, from: Instant, to: Instant) -> Duration {
    w.between(from, to)
        .windows(2)
        .map(|pair| pair[1].at.duration_since(pair[0].at))
        .max()
        .unwrap_or_default()
}
