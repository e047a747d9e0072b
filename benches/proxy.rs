//! The load bench: tollgate beside a bare hyper pass-through (the floor: what forwarding alone
//! costs in Rust) and nginx (a reference), all in front of one fast mock OpenAI upstream and all
//! driven by the same Rust load generator with the same requests. How to run it and how to read
//! its table: `benches/README.md`.
//!
//! Every server is a process of its own, so that `/proc/PID/stat` gives each one's CPU time and
//! `/proc/PID/status` its memory: the mock and the pass-through are this binary run again with
//! `--serve-mock` / `--serve-passthrough UPSTREAM`, tollgate is its release binary (built by
//! `cargo build --release --locked --bin tollgate` at the start), nginx is the system's. The load
//! generator runs in this process, on a runtime of its own.
//!
//! Invariant: every run stops by itself. Each phase ends at a deadline (the long phase at a
//! request count or a deadline), the child servers exit when this process closes their stdin or
//! drops their guard, and a watchdog thread stops everything after `TOLLGATE_BENCH_DEADLINE_SECS`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

type Error = Box<dyn std::error::Error + Send + Sync>;

const SERVE_MOCK: &str = "--serve-mock";
const SERVE_PASSTHROUGH: &str = "--serve-passthrough";

/// The "real" OpenAI key every proxy must put in; the mock refuses anything else with 401.
const REAL_KEY: &str = "sk-proj-bench-real-key-0123456789abcdef";
const KEY_ENV: &str = "TOLLGATE_BENCH_OPENAI_KEY";
const PROJECTS: usize = 1_000;
const CREDENTIALS_PER_PROJECT: usize = 10;
/// Content chunks in a streamed answer (the usage chunk and `[DONE]` come on top); its usage
/// reports one output token per chunk.
const SSE_CHUNKS: usize = 200;
/// Output tokens the non-streamed answer reports.
const COMPLETION_TOKENS: u64 = 37;
const PATH: &str = "/v1/chat/completions";

/// The four targets, in the order they are driven.
const TARGETS: [&str; 4] = ["direct", "passthrough", "tollgate", "nginx"];

// ---------------------------------------------------------------------------------------------
// Entry

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some(SERVE_MOCK) => serve_mock(),
        Some(SERVE_PASSTHROUGH) => serve_passthrough(args.get(2).map(String::as_str)),
        // `cargo bench` passes `--bench` (and maybe a filter): the bench itself.
        _ => run_bench(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("proxy bench: error: {err}");
            ExitCode::from(1)
        }
    }
}

/// The bench's report, on stdout.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

fn err(message: impl Into<String>) -> Error {
    message.into().into()
}

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    /// Multiplies every phase's duration (0.2 for a quick smoke run).
    scale: f64,
    rounds: usize,
    targets: Vec<&'static str>,
    long: bool,
    long_requests: u64,
    rust_log: String,
    deadline: Duration,
}

impl Settings {
    fn from_env() -> Result<Settings, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let scale = match var("TOLLGATE_BENCH_SCALE") {
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 100.0)
                .ok_or_else(|| {
                    err(format!(
                        "TOLLGATE_BENCH_SCALE: not a number in (0, 100]: {v}"
                    ))
                })?,
            None => 1.0,
        };
        let rounds = match var("TOLLGATE_BENCH_ROUNDS") {
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|r| (1..=20).contains(r))
                .ok_or_else(|| err(format!("TOLLGATE_BENCH_ROUNDS: not in 1..=20: {v}")))?,
            None => 1,
        };
        let targets = match var("TOLLGATE_BENCH_TARGETS") {
            Some(v) => {
                let mut chosen = Vec::new();
                for name in v.split(',').map(str::trim) {
                    let known = TARGETS.iter().find(|t| **t == name).ok_or_else(|| {
                        err(format!(
                            "TOLLGATE_BENCH_TARGETS: unknown target `{name}` (known: {})",
                            TARGETS.join(",")
                        ))
                    })?;
                    chosen.push(*known);
                }
                chosen
            }
            None => TARGETS.to_vec(),
        };
        let long = var("TOLLGATE_BENCH_LONG").is_some_and(|v| v != "0");
        let long_requests = match var("TOLLGATE_BENCH_LONG_REQUESTS") {
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 10)
                .ok_or_else(|| err(format!("TOLLGATE_BENCH_LONG_REQUESTS: not >= 10: {v}")))?,
            None => 1_000_000,
        };
        let deadline_secs = match var("TOLLGATE_BENCH_DEADLINE_SECS") {
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 10)
                .ok_or_else(|| err(format!("TOLLGATE_BENCH_DEADLINE_SECS: not >= 10: {v}")))?,
            None => {
                let base = 600.0 + 60.0 * rounds as f64 * scale;
                (if long { base + 3_600.0 } else { base }) as u64
            }
        };
        Ok(Settings {
            scale,
            rounds,
            targets,
            long,
            long_requests,
            rust_log: var("TOLLGATE_BENCH_RUST_LOG").unwrap_or_else(|| "info".to_owned()),
            deadline: Duration::from_secs(deadline_secs),
        })
    }

    fn secs(&self, base: f64) -> Duration {
        Duration::from_secs_f64(base * self.scale)
    }
}

/// One measured phase: a fixed load for a fixed time.
#[derive(Clone, Copy)]
struct PhaseSpec {
    name: &'static str,
    connections: usize,
    seconds: f64,
    stream: bool,
    /// Each connection keeps the one credential it drew first, as an application's connection
    /// pool does, instead of a random one of the 10,000 per request.
    pinned: bool,
}

const WARMUP: [PhaseSpec; 2] = [
    PhaseSpec {
        name: "warm-up",
        connections: 32,
        seconds: 1.0,
        stream: false,
        pinned: false,
    },
    PhaseSpec {
        name: "warm-up stream",
        connections: 8,
        seconds: 0.5,
        stream: true,
        pinned: false,
    },
];

const PHASES: [PhaseSpec; 4] = [
    PhaseSpec {
        name: "32 conns",
        connections: 32,
        seconds: 5.0,
        stream: false,
        pinned: false,
    },
    PhaseSpec {
        name: "32 conns pinned",
        connections: 32,
        seconds: 5.0,
        stream: false,
        pinned: true,
    },
    PhaseSpec {
        name: "1 conn",
        connections: 1,
        seconds: 2.0,
        stream: false,
        pinned: false,
    },
    PhaseSpec {
        name: "stream 8 conns",
        connections: 8,
        seconds: 3.0,
        stream: true,
        pinned: false,
    },
];

// ---------------------------------------------------------------------------------------------
// The mock upstream (child process)

/// What the mock reads of a request body.
#[derive(Default, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The mock's answers, built once.
struct Answers {
    json: Arc<[Bytes]>,
    sse: Arc<[Bytes]>,
    sse_with_usage: Arc<[Bytes]>,
}

const ID: &str = "chatcmpl-Mk7aQ2sLw9XyZ0bC1dE2fG3hI4jK5";
const MODEL: &str = "gpt-4o-mini-2024-07-18";
const FINGERPRINT: &str = "fp_0a1b2c3d4e";
const WORDS: [&str; 9] = [
    "Sure,", " here", " is", " a", " short", " mock", " answer", " for", " you.",
];

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

/// A chat.completion of about 700 bytes, as OpenAI sends it (compact here).
fn completion_body() -> String {
    let body = json!({
        "id": ID,
        "object": "chat.completion",
        "created": 1_760_000_000u64,
        "model": MODEL,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Sure, here is a short mock answer for you. It has a few sentences so that the body has the size of a typical short answer, and the usage comes after the choices.",
                "refusal": null,
                "annotations": []
            },
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": usage_json(42, COMPLETION_TOKENS),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT
    });
    body.to_string()
}

