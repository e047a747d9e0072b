//! Durability of the real binary: what the usage ledger holds across a graceful restart, a
//! SIGTERM in the middle of a stream or of a load, a stream cut by the shutdown grace, a
//! SIGKILL under load, and a restart with a spent budget.
//!
//! Each test runs `tollgate serve` as a child process on free 127.0.0.1 ports, with its config
//! and ledger in a temporary directory of its own, in front of the in-process mock upstream.
//! The mock's `reported()` (the usage it actually sent) is the truth the ledger is held to.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs::File;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use common::harness::{client, request, sha256_hex, Answer, ADMIN_TOKEN, REAL_KEY};
use common::mock_upstream::{MockUpstream, Reported};
use tollgate::store::{Ledger, ReportQuery, UsageDelta};

const PROJECT: &str = "durable";
const TOKEN: &str = "tg-test-durable-svc";
/// Env vars the child reads its secrets from; named for this file so nothing else sets them.
const KEY_ENV: &str = "TOLLGATE_TEST_DURABLE_OPENAI_KEY";
const ADMIN_ENV: &str = "TOLLGATE_TEST_DURABLE_ADMIN_TOKEN";
const PRICING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pricing.toml");

const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// `[server] shutdown_grace_ms`: shorter than `EXIT_DEADLINE`, so a drain stuck on a
/// connection still ends in time, and shows up as `GRACE_EXPIRED` in the log.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const EXIT_DEADLINE: Duration = Duration::from_secs(10);
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// No request of these tests takes more than a fraction of this: past it, tollgate hangs.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// What tollgate logs when the drain had to cut connections: a graceful stop with nothing
/// stuck must never print it.
const GRACE_EXPIRED: &str = "connections still open after the grace period";

/// A request the client saw complete more than this before the SIGKILL must be in the ledger:
/// the flush interval, plus 300 ms for scheduling the writer thread and its SQLite commit on a
/// noisy 2-core machine under the test's own load. This is the tested form of the README's "a
/// crash loses at most one flush interval".
const LOSS_WINDOW: Duration = Duration::from_millis(200 + 300);

const BIG_BUDGET: &str = r#"{ tokens = 100000000, usd = 1000.0, period = "monthly" }"#;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

// ---------------------------------------------------------------------------------------------
// The child process

/// A `tollgate serve` child. Dropping it kills (SIGKILL) and reaps it, so a failed test
/// leaves no process behind.
struct Tollgate {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

/// The ledger every start in `dir` shares; its directory is left for tollgate to create.
fn ledger_path(dir: &Path) -> PathBuf {
    dir.join("ledger/tollgate.db")
}

fn config_text(
    proxy: SocketAddr,
    admin: SocketAddr,
    dir: &Path,
    upstream: &str,
    budget: &str,
    grace: Duration,
) -> String {
    format!(
        r#"
[server]
listen = "{proxy}"
shutdown_grace_ms = {grace}

[admin]
listen = "{admin}"
token_env = "{ADMIN_ENV}"

[upstream]
base_url = "{upstream}"

[pricing]
file = {pricing:?}

[store]
path = {ledger:?}
flush_interval_ms = {flush}

[[projects]]
name = "{PROJECT}"
api_key_env = "{KEY_ENV}"
budget = {budget}

[[projects.credentials]]
name = "svc"
token_sha256 = "{hash}"
"#,
        grace = grace.as_millis(),
        pricing = PRICING,
        ledger = ledger_path(dir).display().to_string(),
        flush = FLUSH_INTERVAL.as_millis(),
        hash = sha256_hex(TOKEN),
    )
}

/// Two ports that were free a moment ago: bound on port 0, read, released. Another process
/// may take one before tollgate binds it; `Tollgate::start` retries once for that.
fn free_ports() -> (SocketAddr, SocketAddr) {
    let proxy = StdListener::bind("127.0.0.1:0").unwrap();
    let admin = StdListener::bind("127.0.0.1:0").unwrap();
    (proxy.local_addr().unwrap(), admin.local_addr().unwrap())
}

impl Tollgate {
    /// Starts tollgate with its config and ledger in `dir` and waits until `/readyz` is 200.
    async fn start(dir: &Path, upstream: &str, budget: &str) -> Tollgate {
        Tollgate::start_with_grace(dir, upstream, budget, SHUTDOWN_GRACE).await
    }

