//! The admin listener: `/metrics`, `/healthz` and `/readyz` (open, for scrapers and probes),
//! and `/admin/*` behind the admin bearer token.
//!
//! Invariant: nothing here is reachable from the data-plane listener, and `/admin/*` fails
//! closed: with no admin token configured it answers 403.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use crate::auth::{bearer, hash_token};
use crate::body::ProxyBody;
use crate::error::error_body;
use crate::state::AppState;

pub async fn handle(state: Arc<AppState>, request: Request<Incoming>) -> Response<ProxyBody> {
    let path = request.uri().path();
    match (request.method(), path) {
        (&Method::GET, "/metrics") => {
            let live = state.live.load();
            let text = state.metrics.render(&live, &state.unauthenticated);
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            )
        }
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            if state.ready.load(Ordering::Acquire) {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        (_, p) if p.starts_with("/admin/") => {
            if let Some(refusal) = refuse(&state, &request) {
                return refusal;
            }
            match (request.method(), p) {
                (&Method::GET, "/admin/projects") => json(StatusCode::OK, &projects(&state)),
                (&Method::GET, "/admin/usage") => json(StatusCode::OK, &usage(&state)),
                (&Method::POST, "/admin/reload") => reload(&state),
                _ => not_found(request.method(), p),
            }
        }
        (method, p) => not_found(method, p),
    }
}

/// The refusal for a request without the admin token, if it lacks it.
fn refuse(state: &AppState, request: &Request<Incoming>) -> Option<Response<ProxyBody>> {
    let live = state.live.load();
    let Some(expected) = &live.config.admin.token else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "the admin API is disabled: set admin.token_env",
            "permission_denied",
        ));
    };
    // Compare digests, so the time taken says nothing about the token.
    let presented = bearer(request.headers()).map(hash_token);
    if presented != Some(hash_token(expected.expose())) {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "incorrect or missing admin token",
            "invalid_api_key",
        ));
    }
    None
}

/// Reloads the config file the running config came from (also what SIGHUP does).
pub fn reload_from_source(state: &AppState) -> Result<usize, crate::config::ConfigError> {
    let source = state.live.load().config.source.clone();
    let config = crate::config::load(&source)?;
    let projects = config.projects.len();
    state.swap(config);
    tracing::info!(path = %source.display(), projects, "config reloaded");
    Ok(projects)
}

fn reload(state: &AppState) -> Response<ProxyBody> {
    match reload_from_source(state) {
        Ok(projects) => json(
            StatusCode::OK,
            &serde_json::json!({ "status": "reloaded", "projects": projects }),
        ),
        Err(err) => {
            tracing::error!(error = %err, "config reload refused; keeping the running config");
            error(
                StatusCode::BAD_REQUEST,
                &format!("config reload refused: {err}"),
                "invalid_config",
            )
        }
    }
}

#[derive(Serialize)]
struct ProjectsReport {
    projects: Vec<ProjectReport>,
}

#[derive(Serialize)]
struct ProjectReport {
    name: String,
    archived: bool,
    period: PeriodReport,
    spent: Spent,
    limit: Amounts,
    remaining: Amounts,
    reserved: Reserved,
    in_flight: i64,
    /// With `store.redis_url`: all replicas' figures in Redis at the last sync (`null` without
    /// Redis or before the first sync). The other fields are this replica's own.
    shared: Option<Shared>,
}

#[derive(Serialize)]
struct Shared {
    /// Settled spend of all replicas, as pushed.
    spent: Reserved,
    /// Leased to live replicas: reserved, settled and not yet pushed, or not yet used.
    leased: Reserved,
    replicas: u64,
}

#[derive(Serialize)]
struct PeriodReport {
    kind: &'static str,
    start: String,
    end: Option<String>,
}

#[derive(Serialize)]
struct Spent {
    tokens: u64,
    input_tokens: u64,
    cached_input_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
    usd: f64,
    requests: u64,
}

#[derive(Serialize)]
struct Amounts {
    tokens: Option<u64>,
    usd: Option<f64>,
}

#[derive(Serialize)]
struct Reserved {
    tokens: u64,
    usd: f64,
}

