//! Bearer-token authentication: hash the presented token, look the hash up, check the
//! credential and its project.
//!
//! Invariant: a token is never stored, logged or compared in clear; only its SHA-256 is looked
//! up, and every refusal names no part of the token.

use chrono::{DateTime, Utc};
use http::{header, HeaderMap};
use sha2::{Digest, Sha256};

use crate::config::{Config, CredentialRef, TokenHash};
use crate::error::ProxyError;

/// SHA-256 of a token, as it is kept in the config.
pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Who is calling: the credential that `headers` authenticate, checked against `now`. Whether
/// its project is archived is the caller's check, so that the refusal counts for the project.
pub fn authenticate(
    config: &Config,
    headers: &HeaderMap,
    now: DateTime<Utc>,
) -> Result<CredentialRef, ProxyError> {
    let token = bearer(headers).ok_or(ProxyError::MissingToken)?;
    let found = *config
        .tokens
        .get(&hash_token(token))
        .ok_or(ProxyError::InvalidToken)?;
    let project = config
        .projects
        .get(found.project)
        .ok_or(ProxyError::Internal)?;
    let credential = project
        .credentials
        .get(found.credential)
        .ok_or(ProxyError::Internal)?;
    if credential.disabled {
        return Err(ProxyError::DisabledToken);
    }
    if credential.expires_at.is_some_and(|at| at <= now) {
        return Err(ProxyError::ExpiredToken);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tg-abc"),
        );
        assert_eq!(bearer(&headers), Some("tg-abc"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  tg-abc "),
        );
        assert_eq!(bearer(&headers), Some("tg-abc"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcg=="),
        );
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn hash_matches_sha256sum() {
        // printf %s abc | sha256sum
        assert_eq!(
            hex::encode(hash_token("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
