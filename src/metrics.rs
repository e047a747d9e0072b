//! Prometheus metrics. Counters and gauges are read from the projects' own atomics at scrape
//! time, and so are the latency histograms ([`Latency`], two per project), so the request path
//! never formats a label, takes a registry lock or looks a series up.
//!
//! Invariant: label values are bounded: projects come from the config, models are a pricing
//! entry or an exact allowlist name or `other`, codes are HTTP statuses, reasons are the fixed
//! set of `ProxyError::reason`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

use crate::pricing::format_usd as usd;
use crate::projects::ProjectState;
use crate::state::Live;

/// The upper bounds of the latency buckets, in seconds (the `le` labels).
const LATENCY_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The same bounds in nanoseconds, for [`Latency::observe`].
const LATENCY_BOUNDS_NANOS: [u64; 15] = {
    let mut nanos = [0; 15];
    let mut i = 0;
    while i < nanos.len() {
        nanos[i] = (LATENCY_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};

/// A latency histogram of one project: the observations per bucket (not cumulative; the last
/// one is `+Inf`) and their sum. One cache line holds the sum and the buckets up to 0.5 s, so
/// an observation writes one or two lines of the project's own state, with two relaxed adds.
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub struct Latency {
    sum_nanos: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
}

impl Latency {
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_NANOS.partition_point(|&bound| bound < nanos);
        // Relaxed: independent monotonic counters, read only for metrics.
        if let Some(count) = self.buckets.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Prometheus's form: cumulative buckets, the count (the `+Inf` bucket) and the sum in
    /// seconds, from one read of each counter.
    fn histogram(&self) -> Histogram {
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len());
        for (count, le) in self.buckets.iter().zip(LATENCY_BUCKETS) {
            cumulative += count.load(Ordering::Relaxed);
            let mut bucket = Bucket::default();
            bucket.set_cumulative_count(cumulative);
            bucket.set_upper_bound(le);
            buckets.push(bucket);
        }
        if let Some(last) = self.buckets.last() {
            cumulative += last.load(Ordering::Relaxed);
        }
        let mut histogram = Histogram::default();
        histogram.set_bucket(buckets);
        histogram.set_sample_count(cumulative);
        histogram.set_sample_sum(self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9);
        histogram
    }
}

/// One histogram family over `states`, `latency` picking each project's histogram.
fn latency_family<'a>(
    name: &str,
    help: &str,
    states: impl Iterator<Item = &'a ProjectState>,
    latency: impl Fn(&ProjectState) -> &Latency,
) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(MetricType::HISTOGRAM);
    for state in states {
        let mut label = LabelPair::default();
        label.set_name("project".to_owned());
        label.set_value(state.name.to_string());
        let mut metric = Metric::default();
        metric.set_label(vec![label]);
        metric.set_histogram(latency(state).histogram());
        family.mut_metric().push(metric);
    }
    family
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// Failed syncs with Redis (shared budgets).
    redis_errors: AtomicU64,
}

