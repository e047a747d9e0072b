//! Budgets shared by replicas through Redis (`[store] redis_url`): the [`SharedBudgets`]
//! syncer, a background task that leases each replica a slice of every budget period and pushes
//! the usage it settled.
//!
//! Per project and period, under `tollgate:{PROJECT}:KIND:START:` (the braces make the project a
//! Redis Cluster hash tag), Redis holds `spent` (a hash: the settled usage of all replicas),
//! `lease` (a hash: each live replica's outstanding lease per resource), `beat` (a sorted set:
//! when each replica's lease expires) and `seq` (a hash: the last batch of each replica added to
//! `spent`). The keys expire a day after the period ends. One Lua script
//! (`redis_sync.lua`) does a whole sync atomically: drop the leases of replicas gone silent, add
//! this replica's batch of settled usage once, write its lease, and grant or ask back a slice.
//!
//! Invariant, per resource: this replica's lease in Redis is `headroom + reserved +
//! settled-not-yet-pushed` of its local period, which the syncer knows exactly (see
//! [`crate::budget::Slice`]). So `spent + Σ leases` in Redis covers everything every live
//! replica has committed, and a grant (at most `limit − spent − Σ leases`) never lets the
//! replicas together commit past the limit: the single-node bound holds across replicas.
//!
//! No request waits on Redis: requests admit against the local slice; a refused one pokes the
//! syncer, which asks for more right away. Nothing is lost or counted twice: a batch keeps its
//! number until Redis acknowledges it and is replayed as is (the script adds a number once).
//! While Redis cannot be reached the failures are counted, logged once, and: `on_store_error =
//! "open"` lets each replica also use the budget that was free at its last sync (or, never
//! having synced, the whole limit, as a single node); `"closed"` keeps it to its leased slice,
//! and to nothing once the lease may have expired in Redis.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script};
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::budget::{Headroom, PeriodSpend, SharedSnapshot, SpendSnapshot};
use crate::config::OnStoreError;
use crate::state::AppState;

/// How long one connect or one command may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// A lease lives this many sync intervals without a sync (at least [`MIN_LEASE_TTL`]).
const LEASE_TTL_INTERVALS: u32 = 30;
const MIN_LEASE_TTL: Duration = Duration::from_secs(5);
/// The smallest slice is this fraction of the limit: what a replica may keep unused when the
/// budget runs out.
const SMALLEST_SLICE_DIVISOR: u64 = 100;
/// Keys outlive their period by a day, for late settles and for reports.
const KEY_GRACE_SECS: i64 = 86_400;
/// How long the last push at shutdown may try.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(3);

#[derive(Debug, Error)]
pub enum SharedBudgetsError {
    #[error("store.redis_url {url}: {source}")]
    Url { url: String, source: RedisError },
}

/// The handle of the syncer task. [`SharedBudgets::shutdown`] gives the leases back and pushes
/// the last usage; dropping the handle asks the same, without waiting for it.
#[derive(Debug)]
pub struct SharedBudgets {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    replica: String,
}

impl SharedBudgets {
    /// Starts the syncer when `store.redis_url` is set (else `None`), after a first sync, so the
    /// replica holds its slices before it serves. Call it before serving: the spend loaded from
    /// the ledger into the current periods is taken as already pushed by an earlier run.
    pub async fn start(state: Arc<AppState>) -> Result<Option<SharedBudgets>, SharedBudgetsError> {
        let (url, interval, on_error) = {
            let live = state.live.load();
            let store = &live.config.store;
            match &store.redis_url {
                Some(url) => (url.clone(), store.flush_interval, store.on_store_error),
                None => return Ok(None),
            }
        };
        if !state.projects.shared() {
            // Budgets are shared or not from the config the process started with.
            return Ok(None);
        }
        let client = Client::open(url.as_str()).map_err(|source| SharedBudgetsError::Url {
            url: state
                .live
                .load()
                .config
                .store
                .redis_url_redacted()
                .unwrap_or_default(),
            source,
        })?;
        let loaded = {
            let live = state.live.load();
            live.states
                .iter()
                .map(|s| {
                    let period = s.account.current();
                    (Arc::downgrade(&period), period.snapshot())
                })
                .collect()
        };
        let replica = format!("{:016x}", rand::random::<u64>());
        let lease_ttl = (interval * LEASE_TTL_INTERVALS).max(MIN_LEASE_TTL);
        let refill = state.projects.refill();
        let mut syncer = Syncer {
            state,
            client,
            connection: None,
            script: Script::new(include_str!("redis_sync.lua")),
            replica: replica.clone(),
            lease_ttl,
            on_error,
            loaded,
            slots: Vec::new(),
            streak: 0,
        };
        syncer.tick().await;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(syncer.run(interval, refill, stopped));
        tracing::info!(replica = %replica, "sharing budgets through Redis");
        Ok(Some(SharedBudgets {
            stop,
            task: Some(task),
            replica,
        }))
    }

