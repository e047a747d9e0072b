//! The data path end to end: tollgate in front of the mock OpenAI upstream, driven by a real
//! HTTP client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::harness::*;
use common::mock_upstream::MockUpstream;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;

const TOKEN: &str = "tg-test-alpha-svc";
const TOKEN_EXPIRED: &str = "tg-test-alpha-expired";
const TOKEN_DISABLED: &str = "tg-test-alpha-disabled";
const TOKEN_ARCHIVED: &str = "tg-test-archived";
const TOKEN_OPEN: &str = "tg-test-open";

fn config(upstream: &str, budget: &str) -> String {
    format!(
        r#"
[admin]
token_env = "TOLLGATE_ADMIN_TOKEN"

[upstream]
base_url = "{upstream}"
request_timeout_ms = 1500
idle_timeout_ms = 400

[server]
max_body_bytes = 65536

[[projects]]
name = "alpha"
api_key_env = "OPENAI_KEY"
openai_project = "proj_alpha"
allowed_models = ["gpt-4o-mini", "gpt-4.1*", "text-embedding-3-small", "omni-moderation-latest", "gpt-4o-transcribe", "whisper-1", "gpt-image-1", "gpt-3.5-turbo-instruct", "o3"]
denied_models = ["gpt-4.1-nano"]
budget = {budget}

[[projects.credentials]]
name = "svc"
token_sha256 = "{svc}"

[[projects.credentials]]
name = "old"
token_sha256 = "{expired}"
expires_at = "2020-01-01T00:00:00Z"

[[projects.credentials]]
name = "off"
token_sha256 = "{disabled}"
disabled = true

[[projects]]
name = "archived"
api_key_env = "OPENAI_KEY"
archived = true

[[projects.credentials]]
name = "svc"
token_sha256 = "{archived}"

[[projects]]
name = "open"
api_key_env = "OPENAI_KEY"

[[projects.credentials]]
name = "svc"
token_sha256 = "{open}"
"#,
        svc = sha256_hex(TOKEN),
        expired = sha256_hex(TOKEN_EXPIRED),
        disabled = sha256_hex(TOKEN_DISABLED),
        archived = sha256_hex(TOKEN_ARCHIVED),
        open = sha256_hex(TOKEN_OPEN),
    )
}

const BIG_BUDGET: &str = r#"{ tokens = 100000000, usd = 1000.0, period = "monthly" }"#;

async fn setup() -> (MockUpstream, TestProxy) {
    let mock = MockUpstream::start().await;
    let proxy = TestProxy::start(&config(&mock.base_url(), BIG_BUDGET)).await;
    (mock, proxy)
}

fn chat(model: &str) -> serde_json::Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 50})
}

async fn project(proxy: &TestProxy, name: &str) -> serde_json::Value {
    let report = proxy.admin_json("/admin/projects").await;
    report["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no project {name} in {report}"))
}

#[tokio::test]
async fn swaps_the_token_for_the_real_key() {
    let (mock, proxy) = setup().await;
    let answer = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN,
        &chat("gpt-4o-mini"),
        &[
            ("x-request-id", "req-from-client"),
            ("openai-organization", "org-from-client"),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.headers["x-tollgate-project"], "alpha");
    assert_eq!(answer.headers["x-request-id"], "req-from-client");
    assert!(answer
        .headers
        .contains_key("x-tollgate-budget-remaining-tokens"));
    assert!(answer
        .headers
        .contains_key("x-tollgate-budget-remaining-usd"));

    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(
        request.headers["authorization"],
        format!("Bearer {REAL_KEY}").as_str()
    );
    assert_eq!(request.headers["openai-project"], "proj_alpha");
    // The upstream's own host, not the one the client addressed.
    assert_eq!(request.headers["host"], mock.addr.to_string().as_str());
    assert!(request.headers.get("openai-organization").is_none());
    assert_eq!(request.headers["x-request-id"], "req-from-client");
    let all_headers = format!("{:?}", request.headers);
    assert!(
        !all_headers.contains(TOKEN),
        "the internal token must not reach the upstream"
    );
    assert_eq!(
        request.body,
        Bytes::from(serde_json::to_vec(&chat("gpt-4o-mini")).unwrap())
    );
}