impl Metrics {
    /// Counts a failed sync with Redis.
    pub fn count_store_error_redis(&self) {
        // Relaxed: a statistic, read on its own.
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The whole scrape in Prometheus text format.
    pub fn render(&self, live: &Live, unauthenticated: &ProjectState) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let states = &live.states;

        family(
            &mut out,
            "tollgate_requests_total",
            "counter",
            "Requests answered, by project, model and HTTP status.",
        );
        for state in states.iter().map(|s| &**s).chain([unauthenticated]) {
            let mut rows: Vec<_> = state
                .requests
                .iter()
                .map(|e| {
                    (
                        e.key().0.clone(),
                        e.key().1,
                        e.value().load(Ordering::Relaxed),
                    )
                })
                .collect();
            rows.sort();
            for (model, code, value) in rows {
                let _ = writeln!(
                    out,
                    "tollgate_requests_total{{project=\"{}\",model=\"{}\",code=\"{}\"}} {}",
                    Esc(&state.name),
                    Esc(&model),
                    code,
                    value
                );
            }
        }

        // Sum the credential cells of each (project, model).
        let mut by_model: Vec<(&str, String, u64, [u64; 4], u64)> = Vec::new();
        for state in states.iter() {
            let mut rows: std::collections::BTreeMap<String, (u64, [u64; 4], u64)> =
                Default::default();
            for cell in state.usage.iter() {
                let (requests, usage, micro_usd) = cell.value().load();
                let row = rows.entry(cell.key().1.to_string()).or_default();
                row.0 += requests;
                row.1[0] += usage.input_tokens;
                row.1[1] += usage.cached_input_tokens;
                row.1[2] += usage.output_tokens;
                row.1[3] += usage.reasoning_tokens;
                row.2 += micro_usd;
            }
            for (model, (requests, tokens, micro_usd)) in rows {
                by_model.push((&state.name, model, requests, tokens, micro_usd));
            }
        }
        family(&mut out, "tollgate_tokens_total", "counter", "Tokens the upstream reported, by project, model and type (cached_input is part of input, reasoning part of output).");
        for (project, model, _, tokens, _) in &by_model {
            for (kind, value) in ["input", "cached_input", "output", "reasoning"]
                .iter()
                .zip(tokens)
            {
                let _ = writeln!(
                    out,
                    "tollgate_tokens_total{{project=\"{}\",model=\"{}\",type=\"{}\"}} {}",
                    Esc(project),
                    Esc(model),
                    kind,
                    value
                );
            }
        }
        family(
            &mut out,
            "tollgate_cost_usd_total",
            "counter",
            "Cost of the usage the upstream reported, in USD.",
        );
        for (project, model, _, _, micro_usd) in &by_model {
            let _ = writeln!(
                out,
                "tollgate_cost_usd_total{{project=\"{}\",model=\"{}\"}} {}",
                Esc(project),
                Esc(model),
                usd(*micro_usd)
            );
        }

        family(
            &mut out,
            "tollgate_rejections_total",
            "counter",
            "Requests tollgate refused itself, by project and reason.",
        );
        for state in states.iter().map(|s| &**s).chain([unauthenticated]) {
            let mut rows: Vec<_> = state
                .rejections
                .iter()
                .filter(|e| !e.key().starts_with("upstream_"))
                .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
                .collect();
            rows.sort();
            for (reason, value) in rows {
                let _ = writeln!(
                    out,
                    "tollgate_rejections_total{{project=\"{}\",reason=\"{}\"}} {}",
                    Esc(&state.name),
                    reason,
                    value
                );
            }
        }
        family(
            &mut out,
            "tollgate_upstream_errors_total",
            "counter",
            "Requests answered 502 or 504 because the upstream failed, by project and kind.",
        );
        for state in states.iter() {
            let mut rows: Vec<_> = state
                .rejections
                .iter()
                .filter_map(|e| {
                    e.key()
                        .strip_prefix("upstream_")
                        .map(|kind| (kind, e.value().load(Ordering::Relaxed)))
                })
                .collect();
            rows.sort();
            for (kind, value) in rows {
                let _ = writeln!(
                    out,
                    "tollgate_upstream_errors_total{{project=\"{}\",kind=\"{}\"}} {}",
                    Esc(&state.name),
                    kind,
                    value
                );
            }
        }
        family(
            &mut out,
            "tollgate_unpriced_requests_total",
            "counter",
            "Requests for a model with no price, charged at the fallback price.",
        );
        for state in states.iter() {
            let _ = writeln!(
                out,
                "tollgate_unpriced_requests_total{{project=\"{}\"}} {}",
                Esc(&state.name),
                state.unpriced.load(Ordering::Relaxed)
            );
        }
        family(
            &mut out,
            "tollgate_budget_alerts_total",
            "counter",
            "Budget alerts fired, by project and threshold (fraction of the limit).",
        );
        for state in states.iter() {
            let mut rows: Vec<_> = state
                .alerts
                .iter()
                .map(|e| (e.key().clone(), e.value().load(Ordering::Relaxed)))
                .collect();
            rows.sort();
            for (threshold, value) in rows {
                let _ = writeln!(
                    out,
                    "tollgate_budget_alerts_total{{project=\"{}\",threshold=\"{}\"}} {}",
                    Esc(&state.name),
                    threshold,
                    value
                );
            }
        }
        family(
            &mut out,
            "tollgate_inflight_requests",
            "gauge",
            "Requests in flight, by project.",
        );
        for state in states.iter() {
            let _ = writeln!(
                out,
                "tollgate_inflight_requests{{project=\"{}\"}} {}",
                Esc(&state.name),
                state.in_flight.load(Ordering::Relaxed)
            );
        }

        let budgets: Vec<_> = live
            .config
            .projects
            .iter()
            .zip(states.iter())
            .map(|(project, state)| {
                let period = state.account.current();
                let mut spend = period.snapshot();
                // A budget shared through Redis is spent by all replicas: the gauge is the
                // spend its limit is checked against (as of the last sync), the same on every
                // replica, so that `max by (project)` reads the cluster's.
                if let Some(shared) = period.slice().and_then(|slice| slice.view.load()) {
                    spend.tokens = shared.spent_tokens;
                    spend.micro_usd = shared.spent_micro_usd;
                }
                (project.budget, spend, state)
            })
            .collect();
        family(
            &mut out,
            "tollgate_budget_limit_tokens",
            "gauge",
            "Token limit of the project's budget period (absent: no token limit).",
        );
        for (limit, _, state) in &budgets {
            if let Some(tokens) = limit.and_then(|l| l.tokens) {
                let _ = writeln!(
                    out,
                    "tollgate_budget_limit_tokens{{project=\"{}\"}} {}",
                    Esc(&state.name),
                    tokens
                );
            }
        }
        family(
            &mut out,
            "tollgate_budget_spent_tokens",
            "gauge",
            "Tokens settled in the project's current budget period (with store.redis_url: by all \
             replicas, as of the last sync).",
        );
        for (_, spend, state) in &budgets {
            let _ = writeln!(
                out,
                "tollgate_budget_spent_tokens{{project=\"{}\"}} {}",
                Esc(&state.name),
                spend.tokens
            );
        }
        family(
            &mut out,
            "tollgate_budget_limit_usd",
            "gauge",
            "USD limit of the project's budget period (absent: no USD limit).",
        );
        for (limit, _, state) in &budgets {
            if let Some(micro) = limit.and_then(|l| l.micro_usd) {
                let _ = writeln!(
                    out,
                    "tollgate_budget_limit_usd{{project=\"{}\"}} {}",
                    Esc(&state.name),
                    usd(micro)
                );
            }
        }
        family(
            &mut out,
            "tollgate_budget_spent_usd",
            "gauge",
            "USD settled in the project's current budget period (with store.redis_url: by all \
             replicas, as of the last sync).",
        );
        for (_, spend, state) in &budgets {
            let _ = writeln!(
                out,
                "tollgate_budget_spent_usd{{project=\"{}\"}} {}",
                Esc(&state.name),
                usd(spend.micro_usd)
            );
        }
        family(
            &mut out,
            "tollgate_budget_reserved_tokens",
            "gauge",
            "Tokens reserved by requests in flight in the current budget period.",
        );
        for (_, spend, state) in &budgets {
            let _ = writeln!(
                out,
                "tollgate_budget_reserved_tokens{{project=\"{}\"}} {}",
                Esc(&state.name),
                spend.reserved_tokens
            );
        }
        family(
            &mut out,
            "tollgate_budget_period_end_timestamp_seconds",
            "gauge",
            "When the project's current budget period ends (absent for a total budget).",
        );
        for (_, _, state) in &budgets {
            if let Some(end) = state.account.current().end {
                let _ = writeln!(
                    out,
                    "tollgate_budget_period_end_timestamp_seconds{{project=\"{}\"}} {}",
                    Esc(&state.name),
                    end
                );
            }
        }

        if live.config.store.redis_url.is_some() {
            family(
                &mut out,
                "tollgate_store_errors_total",
                "counter",
                "Failed syncs with a store, by store.",
            );
            let _ = writeln!(
                out,
                "tollgate_store_errors_total{{store=\"redis\"}} {}",
                self.redis_errors.load(Ordering::Relaxed)
            );
        }

        let all = || states.iter().map(|s| &**s).chain([unauthenticated]);
        let families = [
            latency_family(
                "tollgate_request_duration_seconds",
                "Time from a request's arrival to the end of its response body.",
                all(),
                |state| &state.duration,
            ),
            latency_family(
                "tollgate_upstream_first_byte_seconds",
                "Time from forwarding a request to the upstream's response headers.",
                all(),
                |state| &state.first_byte,
            ),
        ];
        let mut encoded = Vec::new();
        if TextEncoder::new().encode(&families, &mut encoded).is_ok() {
            out.push_str(&String::from_utf8_lossy(&encoded));
        }
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value escaped for the text format.
struct Esc<'a>(&'a str);

impl std::fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_with_the_sum_in_seconds() {
        let state = ProjectState::unauthenticated();
        for millis in [1, 5, 7, 300, 700, 400_000] {
            state.duration.observe(Duration::from_millis(millis));
        }
        let family = latency_family("t", "help", [&state].into_iter(), |s| &s.duration);
        let mut text = Vec::new();
        TextEncoder::new().encode(&[family], &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            "t_bucket{project=\"\",le=\"0.005\"} 2",
            "t_bucket{project=\"\",le=\"0.01\"} 3",
            "t_bucket{project=\"\",le=\"0.25\"} 3",
            "t_bucket{project=\"\",le=\"0.5\"} 4",
            "t_bucket{project=\"\",le=\"1\"} 5",
            "t_bucket{project=\"\",le=\"300\"} 5",
            "t_bucket{project=\"\",le=\"+Inf\"} 6",
            "t_sum{project=\"\"} 401.013",
            "t_count{project=\"\"} 6",
            "# TYPE t histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        // The other histogram saw nothing.
        let family = latency_family("u", "help", [&state].into_iter(), |s| &s.first_byte);
        let mut text = Vec::new();
        TextEncoder::new().encode(&[family], &mut text).unwrap();
        assert!(String::from_utf8(text)
            .unwrap()
            .contains("u_count{project=\"\"} 0"));
    }

    #[test]
    fn the_bounds_in_nanoseconds_are_the_bounds_in_seconds() {
        for (nanos, seconds) in LATENCY_BOUNDS_NANOS.iter().zip(LATENCY_BUCKETS) {
            assert_eq!(
                Duration::from_nanos(*nanos),
                Duration::from_secs_f64(seconds)
            );
        }
    }
}