    /// `start`, with `[server] shutdown_grace_ms` set to `grace`.
    async fn start_with_grace(
        dir: &Path,
        upstream: &str,
        budget: &str,
        grace: Duration,
    ) -> Tollgate {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (proxy, admin) = free_ports();
            let name = format!("tollgate-{}", proxy.port());
            let config = dir.join(format!("{name}.toml"));
            std::fs::write(
                &config,
                config_text(proxy, admin, dir, upstream, budget, grace),
            )
            .unwrap();
            let log = dir.join(format!("{name}.log"));
            let out = File::create(&log).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .arg("serve")
                .arg("--config")
                .arg(&config)
                .env_remove("TOLLGATE_CONFIG")
                .env(KEY_ENV, REAL_KEY)
                .env(ADMIN_ENV, ADMIN_TOKEN)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap();
            let mut tollgate = Tollgate {
                child,
                proxy,
                admin,
                log,
            };
            match tollgate.wait_ready().await {
                Ok(()) => return tollgate,
                Err(status) => {
                    let log = tollgate.log_text();
                    if attempt == 1 && log.contains("cannot listen on") {
                        // Someone took a port between `free_ports` and the bind.
                        continue;
                    }
                    panic!("tollgate exited with {status} before it was ready; its log:\n{log}");
                }
            }
        }
    }

    /// Polls `GET /readyz` until 200; `Err` with the exit status if the process ends first.
    async fn wait_ready(&mut self) -> Result<(), ExitStatus> {
        let client = client();
        let url = self.admin_url("/readyz");
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(status);
            }
            if let Ok(answer) = try_send(&client, Method::GET, &url, &[], Bytes::new()).await {
                if answer.status == StatusCode::OK {
                    return Ok(());
                }
            }
            assert!(
                Instant::now() < deadline,
                "tollgate not ready within {READY_DEADLINE:?}; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `SIGname` with kill(1): the crate has no libc binding and forbids unsafe code.
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tollgate did not exit within {EXIT_DEADLINE:?}; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then: exit 0 within `EXIT_DEADLINE`, and a drain that cut nothing.
    async fn stop(&mut self) {
        self.stop_with("TERM").await;
    }

    /// `stop` with another signal (SIGINT stops the same way).
    async fn stop_with(&mut self, signal: &str) {
        self.signal(signal);
        self.assert_stopped_cleanly().await;
    }

    async fn assert_stopped_cleanly(&mut self) {
        let status = self.wait_exit().await;
        let log = self.log_text();
        assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");
        assert!(
            !log.contains(GRACE_EXPIRED),
            "the drain cut connections:\n{log}"
        );
    }

    /// The project's entry in `GET /admin/projects`.
    async fn project(&self, client: &HttpClient) -> Value {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let answer = try_send(
            client,
            Method::GET,
            &self.admin_url("/admin/projects"),
            &[("authorization", &auth)],
            Bytes::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("GET /admin/projects: {e}"));
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let report = answer.json();
        report["projects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == PROJECT)
            .cloned()
            .unwrap_or_else(|| panic!("no project {PROJECT} in {report}"))
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

/// Why a request got no whole answer.
#[derive(Debug)]
enum Failure {
    /// No connection could be made: the request never reached tollgate.
    Connect(String),
    /// The connection failed or the body was cut (a process that went away), or the answer
    /// took longer than `REQUEST_DEADLINE`: tollgate may have served the request, or part of it.
    Reached(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(why) => write!(f, "cannot connect: {why}"),
            Failure::Reached(why) => write!(f, "no whole answer: {why}"),
        }
    }
}

/// Sends a request and reads the whole answer.
async fn try_send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Answer, Failure> {
    let exchange = async {
        let response = client
            .request(request(method, url, headers, body))
            .await
            .map_err(|e| {
                if e.is_connect() {
                    Failure::Connect(format!("{e:?}"))
                } else {
                    Failure::Reached(format!("{e:?}"))
                }
            })?;
        let (head, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| Failure::Reached(format!("{e:?}")))?
            .to_bytes();
        Ok(Answer {
            status: head.status,
            headers: head.headers,
            body,
        })
    };
    tokio::time::timeout(REQUEST_DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(Failure::Reached(format!(
                "no whole answer within {REQUEST_DEADLINE:?}"
            )))
        })
}

/// Reads `body` on to its end (`Ok`) or its first error (`Err`), appending to `into`; fails the
/// test when neither comes within `REQUEST_DEADLINE`.
async fn read_to_end(body: &mut Incoming, into: &mut Vec<u8>) -> Result<(), String> {
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("{e:?}"))?;
            if let Ok(data) = frame.into_data() {
                into.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    tokio::time::timeout(REQUEST_DEADLINE, read)
        .await
        .unwrap_or_else(|_| {
            panic!("the stream neither ended nor failed within {REQUEST_DEADLINE:?}")
        })
}

/// The usage the mock is told to answer with (`x-mock-usage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tokens {
    input: u64,
    output: u64,
    cached: u64,
    reasoning: u64,
}

impl Tokens {
    /// Plain input and output tokens, nothing cached, no reasoning.
    const fn plain(input: u64, output: u64) -> Tokens {
        Tokens {
            input,
            output,
            cached: 0,
            reasoning: 0,
        }
    }

