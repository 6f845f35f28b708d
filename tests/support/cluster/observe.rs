//! Observing the cluster: each instance's status, the primary, streaming standbys.

use super::*;

impl Cluster {
    /// `/pg/status` of instance `i`; `Value::Null` when it does not answer in time.
    pub async fn status(&self, i: usize) -> Value {
        match http_get(self.status_port(i), "/pg/status", HTTP).await {
            Some((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    /// A GET on the status port (`/healthz`, `/readyz`, ...): the code, None when unanswered.
    pub async fn http_code(&self, i: usize, path: &str) -> Option<u16> {
        http_get(self.status_port(i), path, HTTP)
            .await
            .map(|(code, _)| code)
    }

    /// A superuser session on instance `i` (statement_timeout 10 s), None when unreachable.
    pub async fn client(&self, i: usize) -> Option<tokio_postgres::Client> {
        connect_within(self.port(i), CONNECT, Some("10s")).await
    }

    /// Whether instance `i` accepts writes now; None when it cannot be asked.
    pub async fn writable(&self, i: usize) -> Option<bool> {
        let c = self.client(i).await?;
        is_writable(&c, QUERY).await
    }

    /// One row of one column from instance `i`, bounded.
    pub async fn query_value<T>(&self, i: usize, sql: &str) -> Option<T>
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        let c = self.client(i).await?;
        let row = timeout(QUERY, c.query_one(sql, &[])).await.ok()?.ok()?;
        row.try_get(0).ok()
    }

    pub fn cluster(&self) -> Value {
        self.server
            .get(PGC.0, PGC.1, NS, CLUSTER)
            .expect("the PostgresCluster exists")
    }

    /// `spec.holderIdentity` of the Lease `pg-leader`.
    pub fn lease_holder(&self) -> Option<String> {
        let lease = self
            .server
            .get("coordination.k8s.io/v1", "leases", NS, LEASE)?;
        lease["spec"]["holderIdentity"]
            .as_str()
            .filter(|h| !h.is_empty())
            .map(str::to_string)
    }

    /// The timeline the Lease's holder published with its last renewal.
    pub fn lease_timeline(&self) -> Option<u64> {
        let lease = self
            .server
            .get("coordination.k8s.io/v1", "leases", NS, LEASE)?;
        lease["metadata"]["annotations"][pgwarden::ha::lease::TIMELINE]
            .as_str()?
            .parse()
            .ok()
    }

    /// `status.currentPrimary` of the PostgresCluster.
    pub fn current_primary(&self) -> Option<String> {
        self.cluster()["status"]["currentPrimary"]
            .as_str()
            .map(str::to_string)
    }

    pub fn annotation(&self, key: &str) -> Option<String> {
        self.cluster()["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_string)
    }

    /// The primary, when the picture is unambiguous: exactly one instance (not SIGSTOPped)
    /// reports `ha.role` and `postgres.role` "primary", it holds the Lease, and a session on
    /// it is writable.
    pub async fn primary(&self) -> Option<usize> {
        let polled: Vec<usize> = (0..self.len())
            .filter(|&i| self.nodes[i].frozen.is_empty())
            .collect();
        let statuses = futures::future::join_all(polled.iter().map(|&i| self.status(i))).await;
        let claimed: Vec<usize> = polled
            .iter()
            .zip(&statuses)
            .filter(|(_, s)| s["ha"]["role"] == "primary" && s["postgres"]["role"] == "primary")
            .map(|(&i, _)| i)
            .collect();
        let [i] = claimed[..] else { return None };
        if self.lease_holder().as_deref() != Some(self.name(i)) {
            return None;
        }
        (self.writable(i).await == Some(true)).then_some(i)
    }

    /// A one-line-per-instance picture, for failure messages.
    pub async fn describe(&self) -> String {
        let mut out = format!(
            "lease holder {:?}, currentPrimary {:?}\n",
            self.lease_holder(),
            self.current_primary()
        );
        for i in 0..self.len() {
            let s = if self.nodes[i].frozen.is_empty() {
                self.status(i).await
            } else {
                Value::from("SIGSTOPped")
            };
            out.push_str(&format!(
                "  {}: health {} ha {} postgres.role {} wal_receiver {}\n",
                self.name(i),
                s["health"],
                s["ha"],
                s["postgres"]["role"],
                s["postgres"]["wal_receiver"]
            ));
        }
        out
    }

    pub(super) async fn wait_for<T>(
        &self,
        what: &str,
        within: Duration,
        mut f: impl AsyncFnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {within:?} waiting for {what}\n{}",
                    self.describe().await
                );
            }
            sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_primary(&self, within: Duration) -> usize {
        self.wait_for("a primary", within, async || self.primary().await)
            .await
    }

    /// Waits for a primary other than `old`.
    pub async fn wait_new_primary(&self, old: usize, within: Duration) -> usize {
        let what = format!("a primary other than {}", self.name(old));
        self.wait_for(&what, within, async || {
            self.primary().await.filter(|&p| p != old)
        })
        .await
    }

    /// Whether `i` streams from the primary `p` now: it reports `ha.role` "replica" following
    /// `p`, is in recovery, and `p`'s pg_stat_replication has it streaming.
    pub async fn streams_from(&self, i: usize, p: usize) -> bool {
        if i == p {
            return false;
        }
        let s = self.status(i).await;
        if s["ha"]["role"] != "replica" || s["ha"]["following"] != self.name(p) {
            return false;
        }
        let Some(standby) = self.client(i).await else {
            return false;
        };
        let in_recovery = timeout(QUERY, standby.query_one("SELECT pg_is_in_recovery()", &[]))
            .await
            .ok()
            .and_then(Result::ok)
            .is_some_and(|r| r.get::<_, bool>(0));
        if !in_recovery {
            return false;
        }
        let Some(primary) = self.client(p).await else {
            return false;
        };
        let rows = timeout(
            QUERY,
            primary.query(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                &[&self.name(i)],
            ),
        )
        .await;
        matches!(rows, Ok(Ok(r)) if !r.is_empty())
    }

    /// Waits until `i` is a standby streaming from the (unambiguous) primary; returns it.
    pub async fn wait_streaming(&self, i: usize, within: Duration) -> usize {
        let what = format!("{} streaming from the primary", self.name(i));
        self.wait_for(&what, within, async || {
            let p = self.primary().await?;
            self.streams_from(i, p).await.then_some(p)
        })
        .await
    }

    /// Waits for a primary and every other instance streaming from it; returns the primary.
    pub async fn wait_all_streaming(&self, within: Duration) -> usize {
        self.wait_for(
            "a primary and every other instance streaming from it",
            within,
            async || {
                let p = self.primary().await?;
                for i in self.others(p) {
                    if !self.streams_from(i, p).await {
                        return None;
                    }
                }
                Some(p)
            },
        )
        .await
    }
}
