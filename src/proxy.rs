//! The request path. Every data-plane request takes these steps, in this order:
//!
//! 1. **route**: only `/v1/...` is proxied; anything else is OpenAI's "Invalid URL" 404.
//! 2. **authenticate** (`auth`): the bearer token's hash names a credential and its project;
//!    401 for a missing, unknown, expired or disabled token, 403 for an archived project.
//! 3. **inspect** (`inspect`): JSON bodies (and any POST body to an endpoint that takes JSON,
//!    whatever its `Content-Type`) and the multipart bodies that name a model are read (up to
//!    `server.max_body_bytes`, else 413) for the model, `stream` and the output cap; other
//!    bodies (file uploads) stream through unread.
//! 4. **check policy**: the model the body or path names must pass the project's allow and
//!    deny lists (403 `model_not_found`); `GET /v1/models` is filtered to allowed models.
//! 5. **reserve** (`budget`): a POST reserves its estimated tokens and dollars against the
//!    project's budget; 429 `project_spend_limit_exceeded` when it would not fit.
//! 6. **forward** (`upstream`): hop-by-hop headers and the client's Authorization go, the real
//!    key comes in; streamed chat and completions get `stream_options.include_usage` when the
//!    client did not ask. 502 when the upstream cannot be reached, 504 when it does not answer
//!    within `upstream.request_timeout_ms`.
//! 7. **meter** (`body`, `usage`): the response streams back frame by frame while a meter
//!    looks for the usage on the side (and the usage chunk the client did not ask for is
//!    taken out).
//! 8. **settle** ([`Settlement`]): when the body ends, fails, stalls or is abandoned, the
//!    reservation is replaced by the real charge and the counters, metrics and log get it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chrono::Utc;
use http::request::Parts;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

use crate::body::{Ending, ProxyBody, Settle};
use crate::budget::{Charge, Exhausted, Reservation};
use crate::config::{BudgetLimit, Project};
use crate::error::{budget_message, ProxyError};
use crate::inspect::{self, Inspected};
use crate::logging;
use crate::pricing::format_usd as usd;
use crate::projects::ProjectState;
use crate::ratelimit::Limited as RateLimited;
use crate::state::{AppState, Live, ThreadView, UsageSlot, View};
use crate::store::{KeyRef, UsageDelta};
use crate::usage::{Encoding, Format, Meter, Report, Usage, UsageChunkFilter};

/// Largest `GET /v1/models` answer tollgate reads to filter it.
const MAX_MODEL_LIST_BYTES: usize = 8 * 1024 * 1024;

/// A refusal, with what is known of the caller for counting it.
struct Rejection {
    error: ProxyError,
    project: Option<Arc<ProjectState>>,
    credential: Option<Arc<str>>,
    /// The `x-ratelimit-*` standing, for a refusal by a rate limit.
    rate_headers: Option<crate::ratelimit::Headers>,
}

impl From<ProxyError> for Rejection {
    fn from(error: ProxyError) -> Self {
        Rejection {
            error,
            project: None,
            credential: None,
            rate_headers: None,
        }
    }
}

/// Serves one data-plane request with what the calling thread sees (`thread`: the app, the
/// live config and the thread's upstream client). Never fails: every error becomes an
/// OpenAI-shaped answer.
pub async fn handle(thread: Arc<ThreadView>, request: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let view = thread.load();
    let (parts, body) = request.into_parts();
    match forward(&view, parts, body, started).await {
        Ok(response) => response,
        Err(rejection) => reject(&view.app, &view.live, rejection, started),
    }
}

fn reject(
    state: &AppState,
    live: &Live,
    rejection: Rejection,
    started: Instant,
) -> Response<ProxyBody> {
    let Rejection {
        error,
        project,
        credential,
        rate_headers,
    } = rejection;
    let target = project.as_deref().unwrap_or(&state.unauthenticated);
    let reason = error.reason();
    target.count_rejection(reason);
    let status = error.status();
    target.count_request(&live.other, status.as_u16());
    target.duration.observe(started.elapsed());
    if status.is_server_error() {
        tracing::warn!(
            project = %target.name,
            credential = credential.as_deref().unwrap_or(""),
            status = status.as_u16(),
            reason,
            "request failed"
        );
    } else {
        tracing::info!(
            project = %target.name,
            credential = credential.as_deref().unwrap_or(""),
            status = status.as_u16(),
            reason,
            "request refused"
        );
    }
    let mut response = error.into_response();
    if let Some(standing) = &rate_headers {
        add_rate_headers(response.headers_mut(), standing);
    }
    response
}