fn chunk_event(index: usize) -> String {
    let delta = if index == 0 {
        json!({"role": "assistant", "content": "", "refusal": null})
    } else {
        json!({"content": WORDS[index % WORDS.len()]})
    };
    let finish = if index + 1 == SSE_CHUNKS {
        json!("stop")
    } else {
        Value::Null
    };
    let chunk = json!({
        "id": ID,
        "object": "chat.completion.chunk",
        "created": 1_760_000_000u64,
        "model": MODEL,
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        "usage": null,
        "obfuscation": "a1B"
    });
    format!("data: {chunk}\n\n")
}

fn usage_event() -> String {
    let chunk = json!({
        "id": ID,
        "object": "chat.completion.chunk",
        "created": 1_760_000_000u64,
        "model": MODEL,
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
        "choices": [],
        "usage": usage_json(42, SSE_CHUNKS as u64),
        "obfuscation": "Xy"
    });
    format!("data: {chunk}\n\n")
}

const DONE: &str = "data: [DONE]\n\n";

impl Answers {
    fn new() -> Answers {
        let chunks: Vec<Bytes> = (0..SSE_CHUNKS)
            .map(|i| Bytes::from(chunk_event(i)))
            .collect();
        let mut sse = chunks.clone();
        sse.push(Bytes::from_static(DONE.as_bytes()));
        let mut sse_with_usage = chunks;
        sse_with_usage.push(Bytes::from(usage_event()));
        sse_with_usage.push(Bytes::from_static(DONE.as_bytes()));
        Answers {
            json: Arc::from(vec![Bytes::from(completion_body())]),
            sse: Arc::from(sse),
            sse_with_usage: Arc::from(sse_with_usage),
        }
    }

    /// Bytes of a streamed answer as a client that did not ask for usage sees it.
    fn stream_len(&self) -> usize {
        self.sse.iter().map(Bytes::len).sum()
    }
}

