//! The configuration file as written: TOML deserialized into plain structs, nothing checked yet.
//!
//! Invariant: every key the file may hold is a field here, documented, with its default named by
//! a function; any other key is refused (`deny_unknown_fields`). Keys that are required but whose
//! absence should be reported with a key path (`name`, `token_sha256`, `period`, prices) are
//! `Option`s here and checked in `load`, so that the message names where they are missing.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The data-plane listener: where clients send their OpenAI requests.
    #[serde(default)]
    pub server: RawServer,
    /// The admin listener: `/metrics`, the probes and `/admin/*`.
    #[serde(default)]
    pub admin: RawAdmin,
    /// Where requests are forwarded.
    #[serde(default)]
    pub upstream: RawUpstream,
    /// Model prices.
    #[serde(default)]
    pub pricing: RawPricing,
    /// What an in-flight request reserves against its budget.
    #[serde(default)]
    pub reservation: RawReservation,
    /// Where settled usage is recorded.
    #[serde(default)]
    pub store: RawStore,
    /// The projects, each with its own OpenAI key, model policy, budget and credentials.
    /// (empty: every request is refused)
    #[serde(default)]
    pub projects: Vec<RawProject>,
}

/// `[server]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// IP address and port to listen on, e.g. `0.0.0.0:8080` or `[::1]:8080`; port 0 picks a free
    /// port. (`127.0.0.1:8080`)
    #[serde(default = "default_server_listen")]
    pub listen: String,
    /// Largest request body accepted, in bytes; larger requests are refused with 413. Must be
    /// at least 1. (33554432, 32 MiB)
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// PEM certificate chain; relative to the config file's directory. Set both `tls_cert` and
    /// `tls_key` to serve HTTPS, or neither for plain HTTP. (unset)
    pub tls_cert: Option<String>,
    /// PEM private key; relative to the config file's directory. (unset)
    pub tls_key: Option<String>,
    /// How long in-flight requests may run after shutdown begins, in milliseconds; 0 drops them
    /// at once. (10000)
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Time allowed for a client to send a request's headers, in milliseconds; at least 1.
    /// (10000)
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Time allowed for a client to send a request body that tollgate must read (JSON, the
    /// multipart forms that name a model), in milliseconds; at least 1. 408 after. (30000)
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// How long an idle keep-alive connection is kept open, in milliseconds; at least 1. (75000)
    #[serde(default = "default_keepalive_idle_timeout_ms")]
    pub keepalive_idle_timeout_ms: u64,
    /// Open client connections at most; at least 1. (10000)
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTP/2 streams per connection at most; at least 1. (256)
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Threads that serve the proxy listener, each with an event loop of its own; at least 1.
    /// (the number of CPUs)
    pub workers: Option<u64>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: default_server_listen(),
            max_body_bytes: default_max_body_bytes(),
            tls_cert: None,
            tls_key: None,
            shutdown_grace_ms: default_shutdown_grace_ms(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
            keepalive_idle_timeout_ms: default_keepalive_idle_timeout_ms(),
            max_connections: default_max_connections(),
            max_concurrent_streams: default_max_concurrent_streams(),
            workers: None,
        }
    }
}

fn default_server_listen() -> String {
    "127.0.0.1:8080".to_owned()
}

fn default_max_body_bytes() -> u64 {
    32 * 1024 * 1024
}

fn default_shutdown_grace_ms() -> u64 {
    10_000
}

fn default_header_read_timeout_ms() -> u64 {
    10_000
}

fn default_body_read_timeout_ms() -> u64 {
    30_000
}

fn default_keepalive_idle_timeout_ms() -> u64 {
    75_000
}

fn default_max_connections() -> usize {
    10_000
}

fn default_max_concurrent_streams() -> u32 {
    256
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// IP address and port of the admin listener; must differ from `server.listen` unless one
    /// of them uses port 0. (`127.0.0.1:9090`)
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Name of the environment variable holding the bearer token for `/admin/*`. When named, the
    /// variable must be set and non-empty. When unset, `/admin/*` answers 403 while `/metrics`
    /// and the probes stay open. (unset)
    pub token_env: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin_listen(),
            token_env: None,
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9090".to_owned()
}