#[tokio::test]
async fn refuses_bad_credentials_with_openai_errors_and_never_forwards() {
    let (mock, proxy) = setup().await;
    let body = chat("gpt-4o-mini");

    let none = send(
        Method::POST,
        &proxy.url("/v1/chat/completions"),
        &[("content-type", "application/json")],
        Bytes::from(body.to_string()),
    )
    .await;
    assert_eq!(none.error(401)["type"], "invalid_request_error");

    let unknown = post_json(&proxy, "/v1/chat/completions", "tg-nope", &body, &[]).await;
    assert_eq!(unknown.error(401)["code"], "invalid_api_key");
    assert!(
        !unknown.text().contains("tg-nope"),
        "the token must not be echoed"
    );

    let expired = post_json(&proxy, "/v1/chat/completions", TOKEN_EXPIRED, &body, &[]).await;
    assert_eq!(expired.error(401)["code"], "invalid_api_key");
    let disabled = post_json(&proxy, "/v1/chat/completions", TOKEN_DISABLED, &body, &[]).await;
    assert_eq!(disabled.error(401)["code"], "invalid_api_key");

    let archived = post_json(&proxy, "/v1/chat/completions", TOKEN_ARCHIVED, &body, &[]).await;
    assert_eq!(archived.error(403)["code"], "project_archived");

    assert!(
        mock.requests().is_empty(),
        "nothing refused may reach the upstream"
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(r#"tollgate_rejections_total{project="",reason="missing_token"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"tollgate_rejections_total{project="",reason="invalid_token"} 1"#));
    assert!(metrics.contains(r#"tollgate_rejections_total{project="",reason="expired_token"} 1"#));
    assert!(metrics.contains(r#"tollgate_rejections_total{project="",reason="disabled_token"} 1"#));
    assert!(metrics
        .contains(r#"tollgate_rejections_total{project="archived",reason="archived_project"} 1"#));
}

#[tokio::test]
async fn enforces_the_model_allowlist_with_openais_wording() {
    let (mock, proxy) = setup().await;
    for model in ["gpt-4o", "gpt-4.1-nano"] {
        let answer = post_json(&proxy, "/v1/chat/completions", TOKEN, &chat(model), &[]).await;
        let error = answer.error(403);
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["code"], "model_not_found");
        assert_eq!(
            error["message"],
            format!("Project `alpha` does not have access to model `{model}`")
        );
    }
    // Globs: gpt-4.1* allows gpt-4.1-mini.
    let ok = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN,
        &chat("gpt-4.1-mini"),
        &[],
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    // A project without an allowlist takes any model.
    let open = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN_OPEN,
        &chat("gpt-4o"),
        &[],
    )
    .await;
    assert_eq!(open.status, StatusCode::OK);
    assert_eq!(mock.requests().len(), 2);
    let metrics = proxy.metrics().await;
    assert!(
        metrics
            .contains(r#"tollgate_rejections_total{project="alpha",reason="model_not_allowed"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_json_endpoint_reads_its_body_whatever_the_content_type_says() {
    let (mock, proxy) = setup().await;
    let auth = format!("Bearer {TOKEN}");
    let url = proxy.url("/v1/chat/completions");
    let body = |model: &str| Bytes::from(chat(model).to_string());
    // No header may take a model past the allowlist unread.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(content_type.map(|c| ("content-type", c)));
        let refused = send(Method::POST, &url, &headers, body("gpt-4.1-nano")).await;
        assert_eq!(
            refused.error(403)["code"],
            "model_not_found",
            "{content_type:?}"
        );
        let allowed = send(Method::POST, &url, &headers, body("gpt-4o-mini")).await;
        assert_eq!(
            allowed.status,
            StatusCode::OK,
            "{content_type:?}: {}",
            allowed.text()
        );
        let unreadable = send(
            Method::POST,
            &url,
            &headers,
            Bytes::from_static(b"model=o3"),
        )
        .await;
        assert_eq!(
            unreadable.error(400)["type"],
            "invalid_request_error",
            "{content_type:?}"
        );
    }
    // Only the three allowed requests reached the upstream.
    assert_eq!(mock.requests().len(), 3);
    let alpha = project(&proxy, "alpha").await;
    assert_eq!(alpha["spent"]["requests"], 3);
}

#[tokio::test]
async fn refuses_unreadable_and_oversized_bodies() {
    let (mock, proxy) = setup().await;
    let auth = format!("Bearer {TOKEN}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let url = proxy.url("/v1/chat/completions");

    let broken = send(
        Method::POST,
        &url,
        &headers,
        Bytes::from_static(b"{\"model\": "),
    )
    .await;
    assert_eq!(broken.error(400)["type"], "invalid_request_error");
    let not_utf8 = send(
        Method::POST,
        &url,
        &headers,
        Bytes::from_static(b"{\"model\": \"\xff\xfe\"}"),
    )
    .await;
    not_utf8.error(400);
    let wrong_type = send(
        Method::POST,
        &url,
        &headers,
        Bytes::from_static(b"{\"model\": 4}"),
    )
    .await;
    assert_eq!(wrong_type.error(400)["param"], "model");
    let huge = json!({"model": "gpt-4o-mini", "input": "x".repeat(70_000)});
    let too_big = post_json(&proxy, "/v1/embeddings", TOKEN, &huge, &[]).await;
    assert_eq!(too_big.error(413)["code"], "request_too_large");
    let elsewhere = send(Method::GET, &proxy.url("/v2/other"), &headers, Bytes::new()).await;
    assert_eq!(
        elsewhere.error(404)["message"],
        "Invalid URL (GET /v2/other)"
    );

    assert!(mock.requests().is_empty());
    let spent = project(&proxy, "alpha").await;
    assert_eq!(spent["spent"]["requests"], 0);
    assert_eq!(spent["reserved"]["tokens"], 0);
}

#[tokio::test]
async fn counts_usage_of_every_endpoint() {
    let (mock, proxy) = setup().await;
    let cases = [
        ("/v1/chat/completions", chat("gpt-4o-mini")),
        (
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi", "max_tokens": 5}),
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "input": "Say hi"}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": "hello"}),
        ),
        (
            "/v1/moderations",
            json!({"model": "omni-moderation-latest", "input": "hello"}),
        ),
        (
            "/v1/images/generations",
            json!({"model": "gpt-image-1", "prompt": "a cat"}),
        ),
    ];
    for (path, body) in &cases {
        let answer = post_json(&proxy, path, TOKEN, body, &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.text());
    }
    let reported = mock.reported();
    assert!(reported.requests_with_usage >= 5, "{reported:?}");
    let alpha = project(&proxy, "alpha").await;
    assert_eq!(alpha["spent"]["requests"], 6);
    assert_eq!(alpha["spent"]["input_tokens"], reported.input_tokens);
    assert_eq!(alpha["spent"]["output_tokens"], reported.output_tokens);
    assert_eq!(
        alpha["spent"]["cached_input_tokens"],
        reported.cached_input_tokens
    );
    assert_eq!(
        alpha["spent"]["reasoning_tokens"],
        reported.reasoning_tokens
    );
    assert_eq!(
        alpha["spent"]["tokens"],
        reported.input_tokens + reported.output_tokens
    );
    assert_eq!(alpha["reserved"]["tokens"], 0);
    assert_eq!(alpha["in_flight"], 0);
    assert!(alpha["spent"]["usd"].as_f64().unwrap() > 0.0);

    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(
            r#"tollgate_requests_total{project="alpha",model="gpt-4o-mini",code="200"} 2"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"tollgate_tokens_total{project="alpha",model="text-embedding-3-small",type="output"} 0"#
    ));
    assert!(metrics.contains(r#"tollgate_cost_usd_total{project="alpha",model="gpt-4o-mini"}"#));
    assert!(metrics.contains(r#"tollgate_budget_limit_tokens{project="alpha"} 100000000"#));
    assert!(metrics.contains("tollgate_request_duration_seconds_bucket"));
    assert!(metrics.contains("tollgate_upstream_first_byte_seconds_bucket"));
}

#[tokio::test]
async fn counts_audio_transcriptions_from_multipart_requests() {
    let (mock, proxy) = setup().await;
    let auth = format!("Bearer {TOKEN}");
    let form = |model: &str| {
        format!(
            "--BOUNDARY\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFFxxxxWAVE\r\n--BOUNDARY\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--BOUNDARY--\r\n"
        )
    };
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "multipart/form-data; boundary=BOUNDARY"),
    ];
    let url = proxy.url("/v1/audio/transcriptions");
    let ok = send(
        Method::POST,
        &url,
        &headers,
        Bytes::from(form("gpt-4o-transcribe")),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let denied = send(
        Method::POST,
        &url,
        &headers,
        Bytes::from(form("gpt-4o-mini-transcribe")),
    )
    .await;
    assert_eq!(denied.error(403)["code"], "model_not_found");
    assert_eq!(mock.requests().len(), 1);
    let reported = mock.reported();
    let alpha = project(&proxy, "alpha").await;
    assert_eq!(alpha["spent"]["input_tokens"], reported.input_tokens);
    assert_eq!(alpha["spent"]["output_tokens"], reported.output_tokens);
    assert!(reported.input_tokens > 0);
}

#[tokio::test]
async fn filters_the_model_list_to_allowed_models() {
    let (_mock, proxy) = setup().await;
    let auth = format!("Bearer {TOKEN}");
    let list = send(
        Method::GET,
        &proxy.url("/v1/models"),
        &[("authorization", auth.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(list.status, StatusCode::OK);
    let ids: Vec<String> = list.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.contains(&"gpt-4o-mini".to_owned()), "{ids:?}");
    assert!(!ids.contains(&"gpt-4o".to_owned()), "{ids:?}");
    assert!(!ids.contains(&"dall-e-3".to_owned()), "{ids:?}");

    let one = send(
        Method::GET,
        &proxy.url("/v1/models/gpt-4o-mini"),
        &[("authorization", auth.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.json()["id"], "gpt-4o-mini");
    let hidden = send(
        Method::GET,
        &proxy.url("/v1/models/gpt-4o"),
        &[("authorization", auth.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(hidden.error(404)["code"], "model_not_found");
}

/// Reads a streamed answer frame by frame.
async fn stream_body(
    url: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> (http::response::Parts, Vec<Bytes>) {
    let response = client()
        .request(request(
            Method::POST,
            url,
            headers,
            Bytes::from(body.to_string()),
        ))
        .await
        .unwrap();
    let (head, mut incoming) = response.into_parts();
    let mut frames = Vec::new();
    while let Some(frame) = incoming.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames.push(data);
        }
    }
    (head, frames)
}

fn concat(frames: &[Bytes]) -> Vec<u8> {
    frames.iter().flat_map(|f| f.iter().copied()).collect()
}

#[tokio::test]
async fn a_stream_that_asked_for_usage_passes_byte_identical() {
    let (mock, proxy) = setup().await;
    // A twin mock answers the same request directly: same ids, same pinned timestamps.
    let twin = MockUpstream::start().await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}});
    let auth = format!("Bearer {TOKEN}");
    let direct_auth = format!("Bearer {REAL_KEY}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("x-mock-created", "1760000000"),
        ("x-mock-split", "7"),
    ];
    mock.reseed(7);
    twin.reseed(7);
    let through = stream_body(&proxy.url("/v1/chat/completions"), &headers, &body).await;
    headers[0] = ("authorization", direct_auth.as_str());
    let direct = stream_body(
        &format!("{}/v1/chat/completions", twin.base_url()),
        &headers,
        &body,
    )
    .await;
    assert_eq!(through.0.status, StatusCode::OK);
    assert_eq!(concat(&through.1), concat(&direct.1));
    assert!(String::from_utf8(concat(&through.1))
        .unwrap()
        .contains("\"usage\":{"));
    // The request reached the upstream unchanged.
    assert_eq!(mock.requests()[0].body, Bytes::from(body.to_string()));
    let alpha = project(&proxy, "alpha").await;
    let reported = mock.reported();
    assert_eq!(reported.requests_with_usage, 1);
    assert_eq!(alpha["spent"]["input_tokens"], reported.input_tokens);
    assert_eq!(alpha["spent"]["output_tokens"], reported.output_tokens);
}

#[tokio::test]
async fn a_stream_without_usage_gets_it_added_upstream_and_removed_downstream() {
    let (mock, proxy) = setup().await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let auth = format!("Bearer {TOKEN}");
    let (head, frames) = stream_body(
        &proxy.url("/v1/chat/completions"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("x-mock-chunks", "20"),
        ],
        &body,
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    let text = String::from_utf8(concat(&frames)).unwrap();
    assert!(
        !text.contains("\"usage\":{"),
        "the usage chunk must be taken out: {text}"
    );
    assert!(!text.contains("\"choices\":[]"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(
        text.matches("data: ").count(),
        1 + 20 + 1 + 1,
        "the role chunk, 20 content chunks, the final chunk, [DONE]: {text}"
    );
    for event in text.split("\n\n").filter(|e| e.starts_with("data: {")) {
        let chunk: serde_json::Value = serde_json::from_str(&event[6..]).unwrap();
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1, "{event}");
    }

    let forwarded: serde_json::Value = serde_json::from_slice(&mock.requests()[0].body).unwrap();
    assert_eq!(forwarded["stream_options"]["include_usage"], true);
    let reported = mock.reported();
    assert_eq!(reported.requests_with_usage, 1);
    let alpha = project(&proxy, "alpha").await;
    assert_eq!(alpha["spent"]["input_tokens"], reported.input_tokens);
    assert_eq!(alpha["spent"]["output_tokens"], reported.output_tokens);
}

#[tokio::test]
async fn streamed_responses_are_counted_from_their_final_event() {
    let (mock, proxy) = setup().await;
    let auth = format!("Bearer {TOKEN}");
    for end in ["completed", "incomplete", "failed"] {
        let body = json!({"model": "gpt-4o-mini", "input": "hi", "stream": true});
        let (head, frames) = stream_body(
            &proxy.url("/v1/responses"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("x-mock-responses-end", end),
            ],
            &body,
        )
        .await;
        assert_eq!(head.status, StatusCode::OK);
        assert!(String::from_utf8(concat(&frames))
            .unwrap()
            .contains(&format!("response.{end}")));
    }
    // Responses streams are never rewritten.
    for request in mock.requests() {
        let forwarded: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert!(forwarded.get("stream_options").is_none());
    }
    let reported = mock.reported();
    assert_eq!(reported.requests_with_usage, 3);
    let alpha = project(&proxy, "alpha").await;
    assert_eq!(alpha["spent"]["input_tokens"], reported.input_tokens);
    assert_eq!(alpha["spent"]["output_tokens"], reported.output_tokens);
}

#[tokio::test]
async fn compressed_answers_pass_unchanged_and_are_counted() {
    let (mock, proxy) = setup().await;
    // The twin is seeded like the mock before each request, so its answers are the same bytes.
    let twin = MockUpstream::start().await;
    let auth = format!("Bearer {TOKEN}");
    let direct_auth = format!("Bearer {REAL_KEY}");
    let mut expected_in = 0;
    for encoding in ["gzip", "deflate", "br", "zstd"] {
        for stream in [false, true] {
            let mut body = chat("gpt-4o-mini");
            if stream {
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
            }
            let mut headers = vec![
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
                ("accept-encoding", encoding),
                ("x-mock-encoding", encoding),
                ("x-mock-usage", "100,7"),
                ("x-mock-created", "1760000000"),
            ];
            mock.reseed(7);
            twin.reseed(7);
            let through = stream_body(&proxy.url("/v1/chat/completions"), &headers, &body).await;
            assert_eq!(through.0.status, StatusCode::OK);
            assert_eq!(through.0.headers["content-encoding"], encoding);
            headers[0] = ("authorization", direct_auth.as_str());
            let direct = stream_body(
                &format!("{}/v1/chat/completions", twin.base_url()),
                &headers,
                &body,
            )
            .await;
            assert_eq!(
                concat(&through.1),
                concat(&direct.1),
                "{encoding} stream={stream}: the client gets the upstream's bytes"
            );
            expected_in += 100;
            let alpha = project(&proxy, "alpha").await;
            assert_eq!(
                alpha["spent"]["input_tokens"], expected_in,
                "{encoding} stream={stream}"
            );
        }
    }
}

#[tokio::test]
async fn upstream_errors_pass_through_and_charge_nothing() {
    let (_mock, proxy) = setup().await;
    let answer = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN,
        &chat("gpt-4o-mini"),
        &[("x-mock-status", "500")],
    )
    .await;
    let error = answer.error(500);
    assert_eq!(error["type"], "server_error");
    let limited = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN,
        &chat("gpt-4o-mini"),
        &[("x-mock-status", "429")],
    )
    .await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    let alpha = project(&proxy, "alpha").await;
    assert_eq!(alpha["spent"]["tokens"], 0);
    assert_eq!(alpha["reserved"]["tokens"], 0);
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(
            r#"tollgate_requests_total{project="alpha",model="gpt-4o-mini",code="500"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_and_a_slow_one_a_504() {
    // A port that was just free: nothing listens there.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let proxy = TestProxy::start(&config(&format!("http://{closed}"), BIG_BUDGET)).await;
    let answer = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN,
        &chat("gpt-4o-mini"),
        &[],
    )
    .await;
    assert_eq!(answer.error(502)["code"], "upstream_unreachable");
    let alpha = project(&proxy, "alpha").await;
    assert_eq!(alpha["spent"]["tokens"], 0, "nothing reached the upstream");
    assert_eq!(alpha["reserved"]["tokens"], 0);

    let (_mock, proxy) = setup().await;
    let answer = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN,
        &chat("gpt-4o-mini"),
        &[("x-mock-delay-ms", "3000")],
    )
    .await;
    assert_eq!(answer.error(504)["code"], "upstream_timeout");
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(r#"tollgate_upstream_errors_total{project="alpha",kind="timeout"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_reset_or_stalled_stream_is_cut_and_charged_an_estimate() {
    let (_mock, proxy) = setup().await;
    let auth = format!("Bearer {TOKEN}");
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 50});
    for fault in [("x-mock-reset-after", "600"), ("x-mock-stall-after", "600")] {
        let response = client()
            .request(request(
                Method::POST,
                &proxy.url("/v1/chat/completions"),
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                    fault,
                ],
                Bytes::from(body.to_string()),
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let result =
            tokio::time::timeout(Duration::from_secs(5), response.into_body().collect()).await;
        assert!(
            result.expect("cut within the idle timeout").is_err(),
            "{fault:?}: the client must see the cut"
        );
    }
    assert!(eventually(|| true).await);
    let alpha = project(&proxy, "alpha").await;
    assert_eq!(alpha["in_flight"], 0);
    assert_eq!(alpha["reserved"]["tokens"], 0);
    assert_eq!(alpha["spent"]["requests"], 2);
    let spent = alpha["spent"]["tokens"].as_u64().unwrap();
    assert!(spent > 0, "a cut stream is charged an estimate");
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_still_charged() {
    let (_mock, proxy) = setup().await;
    let auth = format!("Bearer {TOKEN}");
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 1000});
    let response = client()
        .request(request(
            Method::POST,
            &proxy.url("/v1/chat/completions"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("x-mock-endless", "1"),
            ],
            Bytes::from(body.to_string()),
        ))
        .await
        .unwrap();
    let mut incoming = response.into_body();
    let mut seen = 0;
    while seen < 5 {
        if incoming.frame().await.unwrap().unwrap().is_data() {
            seen += 1;
        }
    }
    drop(incoming);
    let state = proxy.state.clone();
    assert!(
        eventually(|| state
            .projects
            .get("alpha")
            .unwrap()
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0)
        .await,
        "the abandoned request must end"
    );
    let alpha = project(&proxy, "alpha").await;
    assert_eq!(alpha["reserved"]["tokens"], 0);
    let output = alpha["spent"]["output_tokens"].as_u64().unwrap();
    assert!(output >= 5, "charged for the events seen, got {output}");
    assert!(output < 1000, "not the whole reservation, got {output}");
}

#[tokio::test]
async fn a_spent_budget_answers_429_that_sdks_do_not_retry() {
    let mock = MockUpstream::start().await;
    mock.set_default_usage(400, 100);
    let proxy = TestProxy::start(&config(
        &mock.base_url(),
        r#"{ tokens = 1000, period = "daily" }"#,
    ))
    .await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100});
    let first = post_json(&proxy, "/v1/chat/completions", TOKEN, &body, &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    let second = post_json(&proxy, "/v1/chat/completions", TOKEN, &body, &[]).await;
    assert_eq!(second.status, StatusCode::OK);
    // 1000 tokens spent: the next request cannot fit.
    let third = post_json(&proxy, "/v1/chat/completions", TOKEN, &body, &[]).await;
    let error = third.error(429);
    assert_eq!(error["type"], "insufficient_quota");
    assert_eq!(error["code"], "project_spend_limit_exceeded");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("alpha") && message.contains("1000 tokens") && message.contains("daily"),
        "{message}"
    );
    assert_eq!(third.headers["x-should-retry"], "false");
    let retry_after: u64 = third.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&retry_after));
    assert_eq!(mock.requests().len(), 2);
    let metrics = proxy.metrics().await;
    assert!(metrics
        .contains(r#"tollgate_rejections_total{project="alpha",reason="budget_exceeded"} 1"#));
    assert!(
        metrics.contains(r#"tollgate_budget_spent_tokens{project="alpha"} 1000"#),
        "{metrics}"
    );
}

/// The budget guarantee of the README: with every request carrying its output cap, hundreds of
/// concurrent requests never push the spend past the limit, and the counters equal what the
/// upstream reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_never_overshoots_the_budget() {
    let mock = MockUpstream::start().await;
    mock.set_default_usage(20, 30);
    const LIMIT: u64 = 5_000;
    let proxy = TestProxy::start(&config(
        &mock.base_url(),
        &format!(r#"{{ tokens = {LIMIT}, period = "monthly" }}"#),
    ))
    .await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30});
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let url = proxy.url("/v1/chat/completions");
        let body = body.to_string();
        tasks.push(tokio::spawn(async move {
            let auth = format!("Bearer {TOKEN}");
            send(
                Method::POST,
                &url,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                Bytes::from(body),
            )
            .await
            .status
        }));
    }
    let mut ok = 0u64;
    let mut refused = 0u64;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ok + refused, 300);
    assert!(refused > 0, "the burst must hit the limit");
    let reported = mock.reported();
    assert_eq!(reported.requests_with_usage, ok);
    let alpha = project(&proxy, "alpha").await;
    let spent = alpha["spent"]["tokens"].as_u64().unwrap();
    assert_eq!(spent, reported.input_tokens + reported.output_tokens);
    assert_eq!(alpha["spent"]["requests"], ok);
    assert!(spent <= LIMIT, "spent {spent} > limit {LIMIT}");
    assert_eq!(alpha["reserved"]["tokens"], 0);
}

#[tokio::test]
async fn serves_h2c_with_prior_knowledge() {
    let (mock, proxy) = setup().await;
    let auth = format!("Bearer {TOKEN}");
    let response = h2c_client()
        .request(request(
            Method::POST,
            &proxy.url("/v1/chat/completions"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Bytes::from(chat("gpt-4o-mini").to_string()),
        ))
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["usage"].is_object());
    assert_eq!(mock.reported().requests_with_usage, 1);
}

#[tokio::test]
async fn admin_routes_need_the_admin_token() {
    let (_mock, proxy) = setup().await;
    let open = send(
        Method::GET,
        &proxy.admin_url("/admin/projects"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(open.status, StatusCode::UNAUTHORIZED);
    let wrong = send(
        Method::GET,
        &proxy.admin_url("/admin/projects"),
        &[("authorization", "Bearer nope")],
        Bytes::new(),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let health = send(Method::GET, &proxy.admin_url("/healthz"), &[], Bytes::new()).await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = send(Method::GET, &proxy.admin_url("/readyz"), &[], Bytes::new()).await;
    assert_eq!(ready.status, StatusCode::OK);
    let report = proxy.admin_json("/admin/projects").await;
    let alpha = &report["projects"][0];
    assert_eq!(alpha["name"], "alpha");
    assert_eq!(alpha["period"]["kind"], "monthly");
    assert_eq!(alpha["limit"]["tokens"], 100_000_000);
    let open_project = report["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "open")
        .unwrap();
    assert!(open_project["limit"]["tokens"].is_null());
    assert!(open_project["remaining"]["usd"].is_null());
    // The metrics never show a key.
    assert!(!proxy.metrics().await.contains(REAL_KEY));
}

#[tokio::test]
async fn usage_per_credential_and_model_is_kept_apart_and_across_a_reload() {
    let (mock, proxy) = setup().await;
    let embed = json!({"model": "text-embedding-3-small", "input": "hello"});
    let send = |body: serde_json::Value, path: &'static str| {
        let proxy = &proxy;
        async move {
            let answer = post_json(proxy, path, TOKEN, &body, &[]).await;
            assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.text());
        }
    };
    // The credential's first model is the one its usage slot keeps; the other goes through
    // the project's map.
    send(chat("gpt-4o-mini"), "/v1/chat/completions").await;
    for _ in 0..3 {
        send(embed.clone(), "/v1/embeddings").await;
    }
    // A reload starts with empty slots and must count on the same cells.
    let reloaded = proxy.reload(&config(&mock.base_url(), BIG_BUDGET)).await;
    assert_eq!(reloaded.status, StatusCode::OK, "{}", reloaded.text());
    // The new slot keeps the embeddings model, and from the second request on its ledger cell.
    for _ in 0..3 {
        send(embed.clone(), "/v1/embeddings").await;
    }
    send(chat("gpt-4o-mini"), "/v1/chat/completions").await;
    send(chat("gpt-4o-mini"), "/v1/chat/completions").await;

    let usage = proxy.admin_json("/admin/usage").await;
    let rows: Vec<&serde_json::Value> = usage["usage"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["project"] == "alpha" && row["credential"] == "svc")
        .collect();
    let requests = |prefix: &str| -> Vec<u64> {
        rows.iter()
            .filter(|row| row["model"].as_str().unwrap().starts_with(prefix))
            .map(|row| row["requests"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(rows.len(), 2, "{usage}");
    assert_eq!(requests("gpt-4o-mini"), [3], "{usage}");
    assert_eq!(requests("text-embedding-3-small"), [6], "{usage}");
    let reported = mock.reported();
    let input: u64 = rows
        .iter()
        .map(|row| row["input_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(input, reported.input_tokens, "{usage}");
    let metrics = proxy.metrics().await;
    for line in [
        r#"tollgate_requests_total{project="alpha",model="gpt-4o-mini",code="200"} 3"#,
        r#"tollgate_requests_total{project="alpha",model="text-embedding-3-small",code="200"} 6"#,
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }

    // The ledger gets the same rows (within a few flush intervals): the pending cells a usage
    // slot keeps add up with the ones found by lookup.
    let read = || {
        tollgate::store::Ledger::open_read_only(&proxy.ledger)
            .and_then(|ledger| {
                ledger.report(&tollgate::store::ReportQuery {
                    by: vec![
                        tollgate::store::Dimension::Project,
                        tollgate::store::Dimension::Credential,
                        tollgate::store::Dimension::Model,
                    ],
                    ..Default::default()
                })
            })
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut rows = read();
    while rows.iter().map(|row| row.usage.requests).sum::<u64>() < 9 {
        assert!(std::time::Instant::now() < deadline, "{rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        rows = read();
    }
    let ledger_requests = |prefix: &str| -> Vec<u64> {
        rows.iter()
            .filter(|row| row.model.as_deref().is_some_and(|m| m.starts_with(prefix)))
            .map(|row| row.usage.requests)
            .collect()
    };
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(ledger_requests("gpt-4o-mini"), [3], "{rows:?}");
    assert_eq!(ledger_requests("text-embedding-3-small"), [6], "{rows:?}");
    let ledger_input: u64 = rows.iter().map(|row| row.usage.input_tokens).sum();
    assert_eq!(ledger_input, reported.input_tokens, "{rows:?}");
}
