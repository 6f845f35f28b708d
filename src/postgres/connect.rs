//! Connections pgwarden itself makes to its Postgres: always through the unix socket by peer
//! authentication, with timeouts.

use std::ops::Deref;
use std::path::Path;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

/// Bound for establishing a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A client whose connection task is aborted (closing the socket) when it is dropped, so a
/// connection to a hung server never lingers.
pub struct Connection {
    client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl Deref for Connection {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub socket_dir: &'a Path,
    pub port: u16,
    pub user: &'a str,
    pub dbname: &'a str,
    pub application_name: &'a str,
    /// Server-side bound for every statement (and for waiting on a lock), so a query that the
    /// client gave up on does not linger in the server holding or waiting for locks.
    pub statement_timeout: Duration,
}

impl<'a> Target<'a> {
    /// pgwarden's own superuser session on the `postgres` database of the instance `pg`
    /// describes, statements bounded by 5 s.
    pub fn admin(pg: &'a crate::config::PostgresConfig) -> Target<'a> {
        Target {
            socket_dir: &pg.run_dir,
            port: pg.port,
            user: &pg.superuser,
            dbname: "postgres",
            application_name: "pgwarden",
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// Opens a connection and drives it on a background task.
pub async fn connect(t: &Target<'_>) -> Result<Connection, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host_path(t.socket_dir)
        .port(t.port)
        .user(t.user)
        .dbname(t.dbname)
        .application_name(t.application_name)
        .options(format!(
            "-c statement_timeout={ms} -c lock_timeout={ms}",
            ms = t.statement_timeout.as_millis().max(1)
        ))
        .connect_timeout(CONNECT_TIMEOUT);
    let (client, connection) = cfg.connect(NoTls).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(Connection { client, task })
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No answer in time: the server may be hung.
    #[error("connecting timed out")]
    TimedOut,
    #[error("{0}")]
    Failed(String),
}

/// `connect` bounded by [`CONNECT_TIMEOUT`] as a whole (a stopped server may accept the
/// connection and never answer).
pub async fn connect_timeout(t: &Target<'_>) -> Result<Connection, ConnectError> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect(t))
        .await
        .map_err(|_| ConnectError::TimedOut)?
        .map_err(|e| {
            ConnectError::Failed(match e.as_db_error() {
                Some(db) => db.message().to_string(),
                None => e.to_string(),
            })
        })
}

/// One round trip on a fresh connection: the readiness check after a start.
pub async fn ping(socket_dir: &Path, port: u16, user: &str) -> Result<(), String> {
    let conn = connect_timeout(&Target {
        socket_dir,
        port,
        user,
        dbname: "postgres",
        application_name: "pgwarden",
        statement_timeout: CONNECT_TIMEOUT,
    })
    .await
    .map_err(|e| e.to_string())?;
    tokio::time::timeout(CONNECT_TIMEOUT, conn.simple_query("SELECT 1"))
        .await
        .map_err(|_| "query timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(())
}
