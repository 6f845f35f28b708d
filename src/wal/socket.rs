//! The local protocol between `pgwarden wal-archive` / `wal-restore` (run by Postgres) and the
//! running pgwarden: one JSON request line, one JSON response line, over a unix socket in the
//! run directory. Every step on both sides is bounded by a timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// Longest request or response line.
const MAX_LINE: u64 = 64 * 1024;
/// Bound for reading a request once connected, and for connecting.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Archive `path` (absolute) under `name`; answered once it is safely in the archive.
    Archive { name: String, path: PathBuf },
    /// Fetch `name`: answered with a verified file in the spool directory for the caller to
    /// move into place.
    Restore { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Archived,
    Restored { path: PathBuf },
    NotFound,
    Failed { error: String },
}

/// A request with the channel its answer goes to.
pub type Call = (Request, oneshot::Sender<Response>);

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody listens: the caller may do the work itself.
    #[error("pgwarden is not reachable on {0}: {1}")]
    Unreachable(PathBuf, String),
    #[error("{0}")]
    Failed(String),
}

/// Binds the socket (replacing a stale one) and forwards each request to `calls`; a request
/// not answered within `answer_timeout` gets a failure.
pub fn serve(
    path: &Path,
    calls: mpsc::Sender<Call>,
    answer_timeout: Duration,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "WAL socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let calls = calls.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, calls, answer_timeout).await {
                    tracing::debug!(error = %e, "WAL socket: connection ended early");
                }
            });
        }
    }))
}

async fn answer(
    stream: UnixStream,
    calls: mpsc::Sender<Call>,
    answer_timeout: Duration,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE));
    tokio::time::timeout(IO_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Err(e) => Response::Failed {
            error: format!("malformed request: {e}"),
        },
        Ok(req) => {
            let (tx, rx) = oneshot::channel();
            if calls.send((req, tx)).await.is_err() {
                Response::Failed {
                    error: "the WAL archiver stopped".into(),
                }
            } else {
                match tokio::time::timeout(answer_timeout, rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Response::Failed {
                        error: "the WAL archiver dropped the request".into(),
                    },
                    Err(_) => Response::Failed {
                        error: format!("no result within {answer_timeout:?}"),
                    },
                }
            }
        }
    };
    let mut out = serde_json::to_string(&response).unwrap_or_default();
    out.push('\n');
    tokio::time::timeout(IO_TIMEOUT, write.write_all(out.as_bytes()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write"))?
}

/// Sends one request and waits at most `timeout` for the answer.
pub async fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, CallError> {
    let stream = match tokio::time::timeout(IO_TIMEOUT, UnixStream::connect(socket)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(CallError::Unreachable(socket.to_path_buf(), e.to_string())),
        Err(_) => {
            return Err(CallError::Unreachable(
                socket.to_path_buf(),
                "connect timed out".into(),
            ))
        }
    };
    let exchange = async {
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
        line.push('\n');
        write
            .write_all(line.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        BufReader::new(read.take(MAX_LINE))
            .read_line(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        if answer.is_empty() {
            return Err("pgwarden closed the connection without answering".to_string());
        }
        serde_json::from_str::<Response>(answer.trim())
            .map_err(|e| format!("malformed answer from pgwarden: {e}"))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(CallError::Failed(e)),
        Err(_) => Err(CallError::Failed(format!(
            "pgwarden did not answer within {timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_and_answer_round_trip_with_timeouts() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("wal.sock");
        let req = Request::Archive {
            name: "000000010000000000000001".into(),
            path: "/x/pg_wal/000000010000000000000001".into(),
        };
        // Nobody listening.
        assert!(matches!(
            call(&sock, &req, Duration::from_secs(1)).await,
            Err(CallError::Unreachable(..))
        ));
        let (tx, mut rx) = mpsc::channel::<Call>(4);
        let _server = serve(&sock, tx, Duration::from_millis(300)).unwrap();
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                match req {
                    Request::Archive { .. } => {
                        let _ = reply.send(Response::Archived);
                    }
                    // Never answered: the server's own timeout answers.
                    Request::Restore { .. } => std::mem::forget(reply),
                }
            }
        });
        assert_eq!(
            call(&sock, &req, Duration::from_secs(2)).await.unwrap(),
            Response::Archived
        );
        let r = call(
            &sock,
            &Request::Restore {
                name: "00000002.history".into(),
            },
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        assert!(matches!(r, Response::Failed { .. }), "{r:?}");
    }
}