async fn forward(
    view: &Arc<View>,
    parts: Parts,
    body: Incoming,
    started: Instant,
) -> Result<Response<ProxyBody>, Rejection> {
    let (live, client) = (&view.live, &view.upstream);
    // 1. route
    let path = parts.uri.path();
    if !path.starts_with("/v1/") {
        return Err(ProxyError::InvalidUrl {
            method: parts.method.to_string(),
            path: path.to_owned(),
        }
        .into());
    }

    // 2. authenticate
    let now = Utc::now();
    let who = crate::auth::authenticate(&live.config, &parts.headers, now)?;
    let (Some(project), Some(project_state)) = (
        live.config.projects.get(who.project),
        live.states.get(who.project),
    ) else {
        return Err(ProxyError::Internal.into());
    };
    let Some(credential) = project.credentials.get(who.credential) else {
        return Err(ProxyError::Internal.into());
    };
    let fail = |error: ProxyError| Rejection {
        error,
        project: Some(project_state.clone()),
        credential: Some(credential.name.clone()),
        rate_headers: None,
    };
    if project.archived {
        return Err(fail(ProxyError::ArchivedProject(project.name.to_string())));
    }
    let in_flight = InFlight::enter(project_state.clone());

    // 3. inspect
    let max_body = live.config.server.max_body_bytes;
    let body_timeout = live.config.server.body_read_timeout;
    let mut inspected = Inspected::default();
    let mut body_len = 0u64;
    let mut rewrite = false;
    let upstream_body = match body_kind(&parts) {
        BodyKind::Json => {
            let bytes = read_limited(body, &parts.headers, max_body, body_timeout)
                .await
                .map_err(fail)?;
            body_len = bytes.len() as u64;
            if !bytes.is_empty() {
                inspected = inspect::inspect_json(&bytes).map_err(fail)?;
            }
            let bytes = if inspected.stream
                && !inspected.include_usage
                && parts.method == Method::POST
                && inspect::takes_stream_options(path)
            {
                rewrite = true;
                inspect::add_include_usage(&bytes, &inspected).map_err(fail)?
            } else {
                bytes
            };
            Either::Left(Full::new(bytes))
        }
        BodyKind::Multipart(boundary) => {
            let bytes = read_limited(body, &parts.headers, max_body, body_timeout)
                .await
                .map_err(fail)?;
            body_len = bytes.len() as u64;
            // Boxed: its parser's state is 2 KiB, which would otherwise widen every request's
            // future (copied whole into the box the server puts it in).
            inspected.model = Box::pin(inspect::multipart_model(bytes.clone(), &boundary))
                .await
                .map_err(fail)?;
            Either::Left(Full::new(bytes))
        }
        BodyKind::Stream => Either::Right(body),
    };

    // 4. check policy
    let list_models = parts.method == Method::GET && path == "/v1/models";
    let path_model = inspect::path_model(path);
    if let Some(model) = inspected.model.as_deref().or(path_model) {
        if !project.models.allows(model) {
            let error = if inspected.model.is_none() && parts.method == Method::GET {
                ProxyError::ModelNotFound(model.to_owned())
            } else {
                ProxyError::ModelNotAllowed {
                    project: project.name.to_string(),
                    model: model.to_owned(),
                }
            };
            return Err(fail(error));
        }
        if credential
            .allowed_models
            .as_ref()
            .is_some_and(|allowed| !allowed.is_match(model))
        {
            return Err(fail(ProxyError::ModelNotAllowed {
                project: project.name.to_string(),
                model: model.to_owned(),
            }));
        }
    }

    // 5. reserve
    let requested = inspected.model.as_deref().or(path_model);
    let estimate = if parts.method == Method::POST {
        estimate(live, path, requested, body_len, &inspected)
    } else {
        Estimate::default()
    };
    // Rate limits first: a request they refuse reserves nothing.
    let rate =
        match requested.and_then(|m| project.rate_limits.iter().find(|r| r.matcher.is_match(m))) {
            Some(rule) => {
                let meters = project_state.meters(rule);
                let at = crate::ratelimit::now_nanos();
                match meters.admit(estimate.charge.tokens, at) {
                    Ok(standing) => Some((meters, standing)),
                    Err((limited, refused)) => {
                        let mut headers = crate::ratelimit::Headers::default();
                        match limited {
                            RateLimited::TokensPerMinute => headers.tokens = Some(refused.standing),
                            _ => headers.requests = Some(refused.standing),
                        }
                        let error = ProxyError::RateLimited {
                            message: rate_message(
                                requested.unwrap_or(""),
                                &project.name,
                                limited,
                                &refused,
                                estimate.charge.tokens,
                            ),
                            kind: limited.kind(),
                            retry_after: refused.retry_after,
                        };
                        return Err(Rejection {
                            rate_headers: Some(headers),
                            ..fail(error)
                        });
                    }
                }
            }
            None => None,
        };
    let (reservation, credential_reservation) = if parts.method == Method::POST {
        let limit = project.budget.as_ref();
        let reservation = project_state
            .account
            .reserve(limit, estimate.charge, now)
            .map_err(|exhausted| {
                fail(spent(
                    &format!("Project `{}`", project.name),
                    limit,
                    exhausted,
                    now,
                    false,
                ))
            })?;
        let credential_reservation = match &credential.budget {
            None => None,
            Some(limit) => match project_state
                .credential_account(&credential.name, limit.period, now)
                .reserve(Some(limit), estimate.charge, now)
            {
                Ok(held) => Some(held),
                Err(exhausted) => {
                    reservation.cancel();
                    let who = format!(
                        "Credential `{}` of project `{}`",
                        credential.name, project.name
                    );
                    return Err(fail(spent(&who, Some(limit), exhausted, now, true)));
                }
            },
        };
        (Some(reservation), credential_reservation)
    } else {
        (None, None)
    };
    if let Some((meters, _)) = &rate {
        if reservation.is_none() {
            // Nothing will settle these tokens: give them back now.
            meters.settle_tokens(estimate.charge.tokens, 0, crate::ratelimit::now_nanos());
        }
    }

    // 6. forward
    let path_and_query = parts.uri.path_and_query().map_or(path, |pq| pq.as_str());
    let uri = client
        .uri(path_and_query)
        .map_err(|_| fail(ProxyError::Internal))?;
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    // (The client's Authorization is replaced below.)
    match client.host() {
        Some(host) => headers.insert(header::HOST, host.clone()),
        None => headers.remove(header::HOST),
    };
    headers.remove(OPENAI_PROJECT);
    headers.remove(OPENAI_ORGANIZATION);
    if rewrite {
        // The body changed length (the client sees its own bytes; hyper sets the new length),
        // and the usage chunk can only be taken out of an uncompressed stream.
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    if list_models {
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    headers.insert(header::AUTHORIZATION, project.authorization.clone());
    if let Some(value) = &project.openai_project {
        headers.insert(OPENAI_PROJECT, value.clone());
    }
    if let Some(value) = &project.openai_organization {
        headers.insert(OPENAI_ORGANIZATION, value.clone());
    }
    let mut outgoing = Request::new(upstream_body);
    *outgoing.method_mut() = parts.method;
    *outgoing.uri_mut() = uri;
    *outgoing.headers_mut() = headers;

    let rate_headers = rate.as_ref().map(|(_, standing)| *standing);
    let mut settlement = Settlement {
        credential_reservation,
        rate: rate.map(|(meters, _)| meters),
        view: view.clone(),
        admitted: now.date_naive(),
        who,
        state: project_state.clone(),
        credential: credential.name.clone(),
        // The body's model moves here (it is not read again); a path's is copied.
        requested: inspected
            .model
            .take()
            .or_else(|| path_model.map(str::to_owned)),
        reservation,
        estimate,
        status: 0,
        started,
        first_byte_ms: 0,
        done: false,
        _in_flight: in_flight,
    };
    let sent = Instant::now();
    let upstream = &live.config.upstream;
    let response = match tokio::time::timeout(upstream.request_timeout, client.send(outgoing)).await
    {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => {
            tracing::warn!(project = %project.name, error = %ErrorChain(&err), "upstream request failed");
            // Never reached the upstream, or it closed before answering: nothing was generated.
            settlement.abandon(Usage::default());
            return Err(fail(ProxyError::UpstreamUnreachable));
        }
        Err(_) => {
            // The upstream may have done the work: charge the estimate.
            let estimate = settlement.estimated_usage();
            settlement.abandon(estimate);
            return Err(fail(ProxyError::UpstreamTimeout));
        }
    };
    let first_byte = sent.elapsed();
    project_state.first_byte.observe(first_byte);
    settlement.first_byte_ms = u64::try_from(first_byte.as_millis()).unwrap_or(u64::MAX);

    // 7. meter
    let (mut head, incoming) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    settlement.status = head.status.as_u16();
    add_budget_headers(&mut head.headers, project, settlement.period_snapshot());
    if let Some(standing) = &rate_headers {
        add_rate_headers(&mut head.headers, standing);
    }
    if !head.status.is_success() {
        // The upstream's own error: passed through unchanged, charged nothing.
        settlement.release();
        let body = ProxyBody::upstream(incoming, upstream.idle_timeout, None, None, None);
        return Ok(Response::from_parts(head, body));
    }
    if list_models {
        let body = filter_model_list(incoming, project).await;
        settlement.release();
        head.headers.remove(header::CONTENT_LENGTH);
        head.headers.remove(header::CONTENT_ENCODING);
        return Ok(Response::from_parts(head, ProxyBody::full(body)));
    }
    let format = response_format(&head.headers);
    let encoding = Encoding::from_header(
        head.headers
            .get(header::CONTENT_ENCODING)
            .map(HeaderValue::as_bytes),
    );
    let filter = (rewrite && format == Some(Format::Sse) && encoding == Some(Encoding::Identity))
        .then(UsageChunkFilter::new);
    // The filter scans every event anyway and reports what a meter would: one scan, not two.
    let meter = match (format, encoding, &filter) {
        (Some(format), Some(encoding), None) => Some(Meter::new(format, encoding)),
        _ => None,
    };
    if filter.is_some() {
        head.headers.remove(header::CONTENT_LENGTH);
    }
    settlement.estimate.streamed = format == Some(Format::Sse);
    let body = ProxyBody::upstream(
        incoming,
        upstream.idle_timeout,
        meter,
        filter,
        Some(Box::new(settlement)),
    );
    Ok(Response::from_parts(head, body))
}

const OPENAI_PROJECT: HeaderName = HeaderName::from_static("openai-project");
const OPENAI_ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
const X_TOLLGATE_PROJECT: HeaderName = HeaderName::from_static("x-tollgate-project");
const X_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-tollgate-budget-remaining-tokens");
const X_REMAINING_USD: HeaderName = HeaderName::from_static("x-tollgate-budget-remaining-usd");

enum BodyKind {
    Json,
    Multipart(String),
    Stream,
}

fn body_kind(parts: &Parts) -> BodyKind {
    // A POST to an endpoint that takes JSON is read as JSON, whatever its `Content-Type` says
    // (or if it has none): an upstream may read it as JSON anyway, and its model must pass the
    // allowlist first. Anything else unreadable goes through as it is.
    let otherwise = if parts.method == Method::POST && inspect::takes_json(parts.uri.path()) {
        BodyKind::Json
    } else {
        BodyKind::Stream
    };
    let Some(content_type) = parts.headers.get(header::CONTENT_TYPE) else {
        return otherwise;
    };
    let essence = media_type(content_type);
    if essence.eq_ignore_ascii_case(b"application/json")
        || essence
            .get(essence.len().saturating_sub(5)..)
            .is_some_and(|suffix| suffix.eq_ignore_ascii_case(b"+json"))
    {
        return BodyKind::Json;
    }
    if essence.eq_ignore_ascii_case(b"multipart/form-data")
        && inspect::multipart_names_model(parts.uri.path())
    {
        if let Some(boundary) = content_type
            .to_str()
            .ok()
            .and_then(|value| multer::parse_boundary(value).ok())
        {
            return BodyKind::Multipart(boundary);
        }
    }
    otherwise
}

/// The media type of a `Content-Type` value, without its parameters or the space around it
/// (`application/json` of `application/json; charset=utf-8`), as bytes: compared without a
/// copy or a UTF-8 check.
fn media_type(value: &HeaderValue) -> &[u8] {
    let bytes = value.as_bytes();
    let end = memchr::memchr(b';', bytes).unwrap_or(bytes.len());
    bytes.get(..end).unwrap_or_default().trim_ascii()
}

/// Reads a body that must be inspected, refusing more than `max` bytes.
async fn read_limited(
    body: Incoming,
    headers: &HeaderMap,
    max: u64,
    timeout: std::time::Duration,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(ProxyError::BodyTooLarge(max));
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ProxyError::BodyTimeout)?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge(max))
        }
        Err(_) => Err(ProxyError::BodyRead),
    }
}

