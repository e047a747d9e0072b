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

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
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
        let addr = config.server.listen;
        let proxy = refuse_taken_port(addr)
            .and_then(|()| bind_shareable(addr))
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

/// A listening socket whose port further sockets may share (`SO_REUSEPORT` on Linux), so that
/// each proxy thread can accept on a socket of its own: what [`Listeners::bind`] makes for the
/// proxy listener. Must be called within a Tokio runtime.
pub fn bind_shareable(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = tcp_socket(addr)?;
    #[cfg(target_os = "linux")]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Fails if anything listens on `addr`'s port: a socket that does not share the port is
/// refused one that a sharing socket holds, so a second tollgate on the same address fails to
/// start rather than silently splitting the connections with the first.
fn refuse_taken_port(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() != 0 {
        let probe = tcp_socket(addr)?;
        probe.bind(addr)?;
    }
    Ok(())
}

/// A TCP socket for `addr`'s family with `SO_REUSEADDR`, as `TcpListener::bind` makes: a
/// restart can listen again while the old process's connections linger.
fn tcp_socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

/// The socket proxy thread `index` accepts on. On Linux every thread but the first gets a
/// socket of its own on the first one's port, and the kernel spreads new connections across
/// them by their addresses: with one shared socket, whichever thread is idle first accepts,
/// and under a burst of connections that is one thread taking nearly all of them while the
/// others idle. Elsewhere (where `SO_REUSEPORT` does not balance), and when the first socket
/// does not share its port (one not made by [`bind_shareable`]), all threads share the first.
fn thread_listener(
    first: &std::net::TcpListener,
    index: usize,
) -> std::io::Result<std::net::TcpListener> {
    if index == 0 || !cfg!(target_os = "linux") {
        return first.try_clone();
    }
    match bind_shareable(first.local_addr()?).and_then(TcpListener::into_std) {
        Ok(own) => Ok(own),
        Err(err) => {
            tracing::debug!(error = %err, "proxy threads share one listening socket");
            first.try_clone()
        }
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
/// thread, twice per request). Each thread accepts on its own socket ([`thread_listener`]).
/// Each receiver resolves when its thread has drained its connections.
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
        let listener = thread_listener(&listener, index).map_err(bind_error)?;
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
                    let thread = state::ThreadView::new(state, client);
                    let handler = move |request| proxy::handle(thread.clone(), request);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn proxy_threads_accept_on_sockets_of_their_own_and_the_kernel_spreads_connections() {
        let first = bind_shareable("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .into_std()
            .unwrap();
        let second = thread_listener(&first, 1).unwrap();
        let addr = first.local_addr().unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        let (first, second) = (
            TcpListener::from_std(first).unwrap(),
            TcpListener::from_std(second).unwrap(),
        );
        let mut clients = Vec::new();
        for _ in 0..32 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Every connection waits in exactly one socket's queue; by their source ports both get
        // some (all 32 in one queue: a chance of 2^-31).
        let drain = |listener: TcpListener| async move {
            let mut accepted = 0;
            while tokio::time::timeout(std::time::Duration::from_millis(200), listener.accept())
                .await
                .is_ok_and(|accepted| accepted.is_ok())
            {
                accepted += 1;
            }
            accepted
        };
        let (on_first, on_second) = tokio::join!(drain(first), drain(second));
        assert_eq!(on_first + on_second, 32);
        assert!(on_first > 0 && on_second > 0, "{on_first} / {on_second}");
    }

    #[tokio::test]
    async fn a_listener_that_does_not_share_its_port_is_shared_by_the_threads() {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let second = thread_listener(&first, 1).unwrap();
        assert_eq!(second.local_addr().unwrap(), first.local_addr().unwrap());
    }

    #[tokio::test]
    async fn a_port_another_socket_listens_on_is_refused_though_that_socket_shares_it() {
        let taken = bind_shareable("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = taken.local_addr().unwrap();
        let err = refuse_taken_port(addr).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        drop(taken);
        assert!(refuse_taken_port(addr).is_ok());
    }
}