/// `[upstream]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `http` or `https` URL of the OpenAI API, with an optional path prefix and no query,
    /// fragment or credentials; a trailing slash is dropped. (`https://api.openai.com`)
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Time allowed to open a connection (TCP and TLS), in milliseconds; at least 1. (5000)
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed from sending a request until the response headers arrive, in milliseconds;
    /// at least 1. (600000)
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Time allowed between two chunks of a response body, in milliseconds; at least 1.
    /// (120000)
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            base_url: default_base_url(),
            connect_timeout_ms: default_connect_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
        }
    }
}

fn default_base_url() -> String {
    "https://api.openai.com".to_owned()
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

fn default_request_timeout_ms() -> u64 {
    600_000
}

fn default_idle_timeout_ms() -> u64 {
    120_000
}

/// `[pricing]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    /// The pricing table (see [`RawPricingFile`]); relative to the config file's directory.
    /// (`pricing.toml`)
    #[serde(default = "default_pricing_file")]
    pub file: String,
    /// USD per 1M tokens charged for a model that has no entry in the table.
    /// (`{ input = 10.0, cached_input = 10.0, output = 30.0 }`)
    #[serde(default = "default_fallback")]
    pub fallback: RawPrice,
}

impl Default for RawPricing {
    fn default() -> Self {
        RawPricing {
            file: default_pricing_file(),
            fallback: default_fallback(),
        }
    }
}

fn default_pricing_file() -> String {
    "pricing.toml".to_owned()
}

fn default_fallback() -> RawPrice {
    RawPrice {
        input: Some(10.0),
        cached_input: Some(10.0),
        output: Some(30.0),
    }
}

/// A price in USD per one million tokens. Each is a finite number `>= 0`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// Input (prompt) tokens. (required)
    pub input: Option<f64>,
    /// Input tokens served from the prompt cache. (same as `input`)
    pub cached_input: Option<f64>,
    /// Output (completion) tokens, reasoning included. (required)
    pub output: Option<f64>,
}

/// The pricing file named by `pricing.file`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricingFile {
    /// Model name -> price, e.g. `[models."gpt-4o-mini"]`. A dated snapshot
    /// (`gpt-4o-mini-2024-07-18`) without an entry of its own is priced as its base model.
    /// (empty: every model is charged `pricing.fallback`)
    #[serde(default)]
    pub models: BTreeMap<String, RawPrice>,
}

/// `[reservation]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReservation {
    /// Output tokens reserved for a request that sets no `max_tokens` /
    /// `max_completion_tokens` / `max_output_tokens`. (4096)
    #[serde(default = "default_output_tokens")]
    pub default_output_tokens: u64,
}

impl Default for RawReservation {
    fn default() -> Self {
        RawReservation {
            default_output_tokens: default_output_tokens(),
        }
    }
}

fn default_output_tokens() -> u64 {
    4_096
}

/// `[store]`: the usage ledger.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// The SQLite ledger file; relative to the config file's directory. Its directory is
    /// created when missing. (`data/tollgate.db`)
    #[serde(default = "default_store_path")]
    pub path: String,
    /// How often settled usage is written to the ledger, in milliseconds; at least 10. Usage
    /// settled since the last write is lost if the process dies. (200)
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// A `redis://` or `rediss://` URL, for sharing budgets between replicas (read when the
    /// process starts; a reload does not change it). (unset)
    pub redis_url: Option<String>,
    /// What to do while the ledger cannot be written: `open` keeps serving (usage stays queued
    /// in memory and is written when the ledger recovers), `closed` refuses requests.
    /// (`open`)
    #[serde(default = "default_on_store_error")]
    pub on_store_error: String,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            path: default_store_path(),
            flush_interval_ms: default_flush_interval_ms(),
            redis_url: None,
            on_store_error: default_on_store_error(),
        }
    }
}

fn default_store_path() -> String {
    "data/tollgate.db".to_owned()
}

fn default_flush_interval_ms() -> u64 {
    200
}

fn default_on_store_error() -> String {
    "open".to_owned()
}