fn usd(micro: u64) -> f64 {
    micro as f64 / 1_000_000.0
}

fn rfc3339(secs: i64) -> String {
    Utc.timestamp_opt(secs, 0)
        .single()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn projects(state: &AppState) -> ProjectsReport {
    let live = state.live.load();
    let now = Utc::now();
    let projects = live
        .config
        .projects
        .iter()
        .zip(live.states.iter())
        .map(|(project, project_state)| {
            let kind = project
                .budget
                .map_or(crate::period::Period::Monthly, |b| b.period);
            let period = project_state.account.period(kind, now);
            let spend = period.snapshot();
            let limit_tokens = project.budget.and_then(|b| b.tokens);
            let limit_usd = project.budget.and_then(|b| b.micro_usd);
            ProjectReport {
                name: project.name.to_string(),
                archived: project.archived,
                period: PeriodReport {
                    kind: period.kind.as_str(),
                    start: rfc3339(period.start),
                    end: period.end.map(rfc3339),
                },
                spent: Spent {
                    tokens: spend.tokens,
                    input_tokens: spend.input_tokens,
                    cached_input_tokens: spend.cached_input_tokens,
                    output_tokens: spend.output_tokens,
                    reasoning_tokens: spend.reasoning_tokens,
                    usd: usd(spend.micro_usd),
                    requests: spend.requests,
                },
                limit: Amounts {
                    tokens: limit_tokens,
                    usd: limit_usd.map(usd),
                },
                remaining: Amounts {
                    tokens: limit_tokens
                        .map(|l| l.saturating_sub(spend.tokens + spend.reserved_tokens)),
                    usd: limit_usd
                        .map(|l| usd(l.saturating_sub(spend.micro_usd + spend.reserved_micro_usd))),
                },
                reserved: Reserved {
                    tokens: spend.reserved_tokens,
                    usd: usd(spend.reserved_micro_usd),
                },
                in_flight: project_state.in_flight.load(Ordering::Relaxed),
                shared: period
                    .slice()
                    .and_then(|slice| slice.view.load())
                    .map(|view| Shared {
                        spent: Reserved {
                            tokens: view.spent_tokens,
                            usd: usd(view.spent_micro_usd),
                        },
                        leased: Reserved {
                            tokens: view.leased_tokens,
                            usd: usd(view.leased_micro_usd),
                        },
                        replicas: view.replicas,
                    }),
            }
        })
        .collect();
    ProjectsReport { projects }
}

#[derive(Serialize)]
struct UsageRow {
    project: String,
    credential: String,
    model: String,
    requests: u64,
    input_tokens: u64,
    cached_input_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
    tokens: u64,
    usd: f64,
}

/// Usage since the process started, per project, credential and model.
fn usage(state: &AppState) -> serde_json::Value {
    let live = state.live.load();
    let mut rows = Vec::new();
    for project_state in &live.states {
        for cell in project_state.usage.iter() {
            let (requests, usage, micro_usd) = cell.value().load();
            rows.push(UsageRow {
                project: project_state.name.to_string(),
                credential: cell.key().0.to_string(),
                model: cell.key().1.to_string(),
                requests,
                input_tokens: usage.input_tokens,
                cached_input_tokens: usage.cached_input_tokens,
                output_tokens: usage.output_tokens,
                reasoning_tokens: usage.reasoning_tokens,
                tokens: usage.total(),
                usd: usd(micro_usd),
            });
        }
    }
    rows.sort_by(|a, b| {
        (&a.project, &a.credential, &a.model).cmp(&(&b.project, &b.credential, &b.model))
    });
    serde_json::json!({ "usage": rows })
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<bytes::Bytes>,
) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ProxyBody> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(status, "application/json", body),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error",
            "internal",
        ),
    }
}

fn error(status: StatusCode, message: &str, code: &str) -> Response<ProxyBody> {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    respond(
        status,
        "application/json",
        error_body(message, kind, None, Some(code)),
    )
}

fn not_found(method: &Method, path: &str) -> Response<ProxyBody> {
    error(
        StatusCode::NOT_FOUND,
        &format!("Invalid URL ({method} {path})"),
        "not_found",
    )
}
