//! Loading: read the file, parse it into [`RawConfig`], then validate and compile it into a
//! [`Config`], resolving secrets from the environment and from files.
//!
//! Invariant: the first problem found stops the load, and its [`ConfigError`] names the file
//! and the key path (`projects[2].budget.period`) so that a person can go straight to it.
//! Messages never carry a secret or a token hash.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use http::HeaderValue;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use thiserror::Error;
use toml::Spanned;

use super::raw::{
    RawAdmin, RawBudget, RawConfig, RawCredential, RawInstant, RawPrice, RawPricing,
    RawPricingFile, RawProject, RawRateLimit, RawServer, RawStore, RawUpstream,
};
use super::{
    AdminConfig, BudgetLimit, Config, Credential, CredentialRef, ModelPatterns, ModelPolicy,
    OnStoreError, Project, RateLimitRule, ReservationConfig, Secret, ServerConfig, StoreConfig,
    TlsFiles, TokenHash, UpstreamConfig,
};
use crate::maps::FastMap;
use crate::period::Period;
use crate::pricing::{Price, Pricing};

/// Why a configuration could not be loaded: `{file}: {key_path}: {why}`.
///
/// `key_path` is empty for problems with the file as a whole (it cannot be read, or a TOML
/// syntax error before any table header); the Display then reads `{file}: {why}`.
#[derive(Debug, Error)]
#[error("{}: {}{}", .file.display(), KeyPrefix(.key_path), .why)]
pub struct ConfigError {
    file: PathBuf,
    key_path: String,
    why: String,
}

impl ConfigError {
    fn new(file: &Path, key_path: impl Into<String>, why: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            key_path: key_path.into(),
            why: why.into(),
        }
    }

    /// The configuration file the problem is in.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Where in the file, e.g. `projects[0].allowed_models[1]`; empty for the file as a whole.
    pub fn key_path(&self) -> &str {
        &self.key_path
    }

    /// What is wrong, lowercase and without a trailing period.
    pub fn why(&self) -> &str {
        &self.why
    }
}

/// `"{key_path}: "`, or nothing when the key path is empty.
struct KeyPrefix<'a>(&'a str);

impl fmt::Display for KeyPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0)
        }
    }
}

/// Reads, parses and validates the configuration at `path`, resolving secrets from the process
/// environment and from files relative to the file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, "", format!("cannot read the file: {e}")))?;
    load_str(&text, path, &|name| std::env::var(name).ok())
}

/// Parses and validates `text` as if read from `source`: relative paths (`api_key_file`,
/// `pricing.file`, the TLS files) resolve against `source`'s directory, and environment
/// variables are looked up with `env`.
pub fn load_str(
    text: &str,
    source: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let (key_path, why) = describe_toml_error(text, &e);
        ConfigError::new(source, key_path, why)
    })?;
    let loader = Loader {
        file: source,
        dir: source.parent().map(Path::to_path_buf).unwrap_or_default(),
        env,
    };
    loader.config(raw)
}

/// The context of one load: where errors point and where relative paths and secrets come from.
struct Loader<'a> {
    file: &'a Path,
    dir: PathBuf,
    env: &'a dyn Fn(&str) -> Option<String>,
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

