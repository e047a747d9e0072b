//! The official OpenAI SDKs, Python and Node, pointed at tollgate the way an application is: base
//! URL `http://127.0.0.1:PORT/v1`, an internal token as API key. Each test starts the mock
//! upstream and tollgate in-process, runs one SDK script over every case in one process (one
//! interpreter start, the slow part), then checks tollgate's side of each case: what reached the
//! mock, with which key, and the counters.
//!
//! Every case has a tollgate project and token of its own, named after it, and its client sends
//! `x-sdk-case: NAME`, so the mock's records and the per-project counters can be read per case
//! although the cases share one proxy. A failure names the SDK and the case.
//!
//! The SDKs come from `scripts/sdk-env.sh` (a venv in `target/sdk-venv`, `tests/sdk/node_modules`).
//! Local runs call it once per test binary: it is idempotent and takes a second when nothing
//! changed, so a fresh checkout or a changed pin just works. Under `CI=true` the tests install
//! nothing: they run `scripts/sdk-env.sh --check` and fail, saying to run `scripts/sdk-env.sh`,
//! when the SDKs are missing or stale, so that CI's install step stays visible in `.ci/run`.
//!
//! Nothing leaves the machine: the scripts get the proxy's 127.0.0.1 URL and refuse any other,
//! every `OPENAI_*` and proxy variable of the parent is removed from the child's environment.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::harness::*;
use common::mock_upstream::{MockUpstream, Recorded};
use http::StatusCode;
use serde_json::{json, Value};

/// Every case, in the order the scripts run them; `tests/sdk/check.py` and `check.mjs` have one
/// function each of these names.
const CASES: [&str; 13] = [
    "chat",
    "chat_stream",
    "chat_stream_helper",
    "responses",
    "responses_stream",
    "responses_stream_helper",
    "embeddings",
    "models",
    "files",
    "bad_token",
    "model_not_allowed",
    "budget_exceeded",
    "upstream_500",
];

/// The case whose token is in no project.
const UNKNOWN_TOKEN_CASE: &str = "bad_token";
/// The case whose project has spent its budget before the script runs.
const SPENT_CASE: &str = "budget_exceeded";
const SPENT_LIMIT: u64 = 1000;
/// What the mock reports for every request unless told otherwise: 12 input + 9 output tokens.
const MOCK_INPUT_TOKENS: u64 = 12;
const MOCK_TOTAL_TOKENS: u64 = 12 + 9;
/// The file the `files` case uploads (the same bytes as `BATCH_LINE` in both scripts).
const BATCH_LINE: &str =
    "{\"custom_id\": \"sdk-1\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": {}}\n";
/// How long one script may run; the scripts stop themselves after 90 s.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug)]
enum Sdk {
    Python,
    Node,
}

impl Sdk {
    fn name(self) -> &'static str {
        match self {
            Sdk::Python => "python",
            Sdk::Node => "node",
        }
    }

    /// How the SDK names itself in `user-agent`, which tollgate passes through.
    fn user_agent_prefix(self) -> &'static str {
        match self {
            Sdk::Python => "OpenAI/Python ",
            Sdk::Node => "OpenAI/JS ",
        }
    }

    fn command(self) -> Command {
        let sdk_dir = root().join("tests/sdk");
        let mut command = match self {
            Sdk::Python => {
                let mut c = Command::new(root().join("target/sdk-venv/bin/python"));
                c.arg(sdk_dir.join("check.py"));
                c
            }
            Sdk::Node => {
                let mut c = Command::new("node");
                c.arg(sdk_dir.join("check.mjs"));
                c
            }
        };
        command.current_dir(sdk_dir);
        command
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn token(case: &str) -> String {
    format!("tg-sdk-{case}")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Makes sure the SDKs are installed, once per test binary (the other tests wait for the first).
fn sdk_env() -> &'static Result<String, String> {
    static ENV: OnceLock<Result<String, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let script = root().join("scripts/sdk-env.sh");
        let mut command = Command::new("bash");
        command.arg(&script);
        if in_ci() {
            command.arg("--check");
        }
        let output = command
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            Ok(text)
        } else if in_ci() {
            Err(format!(
                "the OpenAI SDKs are not installed (CI=true, so the tests install nothing): run \
                 `bash scripts/sdk-env.sh` before `cargo test` (in CI: in .ci/run)\n{text}"
            ))
        } else {
            Err(format!(
                "scripts/sdk-env.sh failed ({}):\n{text}",
                output.status
            ))
        }
    })
}