/// `[[projects]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProject {
    /// Unique, non-empty, only `A-Z a-z 0-9 . _ -`: it is a metric label. (required)
    pub name: Option<String>,
    /// Environment variable holding the project's OpenAI API key; it must be set and non-empty.
    /// Exactly one of `api_key_env` and `api_key_file`. (unset)
    pub api_key_env: Option<String>,
    /// File holding the project's OpenAI API key, relative to the config file's directory;
    /// surrounding whitespace is trimmed and the rest must be non-empty. (unset)
    pub api_key_file: Option<String>,
    /// Sent upstream as `OpenAI-Project`; must be a valid, non-empty header value. (unset)
    pub openai_project: Option<String>,
    /// Sent upstream as `OpenAI-Organization`; must be a valid, non-empty header value. (unset)
    pub openai_organization: Option<String>,
    /// Models this project may use: exact names or patterns where `*` matches any run of
    /// characters (no other wildcard). (unset: every model not denied; `[]`: none)
    pub allowed_models: Option<Vec<String>>,
    /// Models this project may not use, same syntax; a denial wins over an allowance. (empty)
    #[serde(default)]
    pub denied_models: Vec<String>,
    /// Spending limit per period. (unset: unlimited)
    pub budget: Option<RawBudget>,
    /// An archived project keeps its ledger for reporting but serves no request. (false)
    #[serde(default)]
    pub archived: bool,
    /// The internal tokens that authenticate as this project. (empty)
    #[serde(default)]
    pub credentials: Vec<RawCredential>,
    /// Per-model rate limits, as OpenAI's project limits; the first matching rule applies and
    /// its limits are shared by every model it matches. (empty)
    #[serde(default)]
    pub rate_limits: Vec<RawRateLimit>,
    /// URL that budget alerts are POSTed to as JSON (http or https). (unset: log and metric only)
    pub alert_webhook: Option<String>,
}

/// One entry of `rate_limits`: at least one of `rpm`, `tpm`, `rpd`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Model name or `*` pattern. (required)
    pub model: Option<String>,
    /// Requests per minute. (unlimited)
    pub rpm: Option<u64>,
    /// Tokens per minute (the reservation estimate at admission, corrected at settlement).
    /// (unlimited)
    pub tpm: Option<u64>,
    /// Requests per day. (unlimited)
    pub rpd: Option<u64>,
}

/// `budget = { ... }` of a project: at least one of `tokens` and `usd`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    /// Total tokens (input plus output) per period. (unlimited)
    pub tokens: Option<u64>,
    /// US dollars per period, `>= 0`, kept to the micro-dollar. (unlimited)
    pub usd: Option<f64>,
    /// `monthly`, `weekly` (ISO, from Monday), `daily` (UTC calendar) or `total` (never resets).
    /// (required)
    pub period: Option<String>,
    /// Fractions of the limit (`0 < x <= 1`) at which an alert fires once per period, e.g.
    /// `[0.5, 0.8, 1.0]`; project budgets only. (none)
    pub alert_at: Option<Vec<f64>>,
}

/// `[[projects.credentials]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    /// Non-empty and unique within the project; it names the caller in logs. (required)
    pub name: Option<String>,
    /// SHA-256 of the bearer token, 64 hex characters in either case; unique across all
    /// projects. The token itself is never stored: `printf %s TOKEN | sha256sum`. (required)
    pub token_sha256: Option<String>,
    /// RFC 3339 instant from which the credential is refused, e.g. `"2027-01-01T00:00:00Z"`;
    /// a TOML offset date-time works too. (unset: never expires)
    pub expires_at: Option<RawInstant>,
    /// A disabled credential is refused. (false)
    #[serde(default)]
    pub disabled: bool,
    /// A budget of the credential's own, same form as the project's; both must have room.
    /// (unset)
    pub budget: Option<RawBudget>,
    /// Models this credential may use, narrower than its project's; both lists must allow a
    /// model. (unset: the project's)
    pub allowed_models: Option<Vec<String>>,
}

/// An instant written as a string or as a TOML date-time; both are parsed as RFC 3339 later.
#[derive(Debug)]
pub enum RawInstant {
    Text(String),
    Toml(toml::value::Datetime),
}

impl<'de> Deserialize<'de> for RawInstant {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InstantVisitor;

        impl<'de> serde::de::Visitor<'de> for InstantVisitor {
            type Value = RawInstant;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an RFC 3339 date-time such as \"2027-01-01T00:00:00Z\"")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<RawInstant, E> {
                Ok(RawInstant::Text(text.to_owned()))
            }

            // toml hands a date-time over as a one-entry map; let its own type read it.
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawInstant, A::Error> {
                let access = serde::de::value::MapAccessDeserializer::new(map);
                toml::value::Datetime::deserialize(access).map(RawInstant::Toml)
            }
        }

        deserializer.deserialize_any(InstantVisitor)
    }
}