impl Loader<'_> {
    fn err(&self, key_path: impl Into<String>, why: impl Into<String>) -> ConfigError {
        ConfigError::new(self.file, key_path, why)
    }

    fn resolve(&self, path: &str) -> PathBuf {
        // `join` keeps an absolute `path` as it is.
        self.dir.join(path)
    }

    fn config(&self, raw: RawConfig) -> Result<Config> {
        let server = self.server(&raw.server)?;
        let admin = self.admin(&raw.admin)?;
        if admin.listen == server.listen && admin.listen.port() != 0 {
            return Err(self.err("admin.listen", "must differ from server.listen"));
        }
        let upstream = self.upstream(&raw.upstream)?;
        let pricing = self.pricing(&raw.pricing)?;
        let reservation = ReservationConfig {
            default_output_tokens: raw.reservation.default_output_tokens,
        };
        let store = self.store(&raw.store)?;

        let mut projects = Vec::with_capacity(raw.projects.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut tokens: FastMap<TokenHash, CredentialRef> = FastMap::default();
        for (index, raw_project) in raw.projects.iter().enumerate() {
            let key = format!("projects[{index}]");
            let (project, hashes) = self.project(&key, raw_project)?;
            if let Some(first) = names.insert(project.name.to_string(), index) {
                return Err(self.err(
                    format!("{key}.name"),
                    format!(
                        "duplicate project name `{}` (also projects[{first}].name)",
                        project.name
                    ),
                ));
            }
            for (credential, hash) in hashes.into_iter().enumerate() {
                let at = CredentialRef {
                    project: index,
                    credential,
                };
                if let Some(first) = tokens.insert(hash, at) {
                    return Err(self.err(
                        format!("{key}.credentials[{credential}].token_sha256"),
                        format!(
                            "the same token hash as projects[{}].credentials[{}].token_sha256",
                            first.project, first.credential
                        ),
                    ));
                }
            }
            projects.push(Arc::new(project));
        }

        Ok(Config {
            source: self.file.to_path_buf(),
            server,
            admin,
            upstream,
            pricing,
            reservation,
            store,
            projects,
            tokens,
        })
    }

    fn server(&self, raw: &RawServer) -> Result<ServerConfig> {
        let listen = self.socket_addr("server.listen", &raw.listen)?;
        self.at_least_one("server.max_body_bytes", raw.max_body_bytes)?;
        self.at_least_one("server.header_read_timeout_ms", raw.header_read_timeout_ms)?;
        self.at_least_one("server.body_read_timeout_ms", raw.body_read_timeout_ms)?;
        self.at_least_one(
            "server.keepalive_idle_timeout_ms",
            raw.keepalive_idle_timeout_ms,
        )?;
        self.at_least_one("server.max_connections", raw.max_connections as u64)?;
        self.at_least_one(
            "server.max_concurrent_streams",
            u64::from(raw.max_concurrent_streams),
        )?;
        let workers = match raw.workers {
            Some(workers) => {
                self.at_least_one("server.workers", workers)?;
                match usize::try_from(workers) {
                    Ok(workers) if workers <= MAX_WORKERS => workers,
                    _ => {
                        return Err(self.err(
                            "server.workers",
                            format!("{workers} threads: at most {MAX_WORKERS}"),
                        ))
                    }
                }
            }
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let tls = match (&raw.tls_cert, &raw.tls_key) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(self.err(
                    "server.tls_key",
                    "missing: tls_cert is set; set both tls_cert and tls_key, or neither",
                ))
            }
            (None, Some(_)) => {
                return Err(self.err(
                    "server.tls_cert",
                    "missing: tls_key is set; set both tls_cert and tls_key, or neither",
                ))
            }
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: self.readable_file("server.tls_cert", cert)?,
                key: self.readable_file("server.tls_key", key)?,
            }),
        };
        Ok(ServerConfig {
            listen,
            max_body_bytes: raw.max_body_bytes,
            tls,
            shutdown_grace: Duration::from_millis(raw.shutdown_grace_ms),
            header_read_timeout: Duration::from_millis(raw.header_read_timeout_ms),
            body_read_timeout: Duration::from_millis(raw.body_read_timeout_ms),
            keepalive_idle_timeout: Duration::from_millis(raw.keepalive_idle_timeout_ms),
            max_connections: raw.max_connections,
            max_concurrent_streams: raw.max_concurrent_streams,
            workers,
        })
    }

    fn admin(&self, raw: &RawAdmin) -> Result<AdminConfig> {
        let listen = self.socket_addr("admin.listen", &raw.listen)?;
        let token = match &raw.token_env {
            None => None,
            Some(var) => Some(Secret::new(self.env_secret("admin.token_env", var)?)),
        };
        Ok(AdminConfig { listen, token })
    }

    fn upstream(&self, raw: &RawUpstream) -> Result<UpstreamConfig> {
        let key = "upstream.base_url";
        let text = raw.base_url.as_str();
        if text.contains('#') {
            // `http::Uri` drops a fragment silently; refuse it so the URL means what it says.
            return Err(self.err(key, "must not have a fragment"));
        }
        let uri: http::Uri = text
            .parse()
            .map_err(|e| self.err(key, format!("invalid URL `{text}`: {e}")))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(self.err(key, "the scheme must be http or https")),
        }
        let Some(authority) = uri.authority() else {
            return Err(self.err(key, "missing host"));
        };
        if authority.as_str().contains('@') {
            return Err(self.err(key, "must not hold credentials"));
        }
        if authority.host().is_empty() {
            return Err(self.err(key, "missing host"));
        }
        if uri.query().is_some() {
            return Err(self.err(key, "must not have a query"));
        }
        let prefix = uri.path().trim_end_matches('/');
        let base_url = http::Uri::builder()
            .scheme(uri.scheme_str().unwrap_or("https"))
            .authority(authority.as_str())
            .path_and_query(prefix)
            .build()
            .map_err(|e| self.err(key, format!("invalid URL `{text}`: {e}")))?;
        self.at_least_one("upstream.connect_timeout_ms", raw.connect_timeout_ms)?;
        self.at_least_one("upstream.request_timeout_ms", raw.request_timeout_ms)?;
        self.at_least_one("upstream.idle_timeout_ms", raw.idle_timeout_ms)?;
        Ok(UpstreamConfig {
            base_url,
            connect_timeout: Duration::from_millis(raw.connect_timeout_ms),
            request_timeout: Duration::from_millis(raw.request_timeout_ms),
            idle_timeout: Duration::from_millis(raw.idle_timeout_ms),
        })
    }

    fn pricing(&self, raw: &RawPricing) -> Result<Pricing> {
        let fallback = price(&raw.fallback)
            .map_err(|(field, why)| self.err(format!("pricing.fallback.{field}"), why))?;
        let key = "pricing.file";
        let path = self.resolve(&raw.file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))?;
        let file: RawPricingFile = toml::from_str(&text).map_err(|e| {
            let (inner, why) = describe_toml_error(&text, &e);
            let at = path.display();
            if inner.is_empty() {
                self.err(key, format!("{at}: {why}"))
            } else {
                self.err(key, format!("{inner}: {why} in {at}"))
            }
        })?;
        let mut models = FastMap::with_capacity_and_hasher(file.models.len(), Default::default());
        for (name, raw_price) in &file.models {
            if name.is_empty() {
                return Err(self.err(key, "models.\"\": a model name must not be empty"));
            }
            let price = price(raw_price).map_err(|(field, why)| {
                self.err(key, format!("models.{}.{field}: {why}", quoted(name)))
            })?;
            models.insert(Arc::from(name.as_str()), price);
        }
        Ok(Pricing::new(models, fallback))
    }

    fn store(&self, raw: &RawStore) -> Result<StoreConfig> {
        if raw.path.is_empty() {
            return Err(self.err("store.path", "must not be empty"));
        }
        if raw.flush_interval_ms < MIN_FLUSH_INTERVAL_MS {
            return Err(self.err(
                "store.flush_interval_ms",
                format!("must be at least {MIN_FLUSH_INTERVAL_MS}"),
            ));
        }
        if let Some(url) = &raw.redis_url {
            let rest = url
                .strip_prefix("redis://")
                .or_else(|| url.strip_prefix("rediss://"));
            match rest {
                None => {
                    return Err(self.err("store.redis_url", "must start with redis:// or rediss://"))
                }
                Some("") => return Err(self.err("store.redis_url", "missing host")),
                Some(_) => {}
            }
        }
        let on_store_error = OnStoreError::parse(&raw.on_store_error).ok_or_else(|| {
            self.err(
                "store.on_store_error",
                format!("expected one of {}", OnStoreError::NAMES),
            )
        })?;
        Ok(StoreConfig {
            path: self.resolve(&raw.path),
            flush_interval: Duration::from_millis(raw.flush_interval_ms),
            redis_url: raw.redis_url.clone(),
            on_store_error,
        })
    }

    fn project(&self, key: &str, raw: &RawProject) -> Result<(Project, Vec<TokenHash>)> {
        let name = self.project_name(&format!("{key}.name"), raw.name.as_deref())?;
        let (api_key, authorization) = self.api_key(key, raw)?;
        let openai_project =
            self.header_value(&format!("{key}.openai_project"), &raw.openai_project)?;
        let openai_organization = self.header_value(
            &format!("{key}.openai_organization"),
            &raw.openai_organization,
        )?;
        let models = self.model_policy(key, raw)?;
        let budget = match &raw.budget {
            Some(budget) => Some(self.budget(&format!("{key}.budget"), budget)?),
            None => None,
        };

        let mut credentials = Vec::with_capacity(raw.credentials.len());
        let mut hashes = Vec::with_capacity(raw.credentials.len());
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (index, raw_credential) in raw.credentials.iter().enumerate() {
            let ckey = format!("{key}.credentials[{index}]");
            let (credential, hash) = self.credential(&ckey, raw_credential)?;
            if let Some(name) = raw_credential.name.as_deref() {
                if let Some(first) = names.insert(name, index) {
                    return Err(self.err(
                        format!("{ckey}.name"),
                        format!("duplicate credential name `{name}` (also {key}.credentials[{first}].name)"),
                    ));
                }
            }
            credentials.push(credential);
            hashes.push(hash);
        }

        let alert_at = match raw.budget.as_ref().and_then(|b| b.alert_at.as_ref()) {
            None => Vec::new(),
            Some(fractions) => self.alert_at(&format!("{key}.budget.alert_at"), fractions)?,
        };
        let alert_webhook = match &raw.alert_webhook {
            None => None,
            Some(url) => Some(self.webhook(&format!("{key}.alert_webhook"), url)?),
        };
        let mut rate_limits = Vec::with_capacity(raw.rate_limits.len());
        for (index, rule) in raw.rate_limits.iter().enumerate() {
            rate_limits.push(self.rate_limit(&format!("{key}.rate_limits[{index}]"), rule)?);
        }
        let project = Project {
            name_header: HeaderValue::from_str(&name)
                .map_err(|_| self.err(format!("{key}.name"), "not a valid header value"))?,
            name,
            api_key,
            authorization,
            openai_project,
            openai_organization,
            models,
            budget,
            archived: raw.archived,
            credentials,
            rate_limits,
            alert_at,
            alert_webhook,
        };
        Ok((project, hashes))
    }

    fn project_name(&self, key: &str, name: Option<&str>) -> Result<Arc<str>> {
        let Some(name) = name else {
            return Err(self.err(key, "missing"));
        };
        if name.is_empty() {
            return Err(self.err(key, "must not be empty"));
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if !name.chars().all(valid) {
            return Err(self.err(
                key,
                format!("`{name}` must match [A-Za-z0-9._-]+ (a project name is a metric label)"),
            ));
        }
        Ok(Arc::from(name))
    }

    /// The project's key, and the `Authorization` header that carries it upstream.
    fn api_key(&self, key: &str, raw: &RawProject) -> Result<(Secret, HeaderValue)> {
        let (field, value) = match (&raw.api_key_env, &raw.api_key_file) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    key,
                    "set only one of api_key_env and api_key_file, not both",
                ))
            }
            (None, None) => {
                return Err(self.err(key, "set one of api_key_env and api_key_file"));
            }
            (Some(var), None) => {
                let field = format!("{key}.api_key_env");
                let value = self.env_secret(&field, var)?;
                (field, value)
            }
            (None, Some(file)) => {
                let field = format!("{key}.api_key_file");
                let path = self.resolve(file);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    self.err(&field, format!("cannot read {}: {e}", path.display()))
                })?;
                let value = text.trim();
                if value.is_empty() {
                    return Err(self.err(&field, format!("{} is empty", path.display())));
                }
                (field, value.to_owned())
            }
        };
        // The key travels as `Authorization: Bearer <key>`: refuse now what could not be sent.
        let Ok(mut authorization) = HeaderValue::from_str(&format!("Bearer {value}")) else {
            return Err(self.err(field, "the key is not a valid header value"));
        };
        // Keeps the key out of HPACK tables and out of any header dump.
        authorization.set_sensitive(true);
        Ok((Secret::new(value), authorization))
    }

    /// The trimmed value of the environment variable `var`, which must be set and non-empty.
    fn env_secret(&self, key: &str, var: &str) -> Result<String> {
        if var.is_empty() {
            return Err(self.err(key, "must name an environment variable"));
        }
        let Some(value) = (self.env)(var) else {
            return Err(self.err(key, format!("environment variable `{var}` is not set")));
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(self.err(key, format!("environment variable `{var}` is empty")));
        }
        Ok(value.to_owned())
    }

    fn header_value(&self, key: &str, value: &Option<String>) -> Result<Option<HeaderValue>> {
        let Some(value) = value else {
            return Ok(None);
        };
        if value.is_empty() {
            return Err(self.err(key, "must not be empty"));
        }
        HeaderValue::from_str(value)
            .map(Some)
            .map_err(|_| self.err(key, "not a valid header value"))
    }

    fn model_policy(&self, key: &str, raw: &RawProject) -> Result<ModelPolicy> {
        let (allowed, allowed_patterns, exact_allowed) = match &raw.allowed_models {
            None => (None, None, Vec::new()),
            Some(patterns) => {
                let (set, patterns) = self.globs(&format!("{key}.allowed_models"), patterns)?;
                let mut exact: Vec<Arc<str>> = Vec::new();
                for pattern in patterns.iter().filter(|p| !p.contains('*')) {
                    if !exact.contains(pattern) {
                        exact.push(pattern.clone());
                    }
                }
                (Some(set), Some(patterns), exact)
            }
        };
        let (denied, denied_patterns) =
            self.globs(&format!("{key}.denied_models"), &raw.denied_models)?;
        Ok(ModelPolicy {
            allowed,
            denied,
            exact_allowed,
            allowed_patterns,
            denied_patterns,
        })
    }

    /// Compiles model patterns where `*` is the only wildcard and matches any run of
    /// characters, `/` included.
    fn globs(&self, key: &str, patterns: &[String]) -> Result<(ModelPatterns, Vec<Arc<str>>)> {
        for (index, pattern) in patterns.iter().enumerate() {
            let at = format!("{key}[{index}]");
            if pattern.is_empty() {
                return Err(self.err(at, "must not be empty"));
            }
            // globset also knows `?`, `[...]`, `{a,b}` and `\` escapes; refusing them keeps
            // a model name with such a character from being read as a pattern by surprise.
            if let Some(c) = pattern.chars().find(|c| "?[]{}\\".contains(*c)) {
                return Err(self.err(
                    at,
                    format!("invalid pattern `{pattern}`: `{c}` is not allowed, `*` is the only wildcard"),
                ));
            }
        }
        let set = ModelPatterns::new(patterns.iter().map(String::as_str));
        let patterns = patterns.iter().map(|p| Arc::from(p.as_str())).collect();
        Ok((set, patterns))
    }

    fn alert_at(&self, key: &str, fractions: &[f64]) -> Result<Vec<f64>> {
        let mut out: Vec<f64> = Vec::with_capacity(fractions.len());
        for (index, &fraction) in fractions.iter().enumerate() {
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err(self.err(
                    format!("{key}[{index}]"),
                    "must be a fraction of the budget, above 0 and at most 1",
                ));
            }
            if out.last().is_some_and(|&last| fraction <= last) {
                return Err(self.err(format!("{key}[{index}]"), "must be ascending"));
            }
            out.push(fraction);
        }
        if out.len() > 16 {
            return Err(self.err(key, "at most 16 thresholds"));
        }
        Ok(out)
    }

    fn webhook(&self, key: &str, url: &str) -> Result<http::Uri> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| self.err(key, format!("`{url}` is not a URL")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") if uri.authority().is_some() => Ok(uri),
            _ => Err(self.err(key, format!("`{url}` must be an http or https URL"))),
        }
    }

    fn rate_limit(&self, key: &str, raw: &RawRateLimit) -> Result<RateLimitRule> {
        let Some(pattern) = raw.model.as_deref() else {
            return Err(self.err(format!("{key}.model"), "missing"));
        };
        let (matcher, _) = self.globs(&format!("{key}.model"), &[pattern.to_owned()])?;
        for (name, value) in [("rpm", raw.rpm), ("tpm", raw.tpm), ("rpd", raw.rpd)] {
            if value == Some(0) {
                return Err(self.err(format!("{key}.{name}"), "must be at least 1"));
            }
        }
        if raw.rpm.is_none() && raw.tpm.is_none() && raw.rpd.is_none() {
            return Err(self.err(key, "set at least one of rpm, tpm and rpd"));
        }
        let fmt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        Ok(RateLimitRule {
            key: Arc::from(format!(
                "{pattern} rpm={} tpm={} rpd={}",
                fmt(raw.rpm),
                fmt(raw.tpm),
                fmt(raw.rpd)
            )),
            matcher,
            rpm: raw.rpm,
            tpm: raw.tpm,
            rpd: raw.rpd,
        })
    }

    fn budget(&self, key: &str, raw: &RawBudget) -> Result<BudgetLimit> {
        let period = match raw.period.as_deref() {
            None => {
                return Err(self.err(
                    format!("{key}.period"),
                    format!("missing: expected one of {}", Period::NAMES),
                ))
            }
            Some(name) => Period::parse(name).ok_or_else(|| {
                self.err(
                    format!("{key}.period"),
                    format!("expected one of {}", Period::NAMES),
                )
            })?,
        };
        let micro_usd = match raw.usd {
            None => None,
            Some(usd) => {
                Some(usd_to_micro(usd).map_err(|why| self.err(format!("{key}.usd"), why))?)
            }
        };
        if raw.tokens.is_none() && micro_usd.is_none() {
            return Err(self.err(key, "set at least one of tokens and usd"));
        }
        Ok(BudgetLimit {
            tokens: raw.tokens,
            micro_usd,
            period,
        })
    }

    fn credential(&self, key: &str, raw: &RawCredential) -> Result<(Credential, TokenHash)> {
        let name = match raw.name.as_deref() {
            None => return Err(self.err(format!("{key}.name"), "missing")),
            Some("") => return Err(self.err(format!("{key}.name"), "must not be empty")),
            Some(name) => Arc::from(name),
        };
        let hash_key = format!("{key}.token_sha256");
        let Some(hex_hash) = raw.token_sha256.as_deref() else {
            return Err(self.err(hash_key, "missing"));
        };
        let mut hash: TokenHash = [0; 32];
        if hex_hash.len() != 64 || hex::decode_to_slice(hex_hash, &mut hash).is_err() {
            return Err(self.err(
                hash_key,
                "must be 64 hex characters (the SHA-256 of the token)",
            ));
        }
        let expires_at = match &raw.expires_at {
            None => None,
            Some(instant) => Some(self.instant(&format!("{key}.expires_at"), instant)?),
        };
        let budget = match &raw.budget {
            None => None,
            Some(budget) => {
                let bkey = format!("{key}.budget");
                if budget.alert_at.is_some() {
                    return Err(self.err(
                        format!("{bkey}.alert_at"),
                        "alerts are set on the project's budget only",
                    ));
                }
                Some(self.budget(&bkey, budget)?)
            }
        };
        let allowed_models = match &raw.allowed_models {
            None => None,
            Some(patterns) => Some(self.globs(&format!("{key}.allowed_models"), patterns)?.0),
        };
        let credential = Credential {
            name,
            expires_at,
            disabled: raw.disabled,
            budget,
            allowed_models,
        };
        Ok((credential, hash))
    }

    fn instant(&self, key: &str, raw: &RawInstant) -> Result<DateTime<Utc>> {
        let text = match raw {
            RawInstant::Text(text) => text.clone(),
            RawInstant::Toml(datetime) => datetime.to_string(),
        };
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                self.err(
                    key,
                    format!("`{text}` is not an RFC 3339 date-time with an offset, such as 2027-01-01T00:00:00Z"),
                )
            })
    }

    fn socket_addr(&self, key: &str, text: &str) -> Result<SocketAddr> {
        text.parse().map_err(|_| {
            self.err(
                key,
                format!("`{text}` is not an IP address and port such as 127.0.0.1:8080"),
            )
        })
    }

    fn at_least_one(&self, key: &str, value: u64) -> Result<()> {
        if value == 0 {
            return Err(self.err(key, "must be at least 1"));
        }
        Ok(())
    }

    /// Resolves `path` and checks that it can be opened now, so a typo fails the load rather
    /// than the first TLS handshake.
    fn readable_file(&self, key: &str, path: &str) -> Result<PathBuf> {
        let resolved = self.resolve(path);
        std::fs::File::open(&resolved)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", resolved.display())))?;
        Ok(resolved)
    }
}

