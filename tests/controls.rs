//! The controls operators use: live reload, per-credential budgets and allowlists, per-model
//! rate limits, budget alerts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::harness::*;
use common::mock_upstream::MockUpstream;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;

const TOKEN_A: &str = "tg-controls-a";
const TOKEN_B: &str = "tg-controls-b";
const TOKEN_NEW: &str = "tg-controls-new";

fn chat(model: &str, max_tokens: u64) -> serde_json::Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
}

fn base(upstream: &str) -> String {
    format!(
        r#"
[admin]
token_env = "TOLLGATE_ADMIN_TOKEN"

[upstream]
base_url = "{upstream}"
"#
    )
}

fn credential(name: &str, token: &str, extra: &str) -> String {
    format!(
        "\n[[projects.credentials]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\n{extra}\n",
        sha256_hex(token)
    )
}

async fn spent(proxy: &TestProxy, project: &str) -> serde_json::Value {
    let report = proxy.admin_json("/admin/projects").await;
    report["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == project)
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn a_reload_applies_new_tokens_and_limits_and_keeps_the_counters() {
    let mock = MockUpstream::start().await;
    let before = format!(
        "{}\n[[projects]]\nname = \"p\"\napi_key_env = \"OPENAI_KEY\"\nallowed_models = [\"gpt-4o-mini\"]\nbudget = {{ tokens = 100000, period = \"monthly\" }}\n{}{}",
        base(&mock.base_url()),
        credential("a", TOKEN_A, ""),
        credential("b", TOKEN_B, ""),
    );
    let proxy = TestProxy::start(&before).await;
    for token in [TOKEN_A, TOKEN_B] {
        let ok = post_json(
            &proxy,
            "/v1/chat/completions",
            token,
            &chat("gpt-4o-mini", 10),
            &[],
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK);
    }
    let spent_before = spent(&proxy, "p").await["spent"]["tokens"]
        .as_u64()
        .unwrap();
    assert!(spent_before > 0);

    // A stream in flight across the reload finishes normally.
    let auth = format!("Bearer {TOKEN_A}");
    let in_flight = client()
        .request(request(
            Method::POST,
            &proxy.url("/v1/chat/completions"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("x-mock-stall-after", "300"),
                ("x-mock-stall-ms", "300"),
            ],
            Bytes::from(
                json!({"model": "gpt-4o-mini", "messages": [], "stream": true}).to_string(),
            ),
        ))
        .await
        .unwrap();

    // B revoked, a new token added, another model allowed, a smaller budget.
    let after = format!(
        "{}\n[[projects]]\nname = \"p\"\napi_key_env = \"OPENAI_KEY\"\nallowed_models = [\"gpt-4o-mini\", \"gpt-4o\"]\nbudget = {{ tokens = 50000, period = \"monthly\" }}\n{}{}",
        base(&mock.base_url()),
        credential("a", TOKEN_A, ""),
        credential("new", TOKEN_NEW, ""),
    );
    let reloaded = proxy.reload(&after).await;
    assert_eq!(reloaded.status, StatusCode::OK, "{}", reloaded.text());

    let revoked = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN_B,
        &chat("gpt-4o-mini", 10),
        &[],
    )
    .await;
    assert_eq!(revoked.error(401)["code"], "invalid_api_key");
    let added = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN_NEW,
        &chat("gpt-4o", 10),
        &[],
    )
    .await;
    assert_eq!(added.status, StatusCode::OK, "{}", added.text());
    let body = in_flight
        .into_body()
        .collect()
        .await
        .expect("the stream survives the reload");
    assert!(String::from_utf8_lossy(&body.to_bytes()).contains("[DONE]"));

    let p = spent(&proxy, "p").await;
    assert_eq!(p["limit"]["tokens"], 50000);
    assert!(
        p["spent"]["tokens"].as_u64().unwrap() > spent_before,
        "counters kept: {p}"
    );
    let reported = mock.reported();
    assert_eq!(
        p["spent"]["tokens"].as_u64().unwrap(),
        reported.input_tokens + reported.output_tokens
    );

    // A bad config is refused with its error, and the running one stays.
    let broken = after.replace("period = \"monthly\"", "period = \"fortnightly\"");
    let refused = proxy.reload(&broken).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(
        refused.text().contains("projects[0].budget.period"),
        "{}",
        refused.text()
    );
    let still = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN_NEW,
        &chat("gpt-4o", 10),
        &[],
    )
    .await;
    assert_eq!(still.status, StatusCode::OK);
}

