//! The shared state of a running tollgate: the live config snapshot (swapped whole on reload),
//! the long-lived state that a reload must keep (project counters, metrics), and each proxy
//! thread's view of both.
//!
//! Invariant: `Live::states[i]` is the state of `Live::config.projects[i]`, and a usage slot of
//! `Live` holds counters of that state; all are built together before the swap, so a request
//! that loads one snapshot sees a matching set.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use arc_swap::ArcSwap;

use crate::config::{Config, CredentialRef};
use crate::metrics::Metrics;
use crate::projects::{ProjectState, Projects, UsageCell};
use crate::store::{lock, Pending, PendingCell};
use crate::upstream::Upstream;

/// One config and the project state resolved for it.
#[derive(Debug)]
pub struct Live {
    pub config: Config,
    pub states: Vec<Arc<ProjectState>>,
    /// The model label of everything that is neither priced nor on an allowlist.
    pub other: Arc<str>,
    /// Per credential of `config` (see [`Live::usage_slot`]), the counters of the first model
    /// label it settled a 200 under: most credentials use one model, and settling finds these
    /// without a map lookup. Empty until then; built anew with each config (counters are never
    /// removed from a project's state, so a kept one stays the one counted).
    usage_slots: Vec<OnceLock<UsageSlot>>,
    /// Where each project's credentials start in `usage_slots`.
    first_slot: Vec<usize>,
}

/// What a proxy thread's requests hold on to: the app, the live config as the thread last saw
/// it, and the thread's upstream client. Each thread has its own (see [`ThreadView`]), so the
/// reference count that every request takes and drops is written by one thread only, instead of
/// a count on the app and the config that both threads write on every request.
#[derive(Debug)]
pub struct View {
    pub app: Arc<AppState>,
    pub live: Arc<Live>,
    pub upstream: Arc<Upstream>,
}

/// A proxy thread's [`View`], made anew when the live config is swapped ([`AppState::swap`]
/// renews every thread's, so that a thread serving nothing does not keep the old config, and
/// its keys, alive).
#[derive(Debug)]
pub struct ThreadView {
    app: Arc<AppState>,
    upstream: Arc<Upstream>,
    current: ArcSwap<View>,
}

impl ThreadView {
    /// The view of a thread with `upstream` as its client, known to `app` from now on.
    pub fn new(app: Arc<AppState>, upstream: Arc<Upstream>) -> Arc<Self> {
        let current = ArcSwap::from_pointee(View {
            app: app.clone(),
            live: app.live.load_full(),
            upstream: upstream.clone(),
        });
        let thread = Arc::new(ThreadView {
            app,
            upstream,
            current,
        });
        lock(&thread.app.threads).push(Arc::downgrade(&thread));
        thread
    }

    /// Makes `live` this thread's view.
    fn renew(&self, live: Arc<Live>) -> Arc<View> {
        let view = Arc::new(View {
            app: self.app.clone(),
            live,
            upstream: self.upstream.clone(),
        });
        self.current.store(view.clone());
        view
    }

    /// The thread's view of the current config. A request takes one at entry and keeps it.
    pub fn load(&self) -> Arc<View> {
        let view = self.current.load();
        let live = self.app.live.load();
        if Arc::ptr_eq(&view.live, &live) {
            return arc_swap::Guard::into_inner(view);
        }
        // A reload this thread saw before the swap renewed its view; a request that raced it
        // holds either view, each whole.
        self.renew(arc_swap::Guard::into_inner(live))
    }
}

/// A credential's counters of one model label, shared with its project's state.
#[derive(Debug)]
pub struct UsageSlot {
    pub label: Arc<str>,
    /// The credential's lifetime usage of `label`.
    pub usage: Arc<UsageCell>,
    /// The project's requests of `label` answered 200.
    pub answered: Arc<AtomicU64>,
    /// The pending ledger cell of the credential's `label` on the day it was last settled, so
    /// that the next settle of that day adds to it without a lookup (empty until then).
    pub pending: arc_swap::ArcSwapOption<PendingCell>,
}

