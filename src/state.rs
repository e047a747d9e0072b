//! The shared state of a running tollgate: the live config snapshot (swapped whole on reload),
//! the long-lived state that a reload must keep (project counters, metrics), and each proxy
//! thread's view of both.
//!
//! Invariant: `Live::states[i]` is the state of `Live::config.projects[i]`, and a usage slot of
//! `Live` holds counters of that state; all are built together before the swap, so a request
//! that loads one snapshot sees a matching set.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use crate::config::{Config, CredentialRef};
use crate::metrics::Metrics;
use crate::projects::{ProjectState, Projects, UsageCell};
use crate::store::Pending;
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

/// A proxy thread's [`View`], made anew when the live config was swapped.
#[derive(Debug)]
pub struct ThreadView {
    app: Arc<AppState>,
    upstream: Arc<Upstream>,
    current: ArcSwap<View>,
}

impl ThreadView {
    pub fn new(app: Arc<AppState>, upstream: Arc<Upstream>) -> Self {
        let current = ArcSwap::from_pointee(View {
            app: app.clone(),
            live: app.live.load_full(),
            upstream: upstream.clone(),
        });
        ThreadView {
            app,
            upstream,
            current,
        }
    }

    /// The thread's view of the current config. A request takes one at entry and keeps it.
    pub fn load(&self) -> Arc<View> {
        let view = self.current.load();
        let live = self.app.live.load();
        if Arc::ptr_eq(&view.live, &live) {
            return arc_swap::Guard::into_inner(view);
        }
        // A reload: this thread's next view. Only this thread stores here; a request that
        // raced it holds either view, each whole.
        let fresh = Arc::new(View {
            app: self.app.clone(),
            live: arc_swap::Guard::into_inner(live),
            upstream: self.upstream.clone(),
        });
        self.current.store(fresh.clone());
        fresh
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
}

impl AppState {
    pub fn new(config: Config) -> Result<Arc<Self>, crate::upstream::UpstreamError> {
        let metrics = Metrics::new();
        let projects = Projects::default();
        // Each proxy thread makes a client of its own (see `run`); one made here proves at
        // start that the TLS setup works.
        Upstream::new(&config.upstream)?;
        let unauthenticated = ProjectState::unauthenticated(&metrics);
        let live = resolve(config, &projects, &metrics);
        Ok(Arc::new(AppState {
            live: ArcSwap::from_pointee(live),
            projects,
            metrics,
            unauthenticated,
            pending: Arc::new(Pending::new()),
            alerts: crate::alerts::Alerts::default(),
            ready: AtomicBool::new(false),
        }))
    }

    /// Swaps in a new, already validated config. Counters and in-flight requests are kept.
    pub fn swap(&self, config: Config) {
        let live = resolve(config, &self.projects, &self.metrics);
        self.live.store(Arc::new(live));
    }
}

fn resolve(config: Config, projects: &Projects, metrics: &Metrics) -> Live {
    projects.sync(&config, metrics);
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
