//! An in-process stand-in for the OpenAI API that tollgate's integration tests point it at.
//!
//! It answers the routes tollgate forwards with the shapes OpenAI really sends (see
//! `shared/openai-shapes/`), records every request it receives, and keeps the sum of the usage
//! it put into responses it finished sending. Request headers (`x-mock-*`, passed through by the
//! proxy) choose a fault: an error status, compression, splitting, a delay, a stall, a reset,
//! garbage, truncation, a malformed usage or an endless stream.
//!
//! Invariant: `reported()` counts a response's usage exactly when the body frame holding the last
//! byte of the usage-bearing event (or JSON body) has been handed to hyper. A body cut short by a
//! reset or a truncation before that byte, or dropped by a client before it, is never counted.
//! The count happens inside `poll_frame`, before the bytes reach the socket, so a client that has
//! read the usage can call `reported()` at once without waiting.

use std::borrow::Cow;
use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Sleep;

/// Tokens put in each response's usage unless a test says otherwise.
const DEFAULT_INPUT_TOKENS: u64 = 12;
const DEFAULT_OUTPUT_TOKENS: u64 = 9;
/// Content chunks in a stream unless `x-mock-chunks` says otherwise.
const DEFAULT_CHUNKS: usize = 5;
/// Time between two chunks of an `x-mock-endless` stream.
const ENDLESS_INTERVAL: Duration = Duration::from_millis(10);
/// How long a reset waits after its last frame, so the bytes before it reach the client.
const RESET_GRACE: Duration = Duration::from_millis(10);
const FINGERPRINT: &str = "fp_0a1b2c3d4e";
const SSE_CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";
const JSON_CONTENT_TYPE: &str = "application/json";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";
/// A valid 1x1 PNG, what image generations return as `b64_json`.
const TINY_PNG_B64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
/// Words the mock answers with, cycled when a stream asks for more chunks than there are words.
const WORDS: [&str; 9] = [
    "Sure,", " here", " is", " a", " short", " mock", " answer", " for", " you.",
];

/// The models `GET /v1/models` lists: id, created, owned_by.
const MODELS: [(&str, u64, &str); 15] = [
    ("gpt-4o-mini", 1_721_172_741, "system"),
    ("gpt-4o", 1_715_367_049, "system"),
    ("gpt-4.1", 1_744_316_542, "system"),
    ("gpt-4.1-mini", 1_744_318_173, "system"),
    ("o3", 1_744_225_308, "system"),
    ("o4-mini", 1_744_225_351, "system"),
    ("gpt-3.5-turbo-instruct", 1_692_901_427, "system"),
    ("text-embedding-3-small", 1_705_948_997, "system"),
    ("text-embedding-3-large", 1_705_953_180, "system"),
    ("omni-moderation-latest", 1_731_689_265, "system"),
    ("gpt-4o-transcribe", 1_742_068_463, "system"),
    ("gpt-4o-mini-transcribe", 1_742_068_596, "system"),
    ("whisper-1", 1_677_532_384, "openai-internal"),
    ("gpt-image-1", 1_745_517_030, "system"),
    ("dall-e-3", 1_698_785_189, "system"),
];

/// A mock OpenAI API listening on `127.0.0.1`, serving HTTP/1.1 and h2c. Dropping it stops the
/// server and every connection it holds.
pub struct MockUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query, exactly as sent (a prefix before `/v1` included).
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

/// The usage the mock put in responses it finished sending, added up. `input_tokens` includes
/// `cached_input_tokens` and `output_tokens` includes `reasoning_tokens`, as OpenAI reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    pub requests_with_usage: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
}

impl Reported {
    fn add(&mut self, other: &Reported) {
        self.requests_with_usage += other.requests_with_usage;
        self.input_tokens += other.input_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
        self.output_tokens += other.output_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
    }

    fn is_empty(&self) -> bool {
        self.requests_with_usage == 0
    }
}

