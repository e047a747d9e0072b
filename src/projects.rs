//! Per-project runtime state that outlives any one config: the budget account, usage counters
//! per credential and model, request and rejection counts, latency histograms.
//!
//! Invariant: this state is keyed by project name and is never rebuilt on reload, so a reload
//! keeps every counter; all counters are atomics reached through lock-free map lookups.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use chrono::Utc;
use tokio::sync::Notify;

use crate::budget::Account;
use crate::config::{Config, Project, RateLimitRule};
use crate::maps::ConcurrentMap;
use crate::metrics::Latency;
use crate::period::Period;
use crate::ratelimit::RuleMeters;
use crate::usage::Usage;

/// Lifetime usage of one (credential, model) pair since the process started.
#[derive(Debug, Default)]
pub struct UsageCell {
    pub requests: AtomicU64,
    pub input_tokens: AtomicU64,
    pub cached_input_tokens: AtomicU64,
    pub output_tokens: AtomicU64,
    pub reasoning_tokens: AtomicU64,
    pub micro_usd: AtomicU64,
}

impl UsageCell {
    pub fn add(&self, usage: &Usage, micro_usd: u64) {
        // Relaxed: independent monotonic counters, read only for reports.
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.input_tokens
            .fetch_add(usage.input_tokens, Ordering::Relaxed);
        self.cached_input_tokens
            .fetch_add(usage.cached_input_tokens, Ordering::Relaxed);
        self.output_tokens
            .fetch_add(usage.output_tokens, Ordering::Relaxed);
        self.reasoning_tokens
            .fetch_add(usage.reasoning_tokens, Ordering::Relaxed);
        self.micro_usd.fetch_add(micro_usd, Ordering::Relaxed);
    }

    pub fn load(&self) -> (u64, Usage, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            Usage {
                input_tokens: self.input_tokens.load(Ordering::Relaxed),
                cached_input_tokens: self.cached_input_tokens.load(Ordering::Relaxed),
                output_tokens: self.output_tokens.load(Ordering::Relaxed),
                reasoning_tokens: self.reasoning_tokens.load(Ordering::Relaxed),
            },
            self.micro_usd.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug)]
pub struct ProjectState {
    pub name: Arc<str>,
    pub account: Arc<Account>,
    /// (credential, model label) -> usage.
    pub usage: ConcurrentMap<(Arc<str>, Arc<str>), Arc<UsageCell>>,
    /// (model label, HTTP status) -> requests answered.
    pub requests: ConcurrentMap<(Arc<str>, u16), Arc<AtomicU64>>,
    /// Rejection reason -> count.
    pub rejections: ConcurrentMap<&'static str, AtomicU64>,
    /// Requests charged at the fallback price because their model has none.
    pub unpriced: AtomicU64,
    pub in_flight: AtomicI64,
    pub duration: Latency,
    pub first_byte: Latency,
    /// Budget accounts of the credentials that have a budget of their own.
    pub credential_accounts: ConcurrentMap<Arc<str>, Arc<Account>>,
    /// Rate-limit meters by rule (pattern and limits), kept across reloads.
    pub meters: ConcurrentMap<Arc<str>, Arc<RuleMeters>>,
    /// Budget alerts fired, by threshold index of `alert_at`.
    pub alerts: ConcurrentMap<String, AtomicU64>,
}

impl ProjectState {
    fn new(project: &Project, refill: Option<Arc<Notify>>) -> Self {
        let kind = project.budget.map_or(Period::Monthly, |b| b.period);
        let account = match refill {
            Some(refill) => Account::shared(kind, Utc::now(), refill),
            None => Account::new(kind, Utc::now()),
        };
        Self::with_account(project.name.clone(), account)
    }

    /// The state that counts requests refused before a project was known (label `project=""`).
    pub fn unauthenticated() -> Self {
        let account = Account::new(Period::Total, Utc::now());
        Self::with_account(Arc::from(""), account)
    }

