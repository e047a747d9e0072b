//! The errors tollgate answers itself, and the one place that turns them into OpenAI-shaped
//! responses: `{"error": {"message", "type", "param", "code"}}`.
//!
//! Invariant: every variant chooses its status, type, code and rejection label in one exhaustive
//! `match`; messages never carry a key, a token, an upstream body or an internal detail.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::body::ProxyBody;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("you didn't provide an API key: send it as `Authorization: Bearer <token>`")]
    MissingToken,
    #[error("incorrect API key provided")]
    InvalidToken,
    #[error("this API key has expired")]
    ExpiredToken,
    #[error("this API key has been disabled")]
    DisabledToken,
    #[error("project `{0}` is archived")]
    ArchivedProject(String),
    #[error("Project `{project}` does not have access to model `{model}`")]
    ModelNotAllowed { project: String, model: String },
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// The message names the project, the limit and the period (see `budget_message`).
    #[error("{message}")]
    BudgetExceeded {
        message: String,
        /// Seconds until the period resets; `None` for a `total` budget, which never does.
        retry_after_secs: Option<u64>,
    },
    /// Like `BudgetExceeded`, for a credential's own budget.
    #[error("{message}")]
    CredentialBudgetExceeded {
        message: String,
        retry_after_secs: Option<u64>,
    },
    /// OpenAI's words: "Rate limit reached for MODEL in project P on requests per min (RPM)…".
    #[error("{message}")]
    RateLimited {
        message: String,
        /// `requests` or `tokens`, OpenAI's error type for the limit.
        kind: &'static str,
        retry_after: std::time::Duration,
    },
    #[error("we could not parse the JSON body of your request")]
    InvalidJson,
    #[error("invalid type for 'model': expected a string")]
    InvalidModelType,
    #[error("could not read the multipart body of your request")]
    InvalidMultipart,
    #[error("request body is larger than the limit of {0} bytes")]
    BodyTooLarge(u64),
    #[error("request body could not be read")]
    BodyRead,
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("Invalid URL ({method} {path})")]
    InvalidUrl { method: String, path: String },
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("internal error")]
    Internal,
}

/// What a variant answers with.
struct Shape {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    /// Label of `tollgate_rejections_total{reason}`.
    reason: &'static str,
}

impl ProxyError {
    fn shape(&self) -> Shape {
        use ProxyError::*;
        let (status, kind, code, param, reason) = match self {
            MissingToken => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                None,
                None,
                "missing_token",
            ),
            InvalidToken => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                None,
                "invalid_token",
            ),
            ExpiredToken => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                None,
                "expired_token",
            ),
            DisabledToken => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                None,
                "disabled_token",
            ),
            ArchivedProject(_) => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                Some("project_archived"),
                None,
                "archived_project",
            ),
            ModelNotAllowed { .. } => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                Some("model_not_found"),
                Some("model"),
                "model_not_allowed",
            ),
            ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                Some("model"),
                "model_not_allowed",
            ),
            BudgetExceeded { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("project_spend_limit_exceeded"),
                None,
                "budget_exceeded",
            ),
            CredentialBudgetExceeded { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("credential_spend_limit_exceeded"),
                None,
                "credential_budget_exceeded",
            ),
            RateLimited { kind, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                *kind,
                Some("rate_limit_exceeded"),
                None,
                "rate_limited",
            ),
            InvalidJson => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                None,
                "invalid_json",
            ),
            InvalidModelType => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_type"),
                Some("model"),
                "invalid_model",
            ),
            InvalidMultipart => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                None,
                "invalid_multipart",
            ),
            BodyTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                None,
                "body_too_large",
            ),
            BodyRead => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                None,
                "body_read",
            ),
            BodyTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                Some("request_timeout"),
                None,
                "body_timeout",
            ),
            InvalidUrl { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                None,
                "invalid_url",
            ),
            UpstreamUnreachable => (
                StatusCode::BAD_GATEWAY,
                "server_error",
                Some("upstream_unreachable"),
                None,
                "upstream_unreachable",
            ),
            UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                Some("upstream_timeout"),
                None,
                "upstream_timeout",
            ),
            Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
                "internal",
            ),
        };
        Shape {
            status,
            kind,
            code,
            param,
            reason,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.shape().status
    }

    /// The label of `tollgate_rejections_total{reason}`.
    pub fn reason(&self) -> &'static str {
        self.shape().reason
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let shape = self.shape();
        let body = error_body(&self.to_string(), shape.kind, shape.param, shape.code);
        let mut response = Response::new(ProxyBody::full(body));
        *response.status_mut() = shape.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            ProxyError::BudgetExceeded {
                retry_after_secs, ..
            }
            | ProxyError::CredentialBudgetExceeded {
                retry_after_secs, ..
            } => {
                // The SDKs retry 429s unless told not to; a spent budget will not come back
                // soon.
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
                if let Some(secs) = retry_after_secs {
                    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
            }
            ProxyError::RateLimited { retry_after, .. } => {
                // A rate limit is worth retrying: the SDKs honour these and back off.
                let ms = u64::try_from(retry_after.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
                headers.insert("retry-after-ms", HeaderValue::from(ms));
            }
            _ => {}
        }
        response
    }
}

/// The message of a 429 for a spent budget, in the words OpenAI uses for a project limit.
/// `who` is `Project `NAME`` or `Credential `NAME` of project `NAME``.
pub fn budget_message(
    who: &str,
    period: &str,
    limit: &str,
    retry_after_secs: Option<u64>,
) -> String {
    match retry_after_secs {
        Some(secs) => format!(
            "{who} has exceeded its {period} spend limit of {limit}; it resets in {secs} seconds"
        ),
        None => {
            format!("{who} has exceeded its {period} spend limit of {limit}; it does not reset")
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// An OpenAI-shaped error body.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Bytes {
    let envelope = Envelope {
        error: ErrorObject {
            message,
            kind,
            param,
            code,
        },
    };
    serde_json::to_vec(&envelope)
        .map(Bytes::from)
        .unwrap_or_else(|_| Bytes::from_static(br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_not_allowed_uses_openai_wording() {
        let err = ProxyError::ModelNotAllowed {
            project: "search".into(),
            model: "gpt-4o".into(),
        };
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            err.to_string(),
            "Project `search` does not have access to model `gpt-4o`"
        );
    }

    #[test]
    fn budget_exceeded_tells_sdks_not_to_retry() {
        let err = ProxyError::BudgetExceeded {
            message: budget_message("Project `p`", "monthly", "100 tokens", Some(42)),
            retry_after_secs: Some(42),
        };
        assert_eq!(
            err.to_string(),
            "Project `p` has exceeded its monthly spend limit of 100 tokens; it resets in 42 seconds"
        );
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["x-should-retry"], "false");
        assert_eq!(response.headers()["retry-after"], "42");
    }
}
