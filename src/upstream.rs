//! The one pooled client to the upstream: rustls with webpki roots, HTTP/1.1 and HTTP/2 by
//! ALPN, plain HTTP for local OpenAI-compatible servers.
//!
//! Invariant: one client (one pool, one TLS config) for the whole process; connections are
//! reused, so no request pays for DNS or a TLS handshake unless the pool has none idle.

use std::time::Duration;

use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;

/// A request body to the upstream: read whole (it was inspected) or streamed through.
pub type UpstreamBody = Either<Full<Bytes>, Incoming>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot set up TLS for the upstream client: {0}")]
    Tls(#[from] rustls::Error),
}

#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    scheme: Scheme,
    authority: http::uri::Authority,
    /// Path prefix of the base URL, without a trailing slash ("" for none).
    prefix: String,
    /// The `Host` header for the upstream, built once: without it the client formats one
    /// from the URI for every request.
    host: Option<HeaderValue>,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Self, UpstreamError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(https);
        let base = &config.base_url;
        let authority = base
            .authority()
            .cloned()
            .unwrap_or_else(|| http::uri::Authority::from_static("api.openai.com"));
        // The authority as written (so that over HTTP/2 it equals `:authority`, as RFC 9113
        // requires of a Host header); one with user info is left to the client.
        let host = (!authority.as_str().contains('@'))
            .then(|| HeaderValue::from_str(authority.as_str()).ok())
            .flatten();
        Ok(Upstream {
            client,
            scheme: base.scheme().cloned().unwrap_or(Scheme::HTTPS),
            authority,
            prefix: base.path().trim_end_matches('/').to_owned(),
            host,
        })
    }

    /// The upstream URI for a client's path and query (`/v1/chat/completions?x=1`).
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let pq = if self.prefix.is_empty() {
            PathAndQuery::try_from(path_and_query)?
        } else {
            PathAndQuery::try_from(format!("{}{}", self.prefix, path_and_query))?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }

    pub fn authority(&self) -> &http::uri::Authority {
        &self.authority
    }

    /// The `Host` header to send, if it could be built.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    pub async fn send(
        &self,
        request: http::Request<UpstreamBody>,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(request).await
    }
}
