//! Configuration: the TOML file as written (`raw`), validated and compiled into [`Config`].
//!
//! Invariant: a `Config` value is always fully valid. Globs are compiled, token hashes decoded,
//! secrets resolved and limits typed; nothing downstream re-validates. Loading is fallible and
//! names the key path of the first problem; swapping a loaded config in is infallible.

mod load;
mod patterns;
mod raw;
mod summary;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use load::{load, load_str, ConfigError};
pub use patterns::ModelPatterns;
pub use summary::{summary, summary_at};

use crate::maps::FastMap;
use crate::period::Period;
use crate::pricing::Pricing;

/// A secret value (a real API key). `Debug` never prints it and it is never serialized.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// SHA-256 of an internal token: the only form in which tokens are kept.
pub type TokenHash = [u8; 32];

#[derive(Debug)]
pub struct Config {
    /// The file this was loaded from (for messages and reload).
    pub source: PathBuf,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub pricing: Pricing,
    pub reservation: ReservationConfig,
    pub store: StoreConfig,
    pub projects: Vec<Arc<Project>>,
    /// Token hash -> (index into `projects`, index into that project's `credentials`).
    pub tokens: FastMap<TokenHash, CredentialRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialRef {
    pub project: usize,
    pub credential: usize,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: u64,
    pub tls: Option<TlsFiles>,
    pub shutdown_grace: Duration,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub keepalive_idle_timeout: Duration,
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    /// Threads serving the proxy listener, each running its own event loop.
    pub workers: usize,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// The env var named by `token_env`, resolved. `None` when `token_env` is unset: then the
    /// `/admin/*` routes answer 403 (fail closed), while /metrics and the probes stay open.
    pub token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Scheme, authority and optional path prefix (no trailing slash), e.g. `https://api.openai.com`.
    /// Without a prefix the path is `/` (`http::Uri` has no empty path): join request paths to
    /// `base_url.path().trim_end_matches('/')`.
    pub base_url: http::Uri,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
}

/// How much an in-flight request reserves before it is forwarded.
#[derive(Debug, Clone)]
pub struct ReservationConfig {
    /// Output tokens reserved when the request names no max output tokens.
    pub default_output_tokens: u64,
}

/// Where and how settled usage is recorded (`[store]`).
#[derive(Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The SQLite ledger, resolved against the config file's directory.
    pub path: PathBuf,
    /// How often pending usage is written to the ledger; at least 10 ms.
    pub flush_interval: Duration,
    /// A `redis://` or `rediss://` URL, as written. It may hold a password: `Debug` and the
    /// summary show it through [`StoreConfig::redis_url_redacted`].
    pub redis_url: Option<String>,
    pub on_store_error: OnStoreError,
}

impl StoreConfig {
    /// `redis_url` with any user and password replaced by `[redacted]`, for logs and summaries.
    pub fn redis_url_redacted(&self) -> Option<String> {
        self.redis_url.as_deref().map(redact_userinfo)
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("path", &self.path)
            .field("flush_interval", &self.flush_interval)
            .field("redis_url", &self.redis_url_redacted())
            .field("on_store_error", &self.on_store_error)
            .finish()
    }
}

/// `scheme://user:password@host/...` -> `scheme://[redacted]@host/...`; anything without
/// credentials is returned as it is.
fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}[redacted]{}", &url[..scheme_end + 3], &rest[at..]),
        None => url.to_owned(),
    }
}

/// What tollgate does while the ledger cannot be written (`store.on_store_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Keep serving: usage stays queued in memory and is written once the ledger recovers.
    Open,
    /// Refuse requests until the ledger can be written again.
    Closed,
}

impl OnStoreError {
    pub const NAMES: &'static str = "open, closed";

    pub fn parse(name: &str) -> Option<OnStoreError> {
        match name {
            "open" => Some(OnStoreError::Open),
            "closed" => Some(OnStoreError::Closed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreError::Open => "open",
            OnStoreError::Closed => "closed",
        }
    }
}

#[derive(Debug)]
pub struct Project {
    pub name: Arc<str>,
    /// The name as a header value (`x-tollgate-project`), built once.
    pub name_header: http::HeaderValue,
    pub api_key: Secret,
    /// `Bearer <api_key>`, built once and marked sensitive (its `Debug` prints no key).
    pub authorization: http::HeaderValue,
    pub openai_project: Option<http::HeaderValue>,
    pub openai_organization: Option<http::HeaderValue>,
    pub models: ModelPolicy,
    pub budget: Option<BudgetLimit>,
    pub archived: bool,
    pub credentials: Vec<Credential>,
    /// Per-model rate limits; the first rule whose pattern matches a model applies.
    pub rate_limits: Vec<RateLimitRule>,
    /// Fractions of the budget (`0 < x <= 1`, ascending) at which an alert fires.
    pub alert_at: Vec<f64>,
    /// Where budget alerts are POSTed as JSON.
    pub alert_webhook: Option<http::Uri>,
}

#[derive(Debug)]
pub struct Credential {
    pub name: Arc<str>,
    pub expires_at: Option<DateTime<Utc>>,
    pub disabled: bool,
    /// A budget of the credential's own, checked as well as the project's.
    pub budget: Option<BudgetLimit>,
    /// An allowlist narrower than the project's; both must allow a model.
    pub allowed_models: Option<ModelPatterns>,
}

/// `rate_limits = [{ model = "gpt-4o*", rpm = 500, tpm = 200000, rpd = 10000 }]`.
#[derive(Debug)]
pub struct RateLimitRule {
    /// The pattern as written; with the limits it keys the rule's meters, so a reload that
    /// keeps a rule keeps its meters.
    pub key: Arc<str>,
    pub matcher: ModelPatterns,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub rpd: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetLimit {
    pub tokens: Option<u64>,
    pub micro_usd: Option<u64>,
    pub period: Period,
}

/// Allow and deny lists of model names (exact names and `*` globs).
#[derive(Debug)]
pub struct ModelPolicy {
    /// `None`: no allowlist, every model not denied is allowed.
    pub allowed: Option<ModelPatterns>,
    pub denied: ModelPatterns,
    /// The exact (glob-free) names on the allowlist: they are metric labels.
    pub exact_allowed: Vec<Arc<str>>,
    /// `allowed_models` as written (`None`: no allowlist), for `tollgate check`.
    pub allowed_patterns: Option<Vec<Arc<str>>>,
    /// `denied_models` as written.
    pub denied_patterns: Vec<Arc<str>>,
}

impl ModelPolicy {
    pub fn allows(&self, model: &str) -> bool {
        if self.denied.is_match(model) {
            return false;
        }
        match &self.allowed {
            Some(allowed) => allowed.is_match(model),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_credentials_are_redacted() {
        assert_eq!(
            redact_userinfo("redis://user:pw@cache:6379/0"),
            "redis://[redacted]@cache:6379/0"
        );
        assert_eq!(
            redact_userinfo("rediss://:p@ss@cache"),
            "rediss://[redacted]@cache"
        );
        assert_eq!(
            redact_userinfo("redis://cache:6379/0?x=a@b"),
            "redis://cache:6379/0?x=a@b"
        );
        assert_eq!(redact_userinfo("redis://cache"), "redis://cache");
        let store = StoreConfig {
            path: PathBuf::from("data/tollgate.db"),
            flush_interval: Duration::from_millis(200),
            redis_url: Some("redis://admin:hunter2@cache".to_owned()),
            on_store_error: OnStoreError::Open,
        };
        let printed = format!("{store:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("redis://[redacted]@cache"), "{printed}");
    }
}