    /// Varied, with cached and reasoning tokens on some requests.
    fn varied(n: u64) -> Tokens {
        let input = 20 + (n * 37) % 400;
        let output = 1 + (n * 11) % 120;
        Tokens {
            input,
            output,
            cached: if n.is_multiple_of(3) { input / 2 } else { 0 },
            reasoning: if n.is_multiple_of(5) { output / 3 } else { 0 },
        }
    }

    fn total(&self) -> u64 {
        self.input + self.output
    }

    fn header(&self) -> String {
        format!(
            "{},{},{},{}",
            self.input, self.output, self.cached, self.reasoning
        )
    }

    fn add(&mut self, other: &Tokens) {
        self.input += other.input;
        self.output += other.output;
        self.cached += other.cached;
        self.reasoning += other.reasoning;
    }
}

/// How a chat completion is asked for.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Json,
    /// Streamed, without asking for usage: tollgate asks the upstream for it and removes it.
    Stream,
    /// Streamed, asking for usage: the upstream's stream byte for byte.
    StreamWithUsage,
}

const SHAPES: [Shape; 3] = [Shape::Json, Shape::Stream, Shape::StreamWithUsage];

fn chat_body(shape: Shape) -> Bytes {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 50,
    });
    match shape {
        Shape::Json => {}
        Shape::Stream => body["stream"] = json!(true),
        Shape::StreamWithUsage => {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    Bytes::from(body.to_string())
}

fn chat_headers<'a>(auth: &'a str, usage: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("authorization", auth),
        ("content-type", "application/json"),
        ("x-mock-usage", usage),
    ]
}

async fn chat(
    client: &HttpClient,
    base: &str,
    tokens: Tokens,
    shape: Shape,
) -> Result<Answer, Failure> {
    let auth = format!("Bearer {TOKEN}");
    let usage = tokens.header();
    try_send(
        client,
        Method::POST,
        &format!("{base}/v1/chat/completions"),
        &chat_headers(&auth, &usage),
        chat_body(shape),
    )
    .await
}

/// Asserts a whole, successful chat answer carrying `tokens` where the client can see them.
fn assert_complete(answer: &Answer, shape: Shape, tokens: Tokens) {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let text = answer.text();
    match shape {
        Shape::Json => assert_eq!(answer.json()["usage"]["total_tokens"], tokens.total()),
        Shape::Stream => {
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            assert!(!text.contains("\"usage\":{"), "{text}");
        }
        Shape::StreamWithUsage => {
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            let total = format!("\"total_tokens\":{}", tokens.total());
            assert!(text.contains(&total), "{text}");
        }
    }
}

