//! Hardening: hostile or broken clients and upstreams.
//!
//! Every case asserts three things: the bad party gets an OpenAI-shaped answer (or a closed
//! connection) within a deadline; tollgate keeps serving everyone else (a normal request
//! succeeds during or right after); and the counters (`GET /admin/projects` spent and reserved,
//! the `tollgate_tokens_total` lines of `/metrics`) move exactly as the README's "What is
//! charged" table says: not at all for a request tollgate refuses, by the numbers of the rule
//! otherwise. Deadlines are generous upper bounds; the only lower bounds are on timers that
//! must not fire early.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::harness::*;
use common::mock_upstream::MockUpstream;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};

use tollgate::body::ProxyBody;
use tollgate::error::ProxyError;

const TOKEN: &str = "tg-test-harden-svc";
const PROJECT: &str = "alpha";
const MODEL: &str = "gpt-4o-mini";
/// The output cap of every request below: the "reserved output" of the charge rules.
const MAX_TOKENS: u64 = 50;
/// Slack added to every "within the timeout" deadline: generous for a loaded CI machine.
const MARGIN: Duration = Duration::from_millis(1500);

/// The settings a test changes; everything else is the harness's default.
struct Knobs {
    server: &'static str,
    request_timeout_ms: u64,
    idle_timeout_ms: u64,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            server: "",
            request_timeout_ms: 1500,
            idle_timeout_ms: 400,
        }
    }
}

fn config(upstream: &str, knobs: &Knobs) -> String {
    format!(
        r#"
[admin]
token_env = "TOLLGATE_ADMIN_TOKEN"

[upstream]
base_url = "{upstream}"
request_timeout_ms = {request}
idle_timeout_ms = {idle}

[server]
max_body_bytes = 65536
{server}

[[projects]]
name = "{PROJECT}"
api_key_env = "OPENAI_KEY"
allowed_models = ["{MODEL}"]
budget = {{ tokens = 100000000, usd = 1000.0, period = "monthly" }}

[[projects.credentials]]
name = "svc"
token_sha256 = "{svc}"
"#,
        request = knobs.request_timeout_ms,
        idle = knobs.idle_timeout_ms,
        server = knobs.server,
        svc = sha256_hex(TOKEN),
    )
}

async fn setup(knobs: &Knobs) -> (MockUpstream, TestProxy) {
    let mock = MockUpstream::start().await;
    let proxy = TestProxy::start(&config(&mock.base_url(), knobs)).await;
    (mock, proxy)
}

/// A chat request body with an output cap, as the exact bytes sent (its length is the input
/// estimate).
fn chat_body(stream: bool, include_usage: bool) -> Bytes {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": MAX_TOKENS,
    });
    if stream {
        body["stream"] = json!(true);
    }
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    Bytes::from(serde_json::to_vec(&body).unwrap())
}

fn auth() -> String {
    format!("Bearer {TOKEN}")
}

/// POSTs `body` to the chat endpoint with the token and `extra` headers.
async fn post_chat(proxy: &TestProxy, body: &Bytes, extra: &[(&str, &str)]) -> Answer {
    post_json_bytes(proxy, "/v1/chat/completions", TOKEN, body.clone(), extra).await
}

/// A normal request succeeds and reports its usage: tollgate is still serving.
async fn assert_serves(proxy: &TestProxy) {
    let answer = timeout(
        Duration::from_secs(3),
        post_chat(proxy, &chat_body(false, false), &[]),
    )
    .await
    .expect("a normal request is answered within 3 s");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(answer.json()["usage"]["total_tokens"].is_u64());
}

/// What a test compares before and after a bad request.
#[derive(Debug, Clone, PartialEq)]
struct Counters {
    spent: Value,
    reserved: Value,
    in_flight: Value,
    /// The `tollgate_tokens_total` lines of `/metrics`.
    token_lines: Vec<String>,
}

impl Counters {
    fn spent(&self, field: &str) -> u64 {
        self.spent[field]
            .as_u64()
            .unwrap_or_else(|| panic!("spent.{field} in {}", self.spent))
    }
}