/// The shortest `store.flush_interval_ms`: below it the writer would spin on tiny batches.
const MIN_FLUSH_INTERVAL_MS: u64 = 10;

/// More proxy threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

/// A price in micro-dollars per 1M tokens; on error, the field at fault and why.
fn price(raw: &RawPrice) -> Result<Price, (&'static str, String)> {
    let field = |name: &'static str, value: Option<f64>| match value {
        None => Err((name, "missing".to_owned())),
        Some(usd) => usd_to_micro(usd).map_err(|why| (name, why)),
    };
    let input = field("input", raw.input)?;
    let cached_input = match raw.cached_input {
        None => input,
        Some(_) => field("cached_input", raw.cached_input)?,
    };
    let output = field("output", raw.output)?;
    Ok(Price {
        input,
        cached_input,
        output,
    })
}

/// Dollars to micro-dollars, rounded to the nearest: `0.15` -> `150_000`.
fn usd_to_micro(usd: f64) -> Result<u64, String> {
    if !usd.is_finite() || usd < 0.0 {
        return Err("must be a non-negative number".to_owned());
    }
    let micro = (usd * 1e6).round();
    // 2^64 is exactly representable; anything at or above it would saturate in the cast.
    if micro >= 18_446_744_073_709_551_616.0 {
        return Err("is too large".to_owned());
    }
    Ok(micro as u64)
}

/// A key as it appears in a key path: bare when it is `[A-Za-z0-9_]+`, quoted otherwise, so
/// `models."gpt-4o".input` reads as three keys.
fn quoted(key: &str) -> String {
    let bare = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// Naming the key a toml error points at.
//
// toml reports a byte span (the key, for an unknown field; the value, for a wrong type) but
// not the key path. When the document is valid TOML, it is read once more into a tree of its
// keys with their spans, and the error is matched against them. A syntax error has no tree:
// its path is the last table header before it, read from the text.

/// `(key_path, why)` for a toml error in `text`; `why` ends with the line and column.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> (String, String) {
    let message = error.message().trim().replace('\n', "; ");
    let Some(span) = error.span() else {
        return (String::new(), message);
    };
    let (line, column) = line_column(text, span.start);
    let key_path = match toml::from_str::<KeyTree>(text) {
        Ok(tree) => tree.path_at(&span),
        // Valid TOML whose keys could not be read with their spans: fall back to the header.
        Err(_) if toml::from_str::<toml::Table>(text).is_ok() => {
            header_path_before(text, span.start)
        }
        Err(_) => {
            let path = header_path_before(text, span.start);
            let why = format!("invalid TOML: {message} (line {line}, column {column})");
            return (path, why);
        }
    };
    (
        key_path,
        format!("{message} (line {line}, column {column})"),
    )
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Every key of a document, with its span and key path, in document order.
struct KeyTree {
    keys: Vec<(Range<usize>, String)>,
}

impl KeyTree {
    /// The key at `span` (an unknown field), else the nearest key before it (the key whose
    /// value is at fault), else the top level.
    fn path_at(&self, span: &Range<usize>) -> String {
        if let Some((_, path)) = self.keys.iter().find(|(key, _)| key.start == span.start) {
            return path.clone();
        }
        self.keys
            .iter()
            .filter(|(key, _)| key.start <= span.start)
            .max_by_key(|(key, _)| key.start)
            .map(|(_, path)| path.clone())
            .unwrap_or_default()
    }
}

impl<'de> Deserialize<'de> for KeyTree {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let root = Node::deserialize(deserializer)?;
        let mut keys = Vec::new();
        root.flatten("", &mut keys);
        keys.sort_by_key(|(span, _)| span.start);
        Ok(KeyTree { keys })
    }
}