    /// This process's replica id in Redis.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Gives back what is left of every lease and pushes the last usage (trying for a few
    /// seconds). Call it after the drain, when every request has settled.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            if let Err(err) = task.await {
                tracing::error!(error = %err, "the shared budget syncer failed");
            }
        }
    }
}

impl Drop for SharedBudgets {
    fn drop(&mut self) {
        // The task sees the stop (or the closed channel) and does its last push on its own.
        let _ = self.stop.send(true);
    }
}

/// The two resources of a budget, as indices into the per-resource arrays.
const TOKENS: usize = 0;
const MICRO_USD: usize = 1;

/// The settled counters pushed to Redis, in the script's order.
type Counters = [u64; 7];

fn counters(spend: &SpendSnapshot) -> Counters {
    [
        spend.tokens,
        spend.micro_usd,
        spend.requests,
        spend.input_tokens,
        spend.cached_input_tokens,
        spend.output_tokens,
        spend.reasoning_tokens,
    ]
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

struct Syncer {
    state: Arc<AppState>,
    client: Client,
    connection: Option<MultiplexedConnection>,
    script: Script,
    replica: String,
    lease_ttl: Duration,
    on_error: OnStoreError,
    /// Each project's period when the process started, with the spend loaded into it from the
    /// ledger: that spend was pushed to Redis when it was settled, by an earlier run. Weak, so
    /// it does not keep a period alive.
    loaded: Vec<(Weak<PeriodSpend>, SpendSnapshot)>,
    slots: Vec<Slot>,
    /// Consecutive failed syncs: 0 while healthy.
    streak: u64,
}

/// One budget period this replica syncs: the project's current one, or an earlier one that
/// still has requests settling in it or usage to push (retiring).
struct Slot {
    project: Arc<str>,
    period: Arc<PeriodSpend>,
    keys: [String; 4],
    expire_at: i64,
    /// The period's settled counters already added to `spent` in Redis.
    pushed: Counters,
    /// This replica's lease in Redis: granted − given back − pushed, per resource. Equals
    /// `headroom + reserved + settled-not-pushed` of the local period.
    lease: [i64; 2],
    /// The last batch number used.
    seq: u64,
    /// A batch sent and not acknowledged: replayed as it is until it is.
    unacked: Option<(u64, Counters)>,
    /// Whether the period is its project's current one.
    current: bool,
    /// The current config's limits (for a retiring period: none, so nothing is granted).
    limits: [Option<u64>; 2],
    /// Whether the resource was limited at the last sync (a resource that becomes limited
    /// starts from an empty headroom).
    limited: [bool; 2],
    /// `on_store_error = "open"`: headroom an outage added beyond the lease, not yet taken back.
    allowance: [i64; 2],
    /// The budget free (unleased) in Redis at the last sync; `None` before the first.
    free: Option<[i64; 2]>,
    last_ok: Option<Instant>,
    failing: bool,
}

/// What one sync sends besides the keys.
struct Call {
    seq: u64,
    batch: Counters,
    lease: [i64; 2],
    have: [i64; 2],
    need: [u64; 2],
    leave: bool,
}

/// The script's answer.
struct Reply {
    grant: [i64; 2],
    give_back: [i64; 2],
    view: SharedSnapshot,
    free: [i64; 2],
}

impl Reply {
    fn parse(values: &[i64]) -> Option<Reply> {
        let [gt, gu, bt, bu, st, su, lt, lu, live, ft, fu] = *values else {
            return None;
        };
        let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
        Some(Reply {
            grant: [gt.max(0), gu.max(0)],
            give_back: [bt.max(0), bu.max(0)],
            view: SharedSnapshot {
                spent_tokens: unsigned(st),
                spent_micro_usd: unsigned(su),
                leased_tokens: unsigned(lt),
                leased_micro_usd: unsigned(lu),
                replicas: unsigned(live),
            },
            free: [ft, fu],
        })
    }
}

impl Slot {
    fn new(project: Arc<str>, period: Arc<PeriodSpend>, loaded: Option<&SpendSnapshot>) -> Slot {
        let prefix = format!(
            "tollgate:{{{project}}}:{}:{}:",
            period.kind.as_str(),
            period.start
        );
        let keys = ["spent", "lease", "beat", "seq"].map(|k| format!("{prefix}{k}"));
        Slot {
            project,
            keys,
            expire_at: period.end.map_or(0, |end| end + KEY_GRACE_SECS),
            pushed: loaded.map_or([0; 7], counters),
            lease: [0; 2],
            seq: 0,
            unacked: None,
            current: false,
            limits: [None; 2],
            limited: [false; 2],
            allowance: [0; 2],
            free: None,
            last_ok: None,
            failing: false,
            period,
        }
    }

    fn headroom(&self, resource: usize) -> Option<&Headroom> {
        let slice = self.period.slice()?;
        Some(if resource == TOKENS {
            &slice.tokens
        } else {
            &slice.micro_usd
        })
    }

    /// Settled usage not yet pushed.
    fn unpushed(&self) -> Counters {
        let now = counters(&self.period.snapshot());
        let mut delta = [0; 7];
        for (i, d) in delta.iter_mut().enumerate() {
            *d = now[i].saturating_sub(self.pushed[i]);
        }
        delta
    }

    /// Settled usage neither pushed nor in the unacknowledged batch.
    fn unbatched(&self) -> Counters {
        let mut delta = self.unpushed();
        if let Some((_, batch)) = &self.unacked {
            for (d, b) in delta.iter_mut().zip(batch) {
                *d = d.saturating_sub(*b);
            }
        }
        delta
    }

    /// Local work before a sync: a resource that became limited starts from an empty headroom,
    /// one that is not limited is kept at zero (it is never checked), a retiring period gives
    /// back what it holds; then the next batch is taken.
    fn prepare(&mut self) {
        for resource in [TOKENS, MICRO_USD] {
            let limited = self.current && self.limits[resource].is_some();
            let Some(headroom) = self.headroom(resource) else {
                continue;
            };
            let change = if !self.current {
                -headroom.take_back(i64::MAX)
            } else if !limited || !self.limited[resource] {
                headroom.rebase()
            } else {
                0
            };
            self.lease[resource] += change;
            self.limited[resource] = limited;
        }
        if self.unacked.is_none() {
            let batch = self.unpushed();
            if batch != [0; 7] {
                self.seq += 1;
                self.unacked = Some((self.seq, batch));
            }
        }
    }

    fn call(&self, leave: bool) -> Call {
        let (seq, batch) = self.unacked.unwrap_or((0, [0; 7]));
        let mut have = [0; 2];
        let mut need = [0; 2];
        for resource in [TOKENS, MICRO_USD] {
            if let Some(headroom) = self.headroom(resource) {
                have[resource] = headroom.left();
                need[resource] = headroom.take_wanted();
            }
        }
        Call {
            seq,
            batch,
            lease: [
                self.lease[TOKENS] - to_i64(batch[TOKENS]),
                self.lease[MICRO_USD] - to_i64(batch[MICRO_USD]),
            ],
            have,
            need,
            leave,
        }
    }

    fn on_success(&mut self, reply: &Reply) {
        if let Some((_, batch)) = self.unacked.take() {
            for (pushed, added) in self.pushed.iter_mut().zip(batch) {
                *pushed += added;
            }
            self.lease[TOKENS] -= to_i64(batch[TOKENS]);
            self.lease[MICRO_USD] -= to_i64(batch[MICRO_USD]);
        }
        // What an outage allowed and was not used was taken back before this call; the rest
        // was used and is in the lease just written.
        self.failing = false;
        self.allowance = [0; 2];
        for resource in [TOKENS, MICRO_USD] {
            let Some(headroom) = self.headroom(resource) else {
                continue;
            };
            let mut change = 0;
            if reply.grant[resource] > 0 {
                change += headroom.grant(reply.grant[resource]);
            }
            if reply.give_back[resource] > 0 {
                change -= headroom.take_back(reply.give_back[resource]);
            }
            self.lease[resource] += change;
        }
        self.free = Some(reply.free);
        self.last_ok = Some(Instant::now());
        if let Some(slice) = self.period.slice() {
            slice.view.store(&reply.view);
        }
    }

    fn on_failure(&mut self, call: &Call, on_error: OnStoreError, lease_ttl: Duration) {
        for resource in [TOKENS, MICRO_USD] {
            if let Some(headroom) = self.headroom(resource) {
                headroom.restore_wanted(call.need[resource]);
            }
        }
        let first = !std::mem::replace(&mut self.failing, true);
        match on_error {
            OnStoreError::Open if first && self.current => {
                for resource in [TOKENS, MICRO_USD] {
                    let (Some(limit), true) = (self.limits[resource], self.limited[resource])
                    else {
                        continue;
                    };
                    // What the other replicas had not taken at the last sync; never having
                    // synced, the whole limit (in local terms: limit − this replica's cap).
                    let extra = match self.free {
                        Some(free) => free[resource],
                        None => {
                            to_i64(limit) - to_i64(self.pushed[resource]) - self.lease[resource]
                        }
                    }
                    .max(0);
                    if let Some(headroom) = self.headroom(resource) {
                        self.lease[resource] += headroom.grant(extra);
                        self.allowance[resource] += extra;
                    }
                }
            }
            OnStoreError::Open => {}
            OnStoreError::Closed => {
                // Redis drops a lease not renewed within its lifetime and may grant it to
                // another replica: stop using it well before.
                let expired = self.last_ok.is_none_or(|at| at.elapsed() > lease_ttl / 2);
                if expired {
                    for resource in [TOKENS, MICRO_USD] {
                        if let Some(headroom) = self.headroom(resource) {
                            self.lease[resource] -= headroom.take_back(i64::MAX);
                        }
                    }
                }
            }
        }
    }

    /// Redis answers again after an outage: takes back what the outage allowed and is still
    /// unused, before the lease is written and a grant decided. Returns what it took.
    fn reclaim(&mut self) -> [i64; 2] {
        let mut taken = [0; 2];
        for resource in [TOKENS, MICRO_USD] {
            let Some(headroom) = self.headroom(resource) else {
                continue;
            };
            taken[resource] = headroom.take_back(self.allowance[resource]);
            self.lease[resource] -= taken[resource];
            self.allowance[resource] -= taken[resource];
        }
        taken
    }

    /// The sync after a [`Slot::reclaim`] failed: the outage goes on, so does its allowance.
    fn restore(&mut self, taken: [i64; 2]) {
        for resource in [TOKENS, MICRO_USD] {
            if taken[resource] > 0 {
                if let Some(headroom) = self.headroom(resource) {
                    self.lease[resource] += headroom.grant(taken[resource]);
                    self.allowance[resource] += taken[resource];
                }
            }
        }
    }

    /// A retiring period with no request left in it and everything pushed: leave it.
    fn finished(&self) -> bool {
        !self.current
            && Arc::strong_count(&self.period) == 1
            && self.unacked.is_none()
            && self.unpushed() == [0; 7]
    }
}

impl Syncer {
    async fn run(
        mut self,
        interval: Duration,
        refill: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Refills asked by refused requests are spaced, so a flood of refusals at an exhausted
        // budget costs Redis a few syncs a tick, not one per request.
        let spacing = interval / 8;
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = refill.notified() => {
                    let next = last + spacing;
                    if next > Instant::now() {
                        tokio::time::sleep_until(next.into()).await;
                    }
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
            }
            last = Instant::now();
            self.tick().await;
        }
        self.finish().await;
    }

    /// Finds each budget's current period, then syncs every period held.
    async fn tick(&mut self) {
        self.adopt();
        // Connect first: while Redis is away every period fails alike, without a wait each.
        let mut failed = self.connection().await.err();
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            slot.prepare();
            let reclaimed = if failed.is_none() && slot.failing {
                slot.reclaim()
            } else {
                [0; 2]
            };
            let leave = slot.finished();
            let call = slot.call(leave);
            let result = match &failed {
                Some(_) => None,
                None => Some(self.send(index, &call).await),
            };
            let slot = &mut self.slots[index];
            match result {
                Some(Ok(reply)) => slot.on_success(&reply),
                Some(Err(err)) => {
                    slot.restore(reclaimed);
                    slot.on_failure(&call, self.on_error, self.lease_ttl);
                    failed = Some(err);
                }
                None => slot.on_failure(&call, self.on_error, self.lease_ttl),
            }
        }
        if failed.is_none() {
            self.slots
                .retain(|slot| !(slot.finished() && slot.last_ok.is_some()));
        }
        self.account(failed);
    }

    /// Counts and logs a failed sync (once per streak) or a recovery.
    fn account(&mut self, failed: Option<RedisError>) {
        match failed {
            Some(err) => {
                self.state.metrics.count_store_error_redis();
                if self.streak == 0 {
                    tracing::error!(
                        error = %err,
                        on_store_error = self.on_error.as_str(),
                        "cannot reach Redis for shared budgets; {}",
                        match self.on_error {
                            OnStoreError::Open => "serving on local counters and the budget free at the last sync",
                            OnStoreError::Closed => "serving only what is already leased",
                        }
                    );
                }
                self.streak += 1;
            }
            None => {
                if self.streak > 0 {
                    tracing::info!(
                        failed_syncs = self.streak,
                        "Redis is reachable again; the usage settled meanwhile is pushed"
                    );
                    self.streak = 0;
                }
            }
        }
    }

    /// Makes sure each project with a budget has a slot for its current period, and marks the
    /// others retiring.
    fn adopt(&mut self) {
        let live = self.state.live.load_full();
        let now = chrono::Utc::now();
        for slot in &mut self.slots {
            slot.current = false;
            slot.limits = [None; 2];
        }
        for (project, state) in live.config.projects.iter().zip(live.states.iter()) {
            let Some(budget) = project.budget else {
                continue;
            };
            let period = state.account.period(budget.period, now);
            if period.slice().is_none() {
                continue;
            }
            let index = match self
                .slots
                .iter()
                .position(|s| Arc::ptr_eq(&s.period, &period))
            {
                Some(index) => index,
                None => {
                    let loaded = self
                        .loaded
                        .iter()
                        .position(|(p, _)| std::ptr::eq(p.as_ptr(), Arc::as_ptr(&period)))
                        .map(|i| self.loaded.swap_remove(i).1);
                    self.slots
                        .push(Slot::new(project.name.clone(), period, loaded.as_ref()));
                    self.slots.len() - 1
                }
            };
            let slot = &mut self.slots[index];
            slot.current = true;
            slot.limits = [budget.tokens, budget.micro_usd];
        }
        self.loaded.retain(|(p, _)| p.strong_count() > 0);
    }

    async fn connection(&mut self) -> Result<MultiplexedConnection, RedisError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        self.connection = Some(connection.clone());
        Ok(connection)
    }

    async fn send(&mut self, index: usize, call: &Call) -> Result<Reply, RedisError> {
        let result = self.invoke(index, call).await;
        if result.is_err() {
            // A new connection next time: this one may be dead.
            self.connection = None;
        }
        result
    }

    async fn invoke(&mut self, index: usize, call: &Call) -> Result<Reply, RedisError> {
        let mut connection = self.connection().await?;
        let slot = &self.slots[index];
        let smallest =
            |limit: Option<u64>| limit.map_or(0, |l| (l / SMALLEST_SLICE_DIVISOR).max(1));
        let limit = |resource: usize| match (slot.limited[resource], slot.limits[resource]) {
            (true, Some(limit)) => to_i64(limit),
            _ => -1,
        };
        let mut invocation = self.script.prepare_invoke();
        for key in &slot.keys {
            invocation.key(key);
        }
        invocation
            .arg(&self.replica)
            .arg(call.seq)
            .arg(&call.batch[..])
            .arg(&call.lease[..])
            .arg(&call.have[..])
            .arg(&call.need[..])
            .arg(limit(TOKENS))
            .arg(limit(MICRO_USD))
            .arg(smallest(slot.limits[TOKENS]))
            .arg(smallest(slot.limits[MICRO_USD]))
            .arg(u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(slot.expire_at)
            .arg(u8::from(call.leave));
        let values: Vec<i64> = invocation.invoke_async(&mut connection).await?;
        Reply::parse(&values).ok_or_else(|| {
            RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the shared budget script answered an unexpected shape",
            ))
        })
    }

    /// After the drain: give every lease back and push the last usage, trying until the
    /// deadline.
    async fn finish(mut self) {
        // Already failing: one more try each, not a wait for an outage to end.
        let deadline = Instant::now()
            + if self.streak > 0 {
                Duration::ZERO
            } else {
                SHUTDOWN_DEADLINE
            };
        for slot in &mut self.slots {
            // Retiring: `prepare` takes back all headroom; nothing is reserved any more.
            slot.current = false;
            slot.limits = [None; 2];
        }
        let mut index = 0;
        while index < self.slots.len() {
            self.slots[index].prepare();
            // Leave with the call that carries the last of the usage.
            let leave = self.slots[index].unbatched() == [0; 7];
            let call = self.slots[index].call(leave);
            match self.send(index, &call).await {
                Ok(reply) => {
                    self.slots[index].on_success(&reply);
                    if leave {
                        index += 1;
                    }
                }
                Err(err) if Instant::now() >= deadline => {
                    let slot = &self.slots[index];
                    let unpushed = slot.unpushed();
                    tracing::error!(
                        error = %err,
                        project = %slot.project,
                        unpushed_tokens = unpushed[TOKENS],
                        unpushed_micro_usd = unpushed[MICRO_USD],
                        "cannot push the last usage to Redis; it stays in this replica's ledger only"
                    );
                    self.state.metrics.count_store_error_redis();
                    index += 1;
                }
                Err(_) => {
                    self.state.metrics.count_store_error_redis();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
