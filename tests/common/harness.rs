//! Starts tollgate in-process on 127.0.0.1:0 and talks to it with a real HTTP client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use tollgate::state::AppState;
use tollgate::Listeners;

/// The real key every test project uses; the mock upstream checks the `sk-` prefix.
pub const REAL_KEY: &str = "sk-proj-test-real-key-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "admin-secret-token";

pub fn sha256_hex(token: &str) -> String {
    hex::encode(tollgate::auth::hash_token(token))
}

pub struct TestProxy {
    /// The ledger file (in a temporary directory of the test's own).
    pub ledger: PathBuf,
    _dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state: Arc<AppState>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// Env lookups for configs under test: the real key and the admin token.
pub fn test_env(name: &str) -> Option<String> {
    match name {
        "OPENAI_KEY" | "OPENAI_KEY_A" | "OPENAI_KEY_B" => Some(REAL_KEY.to_owned()),
        "TOLLGATE_ADMIN_TOKEN" => Some(ADMIN_TOKEN.to_owned()),
        _ => None,
    }
}

/// A path inside the repo's config/ so that `pricing.file = "pricing.toml"` finds the real table.
pub fn config_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/under-test.toml")
}

pub fn pricing_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/pricing.toml")
}

/// Puts the variables of `test_env` into the process environment, once: a reload reads the
/// real environment. Every test sets the same values, so the order does not matter.
pub fn set_test_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for name in [
            "OPENAI_KEY",
            "OPENAI_KEY_A",
            "OPENAI_KEY_B",
            "TOLLGATE_ADMIN_TOKEN",
        ] {
            if let Some(value) = test_env(name) {
                std::env::set_var(name, value);
            }
        }
    });
}

/// The config file of a running test proxy.
impl TestProxy {
    pub fn config_file(&self) -> PathBuf {
        self.ledger.with_file_name("tollgate.toml")
    }

    /// Rewrites the config file and reloads it through the admin API.
    pub async fn reload(&self, toml: &str) -> Answer {
        let mut toml = toml.to_owned();
        if !toml.contains("[store]") {
            toml.push_str(&format!(
                "\n[store]\npath = \"{}\"\n",
                self.ledger.display()
            ));
        }
        if !toml.contains("[pricing]") {
            toml.push_str(&format!(
                "\n[pricing]\nfile = \"{}\"\n",
                pricing_path().display()
            ));
        }
        std::fs::write(self.config_file(), toml).expect("write config");
        let auth = format!("Bearer {ADMIN_TOKEN}");
        send(
            Method::POST,
            &self.admin_url("/admin/reload"),
            &[("authorization", auth.as_str())],
            Bytes::new(),
        )
        .await
    }
}

pub fn load(toml: &str) -> tollgate::config::Config {
    tollgate::config::load_str(toml, &config_path(), &test_env)
        .unwrap_or_else(|e| panic!("test config must load: {e}"))
}

impl TestProxy {
    pub async fn start(toml: &str) -> TestProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = dir.path().join("ledger.db");
        Self::start_with_ledger(toml, dir, ledger).await
    }

    /// Starts with the ledger at `ledger` (kept in `dir`), unless the config has a `[store]`.
    /// The config is written to `dir/tollgate.toml` and loaded from there, so that a reload
    /// (`POST /admin/reload`) reads the same file.
    pub async fn start_with_ledger(
        toml: &str,
        dir: tempfile::TempDir,
        ledger: PathBuf,
    ) -> TestProxy {
        let mut toml = toml.to_owned();
        if !toml.contains("[store]") {
            toml.push_str(&format!("\n[store]\npath = \"{}\"\n", ledger.display()));
        }
        if !toml.contains("[pricing]") {
            toml.push_str(&format!(
                "\n[pricing]\nfile = \"{}\"\n",
                pricing_path().display()
            ));
        }
        set_test_env();
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, &toml).expect("write config");
        let config =
            tollgate::config::load(&path).unwrap_or_else(|e| panic!("test config must load: {e}"));
        let state = AppState::new(config).expect("state");
        let listeners = Listeners {
            // As `Listeners::bind` makes it: each proxy thread gets a socket of its own.
            proxy: tollgate::bind_shareable("127.0.0.1:0".parse().expect("addr")).expect("bind"),
            admin: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        };
        let addr = listeners.proxy.local_addr().expect("addr");
        let admin = listeners.admin.local_addr().expect("addr");
        let (stop, stopped) = watch::channel(false);
        let run_state = state.clone();
        let task = tokio::spawn(async move {
            tollgate::serve(run_state, listeners, stopped)
                .await
                .expect("tollgate runs");
        });
        TestProxy {
            ledger,
            _dir: dir,
            addr,
            admin,
            state,
            stop,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Stops accepting, drains and waits for the server to return.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("shutdown within 10 s")
                .expect("server task");
        }
    }

    pub async fn metrics(&self) -> String {
        let response = send(Method::GET, &self.admin_url("/metrics"), &[], Bytes::new()).await;
        assert_eq!(response.status, StatusCode::OK);
        response.text()
    }

    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let response = send(
            Method::GET,
            &self.admin_url(path),
            &[("authorization", auth.as_str())],
            Bytes::new(),
        )
        .await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        response.json()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A whole response.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Asserts an OpenAI-shaped error and returns its `error` object.
    pub fn error(&self, status: u16) -> serde_json::Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        let body = self.json();
        let error = body["error"].clone();
        assert!(error["message"].is_string(), "{body}");
        assert!(error["type"].is_string(), "{body}");
        assert!(error.get("param").is_some(), "{body}");
        assert!(error.get("code").is_some(), "{body}");
        error
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(body)).expect("request")
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Bytes) -> Answer {
    let response = client()
        .request(request(method, url, headers, body))
        .await
        .expect("request sent");
    let (head, body) = response.into_parts();
    let body = body.collect().await.expect("whole body").to_bytes();
    Answer {
        status: head.status,
        headers: head.headers,
        body,
    }
}

/// POSTs JSON with a bearer token (and extra headers).
pub async fn post_json(
    proxy: &TestProxy,
    path: &str,
    token: &str,
    body: &serde_json::Value,
    extra: &[(&str, &str)],
) -> Answer {
    let body = Bytes::from(serde_json::to_vec(body).expect("json"));
    post_json_bytes(proxy, path, token, body, extra).await
}

/// POSTs `body` as `application/json` (whether or not it is) with a bearer token (and extra
/// headers).
pub async fn post_json_bytes(
    proxy: &TestProxy,
    path: &str,
    token: &str,
    body: Bytes,
    extra: &[(&str, &str)],
) -> Answer {
    let auth = format!("Bearer {token}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    send(Method::POST, &proxy.url(path), &headers, body).await
}

/// Polls `check` until it holds or 5 s pass.
pub async fn eventually<F: FnMut() -> bool>(mut check: F) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}
