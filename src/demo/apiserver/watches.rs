//! Watches.

use super::*;

/// An open watch, streamed by its own task as newline-delimited JSON events.
pub(super) struct WatchStream {
    pub(super) shared: Arc<Shared>,
    pub(super) filter: Filter,
    /// The resourceVersion this watch is up to.
    pub(super) last: u64,
    /// Whether it has started: from then on, only a gap in the history expires it.
    pub(super) open: bool,
    pub(super) bookmarks: bool,
    pub(super) timeout: Duration,
    pub(super) changed: watch::Receiver<u64>,
    pub(super) cut: Cut,
    pub(super) tx: mpsc::Sender<Result<Bytes, io::Error>>,
}

pub(super) fn watch(
    shared: &Arc<Shared>,
    route: &Route,
    cut: Cut,
) -> Result<Response<Body>, ApiError> {
    let filter = Filter::new(route)?;
    // "0" (like none) means: the current objects as ADDED events, then the changes.
    let from = route.param::<u64>("resourceVersion")?.filter(|&rv| rv != 0);
    let timeout = route.param("timeoutSeconds")?.map(Duration::from_secs);
    let (timeout, bookmarks) = (
        timeout.unwrap_or(DEFAULT_WATCH_TIMEOUT),
        flag(&route.query, "allowWatchBookmarks"),
    );
    // The snapshot, and the point the stream goes on from, are read under one lock so that no
    // change falls between them; whether the watch may start at all is decided there too.
    let store = lock(&shared.store);
    let changed = store.changed.subscribe();
    let (initial, last) = match from {
        Some(rv) => (Vec::new(), rv),
        None => {
            let added = store
                .list(&filter)
                .into_iter()
                .map(|obj| json!({ "type": "ADDED", "object": obj }));
            (added.collect(), store.rv)
        }
    };
    let open = from.is_none_or(|rv| rv >= store.horizon);
    drop(store);
    let (tx, rx) = mpsc::channel(64);
    let shared = Arc::clone(shared);
    let stream = WatchStream {
        shared,
        filter,
        last,
        open,
        bookmarks,
        timeout,
        changed,
        cut,
        tx,
    };
    tokio::spawn(stream.run(initial));
    let chunks = futures::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    Ok(json_response(200, Body::from_stream(chunks)))
}

impl WatchStream {
    pub(super) async fn run(mut self, initial: Vec<Value>) {
        // The first bytes waited out the request's fault already.
        for event in &initial {
            if !self.send(event).await {
                return;
            }
        }
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let first_bookmark = tokio::time::Instant::now() + BOOKMARK_INTERVAL;
        let mut bookmarks = tokio::time::interval_at(first_bookmark, BOOKMARK_INTERVAL);
        while self.catch_up().await {
            tokio::select! {
                changed = self.changed.changed() => if changed.is_err() { return },
                _ = bookmarks.tick(), if self.bookmarks => {
                    if !self.through().await || !self.send(&self.bookmark()).await {
                        return;
                    }
                }
                // A timed-out watch ends cleanly (unless a black hole swallows the end too);
                // the client is expected to resume it.
                _ = &mut deadline => {
                    self.through().await;
                    return;
                }
                // A new fault: a cut ends the watch here, the others act on the next send.
                _ = self.cut.rx.changed() => {
                    if self.cut.fate() == Fate::Cut {
                        self.hang_up().await;
                        return;
                    }
                }
                _ = self.tx.closed() => return,
            }
        }
    }

    /// Waits until the fault lets events through: at once, after the latency, or — held by a
    /// black hole — once the fault is replaced by one that does. False when the watch is over:
    /// the client went away, or the connection was dropped (which this does).
    pub(super) async fn through(&mut self) -> bool {
        let limit = tokio::time::sleep(HOLD_LIMIT);
        tokio::pin!(limit);
        let mut delayed = false;
        loop {
            match self.cut.fate() {
                Fate::Cut => break,
                Fate::Fault(fault) if fault.holds() => tokio::select! {
                    _ = self.cut.rx.changed() => {}
                    _ = self.tx.closed() => return false,
                    _ = &mut limit => break,
                },
                Fate::Fault(Fault::Latency(delay)) if !delayed => {
                    // Looked at again after the wait: the fault may have changed meanwhile.
                    delayed = true;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.tx.closed() => return false,
                    }
                }
                Fate::Fault(_) => return true,
            }
        }
        self.hang_up().await;
        false
    }

    /// Drops the connection: an error in the body makes hyper abort it.
    pub(super) async fn hang_up(&self) {
        let _ = self.tx.send(Err(hang_up())).await;
    }

    /// Sends the events after `last`; false when the watch is over: the client went away, the
    /// connection was dropped, or its resourceVersion expired, which is told with an ERROR
    /// event as the real server does.
    pub(super) async fn catch_up(&mut self) -> bool {
        let caught_up = lock(&self.shared.store).events_since(self.last, self.open, &self.filter);
        match caught_up {
            Ok((events, upto)) => {
                if events.is_empty() {
                    (self.last, self.open) = (upto, true);
                    return true;
                }
                if !self.through().await {
                    return false;
                }
                for event in &events {
                    if !self.send(event).await {
                        return false;
                    }
                }
                (self.last, self.open) = (upto, true);
                true
            }
            Err(expired) => {
                if self.through().await {
                    self.send(&json!({ "type": "ERROR", "object": expired.status() }))
                        .await;
                }
                false
            }
        }
    }

    /// A BOOKMARK: only the kind and the resourceVersion the watch is up to.
    pub(super) fn bookmark(&self) -> Value {
        let (kind, rv) = (self.filter.kind, self.last.to_string());
        let metadata = json!({ "resourceVersion": rv });
        let object =
            json!({ "kind": kind.kind, "apiVersion": kind.api_version, "metadata": metadata });
        json!({ "type": "BOOKMARK", "object": object })
    }

    pub(super) async fn send(&self, event: &Value) -> bool {
        let line = format!("{event}\n");
        self.tx.send(Ok(Bytes::from(line))).await.is_ok()
    }
}