/// What a request reserves, and what is charged if its usage never arrives.
#[derive(Debug, Clone, Copy, Default)]
struct Estimate {
    charge: Charge,
    input_tokens: u64,
    output_tokens: u64,
    /// The response streamed: a cut stream is charged per event seen, not the output cap.
    streamed: bool,
}

/// The estimate of a request: its body length as input tokens (a token is at least one byte of
/// text, so this bounds a text prompt from above) plus its output cap, or the configured
/// default when it sets none.
fn estimate(
    live: &Live,
    path: &str,
    model: Option<&str>,
    body_len: u64,
    inspected: &Inspected,
) -> Estimate {
    let output_tokens = if inspect::input_only(path) {
        0
    } else {
        inspected
            .max_output_tokens
            .unwrap_or(live.config.reservation.default_output_tokens)
    };
    let usage = Usage {
        input_tokens: body_len,
        cached_input_tokens: 0,
        output_tokens,
        reasoning_tokens: 0,
    };
    let price = live.config.pricing.resolve(model.unwrap_or("")).price;
    Estimate {
        charge: Charge {
            tokens: usage.total(),
            micro_usd: price.cost_micro_usd(&usage),
        },
        input_tokens: body_len,
        output_tokens,
        streamed: false,
    }
}

/// The 429 for a budget (`who`'s) that cannot take the request.
fn spent(
    who: &str,
    limit: Option<&BudgetLimit>,
    exhausted: Exhausted,
    now: chrono::DateTime<Utc>,
    credential: bool,
) -> ProxyError {
    let period = limit.map_or(crate::period::Period::Monthly, |l| l.period);
    let retry_after_secs = period
        .bounds(now)
        .1
        .map(|end| u64::try_from(end - now.timestamp()).unwrap_or(0).max(1));
    let limit = match exhausted {
        Exhausted::Tokens { limit } => format!("{limit} tokens"),
        Exhausted::Usd { limit_micro_usd } => format!("${}", usd(limit_micro_usd)),
    };
    let message = budget_message(who, period.as_str(), &limit, retry_after_secs);
    if credential {
        ProxyError::CredentialBudgetExceeded {
            message,
            retry_after_secs,
        }
    } else {
        ProxyError::BudgetExceeded {
            message,
            retry_after_secs,
        }
    }
}

