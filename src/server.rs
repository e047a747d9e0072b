//! Listeners: the accept loop, TLS, HTTP/1.1 and HTTP/2 (h2c with prior knowledge, ALPN over
//! TLS), connection limits and graceful drain.
//!
//! Invariant: every connection task is watched by the graceful-shutdown handle, so `serve`
//! returns only when all connections are closed or the grace period has run out; a panic in
//! one request becomes a 500 for that request and never takes the process down.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

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
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(server.max_concurrent_streams)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
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
        let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let served_in = served.clone();
        let first_request_timeout = server.header_read_timeout;
        let service = hyper::service::service_fn(move |request| {
            served_in.store(true, std::sync::atomic::Ordering::Release);
            let handler = handler.clone();
            async move {
                let response = AssertUnwindSafe(async move { handler(request).await })
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!("a request handler panicked; answering 500");
                        ProxyError::Internal.into_response()
                    });
                Ok::<_, Infallible>(response)
            }
        });
        let builder = builder.clone();
        match &tls {
            None => {
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                connections.spawn(async move {
                    tokio::pin!(connection);
                    let result = tokio::select! {
                        result = &mut connection => Some(result),
                        () = tokio::time::sleep(first_request_timeout) => None,
                    };
                    let result = match result {
                        Some(result) => result,
                        None if served.load(std::sync::atomic::Ordering::Acquire) => {
                            connection.await
                        }
                        None => {
                            drop(permit);
                            return;
                        }
                    };
                    if let Err(err) = result {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let timeout = server.header_read_timeout;
                let watcher = graceful.watcher();
                connections.spawn(async move {
                    let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(err)) => {
                            tracing::debug!(error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    if let Err(err) = watcher.watch(connection).await {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(server.shutdown_grace, graceful.shutdown())
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
