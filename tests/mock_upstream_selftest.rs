//! Drives the mock OpenAI upstream directly with a hyper client, to prove each route speaks
//! OpenAI's shapes and each fault does what it says, before tollgate's tests rely on them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::mock_upstream::{MockUpstream, Reported};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// The "real" project key the proxy is expected to put in.
const KEY: &str = "sk-proj-abcdefghijklmnopqrstuvwxyz012345wxyz";
/// Bounds every wait on the mock, so a broken mock fails a test instead of hanging it.
const DEADLINE: Duration = Duration::from_secs(2);

fn client(http2: bool) -> Client<HttpConnector, Full<Bytes>> {
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(http2);
    builder.build_http()
}

/// Sends a request with `authorization: Bearer KEY` unless `headers` sets `authorization`
/// (an empty value leaves it out).
async fn send_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    mock: &MockUpstream,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", mock.base_url()));
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
    {
        req = req.header("authorization", format!("Bearer {KEY}"));
    }
    for (name, value) in headers {
        if !value.is_empty() {
            req = req.header(*name, *value);
        }
    }
    let req = req.body(Full::new(body.into())).unwrap();
    tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .expect("response headers before the deadline")
        .expect("a response")
}

async fn send(
    mock: &MockUpstream,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    send_with(&client(false), mock, method, path, headers, body).await
}

async fn collect(resp: Response<Incoming>) -> (StatusCode, HeaderMap, Bytes) {
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("body before the deadline")
        .expect("a complete body")
        .to_bytes();
    (parts.status, parts.headers, body)
}

async fn post(
    mock: &MockUpstream,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (StatusCode, HeaderMap, Bytes) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    collect(send(mock, Method::POST, path, &all, body.to_string()).await).await
}

async fn get(mock: &MockUpstream, path: &str) -> (StatusCode, HeaderMap, Bytes) {
    collect(send(mock, Method::GET, path, &[], Bytes::new()).await).await
}

/// Every data frame of the body as the client received it, or the error that ended it.
async fn read_frames(resp: Response<Incoming>) -> (Vec<Bytes>, Option<hyper::Error>) {
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("a frame before the deadline")
        {
            None => return (frames, None),
            Some(Err(e)) => return (frames, Some(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    frames.push(data);
                }
            }
        }
    }
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(body)
                .chars()
                .take(300)
                .collect::<String>()
        )
    })
}

fn content_type(headers: &HeaderMap) -> &str {
    headers.get("content-type").unwrap().to_str().unwrap()
}

/// A whole SSE stream as (event name, data) pairs. Asserts the `\n\n` framing.
fn sse(body: &[u8]) -> Vec<(Option<String>, String)> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("\n\n"), "stream ends with a blank line");
    text.trim_end_matches('\n')
        .split("\n\n")
        .map(|block| {
            let mut event = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event = Some(name.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    assert!(data.is_none(), "one data line per event");
                    data = Some(d.to_owned());
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (event, data.expect("every event has data"))
        })
        .collect()
}

/// The JSON data of every event but a final `[DONE]`, which must be there.
fn chat_chunks(body: &[u8]) -> Vec<Value> {
    let events = sse(body);
    let (last, chunks) = events.split_last().unwrap();
    assert_eq!(last, &(None, "[DONE]".to_owned()));
    chunks
        .iter()
        .map(|(name, data)| {
            assert!(name.is_none(), "chat streams are data-only");
            json_of(data.as_bytes())
        })
        .collect()
}

fn reported(input: u64, cached: u64, output: u64, reasoning: u64) -> Reported {
    Reported {
        requests_with_usage: 1,
        input_tokens: input,
        cached_input_tokens: cached,
        output_tokens: output,
        reasoning_tokens: reasoning,
    }
}

fn chat_request(stream: bool, include_usage: bool) -> Value {
    let mut req = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
    });
    if stream {
        req["stream"] = json!(true);
    }
    if include_usage {
        req["stream_options"] = json!({"include_usage": true});
    }
    req
}