    fn with_account(name: Arc<str>, account: Account) -> Self {
        ProjectState {
            duration: Latency::default(),
            first_byte: Latency::default(),
            name,
            account: Arc::new(account),
            usage: ConcurrentMap::default(),
            requests: ConcurrentMap::default(),
            rejections: ConcurrentMap::default(),
            unpriced: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            credential_accounts: ConcurrentMap::default(),
            meters: ConcurrentMap::default(),
            alerts: ConcurrentMap::default(),
        }
    }

    /// The budget account of a credential with a budget of its own.
    pub fn credential_account(
        &self,
        credential: &Arc<str>,
        kind: Period,
        now: chrono::DateTime<Utc>,
    ) -> Arc<Account> {
        if let Some(account) = self.credential_accounts.get(credential) {
            return account.clone();
        }
        self.credential_accounts
            .entry(credential.clone())
            .or_insert_with(|| Arc::new(Account::new(kind, now)))
            .clone()
    }

    /// The meters of a rate-limit rule.
    pub fn meters(&self, rule: &RateLimitRule) -> Arc<RuleMeters> {
        if let Some(meters) = self.meters.get(&rule.key) {
            return meters.clone();
        }
        self.meters
            .entry(rule.key.clone())
            .or_insert_with(|| Arc::new(RuleMeters::new(rule.rpm, rule.tpm, rule.rpd)))
            .clone()
    }

    pub fn cell(&self, credential: &Arc<str>, model: &Arc<str>) -> Arc<UsageCell> {
        let key = (credential.clone(), model.clone());
        if let Some(cell) = self.usage.get(&key) {
            return cell.clone();
        }
        self.usage.entry(key).or_default().clone()
    }

    pub fn count_request(&self, model: &Arc<str>, status: u16) {
        // Relaxed: independent monotonic counters, read only for metrics.
        self.with_request_counter(model, status, |c| c.fetch_add(1, Ordering::Relaxed));
    }

    /// The counter of requests of `model` answered `status`.
    pub fn request_counter(&self, model: &Arc<str>, status: u16) -> Arc<AtomicU64> {
        self.with_request_counter(model, status, Arc::clone)
    }

    /// `f` of the counter of requests of `model` answered `status`, made if new.
    fn with_request_counter<R>(
        &self,
        model: &Arc<str>,
        status: u16,
        f: impl FnOnce(&Arc<AtomicU64>) -> R,
    ) -> R {
        let key = (model.clone(), status);
        if let Some(counter) = self.requests.get(&key) {
            return f(&counter);
        }
        f(&self.requests.entry(key).or_default())
    }

    pub fn count_rejection(&self, reason: &'static str) {
        if let Some(counter) = self.rejections.get(reason) {
            counter.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.rejections
            .entry(reason)
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// All projects' state, by name.
#[derive(Debug, Default)]
pub struct Projects {
    by_name: ConcurrentMap<Arc<str>, Arc<ProjectState>>,
    /// Whether budgets are shared through Redis: decided by the config the process starts with
    /// (`store.redis_url`), since only `serve` starts the syncer; a reload does not change it.
    shared: OnceLock<bool>,
    /// Poked by a request refused for want of a shared budget's lease (see `store::redis`).
    refill: Arc<Notify>,
}

impl Projects {
    /// Makes sure every project of `config` has its state; existing state is kept as is.
    pub fn sync(&self, config: &Config) {
        let shared = *self.shared.get_or_init(|| config.store.redis_url.is_some());
        for project in &config.projects {
            if !self.by_name.contains_key(&project.name) {
                let refill = shared.then(|| self.refill.clone());
                self.by_name
                    .entry(project.name.clone())
                    .or_insert_with(|| Arc::new(ProjectState::new(project, refill)));
            }
        }
    }

    /// Whether budgets are shared through Redis.
    pub fn shared(&self) -> bool {
        self.shared.get().copied().unwrap_or(false)
    }

    /// What a request refused for want of a shared lease pokes.
    pub fn refill(&self) -> Arc<Notify> {
        self.refill.clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<ProjectState>> {
        self.by_name.get(name).map(|s| s.clone())
    }

    pub fn all(&self) -> Vec<Arc<ProjectState>> {
        let mut all: Vec<_> = self.by_name.iter().map(|s| s.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}