async fn counters(proxy: &TestProxy) -> Counters {
    let report = proxy.admin_json("/admin/projects").await;
    let project = report["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == PROJECT)
        .cloned()
        .unwrap_or_else(|| panic!("no project {PROJECT} in {report}"));
    let metrics = proxy.metrics().await;
    Counters {
        spent: project["spent"].clone(),
        reserved: project["reserved"].clone(),
        in_flight: project["in_flight"].clone(),
        token_lines: metrics
            .lines()
            .filter(|l| l.starts_with("tollgate_tokens_total"))
            .map(str::to_owned)
            .collect(),
    }
}

/// The counters once nothing is in flight or reserved (a cut body settles when hyper drops it,
/// a moment after the client saw the cut).
async fn settled(proxy: &TestProxy) -> Counters {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = counters(proxy).await;
        if now.in_flight == 0 && now.reserved["tokens"] == 0 {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "still in flight or reserved after 3 s: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `tollgate_tokens_total` value for the test project and model (0 when absent).
fn metric_tokens(counters: &Counters, kind: &str) -> u64 {
    let prefix =
        format!(r#"tollgate_tokens_total{{project="{PROJECT}",model="{MODEL}",type="{kind}"}} "#);
    counters
        .token_lines
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

/// Asserts that nothing was charged, counted or left reserved between `before` and now
/// (`before` may have been taken with the bad request still in flight).
async fn assert_unchanged(proxy: &TestProxy, before: &Counters, what: &str) {
    let after = settled(proxy).await;
    assert_eq!(
        (&after.spent, &after.reserved, &after.token_lines),
        (&before.spent, &before.reserved, &before.token_lines),
        "{what}: the counters must not move"
    );
}

/// Asserts that exactly `input` and `output` tokens were charged since `before`, in one
/// settled request, in the admin report and in `/metrics`.
async fn assert_charged(proxy: &TestProxy, before: &Counters, input: u64, output: u64, what: &str) {
    let after = settled(proxy).await;
    let delta = |field: &str| after.spent(field) - before.spent(field);
    assert_eq!(
        (delta("input_tokens"), delta("output_tokens")),
        (input, output),
        "{what}: charged (input, output) tokens; spent {}",
        after.spent
    );
    assert_eq!(delta("tokens"), input + output, "{what}: total tokens");
    assert_eq!(delta("cached_input_tokens"), 0, "{what}");
    assert_eq!(delta("requests"), 1, "{what}: one request settled");
    let usd = |c: &Counters| c.spent["usd"].as_f64().unwrap();
    if input + output > 0 {
        assert!(usd(&after) > usd(before), "{what}: a cost in USD");
    } else {
        assert_eq!(usd(&after), usd(before), "{what}: no cost in USD");
    }
    assert_eq!(
        metric_tokens(&after, "input") - metric_tokens(before, "input"),
        input,
        "{what}: tollgate_tokens_total input"
    );
    assert_eq!(
        metric_tokens(&after, "output") - metric_tokens(before, "output"),
        output,
        "{what}: tollgate_tokens_total output"
    );
}

// ---------------------------------------------------------------------------------------------
// Raw sockets

/// Reads until the peer closes the connection (EOF or an error) or `within` passes. Returns
/// the bytes read and, if it closed, when.
async fn read_until_closed(
    stream: &mut TcpStream,
    within: Duration,
) -> (Vec<u8>, Option<Duration>) {
    read_half_until_closed(stream, within).await
}

async fn read_half_until_closed<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    within: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let deadline = started + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, reader.read(&mut buf)).await {
            Err(_) => return (got, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(started.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `bytes` one at a time, `every` apart (stopping early only when the server closes),
/// then holds the connection open without sending more.
fn drip(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    bytes: &'static [u8],
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for byte in bytes {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
}

/// The status code of a raw HTTP/1.1 response, if `raw` starts with one.
fn raw_status(raw: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(raw.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// The body of a raw HTTP/1.1 response framed by `content-length`.
fn raw_body(raw: &[u8]) -> Value {
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of the response head");
    let head = String::from_utf8_lossy(&raw[..at]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    serde_json::from_slice(&raw[at + 4..at + 4 + len]).expect("a JSON body")
}

/// An OpenAI-shaped error object: message, type, param and code.
fn assert_openai_error(body: &Value) -> Value {
    let error = body["error"].clone();
    assert!(error["message"].is_string(), "{body}");
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("param").is_some(), "{body}");
    assert!(error.get("code").is_some(), "{body}");
    error
}

/// Sends `request` on a fresh HTTP/1.1 connection, with any body type.
async fn send_body<B>(addr: SocketAddr, request: Request<B>) -> hyper::Result<Response<Incoming>>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender.send_request(request).await
}

// ---------------------------------------------------------------------------------------------
// Bad input from clients

#[tokio::test]
async fn malformed_json_is_a_400_and_charges_nothing() {
    let (mock, proxy) = setup(&Knobs::default()).await;
    let before = counters(&proxy).await;
    for body in [
        &b"{\"model\": "[..],
        b"{\"model\": \"gpt-4o-mini\", \"messages\": [}",
        b"not json at all",
        b"[1, 2, 3]",
        b"{\"model\": \"gpt-4o-mini\"} trailing",
    ] {
        let answer = timeout(
            Duration::from_secs(2),
            post_chat(&proxy, &Bytes::copy_from_slice(body), &[]),
        )
        .await
        .expect("answered within 2 s");
        let error = answer.error(400);
        assert_eq!(error["type"], "invalid_request_error", "{error}");
    }
    assert!(mock.requests().is_empty(), "never forwarded");
    assert_unchanged(&proxy, &before, "malformed JSON").await;
    assert_serves(&proxy).await;
}

#[tokio::test]
async fn a_model_of_the_wrong_type_is_a_400_naming_the_param() {
    let (mock, proxy) = setup(&Knobs::default()).await;
    let before = counters(&proxy).await;
    for model in [
        json!(4),
        json!(["gpt-4o-mini"]),
        json!({"id": "gpt-4o-mini"}),
        json!(true),
    ] {
        let body = json!({"model": model, "messages": [], "max_tokens": MAX_TOKENS});
        let answer = post_chat(&proxy, &Bytes::from(body.to_string()), &[]).await;
        let error = answer.error(400);
        assert_eq!(error["param"], "model", "{model}: {error}");
        assert_eq!(error["code"], "invalid_type", "{model}: {error}");
    }
    assert!(mock.requests().is_empty(), "never forwarded");
    assert_unchanged(&proxy, &before, "model of the wrong type").await;
    assert_serves(&proxy).await;
}

/// RFC 8259 JSON is UTF-8: a body with invalid UTF-8 anywhere is not JSON, and tollgate refuses
/// it itself (README step 3) rather than reserving budget and forwarding it.
#[tokio::test]
async fn invalid_utf8_inside_the_json_is_a_400() {
    let (mock, proxy) = setup(&Knobs::default()).await;
    let before = counters(&proxy).await;
    let cases: [(&str, &[u8]); 3] = [
        ("in the model", b"{\"model\": \"gpt-4o-mini\xff\xfe\", \"max_tokens\": 50}"),
        (
            "in a message",
            b"{\"model\": \"gpt-4o-mini\", \"max_tokens\": 50, \"messages\": [{\"role\": \"user\", \"content\": \"caf\xc3\x28 \xff\"}]}",
        ),
        (
            "in a key",
            b"{\"model\": \"gpt-4o-mini\", \"max_tokens\": 50, \"\xed\xa0\x80\": 1}",
        ),
    ];
    for (what, body) in cases {
        let answer = post_chat(&proxy, &Bytes::from_static(body), &[]).await;
        let error = answer.error(400);
        assert_eq!(error["type"], "invalid_request_error", "{what}: {error}");
        assert!(
            mock.requests().is_empty(),
            "{what}: a body that is not JSON must not be forwarded"
        );
    }
    assert_unchanged(&proxy, &before, "invalid UTF-8").await;
    assert_serves(&proxy).await;
}

/// 200 KB of request headers: hyper answers 431 or closes the connection, within 2 s, and the
/// request never reaches the upstream.
async fn huge_headers_case(what: &str, headers: String) {
    let (mock, proxy) = setup(&Knobs::default()).await;
    let before = counters(&proxy).await;
    let body = chat_body(false, false);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n",
        body.len()
    );
    // The server may close while we write: that is one of the accepted outcomes.
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let (raw, closed) = read_until_closed(&mut stream, Duration::from_secs(2)).await;
    assert!(
        raw_status(&raw) == Some(431) || (raw.is_empty() && closed.is_some()),
        "{what}: expected a 431 or a closed connection within 2 s, got {:?} (closed: {closed:?})",
        String::from_utf8_lossy(&raw[..raw.len().min(300)])
    );
    assert!(mock.requests().is_empty(), "{what}: never forwarded");
    assert_unchanged(&proxy, &before, what).await;
    assert_serves(&proxy).await;
}

#[tokio::test]
async fn one_200kb_header_is_refused_within_2s() {
    let header = format!("x-huge: {}\r\n", "a".repeat(200 * 1024));
    huge_headers_case("one 200 KB header", header).await;
}

#[tokio::test]
async fn two_hundred_1kb_headers_are_refused_within_2s() {
    let headers: String = (0..200)
        .map(|i| format!("x-many-{i}: {}\r\n", "b".repeat(1024)))
        .collect();
    huge_headers_case("200 headers of 1 KB", headers).await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_with_or_without_content_length() {
    let (mock, proxy) = setup(&Knobs::default()).await;
    let before = counters(&proxy).await;
    let huge = json!({"model": MODEL, "input": "x".repeat(100_000)}).to_string();

    // Declared by content-length: refused before a byte of it is read.
    let answer = timeout(
        Duration::from_secs(2),
        send(
            Method::POST,
            &proxy.url("/v1/embeddings"),
            &[
                ("authorization", &auth()),
                ("content-type", "application/json"),
            ],
            Bytes::from(huge.clone()),
        ),
    )
    .await
    .expect("answered within 2 s");
    assert_eq!(answer.error(413)["code"], "request_too_large");

    // Chunked, no length: refused once the limit is passed.
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = huge
        .as_bytes()
        .chunks(8 * 1024)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let request = Request::post(proxy.url("/v1/embeddings"))
        .header("authorization", auth())
        .header("content-type", "application/json")
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    assert!(request.headers().get("content-length").is_none());
    let response = timeout(Duration::from_secs(2), send_body(proxy.addr, request))
        .await
        .expect("answered within 2 s")
        .expect("a response");
    let (head, body) = response.into_parts();
    assert_eq!(head.status, StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = serde_json::from_slice(&body.collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(assert_openai_error(&body)["code"], "request_too_large");

    assert!(mock.requests().is_empty(), "never forwarded");
    assert_unchanged(&proxy, &before, "oversized bodies").await;
    assert_serves(&proxy).await;
}

/// A chunked JSON body that trickles forever: 408 (or a closed connection) once
/// `body_read_timeout_ms` has passed, while other clients are served.
#[tokio::test]
async fn a_body_that_never_ends_is_a_408_after_the_body_timeout() {
    let body_timeout = Duration::from_millis(300);
    let (mock, proxy) = setup(&Knobs {
        server: "body_read_timeout_ms = 300",
        ..Knobs::default()
    })
    .await;
    let before = counters(&proxy).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n1\r\n{{\r\n"
    );
    writer.write_all(head.as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        // One space every 20 ms: the body keeps arriving, it just never ends.
        while writer.write_all(b"1\r\n \r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let started = Instant::now();
    // Others are served while the trickle goes on.
    assert_serves(&proxy).await;
    let served = counters(&proxy).await;
    let (raw, closed) =
        read_half_until_closed(&mut reader, body_timeout + MARGIN + Duration::from_secs(1)).await;
    let elapsed = started.elapsed();
    trickle.abort();
    match raw_status(&raw) {
        Some(408) => {
            let error = assert_openai_error(&raw_body(&raw));
            assert_eq!(error["code"], "request_timeout", "{error}");
        }
        None if raw.is_empty() && closed.is_some() => {}
        other => panic!(
            "expected a 408 or a closed connection, got {other:?}: {}",
            String::from_utf8_lossy(&raw)
        ),
    }
    assert!(
        elapsed >= body_timeout.mul_f32(0.8),
        "the body timeout fired early, after {elapsed:?}"
    );
    assert!(
        elapsed <= body_timeout + MARGIN,
        "the body timeout must fire within {body_timeout:?} + margin, took {elapsed:?}"
    );
    assert_eq!(
        mock.requests().len(),
        1,
        "only the normal request was forwarded"
    );
    assert_unchanged(&proxy, &served, "never-ending body").await;
    assert_eq!(served.spent("requests"), before.spent("requests") + 1);
    assert_serves(&proxy).await;
}

/// Slowloris: `opening` sent a byte every 100 ms, never finished. The connection is closed
/// once `header_read_timeout_ms` (300 ms) has passed, although bytes keep coming; others are
/// served meanwhile.
async fn slow_opening_case(what: &str, opening: &'static [u8]) {
    let header_timeout = Duration::from_millis(300);
    let (mock, proxy) = setup(&Knobs {
        server: "header_read_timeout_ms = 300",
        ..Knobs::default()
    })
    .await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    let (mut reader, writer) = stream.into_split();
    let drip = drip(writer, opening, Duration::from_millis(100));
    let before = counters(&proxy).await;
    assert_serves(&proxy).await;
    let left = (header_timeout + MARGIN).saturating_sub(started.elapsed());
    let (raw, closed) = read_half_until_closed(&mut reader, left).await;
    let elapsed = started.elapsed();
    drip.abort();
    assert!(
        closed.is_some(),
        "{what}: still open {elapsed:?} after it was accepted; the header timeout is {header_timeout:?}"
    );
    assert!(
        raw.is_empty() || raw_status(&raw) == Some(408),
        "{what}: {}",
        String::from_utf8_lossy(&raw)
    );
    assert!(
        elapsed >= header_timeout.mul_f32(0.8),
        "{what}: closed before the header timeout, after {elapsed:?}"
    );
    assert_eq!(
        mock.requests().len(),
        1,
        "only the normal request was forwarded"
    );
    let after = settled(&proxy).await;
    assert_eq!(after.spent("requests"), before.spent("requests") + 1);
    assert_serves(&proxy).await;
}

#[tokio::test]
async fn slow_http1_headers_are_cut_after_the_header_timeout() {
    slow_opening_case(
        "HTTP/1.1 request line and headers",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    )
    .await;
}

/// The server reads the first bytes of a connection to tell HTTP/2's preface from HTTP/1.1
/// before either protocol's own timers run: a client that drips the preface must be cut too.
#[tokio::test]
async fn a_slow_http2_preface_is_cut_after_the_header_timeout() {
    slow_opening_case("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n").await;
}

/// Reads one response framed by `content-length` from a kept-alive connection; its status.
async fn read_one_response(stream: &mut TcpStream) -> u16 {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..at]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if got.len() >= at + 4 + length {
                return raw_status(&got).expect("a status line");
            }
        }
        let n = tokio::time::timeout(MARGIN, stream.read(&mut buf))
            .await
            .expect("a response in time")
            .expect("a readable connection");
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// HTTP/2 has no idle timer in hyper (it pings the client, which keeps the connection open
/// for as long as the client answers): a connection with no request in flight for
/// `keepalive_idle_timeout_ms` is closed with a GOAWAY, and a request slower than that is not
/// cut by it.
#[tokio::test]
async fn idle_http2_connections_are_closed_after_the_keepalive_timeout() {
    let idle = Duration::from_millis(600);
    let (_mock, proxy) = setup(&Knobs {
        server: "header_read_timeout_ms = 200\nkeepalive_idle_timeout_ms = 600",
        ..Knobs::default()
    })
    .await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);

    // Twice the idle timeout upstream: the request is in flight all along, and served whole.
    let request = Request::post(format!("http://{}/v1/chat/completions", proxy.addr))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .header("x-mock-delay-ms", "1200")
        .body(Full::new(chat_body(false, false)))
        .unwrap();
    let response = timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("an answer in time")
        .expect("served, not cut");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let usage: Value = serde_json::from_slice(&body).unwrap();
    assert!(usage["usage"]["total_tokens"].is_u64(), "{usage}");
    let answered = Instant::now();

    // Then idle: the server closes the connection, cleanly, after about the idle timeout.
    let ended = timeout(idle * 2 + MARGIN, connection)
        .await
        .expect("an idle HTTP/2 connection is closed after the keep-alive timeout");
    let idle_for = answered.elapsed();
    assert!(
        matches!(ended, Ok(Ok(()))),
        "closed with an error: {ended:?}"
    );
    assert!(
        idle_for >= idle.mul_f32(0.8),
        "closed after {idle_for:?} idle; the keep-alive timeout is {idle:?}"
    );
    assert_serves(&proxy).await;
}

/// Keep-alive: an idle connection stays open for `keepalive_idle_timeout_ms`, not just the
/// header timeout, then is closed; a request head begun on it must still be complete within
/// the header timeout (checked every half of it, so cut within 1 to 1.5 times it).
#[tokio::test]
async fn kept_alive_connections_idle_for_the_keepalive_timeout_and_heads_for_the_header_timeout() {
    let header_timeout = Duration::from_millis(300);
    let keepalive = Duration::from_millis(1500);
    let (_mock, proxy) = setup(&Knobs {
        server: "header_read_timeout_ms = 300\nkeepalive_idle_timeout_ms = 1500",
        ..Knobs::default()
    })
    .await;
    const REQUEST: &[u8] = b"GET /nowhere HTTP/1.1\r\nhost: tollgate\r\n\r\n";

    // Idle three header timeouts, then a second request on the same connection.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(REQUEST).await.unwrap();
    assert_eq!(read_one_response(&mut stream).await, 404);
    tokio::time::sleep(header_timeout * 3).await;
    stream.write_all(REQUEST).await.unwrap();
    assert_eq!(read_one_response(&mut stream).await, 404);
    // Then idle until the server closes it: at the keep-alive timeout, not before.
    let (raw, closed) = read_until_closed(&mut stream, keepalive + MARGIN).await;
    let closed = closed.expect("an idle connection is closed after the keep-alive timeout");
    assert!(
        raw.is_empty() || raw_status(&raw) == Some(408),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    assert!(
        closed >= keepalive.mul_f32(0.8),
        "closed after {closed:?} idle; the keep-alive timeout is {keepalive:?}"
    );

    // A head begun after a response, dripped a byte every 50 ms for longer than the keep-alive
    // timeout: cut by the header timeout.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(REQUEST).await.unwrap();
    assert_eq!(read_one_response(&mut stream).await, 404);
    let (mut reader, writer) = stream.into_split();
    let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: tollgate\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let drip = drip(writer, head, Duration::from_millis(50));
    let (_, closed) =
        read_half_until_closed(&mut reader, header_timeout.mul_f32(1.5) + MARGIN).await;
    drip.abort();
    let closed = closed.expect("a dripped head on a kept-alive connection is cut");
    assert!(
        closed >= header_timeout.mul_f32(0.8),
        "cut after {closed:?}, before the header timeout"
    );
    assert!(
        closed < keepalive,
        "cut after {closed:?}: by the keep-alive timeout, not the header timeout"
    );
    assert_serves(&proxy).await;
}

/// A connection flood with `max_connections = 8`: 50 raw TCP connections that send nothing.
///
/// What is asserted: (1) the admin listener (its own connection limit) answers at once during
/// the flood; (2) a normal request on a fresh connection, queued behind the flood, is not served
/// before the idle connections start being closed (the limit holds: it waits at least one
/// header timeout) but completes within a deadline (each idle connection is closed after
/// `header_read_timeout_ms`, freeing its slot, so the queue drains in ceil(51 / 8) rounds);
/// (3) every flood connection is closed by the server within that deadline.
#[tokio::test]
async fn a_connection_flood_is_drained_by_the_header_timeout() {
    let header_timeout = Duration::from_millis(250);
    let (_mock, proxy) = setup(&Knobs {
        server: "max_connections = 8\nheader_read_timeout_ms = 250",
        ..Knobs::default()
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..50 {
        flood.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    let started = Instant::now();
    let admin = timeout(Duration::from_secs(1), proxy.metrics())
        .await
        .expect("the admin listener answers during a data-plane flood");
    assert!(admin.contains("tollgate_inflight_requests"));

    let normal = tokio::spawn({
        let url = proxy.url("/v1/chat/completions");
        async move {
            let answer = send(
                Method::POST,
                &url,
                &[
                    ("authorization", &auth()),
                    ("content-type", "application/json"),
                ],
                chat_body(false, false),
            )
            .await;
            (answer, started.elapsed())
        }
    });
    // 7 rounds of 250 ms plus scheduling: 4 s is far beyond it.
    let deadline = Duration::from_secs(4);
    let (answer, waited) = timeout(deadline, normal)
        .await
        .unwrap_or_else(|_| {
            panic!("a request behind 50 idle connections must be served within {deadline:?}")
        })
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(
        waited >= header_timeout.mul_f32(0.8),
        "served after {waited:?}: the connection limit of 8 did not hold"
    );
    for (i, stream) in flood.iter_mut().enumerate() {
        let left = deadline.saturating_sub(started.elapsed());
        let (_, closed) = read_until_closed(stream, left).await;
        assert!(closed.is_some(), "flood connection {i} still open");
    }
    assert_serves(&proxy).await;
}

#[tokio::test]
async fn an_unknown_path_is_a_404() {
    let (mock, proxy) = setup(&Knobs::default()).await;
    let before = counters(&proxy).await;
    for (method, path) in [
        (Method::GET, "/"),
        (Method::POST, "/v2/chat/completions"),
        (Method::GET, "/admin/projects"),
        (Method::GET, "/v1"),
        (Method::DELETE, "/../../etc/passwd"),
    ] {
        let answer = send(
            method.clone(),
            &proxy.url(path),
            &[("authorization", &auth())],
            Bytes::new(),
        )
        .await;
        let error = answer.error(404);
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("Invalid URL ({method} ")),
            "{error}"
        );
    }
    assert!(mock.requests().is_empty(), "never forwarded");
    assert_unchanged(&proxy, &before, "unknown paths").await;
    assert_serves(&proxy).await;
}

// ---------------------------------------------------------------------------------------------
// Bad input from the upstream

/// The mock's whole answer to `body`, fetched directly (the id sequence reseeded and the time
/// pinned, so the proxy's answer to the same request is the same bytes).
async fn direct_answer(mock: &MockUpstream, body: &Bytes, extra: &[(&str, &str)]) -> Bytes {
    let key = format!("Bearer {REAL_KEY}");
    let mut headers = vec![
        ("authorization", key.as_str()),
        ("content-type", "application/json"),
        ("x-mock-created", "1760000000"),
    ];
    headers.extend_from_slice(extra);
    mock.reseed(7);
    let answer = send(
        Method::POST,
        &format!("{}/v1/chat/completions", mock.base_url()),
        &headers,
        body.clone(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.body
}

/// Data events (blank-line terminated, `[DONE]` excepted) in `bytes`.
fn complete_events(bytes: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(bytes);
    let mut events = text.split("\n\n").collect::<Vec<_>>();
    events.pop(); // the unterminated rest
    events
        .iter()
        .filter(|e| e.starts_with("data: ") && !e.starts_with("data: [DONE]"))
        .count() as u64
}

async fn truncated_json_case(at: impl Fn(&[u8]) -> usize, what: &str) {
    let (mock, proxy) = setup(&Knobs::default()).await;
    let body = chat_body(false, false);
    let full = direct_answer(&mock, &body, &[]).await;
    let cut = at(&full);
    let before = counters(&proxy).await;
    mock.reseed(7);
    let cut_header = cut.to_string();
    let answer = timeout(
        Duration::from_secs(3),
        post_chat(
            &proxy,
            &body,
            &[
                ("x-mock-created", "1760000000"),
                ("x-mock-truncate", &cut_header),
            ],
        ),
    )
    .await
    .expect("answered within 3 s");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.body,
        full.slice(..cut),
        "{what}: the client gets exactly the bytes the upstream sent"
    );
    // README: "a non-streamed answer cut short: input estimate + the reserved output".
    assert_charged(&proxy, &before, body.len() as u64, MAX_TOKENS, what).await;
    assert_serves(&proxy).await;
}

#[tokio::test]
async fn truncated_json_before_its_usage_is_charged_the_estimate() {
    truncated_json_case(|_| 100, "JSON truncated at byte 100").await;
}

#[tokio::test]
async fn truncated_json_inside_its_usage_is_charged_the_estimate() {
    truncated_json_case(
        |full| {
            let at = full
                .windows(8)
                .position(|w| w == b"\"usage\":")
                .expect("a usage member");
            at + 30
        },
        "JSON truncated inside its usage",
    )
    .await;
}

/// The garbage the mock sends for `x-mock-garbage`: an SSE content type, no event in it.
const GARBAGE: &[u8] = b"\x00\x9f\x92\x96<html><body>upstream exploded</body></html>\r\n{\"choices\": [tru\xff\xfe not server-sent events at all\r\n";

/// Garbage under an SSE content type passes to the client byte for byte (also through the
/// usage-chunk filter, for a client that did not ask for usage). It ended cleanly with no
/// usage: README "2xx that ended cleanly with no usage: nothing (the request is counted)".
#[tokio::test]
async fn garbage_sse_passes_through_and_charges_nothing() {
    let (_mock, proxy) = setup(&Knobs::default()).await;
    for include_usage in [true, false] {
        let before = counters(&proxy).await;
        let body = chat_body(true, include_usage);
        let answer = timeout(
            Duration::from_secs(3),
            post_chat(&proxy, &body, &[("x-mock-garbage", "1")]),
        )
        .await
        .expect("answered within 3 s");
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            &answer.body[..],
            GARBAGE,
            "include_usage={include_usage}: the client gets the upstream's bytes"
        );
        assert_charged(&proxy, &before, 0, 0, "garbage SSE").await;
    }
    assert_serves(&proxy).await;
}

/// An endless stream the client leaves after 5 events: README "a stream cut short (client
/// gone): input estimate + one output token per SSE event seen"; nothing stays in flight and
/// the upstream stream is cancelled.
#[tokio::test]
async fn an_endless_stream_left_by_its_client_is_charged_per_event() {
    let (mock, proxy) = setup(&Knobs::default()).await;
    let before = counters(&proxy).await;
    let body = chat_body(true, false);
    let started = Instant::now();
    let response = client()
        .request(request(
            Method::POST,
            &proxy.url("/v1/chat/completions"),
            &[
                ("authorization", &auth()),
                ("content-type", "application/json"),
                ("x-mock-endless", "1"),
            ],
            body.clone(),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut incoming = response.into_body();
    let mut seen = Vec::new();
    while complete_events(&seen) < 5 {
        let frame = timeout(Duration::from_secs(2), incoming.frame())
            .await
            .expect("events keep coming")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            seen.extend_from_slice(&data);
        }
    }
    // Others are served while the stream runs.
    assert_serves(&proxy).await;
    let during = counters(&proxy).await;
    drop(incoming);
    let after = settled(&proxy).await;
    let elapsed = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(3);
    while mock.open_bodies() > 0 {
        assert!(
            Instant::now() < deadline,
            "the upstream stream was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let input = after.spent("input_tokens") - during.spent("input_tokens");
    let output = after.spent("output_tokens") - during.spent("output_tokens");
    assert_eq!(input, body.len() as u64, "the input estimate");
    // At least the events the client saw; at most what the mock can have sent (one event per
    // 10 ms), and far below the reservation.
    let most = elapsed.as_millis() as u64 / 10 + 1;
    assert!(
        (5..=most).contains(&output) && output < MAX_TOKENS,
        "one output token per event seen: {output} (the client saw 5, at most {most} were sent)"
    );
    assert_eq!(
        after.spent("tokens") - during.spent("tokens"),
        input + output
    );
    assert_eq!(
        metric_tokens(&after, "output") - metric_tokens(&during, "output"),
        output
    );
    assert_eq!(
        metric_tokens(&after, "input") - metric_tokens(&during, "input"),
        input
    );
    assert_eq!(after.spent("requests"), before.spent("requests") + 2);
    assert_serves(&proxy).await;
}

/// A usage whose `prompt_tokens` is a string: the bad value is never charged. README "a usage
/// object that cannot be read: input estimate + the reserved output".
#[tokio::test]
async fn a_usage_of_the_wrong_type_is_charged_the_estimate() {
    let (_mock, proxy) = setup(&Knobs::default()).await;
    let before = counters(&proxy).await;
    let body = chat_body(false, false);
    let answer = post_chat(&proxy, &body, &[("x-mock-bad-usage", "1")]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["usage"]["prompt_tokens"], "twelve");
    assert_charged(
        &proxy,
        &before,
        body.len() as u64,
        MAX_TOKENS,
        "bad usage, JSON",
    )
    .await;
    assert_serves(&proxy).await;
}

/// The same in a stream that ended cleanly: its usage object is there but cannot be read, and
/// the stream was not cut short, so the README's row for an unreadable usage object applies.
#[tokio::test]
async fn a_streamed_usage_of_the_wrong_type_is_charged_the_estimate() {
    let (_mock, proxy) = setup(&Knobs::default()).await;
    let before = counters(&proxy).await;
    let body = chat_body(true, true);
    let answer = post_chat(&proxy, &body, &[("x-mock-bad-usage", "1")]).await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = answer.text();
    assert!(text.contains("\"prompt_tokens\":\"twelve\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_charged(
        &proxy,
        &before,
        body.len() as u64,
        MAX_TOKENS,
        "bad usage, SSE",
    )
    .await;
    assert_serves(&proxy).await;
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// An upstream that answers every request with the same status, headers and body.
struct CannedUpstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CannedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn canned_upstream(
    headers: Vec<(&'static str, &'static str)>,
    body: Bytes,
) -> CannedUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    canned_upstream_on(listener, headers, body)
}

fn canned_upstream_on(
    listener: TcpListener,
    headers: Vec<(&'static str, &'static str)>,
    body: Bytes,
) -> CannedUpstream {
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let headers = headers.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let headers = headers.clone();
                    let body = body.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        let mut response = Response::new(Full::new(body));
                        for (name, value) in headers {
                            response.headers_mut().insert(name, value.parse().unwrap());
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    CannedUpstream { addr, task }
}

/// A gzip answer whose bytes are corrupt. The client gets the bytes as sent. Corrupt before the
/// usage (the gzip magic): the usage cannot be read, so the estimate is charged. Corrupt after
/// it (the CRC trailer): the usage was read whole and is what is charged.
#[tokio::test]
async fn a_corrupt_gzip_answer_passes_through_and_is_charged_by_the_rule() {
    let usage = r#"{"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47}"#;
    let plain = format!(
        r#"{{"id": "chatcmpl-x", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18", "choices": [{{"index": 0, "message": {{"role": "assistant", "content": "hi"}}, "finish_reason": "stop"}}], "usage": {usage}}}"#
    );
    let good = gzip(plain.as_bytes());
    let mut bad_magic = good.clone();
    bad_magic[0] = !bad_magic[0];
    let mut bad_crc = good.clone();
    let crc_at = bad_crc.len() - 8;
    bad_crc[crc_at] = !bad_crc[crc_at];
    let body = chat_body(false, false);
    for (what, corrupt, expected) in [
        (
            "corrupt gzip header",
            bad_magic,
            (body.len() as u64, MAX_TOKENS),
        ),
        ("corrupt gzip CRC", bad_crc, (40, 7)),
    ] {
        let upstream = canned_upstream(
            vec![
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            Bytes::from(corrupt.clone()),
        )
        .await;
        let proxy = TestProxy::start(&config(
            &format!("http://{}", upstream.addr),
            &Knobs::default(),
        ))
        .await;
        let before = counters(&proxy).await;
        let answer = timeout(
            Duration::from_secs(3),
            post_chat(&proxy, &body, &[("accept-encoding", "gzip")]),
        )
        .await
        .expect("answered within 3 s");
        assert_eq!(answer.status, StatusCode::OK, "{what}");
        assert_eq!(answer.headers["content-encoding"], "gzip", "{what}");
        assert_eq!(
            &answer.body[..],
            &corrupt[..],
            "{what}: the upstream's bytes"
        );
        assert_charged(&proxy, &before, expected.0, expected.1, what).await;
    }
}

/// A stream cut after `cut` bytes (reset, stalled or truncated): the client gets the bytes the
/// upstream sent and sees the cut (an error, or for a truncation the end the upstream sent),
/// and README "a stream cut short (upstream reset, idle timeout) before its usage: input
/// estimate + one output token per SSE event seen" gives the charge.
async fn cut_stream_case(fault: &str, cut: usize, knobs: Knobs) -> Duration {
    let (mock, proxy) = setup(&knobs).await;
    let body = chat_body(true, true);
    let full = direct_answer(&mock, &body, &[]).await;
    assert!(cut < full.len());
    let before = counters(&proxy).await;
    mock.reseed(7);
    let cut_header = cut.to_string();
    let response = client()
        .request(request(
            Method::POST,
            &proxy.url("/v1/chat/completions"),
            &[
                ("authorization", &auth()),
                ("content-type", "application/json"),
                ("x-mock-created", "1760000000"),
                (fault, &cut_header),
            ],
            body.clone(),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut incoming = response.into_body();
    let mut got = Vec::new();
    let mut last_frame = Instant::now();
    let outcome = timeout(Duration::from_secs(4), async {
        loop {
            match incoming.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        got.extend_from_slice(&data);
                        last_frame = Instant::now();
                    }
                }
                Some(Err(_)) => return Err(()),
                None => return Ok(()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{fault}: the client must see the cut within 4 s"));
    let quiet = last_frame.elapsed();
    if fault == "x-mock-truncate" {
        // The upstream ended its body cleanly, mid-event: so does the answer.
        assert!(
            outcome.is_ok(),
            "{fault}: the upstream's clean end passes through"
        );
    } else {
        assert!(
            outcome.is_err(),
            "{fault}: the body must end with an error, not cleanly"
        );
    }
    assert!(
        got.len() <= cut,
        "{fault}: more bytes than the upstream sent"
    );
    if fault == "x-mock-truncate" {
        assert_eq!(got.len(), cut, "{fault}: every byte the upstream sent");
    }
    assert_eq!(
        &got[..],
        &full[..got.len()],
        "{fault}: the upstream's bytes"
    );
    assert_charged(
        &proxy,
        &before,
        body.len() as u64,
        complete_events(&full[..cut]),
        fault,
    )
    .await;
    assert_serves(&proxy).await;
    quiet
}

#[tokio::test]
async fn a_stream_reset_mid_way_is_charged_per_event_seen() {
    cut_stream_case("x-mock-reset-after", 700, Knobs::default()).await;
}

/// The upstream ends its body cleanly in the middle of an event, before the usage: the stream
/// was cut short all the same.
#[tokio::test]
async fn a_stream_truncated_mid_way_is_charged_per_event_seen() {
    cut_stream_case("x-mock-truncate", 700, Knobs::default()).await;
}

#[tokio::test]
async fn a_stream_stalled_past_the_idle_timeout_is_cut_and_charged_per_event_seen() {
    let idle = Duration::from_millis(300);
    let quiet = cut_stream_case(
        "x-mock-stall-after",
        700,
        Knobs {
            idle_timeout_ms: 300,
            ..Knobs::default()
        },
    )
    .await;
    assert!(
        quiet >= idle.mul_f32(0.8) && quiet <= idle + MARGIN,
        "the cut comes {quiet:?} after the last bytes; the idle timeout is {idle:?}"
    );
}

/// An upstream that never sends its response headers: 504 after `request_timeout_ms`, and
/// README "upstream timeout before headers: the estimate".
#[tokio::test]
async fn an_upstream_that_never_answers_is_a_504_charged_the_estimate() {
    let request_timeout = Duration::from_millis(300);
    let (mock, proxy) = setup(&Knobs {
        request_timeout_ms: 300,
        ..Knobs::default()
    })
    .await;
    let before = counters(&proxy).await;
    let body = chat_body(false, false);
    let started = Instant::now();
    let (answer, ()) = tokio::join!(
        post_chat(&proxy, &body, &[("x-mock-delay-ms", "5000")]),
        async {
            // Others are served while it waits (the normal request answers at once).
            tokio::time::sleep(Duration::from_millis(50)).await;
            let answer = post_chat(&proxy, &chat_body(false, false), &[]).await;
            assert_eq!(answer.status, StatusCode::OK);
        }
    );
    let elapsed = started.elapsed();
    let error = answer.error(504);
    assert_eq!(error["code"], "upstream_timeout");
    assert_eq!(error["type"], "server_error");
    assert!(
        elapsed >= request_timeout.mul_f32(0.8) && elapsed <= request_timeout + MARGIN,
        "504 after {elapsed:?}; the request timeout is {request_timeout:?}"
    );
    assert_eq!(mock.requests().len(), 2);
    let after = settled(&proxy).await;
    let normal = mock.reported();
    // The normal request charged what it reported; the timed-out one the estimate.
    assert_eq!(
        after.spent("input_tokens") - before.spent("input_tokens"),
        body.len() as u64 + normal.input_tokens
    );
    assert_eq!(
        after.spent("output_tokens") - before.spent("output_tokens"),
        MAX_TOKENS + normal.output_tokens
    );
    assert!(proxy
        .metrics()
        .await
        .contains(r#"tollgate_upstream_errors_total{project="alpha",kind="timeout"} 1"#));
    assert_serves(&proxy).await;
}

/// Nothing listens at the upstream's address: 502 at once, nothing charged, nothing left
/// reserved. Once something listens there again, the same proxy serves again.
#[tokio::test]
async fn an_unreachable_upstream_is_a_502_and_charges_nothing() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let proxy = TestProxy::start(&config(&format!("http://{closed}"), &Knobs::default())).await;
    let before = counters(&proxy).await;
    let answer = timeout(
        Duration::from_secs(3),
        post_chat(&proxy, &chat_body(false, false), &[]),
    )
    .await
    .expect("answered within 3 s");
    let error = answer.error(502);
    assert_eq!(error["code"], "upstream_unreachable");
    assert_eq!(error["type"], "server_error");
    // README "upstream unreachable: nothing"; the request is counted.
    assert_charged(&proxy, &before, 0, 0, "unreachable upstream").await;
    assert!(proxy
        .metrics()
        .await
        .contains(r#"tollgate_upstream_errors_total{project="alpha",kind="unreachable"} 1"#));

    // The upstream comes back on the same port (nothing connected to it, so it is free).
    let listener = TcpListener::bind(closed).await.unwrap();
    let _upstream = canned_upstream_on(
        listener,
        vec![("content-type", "application/json")],
        Bytes::from_static(
            br#"{"id": "chatcmpl-x", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}"#,
        ),
    );
    assert_serves(&proxy).await;
}

// ---------------------------------------------------------------------------------------------
// No panic reaches a client

/// `server::serve` with a handler that panics for `/boom`, on a fresh listener; returns its
/// address and the sender that stops it.
async fn panicking_server<H, F>(
    handler: H,
) -> (
    SocketAddr,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let server = load(&config("http://127.0.0.1:9", &Knobs::default())).server;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        tollgate::server::serve(
            listener,
            None,
            &server,
            handler,
            std::sync::Arc::new(tokio::sync::Semaphore::new(server.max_connections)),
            stopped,
        )
        .await;
    });
    (addr, stop, task)
}

async fn internal_error_body() -> Value {
    let body = ProxyError::Internal
        .into_response()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    serde_json::from_slice(&body).unwrap()
}

/// Asserts that `/boom` gets the 500 of `ProxyError::Internal` and that the server goes on
/// serving: on a new connection, and on the same keep-alive client.
async fn assert_panics_become_500s(addr: SocketAddr) {
    let expected = internal_error_body().await;
    assert_openai_error(&expected);
    let http = client();
    for round in 0..3 {
        let boom = timeout(
            Duration::from_secs(2),
            http.request(request(
                Method::GET,
                &format!("http://{addr}/boom"),
                &[],
                Bytes::new(),
            )),
        )
        .await
        .expect("answered within 2 s")
        .unwrap_or_else(|e| panic!("round {round}: /boom must get a 500, not {e}"));
        assert_eq!(boom.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(boom.headers()["content-type"], "application/json");
        let body: Value =
            serde_json::from_slice(&boom.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body, expected);
        let fine = send(
            Method::GET,
            &format!("http://{addr}/fine"),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(fine.status, StatusCode::OK);
        assert_eq!(fine.text(), "ok");
    }
}

/// The panic happens inside the handler's future (as in any `async fn` handler).
#[tokio::test]
async fn a_panic_in_the_handler_future_is_a_500_and_serving_goes_on() {
    let handler = |request: Request<Incoming>| async move {
        if request.uri().path() == "/boom" {
            panic!("boom");
        }
        Response::new(ProxyBody::full("ok"))
    };
    let (addr, stop, task) = panicking_server(handler).await;
    assert_panics_become_500s(addr).await;
    let _ = stop.send(true);
    timeout(Duration::from_secs(5), task)
        .await
        .expect("the server drains")
        .expect("the server task did not panic");
}

/// The panic happens in the handler call itself, before it returns a future.
#[tokio::test]
async fn a_panic_in_the_handler_call_is_a_500_and_serving_goes_on() {
    let handler = |request: Request<Incoming>| {
        if request.uri().path() == "/boom" {
            panic!("boom");
        }
        async move { Response::new(ProxyBody::full("ok")) }
    };
    let (addr, stop, task) = panicking_server(handler).await;
    assert_panics_become_500s(addr).await;
    let _ = stop.send(true);
    timeout(Duration::from_secs(5), task)
        .await
        .expect("the server drains")
        .expect("the server task did not panic");
}