/// Sends chat completions `n` for `n` in `range`, `concurrency` at a time, all of which must
/// succeed whole; returns the usage they asked for.
async fn send_batch(
    client: &HttpClient,
    base: &str,
    range: Range<u64>,
    concurrency: usize,
) -> Tokens {
    let all: Vec<u64> = range.collect();
    let mut sent = Tokens::default();
    for wave in all.chunks(concurrency) {
        let tasks: Vec<_> = wave
            .iter()
            .map(|&n| {
                let (client, base) = (client.clone(), base.to_owned());
                tokio::spawn(async move {
                    let tokens = Tokens::varied(n);
                    let shape = SHAPES[(n % 3) as usize];
                    let answer = chat(&client, &base, tokens, shape).await.unwrap();
                    assert_complete(&answer, shape, tokens);
                    tokens
                })
            })
            .collect();
        for task in tasks {
            sent.add(&task.await.unwrap());
        }
    }
    sent
}

/// Starts a streamed chat completion whose upstream pauses `stall_ms` in its third event, and
/// reads up to the pause: returns the rest of the body and what arrived so far. Tollgate holds
/// the request in flight when this returns.
async fn stalled_stream(
    client: &HttpClient,
    tollgate: &Tollgate,
    tokens: Tokens,
    chunks: usize,
    stall_ms: u64,
) -> (Incoming, Vec<u8>) {
    let auth = format!("Bearer {TOKEN}");
    let usage = tokens.header();
    let chunks = chunks.to_string();
    let stall_ms = stall_ms.to_string();
    let mut headers = chat_headers(&auth, &usage);
    // The events are 300 to 360 bytes long: the stall falls inside the third, after two whole
    // events that tollgate forwards at once (it holds back only a partial event).
    headers.extend([
        ("x-mock-chunks", chunks.as_str()),
        ("x-mock-stall-after", "700"),
        ("x-mock-stall-ms", stall_ms.as_str()),
    ]);
    let response = tokio::time::timeout(
        REQUEST_DEADLINE,
        client.request(request(
            Method::POST,
            &tollgate.url("/v1/chat/completions"),
            &headers,
            chat_body(Shape::Stream),
        )),
    )
    .await
    .expect("response headers in time")
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = Vec::new();
    while received.is_empty() {
        let frame = tokio::time::timeout(REQUEST_DEADLINE, body.frame())
            .await
            .expect("the first events in time")
            .expect("a first frame")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
    }
    let first = String::from_utf8_lossy(&received).into_owned();
    assert!(
        first.starts_with("data: {") && !first.contains("[DONE]"),
        "{first}"
    );
    let project = tollgate.project(client).await;
    assert_eq!(project["in_flight"], 1, "{project}");
    (body, received)
}

// ---------------------------------------------------------------------------------------------
// What the ledger, the upstream and the admin API say

/// Everything the ledger holds, over all days and keys, read as `tollgate usage` reads it.
fn ledger_total(dir: &Path) -> UsageDelta {
    let ledger = Ledger::open_read_only(&ledger_path(dir)).unwrap();
    let rows = ledger.report(&ReportQuery::default()).unwrap();
    let mut total = UsageDelta::default();
    for row in &rows {
        total.add(&row.usage);
    }
    total
}

fn assert_ledger_is(ledger: &UsageDelta, reported: &Reported, context: &str) {
    assert_eq!(
        (
            ledger.requests,
            ledger.input_tokens,
            ledger.cached_input_tokens,
            ledger.output_tokens,
            ledger.reasoning_tokens,
        ),
        (
            reported.requests_with_usage,
            reported.input_tokens,
            reported.cached_input_tokens,
            reported.output_tokens,
            reported.reasoning_tokens,
        ),
        "{context}: the ledger {ledger:?} against what the upstream reported {reported:?}"
    );
}

fn assert_reported_is(reported: &Reported, requests: u64, sent: &Tokens) {
    assert_eq!(
        (
            reported.requests_with_usage,
            reported.input_tokens,
            reported.output_tokens,
            reported.cached_input_tokens,
            reported.reasoning_tokens,
        ),
        (
            requests,
            sent.input,
            sent.output,
            sent.cached,
            sent.reasoning
        ),
        "the mock must have answered with the usage the test asked for"
    );
}