/// Polls `check` until it holds or the deadline passes.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn multipart(fields: &[(&str, &str)], file: Option<&[u8]>) -> (String, Vec<u8>) {
    let boundary = "mockboundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, value) in fields {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        )
        .unwrap();
    }
    if let Some(file) = file {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"clip.mp3\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .unwrap();
        body.extend_from_slice(file);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn post_form(
    mock: &MockUpstream,
    path: &str,
    fields: &[(&str, &str)],
    file: Option<&[u8]>,
) -> (StatusCode, HeaderMap, Bytes) {
    let (ct, body) = multipart(fields, file);
    collect(send(mock, Method::POST, path, &[("content-type", &ct)], body).await).await
}

// ------------------------------------------------------------------------------------------
// Routes

#[tokio::test]
async fn chat_completion_answers_with_usage_and_records_the_request() {
    let mock = MockUpstream::start().await;
    let body = chat_request(false, false);
    let resp = send(
        &mock,
        Method::POST,
        "/v1/chat/completions?trace=1",
        &[("content-type", "application/json"), ("x-custom", "kept")],
        body.to_string(),
    )
    .await;
    let (status, headers, bytes) = collect(resp).await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type(&headers), "application/json");
    assert_eq!(
        headers["content-length"].to_str().unwrap(),
        bytes.len().to_string()
    );
    assert!(
        bytes.starts_with(b"{\n  \"id\": \"chatcmpl-"),
        "pretty, id first"
    );
    let v = json_of(&bytes);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 12);
    assert_eq!(v["usage"]["completion_tokens"], 9);
    assert_eq!(v["usage"]["total_tokens"], 21);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
    assert_eq!(mock.reported(), reported(12, 0, 9, 0));

    let requests = mock.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions?trace=1");
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(r.headers["authorization"], format!("Bearer {KEY}").as_str());
    assert_eq!(r.headers["x-custom"], "kept");
    assert_eq!(json_of(&r.body), body);
}

#[tokio::test]
async fn response_carries_openai_headers() {
    let mock = MockUpstream::start().await;
    let (_, headers, _) = post(
        &mock,
        "/v1/chat/completions",
        &[],
        chat_request(false, false),
    )
    .await;
    let id = headers["x-request-id"].to_str().unwrap();
    assert!(id.starts_with("req_") && id.len() == 36, "{id}");
    assert!(id[4..].chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(headers["openai-version"], "2020-10-01");
    assert!(headers["openai-processing-ms"]
        .to_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    assert_eq!(headers["x-ratelimit-limit-requests"], "5000");
    assert_eq!(headers["x-ratelimit-remaining-tokens"], "1999970");
    assert_eq!(headers["x-ratelimit-reset-requests"], "12ms");

    let (_, headers, _) = post(
        &mock,
        "/v1/chat/completions",
        &[("x-request-id", "req_from_client")],
        chat_request(false, false),
    )
    .await;
    assert_eq!(headers["x-request-id"], "req_from_client");
}

#[tokio::test]
async fn usage_header_and_default_usage_override_the_tokens() {
    let mock = MockUpstream::start().await;
    let (_, _, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-usage", "100,50,30,20")],
        chat_request(false, false),
    )
    .await;
    let v = json_of(&bytes);
    assert_eq!(v["usage"]["prompt_tokens"], 100);
    assert_eq!(v["usage"]["completion_tokens"], 50);
    assert_eq!(v["usage"]["total_tokens"], 150);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 30);
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        20
    );
    assert_eq!(mock.reported(), reported(100, 30, 50, 20));

    mock.set_default_usage(7, 3);
    let (_, _, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[],
        chat_request(false, false),
    )
    .await;
    assert_eq!(json_of(&bytes)["usage"]["prompt_tokens"], 7);
    let mut expected = reported(107, 30, 53, 20);
    expected.requests_with_usage = 2;
    assert_eq!(mock.reported(), expected);
}

#[tokio::test]
async fn chat_stream_without_include_usage_has_no_usage() {
    let mock = MockUpstream::start().await;
    let (status, headers, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[],
        chat_request(true, false),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type(&headers), "text/event-stream; charset=utf-8");
    assert!(headers.get("content-length").is_none());
    let chunks = chat_chunks(&bytes);
    // role chunk, 5 content chunks, finish chunk
    assert_eq!(chunks.len(), 7);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-4o-mini-2024-07-18");
        assert!(chunk.get("usage").is_none(), "no usage key: {chunk}");
    }
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[6]["choices"][0]["delta"], json!({}));
    assert_eq!(mock.reported(), Reported::default());
}

#[tokio::test]
async fn chat_stream_with_include_usage_ends_with_a_usage_chunk() {
    let mock = MockUpstream::start().await;
    let (_, _, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-chunks", "200")],
        chat_request(true, true),
    )
    .await;
    let chunks = chat_chunks(&bytes);
    assert_eq!(chunks.len(), 1 + 200 + 1 + 1);
    let (usage_chunk, rest) = chunks.split_last().unwrap();
    for chunk in rest {
        assert_eq!(chunk["usage"], Value::Null, "usage: null before the end");
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
    }
    let content: Vec<_> = rest
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .collect();
    assert_eq!(content.len(), 200);
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 12);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 9);
    assert_eq!(mock.reported(), reported(12, 0, 9, 0));
}

