//! Listeners: the accept loop, TLS, HTTP/1.1 and HTTP/2 (h2c with prior knowledge, ALPN over
//! TLS), connection limits and graceful drain.
//!
//! Invariant: every connection task is owned by `serve`, which at shutdown asks each one to
//! close gracefully and waits for them, so `serve` returns only when all connections are closed
//! or the grace period has run out (the rest are cut); a panic in
//! one request becomes a 500 for that request and never takes the process down. Every
//! connection is under a timer at every phase: the TLS handshake and the first request head
//! (`header_read_timeout`), later heads on a kept-alive connection (the same, see [`drive`]),
//! idle keep-alive (`keepalive_idle_timeout`, the same); bodies have theirs in `proxy` and
//! `body`.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

use crate::body::ProxyBody;
use crate::config::{ServerConfig, TlsFiles};
use crate::error::ProxyError;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A rustls acceptor for the cert and key files, offering h2 and http/1.1 by ALPN.
pub fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::File {
            path: path.display().to_string(),
            why: e.to_string(),
        })
    };
    let bad = |path: &Path, why: &str| TlsError::File {
        path: path.display().to_string(),
        why: why.to_owned(),
    };
    let cert_pem = read(&files.cert)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| bad(&files.cert, "not a PEM certificate chain"))?;
    if certs.is_empty() {
        return Err(bad(&files.cert, "no certificate in the file"));
    }
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| bad(&files.key, "not a PEM private key"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `handler` on `listener` until `shutdown` turns true, then drains for at most
/// `server.shutdown_grace`. A connection is accepted only with one of `permits`, which may be
/// shared by several accept loops on the same listener.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    server: &ServerConfig,
    handler: H,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // `drive` times the heads and the idle keep-alive itself, at ticks it has anyway:
        // hyper's header timer would arm and cancel a timer for every request.
        .header_read_timeout(None)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(server.max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    // Turns true when the connections are to finish what they serve and close.
    let (close_all, closing) = watch::channel(false);
    let timers = Timers {
        header: server.header_read_timeout,
        idle: server.keepalive_idle_timeout,
    };
    // Every connection task is owned here, so that the ones still running when the grace
    // period ends are cut (and their requests settled) before `serve` returns.
    let mut connections = tokio::task::JoinSet::new();

    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stopping(&mut shutdown) => break,
        };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopping(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let activity = Arc::new(Activity::default());
        let activity_in = activity.clone();
        let service = hyper::service::service_fn(move |request| {
            activity_in.request_started();
            let activity = activity_in.clone();
            let handler = handler.clone();
            async move {
                // The handler's future boxed: it is large, and hyper moves the service's future
                // a few times before it polls it; a box moves as a pointer. Called inside the
                // guarded block, so that a panic in the call itself is caught too.
                let response = AssertUnwindSafe(async move { Box::pin(handler(request)).await })
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!("a request handler panicked; answering 500");
                        ProxyError::Internal.into_response()
                    });
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, activity)))
            }
        });
        let builder = builder.clone();
        let mut closing = closing.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let stream = match tls {
                None => Either::Left(stream),
                Some(acceptor) => {
                    match tokio::time::timeout(timers.header, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => Either::Right(stream),
                        Ok(Err(err)) => {
                            tracing::debug!(error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            let io = TokioIo::new(Watched::new(stream, activity.clone()));
            let connection = builder
                .serve_connection_with_upgrades(io, service)
                .into_owned();
            let ended = drive(
                connection,
                |connection| connection.graceful_shutdown(),
                &activity,
                timers,
                &mut closing,
            )
            .await;
            if let Some(Err(err)) = ended {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = close_all.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(server.shutdown_grace, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = server.shutdown_grace.as_millis() as u64,
            open = connections.len(),
            "connections still open after the grace period; closing them"
        );
    }
    // Cut what is left; dropping their futures settles the requests (charged per the rules
    // for a cut stream) before the caller writes the last usage to the ledger.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it before anything else is awaited.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// What a connection's timers see of it. One connection, one task: relaxed atomics suffice.
#[derive(Debug, Default)]
struct Activity {
    /// Reads that returned data.
    reads: AtomicU64,
    /// Requests handed to the handler whose response body is not finished.
    in_flight: AtomicU64,
    /// `reads` when the last response finished: more since, and no request in flight, means
    /// a client has begun the next request head.
    reads_when_idle: AtomicU64,
    /// Requests handed to the handler: none yet means the first head has not come; an idle
    /// stretch seen at two ticks is one stretch only if this did not change in between.
    requests: AtomicU64,
    /// The connection opened with the HTTP/2 preface: its reads include pings and window
    /// updates, so they say nothing about a request head.
    http2: AtomicBool,
}

impl Activity {
    fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn response_finished(&self) {
        self.reads_when_idle
            .store(self.reads.load(Ordering::Relaxed), Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// No request in flight and, on HTTP/1.1, none begun (on HTTP/2 reads include pings).
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && (self.http2.load(Ordering::Relaxed)
                || self.reads.load(Ordering::Relaxed)
                    == self.reads_when_idle.load(Ordering::Relaxed))
    }

    fn head_begun(&self) -> bool {
        !self.http2.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.reads.load(Ordering::Relaxed) != self.reads_when_idle.load(Ordering::Relaxed)
    }
}

/// A connection's timeouts (`server.header_read_timeout_ms`, `keepalive_idle_timeout_ms`).
#[derive(Debug, Clone, Copy)]
struct Timers {
    header: Duration,
    idle: Duration,
}

/// Drives a connection to its end with the timers hyper does not have; `None` when it was cut.
/// `close` asks the connection to finish what it serves and close (hyper's graceful shutdown:
/// an HTTP/2 GOAWAY, or the end of keep-alive); it is called once, when `closing` turns true or
/// the connection has been idle long enough.
///
/// - The first request's head must arrive within `timers.header` of the connection (after the
///   TLS handshake): a silent or dripping client is cut.
/// - On a kept-alive HTTP/1.1 connection, a request head begun after a response must be
///   complete within `timers.header` too: checked every `timers.header / 2`, so it is cut
///   between 1 and 1.5 times `timers.header` after its first byte.
/// - A connection idle for `timers.idle` (checked at the same ticks: no request in flight and,
///   on HTTP/1.1, none begun) is closed gracefully. hyper has no idle timer of its own for
///   HTTP/2 (its pings would keep a connection open forever), and its HTTP/1.1 header timer is
///   off (see [`serve`]).
async fn drive<C: Future>(
    connection: C,
    close: impl Fn(Pin<&mut C>),
    activity: &Activity,
    timers: Timers,
    closing: &mut watch::Receiver<bool>,
) -> Option<C::Output> {
    tokio::pin!(connection);
    let mut closed = false;
    let first_head = tokio::time::sleep(timers.header);
    tokio::pin!(first_head);
    loop {
        tokio::select! {
            ended = &mut connection => return Some(ended),
            () = &mut first_head => break,
            () = stopping(closing), if !closed => {
                close(connection.as_mut());
                closed = true;
            }
        }
    }
    if activity.requests.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let tick = (timers.header / 2).max(Duration::from_millis(5));
    let mut head_seen: Option<tokio::time::Instant> = None;
    // Since when the connection has been idle, and its request count then.
    let mut idle_since: Option<(tokio::time::Instant, u64)> = None;
    loop {
        tokio::select! {
            ended = &mut connection => return Some(ended),
            () = tokio::time::sleep(tick) => {}
            () = stopping(closing), if !closed => {
                close(connection.as_mut());
                closed = true;
                continue;
            }
        }
        if activity.head_begun() {
            let seen = *head_seen.get_or_insert_with(tokio::time::Instant::now);
            if seen.elapsed() >= timers.header {
                return None;
            }
        } else {
            head_seen = None;
        }
        if activity.idle() {
            let requests = activity.requests.load(Ordering::Relaxed);
            match idle_since {
                Some((since, seen)) if seen == requests => {
                    if since.elapsed() >= timers.idle && !closed {
                        close(connection.as_mut());
                        closed = true;
                    }
                }
                // First seen idle, or a request came and went between two ticks.
                _ => idle_since = Some((tokio::time::Instant::now(), requests)),
            }
        } else {
            idle_since = None;
        }
    }
}

/// The client's stream, counting the reads that bring data (and noting the HTTP/2 preface).
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    fn new(inner: S, activity: Arc<Activity>) -> Self {
        Watched { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Some(read) = buf.filled().get(before..).filter(|read| !read.is_empty()) {
            if self.activity.reads.fetch_add(1, Ordering::Relaxed) == 0 && read.starts_with(b"PRI ")
            {
                self.activity.http2.store(true, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// A response body that tells the connection's [`Activity`] when it is finished (or
    /// dropped unfinished).
    struct Tracked<B> {
        #[pin]
        inner: B,
        activity: Arc<Activity>,
    }

    impl<B> PinnedDrop for Tracked<B> {
        fn drop(this: Pin<&mut Self>) {
            this.activity.response_finished();
        }
    }
}

impl<B> Tracked<B> {
    fn new(inner: B, activity: Arc<Activity>) -> Self {
        Tracked { inner, activity }
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