/// Asserts `/admin/projects` shows `ledger` as this period's spend, nothing reserved.
fn assert_spent_is(project: &Value, ledger: &UsageDelta, context: &str) {
    let spent = &project["spent"];
    let shown = (
        spent["requests"].as_u64(),
        spent["tokens"].as_u64(),
        spent["input_tokens"].as_u64(),
        spent["cached_input_tokens"].as_u64(),
        spent["output_tokens"].as_u64(),
        spent["reasoning_tokens"].as_u64(),
        spent["usd"].as_f64(),
    );
    let expected = (
        Some(ledger.requests),
        Some(ledger.tokens()),
        Some(ledger.input_tokens),
        Some(ledger.cached_input_tokens),
        Some(ledger.output_tokens),
        Some(ledger.reasoning_tokens),
        // The same division the admin API does: equal to the last bit.
        Some(ledger.micro_usd as f64 / 1_000_000.0),
    );
    assert_eq!(shown, expected, "{context}: {project}");
    assert_eq!(project["reserved"]["tokens"], 0, "{context}: {project}");
    assert_eq!(project["in_flight"], 0, "{context}: {project}");
}

// ---------------------------------------------------------------------------------------------
// Load

/// What one load worker saw of one request.
enum Outcome {
    /// The whole answer arrived at `at`.
    Completed { at: Instant, tokens: Tokens },
    /// The request was sent on a connection to tollgate, but its answer never arrived whole
    /// (the process stopped or died under it): tollgate and the upstream may have served it.
    Failed { tokens: Tokens },
    /// No connection: tollgate was gone, and the request went nowhere.
    Refused,
}

/// Workers that each send chat completions one after the other, on a keep-alive connection of
/// their own, until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(base: &str, workers: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|worker| {
                let (stop, base) = (stop.clone(), base.to_owned());
                tokio::spawn(async move {
                    let client = client();
                    let mut outcomes = Vec::new();
                    let mut n = worker * 1_000_000;
                    // Relaxed: a stop flag; the outcomes come back through the join.
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let tokens = Tokens::varied(n);
                        let shape = SHAPES[(n % 3) as usize];
                        outcomes.push(match chat(&client, &base, tokens, shape).await {
                            Ok(answer) => {
                                // Whatever tollgate answers must be whole and right.
                                assert_complete(&answer, shape, tokens);
                                Outcome::Completed {
                                    at: Instant::now(),
                                    tokens,
                                }
                            }
                            Err(Failure::Reached(_)) => Outcome::Failed { tokens },
                            Err(Failure::Connect(_)) => Outcome::Refused,
                        });
                    }
                    outcomes
                })
            })
            .collect();
        Load { stop, workers }
    }

    /// Stops the workers and returns what they saw.
    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut outcomes = Vec::new();
        for worker in self.workers {
            outcomes.extend(worker.await.unwrap());
        }
        outcomes
    }
}

/// Requests and tokens, for the bounds under load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sum {
    requests: u64,
    tokens: u64,
}

impl Sum {
    fn add(&mut self, tokens: &Tokens) {
        self.requests += 1;
        self.tokens += tokens.total();
    }

    /// Both counts at most `other`'s.
    fn within(self, other: Sum) -> bool {
        self.requests <= other.requests && self.tokens <= other.tokens
    }