fn config(upstream: &str) -> String {
    let mut toml = format!(
        r#"
[admin]
token_env = "TOLLGATE_ADMIN_TOKEN"

[upstream]
base_url = "{upstream}"
request_timeout_ms = 10000
"#
    );
    for case in CASES.iter().filter(|c| **c != UNKNOWN_TOKEN_CASE) {
        let budget = if *case == SPENT_CASE {
            // `total`: a 429 without `retry-after`, so that only `x-should-retry: false` can stop
            // the SDKs' retries (a long `retry-after` alone stops the Python SDK's).
            format!(r#"{{ tokens = {SPENT_LIMIT}, period = "total" }}"#)
        } else {
            r#"{ tokens = 100000000, usd = 1000.0, period = "monthly" }"#.to_owned()
        };
        write!(
            toml,
            r#"
[[projects]]
name = "{case}"
api_key_env = "OPENAI_KEY"
allowed_models = ["gpt-4o-mini", "gpt-4.1*", "text-embedding-3-small"]
budget = {budget}

[[projects.credentials]]
name = "app"
token_sha256 = "{hash}"
"#,
            hash = sha256_hex(&token(case)),
        )
        .unwrap();
    }
    toml
}

/// Spends the whole budget of `SPENT_CASE` with one request whose reported usage is the limit.
async fn spend_the_budget(proxy: &TestProxy) {
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
    let usage = format!("{},10", SPENT_LIMIT - 10);
    let answer = post_json(
        proxy,
        "/v1/chat/completions",
        &token(SPENT_CASE),
        &body,
        &[("x-mock-usage", &usage)],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let report = proxy.admin_json("/admin/projects").await;
    let spent = project(&report, SPENT_CASE);
    assert_eq!(spent["remaining"]["tokens"], 0, "{spent}");
}

/// The child's environment: the parent's, less anything that could send a request elsewhere or
/// hand the SDK another key.
fn sanitize(command: &mut Command, base_url: &str, tokens: &BTreeMap<&str, String>) {
    for (name, _) in std::env::vars_os() {
        let upper = name.to_string_lossy().to_ascii_uppercase();
        if upper.starts_with("OPENAI_") || upper.ends_with("_PROXY") {
            command.env_remove(&name);
        }
    }
    command
        .env("OPENAI_BASE_URL", base_url)
        .env(
            "TOLLGATE_SDK_TOKENS",
            serde_json::to_string(tokens).unwrap(),
        )
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("PYTHONUNBUFFERED", "1");
}

/// Runs the script over every case, off the runtime's thread (the proxy and the mock run on it).
async fn run_script(sdk: Sdk, base_url: &str) -> (Output, Duration) {
    let tokens: BTreeMap<&str, String> = CASES.iter().map(|c| (*c, token(c))).collect();
    let mut command = sdk.command();
    command.args(CASES);
    sanitize(&mut command, base_url, &tokens);
    let started = Instant::now();
    let run = tokio::task::spawn_blocking(move || command.output());
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{}: check script still running after {SCRIPT_TIMEOUT:?}",
                sdk.name()
            )
        })
        .expect("the blocking task")
        .unwrap_or_else(|e| panic!("{}: cannot start the check script: {e}", sdk.name()));
    (output, started.elapsed())
}

fn project<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["projects"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no project {name} in {report}"))
}

/// The value of one series in the Prometheus text, 0 when the series is absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn header<'a>(request: &'a Recorded, name: &str) -> &'a str {
    request
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn json_body(request: &Recorded) -> Result<Value, String> {
    serde_json::from_slice(&request.body).map_err(|e| format!("forwarded body is not JSON: {e}"))
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// What one case looks like from tollgate's side.
struct Seen<'a> {
    sdk: Sdk,
    case: &'a str,
    /// The requests the mock received from this case's client.
    requests: Vec<Recorded>,
    /// This case's project in `/admin/projects` (null for the unknown token).
    project: &'a Value,
    metrics: &'a str,
}

