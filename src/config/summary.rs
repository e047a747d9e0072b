//! The human summary of a loaded [`Config`] that `tollgate check` prints.
//!
//! Invariant: the summary never holds a secret (API key, admin token, a password in the Redis
//! URL) or a token hash; it says whether a secret is set and counts credentials, nothing more.

use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{BudgetLimit, Config, ModelPolicy, OnStoreError, Project, StoreConfig};

/// The summary as of now; see [`summary_at`].
pub fn summary(config: &Config) -> String {
    summary_at(config, Utc::now())
}

/// Listeners, upstream, pricing and, per project, its state, credentials, model lists and
/// budget; credentials whose `expires_at` is at or before `now` count as expired.
pub fn summary_at(config: &Config, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason alone.
    let _ = writeln!(out, "config: {}", config.source.display());
    let server = &config.server;
    let _ = writeln!(
        out,
        "server: {} ({}), {} worker threads, max body {} bytes, max {} connections",
        server.listen,
        if server.tls.is_some() {
            "https"
        } else {
            "http"
        },
        server.workers,
        server.max_body_bytes,
        server.max_connections,
    );
    let _ = writeln!(
        out,
        "admin: {}, admin token {}",
        config.admin.listen,
        if config.admin.token.is_some() {
            "set"
        } else {
            "not set (/admin/* answers 403)"
        },
    );
    let _ = writeln!(out, "upstream: {}", config.upstream.base_url);
    let fallback = config.pricing.fallback;
    let _ = writeln!(
        out,
        "pricing: {} models; unpriced models charged {} input, {} cached input, {} output per 1M tokens",
        config.pricing.len(),
        usd(fallback.input),
        usd(fallback.cached_input),
        usd(fallback.output),
    );
    let _ = writeln!(
        out,
        "reservation: {} output tokens when a request sets no limit",
        config.reservation.default_output_tokens
    );
    write_store(&mut out, &config.store);
    let _ = writeln!(out, "projects: {}", config.projects.len());
    for project in &config.projects {
        write_project(&mut out, project, now);
    }
    out
}

fn write_store(out: &mut String, store: &StoreConfig) {
    let _ = writeln!(
        out,
        "store: {}, written every {} ms, on store error: {} ({})",
        store.path.display(),
        store.flush_interval.as_millis(),
        store.on_store_error.as_str(),
        match store.on_store_error {
            OnStoreError::Open => "keep serving",
            OnStoreError::Closed => "refuse requests",
        },
    );
    // The URL may carry a password: only its redacted form is shown.
    if let Some(url) = store.redis_url_redacted() {
        let _ = writeln!(out, "  redis: {url} (budgets shared with other replicas)");
    }
}

fn write_project(out: &mut String, project: &Project, now: DateTime<Utc>) {
    let expired = project
        .credentials
        .iter()
        .filter(|c| c.expires_at.is_some_and(|at| at <= now))
        .count();
    let disabled = project.credentials.iter().filter(|c| c.disabled).count();
    let count = project.credentials.len();
    let _ = writeln!(
        out,
        "  {}: {}, {count} {} ({expired} expired, {disabled} disabled)",
        project.name,
        if project.archived {
            "archived"
        } else {
            "active"
        },
        if count == 1 {
            "credential"
        } else {
            "credentials"
        },
    );
    write_models(out, &project.models);
    let _ = writeln!(out, "    budget: {}", budget(project.budget.as_ref()));
}

fn write_models(out: &mut String, models: &ModelPolicy) {
    let allowed = match &models.allowed_patterns {
        None => "all not denied".to_owned(),
        Some(patterns) => list(patterns),
    };
    let _ = writeln!(out, "    allowed models: {allowed}");
    let _ = writeln!(out, "    denied models: {}", list(&models.denied_patterns));
}

fn list(patterns: &[Arc<str>]) -> String {
    if patterns.is_empty() {
        "none".to_owned()
    } else {
        patterns.join(", ")
    }
}

fn budget(limit: Option<&BudgetLimit>) -> String {
    let Some(limit) = limit else {
        return "unlimited".to_owned();
    };
    let mut parts = Vec::new();
    if let Some(tokens) = limit.tokens {
        parts.push(format!("{tokens} tokens"));
    }
    if let Some(micro) = limit.micro_usd {
        parts.push(usd(micro));
    }
    parts.push(limit.period.as_str().to_owned());
    parts.join(", ")
}

/// Micro-dollars as dollars, with at least two decimals and no trailing zeros past them:
/// `25_000_000` -> `$25.00`, `1_500` -> `$0.0015`.
fn usd(micro: u64) -> String {
    let fraction = format!("{:06}", micro % 1_000_000);
    let fraction = fraction.trim_end_matches('0');
    let fraction = format!("{fraction:0<2}");
    format!("${}.{fraction}", micro / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_keeps_two_decimals_and_drops_trailing_zeros() {
        assert_eq!(usd(25_000_000), "$25.00");
        assert_eq!(usd(150_000), "$0.15");
        assert_eq!(usd(1_500), "$0.0015");
        assert_eq!(usd(1), "$0.000001");
        assert_eq!(usd(0), "$0.00");
    }
}
