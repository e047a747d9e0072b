//! Budgets shared through a real Redis (`[store] redis_url`): several tollgate processes share
//! one budget under concurrent load without passing it, Redis killed and restarted mid-run
//! loses and double-counts nothing, and `on_store_error` decides what a replica does while
//! Redis is away.
//!
//! The first test uses the Redis on 127.0.0.1:6379 (`.ci/run` starts one with
//! `scripts/redis-up.sh`); the others start their own `redis-server` on a free port. Each test
//! uses project names of its own, so the key spaces never meet. Without Redis the tests fail
//! when `CI=true` and are skipped with a note otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;

use common::harness::{client, request, send, sha256_hex, TestProxy, ADMIN_TOKEN, REAL_KEY};
use common::mock_upstream::{MockUpstream, Reported};

const TOKEN: &str = "tg-redis-test-load-token";
const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

// ---------------------------------------------------------------------------------------------
// Redis

/// Whether a Redis answers PING at `url` within a second.
async fn pings(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let attempt = async {
        let mut connection = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(pong)) if pong == "PONG"
    )
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// True when the test can go on; false (with a note) to skip it outside CI; a failure in CI.
fn available(what: bool, missing: &str) -> bool {
    if what {
        return true;
    }
    assert!(
        !in_ci(),
        "{missing}: CI=true needs it (run scripts/redis-up.sh, which .ci/run does)"
    );
    eprintln!("note: skipping: {missing} (run scripts/redis-up.sh)");
    false
}

fn has_redis_server() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// The keys of `project`'s periods ending in `suffix` (`spent`, `lease`, ...).
async fn keys(url: &str, project: &str, suffix: &str) -> Vec<String> {
    let mut c = connection(url).await;
    redis::cmd("KEYS")
        .arg(format!("tollgate:{{{project}}}:*:{suffix}"))
        .query_async(&mut c)
        .await
        .unwrap()
}