impl Seen<'_> {
    fn spent(&self, field: &str) -> u64 {
        self.project["spent"][field].as_u64().unwrap_or(u64::MAX)
    }

    fn rejections(&self, project: &str, reason: &str) -> f64 {
        metric(
            self.metrics,
            &format!(r#"tollgate_rejections_total{{project="{project}",reason="{reason}"}}"#),
        )
    }

    /// `n` requests reached the mock, each on `path` with the real key and the SDK's own
    /// user-agent, and none carried an internal token.
    fn forwarded(&self, n: usize, path: &str) -> Result<(), String> {
        let paths: Vec<&str> = self.requests.iter().map(|r| r.path.as_str()).collect();
        check!(
            self.requests.len() == n,
            "the mock saw {} requests, expected {n}: {paths:?}",
            self.requests.len()
        );
        let key = format!("Bearer {REAL_KEY}");
        for request in &self.requests {
            check!(
                request.path == path,
                "forwarded to {}, expected {path}",
                request.path
            );
            check!(
                header(request, "authorization") == key,
                "the mock got authorization {:?}, not the real key",
                header(request, "authorization")
            );
            check!(
                !format!("{:?}", request.headers).contains("tg-sdk-"),
                "an internal token reached the upstream"
            );
            let agent = header(request, "user-agent");
            check!(
                agent.starts_with(self.sdk.user_agent_prefix()),
                "user-agent {agent:?} is not the SDK's"
            );
        }
        Ok(())
    }

    /// The project was charged exactly what the mock reported, for `requests` requests.
    fn charged(&self, requests: u64, tokens: u64) -> Result<(), String> {
        check!(
            self.spent("requests") == requests && self.spent("tokens") == tokens,
            "spent {} tokens in {} requests, expected {tokens} in {requests}: {}",
            self.spent("tokens"),
            self.spent("requests"),
            self.project
        );
        check!(
            self.project["reserved"]["tokens"] == 0 && self.project["in_flight"] == 0,
            "a reservation was left behind: {}",
            self.project
        );
        Ok(())
    }
}

/// tollgate's side of each case; the script has checked what the SDK saw.
fn check_tollgate_side(seen: &Seen<'_>) -> Result<(), String> {
    match seen.case {
        "chat" => {
            seen.forwarded(1, "/v1/chat/completions")?;
            seen.charged(1, MOCK_TOTAL_TOKENS)
        }
        "chat_stream" | "chat_stream_helper" => {
            seen.forwarded(1, "/v1/chat/completions")?;
            let body = json_body(&seen.requests[0])?;
            check!(
                body["stream"] == true && body["stream_options"]["include_usage"] == true,
                "tollgate did not ask the upstream for the stream's usage: {body}"
            );
            // Counted although the client never asked for usage (and never saw it).
            seen.charged(1, MOCK_TOTAL_TOKENS)
        }
        "responses" | "responses_stream" | "responses_stream_helper" => {
            seen.forwarded(1, "/v1/responses")?;
            let body = json_body(&seen.requests[0])?;
            check!(
                body.get("stream_options").is_none(),
                "a Responses request was rewritten: {body}"
            );
            seen.charged(1, MOCK_TOTAL_TOKENS)
        }
        "embeddings" => {
            seen.forwarded(1, "/v1/embeddings")?;
            let body = json_body(&seen.requests[0])?;
            check!(
                body["encoding_format"] == "base64",
                "the SDK's default base64 request did not pass unchanged: {body}"
            );
            check!(
                seen.spent("input_tokens") == MOCK_INPUT_TOKENS,
                "spent {} input tokens, expected {MOCK_INPUT_TOKENS}",
                seen.spent("input_tokens")
            );
            seen.charged(1, MOCK_INPUT_TOKENS)
        }
        "models" => {
            let paths: Vec<&str> = seen.requests.iter().map(|r| r.path.as_str()).collect();
            check!(
                paths == ["/v1/models", "/v1/models/gpt-4o-mini"],
                "forwarded {paths:?}; a model off the allowlist must be answered by tollgate"
            );
            check!(
                seen.spent("tokens") == 0,
                "listing models cost tokens: {}",
                seen.project
            );
            Ok(())
        }
        "files" => {
            seen.forwarded(1, "/v1/files")?;
            let request = &seen.requests[0];
            let content_type = header(request, "content-type");
            check!(
                content_type.starts_with("multipart/form-data; boundary="),
                "content-type {content_type:?}"
            );
            let body = String::from_utf8_lossy(&request.body);
            for part in [
                BATCH_LINE,
                "name=\"purpose\"",
                "batch",
                "filename=\"batch.jsonl\"",
            ] {
                check!(
                    body.contains(part),
                    "the multipart body lacks {part:?}: {body:?}"
                );
            }
            seen.charged(1, 0)
        }
        "bad_token" => {
            seen.forwarded(0, "")?;
            let n = seen.rejections("", "invalid_token");
            check!(
                n == 1.0,
                "invalid_token rejections: {n}, expected 1 (no retry)"
            );
            Ok(())
        }
        "model_not_allowed" => {
            seen.forwarded(0, "")?;
            let n = seen.rejections(seen.case, "model_not_allowed");
            check!(
                n == 1.0,
                "model_not_allowed rejections: {n}, expected 1 (no retry)"
            );
            seen.charged(0, 0)
        }
        "budget_exceeded" => {
            // tollgate answers the 429 itself: its rejection counter is the number of attempts.
            seen.forwarded(0, "")?;
            let n = seen.rejections(seen.case, "budget_exceeded");
            check!(
                n == 1.0,
                "budget_exceeded rejections: {n}, expected exactly 1 attempt (x-should-retry: false)"
            );
            seen.charged(1, SPENT_LIMIT)
        }
        "upstream_500" => {
            seen.forwarded(3, "/v1/chat/completions")?;
            let attempts: Vec<&str> = seen
                .requests
                .iter()
                .map(|r| header(r, "x-stainless-retry-count"))
                .collect();
            check!(
                attempts == ["0", "1", "2"],
                "x-stainless-retry-count of the attempts: {attempts:?}"
            );
            let series = format!(
                r#"tollgate_requests_total{{project="{}",model="gpt-4o-mini",code="500"}}"#,
                seen.case
            );
            let n = metric(seen.metrics, &series);
            check!(n == 3.0, "{series} = {n}, expected 3");
            seen.charged(3, 0)
        }
        other => Err(format!("no tollgate-side check for case {other}")),
    }
}