impl Live {
    /// The usage slot of a credential of `config`.
    pub fn usage_slot(&self, who: CredentialRef) -> Option<&OnceLock<UsageSlot>> {
        let first = *self.first_slot.get(who.project)?;
        self.usage_slots.get(first.checked_add(who.credential)?)
    }
}

#[derive(Debug)]
pub struct AppState {
    pub live: ArcSwap<Live>,
    pub projects: Projects,
    pub metrics: Metrics,
    /// Requests refused before a project was known (no or bad token).
    pub unauthenticated: ProjectState,
    /// Settled usage not yet written to the ledger.
    pub pending: Arc<Pending>,
    pub alerts: crate::alerts::Alerts,
    pub ready: AtomicBool,
    /// The proxy threads' views, renewed by [`AppState::swap`] (off the request path).
    threads: Mutex<Vec<Weak<ThreadView>>>,
}

impl AppState {
    pub fn new(config: Config) -> Result<Arc<Self>, crate::upstream::UpstreamError> {
        let metrics = Metrics::default();
        let projects = Projects::default();
        // Each proxy thread makes a client of its own (see `run`); one made here proves at
        // start that the TLS setup works.
        Upstream::new(&config.upstream)?;
        let unauthenticated = ProjectState::unauthenticated();
        let live = resolve(config, &projects);
        Ok(Arc::new(AppState {
            live: ArcSwap::from_pointee(live),
            projects,
            metrics,
            unauthenticated,
            pending: Arc::new(Pending::new()),
            alerts: crate::alerts::Alerts::default(),
            ready: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        }))
    }

    /// Swaps in a new, already validated config. Counters and in-flight requests are kept;
    /// a request in flight keeps the config it started with.
    pub fn swap(&self, config: Config) {
        let live = Arc::new(resolve(config, &self.projects));
        self.live.store(live.clone());
        lock(&self.threads).retain(|thread| match thread.upgrade() {
            Some(thread) => {
                thread.renew(live.clone());
                true
            }
            None => false,
        });
    }
}

fn resolve(config: Config, projects: &Projects) -> Live {
    projects.sync(&config);
    let states = config
        .projects
        .iter()
        .filter_map(|p| projects.get(&p.name))
        .collect();
    let mut first_slot = Vec::with_capacity(config.projects.len());
    let mut slots = 0;
    for project in &config.projects {
        first_slot.push(slots);
        slots += project.credentials.len();
    }
    Live {
        config,
        states,
        other: Arc::from("other"),
        usage_slots: (0..slots).map(|_| OnceLock::new()).collect(),
        first_slot,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(key: &str) -> Config {
        let toml = r#"
[[projects]]
name = "alpha"
api_key_env = "KEY"

[[projects.credentials]]
name = "svc"
token_sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
"#;
        let source = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/x.toml"));
        let key = key.to_owned();
        crate::config::load_str(toml, source, &move |_| Some(key.clone())).unwrap()
    }

    #[test]
    fn a_swap_renews_the_view_of_a_thread_that_serves_nothing() {
        let app = AppState::new(config("sk-proj-old-0123456789")).unwrap();
        let upstream = Arc::new(Upstream::new(&app.live.load().config.upstream).unwrap());
        let thread = ThreadView::new(app.clone(), upstream);
        let old = Arc::downgrade(&thread.load().live);
        app.swap(config("sk-proj-new-0123456789"));
        // No request since: the old config (and its key) is gone all the same.
        assert!(old.upgrade().is_none());
        assert!(Arc::ptr_eq(&thread.current.load().live, &app.live.load()));
        // A request in flight keeps the config it started with.
        let in_flight = thread.load();
        app.swap(config("sk-proj-newer-0123456789"));
        assert!(!Arc::ptr_eq(&in_flight.live, &app.live.load()));
        assert!(Arc::ptr_eq(&thread.load().live, &app.live.load()));
        // A thread that is gone is forgotten.
        drop(thread);
        app.swap(config("sk-proj-last-0123456789"));
        assert!(lock(&app.threads).is_empty());
    }
}
