//! TLS from the client's side, for tests: verified sessions to Postgres and the HTTPS ports,
//! `psql` with `sslmode=verify-full`, the cluster CA Secret, certificates in Secrets.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use pgwarden::tls::issue::KeyAndCert;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cluster::{base64_encode, eventually, Cluster, NS};

pub const LONG: Duration = Duration::from_secs(120);
pub const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

/// `key` of the cluster CA Secret, once it exists.
pub fn from_ca_secret(c: &Cluster, key: &str) -> Option<String> {
    key_of_ca_secret(&c.server, key)
}

/// `key` of the cluster CA Secret on `server`, once it exists.
pub fn key_of_ca_secret(server: &super::apiserver::ApiServer, key: &str) -> Option<String> {
    let secret: Secret = serde_json::from_value(server.get("v1", "secrets", NS, "pg-ca")?).ok()?;
    let bytes = secret.data?.get(key)?.0.clone();
    String::from_utf8(bytes).ok()
}

/// `ca.crt` of the cluster CA Secret, once it exists.
pub fn ca_from_secret(c: &Cluster) -> Option<String> {
    from_ca_secret(c, "ca.crt")
}

/// A TLS session to 127.0.0.1:`port` that verifies the server against `ca` (the name checked is
/// the IP, as `sslmode=verify-full` with `host=127.0.0.1` does); `postgres` speaks Postgres's
/// SSLRequest first. Returns the stream and the serial of the server's certificate.
pub async fn verified(
    port: u16,
    ca: &str,
    postgres: bool,
) -> Result<
    (
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        String,
    ),
    String,
> {
    verified_as(port, ca, postgres, None).await
}

/// [`verified`], presenting `identity` as the client's certificate.
pub async fn verified_as(
    port: u16,
    ca: &str,
    postgres: bool,
    identity: Option<&KeyAndCert>,
) -> Result<
    (
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        String,
    ),
    String,
> {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    if postgres {
        // Length 8, the SSLRequest code 1234.5679; the server answers 'S' (or 'N').
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        if answer[0] != b'S' {
            return Err(format!(
                "the server answered {:?} to SSLRequest",
                answer[0] as char
            ));
        }
    }
    let config = pgwarden::tls::client_config(ca, identity).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let der = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no certificate")?
        .clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    Ok((stream, serial))
}

/// A GET over verified HTTPS: code and body.
pub async fn https_get(
    port: u16,
    ca: &str,
    path: &str,
    header: Option<(&str, &str)>,
) -> Result<(u16, String), String> {
    https_get_as(port, ca, path, header, None).await
}

/// [`https_get`] with a client certificate.
pub async fn https_get_as(
    port: u16,
    ca: &str,
    path: &str,
    header: Option<(&str, &str)>,
    identity: Option<&KeyAndCert>,
) -> Result<(u16, String), String> {
    let (mut s, _) = verified_as(port, ca, false, identity).await?;
    let extra = header.map_or(String::new(), |(k, v)| format!("{k}: {v}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    // A peer that closes without close_notify still gave us the whole answer.
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no answer")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status code")?;
    Ok((code, body.to_string()))
}

/// `psql` with `sslmode=verify-full` against the CA in `ca_file`: the query's output.
pub fn psql(port: u16, ca_file: &std::path::Path, host: &str, sql: &str) -> Result<String, String> {
    let conninfo = format!(
        "host={host} port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={} connect_timeout=5",
        ca_file.display()
    );
    let out = std::process::Command::new(PSQL)
        .args([&conninfo, "-XAtc", sql])
        .env("PGPASSWORD", super::PASSWORD)
        .env_remove("PGSSLMODE")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The value of a metric sample (`name{labels} value`) on the metrics port.
pub fn metric(c: &Cluster, i: usize, sample: &str) -> Option<f64> {
    let (_, body) = super::http_get(c.nodes[i].sb.metrics_port, "/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

/// Waits until instance `i` serves a certificate from `ca` on its Postgres port; its serial.
pub async fn wait_serving(c: &Cluster, i: usize, ca: &str) -> String {
    eventually(
        "a verified TLS certificate on the Postgres port",
        LONG,
        async || {
            verified(c.port(i), ca, true)
                .await
                .ok()
                .map(|(_, serial)| serial)
        },
    )
    .await
}

/// A `kubernetes.io/tls` Secret with a certificate for the test instance, from `ca`.
pub fn tls_secret(name: &str, ca: &pgwarden::tls::issue::KeyAndCert) -> (Value, String) {
    use pgwarden::tls::issue;
    let names = issue::Names::for_instance(&issue::Whereabouts {
        cluster: "pg",
        namespace: NS,
        pod: "pg-0",
        addresses: &["127.0.0.1".to_string()],
    });
    let cert = issue::issue_server(
        ca,
        "pg-0",
        &names,
        std::time::SystemTime::now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let serial = issue::info(&cert.cert_pem).unwrap().serial;
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": NS},
        "data": {
            "tls.crt": base64_encode(&cert.cert_pem),
            "tls.key": base64_encode(&cert.key_pem),
            "ca.crt": base64_encode(&ca.cert_pem),
        }
    });
    (secret, serial)
}

/// The status code of a plain-HTTP GET of `path` carrying the failsafe token.
pub async fn plain_status_code(port: u16, path: &str, token: &str) -> Option<u16> {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .ok()?
    .ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nx-pgwarden-failsafe: {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let head = String::from_utf8_lossy(&answer);
    head.split_whitespace().nth(1)?.parse().ok()
}