/// A prebuilt answer, one frame per SSE event. Between two events it yields once (wakes itself
/// and returns `Pending`), which makes hyper flush: each event leaves the mock in its own write,
/// as a real token stream does, only without the wait between tokens.
struct MockBody {
    frames: Arc<[Bytes]>,
    next: usize,
    exact: bool,
    yielded: bool,
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        let Some(frame) = this.frames.get(this.next) else {
            return Poll::Ready(None);
        };
        if this.next > 0 && !this.yielded {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yielded = false;
        this.next += 1;
        Poll::Ready(Some(Ok(Frame::data(frame.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.frames.len()
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            let left: usize = self.frames.iter().skip(self.next).map(Bytes::len).sum();
            SizeHint::with_exact(left as u64)
        } else {
            SizeHint::default()
        }
    }
}

type MockResponse = Response<Either<MockBody, Full<Bytes>>>;

fn plain(status: StatusCode, text: &'static str) -> MockResponse {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *response.status_mut() = status;
    response
}

async fn mock_answer(answers: Arc<Answers>, request: Request<Incoming>) -> MockResponse {
    if request.method() != Method::POST || request.uri().path() != PATH {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    // Every proxy must have swapped the caller's token for the real key.
    let expected = concat_key();
    if request
        .headers()
        .get(AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        != Some(expected.as_bytes())
    {
        return plain(StatusCode::UNAUTHORIZED, "wrong key\n");
    }
    let Ok(body) = request.into_body().collect().await else {
        return plain(StatusCode::BAD_REQUEST, "body\n");
    };
    let Ok(chat) = serde_json::from_slice::<ChatRequest>(&body.to_bytes()) else {
        return plain(StatusCode::BAD_REQUEST, "json\n");
    };
    let (frames, exact, content_type) = if chat.stream {
        let with_usage = chat.stream_options.is_some_and(|o| o.include_usage);
        let frames = if with_usage {
            answers.sse_with_usage.clone()
        } else {
            answers.sse.clone()
        };
        (frames, false, "text/event-stream; charset=utf-8")
    } else {
        (answers.json.clone(), true, "application/json")
    };
    let mut response = Response::new(Either::Left(MockBody {
        frames,
        next: 0,
        exact,
        yielded: false,
    }));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        "x-request-id",
        HeaderValue::from_static("req_5f2d7c9a0b1e4c3d8a6f9e0b1c2d3e4f"),
    );
    headers.insert("openai-processing-ms", HeaderValue::from_static("1"));
    response
}

fn concat_key() -> String {
    format!("Bearer {REAL_KEY}")
}

/// `--serve-mock`: the fast upstream. One worker thread, so that it takes at most one core.
fn serve_mock() -> Result<(), Error> {
    exit_when_stdin_closes();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        announce(listener.local_addr()?)?;
        let answers = Arc::new(Answers::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let answers = answers.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let answers = answers.clone();
                    async move { Ok::<_, Infallible>(mock_answer(answers, request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The bare pass-through (child process)

type PassthroughBody = Either<Incoming, Empty<Bytes>>;

/// `--serve-passthrough UPSTREAM`: a pooled hyper client behind a hyper server that swaps the
/// Authorization header and does nothing else. Default runtime (one worker per core), as
/// tollgate's.
fn serve_passthrough(upstream: Option<&str>) -> Result<(), Error> {
    let upstream: SocketAddr = upstream
        .ok_or_else(|| err("usage: --serve-passthrough UPSTREAM_ADDR"))?
        .parse()?;
    exit_when_stdin_closes();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        announce(listener.local_addr()?)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        let authority = http::uri::Authority::try_from(upstream.to_string())?;
        let key = HeaderValue::try_from(concat_key())?;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (client, authority, key) = (client.clone(), authority.clone(), key.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let (client, authority, key) = (client.clone(), authority.clone(), key.clone());
                    async move { Ok::<_, Infallible>(pass(&client, authority, key, request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn pass(
    client: &Client<HttpConnector, Incoming>,
    authority: http::uri::Authority,
    key: HeaderValue,
    mut request: Request<Incoming>,
) -> Response<PassthroughBody> {
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build();
    let bad_gateway = || {
        let mut response = Response::new(Either::Right(Empty::new()));
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        response
    };
    let Ok(uri) = uri else {
        return bad_gateway();
    };
    *request.uri_mut() = uri;
    request.headers_mut().insert(AUTHORIZATION, key);
    match client.request(request).await {
        Ok(response) => response.map(Either::Left),
        Err(_) => bad_gateway(),
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child server exits when its parent closes its stdin (or dies), so none outlives a bench.
fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(_) => {}
            }
        }
    });
}

fn announce(addr: SocketAddr) -> Result<(), Error> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "LISTENING {addr}")?;
    stdout.flush()?;
    Ok(())
}

/// Pids of the processes this bench started, for the watchdog.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// The bench's temporary directory, for the watchdog to remove.
static TEMP_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

fn register(pid: u32) {
    if let Ok(mut children) = CHILDREN.lock() {
        children.push(pid);
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A process the bench started: stopped (TERM, then KILL after 5 s) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    /// Closed on drop: the signal for the bench's own child servers to exit.
    stdin: Option<std::process::ChildStdin>,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.exited().is_none() {
            signal(self.pid(), "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.exited().is_none() {
            eprintln!(
                "proxy bench: {} did not stop on TERM; killing it",
                self.name
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts this binary in a child-server mode and reads the address it listens on.
fn spawn_self(name: &'static str, args: &[String]) -> Result<(Proc, SocketAddr), Error> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    register(child.id());
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let proc = Proc { name, child, stdin };
    let stdout = stdout.ok_or_else(|| err(format!("{name}: no stdout")))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("LISTENING ")
        .ok_or_else(|| err(format!("{name}: did not start (said {line:?})")))?
        .parse()?;
    Ok((proc, addr))
}

fn free_port() -> Result<u16, Error> {
    // Bound and released at once; another process could take it in between, which on a bench
    // machine is unlikely and shows up as a start failure, not a wrong number.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A blocking HTTP/1.1 GET with a short timeout; the status code.
fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// /proc

struct ProcStat {
    ppid: u32,
    /// User and system time.
    ticks: u64,
    user: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    proc_stat_at(&format!("/proc/{pid}/stat"))
}

fn proc_stat_at(path: &str) -> Option<ProcStat> {
    let text = std::fs::read_to_string(path).ok()?;
    // The command name is in parentheses and may hold spaces: read after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ProcStat {
        ppid,
        ticks: utime + stime,
        user: utime,
    })
}

/// `pid` and all its descendants (nginx's workers are the master's children).
fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(stat) = proc_stat(pid) {
                parents.push((pid, stat.ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// CPU time of a process tree, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
struct Ticks {
    /// User and system time.
    all: u64,
    user: u64,
    /// The time of tollgate's ledger thread (user and system), which writes settled usage to
    /// SQLite off the request path.
    ledger: u64,
    /// Context switches of all the tree's threads: waits for work (voluntary) and preemptions
    /// by another process (involuntary). Not ticks, but read and differenced with them.
    voluntary: u64,
    involuntary: u64,
}

impl Ticks {
    fn since(self, before: Ticks) -> Ticks {
        Ticks {
            all: self.all.saturating_sub(before.all),
            user: self.user.saturating_sub(before.user),
            ledger: self.ledger.saturating_sub(before.ledger),
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
        }
    }
}

fn tree_ticks(root: u32) -> Ticks {
    let mut ticks = Ticks::default();
    for pid in process_tree(root) {
        if let Some(stat) = proc_stat(pid) {
            ticks.all += stat.ticks;
            ticks.user += stat.user;
        }
        ticks.ledger += thread_ticks(pid, LEDGER_THREAD);
        let (voluntary, involuntary) = context_switches(pid);
        ticks.voluntary += voluntary;
        ticks.involuntary += involuntary;
    }
    ticks
}

/// Voluntary and involuntary context switches of all the threads of `pid` (each thread's
/// `/proc/PID/task/TID/status`; a thread that ended between two reads takes its count along,
/// which tollgate's and the pass-through's fixed threads do not).
fn context_switches(pid: u32) -> (u64, u64) {
    let mut switches = (0, 0);
    for task in tasks(pid) {
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue;
        };
        let count = |field: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        };
        switches.0 += count("voluntary_ctxt_switches:");
        switches.1 += count("nonvoluntary_ctxt_switches:");
    }
    switches
}

/// The directories of the threads of `pid` (`/proc/PID/task/TID`).
fn tasks(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| dir.flatten().map(|task| task.path()).collect())
        .unwrap_or_default()
}

/// The name tollgate gives its ledger thread (`/proc/PID/task/TID/comm`).
const LEDGER_THREAD: &str = "tollgate-ledger";

/// CPU time of the threads of `pid` named `name`, in clock ticks.
fn thread_ticks(pid: u32, name: &str) -> u64 {
    tasks(pid)
        .into_iter()
        .filter(|task| {
            std::fs::read_to_string(task.join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .filter_map(|task| proc_stat_at(task.join("stat").to_str()?))
        .map(|s| s.ticks)
        .sum()
}

/// A `/proc/PID/status` field in KiB (`VmHWM`, `VmRSS`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Peak resident memory of a process tree, summed over its processes, in MiB.
fn tree_peak_rss_mib(root: u32) -> Option<f64> {
    let kib: u64 = process_tree(root)
        .into_iter()
        .filter_map(|p| status_kib(p, "VmHWM:"))
        .sum();
    (kib > 0).then(|| kib as f64 / 1024.0)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------------------------
// tollgate

struct Credentials {
    /// `tokens[project][credential]`.
    tokens: Vec<Vec<String>>,
}

/// Deterministic tokens shaped like `tollgate token new`'s: `tg-` and 48 hex digits.
fn credentials() -> Credentials {
    let tokens = (0..PROJECTS)
        .map(|p| {
            (0..CREDENTIALS_PER_PROJECT)
                .map(|c| {
                    let seed = tollgate::auth::hash_token(&format!("bench-{p}-{c}"));
                    format!("tg-{}", hex::encode(&seed[..24]))
                })
                .collect()
        })
        .collect();
    Credentials { tokens }
}

/// A realistic config: 1,000 projects, 10 credentials each, allowlists with exact names and
/// globs (every one allows `gpt-4o-mini` and `gpt-4.1-mini`, the models the bench asks for),
/// budgets that are never reached.
fn tollgate_config(
    credentials: &Credentials,
    listen: u16,
    admin: u16,
    upstream: SocketAddr,
) -> String {
    let mut toml = String::with_capacity(2 << 20);
    let _ = write!(
        toml,
        "[server]\nlisten = \"127.0.0.1:{listen}\"\nshutdown_grace_ms = 1000\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [upstream]\nbase_url = \"http://{upstream}\"\n\n"
    );
    for (p, tokens) in credentials.tokens.iter().enumerate() {
        let _ = writeln!(
            toml,
            "[[projects]]\nname = \"team-{p:04}\"\napi_key_env = \"{KEY_ENV}\""
        );
        if p % 2 == 0 {
            let _ = writeln!(toml, "openai_project = \"proj_bench{p:04}\"");
        }
        let _ = match p % 4 {
            0 => writeln!(toml, "allowed_models = [\"gpt-4o-mini\", \"gpt-4.1*\"]"),
            1 => writeln!(
                toml,
                "allowed_models = [\"gpt-4o\", \"gpt-4o-mini\", \"gpt-4.1-mini\", \"text-embedding-3-*\"]"
            ),
            2 => writeln!(toml, "allowed_models = [\"gpt-4*\", \"o4-mini\", \"o3*\"]\ndenied_models = [\"gpt-4.5*\"]"),
            _ => writeln!(toml, "denied_models = [\"o1*\", \"gpt-image-*\"]"),
        };
        let _ = match p % 3 {
            0 => writeln!(
                toml,
                "budget = {{ tokens = 1000000000000, period = \"monthly\" }}"
            ),
            1 => writeln!(toml, "budget = {{ usd = 1000000.0, period = \"daily\" }}"),
            _ => writeln!(
                toml,
                "budget = {{ tokens = 1000000000000, usd = 1000000.0, period = \"weekly\" }}"
            ),
        };
        for (c, token) in tokens.iter().enumerate() {
            let hash = hex::encode(tollgate::auth::hash_token(token));
            let _ = writeln!(
                toml,
                "\n[[projects.credentials]]\nname = \"svc-{c:02}\"\ntoken_sha256 = \"{hash}\""
            );
            if c % 3 == 0 {
                let _ = writeln!(toml, "expires_at = \"2099-01-01T00:00:00Z\"");
            }
        }
        toml.push('\n');
    }
    toml
}

fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The target directory this bench was built into: `<target>/release/deps/proxy-<hash>`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| manifest_dir().join("target"))
}

/// The release binary: `TOLLGATE_BIN`, else `cargo build --release --locked --bin tollgate` into
/// the bench's own target directory (a no-op when it is up to date).
fn tollgate_binary(target: &Path) -> Result<PathBuf, Error> {
    if let Some(bin) = std::env::var_os("TOLLGATE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let binary = target.join("release").join("tollgate");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "proxy bench: cargo build --release --locked --bin tollgate (CARGO_TARGET_DIR={})",
        target.display()
    );
    let mut build = Command::new(cargo);
    build
        .args(["build", "--release", "--locked", "--bin", "tollgate"])
        .current_dir(manifest_dir())
        .env("CARGO_TARGET_DIR", target)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // `cargo bench` runs this binary with the package's CARGO_PKG_*, CARGO_MANIFEST_* ... set.
    // Some build scripts (ring's) watch those variables, so passing them on would make this
    // build differ from a `cargo build --release` typed in a shell and rebuild them each time.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_CRATE_")
            || name.starts_with("CARGO_BIN_")
            || matches!(
                name,
                "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
            )
        {
            build.env_remove(name);
        }
    }
    let built = build.status();
    match built {
        Ok(status) if status.success() => Ok(binary),
        other => {
            if binary.exists() {
                eprintln!(
                    "proxy bench: the build failed ({other:?}); using the existing {}",
                    binary.display()
                );
                Ok(binary)
            } else {
                Err(err(format!("cannot build tollgate: {other:?}")))
            }
        }
    }
}

struct Started {
    proc: Proc,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    notes: Vec<(String, Value)>,
}

impl Started {
    /// Makes the started proxy a target of the load, its notes part of the report, and its
    /// process one the bench stops.
    fn enlist(
        self,
        name: &'static str,
        auths: &Arc<[HeaderValue]>,
        targets: &mut Vec<Target>,
        notes: &mut serde_json::Map<String, Value>,
        procs: &mut Vec<Proc>,
    ) {
        targets.push(Target {
            name,
            addr: self.addr,
            pid: Some(self.proc.pid()),
            auths: auths.clone(),
            admin: self.admin,
        });
        notes.insert(name.into(), Value::Object(self.notes.into_iter().collect()));
        procs.push(self.proc);
    }
}

fn start_tollgate(
    binary: &Path,
    dir: &Path,
    credentials: &Credentials,
    upstream: SocketAddr,
    rust_log: &str,
) -> Result<Started, Error> {
    let (listen, admin) = (free_port()?, free_port()?);
    let config = dir.join("tollgate.toml");
    std::fs::write(
        &config,
        tollgate_config(credentials, listen, admin, upstream),
    )?;
    let pricing = manifest_dir().join("config/pricing.toml");
    if std::fs::copy(&pricing, dir.join("pricing.toml")).is_err() {
        std::fs::write(
            dir.join("pricing.toml"),
            "[models.\"gpt-4o-mini\"]\ninput = 0.15\ncached_input = 0.075\noutput = 0.60\n",
        )?;
    }
    let config_bytes = std::fs::metadata(&config)?.len();

    // `tollgate check` first: a config the bench got wrong fails here, with tollgate's message.
    let checked = Instant::now();
    let check = Command::new(binary)
        .args(["check", "--config"])
        .arg(&config)
        .env(KEY_ENV, REAL_KEY)
        .output()?;
    let check_ms = checked.elapsed().as_secs_f64() * 1e3;
    if !check.status.success() {
        return Err(err(format!(
            "tollgate check refused the generated config: {}",
            String::from_utf8_lossy(&check.stderr).trim()
        )));
    }

    let log_path = dir.join("tollgate.log");
    let log = std::fs::File::create(&log_path)?;
    let spawned = Instant::now();
    let child = Command::new(binary)
        .args(["serve", "--config"])
        .arg(&config)
        .env(KEY_ENV, REAL_KEY)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    register(child.id());
    let mut proc = Proc {
        name: "tollgate",
        child,
        stdin: None,
    };
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let deadline = spawned + Duration::from_secs(60);
    loop {
        if http_get_status(admin_addr, "/readyz") == Some(200) {
            break;
        }
        if let Some(status) = proc.exited() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(err(format!(
                "tollgate exited ({status}) before ready: {log}"
            )));
        }
        if Instant::now() > deadline {
            return Err(err("tollgate was not ready within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let ready_ms = spawned.elapsed().as_secs_f64() * 1e3;
    let rss_ready = status_kib(proc.pid(), "VmRSS:").map(|k| k as f64 / 1024.0);
    out(&format!(
        "tollgate: config {:.1} MiB ({} projects, {} credentials); `tollgate check` {check_ms:.0} ms; \
         start to /readyz 200: {ready_ms:.0} ms; RSS when ready {} MiB\n",
        config_bytes as f64 / (1024.0 * 1024.0),
        PROJECTS,
        PROJECTS * CREDENTIALS_PER_PROJECT,
        rss_ready.map_or("?".to_owned(), |r| format!("{r:.1}")),
    ));
    Ok(Started {
        proc,
        addr: SocketAddr::from(([127, 0, 0, 1], listen)),
        admin: Some(admin_addr),
        notes: vec![
            ("config_bytes".into(), json!(config_bytes)),
            ("check_ms".into(), json!(check_ms)),
            ("start_to_ready_ms".into(), json!(ready_ms)),
            ("rss_when_ready_mib".into(), json!(rss_ready)),
            ("rust_log".into(), json!(rust_log)),
        ],
    })
}

// ---------------------------------------------------------------------------------------------
// nginx

fn find_nginx() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TOLLGATE_BENCH_NGINX") {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Debian installs it in /usr/sbin, which is not on every user's PATH.
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn start_nginx(binary: &Path, dir: &Path, upstream: SocketAddr) -> Result<Started, Error> {
    let port = free_port()?;
    let d = dir.display();
    let user = if running_as_root() {
        "user root;\n"
    } else {
        ""
    };
    // A plain reverse proxy: keep-alive to the upstream, no buffering (SSE passes through as it
    // comes), the Authorization header swapped, an access log line per request (tollgate logs
    // one too).
    let conf = format!(
        "{user}daemon off;\nmaster_process on;\nworker_processes auto;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20 access_log {d}/access.log;\n\
         \x20 client_body_temp_path {d}/client_body;\n\
         \x20 proxy_temp_path {d}/proxy_temp;\n\
         \x20 fastcgi_temp_path {d}/fastcgi_temp;\n\
         \x20 uwsgi_temp_path {d}/uwsgi_temp;\n\
         \x20 scgi_temp_path {d}/scgi_temp;\n\
         \x20 keepalive_requests 1000000;\n\
         \x20 upstream openai {{ server {upstream}; keepalive 128; }}\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{port};\n\
         \x20   location / {{\n\
         \x20     proxy_pass http://openai;\n\
         \x20     proxy_http_version 1.1;\n\
         \x20     proxy_set_header Connection \"\";\n\
         \x20     proxy_set_header Authorization \"Bearer {REAL_KEY}\";\n\
         \x20     proxy_buffering off;\n\
         \x20     proxy_request_buffering off;\n\
         \x20   }}\n\
         \x20 }}\n\
         }}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new(binary)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    register(child.id());
    let mut proc = Proc {
        name: "nginx",
        child,
        stdin: None,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    // Any answer (the mock's 404 for GET /) proves the whole path is up.
    while http_get_status(addr, "/").is_none() {
        if let Some(status) = proc.exited() {
            let mut stderr = String::new();
            if let Some(mut pipe) = proc.child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            return Err(err(format!("nginx exited ({status}): {}", stderr.trim())));
        }
        if Instant::now() > deadline {
            return Err(err("nginx did not answer within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let version = Command::new(binary)
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default();
    Ok(Started {
        proc,
        addr,
        admin: None,
        notes: vec![("version".into(), json!(version))],
    })
}

// ---------------------------------------------------------------------------------------------
// Load generator

/// splitmix64: a small deterministic generator, seeded per connection, so that every target
/// gets the same sequence of tokens and bodies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The requests of one target: its Host, the Authorization values to pick from, the bodies.
struct Workload {
    host: HeaderValue,
    auths: Arc<[HeaderValue]>,
    bodies: Arc<[Bytes]>,
    /// See [`PhaseSpec::pinned`].
    pinned: bool,
}

impl Workload {
    /// The credential a connection keeps, when the phase pins one.
    fn pin(&self, rng: &mut Rng) -> Option<usize> {
        self.pinned.then(|| rng.below(self.auths.len()))
    }

    fn request(
        &self,
        rng: &mut Rng,
        pinned: Option<usize>,
    ) -> Result<Request<Full<Bytes>>, http::Error> {
        // A random credential of a random project (or the connection's own), then a random body.
        let auth = &self.auths[pinned.unwrap_or_else(|| rng.below(self.auths.len()))];
        let body = &self.bodies[rng.below(self.bodies.len())];
        Request::post(PATH)
            .header(HOST, self.host.clone())
            .header(AUTHORIZATION, auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("user-agent", "OpenAI/Python 1.54.0")
            .body(Full::new(body.clone()))
    }
}

/// The request bodies, the same for every target. Two models: one matched by exact name, one
/// by a glob in some projects' allowlists.
fn bodies(stream: bool) -> Arc<[Bytes]> {
    let models = ["gpt-4o-mini", "gpt-4.1-mini"];
    let prompts = [
        "Summarise the meeting notes below in three bullet points.",
        "Translate the following paragraph into French, keeping the tone informal.",
    ];
    let mut all = Vec::new();
    for model in models {
        for prompt in prompts {
            let mut body = json!({
                "model": model,
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant for an internal tool."},
                    {"role": "user", "content": prompt}
                ],
                "max_tokens": 256,
                "temperature": 0.2
            });
            if stream {
                // No stream_options: the SDKs' default. tollgate adds include_usage and takes
                // the usage chunk out again; the others pass the stream as it is.
                body["stream"] = json!(true);
            }
            all.push(Bytes::from(body.to_string()));
        }
    }
    Arc::from(all)
}

/// When a phase stops: at its deadline, or when `limit` requests have been sent.
struct Stop {
    deadline: Instant,
    limit: Option<u64>,
    issued: AtomicU64,
    completed: AtomicU64,
}

impl Stop {
    fn next(&self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        match self.limit {
            Some(limit) => self.issued.fetch_add(1, Ordering::Relaxed) < limit,
            None => true,
        }
    }
}

#[derive(Default)]
struct ConnStats {
    ok: u64,
    errors: u64,
    /// Whole exchange (send to last body byte), ns.
    latency: Vec<u64>,
    /// Send to first body byte, ns.
    first_byte: Vec<u64>,
    bytes: u64,
    statuses: HashMap<u16, u64>,
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, Error> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

struct Exchange {
    status: u16,
    first_byte: Option<Duration>,
    bytes: u64,
}

async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
    sent: Instant,
) -> Result<Exchange, hyper::Error> {
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut first_byte = None;
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            if first_byte.is_none() && !data.is_empty() {
                first_byte = Some(sent.elapsed());
            }
            bytes += data.len() as u64;
        }
    }
    Ok(Exchange {
        status,
        first_byte,
        bytes,
    })
}

/// One client connection: requests back to back on one kept-alive HTTP/1.1 connection (a new
/// one if it breaks) until `stop` says so.
async fn drive(
    addr: SocketAddr,
    workload: Arc<Workload>,
    mut rng: Rng,
    stop: Arc<Stop>,
    record: bool,
) -> ConnStats {
    let mut stats = ConnStats::default();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let pinned = workload.pin(&mut rng);
    while stop.next() {
        if sender.is_none() {
            match connect(addr).await {
                Ok(s) => sender = Some(s),
                Err(_) => {
                    stats.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else {
            continue;
        };
        if s.ready().await.is_err() {
            sender = None;
            stats.errors += 1;
            continue;
        }
        let Ok(request) = workload.request(&mut rng, pinned) else {
            stats.errors += 1;
            continue;
        };
        let sent = Instant::now();
        match exchange(s, request, sent).await {
            Ok(done) => {
                let elapsed = sent.elapsed();
                *stats.statuses.entry(done.status).or_default() += 1;
                if done.status == 200 {
                    stats.ok += 1;
                    stats.bytes += done.bytes;
                    if record {
                        stats.latency.push(elapsed.as_nanos() as u64);
                        if let Some(first) = done.first_byte {
                            stats.first_byte.push(first.as_nanos() as u64);
                        }
                    }
                } else {
                    stats.errors += 1;
                }
            }
            Err(_) => {
                stats.errors += 1;
                sender = None;
            }
        }
        stop.completed.fetch_add(1, Ordering::Relaxed);
    }
    stats
}

/// Runs `connections` clients against `addr` until `stop`; merges their stats.
async fn load(
    addr: SocketAddr,
    workload: Arc<Workload>,
    connections: usize,
    stop: Arc<Stop>,
    record: bool,
) -> ConnStats {
    let tasks: Vec<_> = (0..connections)
        .map(|i| {
            let rng = Rng(0x5eed_0000 + i as u64);
            tokio::spawn(drive(addr, workload.clone(), rng, stop.clone(), record))
        })
        .collect();
    let mut all = ConnStats::default();
    for task in tasks {
        let Ok(stats) = task.await else {
            all.errors += 1;
            continue;
        };
        all.ok += stats.ok;
        all.errors += stats.errors;
        all.bytes += stats.bytes;
        all.latency.extend(stats.latency);
        all.first_byte.extend(stats.first_byte);
        for (status, n) in stats.statuses {
            *all.statuses.entry(status).or_default() += n;
        }
    }
    all
}

fn percentile_us(sorted: &[u64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(rank).map(|ns| *ns as f64 / 1e3)
}

// ---------------------------------------------------------------------------------------------
// Phases

/// A running target: where to send, which process tree to watch.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// `None` for `direct` (no proxy process).
    pid: Option<u32>,
    auths: Arc<[HeaderValue]>,
    /// tollgate's admin listener, to read what it counted.
    admin: Option<SocketAddr>,
}

#[derive(Clone)]
struct PhaseResult {
    target: &'static str,
    phase: &'static str,
    connections: usize,
    stream: bool,
    requests: u64,
    errors: u64,
    statuses: HashMap<u16, u64>,
    seconds: f64,
    rps: f64,
    /// Non-stream: whole exchange. Stream: time to the first body byte.
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    /// Stream only: the whole exchange.
    total_p50_us: Option<f64>,
    cpu_us_per_req: Option<f64>,
    /// The user-space part of `cpu_us_per_req` (the rest is the kernel's: sockets, epoll).
    user_us_per_req: Option<f64>,
    /// The part of `cpu_us_per_req` spent by tollgate's ledger thread.
    ledger_us_per_req: Option<f64>,
    /// The proxy's threads' context switches per request: waits for work, and preemptions by
    /// the other processes on the machine's cores (the client, the mock).
    voluntary_switches_per_req: Option<f64>,
    involuntary_switches_per_req: Option<f64>,
    cpu_us_per_chunk: Option<f64>,
    mock_cpu_us_per_req: Option<f64>,
    client_cpu_us_per_req: Option<f64>,
    peak_rss_mib: Option<f64>,
    bytes_per_response: f64,
}

struct Bench {
    runtime: Runtime,
    ticks_per_second: f64,
    mock_pid: u32,
    stream_bodies: Arc<[Bytes]>,
    json_bodies: Arc<[Bytes]>,
}

impl Bench {
    fn run_phase(&self, target: &Target, spec: &PhaseSpec, duration: Duration) -> PhaseResult {
        let workload = Arc::new(Workload {
            host: HeaderValue::try_from(target.addr.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("127.0.0.1")),
            auths: target.auths.clone(),
            bodies: if spec.stream {
                self.stream_bodies.clone()
            } else {
                self.json_bodies.clone()
            },
            pinned: spec.pinned,
        });
        let proxy_before = target.pid.map(tree_ticks);
        let mock_before = tree_ticks(self.mock_pid);
        let self_before = proc_stat(std::process::id()).map_or(0, |s| s.ticks);
        let started = Instant::now();
        let stop = Arc::new(Stop {
            deadline: started + duration,
            limit: None,
            issued: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        });
        let mut stats =
            self.runtime
                .block_on(load(target.addr, workload, spec.connections, stop, true));
        let seconds = started.elapsed().as_secs_f64();
        let per_request = |ticks: u64| {
            (stats.ok > 0).then(|| ticks as f64 / self.ticks_per_second * 1e6 / stats.ok as f64)
        };
        let proxy = match (target.pid, proxy_before) {
            (Some(pid), Some(before)) => Some(tree_ticks(pid).since(before)),
            _ => None,
        };
        let cpu_us_per_req = proxy.and_then(|t| per_request(t.all));
        let user_us_per_req = proxy.and_then(|t| per_request(t.user));
        let ledger_us_per_req = proxy
            .filter(|_| target.name == "tollgate")
            .and_then(|t| per_request(t.ledger));
        let switches_per_request =
            |count: u64| (stats.ok > 0).then(|| count as f64 / stats.ok as f64);
        let voluntary_switches_per_req = proxy.and_then(|t| switches_per_request(t.voluntary));
        let involuntary_switches_per_req = proxy.and_then(|t| switches_per_request(t.involuntary));
        let mock_cpu_us_per_req = per_request(tree_ticks(self.mock_pid).since(mock_before).all);
        let client_cpu_us_per_req = per_request(
            proc_stat(std::process::id())
                .map_or(0, |s| s.ticks)
                .saturating_sub(self_before),
        );
        stats.latency.sort_unstable();
        stats.first_byte.sort_unstable();
        let (p50_us, p99_us, total_p50_us) = if spec.stream {
            (
                percentile_us(&stats.first_byte, 0.5),
                percentile_us(&stats.first_byte, 0.99),
                percentile_us(&stats.latency, 0.5),
            )
        } else {
            (
                percentile_us(&stats.latency, 0.5),
                percentile_us(&stats.latency, 0.99),
                None,
            )
        };
        PhaseResult {
            target: target.name,
            phase: spec.name,
            connections: spec.connections,
            stream: spec.stream,
            requests: stats.ok,
            errors: stats.errors,
            statuses: stats.statuses,
            seconds,
            rps: stats.ok as f64 / seconds,
            p50_us,
            p99_us,
            total_p50_us,
            cpu_us_per_req,
            user_us_per_req,
            ledger_us_per_req,
            voluntary_switches_per_req,
            involuntary_switches_per_req,
            cpu_us_per_chunk: if spec.stream {
                cpu_us_per_req.map(|c| c / SSE_CHUNKS as f64)
            } else {
                None
            },
            mock_cpu_us_per_req,
            client_cpu_us_per_req,
            peak_rss_mib: target.pid.and_then(tree_peak_rss_mib),
            bytes_per_response: if stats.ok > 0 {
                stats.bytes as f64 / stats.ok as f64
            } else {
                0.0
            },
        }
    }

    /// `TOLLGATE_BENCH_LONG=1`: `requests` requests to tollgate at 32 connections, its VmRSS
    /// sampled every tenth of them.
    fn long_phase(&self, target: &Target, requests: u64, deadline: Duration) -> (Value, u64) {
        let Some(pid) = target.pid else {
            return (Value::Null, 0);
        };
        let workload = Arc::new(Workload {
            host: HeaderValue::try_from(target.addr.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("127.0.0.1")),
            auths: target.auths.clone(),
            bodies: self.json_bodies.clone(),
            pinned: false,
        });
        let step = requests / 10;
        out(&format!(
            "long phase: {requests} requests to tollgate at 32 connections, VmRSS every {step}\n"
        ));
        let stop = Arc::new(Stop {
            deadline: Instant::now() + deadline,
            limit: Some(requests),
            issued: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        });
        let started = Instant::now();
        let rss = || status_kib(pid, "VmRSS:").map(|k| k as f64 / 1024.0);
        let mut samples: Vec<(u64, f64)> = Vec::new();
        if let Some(r) = rss() {
            samples.push((0, r));
        }
        let stats = self.runtime.block_on(async {
            let driver = tokio::spawn(load(target.addr, workload, 32, stop.clone(), false));
            let mut next = step;
            while !driver.is_finished() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let done = stop.completed.load(Ordering::Relaxed);
                while next <= requests && done >= next {
                    if let Some(r) = rss() {
                        samples.push((next, r));
                        out(&format!("  {next:>9} requests: VmRSS {r:.1} MiB\n"));
                    }
                    next += step;
                }
            }
            driver.await.unwrap_or_default()
        });
        let seconds = started.elapsed().as_secs_f64();
        let steady: Vec<f64> = samples
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(_, r)| *r)
            .collect();
        let max = steady.iter().copied().fold(f64::NAN, f64::max);
        let min = steady.iter().copied().fold(f64::NAN, f64::min);
        let ratio = max / min;
        out(&format!(
            "long phase: {} ok, {} errors in {seconds:.0} s ({:.0} req/s); VmRSS max/min over the \
             samples after the first {step}: {ratio:.3} ({min:.1}..{max:.1} MiB)\n\n",
            stats.ok,
            stats.errors,
            stats.ok as f64 / seconds
        ));
        let report = json!({
            "requests": requests,
            "ok": stats.ok,
            "errors": stats.errors,
            "seconds": seconds,
            "vmrss_mib_samples": samples.iter().map(|(n, r)| json!({"after": n, "vmrss_mib": r})).collect::<Vec<_>>(),
            "vmrss_max_over_min": if ratio.is_finite() { json!(ratio) } else { Value::Null },
        });
        (report, stats.ok)
    }
}

// ---------------------------------------------------------------------------------------------
// The bench

/// What tollgate answered 200 to, warm-ups included, to check what it counted.
#[derive(Default)]
struct Served {
    tollgate_json: u64,
    tollgate_stream: u64,
}

impl Served {
    fn add(&mut self, result: &PhaseResult) {
        if result.target != "tollgate" {
            return;
        }
        if result.stream {
            self.tollgate_stream += result.requests;
        } else {
            self.tollgate_json += result.requests;
        }
    }
}

/// Reads tollgate's `/metrics` after the load and compares what it counted with what the
/// bench was answered: a check that the meters ran on every response, not only that bytes
/// went through.
fn tollgate_counted(admin: SocketAddr, served: &Served) -> Value {
    let Some(text) = http_get_body(admin, "/metrics") else {
        out("tollgate /metrics: no answer\n");
        return Value::Null;
    };
    let sum = |metric: &str, label: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(metric) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let requests = sum("tollgate_requests_total{", "code=\"200\"");
    let output = sum("tollgate_tokens_total{", "type=\"output\"");
    let expected_requests = served.tollgate_json + served.tollgate_stream;
    let expected_output =
        served.tollgate_json * COMPLETION_TOKENS + served.tollgate_stream * SSE_CHUNKS as u64;
    out(&format!(
        "tollgate counted {requests} requests answered 200 (the bench got {expected_requests}) and \
         {output} output tokens (the mock reported {expected_output})\n"
    ));
    json!({
        "requests_200": requests,
        "requests_200_expected": expected_requests,
        "output_tokens": output,
        "output_tokens_expected": expected_output,
    })
}

/// A blocking HTTP/1.0 GET (so that the answer is not chunked); the body.
fn http_get_body(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8(response).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!(
            "proxy bench: still running after {} s (TOLLGATE_BENCH_DEADLINE_SECS); stopping",
            limit.as_secs()
        );
        let pids = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
        for pid in &pids {
            signal(*pid, "TERM");
        }
        std::thread::sleep(Duration::from_secs(2));
        for pid in &pids {
            signal(*pid, "KILL");
        }
        if let Some(dir) = TEMP_DIR.lock().ok().and_then(|d| d.clone()) {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(2);
    });
}

/// `/proc/loadavg`'s 1-, 5- and 15-minute averages: what else the machine was doing.
fn loadavg() -> Value {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| {
            l.split_whitespace()
                .take(3)
                .filter_map(|v| v.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .map_or(Value::Null, |v| json!(v))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(manifest_dir())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_default();
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    json!({
        "loadavg": loadavg(),
        "nproc": nproc,
        "cpu": cpu,
        "kernel": kernel,
        "memory_gib": mem_kib as f64 / (1024.0 * 1024.0),
        "date": chrono::Utc::now().to_rfc3339(),
        "commit": commit,
        "dirty": dirty,
    })
}

fn run_bench() -> Result<(), Error> {
    let settings = Settings::from_env()?;
    let target_dir = target_dir();
    let wants = |t: &str| settings.targets.contains(&t);
    let tollgate_bin = if wants("tollgate") {
        Some(tollgate_binary(&target_dir)?)
    } else {
        None
    };
    watchdog(settings.deadline);
    let machine = machine();
    out(&format!("machine: {machine}\n"));
    let busy = machine["loadavg"][0].as_f64().unwrap_or(0.0);
    let nproc = machine["nproc"].as_f64().unwrap_or(1.0);
    if busy > nproc * 0.5 {
        out(&format!(
            "WARNING: load average {busy:.1} on {nproc} cores before the bench started: other work \
             competes for the CPU and the numbers will be noisy (CPU µs/req suffers least)\n"
        ));
    }

    let dir = tempfile::Builder::new()
        .prefix("tollgate-bench-")
        .tempdir()?;
    if let Ok(mut temp) = TEMP_DIR.lock() {
        *temp = Some(dir.path().to_path_buf());
    }
    let (mock, mock_addr) = spawn_self("mock", &[SERVE_MOCK.to_owned()])?;
    let answers = Answers::new();
    let expected_stream_bytes = answers.stream_len();
    out(&format!(
        "mock upstream {mock_addr} (pid {}): chat.completion {} bytes; stream {} events, {} bytes\n",
        mock.pid(),
        answers.json.iter().map(Bytes::len).sum::<usize>(),
        SSE_CHUNKS,
        expected_stream_bytes,
    ));

    let credentials = credentials();
    let token_auths: Arc<[HeaderValue]> = credentials
        .tokens
        .iter()
        .flatten()
        .map(|t| HeaderValue::try_from(format!("Bearer {t}")))
        .collect::<Result<Vec<_>, _>>()?
        .into();
    let real_auth: Arc<[HeaderValue]> = Arc::from(vec![HeaderValue::try_from(concat_key())?]);

    let mut targets: Vec<Target> = Vec::new();
    let mut skipped: Vec<(&str, String)> = Vec::new();
    let mut notes: serde_json::Map<String, Value> = serde_json::Map::new();
    // Kept alive until the end; dropped (stopped) in reverse order.
    let mut procs: Vec<Proc> = Vec::new();

    if wants("direct") {
        targets.push(Target {
            name: "direct",
            addr: mock_addr,
            pid: None,
            auths: real_auth.clone(),
            admin: None,
        });
    }
    if wants("passthrough") {
        let (proc, addr) = spawn_self(
            "passthrough",
            &[SERVE_PASSTHROUGH.to_owned(), mock_addr.to_string()],
        )?;
        targets.push(Target {
            name: "passthrough",
            addr,
            pid: Some(proc.pid()),
            auths: token_auths.clone(),
            admin: None,
        });
        procs.push(proc);
    }
    if let Some(bin) = &tollgate_bin {
        let tollgate_dir = dir.path().join("tollgate");
        std::fs::create_dir_all(&tollgate_dir)?;
        match start_tollgate(
            bin,
            &tollgate_dir,
            &credentials,
            mock_addr,
            &settings.rust_log,
        ) {
            Ok(started) => started.enlist(
                "tollgate",
                &token_auths,
                &mut targets,
                &mut notes,
                &mut procs,
            ),
            Err(e) => {
                eprintln!("proxy bench: tollgate: {e}");
                skipped.push(("tollgate", e.to_string()));
            }
        }
    }
    if wants("nginx") {
        match find_nginx() {
            None => {
                out("nginx: SKIPPED (no `nginx` on PATH, /usr/sbin or TOLLGATE_BENCH_NGINX)\n");
                skipped.push(("nginx", "not installed".into()));
            }
            Some(bin) => {
                let nginx_dir = dir.path().join("nginx");
                std::fs::create_dir_all(&nginx_dir)?;
                match start_nginx(&bin, &nginx_dir, mock_addr) {
                    Ok(started) => {
                        started.enlist("nginx", &token_auths, &mut targets, &mut notes, &mut procs)
                    }
                    Err(e) => {
                        out(&format!("nginx: SKIPPED ({e})\n"));
                        skipped.push(("nginx", e.to_string()));
                    }
                }
            }
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("load")
        .enable_all()
        .build()?;
    let bench = Bench {
        runtime,
        ticks_per_second: clock_ticks_per_second(),
        mock_pid: mock.pid(),
        stream_bodies: bodies(true),
        json_bodies: bodies(false),
    };

    let mut rounds: Vec<Vec<PhaseResult>> = Vec::new();
    let mut served = Served::default();
    for round in 0..settings.rounds {
        let mut results = Vec::new();
        for target in &targets {
            out(&format!(
                "round {}/{}: {} ...\n",
                round + 1,
                settings.rounds,
                target.name
            ));
            for spec in &WARMUP {
                let warm = bench.run_phase(target, spec, settings.secs(spec.seconds));
                served.add(&warm);
            }
            for spec in &PHASES {
                let result = bench.run_phase(target, spec, settings.secs(spec.seconds));
                served.add(&result);
                if result.errors > 0 {
                    eprintln!(
                        "proxy bench: {} {}: {} errors (statuses {:?})",
                        target.name, spec.name, result.errors, result.statuses
                    );
                }
                results.push(result);
            }
        }
        rounds.push(results);
    }
    let results = median_rounds(&rounds);

    let long = if settings.long {
        match targets.iter().find(|t| t.name == "tollgate") {
            Some(target) => {
                let (report, ok) =
                    bench.long_phase(target, settings.long_requests, settings.deadline);
                served.tollgate_json += ok;
                report
            }
            None => Value::Null,
        }
    } else {
        Value::Null
    };
    let counted = match targets.iter().find_map(|t| t.admin) {
        Some(admin) => tollgate_counted(admin, &served),
        None => Value::Null,
    };

    let table = render_table(&results, &skipped, settings.long, expected_stream_bytes);
    out(&table);

    let report = json!({
        "machine": machine,
        "settings": {
            "scale": settings.scale,
            "rounds": settings.rounds,
            "phases": PHASES.iter().map(|p| json!({
                "name": p.name,
                "connections": p.connections,
                "seconds": p.seconds * settings.scale,
                "stream": p.stream,
                "credential_per_connection": p.pinned,
            })).collect::<Vec<_>>(),
            "projects": PROJECTS,
            "credentials": PROJECTS * CREDENTIALS_PER_PROJECT,
            "sse_chunks": SSE_CHUNKS,
            "expected_stream_bytes": expected_stream_bytes,
            "load_generator": "in-process Rust, hyper http1 client, one kept-alive connection per client, 1 runtime worker",
            "mock_upstream": "child process, hyper http1, 1 runtime worker",
        },
        "targets": notes,
        "skipped": skipped.iter().map(|(t, why)| json!({"target": t, "why": why})).collect::<Vec<_>>(),
        "results": results.iter().map(result_json).collect::<Vec<_>>(),
        "ratios": ratios_json(&results),
        "loadavg_at_end": loadavg(),
        "long": long,
        "tollgate_counted": counted,
    });
    let json_path = target_dir.join("bench-proxy.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    out(&format!("wrote {}\n", json_path.display()));

    drop(bench);
    while let Some(proc) = procs.pop() {
        drop(proc);
    }
    drop(mock);
    Ok(())
}

/// Per target and phase, the round whose req/s is the median of the rounds.
fn median_rounds(rounds: &[Vec<PhaseResult>]) -> Vec<PhaseResult> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .filter_map(|(i, _)| {
            let mut candidates: Vec<&PhaseResult> =
                rounds.iter().filter_map(|r| r.get(i)).collect();
            candidates.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            candidates.get(candidates.len() / 2).map(|r| (*r).clone())
        })
        .collect()
}

fn result_json(r: &PhaseResult) -> Value {
    json!({
        "target": r.target,
        "phase": r.phase,
        "connections": r.connections,
        "stream": r.stream,
        "requests": r.requests,
        "errors": r.errors,
        "statuses": r.statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "seconds": r.seconds,
        "req_per_s": r.rps,
        "latency_p50_us": if r.stream { Value::Null } else { json!(r.p50_us) },
        "latency_p99_us": if r.stream { Value::Null } else { json!(r.p99_us) },
        "first_byte_p50_us": if r.stream { json!(r.p50_us) } else { Value::Null },
        "first_byte_p99_us": if r.stream { json!(r.p99_us) } else { Value::Null },
        "stream_total_p50_us": r.total_p50_us,
        "cpu_us_per_req": r.cpu_us_per_req,
        "user_us_per_req": r.user_us_per_req,
        "ledger_us_per_req": r.ledger_us_per_req,
        "voluntary_switches_per_req": r.voluntary_switches_per_req,
        "involuntary_switches_per_req": r.involuntary_switches_per_req,
        "cpu_us_per_chunk": r.cpu_us_per_chunk,
        "mock_cpu_us_per_req": r.mock_cpu_us_per_req,
        "client_cpu_us_per_req": r.client_cpu_us_per_req,
        "peak_rss_mib": r.peak_rss_mib,
        "bytes_per_response": r.bytes_per_response,
    })
}

struct Ratio {
    phase: &'static str,
    versus: &'static str,
    rps: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    cpu: Option<f64>,
    /// User-space CPU per request: what each proxy's own code costs, without the kernel's
    /// share, which is about the same for all of them.
    user: Option<f64>,
}

fn ratios(results: &[PhaseResult]) -> Vec<Ratio> {
    let find = |target: &str, phase: &str| {
        results
            .iter()
            .find(|r| r.target == target && r.phase == phase)
    };
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mut all = Vec::new();
    for versus in ["passthrough", "nginx"] {
        for spec in &PHASES {
            let (Some(t), Some(v)) = (find("tollgate", spec.name), find(versus, spec.name)) else {
                continue;
            };
            all.push(Ratio {
                phase: spec.name,
                versus,
                rps: div(Some(t.rps), Some(v.rps)),
                p50: div(t.p50_us, v.p50_us),
                p99: div(t.p99_us, v.p99_us),
                cpu: div(t.cpu_us_per_req, v.cpu_us_per_req),
                user: div(t.user_us_per_req, v.user_us_per_req),
            });
        }
    }
    all
}

fn ratios_json(results: &[PhaseResult]) -> Value {
    Value::Array(
        ratios(results)
            .iter()
            .map(|r| {
                json!({
                    "tollgate_over": r.versus,
                    "phase": r.phase,
                    "req_per_s": r.rps,
                    "p50": r.p50,
                    "p99": r.p99,
                    "cpu_per_req": r.cpu,
                    "user_per_req": r.user,
                })
            })
            .collect(),
    )
}

fn render_table(
    results: &[PhaseResult],
    skipped: &[(&str, String)],
    long: bool,
    expected_stream_bytes: usize,
) -> String {
    let num = |v: Option<f64>, decimals: usize| match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".to_owned(),
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\n{:<12} {:<15} {:>5} {:>9} {:>8} {:>8} {:>9} {:>7} {:>7} {:>7} {:>10} {:>8} {:>6}",
        "target",
        "phase",
        "conns",
        "req/s",
        "p50 µs",
        "p99 µs",
        "CPU µs/req",
        "user",
        "ledger",
        "preempt",
        "µs/chunk",
        "RSS MiB",
        "errors"
    );
    let _ = writeln!(t, "{}", "-".repeat(125));
    for r in results {
        let _ = writeln!(
            t,
            "{:<12} {:<15} {:>5} {:>9.0} {:>8} {:>8} {:>10} {:>7} {:>7} {:>7} {:>10} {:>8} {:>6}",
            r.target,
            r.phase,
            r.connections,
            r.rps,
            num(r.p50_us, 0),
            num(r.p99_us, 0),
            num(r.cpu_us_per_req, 1),
            num(r.user_us_per_req, 1),
            num(r.ledger_us_per_req, 1),
            num(r.involuntary_switches_per_req, 2),
            num(r.cpu_us_per_chunk, 2),
            num(r.peak_rss_mib, 1),
            r.errors,
        );
    }
    for (target, why) in skipped {
        let _ = writeln!(t, "{target:<12} SKIPPED: {why}");
    }
    let _ = writeln!(
        t,
        "\nstream rows: p50/p99 are the time to the first body byte; µs/chunk = CPU per request / {SSE_CHUNKS}.\n\
         CPU and RSS (peak, VmHWM) are the proxy's process tree (nginx: master + workers, summed); `user` is its\n\
         user-space part (the rest is the kernel's: sockets, epoll), `ledger` the part spent by tollgate's ledger\n\
         thread, `preempt` its threads' involuntary context switches per request (preempted by the client or the\n\
         mock on the shared cores; voluntary ones are in the JSON); `direct` is the load generator straight to the mock (no proxy), the ceiling of this machine."
    );
    for r in results.iter().filter(|r| r.stream && r.requests > 0) {
        if (r.bytes_per_response - expected_stream_bytes as f64).abs() > 0.5 {
            let _ = writeln!(
                t,
                "note: {} delivered {:.0} bytes per stream, the mock's stream without usage is {} \
                 (the usage chunk tollgate asked for was not taken out)",
                r.target, r.bytes_per_response, expected_stream_bytes
            );
        }
    }
    let all = ratios(results);
    if !all.is_empty() {
        let _ = writeln!(
            t,
            "\n{:<22} {:<15} {:>8} {:>8} {:>8} {:>10} {:>9}",
            "ratio", "phase", "req/s", "p50", "p99", "CPU/req", "user/req"
        );
        let _ = writeln!(t, "{}", "-".repeat(86));
        for r in &all {
            let _ = writeln!(
                t,
                "{:<22} {:<15} {:>8} {:>8} {:>8} {:>10} {:>9}",
                format!("tollgate/{}", r.versus),
                r.phase,
                num(r.rps, 2),
                num(r.p50, 2),
                num(r.p99, 2),
                num(r.cpu, 2),
                num(r.user, 2),
            );
        }
    }
    if !long {
        let _ = writeln!(
            t,
            "\nlong RSS-flatness phase: off (TOLLGATE_BENCH_LONG=1 runs 1,000,000 requests to tollgate)"
        );
    }
    t.push('\n');
    t
}