enum Node {
    Table(Vec<(Spanned<String>, Node)>),
    Array(Vec<Node>),
    Leaf,
}

impl Node {
    fn flatten(self, prefix: &str, out: &mut Vec<(Range<usize>, String)>) {
        match self {
            Node::Leaf => {}
            Node::Array(items) => {
                for (index, item) in items.into_iter().enumerate() {
                    item.flatten(&format!("{prefix}[{index}]"), out);
                }
            }
            Node::Table(entries) => {
                for (key, value) in entries {
                    let span = key.span();
                    let name = quoted(key.get_ref());
                    let path = if prefix.is_empty() {
                        name
                    } else {
                        format!("{prefix}.{name}")
                    };
                    value.flatten(&path, out);
                    out.push((span, path));
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        loop {
            // A date-time also arrives as a map, whose one key has no span: it is a leaf.
            let key = match map.next_key::<Spanned<String>>() {
                Ok(Some(key)) => key,
                Ok(None) => break,
                Err(_) if entries.is_empty() => return Ok(Node::Leaf),
                Err(e) => return Err(e),
            };
            let value = map.next_value::<Node>()?;
            entries.push((key, value));
        }
        Ok(Node::Table(entries))
    }
}

/// The key path of the last table header (`[a.b]`, `[[a]]`) that starts before `offset`, with
/// array-of-tables indices counted; best effort, for text that is not valid TOML.
fn header_path_before(text: &str, offset: usize) -> String {
    let before = text.get(..offset).unwrap_or(text);
    // Array-of-tables path (with indices of its parents) -> entries seen so far.
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut current = String::new();
    for line in before.lines() {
        let line = line.trim();
        let (inner, is_array) = if let Some(rest) = line.strip_prefix("[[") {
            match rest.find("]]") {
                Some(end) => (&rest[..end], true),
                None => continue,
            }
        } else if let Some(rest) = line.strip_prefix('[') {
            match rest.find(']') {
                Some(end) => (&rest[..end], false),
                None => continue,
            }
        } else {
            continue;
        };
        let segments: Vec<String> = inner
            .split('.')
            .map(|s| quoted(s.trim().trim_matches(|c| c == '"' || c == '\'')))
            .collect();
        let mut path = String::new();
        for (index, segment) in segments.iter().enumerate() {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(segment);
            let last = index + 1 == segments.len();
            if last && is_array {
                let count = counts.entry(path.clone()).or_insert(0);
                path = format!("{path}[{count}]");
                *count += 1;
            } else if let Some(count) = counts.get(&path) {
                path = format!("{path}[{}]", count.saturating_sub(1));
            }
        }
        current = path;
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{summary, summary_at};

    const HASH_A: &str = "62595c0386c5905f2b03c2a417ca0c364355c9b2eb2ed7227ecf635520b25038";
    const HASH_B: &str = "e3f9d6cff08a71c272ae8c236af86c44e6b9441883c316f29b69f7724ed7876c";

    const PRICING: &str = r#"
[models."gpt-4o-mini"]
input = 0.15
cached_input = 0.075
output = 0.60

[models."text-embedding-3-small"]
input = 0.02
output = 0
"#;

    /// One project with one credential: the smallest valid file.
    fn minimal() -> String {
        format!(
            r#"
[[projects]]
name = "a"
api_key_env = "KEY_A"

[[projects.credentials]]
name = "c"
token_sha256 = "{HASH_A}"
"#
        )
    }

    fn fake_env(name: &str) -> Option<String> {
        match name {
            "KEY_A" => Some("sk-a".to_owned()),
            "KEY_B" => Some("sk-b\n".to_owned()),
            "EMPTY" => Some("  ".to_owned()),
            "ADMIN" => Some("admin-token".to_owned()),
            _ => None,
        }
    }

    /// A directory holding `pricing.toml` (and whatever a test adds), the config's home.
    fn dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pricing.toml"), PRICING).unwrap();
        dir
    }

    fn load_in(dir: &tempfile::TempDir, text: &str) -> Result<Config> {
        load_str(text, &dir.path().join("tollgate.toml"), &fake_env)
    }

    fn ok(text: &str) -> Config {
        let dir = dir();
        match load_in(&dir, text) {
            Ok(config) => config,
            Err(e) => panic!("expected a valid config, got: {e}"),
        }
    }

    fn err(text: &str) -> ConfigError {
        err_in(&dir(), text)
    }

    fn err_in(dir: &tempfile::TempDir, text: &str) -> ConfigError {
        match load_in(dir, text) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    /// The directory relative paths of `config` resolve against.
    fn dir_of(config: &Config) -> PathBuf {
        config.source.parent().unwrap().to_path_buf()
    }

    #[track_caller]
    fn assert_err(e: &ConfigError, key_path: &str, why_contains: &str) {
        assert_eq!(e.key_path(), key_path, "key path of: {e}");
        assert!(
            e.why().contains(why_contains),
            "`{e}` lacks `{why_contains}`"
        );
        assert!(
            e.to_string().ends_with(&format!("{key_path}: {}", e.why())),
            "display of: {e}"
        );
    }

    // --- valid files

    #[test]
    fn defaults_fill_every_section() {
        let config = ok(&minimal());
        assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.server.max_body_bytes, 32 * 1024 * 1024);
        assert!(config.server.tls.is_none());
        assert_eq!(config.server.shutdown_grace, Duration::from_millis(10_000));
        assert_eq!(
            config.server.header_read_timeout,
            Duration::from_millis(10_000)
        );
        assert_eq!(
            config.server.keepalive_idle_timeout,
            Duration::from_millis(75_000)
        );
        assert_eq!(config.server.max_connections, 10_000);
        assert_eq!(config.server.max_concurrent_streams, 256);
        assert_eq!(config.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert!(config.admin.token.is_none());
        // A bare host keeps the path `/`: `http::Uri` cannot hold an empty one.
        assert_eq!(
            config.upstream.base_url.to_string(),
            "https://api.openai.com/"
        );
        assert_eq!(config.upstream.base_url.path(), "/");
        assert_eq!(
            config.upstream.connect_timeout,
            Duration::from_millis(5_000)
        );
        assert_eq!(
            config.upstream.request_timeout,
            Duration::from_millis(600_000)
        );
        assert_eq!(config.upstream.idle_timeout, Duration::from_millis(120_000));
        assert_eq!(
            config.pricing.fallback,
            Price {
                input: 10_000_000,
                cached_input: 10_000_000,
                output: 30_000_000
            }
        );
        assert_eq!(config.pricing.len(), 2);
        assert_eq!(config.reservation.default_output_tokens, 4096);
        assert_eq!(config.store.path, dir_of(&config).join("data/tollgate.db"));
        assert_eq!(config.store.flush_interval, Duration::from_millis(200));
        assert_eq!(config.store.redis_url, None);
        assert_eq!(config.store.on_store_error, OnStoreError::Open);

        let project = &config.projects[0];
        assert_eq!(&*project.name, "a");
        assert_eq!(project.api_key.expose(), "sk-a");
        assert!(project.openai_project.is_none() && project.openai_organization.is_none());
        assert!(project.models.allowed.is_none());
        assert!(project.models.allows("anything"));
        assert!(project.budget.is_none());
        assert!(!project.archived);
        assert_eq!(&*project.credentials[0].name, "c");
        assert!(project.credentials[0].expires_at.is_none());
        assert!(!project.credentials[0].disabled);
    }

    #[test]
    fn load_reads_the_file_and_resolves_paths_beside_it() {
        let dir = dir();
        std::fs::write(dir.path().join("key.txt"), "sk-file\n").unwrap();
        let text = minimal().replace("api_key_env = \"KEY_A\"", "api_key_file = \"key.txt\"");
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, text).unwrap();
        let config = load(&path).unwrap();
        assert_eq!(config.source, path);
        assert_eq!(config.projects[0].api_key.expose(), "sk-file");

        let missing = dir.path().join("none.toml");
        let e = load(&missing).unwrap_err();
        assert_err(&e, "", "cannot read the file: ");
        assert_eq!(e.file(), missing);
        assert!(e
            .to_string()
            .starts_with(&format!("{}: cannot read", missing.display())));
    }

    #[test]
    fn an_empty_file_is_valid_and_serves_nobody() {
        let config = ok("");
        assert!(config.projects.is_empty());
        assert!(config.tokens.is_empty());
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let env = |name: &str| match name {
            "OPENAI_KEY_SEARCH" => Some("sk-search".to_owned()),
            "OPENAI_KEY_BATCH" => Some("sk-batch".to_owned()),
            "TOLLGATE_ADMIN_TOKEN" => Some("admin".to_owned()),
            _ => None,
        };
        let config = match load_str(&text, &path, &env) {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            config.admin.token.as_ref().map(Secret::expose),
            Some("admin")
        );
        assert!(config.pricing.len() >= 22);
        assert_eq!(
            config.pricing.resolve("gpt-4o-mini-2024-07-18").price,
            Price {
                input: 150_000,
                cached_input: 75_000,
                output: 600_000
            }
        );

        let names: Vec<&str> = config.projects.iter().map(|p| &*p.name).collect();
        assert_eq!(names, ["search", "batch"]);
        let search = &config.projects[0];
        assert_eq!(search.api_key.expose(), "sk-search");
        assert!(search.models.allows("gpt-4.1-mini"));
        assert!(!search.models.allows("gpt-4o"));
        let budget = search.budget.unwrap();
        assert_eq!(budget.micro_usd, Some(25_000_000));
        assert_eq!(budget.period, Period::Monthly);
        assert!(budget.tokens.is_some());
        assert_eq!(search.credentials.len(), 2);
        let batch = &config.projects[1];
        assert!(!batch.models.allows("o1-mini") && batch.models.allows("gpt-4o"));
        assert_eq!(batch.budget.unwrap().period, Period::Daily);
        assert_eq!(batch.budget.unwrap().tokens, None);

        // The documented demo tokens are the ones the file accepts.
        for (token, project, credential) in [
            ("tg-demo-search-0000000000000000000000", 0, 0),
            ("tg-demo-search-ci-0000000000000000000", 0, 1),
            ("tg-demo-batch-00000000000000000000000", 1, 0),
        ] {
            use sha2::Digest;
            let hash: TokenHash = sha2::Sha256::digest(token.as_bytes()).into();
            assert_eq!(
                config.tokens.get(&hash),
                Some(&CredentialRef {
                    project,
                    credential
                }),
                "{token}"
            );
        }
        assert_eq!(config.tokens.len(), 3);
        assert_eq!(config.store.path, path.with_file_name("data/tollgate.db"));
        assert_eq!(config.store.flush_interval, Duration::from_millis(200));
        assert_eq!(config.store.redis_url, None);
        assert_eq!(config.store.on_store_error, OnStoreError::Open);
    }

    #[test]
    fn every_key_is_read() {
        let dir = dir();
        std::fs::write(dir.path().join("cert.pem"), "cert").unwrap();
        std::fs::write(dir.path().join("key.pem"), "key").unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        std::fs::write(dir.path().join("keys/b.txt"), "  sk-b-file\n").unwrap();
        let text = format!(
            r#"
[server]
listen = "0.0.0.0:8443"
max_body_bytes = 1024
tls_cert = "cert.pem"
tls_key = "key.pem"
shutdown_grace_ms = 0
header_read_timeout_ms = 1
keepalive_idle_timeout_ms = 2
max_connections = 3
max_concurrent_streams = 4
workers = 5

[admin]
listen = "[::1]:9999"
token_env = "ADMIN"

[upstream]
base_url = "http://localhost:1234/openai/v1/"
connect_timeout_ms = 5
request_timeout_ms = 6
idle_timeout_ms = 7

[pricing]
file = "pricing.toml"
fallback = {{ input = 1.0, output = 2.5 }}

[reservation]
default_output_tokens = 8

[store]
path = "/var/lib/tollgate/usage.db"
flush_interval_ms = 10
redis_url = "rediss://:pw@cache.internal:6380/2"
on_store_error = "closed"

[[projects]]
name = "Search_v2.prod-1"
api_key_file = "keys/b.txt"
openai_project = "proj_abc"
openai_organization = "org-abc"
allowed_models = ["gpt-4o-mini", "gpt-4.1*", "gpt-4o-mini", "*-embedding-*"]
denied_models = ["gpt-4.1-nano*"]
budget = {{ tokens = 1000, usd = 0.1234565, period = "total" }}
archived = true

[[projects.credentials]]
name = "one"
token_sha256 = "{}"
expires_at = 2027-01-01T00:00:00+01:00
disabled = true

[[projects.credentials]]
name = "two"
token_sha256 = "{HASH_B}"
expires_at = "2027-01-01T00:00:00Z"
"#,
            HASH_A.to_uppercase()
        );
        let config = match load_in(&dir, &text) {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        };
        let server = &config.server;
        assert_eq!(server.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(server.max_body_bytes, 1024);
        let tls = server.tls.as_ref().unwrap();
        assert_eq!(tls.cert, dir.path().join("cert.pem"));
        assert_eq!(tls.key, dir.path().join("key.pem"));
        assert_eq!(server.shutdown_grace, Duration::ZERO);
        assert_eq!(server.header_read_timeout, Duration::from_millis(1));
        assert_eq!(server.keepalive_idle_timeout, Duration::from_millis(2));
        assert_eq!(server.max_connections, 3);
        assert_eq!(server.max_concurrent_streams, 4);
        assert_eq!(server.workers, 5);
        assert_eq!(config.admin.listen, "[::1]:9999".parse().unwrap());
        assert_eq!(config.admin.token.as_ref().unwrap().expose(), "admin-token");
        let upstream = &config.upstream;
        assert_eq!(
            upstream.base_url.to_string(),
            "http://localhost:1234/openai/v1"
        );
        assert_eq!(upstream.connect_timeout, Duration::from_millis(5));
        assert_eq!(upstream.request_timeout, Duration::from_millis(6));
        assert_eq!(upstream.idle_timeout, Duration::from_millis(7));
        assert_eq!(
            config.pricing.fallback,
            Price {
                input: 1_000_000,
                cached_input: 1_000_000,
                output: 2_500_000
            }
        );
        assert_eq!(
            config.pricing.resolve("text-embedding-3-small").price,
            Price {
                input: 20_000,
                cached_input: 20_000,
                output: 0
            }
        );
        assert_eq!(config.reservation.default_output_tokens, 8);
        let store = &config.store;
        assert_eq!(store.path, Path::new("/var/lib/tollgate/usage.db"));
        assert_eq!(store.flush_interval, Duration::from_millis(10));
        assert_eq!(
            store.redis_url.as_deref(),
            Some("rediss://:pw@cache.internal:6380/2")
        );
        assert_eq!(store.on_store_error, OnStoreError::Closed);

        let project = &config.projects[0];
        assert_eq!(&*project.name, "Search_v2.prod-1");
        assert_eq!(project.api_key.expose(), "sk-b-file");
        assert_eq!(project.openai_project.as_ref().unwrap(), "proj_abc");
        assert_eq!(project.openai_organization.as_ref().unwrap(), "org-abc");
        let models = &project.models;
        let exact: Vec<&str> = models.exact_allowed.iter().map(|m| &**m).collect();
        assert_eq!(exact, ["gpt-4o-mini"]);
        assert!(models.allows("gpt-4o-mini"));
        assert!(models.allows("gpt-4.1-mini-2025-04-14"));
        assert!(models.allows("text-embedding-3-small"));
        assert!(!models.allows("gpt-4.1-nano"));
        assert!(!models.allows("gpt-4o"));
        assert!(!models.allows("GPT-4o-mini"));
        assert_eq!(models.allowed_patterns.as_ref().unwrap().len(), 4);
        assert_eq!(models.denied_patterns.len(), 1);
        assert_eq!(
            project.budget,
            Some(BudgetLimit {
                tokens: Some(1000),
                micro_usd: Some(123_457),
                period: Period::Total
            })
        );
        assert!(project.archived);
        let one = &project.credentials[0];
        assert!(one.disabled);
        assert_eq!(
            one.expires_at,
            Some("2026-12-31T23:00:00Z".parse::<DateTime<Utc>>().unwrap())
        );
        assert_eq!(
            project.credentials[1].expires_at,
            Some("2027-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap())
        );
        let mut hash_a: TokenHash = [0; 32];
        hex::decode_to_slice(HASH_A, &mut hash_a).unwrap();
        assert_eq!(
            config.tokens.get(&hash_a),
            Some(&CredentialRef {
                project: 0,
                credential: 0
            })
        );
        assert_eq!(config.tokens.len(), 2);
    }

    #[test]
    fn env_keys_are_trimmed() {
        let config = ok(&minimal().replace("KEY_A", "KEY_B"));
        assert_eq!(config.projects[0].api_key.expose(), "sk-b");
    }

    #[test]
    fn secrets_stay_out_of_debug_and_summary() {
        let text = format!(
            "[admin]\ntoken_env = \"ADMIN\"\n[store]\nredis_url = \"redis://u:redis-pw@cache\"\n{}",
            minimal()
        );
        let config = ok(&text);
        let printed = format!("{config:?}\n{}", summary(&config));
        for secret in ["sk-a", "admin-token", HASH_A, "redis-pw"] {
            assert!(!printed.contains(secret), "{secret} leaked");
        }
        assert!(printed.contains("[redacted]"));
    }

    #[test]
    fn summary_lists_projects_and_counts_credentials() {
        let text = format!(
            r#"
[[projects]]
name = "search"
api_key_env = "KEY_A"
allowed_models = ["gpt-4o-mini", "gpt-4.1*"]
budget = {{ tokens = 1000000, usd = 25.5, period = "monthly" }}

[[projects.credentials]]
name = "old"
token_sha256 = "{HASH_A}"
expires_at = "2026-01-01T00:00:00Z"

[[projects.credentials]]
name = "off"
token_sha256 = "{HASH_B}"
disabled = true

[[projects]]
name = "batch"
api_key_env = "KEY_B"
denied_models = ["o1*"]
archived = true
"#
        );
        let config = ok(&text);
        let now = "2026-06-01T00:00:00Z".parse().unwrap();
        let text = summary_at(&config, now);
        let store_line = format!(
            "store: {}, written every 200 ms, on store error: open (keep serving)",
            dir_of(&config).join("data/tollgate.db").display()
        );
        let server_line = format!(
            "server: 127.0.0.1:8080 (http), {} worker threads, max body 33554432 bytes, max 10000 connections",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        let expected = [
            server_line.as_str(),
            "admin: 127.0.0.1:9090, admin token not set (/admin/* answers 403)",
            "upstream: https://api.openai.com/",
            "pricing: 2 models; unpriced models charged $10.00 input, $10.00 cached input, $30.00 output per 1M tokens",
            "reservation: 4096 output tokens when a request sets no limit",
            store_line.as_str(),
            "projects: 2",
            "  search: active, 2 credentials (1 expired, 1 disabled)",
            "    allowed models: gpt-4o-mini, gpt-4.1*",
            "    denied models: none",
            "    budget: 1000000 tokens, $25.50, monthly",
            "  batch: archived, 0 credentials (0 expired, 0 disabled)",
            "    allowed models: all not denied",
            "    denied models: o1*",
            "    budget: unlimited",
        ];
        for line in expected {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
    }

    // --- TOML errors

    #[test]
    fn syntax_error_names_the_line_and_the_table() {
        let text = format!(
            "{}\n[[projects]]\nname = \"b\"\napi_key_env = \n",
            minimal()
        );
        let e = err(&text);
        assert_err(&e, "projects[1]", "invalid TOML");
        assert!(e.why().contains("(line 12, column 15)"), "{e}");
        let e = err("listen = = 1\n");
        assert_err(&e, "", "invalid TOML");
        assert!(e.why().contains("line 1, column"), "{e}");
        assert!(e.to_string().contains("tollgate.toml: invalid TOML"), "{e}");
    }

    #[test]
    fn unknown_key_at_top_level() {
        let e = err(&format!("colour = \"red\"\n{}", minimal()));
        assert_err(&e, "colour", "unknown field `colour`");
        assert!(e.why().contains("(line 1, column 1)"), "{e}");
        let e = err("[serverr]\nlisten = \"127.0.0.1:1\"\n");
        assert_err(&e, "serverr", "unknown field `serverr`");
    }

    #[test]
    fn unknown_key_in_a_section() {
        let e = err("[server]\nlisten = \"127.0.0.1:1\"\nport = 1\n");
        assert_err(&e, "server.port", "unknown field `port`");
        assert!(e.why().contains("(line 3, column 1)"), "{e}");
    }

    #[test]
    fn unknown_key_in_a_project() {
        let text = format!("{}\n[[projects]]\nname = \"b\"\nbudjet = 1\n", minimal());
        let e = err(&text);
        assert_err(&e, "projects[1].budjet", "unknown field `budjet`");
    }

    #[test]
    fn unknown_key_in_a_credential() {
        let text = format!("{}expires = \"2027-01-01T00:00:00Z\"\n", minimal());
        let e = err(&text);
        assert_err(
            &e,
            "projects[0].credentials[0].expires",
            "unknown field `expires`",
        );
    }

    #[test]
    fn unknown_key_in_a_budget() {
        let text = minimal().replace(
            "api_key_env = \"KEY_A\"",
            "api_key_env = \"KEY_A\"\nbudget = { usd = 1.0, period = \"daily\", tokenz = 5 }",
        );
        let e = err(&text);
        assert_err(&e, "projects[0].budget.tokenz", "unknown field `tokenz`");
        let text = format!(
            "{}\n[[projects]]\nname = \"b\"\n[projects.budget]\nperiod = \"daily\"\ndollars = 1\n",
            minimal()
        );
        let e = err(&text);
        assert_err(&e, "projects[1].budget.dollars", "unknown field `dollars`");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = err("[server]\nmax_body_bytes = \"big\"\n");
        assert_err(&e, "server.max_body_bytes", "invalid type: string \"big\"");
        let text = minimal().replace(
            "name = \"a\"",
            "name = \"a\"\nbudget = { tokens = -1, period = \"daily\" }",
        );
        let e = err(&text);
        assert_err(&e, "projects[0].budget.tokens", "-1");
        let text = format!("{}expires_at = 5\n", minimal());
        let e = err(&text);
        assert_err(&e, "projects[0].credentials[0].expires_at", "RFC 3339");
    }

    // --- projects

    #[test]
    fn duplicate_project_name() {
        let text = format!(
            "{}\n[[projects]]\nname = \"a\"\napi_key_env = \"KEY_B\"\n",
            minimal()
        );
        let e = err(&text);
        assert_err(
            &e,
            "projects[1].name",
            "duplicate project name `a` (also projects[0].name)",
        );
    }

    #[test]
    fn missing_or_invalid_project_name() {
        let e = err("[[projects]]\napi_key_env = \"KEY_A\"\n");
        assert_err(&e, "projects[0].name", "missing");
        let e = err(&minimal().replace("name = \"a\"", "name = \"\""));
        assert_err(&e, "projects[0].name", "must not be empty");
        for bad in ["my project", "a/b", "prøject", "a\\\"b"] {
            let e = err(&minimal().replace("name = \"a\"", &format!("name = \"{bad}\"")));
            assert_err(&e, "projects[0].name", "must match [A-Za-z0-9._-]+");
        }
    }

    #[test]
    fn missing_api_key_env_var() {
        let e = err(&minimal().replace("KEY_A", "KEY_NOPE"));
        assert_err(
            &e,
            "projects[0].api_key_env",
            "environment variable `KEY_NOPE` is not set",
        );
    }

    #[test]
    fn empty_api_key_env_var() {
        let e = err(&minimal().replace("KEY_A", "EMPTY"));
        assert_err(
            &e,
            "projects[0].api_key_env",
            "environment variable `EMPTY` is empty",
        );
    }

    #[test]
    fn both_api_key_sources() {
        let text = minimal().replace(
            "api_key_env = \"KEY_A\"",
            "api_key_env = \"KEY_A\"\napi_key_file = \"key.txt\"",
        );
        let e = err(&text);
        assert_err(
            &e,
            "projects[0]",
            "set only one of api_key_env and api_key_file",
        );
    }

    #[test]
    fn no_api_key_source() {
        let e = err(&minimal().replace("api_key_env = \"KEY_A\"", ""));
        assert_err(&e, "projects[0]", "set one of api_key_env and api_key_file");
    }

    #[test]
    fn unreadable_or_empty_api_key_file() {
        let dir = dir();
        let text = minimal().replace("api_key_env = \"KEY_A\"", "api_key_file = \"nope.txt\"");
        let e = err_in(&dir, &text);
        assert_err(&e, "projects[0].api_key_file", "cannot read ");
        assert!(e.why().contains("nope.txt"), "{e}");
        std::fs::write(dir.path().join("nope.txt"), "\n \n").unwrap();
        let e = err_in(&dir, &text);
        assert_err(&e, "projects[0].api_key_file", "is empty");
    }

    #[test]
    fn api_key_that_cannot_be_a_header() {
        let dir = dir();
        std::fs::write(dir.path().join("key.txt"), "sk-a\nsk-b").unwrap();
        let text = minimal().replace("api_key_env = \"KEY_A\"", "api_key_file = \"key.txt\"");
        let e = err_in(&dir, &text);
        assert_err(
            &e,
            "projects[0].api_key_file",
            "the key is not a valid header value",
        );
        assert!(!e.to_string().contains("sk-a"), "{e}");
    }

    #[test]
    fn bad_openai_headers() {
        let text = minimal().replace("name = \"a\"", "name = \"a\"\nopenai_project = \"p\\n\"");
        let e = err(&text);
        assert_err(&e, "projects[0].openai_project", "not a valid header value");
        let text = minimal().replace("name = \"a\"", "name = \"a\"\nopenai_organization = \"\"");
        let e = err(&text);
        assert_err(&e, "projects[0].openai_organization", "must not be empty");
    }

    #[test]
    fn bad_glob() {
        let text = minimal().replace(
            "name = \"a\"",
            "name = \"a\"\nallowed_models = [\"gpt-4o\", \"gpt-[4\"]",
        );
        let e = err(&text);
        assert_err(
            &e,
            "projects[0].allowed_models[1]",
            "invalid pattern `gpt-[4`",
        );
        let text = minimal().replace("name = \"a\"", "name = \"a\"\ndenied_models = [\"o1?\"]");
        let e = err(&text);
        assert_err(
            &e,
            "projects[0].denied_models[0]",
            "`*` is the only wildcard",
        );
        let text = minimal().replace("name = \"a\"", "name = \"a\"\ndenied_models = [\"\"]");
        let e = err(&text);
        assert_err(&e, "projects[0].denied_models[0]", "must not be empty");
    }

    #[test]
    fn an_empty_allowlist_allows_nothing() {
        let config = ok(&minimal().replace("name = \"a\"", "name = \"a\"\nallowed_models = []"));
        assert!(!config.projects[0].models.allows("gpt-4o-mini"));
    }

    #[test]
    fn bad_period() {
        let budget = |b: &str| {
            minimal().replace("name = \"a\"", &format!("name = \"a\"\nbudget = {{ {b} }}"))
        };
        let e = err(&budget("usd = 1.0, period = \"yearly\""));
        assert_err(
            &e,
            "projects[0].budget.period",
            "expected one of monthly, weekly, daily, total",
        );
        assert_eq!(
            e.to_string(),
            format!(
                "{}: projects[0].budget.period: expected one of monthly, weekly, daily, total",
                e.file().display()
            )
        );
        let e = err(&budget("usd = 1.0"));
        assert_err(&e, "projects[0].budget.period", "missing: expected one of");
    }

    #[test]
    fn controls_of_issue_three_load() {
        let text = minimal()
            .replace(
                "name = \"a\"",
                "name = \"a\"\nalert_webhook = \"https://hooks.example/alerts\"\nbudget = { tokens = 10, period = \"daily\", alert_at = [0.5, 1.0] }\nrate_limits = [{ model = \"gpt-4o*\", rpm = 5, tpd = 1 }]",
            );
        // `tpd` is not a key: unknown keys inside a rate limit are refused too.
        assert!(err(&text)
            .key_path()
            .starts_with("projects[0].rate_limits[0]"));
        let text = text.replace("tpd = 1", "tpm = 100");
        let config = ok(&text.replace(
            "token_sha256",
            "budget = { usd = 1.5, period = \"monthly\" }\nallowed_models = [\"gpt-4o-mini\"]\ntoken_sha256",
        ));
        let project = &config.projects[0];
        assert_eq!(project.alert_at, vec![0.5, 1.0]);
        assert_eq!(project.rate_limits[0].rpm, Some(5));
        assert!(project.rate_limits[0].matcher.is_match("gpt-4o-mini"));
        let credential = &project.credentials[0];
        assert_eq!(credential.budget.unwrap().micro_usd, Some(1_500_000));
        assert!(credential
            .allowed_models
            .as_ref()
            .unwrap()
            .is_match("gpt-4o-mini"));
    }

    #[test]
    fn bad_controls_name_their_key() {
        let with =
            |extra: &str| minimal().replace("name = \"a\"", &format!("name = \"a\"\n{extra}"));
        let cases = [
            (
                "budget = { tokens = 1, period = \"daily\", alert_at = [0.8, 0.5] }",
                "projects[0].budget.alert_at[1]",
                "ascending",
            ),
            (
                "budget = { tokens = 1, period = \"daily\", alert_at = [1.5] }",
                "projects[0].budget.alert_at[0]",
                "at most 1",
            ),
            (
                "alert_webhook = \"ftp://x\"",
                "projects[0].alert_webhook",
                "http or https",
            ),
            (
                "rate_limits = [{ model = \"gpt-4o\" }]",
                "projects[0].rate_limits[0]",
                "at least one of rpm",
            ),
            (
                "rate_limits = [{ model = \"gpt-4o\", rpm = 0 }]",
                "projects[0].rate_limits[0].rpm",
                "at least 1",
            ),
            (
                "rate_limits = [{ rpm = 3 }]",
                "projects[0].rate_limits[0].model",
                "missing",
            ),
            (
                "rate_limits = [{ model = \"gpt-[4\", rpm = 3 }]",
                "projects[0].rate_limits[0].model[0]",
                "not allowed",
            ),
        ];
        for (extra, key, why) in cases {
            assert_err(&err(&with(extra)), key, why);
        }
        let credential_alerts = minimal().replace(
            "token_sha256",
            "budget = { tokens = 5, period = \"daily\", alert_at = [0.5] }\ntoken_sha256",
        );
        assert_err(
            &err(&credential_alerts),
            "projects[0].credentials[0].budget.alert_at",
            "project's budget only",
        );
    }

    #[test]
    fn budget_without_a_limit() {
        let text = minimal().replace(
            "name = \"a\"",
            "name = \"a\"\nbudget = { period = \"weekly\" }",
        );
        let e = err(&text);
        assert_err(
            &e,
            "projects[0].budget",
            "set at least one of tokens and usd",
        );
    }

    #[test]
    fn negative_or_non_finite_usd() {
        for usd in ["-0.01", "nan", "inf"] {
            let text = minimal().replace(
                "name = \"a\"",
                &format!("name = \"a\"\nbudget = {{ usd = {usd}, period = \"daily\" }}"),
            );
            let e = err(&text);
            assert_err(
                &e,
                "projects[0].budget.usd",
                "must be a non-negative number",
            );
        }
    }

    #[test]
    fn usd_rounds_to_the_nearest_micro_dollar() {
        assert_eq!(usd_to_micro(0.15), Ok(150_000));
        assert_eq!(usd_to_micro(0.075), Ok(75_000));
        assert_eq!(usd_to_micro(0.0000004), Ok(0));
        assert_eq!(usd_to_micro(0.0000005), Ok(1));
        assert_eq!(usd_to_micro(25.0), Ok(25_000_000));
        assert!(usd_to_micro(1e14).is_err());
    }

    // --- credentials

    #[test]
    fn duplicate_credential_name() {
        let text = format!(
            "{}\n[[projects.credentials]]\nname = \"c\"\ntoken_sha256 = \"{HASH_B}\"\n",
            minimal()
        );
        let e = err(&text);
        assert_err(
            &e,
            "projects[0].credentials[1].name",
            "duplicate credential name `c` (also projects[0].credentials[0].name)",
        );
    }

    #[test]
    fn the_same_credential_name_in_two_projects_is_fine() {
        let text = format!(
            "{}\n[[projects]]\nname = \"b\"\napi_key_env = \"KEY_B\"\n[[projects.credentials]]\nname = \"c\"\ntoken_sha256 = \"{HASH_B}\"\n",
            minimal()
        );
        let config = ok(&text);
        assert_eq!(config.tokens.len(), 2);
    }

    #[test]
    fn duplicate_token_hash_across_projects() {
        let text = format!(
            "{}\n[[projects]]\nname = \"b\"\napi_key_env = \"KEY_B\"\n[[projects.credentials]]\nname = \"d\"\ntoken_sha256 = \"{}\"\n",
            minimal(),
            HASH_A.to_uppercase()
        );
        let e = err(&text);
        assert_err(
            &e,
            "projects[1].credentials[0].token_sha256",
            "the same token hash as projects[0].credentials[0].token_sha256",
        );
        assert!(!e.to_string().to_lowercase().contains(HASH_A), "{e}");
    }

    #[test]
    fn token_hash_not_64_hex() {
        for bad in [
            &HASH_A[..63],
            &format!("{HASH_A}0"),
            &format!("{}g", &HASH_A[..63]),
            "",
        ] {
            let e = err(&minimal().replace(HASH_A, bad));
            assert_err(
                &e,
                "projects[0].credentials[0].token_sha256",
                "must be 64 hex characters (the SHA-256 of the token)",
            );
        }
        let e = err(&minimal().replace(&format!("token_sha256 = \"{HASH_A}\""), ""));
        assert_err(&e, "projects[0].credentials[0].token_sha256", "missing");
    }

    #[test]
    fn missing_credential_name() {
        let e = err(&minimal().replace("name = \"c\"", ""));
        assert_err(&e, "projects[0].credentials[0].name", "missing");
    }

    #[test]
    fn bad_expires_at() {
        for bad in [
            "\"next year\"",
            "\"2027-01-01\"",
            "2027-01-01T00:00:00",
            "2027-01-01",
        ] {
            let e = err(&format!("{}expires_at = {bad}\n", minimal()));
            assert_err(
                &e,
                "projects[0].credentials[0].expires_at",
                "is not an RFC 3339 date-time with an offset",
            );
        }
    }

    // --- sections

    #[test]
    fn bad_listen_address() {
        let e = err("[server]\nlisten = \"localhost:8080\"\n");
        assert_err(
            &e,
            "server.listen",
            "`localhost:8080` is not an IP address and port such as 127.0.0.1:8080",
        );
        let e = err("[admin]\nlisten = \"127.0.0.1\"\n");
        assert_err(&e, "admin.listen", "is not an IP address and port");
        let e = err("[admin]\nlisten = \"127.0.0.1:8080\"\n");
        assert_err(&e, "admin.listen", "must differ from server.listen");
        ok("[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    }

    #[test]
    fn zero_limits_are_refused() {
        let e = err("[server]\nmax_connections = 0\n");
        assert_err(&e, "server.max_connections", "must be at least 1");
        let e = err("[server]\nworkers = 0\n");
        assert_err(&e, "server.workers", "must be at least 1");
        let e = err("[server]\nworkers = 100000\n");
        assert_err(&e, "server.workers", "100000 threads: at most 1024");
        let e = err("[upstream]\nrequest_timeout_ms = 0\n");
        assert_err(&e, "upstream.request_timeout_ms", "must be at least 1");
    }

    #[test]
    fn bad_base_url() {
        let cases = [
            ("ftp://api.openai.com", "the scheme must be http or https"),
            ("api.openai.com", "the scheme must be http or https"),
            ("https://api.openai.com/v1?x=1", "must not have a query"),
            ("https://api.openai.com/#top", "must not have a fragment"),
            (
                "https://user:pw@api.openai.com",
                "must not hold credentials",
            ),
            ("https://api openai.com", "invalid URL"),
        ];
        for (url, why) in cases {
            let e = err(&format!("[upstream]\nbase_url = \"{url}\"\n"));
            assert_err(&e, "upstream.base_url", why);
        }
        let config = ok("[upstream]\nbase_url = \"https://gw.example.com/\"\n");
        assert_eq!(
            config.upstream.base_url.to_string(),
            "https://gw.example.com/"
        );
        let config = ok("[upstream]\nbase_url = \"https://gw.example.com/openai//\"\n");
        assert_eq!(config.upstream.base_url.path(), "/openai");
    }

    #[test]
    fn tls_cert_without_tls_key() {
        let e = err("[server]\ntls_cert = \"cert.pem\"\n");
        assert_err(&e, "server.tls_key", "missing: tls_cert is set");
        let e = err("[server]\ntls_key = \"key.pem\"\n");
        assert_err(&e, "server.tls_cert", "missing: tls_key is set");
        let e = err("[server]\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n");
        assert_err(&e, "server.tls_cert", "cannot read ");
    }

    #[test]
    fn admin_token_env_var_missing() {
        let e = err("[admin]\ntoken_env = \"TOLLGATE_ADMIN_TOKEN\"\n");
        assert_err(
            &e,
            "admin.token_env",
            "environment variable `TOLLGATE_ADMIN_TOKEN` is not set",
        );
        let e = err("[admin]\ntoken_env = \"EMPTY\"\n");
        assert_err(&e, "admin.token_env", "is empty");
        let e = err("[admin]\ntoken_env = \"\"\n");
        assert_err(&e, "admin.token_env", "must name an environment variable");
    }

    // --- store

    #[test]
    fn store_path_resolves_against_the_config_directory() {
        let config = ok("[store]\npath = \"ledger/usage.db\"\n");
        assert_eq!(config.store.path, dir_of(&config).join("ledger/usage.db"));
        let config = ok("[store]\npath = \"/tmp/usage.db\"\n");
        assert_eq!(config.store.path, Path::new("/tmp/usage.db"));
        let e = err("[store]\npath = \"\"\n");
        assert_err(&e, "store.path", "must not be empty");
    }

    #[test]
    fn flush_interval_below_10_ms() {
        for ms in [0, 9] {
            let e = err(&format!("[store]\nflush_interval_ms = {ms}\n"));
            assert_err(&e, "store.flush_interval_ms", "must be at least 10");
            assert!(
                e.to_string()
                    .ends_with("store.flush_interval_ms: must be at least 10"),
                "{e}"
            );
        }
        let e = err("[store]\nflush_interval_ms = -1\n");
        assert_err(&e, "store.flush_interval_ms", "invalid value");
        let config = ok("[store]\nflush_interval_ms = 10\n");
        assert_eq!(config.store.flush_interval, Duration::from_millis(10));
    }

    #[test]
    fn bad_redis_url() {
        for url in [
            "http://cache:6379",
            "cache:6379",
            "",
            "REDIS://cache",
            "unix:///tmp/r.sock",
        ] {
            let e = err(&format!("[store]\nredis_url = \"{url}\"\n"));
            assert_err(
                &e,
                "store.redis_url",
                "must start with redis:// or rediss://",
            );
        }
        for url in ["redis://", "rediss://"] {
            let e = err(&format!("[store]\nredis_url = \"{url}\"\n"));
            assert_err(&e, "store.redis_url", "missing host");
        }
        let e = err("[store]\nredis_url = 6379\n");
        assert_err(&e, "store.redis_url", "invalid type: integer");
        let config = ok("[store]\nredis_url = \"redis://cache:6379/0\"\n");
        assert_eq!(
            config.store.redis_url.as_deref(),
            Some("redis://cache:6379/0")
        );
    }

    #[test]
    fn bad_on_store_error() {
        for bad in ["fail-open", "Open", ""] {
            let e = err(&format!("[store]\non_store_error = \"{bad}\"\n"));
            assert_err(&e, "store.on_store_error", "expected one of open, closed");
        }
        let config = ok("[store]\non_store_error = \"closed\"\n");
        assert_eq!(config.store.on_store_error, OnStoreError::Closed);
    }

    #[test]
    fn unknown_key_in_store() {
        let e = err("[store]\nflush_ms = 100\n");
        assert_err(&e, "store.flush_ms", "unknown field `flush_ms`");
    }

    // --- pricing

    #[test]
    fn missing_pricing_file() {
        let e = err("[pricing]\nfile = \"prices/none.toml\"\n");
        assert_err(&e, "pricing.file", "cannot read ");
        assert!(e.why().contains("none.toml"), "{e}");
    }

    #[test]
    fn pricing_file_resolves_against_the_config_directory() {
        let dir = dir();
        std::fs::create_dir(dir.path().join("prices")).unwrap();
        std::fs::write(
            dir.path().join("prices/p.toml"),
            "[models.m]\ninput = 1\noutput = 2\n",
        )
        .unwrap();
        let config = load_in(&dir, "[pricing]\nfile = \"prices/p.toml\"\n").unwrap();
        assert_eq!(config.pricing.len(), 1);
        assert_eq!(
            config.pricing.resolve("m").price,
            Price {
                input: 1_000_000,
                cached_input: 1_000_000,
                output: 2_000_000
            }
        );
    }

    fn pricing_err(pricing: &str) -> ConfigError {
        let dir = dir();
        std::fs::write(dir.path().join("pricing.toml"), pricing).unwrap();
        err_in(&dir, "")
    }

    #[test]
    fn bad_pricing_file() {
        let e = pricing_err("[models.\"gpt-4o\"]\ninput = -2.5\noutput = 10\n");
        assert_err(
            &e,
            "pricing.file",
            "models.\"gpt-4o\".input: must be a non-negative number",
        );
        assert!(e
            .to_string()
            .ends_with("pricing.file: models.\"gpt-4o\".input: must be a non-negative number"));
        let e = pricing_err("[models.\"gpt-4o\"]\ninput = 2.5\n");
        assert_err(&e, "pricing.file", "models.\"gpt-4o\".output: missing");
        let e = pricing_err("[models.\"gpt-4o\"]\ninput = 2.5\noutput = 10\ncache = 1\n");
        assert_err(
            &e,
            "pricing.file",
            "models.\"gpt-4o\".cache: unknown field `cache`",
        );
        assert!(e.why().contains("(line 4, column 1) in "), "{e}");
        let e = pricing_err("[models.\"gpt-4o\"]\ninput = \"2.5\"\noutput = 10\n");
        assert_err(
            &e,
            "pricing.file",
            "models.\"gpt-4o\".input: invalid type: string",
        );
        let e = pricing_err("[models.\"gpt-4o\"\ninput = 2.5\n");
        assert_err(&e, "pricing.file", "invalid TOML");
        let e = pricing_err("[models]\ngpt = 1\n");
        assert_err(&e, "pricing.file", "models.gpt: invalid type: integer");
    }

    #[test]
    fn bad_fallback_price() {
        let e = err("[pricing]\nfallback = { input = 1.0, cached_input = -1.0, output = 1.0 }\n");
        assert_err(
            &e,
            "pricing.fallback.cached_input",
            "must be a non-negative number",
        );
    }

    // --- the path finder

    #[test]
    fn header_paths_count_arrays_of_tables() {
        let text = "[[projects]]\n[[projects.credentials]]\n[[projects]]\n[[projects.credentials]]\n[[projects.credentials]]\n[projects.budget]\nx";
        let at = |needle: &str| {
            let offset = text.rfind(needle).unwrap() + needle.len();
            header_path_before(text, offset)
        };
        assert_eq!(header_path_before(text, 0), "");
        assert_eq!(
            at("[[projects]]\n[[projects.credentials]]\n[[projects]]"),
            "projects[1]"
        );
        assert_eq!(
            at("[[projects.credentials]]\n[[projects.credentials]]"),
            "projects[1].credentials[1]"
        );
        assert_eq!(at("x"), "projects[1].budget");
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncdé\nf", 0), (1, 1));
        assert_eq!(line_column("ab\ncdé\nf", 3), (2, 1));
        assert_eq!(line_column("ab\ncdé\nf", 8), (3, 1));
        assert_eq!(line_column("ab\ncdé\nf", 7), (2, 4));
    }
}