    fn plus(self, other: Sum) -> Sum {
        Sum {
            requests: self.requests + other.requests,
            tokens: self.tokens + other.tokens,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_loses_nothing() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = client();

    let mut first = Tollgate::start(dir.path(), &mock.base_url(), BIG_BUDGET).await;
    let sent = send_batch(&client, &first.url(""), 0..200, 25).await;
    assert_reported_is(&mock.reported(), 200, &sent);
    first.stop().await;
    drop(first);

    let ledger = ledger_total(dir.path());
    assert_ledger_is(&ledger, &mock.reported(), "after a graceful stop");
    assert!(ledger.micro_usd > 0, "{ledger:?}");

    // The restart resumes exactly where the ledger is.
    let mut second = Tollgate::start(dir.path(), &mock.base_url(), BIG_BUDGET).await;
    assert_spent_is(&second.project(&client).await, &ledger, "after the restart");

    // And adds to it.
    let more = send_batch(&client, &second.url(""), 200..260, 10).await;
    let mut all = sent;
    all.add(&more);
    let reported = mock.reported();
    assert_reported_is(&reported, 260, &all);
    let project = second.project(&client).await;
    assert_eq!(project["spent"]["requests"], 260, "{project}");
    assert_eq!(project["spent"]["tokens"], all.total(), "{project}");
    second.stop_with("INT").await;

    let ledger = ledger_total(dir.path());
    assert_ledger_is(&ledger, &reported, "after a stop by SIGINT");
    assert_spent_is(&project, &ledger, "the second run against its ledger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    // SIGTERM is sent within the stream's pause, and the pause is also the time the process
    // has to close its listener while the stream is still owed: generous, so a slow machine
    // does not fail the "still draining" check.
    const STALL_MS: u64 = 2000;
    const CHUNKS: usize = 10;
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = client();
    let mut tollgate = Tollgate::start(dir.path(), &mock.base_url(), BIG_BUDGET).await;

    let tokens = Tokens::plain(321, 123);
    let (mut body, mut received) =
        stalled_stream(&client, &tollgate, tokens, CHUNKS, STALL_MS).await;

    tollgate.signal("TERM");
    // It stops accepting at once, and keeps running while the stream is owed.
    let deadline = Instant::now() + EXIT_DEADLINE;
    while tokio::net::TcpStream::connect(tollgate.proxy).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        tollgate.child.try_wait().unwrap().is_none(),
        "tollgate exited with a request in flight; its log:\n{}",
        tollgate.log_text()
    );

    read_to_end(&mut body, &mut received)
        .await
        .expect("the in-flight stream must not be cut by the shutdown");
    let text = String::from_utf8(received).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(
        text.matches("data: ").count(),
        1 + CHUNKS + 1 + 1,
        "the role chunk, the content chunks, the final chunk, [DONE]: {text}"
    );
    assert!(!text.contains("\"usage\":{"), "{text}");

    tollgate.assert_stopped_cleanly().await;
    let ledger = ledger_total(dir.path());
    assert_reported_is(&mock.reported(), 1, &tokens);
    assert_ledger_is(
        &ledger,
        &mock.reported(),
        "the request finished during the drain",
    );
}

/// A graceful stop in the middle of a load: every request either finishes and is counted, or
/// never reaches the upstream; the ledger equals what the upstream reported, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing() {
    const WORKERS: u64 = 8;
    const LOAD: Duration = Duration::from_millis(1000);
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut tollgate = Tollgate::start(dir.path(), &mock.base_url(), BIG_BUDGET).await;

    let load = Load::start(&tollgate.url(""), WORKERS);
    // The load's duration, not a wait for background work.
    tokio::time::sleep(LOAD).await;
    tollgate.stop().await;
    let outcomes = load.finish().await;

    let mut completed = Sum::default();
    let mut failed = Sum::default();
    for outcome in &outcomes {
        match outcome {
            Outcome::Completed { tokens, .. } => completed.add(tokens),
            Outcome::Failed { tokens } => failed.add(tokens),
            Outcome::Refused => {}
        }
    }
    let reported = mock.reported();
    let upstream = Sum {
        requests: reported.requests_with_usage,
        tokens: reported.input_tokens + reported.output_tokens,
    };
    assert!(completed.requests > 0, "no load ran");
    assert!(
        completed.within(upstream) && upstream.within(completed.plus(failed)),
        "completed {completed:?}, failed {failed:?}, upstream {upstream:?}"
    );
    assert_ledger_is(
        &ledger_total(dir.path()),
        &reported,
        "after a graceful stop under load",
    );
}

/// A stream that outlasts `shutdown_grace_ms` is cut when the grace runs out. The README
/// charges a cut stream its input estimate plus one output token per event seen, and that
/// charge must reach the ledger like any other: otherwise a restart gives it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_the_shutdown_grace_is_still_charged() {
    const GRACE: Duration = Duration::from_millis(500);
    const CHUNKS: usize = 10;
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = client();
    let mut tollgate =
        Tollgate::start_with_grace(dir.path(), &mock.base_url(), BIG_BUDGET, GRACE).await;

