//! Reading what a request asks for: the model it names (JSON field, multipart field, path),
//! whether it streams, how much output it may produce; and the one rewrite tollgate makes,
//! adding `stream_options.include_usage` to streamed chat and legacy completions.
//!
//! Invariant: only the fields below are deserialized (the rest is skipped by serde without
//! allocating); a body is rewritten only when the client did not ask for usage itself.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ProxyError;

/// What tollgate reads from a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspected {
    pub model: Option<String>,
    pub stream: bool,
    /// The client's own `stream_options.include_usage`.
    pub include_usage: bool,
    /// Whether the body has a `stream_options` object at all.
    pub has_stream_options: bool,
    /// The request's cap on output tokens (`max_completion_tokens`, `max_tokens` or
    /// `max_output_tokens`), times `n` choices.
    pub max_output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    n: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Reads a JSON request body. A body that is not a JSON object is refused: where tollgate must
/// read a model it cannot let an unreadable body through.
pub fn inspect_json(body: &[u8]) -> Result<Inspected, ProxyError> {
    // Skipped strings are not checked by serde: check the whole body once, then parse it as
    // the text it now is (no second UTF-8 check of the strings serde reads).
    let text = std::str::from_utf8(body).map_err(|_| ProxyError::InvalidJson)?;
    let probe: Probe<'_> = serde_json::from_str(text).map_err(|_| ProxyError::InvalidJson)?;
    let model = match probe.model {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => Some(
            serde_json::from_str::<String>(raw.get()).map_err(|_| ProxyError::InvalidModelType)?,
        ),
    };
    let cap = probe
        .max_completion_tokens
        .or(probe.max_tokens)
        .or(probe.max_output_tokens);
    Ok(Inspected {
        model,
        stream: probe.stream.unwrap_or(false),
        include_usage: probe
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        has_stream_options: probe.stream_options.is_some(),
        max_output_tokens: cap.map(|c| c.saturating_mul(probe.n.unwrap_or(1).max(1))),
    })
}

/// The body with `stream_options.include_usage = true` added, for a client that streams
/// without asking for usage.
pub fn add_include_usage(body: &[u8], inspected: &Inspected) -> Result<Bytes, ProxyError> {
    if !inspected.has_stream_options {
        // Cheap path: splice the member in after the opening brace; the body is a JSON
        // object (inspect_json proved it), so the result is too.
        let start = body
            .iter()
            .position(|&b| b == b'{')
            .ok_or(ProxyError::InvalidJson)?;
        let rest = &body[start + 1..];
        let member: &[u8] = br#""stream_options":{"include_usage":true}"#;
        let needs_comma = rest
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b != b'}');
        let mut out = Vec::with_capacity(body.len() + member.len() + 1);
        out.extend_from_slice(&body[..=start]);
        out.extend_from_slice(member);
        if needs_comma {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        return Ok(Bytes::from(out));
    }
    let mut value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|_| ProxyError::InvalidJson)?;
    match value.get_mut("stream_options") {
        Some(serde_json::Value::Object(options)) => {
            options.insert("include_usage".into(), serde_json::Value::Bool(true));
        }
        _ => {
            value.insert(
                "stream_options".into(),
                serde_json::json!({ "include_usage": true }),
            );
        }
    }
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|_| ProxyError::Internal)
}

/// The `model` field of a multipart form (audio transcriptions and translations, image edits).
pub async fn multipart_model(body: Bytes, boundary: &str) -> Result<Option<String>, ProxyError> {
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|_| ProxyError::InvalidMultipart)?
    {
        if field.name() == Some("model") {
            let text = field
                .text()
                .await
                .map_err(|_| ProxyError::InvalidMultipart)?;
            return Ok(Some(text.trim().to_owned()));
        }
    }
    Ok(None)
}

/// The model a path names: `/v1/models/{model}`.
pub fn path_model(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/models/")?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// Whether the response to `path` streams usage that tollgate can ask for with
/// `stream_options.include_usage` (chat and legacy completions only: the API refuses the
/// option elsewhere).
pub fn takes_stream_options(path: &str) -> bool {
    path == "/v1/chat/completions" || path == "/v1/completions"
}

/// Endpoints whose body is a JSON object that names a model: read as JSON whatever the
/// `Content-Type` says, so that no header lets a model past the allowlist unread.
pub fn takes_json(path: &str) -> bool {
    matches!(
        path,
        "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/responses"
            | "/v1/embeddings"
            | "/v1/moderations"
            | "/v1/images/generations"
            | "/v1/audio/speech"
    )
}

/// Endpoints whose multipart body names a model.
pub fn multipart_names_model(path: &str) -> bool {
    matches!(
        path,
        "/v1/audio/transcriptions"
            | "/v1/audio/translations"
            | "/v1/images/edits"
            | "/v1/images/variations"
    )
}

/// Endpoints that report input tokens only.
pub fn input_only(path: &str) -> bool {
    matches!(path, "/v1/embeddings" | "/v1/moderations")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_stream_and_caps() {
        let got = inspect_json(
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":50,"n":2}"#,
        )
        .unwrap();
        assert_eq!(got.model.as_deref(), Some("gpt-4o-mini"));
        assert!(got.stream);
        assert!(!got.include_usage);
        assert_eq!(got.max_output_tokens, Some(100));
        let got =
            inspect_json(br#"{"model":"gpt\u002d4o","stream_options":{"include_usage":true}}"#)
                .unwrap();
        assert_eq!(got.model.as_deref(), Some("gpt-4o"));
        assert!(got.include_usage && got.has_stream_options);
    }

    #[test]
    fn refuses_unreadable_bodies_and_models() {
        assert!(matches!(
            inspect_json(b"{\"model\":"),
            Err(ProxyError::InvalidJson)
        ));
        assert!(matches!(
            inspect_json(b"[1,2]"),
            Err(ProxyError::InvalidJson)
        ));
        assert!(matches!(
            inspect_json(b"\xff\xfe"),
            Err(ProxyError::InvalidJson)
        ));
        assert!(matches!(
            inspect_json(br#"{"model":42}"#),
            Err(ProxyError::InvalidModelType)
        ));
        assert_eq!(inspect_json(br#"{"model":null}"#).unwrap().model, None);
    }

    #[test]
    fn adds_include_usage_keeping_other_options() {
        let body = br#"{"model":"m","stream":true}"#;
        let out = add_include_usage(body, &inspect_json(body).unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");

        let body = br#" { } "#;
        let out = add_include_usage(body, &inspect_json(body).unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);

        let body = br#"{"model":"m","stream":true,"stream_options":{"include_obfuscation":false}}"#;
        let out = add_include_usage(body, &inspect_json(body).unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["include_obfuscation"], false);
    }

    #[tokio::test]
    async fn reads_the_multipart_model_field() {
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF....\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n";
        let model = multipart_model(Bytes::from(body), "XyZ").await.unwrap();
        assert_eq!(model.as_deref(), Some("whisper-1"));
        assert!(multipart_model(Bytes::from_static(b"garbage"), "XyZ")
            .await
            .is_err());
    }

    #[test]
    fn path_models() {
        assert_eq!(path_model("/v1/models/gpt-4o"), Some("gpt-4o"));
        assert_eq!(path_model("/v1/models"), None);
        assert_eq!(path_model("/v1/models/"), None);
    }
}
