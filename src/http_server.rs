//! Serving an axum app, for the queen's API and a worker's probes. `axum::serve` gives hyper no timer, and
//! hyper then drops its timeout on reading a request's head: a client that opens a connection and never
//! finishes its request (before any authentication) held the connection and its task for ever, and enough
//! of them took every file descriptor. This loop is hyper-util's server with a timer, so a request head
//! must arrive within [`HEADER_READ_TIMEOUT`], and an idle keep-alive connection closes after as long.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

/// The longest a connection may take to send a request's head (hyper's default, which needs a timer).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits for the open
/// connections to finish their requests (each is asked to close after its current one).
pub async fn serve(listener: tokio::net::TcpListener, app: axum::Router, shutdown: impl Future<Output = ()>) {
    serve_within(listener, app, shutdown, HEADER_READ_TIMEOUT).await
}

async fn serve_within(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()>,
    header_timeout: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: pause rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection =
            builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_request_head_that_never_ends_is_cut_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
        let timeout = Duration::from_secs(1);
        tokio::spawn(serve_within(listener, app, std::future::pending(), timeout));

        // A whole request is answered.
        let mut whole = tokio::net::TcpStream::connect(addr).await.unwrap();
        whole.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        whole.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer}");

        // A head without its blank line is closed after the timeout, not held for ever.
        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let mut rest = Vec::new();
        let started = std::time::Instant::now();
        let read = tokio::time::timeout(timeout * 10, partial.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the connection was still open after {:?}", timeout * 10);
        assert!(started.elapsed() >= timeout / 2, "closed before its time: {:?}", started.elapsed());
    }
}