/// The `spent` hash of `project`'s one period (empty if there is none yet).
async fn spent(url: &str, project: &str) -> HashMap<String, u64> {
    let keys = keys(url, project, "spent").await;
    assert!(keys.len() <= 1, "one period only: {keys:?}");
    let Some(key) = keys.first() else {
        return HashMap::new();
    };
    let mut c = connection(url).await;
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// The fields of `project`'s `lease` hashes or members of its `beat` sorted sets.
async fn members(url: &str, project: &str, suffix: &str) -> Vec<String> {
    let mut all = Vec::new();
    let mut c = connection(url).await;
    for key in keys(url, project, suffix).await {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
        let mut command = if kind == "zset" {
            redis::cmd("ZRANGE")
        } else {
            redis::cmd("HKEYS")
        };
        command.arg(&key);
        if kind == "zset" {
            command.arg(0).arg(-1);
        }
        let found: Vec<String> = command.query_async(&mut c).await.unwrap();
        all.extend(found);
    }
    all
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server of the test's own, on a free port, with its data in `dir`. With `durable`,
/// every write is in the append-only file before it is answered, so the data survive a kill
/// and a restart (a Redis that loses its data on restart loses the shared spend with it: that
/// is the durability of Redis, not of tollgate).
struct RedisServer {
    port: u16,
    dir: PathBuf,
    durable: bool,
    child: Option<Child>,
}

impl RedisServer {
    async fn start(dir: &Path, port: u16, durable: bool) -> RedisServer {
        let mut server = RedisServer {
            port,
            dir: dir.to_path_buf(),
            durable,
            child: None,
        };
        server.restart().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.join(format!("redis-{}.log", self.port))).unwrap();
        let mut command = Command::new("redis-server");
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir);
        if self.durable {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pings(&self.url()).await {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown, no last save.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// tollgate replicas: child processes of the real binary

struct Replica {
    name: String,
    child: Option<Child>,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    ledger: PathBuf,
}

struct ReplicaConfig<'a> {
    upstream: &'a str,
    redis_url: &'a str,
    project: &'a str,
    budget_tokens: u64,
    on_store_error: &'a str,
}

impl Replica {
    async fn start(dir: &Path, name: &str, config: &ReplicaConfig<'_>) -> Replica {
        let (proxy_port, admin_port) = (free_port(), free_port());
        let ledger = dir.join(format!("{name}.db"));
        let pricing = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pricing.toml");
        let toml = format!(
            r#"
[server]
listen = "127.0.0.1:{proxy_port}"
shutdown_grace_ms = 5000

[admin]
listen = "127.0.0.1:{admin_port}"
token_env = "TOLLGATE_ADMIN_TOKEN"

[upstream]
base_url = "{upstream}"

[pricing]
file = "{pricing}"

[store]
path = "{ledger}"
flush_interval_ms = 50
redis_url = "{redis_url}"
on_store_error = "{on_store_error}"

[[projects]]
name = "{project}"
api_key_env = "OPENAI_KEY"
budget = {{ tokens = {budget}, period = "monthly" }}

[[projects.credentials]]
name = "load"
token_sha256 = "{hash}"
"#,
            upstream = config.upstream,
            pricing = pricing.display(),
            ledger = ledger.display(),
            redis_url = config.redis_url,
            on_store_error = config.on_store_error,
            project = config.project,
            budget = config.budget_tokens,
            hash = sha256_hex(TOKEN),
        );
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("OPENAI_KEY", REAL_KEY)
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start tollgate");
        let mut replica = Replica {
            name: name.to_owned(),
            child: Some(child),
            proxy: SocketAddr::from(([127, 0, 0, 1], proxy_port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            log,
            ledger,
        };
        let ready = format!("http://{}/readyz", replica.admin);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if status(&ready).await == Some(StatusCode::OK) {
                break;
            }
            if let Some(exit) = replica.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{name} exited ({exit}):\n{}", replica.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{name} not ready in 15 s:\n{}",
                replica.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        replica
    }

    fn url(&self) -> String {
        format!("http://{}/v1/chat/completions", self.proxy)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metrics(&self) -> String {
        let answer = send(
            Method::GET,
            &format!("http://{}/metrics", self.admin),
            &[],
            Bytes::new(),
        )
        .await;
        answer.text()
    }

    /// SIGTERM, then waits for a graceful exit (drain, last push, last flush). The log's
    /// warnings and errors go to the test's output (shown when it fails).
    async fn stop(mut self) -> ExitStatus {
        let exit = self.stop_child().await;
        for line in self.log_text().lines() {
            if line.contains("WARN") || line.contains("ERROR") || line.contains("Redis") {
                eprintln!("{}: {line}", self.name);
            }
        }
        exit
    }

    async fn stop_child(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(exit) = child.try_wait().unwrap() {
                return exit;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop in 15 s:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The status of a GET, or `None` if nothing answers.
async fn status(url: &str) -> Option<StatusCode> {
    let response = client()
        .request(request(Method::GET, url, &[], Bytes::new()))
        .await
        .ok()?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    Some(status)
}

/// The value of `tollgate_store_errors_total{store="redis"}` in a scrape.
fn store_errors(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_store_errors_total{store=\"redis\"} "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Sum of the usage settled in the replicas' own ledgers, as Redis's `spent` fields.
fn ledgers(replicas: &[PathBuf], project: &str) -> HashMap<String, u64> {
    let mut sum = tollgate::store::UsageDelta::default();
    for path in replicas {
        let ledger = tollgate::store::Ledger::open_read_only(path).unwrap();
        let from = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
        sum.add(&ledger.spend(project, from, None).unwrap());
    }
    HashMap::from([
        ("tokens".to_owned(), sum.tokens()),
        ("micro_usd".to_owned(), sum.micro_usd),
        ("requests".to_owned(), sum.requests),
        ("input_tokens".to_owned(), sum.input_tokens),
        ("cached_input_tokens".to_owned(), sum.cached_input_tokens),
        ("output_tokens".to_owned(), sum.output_tokens),
        ("reasoning_tokens".to_owned(), sum.reasoning_tokens),
    ])
}

/// `spent` with absent fields as 0 (Redis keeps only the fields ever added to).
fn field(spent: &HashMap<String, u64>, name: &str) -> u64 {
    spent.get(name).copied().unwrap_or(0)
}

fn assert_spent_eq(redis: &HashMap<String, u64>, expected: &HashMap<String, u64>) {
    for (name, value) in expected {
        assert_eq!(
            field(redis, name),
            *value,
            "{name}: redis {redis:?}, expected {expected:?}"
        );
    }
}

fn tokens(reported: &Reported) -> u64 {
    reported.input_tokens + reported.output_tokens
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

// ---------------------------------------------------------------------------------------------
// load

/// Counts of answers by status.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
}

/// A chat request whose estimate (body bytes + max_tokens) is a little above what the mock
/// reports for it, so admitted estimates and real spend are close: a broken bound shows.
fn load_body() -> (Bytes, u64) {
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "x".repeat(200)}],
        "max_tokens": 40,
    });
    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
    let len = bytes.len() as u64;
    (bytes, len)
}

/// `workers` tasks send to `url` until `count` requests each are done or `stop` is set.
fn load(
    url: String,
    workers: usize,
    count: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (body, _) = load_body();
    let auth = format!("Bearer {TOKEN}");
    (0..workers)
        .map(|_| {
            let (url, body, auth, stop, tally) = (
                url.clone(),
                body.clone(),
                auth.clone(),
                stop.clone(),
                tally.clone(),
            );
            tokio::spawn(async move {
                let client = client();
                for _ in 0..count {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let headers = [
                        ("authorization", auth.as_str()),
                        ("content-type", "application/json"),
                        ("x-mock-delay-ms", "2"),
                    ];
                    let answer = client
                        .request(request(Method::POST, &url, &headers, body.clone()))
                        .await;
                    let status = match answer {
                        Ok(response) => {
                            let status = response.status();
                            let _ = response.into_body().collect().await;
                            status
                        }
                        Err(_) => StatusCode::BAD_GATEWAY,
                    };
                    let counter = match status {
                        StatusCode::OK => &tally.ok,
                        StatusCode::TOO_MANY_REQUESTS => &tally.refused,
                        _ => &tally.other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// tests

/// Three tollgate processes share one 20,000-token budget under concurrent load, ~7 times
/// what the budget holds. Every request's real usage is within its estimate, so the stated
/// bound is the limit itself: the upstream never reports more than 20,000 tokens in all, and
/// Redis ends up holding exactly what the upstream reported (and the replicas' ledgers hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_never_pass_a_shared_budget() {
    if !available(
        pings(SHARED_REDIS).await,
        "no Redis answers on 127.0.0.1:6379",
    ) {
        return;
    }
    const LIMIT: u64 = 20_000;
    let mock = MockUpstream::start().await;
    let (_, body_len) = load_body();
    // Real usage: 10 tokens under the estimate (body bytes + 40).
    mock.set_default_usage(body_len - 10, 40);
    let dir = tempfile::tempdir().unwrap();
    let project = unique("shared");
    let upstream = mock.base_url();
    let config = ReplicaConfig {
        upstream: &upstream,
        redis_url: SHARED_REDIS,
        project: &project,
        budget_tokens: LIMIT,
        on_store_error: "open",
    };
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(Replica::start(dir.path(), &format!("replica-{i}"), &config).await);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<Arc<Tally>> = (0..3).map(|_| Arc::new(Tally::default())).collect();
    let mut tasks = Vec::new();
    for (replica, tally) in replicas.iter().zip(&tallies) {
        tasks.extend(load(replica.url(), 16, 10, stop.clone(), tally.clone()));
    }
    for task in tasks {
        task.await.unwrap();
    }

    // Once every replica has synced what it settled, each one's budget gauge is the cluster's
    // spend (what the limit is checked against), not its own share.
    let gauge = format!("tollgate_budget_spent_tokens{{project=\"{project}\"}} ");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let cluster = field(&spent(SHARED_REDIS, &project).await, "tokens");
        let mut shown = Vec::new();
        for replica in &replicas {
            let metrics = replica.metrics().await;
            let value = metrics
                .lines()
                .find_map(|line| line.strip_prefix(&gauge))
                .and_then(|v| v.trim().parse::<u64>().ok());
            shown.push(value);
        }
        if cluster > 0 && shown.iter().all(|v| *v == Some(cluster)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gauges {shown:?}, Redis {cluster}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let ledgers_paths: Vec<PathBuf> = replicas.iter().map(|r| r.ledger.clone()).collect();
    for replica in replicas {
        let name = replica.name.clone();
        let exit = replica.stop().await;
        assert!(exit.success(), "{name} exited with {exit}");
    }

    let reported = mock.reported();
    let ok: u64 = tallies.iter().map(|t| t.ok.load(Ordering::Relaxed)).sum();
    let refused: u64 = tallies
        .iter()
        .map(|t| t.refused.load(Ordering::Relaxed))
        .sum();
    let other: u64 = tallies
        .iter()
        .map(|t| t.other.load(Ordering::Relaxed))
        .sum();
    eprintln!(
        "ok {ok}, refused {refused}, other {other}, reported {} tokens of {LIMIT}",
        tokens(&reported)
    );
    assert_eq!(other, 0);
    assert_eq!(ok + refused, 3 * 16 * 10);
    assert!(refused > 0, "the load must run the budget out");
    for (i, tally) in tallies.iter().enumerate() {
        assert!(
            tally.ok.load(Ordering::Relaxed) > 0,
            "replica-{i} served nothing"
        );
    }
    assert_eq!(reported.requests_with_usage, ok);
    assert!(
        tokens(&reported) <= LIMIT,
        "the replicas spent {} > {LIMIT} between them",
        tokens(&reported)
    );
    assert!(
        tokens(&reported) >= LIMIT * 3 / 4,
        "the budget was not used up: {} of {LIMIT}",
        tokens(&reported)
    );

    let spent = spent(SHARED_REDIS, &project).await;
    assert_eq!(field(&spent, "tokens"), tokens(&reported), "{spent:?}");
    assert_eq!(field(&spent, "requests"), ok);
    assert_spent_eq(&spent, &ledgers(&ledgers_paths, &project));
    assert_eq!(
        members(SHARED_REDIS, &project, "lease").await,
        Vec::<String>::new(),
        "every lease given back"
    );
    assert_eq!(
        members(SHARED_REDIS, &project, "beat").await,
        Vec::<String>::new()
    );
    // The shared Redis outlives the test: leave nothing behind.
    let mut c = connection(SHARED_REDIS).await;
    for key in keys(SHARED_REDIS, &project, "*").await {
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
    }
}

/// Redis is killed (SIGKILL) under load and restarted: the replicas keep serving on their
/// local counters meanwhile (`on_store_error = "open"`), count the failures, and replay what
/// they could not push; at the end Redis holds exactly what the upstream reported, nothing lost
/// and nothing counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_loses_and_doubles_nothing() {
    if !available(has_redis_server(), "redis-server is not installed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(dir.path(), free_port(), true).await;
    let url = redis.url();
    let mock = MockUpstream::start().await;
    let project = unique("restart");
    let upstream = mock.base_url();
    let config = ReplicaConfig {
        upstream: &upstream,
        redis_url: &url,
        project: &project,
        budget_tokens: 100_000_000,
        on_store_error: "open",
    };
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(Replica::start(dir.path(), &format!("replica-{i}"), &config).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for replica in &replicas {
        tasks.extend(load(replica.url(), 4, 100_000, stop.clone(), tally.clone()));
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    while field(&spent(&url, &project).await, "tokens") == 0 {
        assert!(Instant::now() < deadline, "nothing pushed to Redis in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    redis.kill();
    let served_before = tally.ok.load(Ordering::Relaxed);
    for replica in &replicas {
        let deadline = Instant::now() + Duration::from_secs(10);
        while store_errors(&replica.metrics().await) == 0 {
            assert!(
                Instant::now() < deadline,
                "{}: no store error counted",
                replica.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let served_during = tally.ok.load(Ordering::Relaxed) - served_before;
    assert!(served_during > 0, "nothing served while Redis was down");

    redis.restart().await;
    // Synced again: Redis holds at least everything reported up to the restart.
    let target = tokens(&mock.reported());
    let deadline = Instant::now() + Duration::from_secs(15);
    while field(&spent(&url, &project).await, "tokens") < target {
        assert!(
            Instant::now() < deadline,
            "the outage's usage not pushed in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let ledgers_paths: Vec<PathBuf> = replicas.iter().map(|r| r.ledger.clone()).collect();
    for replica in replicas {
        let name = replica.name.clone();
        let log = replica.log.clone();
        let exit = replica.stop().await;
        assert!(exit.success(), "{name} exited with {exit}");
        let text = std::fs::read_to_string(log).unwrap();
        assert_eq!(
            text.matches("cannot reach Redis for shared budgets")
                .count(),
            1,
            "{name} logs the outage once:\n{text}"
        );
        assert!(text.contains("Redis is reachable again"), "{name}:\n{text}");
    }

    let reported = mock.reported();
    let ok = tally.ok.load(Ordering::Relaxed);
    eprintln!(
        "ok {ok} ({served_during} while Redis was down), reported {} tokens",
        tokens(&reported)
    );
    assert_eq!(tally.other.load(Ordering::Relaxed), 0);
    assert_eq!(tally.refused.load(Ordering::Relaxed), 0);
    assert_eq!(reported.requests_with_usage, ok);
    let spent = spent(&url, &project).await;
    assert_eq!(field(&spent, "tokens"), tokens(&reported), "{spent:?}");
    assert_eq!(field(&spent, "requests"), ok);
    assert_eq!(field(&spent, "input_tokens"), reported.input_tokens);
    assert_eq!(field(&spent, "output_tokens"), reported.output_tokens);
    assert_spent_eq(&spent, &ledgers(&ledgers_paths, &project));
    assert_eq!(members(&url, &project, "lease").await, Vec::<String>::new());
    assert_eq!(members(&url, &project, "beat").await, Vec::<String>::new());
}

fn in_process_config(
    upstream: &str,
    ledger: &Path,
    redis_url: &str,
    mode: &str,
    tokens: u64,
) -> String {
    format!(
        r#"
[admin]
token_env = "TOLLGATE_ADMIN_TOKEN"

[upstream]
base_url = "{upstream}"

[store]
path = "{ledger}"
flush_interval_ms = 50
redis_url = "{redis_url}"
on_store_error = "{mode}"

[[projects]]
name = "solo"
api_key_env = "OPENAI_KEY"
budget = {{ tokens = {tokens}, period = "monthly" }}

[[projects.credentials]]
name = "load"
token_sha256 = "{hash}"
"#,
        ledger = ledger.display(),
        hash = sha256_hex(TOKEN),
    )
}

async fn chat(proxy: &TestProxy) -> common::harness::Answer {
    let auth = format!("Bearer {TOKEN}");
    let (body, _) = load_body();
    send(
        Method::POST,
        &proxy.url("/v1/chat/completions"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}

/// `on_store_error = "closed"` with Redis down from the start: nothing was ever leased, so the
/// very first request is refused (the budget's usual 429) and never reaches the upstream. Once
/// Redis is there, the next sync leases a slice and requests pass.
#[tokio::test]
async fn closed_refuses_without_a_lease_and_recovers_with_redis() {
    if !available(has_redis_server(), "redis-server is not installed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let mock = MockUpstream::start().await;
    let proxy = TestProxy::start(&in_process_config(
        &mock.base_url(),
        &dir.path().join("ledger.db"),
        &url,
        "closed",
        100_000,
    ))
    .await;

    let answer = chat(&proxy).await;
    let error = answer.error(429);
    assert_eq!(error["code"], "project_spend_limit_exceeded");
    assert!(
        mock.requests().is_empty(),
        "a refused request never reaches the upstream"
    );
    assert!(store_errors(&proxy.metrics().await) >= 1);
    let report = proxy.admin_json("/admin/projects").await;
    assert!(report["projects"][0]["shared"].is_null(), "{report}");

    let _redis = RedisServer::start(dir.path(), port, false).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = chat(&proxy).await;
        if answer.status == StatusCode::OK {
            break;
        }
        assert_eq!(
            answer.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            answer.text()
        );
        assert!(
            Instant::now() < deadline,
            "no lease within 10 s of Redis starting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = proxy.admin_json("/admin/projects").await;
    assert_eq!(report["projects"][0]["shared"]["replicas"], 1, "{report}");
    proxy.shutdown().await;
    let spent = spent(&url, "solo").await;
    assert_eq!(field(&spent, "tokens"), tokens(&mock.reported()));
    assert_eq!(field(&spent, "requests"), 1);
}

/// `on_store_error = "open"` with Redis down from the start: the replica serves as a single
/// node would, on its local counters, still within the limit.
#[tokio::test]
async fn open_serves_on_local_counters_without_redis() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis://127.0.0.1:{}", free_port());
    let mock = MockUpstream::start().await;
    let (_, body_len) = load_body();
    mock.set_default_usage(body_len, 40);
    // Three requests' estimates fit, not four.
    let limit = 3 * (body_len + 40) + 10;
    let proxy = TestProxy::start(&in_process_config(
        &mock.base_url(),
        &dir.path().join("ledger.db"),
        &url,
        "open",
        limit,
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(chat(&proxy).await.status, StatusCode::OK);
    }
    chat(&proxy).await.error(429);
    assert!(store_errors(&proxy.metrics().await) >= 1);
    assert!(tokens(&mock.reported()) <= limit);
    proxy.shutdown().await;
}