#[tokio::test]
async fn stream_options_without_stream_is_refused_like_openai() {
    let mock = MockUpstream::start().await;
    let mut req = chat_request(false, true);
    req["stream"] = json!(false);
    let (status, _, bytes) = post(&mock, "/v1/chat/completions", &[], req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json_of(&bytes)["error"]["param"], "stream_options");

    let (status, _, bytes) = collect(
        send(
            &mock,
            Method::POST,
            "/v1/chat/completions",
            &[],
            "{not json",
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v = json_of(&bytes);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("We could not parse the JSON body"));
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let (status, _, bytes) =
        post(&mock, "/v1/chat/completions", &[], json!({"messages": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        json_of(&bytes)["error"]["message"],
        "you must provide a model parameter"
    );
    assert_eq!(mock.reported(), Reported::default());
}

#[tokio::test]
async fn legacy_completions_answer_text_completion_objects() {
    let mock = MockUpstream::start().await;
    let req = json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say"});
    let (status, _, bytes) = post(&mock, "/v1/completions", &[], req.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let v = json_of(&bytes);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "gpt-3.5-turbo-instruct");
    assert!(v["choices"][0]["text"].is_string());
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21})
    );

    let mut stream = req;
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let (_, headers, bytes) = post(&mock, "/v1/completions", &[], stream).await;
    assert_eq!(content_type(&headers), "text/event-stream; charset=utf-8");
    let chunks = chat_chunks(&bytes);
    assert_eq!(chunks.len(), 5 + 1 + 1);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[5]["usage"], Value::Null);
    assert_eq!(chunks[6]["choices"], json!([]));
    assert_eq!(chunks[6]["usage"]["prompt_tokens"], 12);
    let mut expected = reported(24, 0, 18, 0);
    expected.requests_with_usage = 2;
    assert_eq!(mock.reported(), expected);
}

