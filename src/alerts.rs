//! Budget alerts: when a project's settled spend reaches a threshold of `budget.alert_at`, once
//! per threshold per period, log an event, count it, and POST it to `alert_webhook`.
//!
//! Invariant: firing never blocks or fails a request: the webhook is handed to a bounded queue
//! (dropped with a log line when full) and delivered by one background task, which retries
//! with exponential backoff.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::budget::PeriodSpend;
use crate::config::{BudgetLimit, Project};
use crate::projects::ProjectState;

/// Webhook deliveries waiting; past this, alerts are logged and counted but not POSTed.
const QUEUE: usize = 1024;
const ATTEMPTS: u32 = 6;

#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub project: String,
    /// The threshold reached, as a fraction of the limit.
    pub threshold: f64,
    /// The fraction of the budget settled when it fired.
    pub spent_fraction: f64,
    pub period: &'static str,
    pub period_start: i64,
    pub limit_tokens: Option<u64>,
    pub limit_usd: Option<f64>,
    pub spent_tokens: u64,
    pub spent_usd: f64,
}

#[derive(Debug)]
pub struct Alerts {
    queue: Option<mpsc::Sender<(Uri, Alert)>>,
    receiver: std::sync::Mutex<Option<mpsc::Receiver<(Uri, Alert)>>>,
    pub fired: AtomicU64,
    pub dropped: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
}

impl Default for Alerts {
    fn default() -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE);
        Alerts {
            queue: Some(sender),
            receiver: std::sync::Mutex::new(Some(receiver)),
            fired: AtomicU64::new(0),
            dropped: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Alerts {
    /// Fires threshold `index` of `project.alert_at` for `period`.
    pub fn fire(
        &self,
        project: &Project,
        state: &ProjectState,
        limit: &BudgetLimit,
        period: &PeriodSpend,
        index: usize,
    ) {
        let Some(&threshold) = project.alert_at.get(index) else {
            return;
        };
        state
            .alerts
            .entry(threshold.to_string())
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
        let spend = period.snapshot();
        let alert = Alert {
            project: project.name.to_string(),
            threshold,
            spent_fraction: period.fraction_spent(limit),
            period: period.kind.as_str(),
            period_start: period.start,
            limit_tokens: limit.tokens,
            limit_usd: limit.micro_usd.map(|m| m as f64 / 1e6),
            spent_tokens: spend.tokens,
            spent_usd: spend.micro_usd as f64 / 1e6,
        };
        self.fired.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            project = %alert.project,
            threshold,
            spent_fraction = alert.spent_fraction,
            spent_tokens = alert.spent_tokens,
            spent_usd = alert.spent_usd,
            period = alert.period,
            "budget alert"
        );
        if let (Some(url), Some(queue)) = (&project.alert_webhook, &self.queue) {
            if queue.try_send((url.clone(), alert)).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(project = %project.name, "alert webhook queue full; alert not sent");
            }
        }
    }

    /// The delivery task; call once. It ends when every sender is gone.
    pub fn deliver(&self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let mut receiver = self.receiver.lock().ok()?.take()?;
        let failed = self.failed.clone();
        let client = client()?;
        Some(async move {
            while let Some((url, alert)) = receiver.recv().await {
                send_with_backoff(&client, url, &alert, &failed).await;
            }
        })
    }
}

type WebhookClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

fn client() -> Option<WebhookClient> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .ok()?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Some(Client::builder(TokioExecutor::new()).build(https))
}

async fn send_with_backoff(client: &WebhookClient, url: Uri, alert: &Alert, failed: &AtomicU64) {
    let Ok(body) = serde_json::to_vec(alert) else {
        return;
    };
    let body = Bytes::from(body);
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=ATTEMPTS {
        let mut request = Request::new(Full::new(body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = url.clone();
        request.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let outcome = tokio::time::timeout(Duration::from_secs(10), client.request(request)).await;
        match outcome {
            Ok(Ok(response)) if response.status().is_success() => return,
            Ok(Ok(response)) => {
                tracing::warn!(project = %alert.project, status = response.status().as_u16(), attempt, "alert webhook refused");
            }
            Ok(Err(err)) => {
                tracing::warn!(project = %alert.project, error = %err, attempt, "alert webhook failed");
            }
            Err(_) => {
                tracing::warn!(project = %alert.project, attempt, "alert webhook timed out");
            }
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }
    failed.fetch_add(1, Ordering::Relaxed);
    tracing::error!(project = %alert.project, threshold = alert.threshold, "alert webhook gave up");
}