    // The upstream pauses far longer than the grace (and `EXIT_DEADLINE`).
    let tokens = Tokens::plain(321, 123);
    let (mut body, mut received) = stalled_stream(&client, &tollgate, tokens, CHUNKS, 60_000).await;
    tollgate.signal("TERM");
    let cut = read_to_end(&mut body, &mut received).await.is_err();
    let text = String::from_utf8_lossy(&received).into_owned();
    assert!(
        cut && !text.contains("[DONE]"),
        "the stream must be cut: {text}"
    );
    let status = tollgate.wait_exit().await;
    let log = tollgate.log_text();
    assert_eq!(status.code(), Some(0), "{status}; log:\n{log}");
    assert!(log.contains(GRACE_EXPIRED), "{log}");
    assert_eq!(
        mock.reported(),
        Reported::default(),
        "the usage was never sent"
    );

    let ledger = ledger_total(dir.path());
    let events = ledger.output_tokens;
    assert_eq!(
        ledger.requests, 1,
        "the cut request is not in the ledger: {ledger:?}; log:\n{log}"
    );
    assert_eq!(
        ledger.input_tokens,
        chat_body(Shape::Stream).len() as u64,
        "charged its input estimate: {ledger:?}"
    );
    assert!(
        (1..=CHUNKS as u64 + 2).contains(&events),
        "one output token per event seen: {ledger:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_at_most_one_flush_interval() {
    const WORKERS: u64 = 8;
    const LOAD: Duration = Duration::from_millis(1500);
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut tollgate = Tollgate::start(dir.path(), &mock.base_url(), BIG_BUDGET).await;

    let load = Load::start(&tollgate.url(""), WORKERS);
    // The load's duration, not a wait for background work.
    tokio::time::sleep(LOAD).await;
    // Taken before the signal is sent: the process dies after this instant, so the window
    // before it is never shorter than `LOSS_WINDOW` before the real death.
    let killed_at = Instant::now();
    tollgate.signal("KILL");
    let status = tollgate.wait_exit().await;
    assert_eq!(status.signal(), Some(9), "{status}");
    let outcomes = load.finish().await;

    let cutoff = killed_at - LOSS_WINDOW;
    // Completed before the window: must be in the ledger.
    let mut settled_long_ago = Sum::default();
    // Completed within the window (or after the kill, from bytes already sent): may be lost.
    let mut recent = Sum::default();
    // Sent on a connection to tollgate and never completed (about one per worker: the one the
    // kill broke): the upstream may have reported them, and tollgate may or may not have
    // settled them.
    let mut in_flight = Sum::default();
    for outcome in &outcomes {
        match outcome {
            Outcome::Completed { at, tokens } if *at < cutoff => settled_long_ago.add(tokens),
            Outcome::Completed { tokens, .. } => recent.add(tokens),
            Outcome::Failed { tokens } => in_flight.add(tokens),
            Outcome::Refused => {}
        }
    }
    let reported = mock.reported();
    let upstream = Sum {
        requests: reported.requests_with_usage,
        tokens: reported.input_tokens + reported.output_tokens,
    };
    let ledger = ledger_total(dir.path());
    let written = Sum {
        requests: ledger.requests,
        tokens: ledger.tokens(),
    };
    let context = format!(
        "ledger {written:?}, upstream {upstream:?}, completed before the window \
         {settled_long_ago:?}, within it {recent:?}, in flight {in_flight:?}"
    );

    assert!(
        settled_long_ago.requests > 0,
        "the load must outlast the window for the test to mean anything: {context}"
    );
    assert!(
        upstream.within(settled_long_ago.plus(recent).plus(in_flight)),
        "the upstream reported requests nobody sent: {context}"
    );
    assert!(written.requests > 0, "no flush happened: {context}");
    // Nothing counted twice, nothing invented.
    assert!(written.within(upstream), "{context}");
    assert!(ledger.input_tokens <= reported.input_tokens, "{context}");
    assert!(ledger.output_tokens <= reported.output_tokens, "{context}");
    // Every request that completed more than a window before the kill was written.
    assert!(
        settled_long_ago.within(written),
        "lost requests older than the window: {context}"
    );
    // What was lost is at most the window's requests and those in flight at the kill.
    let lost = Sum {
        requests: upstream.requests - written.requests,
        tokens: upstream.tokens - written.tokens,
    };
    assert!(
        lost.within(recent.plus(in_flight)),
        "lost {lost:?}, more than the window and the in-flight requests: {context}"
    );

    // A restart after the crash resumes from what the ledger holds.
    let mut restarted = Tollgate::start(dir.path(), &mock.base_url(), BIG_BUDGET).await;
    assert_spent_is(
        &restarted.project(&client()).await,
        &ledger,
        "after a restart from a crash",
    );
    restarted.stop().await;
    assert_eq!(
        ledger_total(dir.path()),
        ledger,
        "an idle run writes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_budget_spent() {
    const BUDGET: &str = r#"{ tokens = 500, period = "monthly" }"#;
    // Each request reserves 137 tokens (its body's 87 bytes plus `max_tokens`) and is charged
    // 150: the third fits (300 + 137 <= 500), the fourth does not (450 + 137 > 500).
    let tokens = Tokens::plain(100, 50);
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = client();
    let mut first = Tollgate::start(dir.path(), &mock.base_url(), BUDGET).await;

    let mut admitted = 0u64;
    loop {
        let answer = chat(&client, &first.url(""), tokens, Shape::Json)
            .await
            .unwrap();
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(answer.error(429)["code"], "project_spend_limit_exceeded");
            break;
        }
        assert_complete(&answer, Shape::Json, tokens);
        admitted += 1;
        assert!(admitted <= 3, "a 500-token budget admitted {admitted}");
    }
    assert_eq!(admitted, 3);
    let spent = admitted * tokens.total();
    assert_eq!(first.project(&client).await["spent"]["tokens"], spent);
    first.stop().await;
    drop(first);
    assert_eq!(ledger_total(dir.path()).tokens(), spent);

    let mut second = Tollgate::start(dir.path(), &mock.base_url(), BUDGET).await;
    let answer = chat(&client, &second.url(""), tokens, Shape::Json)
        .await
        .unwrap();
    let error = answer.error(429);
    assert_eq!(error["type"], "insufficient_quota", "{error}");
    assert_eq!(error["code"], "project_spend_limit_exceeded", "{error}");
    assert_eq!(answer.headers["x-should-retry"], "false");
    assert_eq!(
        mock.requests().len() as u64,
        admitted,
        "the refused request must not reach the upstream"
    );
    let project = second.project(&client).await;
    assert_eq!(project["spent"]["tokens"], spent, "{project}");
    assert_eq!(project["remaining"]["tokens"], 500 - spent, "{project}");
    second.stop().await;
    assert_eq!(ledger_total(dir.path()).tokens(), spent);
}

/// The request log is batched per runtime worker (see `logging`): a line still reaches the
/// output as soon as the worker runs out of work, and after a load and a graceful stop every
/// request has its one whole line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_logged_whole_and_promptly() {
    let tokens = Tokens::plain(100, 50);
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = client();
    let mut tollgate = Tollgate::start(dir.path(), &mock.base_url(), BIG_BUDGET).await;
    let request_lines = |log: &str| {
        log.lines()
            .filter(|line| line.contains(" request ") && line.contains("status="))
            .count()
    };

    // One request on an idle proxy: its line is out well before any batch would fill.
    let answer = chat(&client, &tollgate.url(""), tokens, Shape::Json)
        .await
        .unwrap();
    assert_complete(&answer, Shape::Json, tokens);
    let deadline = Instant::now() + Duration::from_secs(2);
    while request_lines(&tollgate.log_text()) < 1 {
        assert!(
            Instant::now() < deadline,
            "the request's line is not in the log after 2 s:\n{}",
            tollgate.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let sent = send_batch(&client, &tollgate.url(""), 0..400, 25).await;
    assert_reported_is(&mock.reported(), 401, &{
        let mut all = sent;
        all.add(&tokens);
        all
    });
    tollgate.stop().await;
    let log = tollgate.log_text();
    assert_eq!(request_lines(&log), 401, "{log}");
    for line in log.lines() {
        // Each line is one whole event: a timestamp, a level, and nothing glued after it.
        assert!(
            line.starts_with("20")
                && line.matches(" INFO ").count() + line.matches(" WARN ").count() <= 1,
            "a torn or merged line: {line:?}"
        );
    }
}