impl MockUpstream {
    /// Binds `127.0.0.1:0` and serves until dropped.
    pub async fn start() -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the mock upstream");
        let addr = listener.local_addr().expect("mock upstream address");
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            reported: Mutex::new(Reported::default()),
            default_usage: Mutex::new((DEFAULT_INPUT_TOKENS, DEFAULT_OUTPUT_TOKENS)),
            open_bodies: AtomicUsize::new(0),
            next_id: AtomicU64::new(u64::from(addr.port()) << 32),
        });
        let server = tokio::spawn(serve(listener, Arc::clone(&shared)));
        MockUpstream {
            addr,
            shared,
            server,
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash or `/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in the order they arrived (recorded once the request body
    /// was read, before any delay or answer).
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// The usage in responses whose usage-bearing bytes were sent, added up.
    pub fn reported(&self) -> Reported {
        lock(&self.shared.reported).clone()
    }

    /// Tokens put in each response's usage from now on (cached and reasoning stay 0), unless a
    /// request's `x-mock-usage` header says otherwise.
    /// Restarts the id sequence at `seed`, so that two mocks given the same seed and the same
    /// requests answer with the same bytes.
    pub fn reseed(&self, seed: u64) {
        self.shared.next_id.store(seed, Ordering::Relaxed);
    }

    pub fn set_default_usage(&self, input: u64, output: u64) {
        *lock(&self.shared.default_usage) = (input, output);
    }

    /// Response bodies still alive: neither finished nor dropped. It drops to zero once the
    /// client (or the proxy in front) has gone away, so a disconnect test can poll it with a
    /// deadline to prove the upstream stream was cancelled.
    pub fn open_bodies(&self) -> usize {
        // Relaxed: a gauge read by a test polling with a deadline; no data is published with it.
        self.shared.open_bodies.load(Ordering::Relaxed)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        // The accept task owns the listener and the JoinSet of connections: aborting it drops
        // both, which aborts every connection task and drops their response bodies.
        self.server.abort();
    }
}

struct Shared {
    requests: Mutex<Vec<Recorded>>,
    reported: Mutex<Reported>,
    default_usage: Mutex<(u64, u64)>,
    open_bodies: AtomicUsize,
    next_id: AtomicU64,
}

impl Shared {
    /// `len` lowercase hex digits, different for every call (and every mock, by its port).
    fn hex(&self, len: usize) -> String {
        let mut out = String::with_capacity(len + 16);
        while out.len() < len {
            // Relaxed: only uniqueness matters, and fetch_add gives that under any ordering.
            let n = self.next_id.fetch_add(1, Ordering::Relaxed);
            let _ = write!(out, "{:016x}", splitmix64(n));
        }
        out.truncate(len);
        out
    }

    fn add_reported(&self, delta: &Reported) {
        lock(&self.reported).add(delta);
    }
}

fn splitmix64(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Never held across an `.await`; a poisoned lock only means another test thread panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fault controls

#[derive(Clone, Copy, Debug)]
struct Tokens {
    input: u64,
    output: u64,
    cached: u64,
    reasoning: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Gzip,
    Deflate,
    Br,
    Zstd,
}

impl Encoding {
    fn token(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
            Encoding::Br => "br",
            Encoding::Zstd => "zstd",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResponsesEnd {
    Completed,
    Incomplete,
    Failed,
}

/// What the `x-mock-*` headers of one request asked for.
#[derive(Debug)]
struct Controls {
    status: Option<StatusCode>,
    encoding: Option<Encoding>,
    split: Option<usize>,
    delay: Option<Duration>,
    stall_after: Option<usize>,
    /// `None` with `stall_after` set: stall forever.
    stall_for: Option<Duration>,
    reset_after: Option<usize>,
    garbage: bool,
    truncate: Option<usize>,
    bad_usage: bool,
    endless: bool,
    chunks: usize,
    responses_end: ResponsesEnd,
    usage: Tokens,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn number<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
    header(headers, name).and_then(|v| v.parse().ok())
}

fn flag(headers: &HeaderMap, name: &str) -> bool {
    matches!(header(headers, name), Some("1" | "true" | "yes"))
}

impl Controls {
    fn from_headers(headers: &HeaderMap, default_usage: (u64, u64)) -> Controls {
        let default = Tokens {
            input: default_usage.0,
            output: default_usage.1,
            cached: 0,
            reasoning: 0,
        };
        let usage = header(headers, "x-mock-usage")
            .and_then(|v| {
                let parts: Vec<u64> = v
                    .split(',')
                    .map(|p| p.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .ok()?;
                match parts.as_slice() {
                    [input, output, rest @ ..] if rest.len() <= 2 => Some(Tokens {
                        input: *input,
                        output: *output,
                        cached: rest.first().copied().unwrap_or(0),
                        reasoning: rest.get(1).copied().unwrap_or(0),
                    }),
                    _ => None,
                }
            })
            .unwrap_or(default);
        Controls {
            status: number::<u16>(headers, "x-mock-status")
                .and_then(|s| StatusCode::from_u16(s).ok())
                .filter(|s| s.is_client_error() || s.is_server_error()),
            encoding: match header(headers, "x-mock-encoding") {
                Some("gzip") => Some(Encoding::Gzip),
                Some("deflate") => Some(Encoding::Deflate),
                Some("br") => Some(Encoding::Br),
                Some("zstd") => Some(Encoding::Zstd),
                _ => None,
            },
            split: number::<usize>(headers, "x-mock-split").filter(|n| *n > 0),
            delay: number(headers, "x-mock-delay-ms").map(Duration::from_millis),
            stall_after: number(headers, "x-mock-stall-after"),
            stall_for: number(headers, "x-mock-stall-ms").map(Duration::from_millis),
            reset_after: number(headers, "x-mock-reset-after"),
            garbage: flag(headers, "x-mock-garbage"),
            truncate: number(headers, "x-mock-truncate"),
            bad_usage: flag(headers, "x-mock-bad-usage"),
            endless: flag(headers, "x-mock-endless"),
            chunks: number(headers, "x-mock-chunks").unwrap_or(DEFAULT_CHUNKS),
            responses_end: match header(headers, "x-mock-responses-end") {
                Some("incomplete") => ResponsesEnd::Incomplete,
                Some("failed") => ResponsesEnd::Failed,
                _ => ResponsesEnd::Completed,
            },
            usage,
        }
    }

    /// Whether the body may be announced with a `content-length`: only when it is sent whole.
    fn sends_whole_body(&self) -> bool {
        self.split.is_none()
            && self.stall_after.is_none()
            && self.reset_after.is_none()
            && self.truncate.is_none()
    }
}

// ---------------------------------------------------------------------------------------------
// Ordered JSON
//
// serde_json's `Value` sorts object keys unless its `preserve_order` feature is on, and turning it
// on here would change the proxy's own build through feature unification. OpenAI's bodies have a
// fixed key order (`id` first, `usage` after `choices`, `type` first in Responses events), and
// non-stream bodies are pretty-printed, so the mock writes JSON through this small builder.

enum J {
    Leaf(Value),
    Obj(Vec<(Cow<'static, str>, J)>),
    Arr(Vec<J>),
}

macro_rules! obj {
    ($($k:literal : $v:expr),* $(,)?) => {
        J::Obj(vec![$((Cow::Borrowed($k), J::from($v))),*])
    };
}

macro_rules! arr {
    ($($v:expr),* $(,)?) => {
        J::Arr(vec![$(J::from($v)),*])
    };
}

impl From<Value> for J {
    fn from(v: Value) -> J {
        match v {
            Value::Object(map) => J::Obj(
                map.into_iter()
                    .map(|(k, v)| (Cow::Owned(k), J::from(v)))
                    .collect(),
            ),
            Value::Array(items) => J::Arr(items.into_iter().map(J::from).collect()),
            leaf => J::Leaf(leaf),
        }
    }
}

impl From<&str> for J {
    fn from(v: &str) -> J {
        J::Leaf(Value::from(v))
    }
}

impl From<String> for J {
    fn from(v: String) -> J {
        J::Leaf(Value::from(v))
    }
}

impl From<&String> for J {
    fn from(v: &String) -> J {
        J::Leaf(Value::from(v.as_str()))
    }
}

impl From<u64> for J {
    fn from(v: u64) -> J {
        J::Leaf(Value::from(v))
    }
}

impl From<usize> for J {
    fn from(v: usize) -> J {
        J::Leaf(Value::from(v))
    }
}

impl From<f64> for J {
    fn from(v: f64) -> J {
        J::Leaf(Value::from(v))
    }
}

impl From<bool> for J {
    fn from(v: bool) -> J {
        J::Leaf(Value::from(v))
    }
}

impl From<Vec<J>> for J {
    fn from(v: Vec<J>) -> J {
        J::Arr(v)
    }
}

/// `null`.
fn null() -> J {
    J::Leaf(Value::Null)
}

impl J {
    fn push(&mut self, key: &'static str, value: impl Into<J>) {
        if let J::Obj(fields) = self {
            fields.push((Cow::Borrowed(key), value.into()));
        }
    }

    /// One line, as in SSE `data:` lines.
    fn compact(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, None, 0);
        out
    }

    /// Pretty-printed with `indent` spaces, as OpenAI sends non-stream bodies.
    fn pretty(&self, indent: usize) -> String {
        let mut out = String::new();
        self.write(&mut out, Some(indent), 0);
        out
    }

    fn write(&self, out: &mut String, indent: Option<usize>, depth: usize) {
        let newline = |out: &mut String, depth: usize| {
            if let Some(width) = indent {
                out.push('\n');
                out.push_str(&" ".repeat(width * depth));
            }
        };
        match self {
            J::Leaf(v) => out.push_str(&v.to_string()),
            J::Obj(fields) if fields.is_empty() => out.push_str("{}"),
            J::Arr(items) if items.is_empty() => out.push_str("[]"),
            J::Obj(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, depth + 1);
                    out.push_str(&Value::from(key.as_ref()).to_string());
                    out.push_str(if indent.is_some() { ": " } else { ":" });
                    value.write(out, indent, depth + 1);
                }
                newline(out, depth);
                out.push('}');
            }
            J::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, depth + 1);
                    item.write(out, indent, depth + 1);
                }
                newline(out, depth);
                out.push(']');
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replies

/// One piece of a body as the mock produces it: the whole JSON, or one SSE event. `usage` is what
/// `reported()` gains once the piece's last byte has been sent.
struct Piece {
    bytes: Bytes,
    usage: Reported,
}

impl Piece {
    fn plain(bytes: impl Into<Bytes>) -> Piece {
        Piece {
            bytes: bytes.into(),
            usage: Reported::default(),
        }
    }

    fn data(event: &J) -> Piece {
        Piece::plain(format!("data: {}\n\n", event.compact()))
    }

    fn named(name: &str, event: &J) -> Piece {
        Piece::plain(format!("event: {name}\ndata: {}\n\n", event.compact()))
    }

    fn done() -> Piece {
        Piece::plain("data: [DONE]\n\n")
    }

    fn counting(mut self, usage: Reported) -> Piece {
        self.usage = usage;
        self
    }
}

/// What to answer, before encoding and the wire faults are applied.
struct Reply {
    status: StatusCode,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    pieces: Vec<Piece>,
    /// Streams are sent without a `content-length`, one frame per event.
    stream: bool,
    endless: Option<Endless>,
}

impl Reply {
    fn json(status: StatusCode, body: &J, usage: Reported) -> Reply {
        Reply {
            status,
            content_type: JSON_CONTENT_TYPE,
            headers: Vec::new(),
            pieces: vec![Piece::plain(body.pretty(2)).counting(usage)],
            stream: false,
            endless: None,
        }
    }

    fn sse(pieces: Vec<Piece>) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: SSE_CONTENT_TYPE,
            headers: vec![("cache-control", "no-cache, must-revalidate".to_owned())],
            pieces,
            stream: true,
            endless: None,
        }
    }

    fn text(body: String) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: TEXT_CONTENT_TYPE,
            headers: Vec::new(),
            pieces: vec![Piece::plain(body)],
            stream: false,
            endless: None,
        }
    }

    /// OpenAI's error envelope. Its error bodies are indented by four spaces and end with a
    /// newline, unlike its success bodies.
    fn error(status: StatusCode, message: &str, kind: &str, param: J, code: J) -> Reply {
        let body = obj! {
            "error": obj! {
                "message": message,
                "type": kind,
                "param": param,
                "code": code,
            },
        };
        Reply {
            status,
            content_type: JSON_CONTENT_TYPE,
            headers: Vec::new(),
            pieces: vec![Piece::plain(format!("{}\n", body.pretty(4)))],
            stream: false,
            endless: None,
        }
    }

    fn invalid_json() -> Reply {
        Reply::error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)",
            "invalid_request_error",
            null(),
            null(),
        )
    }

    fn missing_parameter(param: &'static str) -> Reply {
        Reply::error(
            StatusCode::BAD_REQUEST,
            &format!("Missing required parameter: '{param}'."),
            "invalid_request_error",
            J::from(param),
            J::from("missing_required_parameter"),
        )
    }

    fn missing_model() -> Reply {
        Reply::error(
            StatusCode::BAD_REQUEST,
            "you must provide a model parameter",
            "invalid_request_error",
            null(),
            null(),
        )
    }

    fn model_not_found(model: &str) -> Reply {
        Reply::error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            null(),
            J::from("model_not_found"),
        )
    }

    fn invalid_url(method: &Method, path: &str) -> Reply {
        Reply::error(
            StatusCode::NOT_FOUND,
            &format!("Invalid URL ({method} {path})"),
            "invalid_request_error",
            null(),
            null(),
        )
    }
}

/// Per-request context for the route handlers.
struct Ctx<'a> {
    shared: &'a Shared,
    controls: &'a Controls,
    created: u64,
}

impl Ctx<'_> {
    fn tokens(&self) -> Tokens {
        self.controls.usage
    }

    /// A token count, or the string `"twelve"` under `x-mock-bad-usage`.
    fn count(&self, n: u64) -> J {
        if self.controls.bad_usage {
            J::from("twelve")
        } else {
            J::from(n)
        }
    }

    /// What `reported()` gains from a usage object carrying these numbers: nothing when the
    /// usage is malformed on purpose, since no reader can take a number from it.
    fn reported(&self, input: u64, cached: u64, output: u64, reasoning: u64) -> Reported {
        if self.controls.bad_usage {
            return Reported::default();
        }
        Reported {
            requests_with_usage: 1,
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            reasoning_tokens: reasoning,
        }
    }

    fn words(&self) -> impl Iterator<Item = &'static str> {
        WORDS.iter().copied().cycle().take(self.controls.chunks)
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The model name OpenAI answers with: the dated snapshot the alias points at, where known.
fn answered_model(requested: &str) -> String {
    match requested {
        "gpt-4o-mini" => "gpt-4o-mini-2024-07-18".to_owned(),
        other => other.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Request handling

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    lock(&shared.requests).push(Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: parts.headers.clone(),
        body: body.clone(),
        version: parts.version,
    });
    let controls = Controls::from_headers(&parts.headers, *lock(&shared.default_usage));
    if let Some(delay) = controls.delay {
        tokio::time::sleep(delay).await;
    }
    let ctx = Ctx {
        shared: &shared,
        controls: &controls,
        // `x-mock-created` pins the timestamps, so two mocks can answer byte for byte alike.
        created: parts
            .headers
            .get("x-mock-created")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(now_unix),
    };
    let reply = answer(&ctx, &parts.method, parts.uri.path(), &parts.headers, &body).await;
    Ok(respond(&shared, reply, &parts.headers, &controls, started))
}

/// Auth first, then the forced status, garbage and endless faults, then the route.
async fn answer(
    ctx: &Ctx<'_>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Reply {
    if let Some(reply) = check_auth(headers) {
        return reply;
    }
    if let Some(status) = ctx.controls.status {
        return forced_error(status, headers, body);
    }
    if ctx.controls.garbage {
        return garbage();
    }
    if ctx.controls.endless {
        let model = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("model").and_then(Value::as_str).map(answered_model))
            .unwrap_or_else(|| answered_model("gpt-4o-mini"));
        let mut reply = Reply::sse(Vec::new());
        reply.endless = Some(Endless {
            id: format!("chatcmpl-{}", ctx.shared.hex(29)),
            model,
            created: ctx.created,
            seq: 0,
            compressor: ctx.controls.encoding.map(Compressor::new),
            split: ctx.controls.split,
            due: true,
        });
        return reply;
    }

    // Match on the part from `/v1/` on, so a proxy may put a prefix before it.
    let Some(at) = path.find("/v1/") else {
        return Reply::invalid_url(method, path);
    };
    let v1_path = &path[at..];
    let route = &v1_path["/v1".len()..];
    match (method, route) {
        (&Method::POST, "/chat/completions") => with_json(body, true, |req| chat(ctx, req)),
        (&Method::POST, "/completions") => with_json(body, true, |req| completions(ctx, req)),
        (&Method::POST, "/responses") => with_json(body, true, |req| responses(ctx, req)),
        (&Method::POST, "/embeddings") => with_json(body, true, |req| embeddings(ctx, req)),
        (&Method::POST, "/moderations") => with_json(body, false, |req| moderations(ctx, req)),
        (&Method::POST, "/images/generations") => with_json(body, false, |req| images(ctx, req)),
        (&Method::POST, "/audio/transcriptions") => audio(ctx, headers, body, true).await,
        (&Method::POST, "/audio/translations") => audio(ctx, headers, body, false).await,
        (&Method::POST, "/files") => files(ctx, headers, body).await,
        (&Method::GET, "/models") => models_list(),
        (&Method::GET, r) if r.starts_with("/models/") => model_retrieve(&r["/models/".len()..]),
        _ => Reply::invalid_url(method, v1_path),
    }
}

/// 401 unless the request carries `authorization: Bearer sk-...`, as OpenAI words it.
fn check_auth(headers: &HeaderMap) -> Option<Reply> {
    let key = header(headers, "authorization").and_then(|v| {
        let (scheme, key) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
    });
    match key {
        None | Some("") => Some(Reply::error(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're accessing the API from your browser and are prompted for a username and password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            null(),
            null(),
        )),
        Some(key) if !key.starts_with("sk-") => Some(invalid_api_key(key)),
        Some(_) => None,
    }
}

/// OpenAI masks the key as its first 8 characters, stars, and its last 4.
fn invalid_api_key(key: &str) -> Reply {
    let chars: Vec<char> = key.chars().collect();
    let masked = if chars.len() > 12 {
        let head: String = chars[..8].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{head}{}{tail}", "*".repeat(chars.len() - 12))
    } else {
        "*".repeat(chars.len())
    };
    Reply::error(
        StatusCode::UNAUTHORIZED,
        &format!("Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys."),
        "invalid_request_error",
        null(),
        J::from("invalid_api_key"),
    )
}

/// The error OpenAI sends with `status` (`x-mock-status`).
fn forced_error(status: StatusCode, headers: &HeaderMap, body: &Bytes) -> Reply {
    let model = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "gpt-4o-mini".to_owned());
    match status.as_u16() {
        400 => Reply::invalid_json(),
        401 => invalid_api_key(
            header(headers, "authorization")
                .and_then(|v| v.split_once(' '))
                .map_or("", |(_, key)| key.trim()),
        ),
        403 => Reply::error(
            status,
            "Country, region, or territory not supported",
            "request_forbidden",
            null(),
            J::from("unsupported_country_region_territory"),
        ),
        404 => Reply::model_not_found(&model),
        429 => {
            let mut reply = Reply::error(
                status,
                &format!("Rate limit reached for {model} in organization org-mock on tokens per min (TPM): Limit 200000, Used 199500, Requested 1200. Please try again in 210ms. Visit https://platform.openai.com/account/rate-limits to learn more."),
                "tokens",
                null(),
                J::from("rate_limit_exceeded"),
            );
            reply.headers = vec![
                ("retry-after", "1".to_owned()),
                ("retry-after-ms", "210".to_owned()),
                ("x-ratelimit-remaining-tokens", "0".to_owned()),
                ("x-ratelimit-reset-tokens", "210ms".to_owned()),
            ];
            reply
        }
        500 => Reply::error(
            status,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            null(),
            null(),
        ),
        502 => Reply::error(
            status,
            "Bad gateway.",
            "cf_bad_gateway",
            null(),
            J::from(502u64),
        ),
        503 => Reply::error(
            status,
            "The server is overloaded or not ready yet.",
            "server_error",
            null(),
            null(),
        ),
        code => Reply::error(
            status,
            &format!("Mock upstream error (status {code})."),
            if status.is_server_error() {
                "server_error"
            } else {
                "invalid_request_error"
            },
            null(),
            null(),
        ),
    }
}

/// 200 with an SSE content type and bytes that are not SSE: no `data:` field, no blank line.
fn garbage() -> Reply {
    let mut reply = Reply::sse(Vec::new());
    reply.pieces.push(Piece::plain(Bytes::from_static(
        b"\x00\x9f\x92\x96<html><body>upstream exploded</body></html>\r\n{\"choices\": [tru\xff\xfe not server-sent events at all\r\n",
    )));
    reply
}

/// Parses a JSON object body and checks `model` (required unless `model_required` is false).
fn with_json(body: &Bytes, model_required: bool, route: impl FnOnce(&Value) -> Reply) -> Reply {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return Reply::invalid_json();
    };
    if !req.is_object() {
        return Reply::invalid_json();
    }
    if model_required && req.get("model").and_then(Value::as_str).is_none() {
        return Reply::missing_model();
    }
    route(&req)
}

fn model_of(req: &Value, default: &str) -> String {
    answered_model(req.get("model").and_then(Value::as_str).unwrap_or(default))
}

fn is_stream(req: &Value) -> bool {
    req.get("stream").and_then(Value::as_bool) == Some(true)
}

fn include_usage(req: &Value) -> bool {
    req.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true)
}

fn stream_options_without_stream(req: &Value) -> Option<Reply> {
    (req.get("stream_options").is_some_and(|v| !v.is_null()) && !is_stream(req)).then(|| {
        Reply::error(
            StatusCode::BAD_REQUEST,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "invalid_request_error",
            J::from("stream_options"),
            null(),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Routes

fn chat_usage(ctx: &Ctx<'_>) -> (J, Reported) {
    let t = ctx.tokens();
    let usage = obj! {
        "prompt_tokens": ctx.count(t.input),
        "completion_tokens": t.output,
        "total_tokens": t.input + t.output,
        "prompt_tokens_details": obj! { "cached_tokens": t.cached, "audio_tokens": 0u64 },
        "completion_tokens_details": obj! {
            "reasoning_tokens": t.reasoning,
            "audio_tokens": 0u64,
            "accepted_prediction_tokens": 0u64,
            "rejected_prediction_tokens": 0u64,
        },
    };
    (
        usage,
        ctx.reported(t.input, t.cached, t.output, t.reasoning),
    )
}

/// `POST /v1/chat/completions`.
fn chat(ctx: &Ctx<'_>, req: &Value) -> Reply {
    if req.get("messages").is_none() {
        return Reply::missing_parameter("messages");
    }
    if let Some(reply) = stream_options_without_stream(req) {
        return reply;
    }
    let id = format!("chatcmpl-{}", ctx.shared.hex(29));
    let model = model_of(req, "gpt-4o-mini");
    let (usage, reported) = chat_usage(ctx);
    if !is_stream(req) {
        let content: String = WORDS.concat();
        let body = obj! {
            "id": &id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": &model,
            "choices": arr![obj! {
                "index": 0u64,
                "message": obj! {
                    "role": "assistant",
                    "content": content,
                    "refusal": null(),
                    "annotations": arr![],
                },
                "logprobs": null(),
                "finish_reason": "stop",
            }],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        };
        return Reply::json(StatusCode::OK, &body, reported);
    }

    let with_usage = include_usage(req);
    let chunk = |choices: J, usage: Option<J>, obfuscation: String| {
        let mut chunk = obj! {
            "id": &id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": &model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        };
        if with_usage {
            chunk.push("usage", usage.unwrap_or_else(null));
        }
        chunk.push("obfuscation", obfuscation);
        chunk
    };
    let choice = |delta: J, finish: J| {
        arr![obj! {
            "index": 0u64,
            "delta": delta,
            "logprobs": null(),
            "finish_reason": finish,
        }]
    };
    let mut pieces = vec![Piece::data(&chunk(
        choice(
            obj! { "role": "assistant", "content": "", "refusal": null() },
            null(),
        ),
        None,
        ctx.shared.hex(6),
    ))];
    for word in ctx.words() {
        pieces.push(Piece::data(&chunk(
            choice(obj! { "content": word }, null()),
            None,
            ctx.shared.hex(3),
        )));
    }
    pieces.push(Piece::data(&chunk(
        choice(obj! {}, J::from("stop")),
        None,
        String::new(),
    )));
    if with_usage {
        pieces.push(Piece::data(&chunk(arr![], Some(usage), ctx.shared.hex(2))).counting(reported));
    }
    pieces.push(Piece::done());
    Reply::sse(pieces)
}

/// `POST /v1/completions`, the legacy text completions. Its usage has no details objects.
fn completions(ctx: &Ctx<'_>, req: &Value) -> Reply {
    if let Some(reply) = stream_options_without_stream(req) {
        return reply;
    }
    let id = format!("cmpl-{}", ctx.shared.hex(24));
    let model = model_of(req, "gpt-3.5-turbo-instruct");
    let t = ctx.tokens();
    let usage = obj! {
        "prompt_tokens": ctx.count(t.input),
        "completion_tokens": t.output,
        "total_tokens": t.input + t.output,
    };
    let reported = ctx.reported(t.input, 0, t.output, 0);
    let chunk = |choices: J, usage: Option<J>, with_usage: bool| {
        let mut chunk = obj! {
            "id": &id,
            "object": "text_completion",
            "created": ctx.created,
            "model": &model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        };
        if with_usage {
            chunk.push("usage", usage.unwrap_or_else(null));
        }
        chunk
    };
    let choice = |text: &str, finish: J| {
        arr![obj! {
            "text": text,
            "index": 0u64,
            "logprobs": null(),
            "finish_reason": finish,
        }]
    };
    if !is_stream(req) {
        let text: String = WORDS.concat();
        let body = chunk(choice(&text, J::from("length")), Some(usage), true);
        return Reply::json(StatusCode::OK, &body, reported);
    }
    let with_usage = include_usage(req);
    let mut pieces: Vec<Piece> = ctx
        .words()
        .map(|word| Piece::data(&chunk(choice(word, null()), None, with_usage)))
        .collect();
    pieces.push(Piece::data(&chunk(
        choice("", J::from("length")),
        None,
        with_usage,
    )));
    if with_usage {
        pieces.push(Piece::data(&chunk(arr![], Some(usage), true)).counting(reported));
    }
    pieces.push(Piece::done());
    Reply::sse(pieces)
}

/// `POST /v1/responses`. Streams end with `response.completed` (or `.incomplete`/`.failed`
/// under `x-mock-responses-end`), the only event that carries usage, and have no `[DONE]`.
fn responses(ctx: &Ctx<'_>, req: &Value) -> Reply {
    let id = format!("resp_{}", ctx.shared.hex(48));
    let msg_id = format!("msg_{}", ctx.shared.hex(48));
    let model = model_of(req, "gpt-4o-mini");
    let t = ctx.tokens();
    let usage = || {
        obj! {
            "input_tokens": ctx.count(t.input),
            "input_tokens_details": obj! { "cached_tokens": t.cached, "cache_write_tokens": 0u64 },
            "output_tokens": t.output,
            "output_tokens_details": obj! { "reasoning_tokens": t.reasoning },
            "total_tokens": t.input + t.output,
        }
    };
    let reported = ctx.reported(t.input, t.cached, t.output, t.reasoning);
    let end = ctx.controls.responses_end;
    let words: Vec<&str> = ctx.words().collect();
    let text: String = words.concat();
    let item_status = if end == ResponsesEnd::Completed {
        "completed"
    } else {
        "incomplete"
    };
    let text_part = |text: &str| {
        obj! {
            "type": "output_text",
            "annotations": arr![],
            "logprobs": arr![],
            "text": text,
        }
    };
    let message = |status: &str, content: J| {
        obj! {
            "id": &msg_id,
            "type": "message",
            "status": status,
            "content": content,
            "role": "assistant",
        }
    };
    // The response object, in progress (no output, no usage) or finished.
    let response = |finished: bool| {
        let (status, completed_at, error, incomplete) = match (finished, end) {
            (false, _) => ("in_progress", null(), null(), null()),
            (true, ResponsesEnd::Completed) => {
                ("completed", J::from(ctx.created + 1), null(), null())
            }
            (true, ResponsesEnd::Incomplete) => (
                "incomplete",
                null(),
                null(),
                obj! { "reason": "max_output_tokens" },
            ),
            (true, ResponsesEnd::Failed) => (
                "failed",
                null(),
                obj! {
                    "code": "server_error",
                    "message": "The server had an error while processing your request. Sorry about that!",
                },
                null(),
            ),
        };
        let output = if finished {
            arr![message(item_status, arr![text_part(&text)])]
        } else {
            arr![]
        };
        obj! {
            "id": &id,
            "object": "response",
            "created_at": ctx.created,
            "status": status,
            "background": false,
            "completed_at": completed_at,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": req.get("instructions").cloned().unwrap_or(Value::Null),
            "max_output_tokens": req.get("max_output_tokens").cloned().unwrap_or(Value::Null),
            "max_tool_calls": null(),
            "model": &model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": req.get("previous_response_id").cloned().unwrap_or(Value::Null),
            "prompt_cache_key": null(),
            "reasoning": obj! { "effort": null(), "summary": null() },
            "safety_identifier": null(),
            "service_tier": "default",
            "store": true,
            "temperature": 1.0,
            "text": obj! { "format": obj! { "type": "text" }, "verbosity": "medium" },
            "tool_choice": "auto",
            "tools": arr![],
            "top_logprobs": 0u64,
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": if finished { usage() } else { null() },
            "user": null(),
            "metadata": obj! {},
        }
    };
    if !is_stream(req) {
        return Reply::json(StatusCode::OK, &response(true), reported);
    }

    let mut pieces = Vec::new();
    let mut seq = 0u64;
    let mut event = |pieces: &mut Vec<Piece>, name: &'static str, mut fields: J| {
        let mut ev = obj! { "type": name };
        if let (J::Obj(head), J::Obj(rest)) = (&mut ev, &mut fields) {
            head.append(rest);
        }
        ev.push("sequence_number", seq);
        seq += 1;
        pieces.push(Piece::named(name, &ev));
    };
    event(
        &mut pieces,
        "response.created",
        obj! { "response": response(false) },
    );
    event(
        &mut pieces,
        "response.in_progress",
        obj! { "response": response(false) },
    );
    event(
        &mut pieces,
        "response.output_item.added",
        obj! { "output_index": 0u64, "item": message("in_progress", arr![]) },
    );
    event(
        &mut pieces,
        "response.content_part.added",
        obj! {
            "item_id": &msg_id,
            "output_index": 0u64,
            "content_index": 0u64,
            "part": text_part(""),
        },
    );
    for word in &words {
        event(
            &mut pieces,
            "response.output_text.delta",
            obj! {
                "item_id": &msg_id,
                "output_index": 0u64,
                "content_index": 0u64,
                "delta": *word,
                "logprobs": arr![],
                "obfuscation": ctx.shared.hex(2),
            },
        );
    }
    event(
        &mut pieces,
        "response.output_text.done",
        obj! {
            "item_id": &msg_id,
            "output_index": 0u64,
            "content_index": 0u64,
            "text": &text,
            "logprobs": arr![],
        },
    );
    event(
        &mut pieces,
        "response.content_part.done",
        obj! {
            "item_id": &msg_id,
            "output_index": 0u64,
            "content_index": 0u64,
            "part": text_part(&text),
        },
    );
    event(
        &mut pieces,
        "response.output_item.done",
        obj! { "output_index": 0u64, "item": message(item_status, arr![text_part(&text)]) },
    );
    let last = match end {
        ResponsesEnd::Completed => "response.completed",
        ResponsesEnd::Incomplete => "response.incomplete",
        ResponsesEnd::Failed => "response.failed",
    };
    event(&mut pieces, last, obj! { "response": response(true) });
    if let Some(piece) = pieces.last_mut() {
        piece.usage = reported;
    }
    Reply::sse(pieces)
}

/// `POST /v1/embeddings`: one vector per input, floats or little-endian f32 in base64.
fn embeddings(ctx: &Ctx<'_>, req: &Value) -> Reply {
    let inputs = match req.get("input") {
        None | Some(Value::Null) => return Reply::missing_parameter("input"),
        Some(Value::Array(items)) if items.iter().all(|i| !i.is_number()) => items.len(),
        Some(_) => 1,
    };
    let dims = req
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(8, |d| d.clamp(1, 64) as usize);
    let base64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<J> = (0..inputs)
        .map(|index| {
            let values: Vec<f64> = (0..dims)
                .map(|i| {
                    let magnitude = ((index * 31 + i * 37) % 997 + 1) as f64 / 10_000.0;
                    if i % 2 == 0 {
                        magnitude
                    } else {
                        -magnitude
                    }
                })
                .collect();
            let embedding = if base64 {
                let raw: Vec<u8> = values
                    .iter()
                    .flat_map(|v| (*v as f32).to_le_bytes())
                    .collect();
                J::from(base64_encode(&raw))
            } else {
                J::Arr(values.into_iter().map(J::from).collect())
            };
            obj! { "object": "embedding", "index": index, "embedding": embedding }
        })
        .collect();
    let t = ctx.tokens();
    let body = obj! {
        "object": "list",
        "data": data,
        "model": model_of(req, "text-embedding-3-small"),
        "usage": obj! { "prompt_tokens": ctx.count(t.input), "total_tokens": t.input },
    };
    Reply::json(StatusCode::OK, &body, ctx.reported(t.input, 0, 0, 0))
}

fn base64_encode(raw: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(raw.len().div_ceil(3) * 4);
    for chunk in raw.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `POST /v1/moderations`: no usage.
fn moderations(ctx: &Ctx<'_>, req: &Value) -> Reply {
    let inputs = match req.get("input") {
        None | Some(Value::Null) => return Reply::missing_parameter("input"),
        Some(Value::Array(items)) => items.len(),
        Some(_) => 1,
    };
    const CATEGORIES: [&str; 13] = [
        "harassment",
        "harassment/threatening",
        "hate",
        "hate/threatening",
        "illicit",
        "illicit/violent",
        "self-harm",
        "self-harm/instructions",
        "self-harm/intent",
        "sexual",
        "sexual/minors",
        "violence",
        "violence/graphic",
    ];
    let map = |value: &dyn Fn() -> J| {
        J::Obj(
            CATEGORIES
                .iter()
                .map(|c| (Cow::Borrowed(*c), value()))
                .collect(),
        )
    };
    let results: Vec<J> = (0..inputs)
        .map(|_| {
            obj! {
                "flagged": false,
                "categories": map(&|| J::from(false)),
                "category_scores": map(&|| J::from(0.0001)),
                "category_applied_input_types": map(&|| arr!["text"]),
            }
        })
        .collect();
    let body = obj! {
        "id": format!("modr-{}", ctx.shared.hex(32)),
        "model": req.get("model").and_then(Value::as_str).unwrap_or("omni-moderation-latest"),
        "results": results,
    };
    Reply::json(StatusCode::OK, &body, Reported::default())
}

/// `POST /v1/images/generations`: gpt-image-* models report token usage, dall-e-* none.
fn images(ctx: &Ctx<'_>, req: &Value) -> Reply {
    let Some(prompt) = req.get("prompt").and_then(Value::as_str) else {
        return Reply::missing_parameter("prompt");
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt-image-1");
    let n = req
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 10);
    let size = req
        .get("size")
        .and_then(Value::as_str)
        .unwrap_or("1024x1024");
    if model.starts_with("dall-e") {
        let b64 = req.get("response_format").and_then(Value::as_str) == Some("b64_json");
        let data: Vec<J> = (0..n)
            .map(|i| {
                let mut image = if b64 {
                    obj! { "b64_json": TINY_PNG_B64 }
                } else {
                    obj! { "url": format!("https://images.mock.invalid/img-{i}.png") }
                };
                image.push("revised_prompt", prompt);
                image
            })
            .collect();
        let body = obj! { "created": ctx.created, "data": data };
        return Reply::json(StatusCode::OK, &body, Reported::default());
    }
    let t = ctx.tokens();
    let data: Vec<J> = (0..n).map(|_| obj! { "b64_json": TINY_PNG_B64 }).collect();
    let body = obj! {
        "created": ctx.created,
        "background": "opaque",
        "data": data,
        "output_format": "png",
        "quality": req.get("quality").and_then(Value::as_str).unwrap_or("low"),
        "size": size,
        "usage": obj! {
            "input_tokens": ctx.count(t.input),
            "input_tokens_details": obj! { "image_tokens": 0u64, "text_tokens": t.input },
            "output_tokens": t.output,
            "output_tokens_details": obj! { "image_tokens": t.output, "text_tokens": 0u64 },
            "total_tokens": t.input + t.output,
        },
    };
    Reply::json(StatusCode::OK, &body, ctx.reported(t.input, 0, t.output, 0))
}

/// The fields of a multipart form: text fields by name, and the `file` part's name and size.
struct Form {
    fields: Vec<(String, String)>,
    file: Option<(String, usize)>,
}

impl Form {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn parse_form(headers: &HeaderMap, body: &Bytes) -> Result<Form, Reply> {
    let bad = || {
        Reply::error(
            StatusCode::BAD_REQUEST,
            "Could not parse multipart form",
            "invalid_request_error",
            null(),
            null(),
        )
    };
    let boundary = header(headers, "content-type")
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(bad)?;
    let body = body.clone();
    let stream = futures_util::stream::once(async move { Ok::<Bytes, Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut form = Form {
        fields: Vec::new(),
        file: None,
    };
    while let Some(field) = multipart.next_field().await.map_err(|_| bad())? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            let file_name = field.file_name().unwrap_or("upload").to_owned();
            let bytes = field.bytes().await.map_err(|_| bad())?;
            form.file = Some((file_name, bytes.len()));
        } else {
            let text = field.text().await.map_err(|_| bad())?;
            form.fields.push((name, text));
        }
    }
    Ok(form)
}

/// `POST /v1/audio/transcriptions` and `/translations`: whisper-* report a duration, the
/// gpt-4o-*transcribe models tokens (`input_token_details`, singular "token"). A transcription
/// with `stream=true` on a token model answers data-only SSE without `[DONE]`.
async fn audio(ctx: &Ctx<'_>, headers: &HeaderMap, body: &Bytes, transcription: bool) -> Reply {
    let form = match parse_form(headers, body).await {
        Ok(form) => form,
        Err(reply) => return reply,
    };
    let Some(model) = form.field("model") else {
        return Reply::missing_model();
    };
    if form.file.is_none() {
        return Reply::missing_parameter("file");
    }
    let words: Vec<&str> = ctx.words().collect();
    let text: String = words.concat();
    if matches!(form.field("response_format"), Some("text" | "srt" | "vtt")) {
        return Reply::text(format!("{text}\n"));
    }
    if model.starts_with("whisper") {
        let body = obj! {
            "text": &text,
            "usage": obj! { "type": "duration", "seconds": 3u64 },
        };
        return Reply::json(StatusCode::OK, &body, Reported::default());
    }
    let t = ctx.tokens();
    let usage = obj! {
        "type": "tokens",
        "input_tokens": ctx.count(t.input),
        "input_token_details": obj! { "text_tokens": 0u64, "audio_tokens": t.input },
        "output_tokens": t.output,
        "total_tokens": t.input + t.output,
    };
    let reported = ctx.reported(t.input, 0, t.output, 0);
    if transcription && form.field("stream") == Some("true") {
        let mut pieces: Vec<Piece> = words
            .iter()
            .map(|w| Piece::data(&obj! { "type": "transcript.text.delta", "delta": *w }))
            .collect();
        pieces.push(
            Piece::data(&obj! {
                "type": "transcript.text.done",
                "text": &text,
                "usage": usage,
            })
            .counting(reported),
        );
        return Reply::sse(pieces);
    }
    let body = obj! { "text": &text, "usage": usage };
    Reply::json(StatusCode::OK, &body, reported)
}

/// `POST /v1/files`: `bytes` is the size of the uploaded `file` part.
async fn files(ctx: &Ctx<'_>, headers: &HeaderMap, body: &Bytes) -> Reply {
    let form = match parse_form(headers, body).await {
        Ok(form) => form,
        Err(reply) => return reply,
    };
    let Some(purpose) = form.field("purpose") else {
        return Reply::missing_parameter("purpose");
    };
    let Some((file_name, size)) = &form.file else {
        return Reply::missing_parameter("file");
    };
    let body = obj! {
        "object": "file",
        "id": format!("file-{}", ctx.shared.hex(22)),
        "purpose": purpose,
        "filename": file_name,
        "bytes": *size,
        "created_at": ctx.created,
        "expires_at": null(),
        "status": "processed",
        "status_details": null(),
    };
    Reply::json(StatusCode::OK, &body, Reported::default())
}

fn model_object(id: &str, created: u64, owned_by: &str) -> J {
    obj! { "id": id, "object": "model", "created": created, "owned_by": owned_by }
}

/// `GET /v1/models`.
fn models_list() -> Reply {
    let data: Vec<J> = MODELS
        .iter()
        .map(|(id, created, owner)| model_object(id, *created, owner))
        .collect();
    Reply::json(
        StatusCode::OK,
        &obj! { "object": "list", "data": data },
        Reported::default(),
    )
}

/// `GET /v1/models/{id}`.
fn model_retrieve(id: &str) -> Reply {
    match MODELS.iter().find(|(known, _, _)| *known == id) {
        Some((id, created, owner)) => Reply::json(
            StatusCode::OK,
            &model_object(id, *created, owner),
            Reported::default(),
        ),
        None => Reply::model_not_found(id),
    }
}

// ---------------------------------------------------------------------------------------------
// Response assembly: headers, encoding, and the wire faults.

fn respond(
    shared: &Arc<Shared>,
    reply: Reply,
    request_headers: &HeaderMap,
    controls: &Controls,
    started: Instant,
) -> Response<MockBody> {
    let request_id = header(request_headers, "x-request-id")
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", shared.hex(32)));
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    set("content-type", reply.content_type);
    set("openai-organization", "org-mock");
    set("openai-project", "proj_mock");
    set(
        "openai-processing-ms",
        &started.elapsed().as_millis().max(1).to_string(),
    );
    set("openai-version", "2020-10-01");
    set("x-request-id", &request_id);
    set("access-control-expose-headers", "X-Request-ID");
    set("x-ratelimit-limit-requests", "5000");
    set("x-ratelimit-limit-tokens", "2000000");
    set("x-ratelimit-remaining-requests", "4999");
    set("x-ratelimit-remaining-tokens", "1999970");
    set("x-ratelimit-reset-requests", "12ms");
    set("x-ratelimit-reset-tokens", "0s");
    for (name, value) in &reply.headers {
        set(name, value);
    }
    if let Some(encoding) = controls.encoding {
        set("content-encoding", encoding.token());
    }

    // An endless stream compresses as it goes and never finishes its compressed stream.
    let (steps, total) = match reply.endless {
        Some(_) => (VecDeque::new(), 0),
        None => script(reply.pieces, controls),
    };
    let exact_len =
        (!reply.stream && reply.endless.is_none() && controls.sends_whole_body()).then_some(total);
    // Relaxed: a gauge, see `open_bodies`.
    shared.open_bodies.fetch_add(1, Ordering::Relaxed);
    let body = MockBody {
        steps,
        pause: None,
        stalled: false,
        endless: reply.endless,
        exact_len,
        shared: Arc::clone(shared),
    };
    let mut response = Response::new(body);
    *response.status_mut() = reply.status;
    *response.headers_mut() = headers;
    response
}

/// Incremental compression: each piece is compressed and flushed on its own, so every event
/// can be decoded as soon as its frame arrives.
enum Compressor {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Compressor {
    fn new(encoding: Encoding) -> Compressor {
        match encoding {
            Encoding::Gzip => Compressor::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::default(),
            )),
            Encoding::Deflate => Compressor::Deflate(flate2::write::ZlibEncoder::new(
                Vec::new(),
                flate2::Compression::default(),
            )),
            Encoding::Br => Compressor::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                22,
            ))),
            Encoding::Zstd => Compressor::Zstd(
                zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd encoder"),
            ),
        }
    }

    /// Compresses `data` and flushes, returning every byte produced so far.
    fn push(&mut self, data: &[u8]) -> Bytes {
        fn step<W: io::Write>(w: &mut W, data: &[u8]) {
            w.write_all(data).expect("compressing into a Vec");
            w.flush().expect("flushing into a Vec");
        }
        let out = match self {
            Compressor::Gzip(w) => {
                step(w, data);
                w.get_mut()
            }
            Compressor::Deflate(w) => {
                step(w, data);
                w.get_mut()
            }
            Compressor::Br(w) => {
                step(w.as_mut(), data);
                w.get_mut()
            }
            Compressor::Zstd(w) => {
                step(w, data);
                w.get_mut()
            }
        };
        Bytes::from(std::mem::take(out))
    }

    /// Ends the compressed stream, returning its last bytes.
    fn finish(self) -> Bytes {
        let out = match self {
            Compressor::Gzip(w) => w.finish().expect("finishing gzip"),
            Compressor::Deflate(w) => w.finish().expect("finishing deflate"),
            Compressor::Br(w) => w.into_inner(),
            Compressor::Zstd(w) => w.finish().expect("finishing zstd"),
        };
        Bytes::from(out)
    }
}

enum Step {
    /// A body frame, and the usage counted when it is handed to hyper.
    Data(Bytes, Reported),
    /// Send nothing for a while (`None`: forever), keeping the connection open.
    Pause(Option<Duration>),
    /// End the body with an error: hyper aborts the connection (HTTP/1) or resets the stream
    /// (HTTP/2), so the client sees an incomplete body.
    Fail,
}

/// Turns the pieces into body frames: encodes them, cuts the byte stream into frames (one per
/// piece, or every `x-mock-split` bytes across pieces), and applies truncate, reset and stall at
/// their byte offsets. Returns the frames and the full encoded length.
fn script(pieces: Vec<Piece>, controls: &Controls) -> (VecDeque<Step>, u64) {
    let mut compressor = controls.encoding.map(Compressor::new);
    let mut wire = BytesMut::new();
    let mut piece_ends = BTreeSet::new();
    let mut usage_at: Vec<(usize, Reported)> = Vec::new();
    for piece in pieces {
        let bytes = match compressor.as_mut() {
            Some(c) => c.push(&piece.bytes),
            None => piece.bytes,
        };
        wire.extend_from_slice(&bytes);
        piece_ends.insert(wire.len());
        if !piece.usage.is_empty() {
            usage_at.push((wire.len(), piece.usage));
        }
    }
    if let Some(c) = compressor {
        wire.extend_from_slice(&c.finish());
        piece_ends.insert(wire.len());
    }
    let wire = wire.freeze();
    let total = wire.len();

    let mut cuts: BTreeSet<usize> = match controls.split {
        Some(n) => (n..total).step_by(n).chain([total]).collect(),
        None => piece_ends,
    };
    let limit = [Some(total), controls.truncate, controls.reset_after]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(total);
    cuts.insert(limit);
    if let Some(k) = controls.stall_after.filter(|k| *k <= limit) {
        cuts.insert(k);
    }

    let mut steps = VecDeque::new();
    if controls.stall_after == Some(0) {
        steps.push_back(Step::Pause(controls.stall_for));
    }
    let mut start = 0;
    for cut in cuts.into_iter().filter(|c| *c > 0 && *c <= limit) {
        let mut usage = Reported::default();
        for (_, counted) in usage_at
            .iter()
            .filter(|(end, _)| start < *end && *end <= cut)
        {
            usage.add(counted);
        }
        steps.push_back(Step::Data(wire.slice(start..cut), usage));
        if controls.stall_after == Some(cut) {
            steps.push_back(Step::Pause(controls.stall_for));
        }
        start = cut;
    }
    if controls.reset_after.is_some() {
        // Pending for a moment lets hyper flush the head and the frames before the error: an
        // HTTP/1 connection is closed and an HTTP/2 stream reset with whatever is still queued.
        steps.push_back(Step::Pause(Some(RESET_GRACE)));
        steps.push_back(Step::Fail);
    }
    (steps, total as u64)
}

/// The generator behind `x-mock-endless`: a chat chunk every `ENDLESS_INTERVAL`, forever.
struct Endless {
    id: String,
    model: String,
    created: u64,
    seq: usize,
    compressor: Option<Compressor>,
    split: Option<usize>,
    /// Whether the next chunk is due now (otherwise wait an interval first).
    due: bool,
}

impl Endless {
    fn next_frames(&mut self) -> Vec<Bytes> {
        let word = WORDS[self.seq % WORDS.len()];
        self.seq += 1;
        let delta = if self.seq == 1 {
            obj! { "role": "assistant", "content": word }
        } else {
            obj! { "content": word }
        };
        let chunk = obj! {
            "id": &self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": &self.model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": arr![obj! {
                "index": 0u64,
                "delta": delta,
                "logprobs": null(),
                "finish_reason": null(),
            }],
        };
        let text = Bytes::from(format!("data: {}\n\n", chunk.compact()));
        let bytes = match self.compressor.as_mut() {
            Some(c) => c.push(&text),
            None => text,
        };
        let size = self.split.unwrap_or(bytes.len().max(1));
        (0..bytes.len())
            .step_by(size)
            .map(|at| bytes.slice(at..(at + size).min(bytes.len())))
            .collect()
    }
}

/// The response body: a script of frames, pauses and failures, then optionally an endless
/// generator. It counts usage into `Shared::reported` when it hands the frame to hyper.
struct MockBody {
    steps: VecDeque<Step>,
    pause: Option<Pin<Box<Sleep>>>,
    stalled: bool,
    endless: Option<Endless>,
    exact_len: Option<u64>,
    shared: Arc<Shared>,
}

impl Drop for MockBody {
    fn drop(&mut self) {
        // Relaxed: a gauge, see `open_bodies`.
        self.shared.open_bodies.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.stalled {
                // A stall without an end: never wake; hyper drops the body with the connection.
                return Poll::Pending;
            }
            if let Some(pause) = this.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match this.steps.pop_front() {
                Some(Step::Data(bytes, usage)) => {
                    if !usage.is_empty() {
                        this.shared.add_reported(&usage);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Some(Step::Pause(Some(d))) => this.pause = Some(Box::pin(tokio::time::sleep(d))),
                Some(Step::Pause(None)) => this.stalled = true,
                Some(Step::Fail) => {
                    this.steps.clear();
                    this.endless = None;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "mock upstream reset the response",
                    ))));
                }
                None => match this.endless.as_mut() {
                    Some(endless) if endless.due => {
                        endless.due = false;
                        this.steps.extend(
                            endless
                                .next_frames()
                                .into_iter()
                                .map(|b| Step::Data(b, Reported::default())),
                        );
                    }
                    Some(endless) => {
                        endless.due = true;
                        this.pause = Some(Box::pin(tokio::time::sleep(ENDLESS_INTERVAL)));
                    }
                    None => return Poll::Ready(None),
                },
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact_len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