#[tokio::test]
async fn a_credential_has_its_own_budget_and_narrower_models() {
    let mock = MockUpstream::start().await;
    mock.set_default_usage(100, 50);
    let toml = format!(
        "{}\n[[projects]]\nname = \"p\"\napi_key_env = \"OPENAI_KEY\"\nbudget = {{ tokens = 100000, period = \"monthly\" }}\n{}{}",
        base(&mock.base_url()),
        credential("small", TOKEN_A, "budget = { tokens = 400, period = \"daily\" }\nallowed_models = [\"gpt-4o-mini\"]"),
        credential("big", TOKEN_B, ""),
    );
    let proxy = TestProxy::start(&toml).await;
    let narrow = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN_A,
        &chat("gpt-4o", 10),
        &[],
    )
    .await;
    assert_eq!(narrow.error(403)["code"], "model_not_found");
    let wide = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN_B,
        &chat("gpt-4o", 10),
        &[],
    )
    .await;
    assert_eq!(wide.status, StatusCode::OK);

    // Each request reserves ~100 bytes of prompt + 10 output and is charged 150.
    let mut ok = 0;
    let refusal = loop {
        let answer = post_json(
            &proxy,
            "/v1/chat/completions",
            TOKEN_A,
            &chat("gpt-4o-mini", 10),
            &[],
        )
        .await;
        if answer.status != StatusCode::OK {
            break answer;
        }
        ok += 1;
        assert!(ok < 10, "the credential budget must run out");
    };
    let error = refusal.error(429);
    assert_eq!(error["code"], "credential_spend_limit_exceeded");
    assert_eq!(error["type"], "insufficient_quota");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("Credential `small`"));
    assert_eq!(refusal.headers["x-should-retry"], "false");
    // The other credential of the project is not affected, and the project was not charged
    // for the refused request.
    let other = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN_B,
        &chat("gpt-4o-mini", 10),
        &[],
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    let p = spent(&proxy, "p").await;
    assert_eq!(p["spent"]["requests"], ok + 2);
    assert_eq!(p["reserved"]["tokens"], 0);
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(
            r#"tollgate_rejections_total{project="p",reason="credential_budget_exceeded"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn rate_limits_answer_like_openai() {
    let mock = MockUpstream::start().await;
    let toml = format!(
        "{}\n[[projects]]\nname = \"p\"\napi_key_env = \"OPENAI_KEY\"\nrate_limits = [{{ model = \"gpt-4o*\", rpm = 3, tpm = 1000000 }}]\n{}",
        base(&mock.base_url()),
        credential("a", TOKEN_A, ""),
    );
    let proxy = TestProxy::start(&toml).await;
    for expected_remaining in ["2", "1", "0"] {
        let ok = post_json(
            &proxy,
            "/v1/chat/completions",
            TOKEN_A,
            &chat("gpt-4o-mini", 10),
            &[],
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(ok.headers["x-ratelimit-limit-requests"], "3");
        assert_eq!(
            ok.headers["x-ratelimit-remaining-requests"],
            expected_remaining
        );
        assert!(ok.headers.contains_key("x-ratelimit-reset-requests"));
        assert_eq!(ok.headers["x-ratelimit-limit-tokens"], "1000000");
    }
    let limited = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN_A,
        &chat("gpt-4o", 10),
        &[],
    )
    .await;
    let error = limited.error(429);
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(error["type"], "requests");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Rate limit reached for gpt-4o in project p on requests per min (RPM): Limit 3"
        ),
        "{message}"
    );
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    assert!(
        limited.headers.get("x-should-retry").is_none(),
        "SDKs should retry a rate limit"
    );
    assert_eq!(limited.headers["x-ratelimit-remaining-requests"], "0");
    // Another model is not limited by that rule.
    let other = post_json(
        &proxy,
        "/v1/chat/completions",
        TOKEN_A,
        &chat("o3", 10),
        &[],
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    assert_ne!(
        other
            .headers
            .get("x-ratelimit-limit-requests")
            .map(|v| v.to_str().unwrap()),
        Some("3"),
        "only the upstream's own headers, if any"
    );
    assert_eq!(mock.requests().len(), 4);
}

/// A webhook receiver on 127.0.0.1 that records what it is sent.
async fn webhook() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let record = record.clone();
                        async move {
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            record
                                .lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap());
                            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                                Bytes::new(),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn budget_alerts_fire_once_per_threshold() {
    let mock = MockUpstream::start().await;
    mock.set_default_usage(150, 50);
    let (url, seen) = webhook().await;
    let toml = format!(
        "{}\n[[projects]]\nname = \"p\"\napi_key_env = \"OPENAI_KEY\"\nalert_webhook = \"{url}\"\nbudget = {{ tokens = 1000, period = \"monthly\", alert_at = [0.5, 0.8, 1.0] }}\n{}",
        base(&mock.base_url()),
        credential("a", TOKEN_A, ""),
    );
    let proxy = TestProxy::start(&toml).await;
    // 200 tokens per request: 0.2, 0.4, 0.6 (fires 0.5), 0.8 (fires 0.8).
    for _ in 0..4 {
        let ok = post_json(
            &proxy,
            "/v1/chat/completions",
            TOKEN_A,
            &chat("gpt-4o-mini", 5),
            &[],
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK);
    }
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(r#"tollgate_budget_alerts_total{project="p",threshold="0.5"} 1"#),
        "{metrics}"
    );
    let check = seen.clone();
    assert!(
        eventually(move || check.lock().unwrap().len() == 2).await,
        "two alerts delivered"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let alerts = seen.lock().unwrap().clone();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(alerts[0]["threshold"], 0.5);
    assert_eq!(alerts[1]["threshold"], 0.8);
    assert_eq!(alerts[1]["project"], "p");
    assert_eq!(alerts[1]["spent_tokens"], 800);
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(r#"tollgate_budget_alerts_total{project="p",threshold="0.5"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"tollgate_budget_alerts_total{project="p",threshold="0.8"} 1"#));
    assert!(!metrics.contains(r#"threshold="1""#));
}