/// OpenAI's wording for a rate limit, e.g. "Rate limit reached for gpt-4o-mini in project
/// search on requests per min (RPM): Limit 500, Used 500, Requested 1. Please try again in
/// 120ms."
fn rate_message(
    model: &str,
    project: &str,
    limited: RateLimited,
    refused: &crate::ratelimit::Refused,
    tokens: u64,
) -> String {
    let requested = match limited {
        RateLimited::TokensPerMinute => tokens,
        _ => 1,
    };
    let limit = refused.standing.limit;
    format!(
        "Rate limit reached for {model} in project {project} on {}: Limit {limit}, Used {}, Requested {requested}. Please try again in {}.",
        limited.describe(),
        limit - refused.standing.remaining,
        crate::ratelimit::format_reset(refused.retry_after),
    )
}

fn add_rate_headers(headers: &mut HeaderMap, standing: &crate::ratelimit::Headers) {
    use crate::ratelimit::format_reset;
    let mut put = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
    };
    if let Some(requests) = standing.requests {
        put("x-ratelimit-limit-requests", requests.limit.to_string());
        put(
            "x-ratelimit-remaining-requests",
            requests.remaining.to_string(),
        );
        put("x-ratelimit-reset-requests", format_reset(requests.reset));
    }
    if let Some(tokens) = standing.tokens {
        put("x-ratelimit-limit-tokens", tokens.limit.to_string());
        put("x-ratelimit-remaining-tokens", tokens.remaining.to_string());
        put("x-ratelimit-reset-tokens", format_reset(tokens.reset));
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of a dozen lookups.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

fn response_format(headers: &HeaderMap) -> Option<Format> {
    let essence = media_type(headers.get(header::CONTENT_TYPE)?);
    if essence.eq_ignore_ascii_case(b"text/event-stream") {
        Some(Format::Sse)
    } else if essence.eq_ignore_ascii_case(b"application/json") {
        Some(Format::Json)
    } else {
        None
    }
}

fn add_budget_headers(
    headers: &mut HeaderMap,
    project: &Project,
    spend: Option<crate::budget::SpendSnapshot>,
) {
    headers.insert(X_TOLLGATE_PROJECT, project.name_header.clone());
    let (Some(limit), Some(spend)) = (project.budget, spend) else {
        return;
    };
    if let Some(tokens) = limit.tokens {
        let left = tokens.saturating_sub(spend.tokens + spend.reserved_tokens);
        headers.insert(X_REMAINING_TOKENS, HeaderValue::from(left));
    }
    if let Some(micro) = limit.micro_usd {
        let left = micro.saturating_sub(spend.micro_usd + spend.reserved_micro_usd);
        if let Ok(value) = HeaderValue::try_from(usd(left)) {
            headers.insert(X_REMAINING_USD, value);
        }
    }
}

/// Keeps only the models the project may use in a `GET /v1/models` answer.
async fn filter_model_list(body: Incoming, project: &Project) -> Bytes {
    let empty = || Bytes::from_static(br#"{"object":"list","data":[]}"#);
    let Ok(collected) = Limited::new(body, MAX_MODEL_LIST_BYTES).collect().await else {
        return empty();
    };
    let Ok(mut list) = serde_json::from_slice::<serde_json::Value>(&collected.to_bytes()) else {
        return empty();
    };
    if let Some(data) = list.get_mut("data").and_then(|d| d.as_array_mut()) {
        data.retain(|model| {
            model
                .get("id")
                .and_then(|id| id.as_str())
                .is_some_and(|id| project.models.allows(id))
        });
    }
    serde_json::to_vec(&list)
        .map(Bytes::from)
        .unwrap_or_else(|_| empty())
}

/// Counts a project's requests in flight for as long as it lives.
struct InFlight(Arc<ProjectState>);

impl InFlight {
    fn enter(state: Arc<ProjectState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The end of a forwarded request: replaces the reservation with the real charge and records
/// it. Runs once, from the response body (see `body::Watch`) or from the early exits above.
struct Settlement {
    /// The credential's own budget, when it has one.
    credential_reservation: Option<Reservation>,
    /// The rate-limit meters that took this request's estimated tokens.
    rate: Option<Arc<crate::ratelimit::RuleMeters>>,
    /// The app and the live config the request was admitted under.
    view: Arc<View>,
    /// The UTC day the request was admitted: its ledger row.
    admitted: chrono::NaiveDate,
    /// The project and credential, in `view`'s config.
    who: crate::config::CredentialRef,
    state: Arc<ProjectState>,
    credential: Arc<str>,
    requested: Option<String>,
    reservation: Option<Reservation>,
    estimate: Estimate,
    status: u16,
    started: Instant,
    /// Until the upstream's response headers arrived.
    first_byte_ms: u64,
    done: bool,
    _in_flight: InFlight,
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if !self.done {
            // The client went away before the upstream answered (the request future was
            // dropped): the upstream may have done the work, so the estimate is charged.
            if self.status == 0 {
                self.status = CLIENT_CLOSED;
            }
            let estimate = self.estimated_usage();
            self.record(estimate, None);
        }
    }
}

/// nginx's status for a request whose client went away first.
const CLIENT_CLOSED: u16 = 499;

impl Settlement {
    fn period_snapshot(&self) -> Option<crate::budget::SpendSnapshot> {
        match &self.reservation {
            Some(r) => Some(r.period().snapshot()),
            None => {
                let project = self.view.live.config.projects.get(self.who.project)?;
                let kind = project.budget.map(|b| b.period)?;
                Some(self.state.account.period(kind, Utc::now()).snapshot())
            }
        }
    }

    /// Nothing was generated: give the reservation back.
    fn release(&mut self) {
        self.record(Usage::default(), None);
    }

    fn estimated_usage(&self) -> Usage {
        Usage {
            input_tokens: self.estimate.input_tokens,
            output_tokens: self.estimate.output_tokens,
            ..Usage::default()
        }
    }

    /// Settles without answering: the caller answers with an error of its own, which counts
    /// the request.
    fn abandon(&mut self, usage: Usage) {
        self.done = true;
        let view = self.view.clone();
        if let Some((label, micro_usd)) = self.charge(&view, &usage, None) {
            if usage.total() > 0 {
                let slot = self.add_usage(label, &usage, micro_usd, false);
                self.to_ledger(slot, label, &usage, micro_usd);
            }
        }
    }

    /// The credential's usage slot, if it holds `label`'s counters; with `fill`, an empty slot
    /// is given them first (only for a request answered 200, so that the slot's counter of
    /// 200s never shows a model with none).
    fn slot(&self, label: &Arc<str>, fill: bool) -> Option<&UsageSlot> {
        let slot = self.view.live.usage_slot(self.who)?;
        let kept = match slot.get() {
            Some(kept) => kept,
            None if fill => {
                // Another request of this credential may fill it first: either is right.
                let _ = slot.set(UsageSlot {
                    label: label.clone(),
                    usage: self.state.cell(&self.credential, label),
                    answered: self.state.request_counter(label, StatusCode::OK.as_u16()),
                    pending: arc_swap::ArcSwapOption::empty(),
                });
                slot.get()?
            }
            None => return None,
        };
        (Arc::ptr_eq(&kept.label, label) || kept.label == *label).then_some(kept)
    }

    /// Adds to the credential's lifetime usage of `label`, through its slot when the slot holds
    /// `label` (filling an empty one with `fill`, see [`Self::slot`]); returns that slot.
    fn add_usage(
        &self,
        label: &Arc<str>,
        usage: &Usage,
        micro_usd: u64,
        fill: bool,
    ) -> Option<&UsageSlot> {
        let slot = self.slot(label, fill);
        match slot {
            Some(slot) => slot.usage.add(usage, micro_usd),
            None => self
                .state
                .cell(&self.credential, label)
                .add(usage, micro_usd),
        }
        slot
    }

    /// Adds to the ledger's pending usage of `model` on the day of admission: through the
    /// cell the credential's usage slot keeps for `model` (`slot`, when it holds `model`'s
    /// counters), which is made or renewed by a lookup when it is missing or of another day.
    fn to_ledger(&self, slot: Option<&UsageSlot>, model: &Arc<str>, usage: &Usage, micro_usd: u64) {
        let pending = &self.view.app.pending;
        let delta = UsageDelta::request(usage, micro_usd);
        let key = KeyRef {
            project: &self.state.name,
            credential: &self.credential,
            model,
            day: self.admitted,
        };
        let Some(slot) = slot else {
            pending.add(key, &delta);
            return;
        };
        if let Some(cell) = &*slot.pending.load() {
            if cell.day() == self.admitted {
                pending.add_to(cell, &delta);
                return;
            }
        }
        // The slot's first settle, or the first of a new day (or a request admitted before
        // midnight settling after one that was admitted after it: the other day's cell then
        // takes its turn in the slot, which is right either way).
        let cell = pending.cell(key);
        pending.add_to(&cell, &delta);
        slot.pending.store(Some(cell));
    }

    /// Replaces the reservation with the charge for `usage`; returns the model label (of
    /// `view`, this request's: borrowed, since the label's count is shared by every request)
    /// and cost.
    fn charge<'v>(
        &mut self,
        view: &'v View,
        usage: &Usage,
        reported_model: Option<&str>,
    ) -> Option<(&'v Arc<str>, u64)> {
        let project = view.live.config.projects.get(self.who.project)?;
        let model = reported_model.or(self.requested.as_deref());
        let pricing = &view.live.config.pricing;
        let (label, price) = match model.and_then(|m| pricing.entry(m)) {
            Some((name, price)) => (name, *price),
            None => {
                if usage.total() > 0 {
                    self.state.unpriced.fetch_add(1, Ordering::Relaxed);
                }
                let label = model
                    .and_then(|m| project.models.exact_allowed.iter().find(|e| &***e == m))
                    .unwrap_or(&view.live.other);
                (label, pricing.fallback)
            }
        };
        let micro_usd = price.cost_micro_usd(usage);
        let charge = Charge {
            tokens: usage.total(),
            micro_usd,
        };
        if let Some(reservation) = self.reservation.take() {
            let period = reservation.period().clone();
            reservation.settle(charge, usage);
            if let Some(limit) = &project.budget {
                for index in period.crossed(limit, &project.alert_at) {
                    self.view
                        .app
                        .alerts
                        .fire(project, &self.state, limit, &period, index);
                }
            }
        }
        if let Some(reservation) = self.credential_reservation.take() {
            reservation.settle(charge, usage);
        }
        if let Some(meters) = self.rate.take() {
            meters.settle_tokens(
                self.estimate.charge.tokens,
                usage.total(),
                crate::ratelimit::now_nanos(),
            );
        }
        Some((label, micro_usd))
    }

    fn record(&mut self, usage: Usage, reported_model: Option<&str>) {
        if self.done {
            return;
        }
        self.done = true;
        let view = self.view.clone();
        let Some((label, micro_usd)) = self.charge(&view, &usage, reported_model) else {
            return;
        };
        let Some(project) = view.live.config.projects.get(self.who.project) else {
            return;
        };
        let model = reported_model.or(self.requested.as_deref());
        let status = if self.status == 0 {
            StatusCode::BAD_GATEWAY.as_u16()
        } else {
            self.status
        };
        let ok = status == StatusCode::OK.as_u16();
        let slot = self.add_usage(label, &usage, micro_usd, ok);
        match slot {
            // Relaxed: an independent monotonic counter, read only for metrics.
            Some(slot) if ok => _ = slot.answered.fetch_add(1, Ordering::Relaxed),
            _ => self.state.count_request(label, status),
        }
        self.to_ledger(slot, label, &usage, micro_usd);
        let elapsed = self.started.elapsed();
        self.state.duration.observe(elapsed);
        logging::request(&logging::RequestLine {
            project: &project.name,
            credential: &self.credential,
            model: model.unwrap_or(""),
            status,
            input_tokens: usage.input_tokens,
            cached_input_tokens: usage.cached_input_tokens,
            output_tokens: usage.output_tokens,
            reasoning_tokens: usage.reasoning_tokens,
            cost_usd: usd(micro_usd).as_str(),
            duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            upstream_first_byte_ms: self.first_byte_ms,
        });
    }
}

impl Settle for Settlement {
    fn settle(mut self: Box<Self>, report: Report, ending: Ending) {
        let ending = if report.incomplete {
            Ending::Cut
        } else {
            ending
        };
        let usage = match report.usage {
            Some(usage) => usage,
            // The body ended cleanly and reported nothing (moderations, files): free.
            None if ending == Ending::Complete && !report.malformed => Usage::default(),
            // Cut short or unreadable: charge what was likely generated.
            None => Usage {
                input_tokens: self.estimate.input_tokens,
                output_tokens: if self.estimate.streamed && !report.malformed {
                    report.events
                } else {
                    self.estimate.output_tokens
                },
                ..Usage::default()
            },
        };
        if report.usage.is_none() && (ending == Ending::Cut || report.malformed) {
            tracing::warn!(
                project = %self.state.name,
                credential = %self.credential,
                events = report.events,
                malformed = report.malformed,
                "response ended without readable usage; charging an estimate"
            );
        }
        self.record(usage, report.model.as_deref());
    }
}

/// Displays an error with its sources, for logs.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(method: Method, path: &str, content_type: Option<&[u8]>) -> String {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(value) = content_type {
            request = request.header(
                header::CONTENT_TYPE,
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        match body_kind(&request.body(()).unwrap().into_parts().0) {
            BodyKind::Json => "json".to_owned(),
            BodyKind::Multipart(boundary) => format!("multipart {boundary}"),
            BodyKind::Stream => "stream".to_owned(),
        }
    }

    #[test]
    fn body_kinds_by_media_type_and_endpoint() {
        let post = |path: &str, value: &[u8]| kind(Method::POST, path, Some(value));
        let chat = "/v1/chat/completions";
        for json in [
            &b"application/json"[..],
            b"Application/JSON; charset=utf-8",
            b" application/json ;x=1",
            b"application/vnd.api+JSON",
            b"application/json; x=\xff",
        ] {
            assert_eq!(post("/v1/files", json), "json", "{json:?}");
        }
        assert_eq!(
            post(
                "/v1/audio/transcriptions",
                b"multipart/form-data; boundary=X"
            ),
            "multipart X"
        );
        assert_eq!(
            post("/v1/files", b"multipart/form-data; boundary=X"),
            "stream"
        );
        assert_eq!(post("/v1/files", b"application/jsonx"), "stream");
        assert_eq!(post("/v1/files", b"json"), "stream");
        // An endpoint that takes JSON is read as JSON, whatever the header says.
        assert_eq!(post(chat, b"text/plain"), "json");
        assert_eq!(post(chat, b"multipart/form-data; boundary=X"), "json");
        assert_eq!(kind(Method::POST, chat, None), "json");
        assert_eq!(kind(Method::GET, chat, Some(b"text/plain")), "stream");
        assert_eq!(kind(Method::POST, "/v1/files", None), "stream");
    }

    #[test]
    fn response_formats_by_media_type() {
        let format = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            response_format(&headers)
        };
        assert_eq!(
            format("text/event-stream; charset=utf-8"),
            Some(Format::Sse)
        );
        assert_eq!(format("Application/Json"), Some(Format::Json));
        assert_eq!(format("text/plain"), None);
        assert_eq!(response_format(&HeaderMap::new()), None);
    }
}