async fn sdk_suite(sdk: Sdk) {
    let env = tokio::task::spawn_blocking(sdk_env).await.unwrap();
    if let Err(why) = env {
        panic!("{why}");
    }
    let mock = MockUpstream::start().await;
    let proxy = TestProxy::start(&config(&mock.base_url())).await;
    spend_the_budget(&proxy).await;

    let (output, took) = run_script(sdk, &proxy.url("/v1")).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut verdicts: BTreeMap<&str, String> = BTreeMap::new();
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("ok ") {
            let case = rest.split_whitespace().next().unwrap_or("");
            verdicts.insert(case, String::new());
        } else if let Some(rest) = line.strip_prefix("FAIL ") {
            let (case, why) = rest.split_once(": ").unwrap_or((rest, ""));
            verdicts.insert(case, format!("script: {why}"));
        }
    }

    let report = proxy.admin_json("/admin/projects").await;
    let metrics = proxy.metrics().await;
    let all = mock.requests();
    let mut failures = Vec::new();
    for case in CASES {
        let mut problems = Vec::new();
        match verdicts.get(case) {
            Some(why) if why.is_empty() => {}
            Some(why) => problems.push(why.clone()),
            None => problems.push("script: no verdict (did it crash?)".to_owned()),
        }
        let seen = Seen {
            sdk,
            case,
            requests: all
                .iter()
                .filter(|r| header(r, "x-sdk-case") == case)
                .cloned()
                .collect(),
            project: if case == UNKNOWN_TOKEN_CASE {
                &Value::Null
            } else {
                project(&report, case)
            },
            metrics: &metrics,
        };
        if let Err(why) = check_tollgate_side(&seen) {
            problems.push(format!("tollgate side: {why}"));
        }
        if !problems.is_empty() {
            failures.push(format!("  {case}: {}", problems.join("; ")));
        }
    }
    // Only the request that spent the budget came from elsewhere than an SDK case.
    let untagged = all
        .iter()
        .filter(|r| header(r, "x-sdk-case").is_empty())
        .count();
    if untagged != 1 {
        failures.push(format!(
            "  (all): the mock saw {untagged} requests without x-sdk-case, expected 1"
        ));
    }
    if !output.status.success() && failures.is_empty() {
        failures.push(format!("  (all): the script exited with {}", output.status));
    }
    assert!(
        failures.is_empty(),
        "{} SDK through tollgate: {} of {} cases failed (script {}):\n{}\n--- script stdout:\n{stdout}--- script stderr:\n{stderr}",
        sdk.name(),
        failures.len(),
        CASES.len(),
        output.status,
        failures.join("\n"),
    );
    eprintln!(
        "{} SDK: {} cases passed, the script took {:.1} s:\n{stdout}",
        sdk.name(),
        CASES.len(),
        took.as_secs_f64(),
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn python_sdk_through_tollgate() {
    sdk_suite(Sdk::Python).await;
}

#[tokio::test]
async fn node_sdk_through_tollgate() {
    sdk_suite(Sdk::Node).await;
}

/// The scripts know the same cases as this file, so that none is silently skipped.
#[test]
fn the_scripts_define_every_case() {
    let python = std::fs::read_to_string(root().join("tests/sdk/check.py")).unwrap();
    let node = std::fs::read_to_string(root().join("tests/sdk/check.mjs")).unwrap();
    for case in CASES {
        assert!(
            python.contains(&format!("\ndef case_{case}():")),
            "check.py has no case_{case}"
        );
        assert!(
            node.contains(&format!("\n  async {case}() {{")),
            "check.mjs has no case {case}"
        );
    }
}
