//! SQL the backup and restore tests share.

use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(90);

/// The first column of the one row `sql` returns, as text.
pub async fn text(c: &tokio_postgres::Client, sql: &str) -> String {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Switches to a new segment and waits until it is archived (and with it all before).
pub async fn archive_all(c: &tokio_postgres::Client) {
    let last = text(c, "SELECT pg_walfile_name(pg_switch_wal())").await;
    let deadline = Instant::now() + LONG;
    loop {
        let done = text(
            c,
            "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
        )
        .await;
        if done.as_str() >= last.as_str() && !done.ends_with(".history") {
            return;
        }
        assert!(Instant::now() < deadline, "{last} not archived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
