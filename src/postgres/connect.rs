//! Connections pgwarden itself makes to its Postgres: always through the unix socket, as the
//! superuser by peer authentication, with a timeout.

use std::path::Path;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

/// Bound for establishing a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Opens a connection and drives it on a background task.
pub async fn connect(
    socket_dir: &Path,
    port: u16,
    user: &str,
    dbname: &str,
) -> Result<Client, String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host_path(socket_dir)
        .port(port)
        .user(user)
        .dbname(dbname)
        .application_name("pgwarden")
        .connect_timeout(CONNECT_TIMEOUT);
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, cfg.connect(NoTls))
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// One round trip on a fresh connection: the readiness check after a start.
pub async fn ping(socket_dir: &Path, port: u16, user: &str) -> Result<(), String> {
    let client = connect(socket_dir, port, user, "postgres").await?;
    tokio::time::timeout(CONNECT_TIMEOUT, client.simple_query("SELECT 1"))
        .await
        .map_err(|_| "query timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(())
}
