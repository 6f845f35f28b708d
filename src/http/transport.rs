//! The listeners' connections: plain HTTP, or HTTPS while TLS is on, on the same port.
//!
//! A connection's first byte tells them apart (a TLS ClientHello starts with 0x16, an HTTP
//! request with a method's letter), so that probes keep working whichever scheme the kubelet
//! is configured with while TLS is turned on or off, and a renewed certificate serves the
//! next handshake. Handlers learn how a request came from the [`Transport`] extension.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::tls::Current;

/// How a request reached the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Plain,
    /// `member`: the client presented a certificate the cluster CA signed (rustls verified
    /// it in the handshake).
    Tls {
        member: bool,
    },
}

/// A client gets this long for its first byte and for the TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// A TLS record of type handshake.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Serves `app` on `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Current,
    mut stop: watch::Receiver<bool>,
    server: &'static str,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, server, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        let config = tls.borrow().as_ref().map(|m| m.server_config.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut first = [0u8; 1];
            let peeked = tokio::time::timeout(HANDSHAKE, stream.peek(&mut first)).await;
            let hello = matches!(peeked, Ok(Ok(1))) && first[0] == TLS_HANDSHAKE_RECORD;
            match (hello, config) {
                (false, _) => connection(stream, app, Transport::Plain).await,
                (true, Some(config)) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let member = tls.get_ref().1.peer_certificates().is_some();
                            connection(tls, app, Transport::Tls { member }).await
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, server, "TLS handshake failed"),
                        Err(_) => tracing::debug!(server, "TLS handshake timed out"),
                    }
                }
                // TLS off: nothing to answer a ClientHello with.
                (true, None) => {}
            }
        });
    }
}

async fn connection<I>(io: I, app: Router, transport: Transport)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(transport);
            let app = app.clone();
            async move {
                let response: Result<_, Infallible> =
                    app.oneshot(req.map(axum::body::Body::new)).await;
                response
            }
        });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
}