#[tokio::test]
async fn responses_answers_a_response_object() {
    let mock = MockUpstream::start().await;
    let (status, _, bytes) = post(
        &mock,
        "/v1/responses",
        &[("x-mock-usage", "40,20,10,5")],
        json!({"model": "gpt-4o-mini", "input": "hi"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v = json_of(&bytes);
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(
        v["usage"],
        json!({
            "input_tokens": 40,
            "input_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 0},
            "output_tokens": 20,
            "output_tokens_details": {"reasoning_tokens": 5},
            "total_tokens": 60,
        })
    );
    assert_eq!(mock.reported(), reported(40, 10, 20, 5));
}

async fn responses_stream(mock: &MockUpstream, end: &str) -> Vec<(String, Value)> {
    let (status, headers, bytes) = post(
        mock,
        "/v1/responses",
        &[("x-mock-responses-end", end)],
        json!({"model": "gpt-4.1", "input": "hi", "stream": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type(&headers), "text/event-stream; charset=utf-8");
    assert!(!bytes.windows(6).any(|w| w == b"[DONE]"), "no [DONE]");
    sse(&bytes)
        .into_iter()
        .enumerate()
        .map(|(i, (name, data))| {
            let name = name.expect("Responses events are named");
            assert!(
                data.starts_with(&format!("{{\"type\":\"{name}\"")),
                "type first: {data}"
            );
            let v = json_of(data.as_bytes());
            assert_eq!(v["sequence_number"], i);
            (name, v)
        })
        .collect()
}

#[tokio::test]
async fn responses_stream_ends_with_completed_carrying_usage() {
    let mock = MockUpstream::start().await;
    let events = responses_stream(&mock, "").await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(["response.output_text.delta"; 5]);
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    assert_eq!(events[0].1["response"]["usage"], Value::Null);
    assert_eq!(events[0].1["response"]["model"], "gpt-4.1");
    let done = &events.last().unwrap().1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["usage"]["input_tokens"], 12);
    assert_eq!(done["usage"]["output_tokens"], 9);
    assert_eq!(mock.reported(), reported(12, 0, 9, 0));
}

#[tokio::test]
async fn responses_stream_can_end_incomplete_or_failed() {
    let mock = MockUpstream::start().await;
    let events = responses_stream(&mock, "incomplete").await;
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "response.incomplete");
    assert_eq!(last["response"]["status"], "incomplete");
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
    assert_eq!(last["response"]["usage"]["output_tokens"], 9);

    let events = responses_stream(&mock, "failed").await;
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "response.failed");
    assert_eq!(last["response"]["status"], "failed");
    assert_eq!(last["response"]["error"]["code"], "server_error");
    let mut expected = reported(24, 0, 18, 0);
    expected.requests_with_usage = 2;
    assert_eq!(mock.reported(), expected);
}

#[tokio::test]
async fn embeddings_report_prompt_tokens_only() {
    let mock = MockUpstream::start().await;
    let (status, _, bytes) = post(
        &mock,
        "/v1/embeddings",
        &[],
        json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v = json_of(&bytes);
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["index"], 1);
    assert!(v["data"][0]["embedding"].as_array().unwrap()[0].is_f64());
    assert_eq!(v["usage"], json!({"prompt_tokens": 12, "total_tokens": 12}));

    let (_, _, bytes) = post(
        &mock,
        "/v1/embeddings",
        &[],
        json!({"model": "text-embedding-3-small", "input": "a", "encoding_format": "base64"}),
    )
    .await;
    let v = json_of(&bytes);
    let b64 = v["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(b64.len(), 44, "8 float32 in base64: {b64}");
    let mut expected = reported(24, 0, 0, 0);
    expected.requests_with_usage = 2;
    assert_eq!(mock.reported(), expected);
}

#[tokio::test]
async fn moderations_have_no_usage() {
    let mock = MockUpstream::start().await;
    let (status, _, bytes) = post(
        &mock,
        "/v1/moderations",
        &[],
        json!({"model": "omni-moderation-latest", "input": "hello"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v = json_of(&bytes);
    assert!(v["id"].as_str().unwrap().starts_with("modr-"));
    assert_eq!(v["results"][0]["flagged"], false);
    assert_eq!(v["results"][0]["categories"].as_object().unwrap().len(), 13);
    assert!(v.get("usage").is_none());
    assert_eq!(mock.reported(), Reported::default());
}

#[tokio::test]
async fn image_generations_report_gpt_image_usage() {
    let mock = MockUpstream::start().await;
    let (status, _, bytes) = post(
        &mock,
        "/v1/images/generations",
        &[],
        json!({"model": "gpt-image-1", "prompt": "a cat"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v = json_of(&bytes);
    assert!(v["data"][0]["b64_json"].is_string());
    assert_eq!(v["usage"]["input_tokens"], 12);
    assert_eq!(v["usage"]["input_tokens_details"]["text_tokens"], 12);
    assert_eq!(v["usage"]["output_tokens_details"]["image_tokens"], 9);
    assert_eq!(v["usage"]["total_tokens"], 21);
    assert_eq!(mock.reported(), reported(12, 0, 9, 0));

    let (_, _, bytes) = post(
        &mock,
        "/v1/images/generations",
        &[],
        json!({"model": "dall-e-3", "prompt": "a cat"}),
    )
    .await;
    assert!(json_of(&bytes).get("usage").is_none());
    assert_eq!(mock.reported(), reported(12, 0, 9, 0));
}

#[tokio::test]
async fn transcriptions_report_tokens_or_duration_by_model() {
    let mock = MockUpstream::start().await;
    let audio = [7u8; 1000];
    let (status, _, bytes) = post_form(
        &mock,
        "/v1/audio/transcriptions",
        &[("model", "gpt-4o-transcribe")],
        Some(&audio),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v = json_of(&bytes);
    assert!(v["text"].is_string());
    assert_eq!(
        v["usage"],
        json!({
            "type": "tokens",
            "input_tokens": 12,
            "input_token_details": {"text_tokens": 0, "audio_tokens": 12},
            "output_tokens": 9,
            "total_tokens": 21,
        })
    );
    assert_eq!(mock.reported(), reported(12, 0, 9, 0));
    assert_eq!(
        mock.requests()[0].body.len(),
        multipart(&[("model", "gpt-4o-transcribe")], Some(&audio))
            .1
            .len()
    );

    for path in ["/v1/audio/transcriptions", "/v1/audio/translations"] {
        let (status, _, bytes) =
            post_form(&mock, path, &[("model", "whisper-1")], Some(&audio)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json_of(&bytes)["usage"],
            json!({"type": "duration", "seconds": 3})
        );
    }
    assert_eq!(
        mock.reported(),
        reported(12, 0, 9, 0),
        "durations are not tokens"
    );

    let (_, headers, bytes) = post_form(
        &mock,
        "/v1/audio/transcriptions",
        &[("model", "whisper-1"), ("response_format", "text")],
        Some(&audio),
    )
    .await;
    assert_eq!(content_type(&headers), "text/plain; charset=utf-8");
    assert!(!bytes.starts_with(b"{"));
}

#[tokio::test]
async fn transcription_stream_ends_with_done_event_carrying_usage() {
    let mock = MockUpstream::start().await;
    let (status, headers, bytes) = post_form(
        &mock,
        "/v1/audio/transcriptions",
        &[("model", "gpt-4o-mini-transcribe"), ("stream", "true")],
        Some(b"RIFF"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type(&headers), "text/event-stream; charset=utf-8");
    let events = sse(&bytes);
    assert_eq!(events.len(), 6);
    assert!(events[..5]
        .iter()
        .all(|(_, d)| json_of(d.as_bytes())["type"] == "transcript.text.delta"));
    let done = json_of(events[5].1.as_bytes());
    assert_eq!(done["type"], "transcript.text.done");
    assert_eq!(done["usage"]["input_tokens"], 12);
    assert_eq!(mock.reported(), reported(12, 0, 9, 0));
}

#[tokio::test]
async fn file_upload_answers_a_file_object_with_the_file_size() {
    let mock = MockUpstream::start().await;
    let file = vec![b'x'; 4096];
    let (status, _, bytes) =
        post_form(&mock, "/v1/files", &[("purpose", "batch")], Some(&file)).await;
    assert_eq!(status, StatusCode::OK);
    let v = json_of(&bytes);
    assert_eq!(v["object"], "file");
    assert!(v["id"].as_str().unwrap().starts_with("file-"));
    assert_eq!(v["bytes"], 4096);
    assert_eq!(v["purpose"], "batch");
    assert_eq!(v["filename"], "clip.mp3");
    let recorded = &mock.requests()[0];
    assert_eq!(
        recorded.body.len(),
        multipart(&[("purpose", "batch")], Some(&file)).1.len()
    );
    assert_eq!(mock.reported(), Reported::default());

    let (status, _, bytes) = post_form(&mock, "/v1/files", &[("purpose", "batch")], None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json_of(&bytes)["error"]["param"], "file");
}

#[tokio::test]
async fn models_list_and_retrieve() {
    let mock = MockUpstream::start().await;
    let (status, _, bytes) = get(&mock, "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    let v = json_of(&bytes);
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in [
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4.1",
        "o3",
        "text-embedding-3-small",
        "whisper-1",
        "dall-e-3",
    ] {
        assert!(ids.contains(&id), "{id} listed");
    }

    let (status, _, bytes) = get(&mock, "/v1/models/gpt-4o-mini").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json_of(&bytes),
        json!({"id": "gpt-4o-mini", "object": "model", "created": 1_721_172_741, "owned_by": "system"})
    );

    let (status, _, bytes) = get(&mock, "/v1/models/gpt-nonexistent").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let v = json_of(&bytes);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(
        v["error"]["message"],
        "The model `gpt-nonexistent` does not exist or you do not have access to it."
    );
}

#[tokio::test]
async fn unknown_routes_get_openais_invalid_url_404() {
    let mock = MockUpstream::start().await;
    let (status, _, bytes) = post(&mock, "/v1/chat/completion", &[], json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        bytes.starts_with(b"{\n    \"error\": {"),
        "4-space error body"
    );
    let v = json_of(&bytes);
    assert_eq!(
        v["error"]["message"],
        "Invalid URL (POST /v1/chat/completion)"
    );
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], Value::Null);

    let (status, _, bytes) = get(&mock, "/v1/chat/completions").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        json_of(&bytes)["error"]["message"],
        "Invalid URL (GET /v1/chat/completions)"
    );
}

#[tokio::test]
async fn routes_work_behind_a_path_prefix() {
    let mock = MockUpstream::start().await;
    let (status, _, bytes) = post(
        &mock,
        "/openai/proxy/v1/chat/completions",
        &[],
        chat_request(false, false),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json_of(&bytes)["object"], "chat.completion");
    assert_eq!(mock.requests()[0].path, "/openai/proxy/v1/chat/completions");
}

#[tokio::test]
async fn requests_without_a_real_key_get_401() {
    let mock = MockUpstream::start().await;
    let (status, _, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[("authorization", "Bearer tg-internal-token-0123456789")],
        chat_request(false, false),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let v = json_of(&bytes);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(
        v["error"]["message"],
        "Incorrect API key provided: tg-inter****************6789. You can find your API key at https://platform.openai.com/account/api-keys."
    );

    let (status, _, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[("authorization", "")],
        chat_request(false, false),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let v = json_of(&bytes);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("You didn't provide an API key."));
    assert_eq!(v["error"]["code"], Value::Null);

    assert_eq!(
        mock.requests().len(),
        2,
        "rejected requests are still recorded"
    );
    assert!(mock.requests()[1].headers.get("authorization").is_none());
    assert_eq!(mock.reported(), Reported::default());
}

// ------------------------------------------------------------------------------------------
// Faults

#[tokio::test]
async fn forced_statuses_answer_openai_error_bodies() {
    let mock = MockUpstream::start().await;
    let cases = [
        ("500", "server_error", Value::Null),
        ("503", "server_error", Value::Null),
        ("429", "tokens", json!("rate_limit_exceeded")),
        ("400", "invalid_request_error", Value::Null),
        ("418", "invalid_request_error", Value::Null),
    ];
    for (code, kind, error_code) in cases {
        let (status, headers, bytes) = post(
            &mock,
            "/v1/chat/completions",
            &[("x-mock-status", code)],
            chat_request(true, true),
        )
        .await;
        assert_eq!(status.as_str(), code);
        assert_eq!(content_type(&headers), "application/json");
        let v = json_of(&bytes);
        assert_eq!(v["error"]["type"], kind, "{code}");
        assert_eq!(v["error"]["code"], error_code, "{code}");
        assert!(v["error"]["message"].is_string());
        assert_eq!(v["error"]["param"], Value::Null);
        if code == "429" {
            assert_eq!(headers["retry-after"], "1");
            assert_eq!(headers["x-ratelimit-remaining-tokens"], "0");
        }
    }
    assert_eq!(mock.reported(), Reported::default());
}

fn decode(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map(|_| ()),
        "deflate" => flate2::read::ZlibDecoder::new(bytes)
            .read_to_end(&mut out)
            .map(|_| ()),
        "br" => brotli::Decompressor::new(bytes, 4096)
            .read_to_end(&mut out)
            .map(|_| ()),
        "zstd" => zstd::stream::read::Decoder::new(bytes)
            .unwrap()
            .read_to_end(&mut out)
            .map(|_| ()),
        other => panic!("unknown encoding {other}"),
    }
    .unwrap_or_else(|e| panic!("{encoding} body decodes: {e}"));
    out
}

#[tokio::test]
async fn compressed_json_and_streams_decode() {
    let mock = MockUpstream::start().await;
    for encoding in ["gzip", "deflate", "br", "zstd"] {
        let (status, headers, bytes) = post(
            &mock,
            "/v1/chat/completions",
            &[("x-mock-encoding", encoding)],
            chat_request(false, false),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-encoding"], encoding);
        assert_eq!(content_type(&headers), "application/json");
        let v = json_of(&decode(encoding, &bytes));
        assert_eq!(v["usage"]["prompt_tokens"], 12);

        let (_, headers, bytes) = post(
            &mock,
            "/v1/chat/completions",
            &[("x-mock-encoding", encoding)],
            chat_request(true, true),
        )
        .await;
        assert_eq!(headers["content-encoding"], encoding);
        let chunks = chat_chunks(&decode(encoding, &bytes));
        assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 9);
    }
    let mut expected = reported(8 * 12, 0, 8 * 9, 0);
    expected.requests_with_usage = 8;
    assert_eq!(mock.reported(), expected);
}

/// Decodes as much of a compressed stream's prefix as can be decoded: what a client can read
/// before the rest has arrived.
fn decode_prefix(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut reader: Box<dyn Read + '_> = match encoding {
        "gzip" => Box::new(flate2::read::GzDecoder::new(bytes)),
        "deflate" => Box::new(flate2::read::ZlibDecoder::new(bytes)),
        "br" => Box::new(brotli::Decompressor::new(bytes, 4096)),
        "zstd" => Box::new(zstd::stream::read::Decoder::new(bytes).unwrap()),
        other => panic!("unknown encoding {other}"),
    };
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n @ 1..) = reader.read(&mut buf) {
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// An endless stream never finishes its compressed stream, so a client that decodes whole
/// events proves that each event is flushed as it is produced.
#[tokio::test]
async fn compressed_streams_are_flushed_event_by_event() {
    let mock = MockUpstream::start().await;
    for encoding in ["gzip", "deflate", "br", "zstd"] {
        let resp = send(
            &mock,
            Method::POST,
            "/v1/chat/completions",
            &[("x-mock-encoding", encoding), ("x-mock-endless", "1")],
            chat_request(true, false).to_string(),
        )
        .await;
        assert_eq!(resp.headers()["content-encoding"], encoding);
        let mut body = resp.into_body();
        let mut received = Vec::new();
        let mut decoded = Vec::new();
        let start = Instant::now();
        while decoded.windows(2).filter(|w| w == b"\n\n").count() < 2 {
            assert!(
                start.elapsed() < DEADLINE,
                "{encoding}: {} bytes received, decoded only {:?}",
                received.len(),
                String::from_utf8_lossy(&decoded)
            );
            let frame = tokio::time::timeout(DEADLINE, body.frame())
                .await
                .expect("a frame before the deadline")
                .expect("the stream goes on")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                received.extend_from_slice(&data);
                decoded = decode_prefix(encoding, &received);
            }
        }
        let text = String::from_utf8(decoded).unwrap();
        let first = text.split("\n\n").next().unwrap();
        let chunk = json_of(first.strip_prefix("data: ").unwrap().as_bytes());
        assert_eq!(chunk["object"], "chat.completion.chunk", "{encoding}");
    }
}

#[tokio::test]
async fn split_sends_small_frames_that_add_up_to_the_same_stream() {
    let mock = MockUpstream::start().await;
    let resp = send(
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-split", "7")],
        chat_request(true, true).to_string(),
    )
    .await;
    assert!(resp.headers().get("content-length").is_none());
    let (frames, error) = read_frames(resp).await;
    assert!(error.is_none());
    assert!(
        frames.iter().all(|f| f.len() <= 7),
        "every frame at most 7 bytes"
    );
    let body: BytesMut = frames.iter().flat_map(|f| f.iter().copied()).collect();
    assert!(frames.len() >= body.len() / 7);
    let chunks = chat_chunks(&body);
    assert_eq!(chunks.last().unwrap()["usage"]["prompt_tokens"], 12);
    assert_eq!(mock.reported(), reported(12, 0, 9, 0));

    // A JSON body is split too, and then sent without a content-length.
    let resp = send(
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-split", "16")],
        chat_request(false, false).to_string(),
    )
    .await;
    assert!(resp.headers().get("content-length").is_none());
    let (frames, _) = read_frames(resp).await;
    assert!(frames.iter().all(|f| f.len() <= 16));
    let body: BytesMut = frames.iter().flat_map(|f| f.iter().copied()).collect();
    assert_eq!(json_of(&body)["usage"]["total_tokens"], 21);
}

#[tokio::test]
async fn delay_holds_back_the_response_headers() {
    let mock = MockUpstream::start().await;
    let start = Instant::now();
    let (status, _, _) = post(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-delay-ms", "120")],
        chat_request(false, false),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(120));
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test]
async fn stall_without_an_end_sends_k_bytes_then_nothing() {
    let mock = MockUpstream::start().await;
    let resp = send(
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-stall-after", "40")],
        chat_request(true, true).to_string(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0;
    while received < 40 {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("the first 40 bytes arrive")
            .unwrap()
            .unwrap();
        received += frame.into_data().map_or(0, |d| d.len());
    }
    assert_eq!(received, 40);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), body.frame())
            .await
            .is_err(),
        "nothing after the stall point"
    );
    assert_eq!(mock.open_bodies(), 1);
    drop(body);
    eventually("the stalled body to be dropped", || mock.open_bodies() == 0).await;
    assert_eq!(mock.reported(), Reported::default());
}

#[tokio::test]
async fn stall_with_a_duration_resumes_and_completes() {
    let mock = MockUpstream::start().await;
    let start = Instant::now();
    let (status, _, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-stall-after", "40"), ("x-mock-stall-ms", "150")],
        chat_request(true, true),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert_eq!(chat_chunks(&bytes).len(), 1 + 5 + 1 + 1);
    assert_eq!(mock.reported(), reported(12, 0, 9, 0));
}

#[tokio::test]
async fn reset_ends_the_body_with_an_error() {
    let mock = MockUpstream::start().await;
    for stream in [false, true] {
        let resp = send(
            &mock,
            Method::POST,
            "/v1/chat/completions",
            &[("x-mock-reset-after", "50")],
            chat_request(stream, stream).to_string(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let (frames, error) = read_frames(resp).await;
        assert!(error.is_some(), "the client sees the reset");
        assert_eq!(frames.iter().map(Bytes::len).sum::<usize>(), 50);
    }
    assert_eq!(mock.reported(), Reported::default(), "usage never sent");

    // Past the end of the body: all of it, usage included, then the reset instead of the end.
    let resp = send(
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-reset-after", "1000000")],
        chat_request(true, true).to_string(),
    )
    .await;
    let (_, error) = read_frames(resp).await;
    assert!(error.is_some());
    assert_eq!(mock.reported(), reported(12, 0, 9, 0));
}

#[tokio::test]
async fn reset_over_http2_resets_the_stream() {
    let mock = MockUpstream::start().await;
    let resp = send_with(
        &client(true),
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-reset-after", "30")],
        chat_request(true, true).to_string(),
    )
    .await;
    let (_, error) = read_frames(resp).await;
    assert!(error.is_some());
}

#[tokio::test]
async fn garbage_is_not_sse() {
    let mock = MockUpstream::start().await;
    let (status, headers, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-garbage", "1")],
        chat_request(true, true),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type(&headers), "text/event-stream; charset=utf-8");
    assert!(!bytes.is_empty());
    assert!(!bytes.windows(5).any(|w| w == b"data:"));
    assert!(!bytes.windows(2).any(|w| w == b"\n\n"));
    assert!(std::str::from_utf8(&bytes).is_err());
    assert_eq!(mock.reported(), Reported::default());
}

#[tokio::test]
async fn truncate_ends_the_body_cleanly_after_k_bytes() {
    let mock = MockUpstream::start().await;
    let (status, headers, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-truncate", "30")],
        chat_request(false, false),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("content-length").is_none());
    assert_eq!(bytes.len(), 30);
    assert!(serde_json::from_slice::<Value>(&bytes).is_err());

    let (_, _, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-truncate", "400")],
        chat_request(true, true),
    )
    .await;
    assert_eq!(bytes.len(), 400);
    assert_eq!(mock.reported(), Reported::default());
}

#[tokio::test]
async fn bad_usage_sends_a_string_count_and_is_not_reported() {
    let mock = MockUpstream::start().await;
    let (_, _, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-bad-usage", "1")],
        chat_request(false, false),
    )
    .await;
    assert_eq!(json_of(&bytes)["usage"]["prompt_tokens"], "twelve");

    let (_, _, bytes) = post(
        &mock,
        "/v1/chat/completions",
        &[("x-mock-bad-usage", "1")],
        chat_request(true, true),
    )
    .await;
    let chunks = chat_chunks(&bytes);
    assert_eq!(chunks.last().unwrap()["usage"]["prompt_tokens"], "twelve");
    assert_eq!(mock.reported(), Reported::default());
}

#[tokio::test]
async fn endless_stream_stops_when_the_client_goes_away() {
    let mock = MockUpstream::start().await;
    let resp = send(
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-endless", "1")],
        chat_request(true, true).to_string(),
    )
    .await;
    assert_eq!(
        content_type(resp.headers()),
        "text/event-stream; charset=utf-8"
    );
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while text.windows(2).filter(|w| w == b"\n\n").count() < 3 {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("chunks keep coming")
            .unwrap()
            .unwrap();
        text.extend_from_slice(&frame.into_data().unwrap());
    }
    let complete = text.windows(2).rposition(|w| w == b"\n\n").unwrap() + 2;
    let events = sse(&text[..complete]);
    assert!(events.len() >= 3);
    assert_eq!(
        json_of(events[0].1.as_bytes())["object"],
        "chat.completion.chunk"
    );
    assert_eq!(mock.open_bodies(), 1);
    drop(body);
    eventually("the endless body to be dropped", || mock.open_bodies() == 0).await;
}

#[tokio::test]
async fn serves_h2c() {
    let mock = MockUpstream::start().await;
    let resp = send_with(
        &client(true),
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        chat_request(true, true).to_string(),
    )
    .await;
    assert_eq!(resp.version(), Version::HTTP_2);
    let (status, _, bytes) = collect(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(chat_chunks(&bytes).len(), 8);
    assert_eq!(mock.requests()[0].version, Version::HTTP_2);
    assert_eq!(mock.requests()[0].path, "/v1/chat/completions");
    assert_eq!(mock.reported(), reported(12, 0, 9, 0));
}

#[tokio::test]
async fn dropping_the_mock_closes_its_connections() {
    use tokio::io::AsyncReadExt;

    let mock = MockUpstream::start().await;
    assert_eq!(
        mock.base_url(),
        format!("http://127.0.0.1:{}", mock.addr.port())
    );
    let mut idle = tokio::net::TcpStream::connect(mock.addr).await.unwrap();
    drop(mock);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(DEADLINE, idle.read(&mut buf))
        .await
        .expect("the connection is closed when the mock is dropped");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
