//! tollgate: a reverse proxy in front of the OpenAI API that authenticates internal tokens,
//! swaps in each project's real key, enforces model allowlists and budgets, and meters the
//! usage every response reports. The request path is described step by step in [`proxy`].

pub mod admin;
pub mod alerts;
pub mod auth;
pub mod body;
pub mod budget;
pub mod config;
pub mod error;
pub mod inspect;
pub mod logging;
pub mod maps;
pub mod metrics;
pub mod period;
pub mod pricing;
pub mod projects;
pub mod proxy;
pub mod ratelimit;
pub mod report;
pub mod server;
pub mod state;
pub mod store;
pub mod upstream;
pub mod usage;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};

use crate::state::AppState;

/// The two listeners of a running tollgate.
#[derive(Debug)]
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses of `config`.
    pub async fn bind(config: &config::Config) -> Result<Self, StartError> {
        let proxy = TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.server.listen.to_string(),
                source,
            })?;
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.admin.listen.to_string(),
                source,
            })?;
        Ok(Listeners { proxy, admin })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] server::TlsError),
    #[error("cannot start a proxy thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    SharedBudgets(#[from] store::SharedBudgetsError),
}

/// Opens the ledger, loads each project's spend in its current period from it, and starts
/// the writer that flushes settled usage every `store.flush_interval_ms`.
pub fn open_store(state: &AppState) -> Result<store::Flusher, StartError> {
    let live = state.live.load();
    let store = &live.config.store;
    let ledger = store::Ledger::open(&store.path)?;
    let now = chrono::Utc::now();
    for (project, project_state) in live.config.projects.iter().zip(live.states.iter()) {
        let kind = project.budget.map_or(period::Period::Monthly, |b| b.period);
        let (from, until) = store::period_days(kind, now);
        let spent = ledger.spend(&project.name, from, until)?;
        if !spent.is_zero() {
            let period = project_state.account.period(kind, now);
            period.preload(&spent.to_spend_snapshot());
            if let Some(limit) = &project.budget {
                // Thresholds passed before this start fired then; do not fire them again.
                let _ = period.crossed(limit, &project.alert_at);
            }
            tracing::info!(
                project = %project.name,
                tokens = spent.tokens(),
                requests = spent.requests,
                "loaded this period's spend from the ledger"
            );
        }
    }
    Ok(store::Flusher::spawn(
        ledger,
        state.pending.clone(),
        store.flush_interval,
    )?)
}

/// Everything `tollgate serve` does once the config is loaded: open the ledger, start sharing
/// budgets through Redis (with `store.redis_url`), serve until `shutdown`, drain, and write the
/// last usage to the ledger (and Redis) before returning.
pub async fn serve(
    state: Arc<AppState>,
    listeners: Listeners,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let flusher = open_store(&state)?;
    let shared = store::SharedBudgets::start(state.clone()).await?;
    let served = run(state, listeners, shutdown).await;
    // After the drain: every request has settled, so the final flush holds all of it.
    if let Some(shared) = shared {
        shared.shutdown().await;
    }
    let flushed = flusher.shutdown().await;
    served?;
    flushed?;
    Ok(())
}

/// Serves the proxy and admin listeners until `shutdown` turns true, then stops accepting,
/// lets in-flight requests finish (up to `server.shutdown_grace_ms`) and returns.
pub async fn run(
    state: Arc<AppState>,
    listeners: Listeners,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let (server, tls) = {
        let live = state.live.load();
        let server = live.config.server.clone();
        let tls = match &server.tls {
            Some(files) => Some(server::tls_acceptor(files)?),
            None => None,
        };
        (server, tls)
    };
    let proxy = spawn_proxy_threads(&state, listeners.proxy, tls, &server, &shutdown)?;
    let shutdown_watch = shutdown.clone();
    let admin_state = state.clone();
    let admin = server::serve(
        listeners.admin,
        None,
        &server,
        move |request| admin::handle(admin_state.clone(), request),
        Arc::new(Semaphore::new(server.max_connections)),
        shutdown,
    );
    let alerts = state.alerts.deliver().map(tokio::spawn);
    state.ready.store(true, Ordering::Release);
    tracing::info!("tollgate is ready");
    // Not ready from the moment shutdown begins, so load balancers stop sending first.
    let mut draining = shutdown_watch;
    let unready = async {
        server::stopping(&mut draining).await;
        state.ready.store(false, Ordering::Release);
    };
    let proxy = async {
        for done in proxy {
            // An error: the thread is gone (it could not start its event loop), nothing to wait for.
            let _ = done.await;
        }
    };
    tokio::join!(proxy, admin, unready);
    state.ready.store(false, Ordering::Release);
    if let Some(alerts) = alerts {
        // Webhook deliveries still queued or retrying are given up (each alert was logged).
        alerts.abort();
    }
    Ok(())
}

/// Serves the proxy listener on `server.workers` threads, each running a single-threaded event
/// loop of its own with its own upstream client and pool: a request is served start to end on
/// the thread that accepted its connection, without the cross-thread wake-ups and task
/// migrations of a work-stealing runtime (hyper wakes the connection's own task while it
/// hands a request body to the handler; a work-stealing runtime answers that by waking an idle
/// thread, twice per request). The kernel gives each new connection to whichever thread
/// accepts it first. Each receiver resolves when its thread has drained its connections.
fn spawn_proxy_threads(
    state: &Arc<AppState>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    server: &config::ServerConfig,
    shutdown: &watch::Receiver<bool>,
) -> Result<Vec<oneshot::Receiver<()>>, StartError> {
    let bind_error = |source: std::io::Error| StartError::Bind {
        addr: server.listen.to_string(),
        source,
    };
    let listener = listener.into_std().map_err(bind_error)?;
    let permits = Arc::new(Semaphore::new(server.max_connections));
    let upstream_config = state.live.load().config.upstream.clone();
    let mut finished = Vec::with_capacity(server.workers);
    for index in 0..server.workers {
        let listener = listener.try_clone().map_err(bind_error)?;
        // Shared by the thread's requests: a clone per request is one reference count.
        let client = Arc::new(upstream::Upstream::new(&upstream_config)?);
        let (state, tls, config) = (state.clone(), tls.clone(), server.clone());
        let (permits, shutdown) = (permits.clone(), shutdown.clone());
        let (done, finishing) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("tollgate-proxy-{index}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        tracing::error!(error = %err, "a proxy thread cannot start its event loop");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(err) => {
                            tracing::error!(error = %err, "a proxy thread cannot use the listener");
                            return;
                        }
                    };
                    let handler =
                        move |request| proxy::handle(state.clone(), client.clone(), request);
                    let serving = server::serve(listener, tls, &config, handler, permits, shutdown);
                    tokio::select! {
                        () = serving => {}
                        () = logging::flush_every_interval() => {}
                    }
                });
                drop(runtime);
                logging::flush_thread();
                let _ = done.send(());
            });
        thread.map_err(StartError::Thread)?;
        finished.push(finishing);
    }
    Ok(finished)
}
