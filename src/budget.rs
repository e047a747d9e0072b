//! Budget accounts: spend per period, reservations and settlement. Pure: no I/O, no locks.
//!
//! Invariant: for every resource (tokens, micro-dollars) an account's `committed` counter equals
//! its settled spend plus the reservations of the requests still in flight. A request is admitted
//! only if `committed + estimate <= limit`, by a compare-and-swap, so concurrent admissions can
//! never commit more than the limit between them. Spend can pass the limit only by what a
//! request's real usage exceeds its own estimate (see README, "Budget guarantee").
//!
//! Each reservation keeps the period it was admitted in and settles there, so a request that
//! straddles a period boundary is counted once, in the period that admitted it.
//!
//! Shared budgets (`[store] redis_url`): a period also has a [`Slice`], the part of the budget
//! this replica leased from Redis. A request is then admitted only if it also fits the slice's
//! headroom, taken by a second compare-and-swap; the syncer (`store::redis`) is the only one that
//! adds to or takes from the headroom otherwise, so it knows its lease exactly.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::config::BudgetLimit;
use crate::period::Period;
use crate::usage::Usage;

/// A charge in both of the budget's units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    pub tokens: u64,
    pub micro_usd: u64,
}

/// The spend of one account in one period.
#[derive(Debug)]
pub struct PeriodSpend {
    pub kind: Period,
    pub start: i64,
    pub end: Option<i64>,
    /// Settled spend plus outstanding reservations.
    committed_tokens: AtomicU64,
    committed_micro_usd: AtomicU64,
    /// Settled spend only.
    spent_tokens: AtomicU64,
    spent_micro_usd: AtomicU64,
    input_tokens: AtomicU64,
    cached_input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    reasoning_tokens: AtomicU64,
    requests: AtomicU64,
    /// Bit `i` set: alert threshold `i` of the project's `alert_at` has fired this period.
    alerts_fired: AtomicU64,
    /// The replica's slice of a budget shared through Redis; `None` for a budget of this
    /// process alone.
    slice: Option<Slice>,
}

/// This replica's slice of one shared budget period, per resource.
///
/// Invariant: for each resource, `headroom + committed` (of the period) changes only through
/// [`Slice`]'s syncer methods ([`Headroom::grant`], [`Headroom::take_back`],
/// [`Headroom::rebase`]): a reservation moves an amount from headroom to committed, a settle
/// moves the difference between estimate and charge back, so the syncer can track its lease
/// exactly by adding up what those methods return.
#[derive(Debug, Default)]
pub struct Slice {
    pub tokens: Headroom,
    pub micro_usd: Headroom,
    /// The replicas' view in Redis at the last sync, for reports.
    pub view: SharedView,
}

/// What this replica may still commit of one resource.
#[derive(Debug, Default)]
pub struct Headroom {
    /// Leased and not yet committed. Below zero only when requests used more than their
    /// estimates, or for a resource the budget does not limit (never checked then).
    left: AtomicI64,
    /// The largest estimate refused for want of headroom since the syncer last looked.
    wanted: AtomicU64,
}

/// The replicas' shared spend as Redis reported it at the last successful sync.
#[derive(Debug, Default)]
pub struct SharedView {
    synced: AtomicBool,
    spent_tokens: AtomicU64,
    spent_micro_usd: AtomicU64,
    leased_tokens: AtomicU64,
    leased_micro_usd: AtomicU64,
    replicas: AtomicU64,
}

/// A read of [`SharedView`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedSnapshot {
    /// Settled spend of all replicas, as pushed to Redis.
    pub spent_tokens: u64,
    pub spent_micro_usd: u64,
    /// Leased to live replicas and not yet pushed as spend.
    pub leased_tokens: u64,
    pub leased_micro_usd: u64,
    pub replicas: u64,
}

impl SharedView {
    pub fn store(&self, snapshot: &SharedSnapshot) {
        // Relaxed: figures for reports only; `synced` last with Release so a reader that sees it
        // sees figures at least as new.
        self.spent_tokens
            .store(snapshot.spent_tokens, Ordering::Relaxed);
        self.spent_micro_usd
            .store(snapshot.spent_micro_usd, Ordering::Relaxed);
        self.leased_tokens
            .store(snapshot.leased_tokens, Ordering::Relaxed);
        self.leased_micro_usd
            .store(snapshot.leased_micro_usd, Ordering::Relaxed);
        self.replicas.store(snapshot.replicas, Ordering::Relaxed);
        self.synced.store(true, Ordering::Release);
    }

    /// `None` until the first successful sync.
    pub fn load(&self) -> Option<SharedSnapshot> {
        if !self.synced.load(Ordering::Acquire) {
            return None;
        }
        Some(SharedSnapshot {
            spent_tokens: self.spent_tokens.load(Ordering::Relaxed),
            spent_micro_usd: self.spent_micro_usd.load(Ordering::Relaxed),
            leased_tokens: self.leased_tokens.load(Ordering::Relaxed),
            leased_micro_usd: self.leased_micro_usd.load(Ordering::Relaxed),
            replicas: self.replicas.load(Ordering::Relaxed),
        })
    }
}

impl Headroom {
    /// Takes `amount` for a reservation. With `limited`, only if it fits (and something is left,
    /// as `reserve_one` asks of a limit); without, always (the resource is not shared).
    fn take(&self, estimate: u64, limited: bool) -> bool {
        let amount = to_i64(estimate);
        if !limited {
            self.left.fetch_sub(amount, Ordering::AcqRel);
            return true;
        }
        // AcqRel: as in `reserve_one`, each admission sees every earlier take, give and grant.
        let taken = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left > 0 && amount <= left).then(|| left - amount)
            })
            .is_ok();
        if !taken {
            // Relaxed: a hint for the syncer's next grant, read with a swap.
            self.wanted.fetch_max(estimate, Ordering::Relaxed);
        }
        taken
    }

    /// Gives back the difference between a reservation and its charge.
    fn settle(&self, reserved: u64, actual: u64) {
        self.left
            .fetch_add(to_i64(reserved) - to_i64(actual), Ordering::AcqRel);
    }

    /// What is left now (it may change at once).
    pub fn left(&self) -> i64 {
        self.left.load(Ordering::Acquire)
    }

    /// Adds a grant. Returns the change of the lease: `amount`.
    pub fn grant(&self, amount: i64) -> i64 {
        self.left.fetch_add(amount, Ordering::AcqRel);
        amount
    }

    /// Takes back up to `most` of what is left and not committed. Returns what it took: an
    /// admission can never be left without the lease it was admitted against.
    pub fn take_back(&self, most: i64) -> i64 {
        if most <= 0 {
            return 0;
        }
        match self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left > 0).then(|| left - left.min(most))
            }) {
            Ok(previous) => previous.min(most),
            Err(_) => 0,
        }
    }

    /// Sets what is left to zero. Returns the change of the lease (minus what was left): for a
    /// resource the budget does not limit, whose headroom is never checked.
    pub fn rebase(&self) -> i64 {
        -self.left.swap(0, Ordering::AcqRel)
    }

    /// The largest refused estimate since the last call, for the next grant.
    pub fn take_wanted(&self) -> u64 {
        self.wanted.swap(0, Ordering::Relaxed)
    }

    /// Puts back a demand that could not be asked for.
    pub fn restore_wanted(&self, amount: u64) {
        self.wanted.fetch_max(amount, Ordering::Relaxed);
    }
}

fn to_i64(amount: u64) -> i64 {
    i64::try_from(amount).unwrap_or(i64::MAX)
}

/// A consistent-enough read of a period's counters, for reports and gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpendSnapshot {
    pub tokens: u64,
    pub micro_usd: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub requests: u64,
    pub reserved_tokens: u64,
    pub reserved_micro_usd: u64,
}

impl PeriodSpend {
    fn new(kind: Period, now: DateTime<Utc>, shared: bool) -> Self {
        let (start, end) = kind.bounds(now);
        PeriodSpend {
            kind,
            start,
            end,
            committed_tokens: AtomicU64::new(0),
            committed_micro_usd: AtomicU64::new(0),
            spent_tokens: AtomicU64::new(0),
            spent_micro_usd: AtomicU64::new(0),
            input_tokens: AtomicU64::new(0),
            cached_input_tokens: AtomicU64::new(0),
            output_tokens: AtomicU64::new(0),
            reasoning_tokens: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            alerts_fired: AtomicU64::new(0),
            slice: shared.then(Slice::default),
        }
    }

    /// The fraction of `limit` settled so far: the larger of the token and dollar fractions.
    pub fn fraction_spent(&self, limit: &BudgetLimit) -> f64 {
        let tokens = limit.tokens.map_or(0.0, |l| {
            self.spent_tokens.load(Ordering::Relaxed) as f64 / l.max(1) as f64
        });
        let usd = limit.micro_usd.map_or(0.0, |l| {
            self.spent_micro_usd.load(Ordering::Relaxed) as f64 / l.max(1) as f64
        });
        tokens.max(usd)
    }

    /// The thresholds of `alert_at` (by index) that settled spend has reached and that had not
    /// fired yet this period; each is returned once, to exactly one caller.
    pub fn crossed(&self, limit: &BudgetLimit, alert_at: &[f64]) -> Vec<usize> {
        let spent = self.fraction_spent(limit);
        let mut crossed = Vec::new();
        for (index, &threshold) in alert_at.iter().enumerate().take(64) {
            if spent + 1e-9 < threshold {
                break;
            }
            let bit = 1u64 << index;
            // Relaxed: the bit itself is the whole state; fetch_or hands it to one caller.
            if self.alerts_fired.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                crossed.push(index);
            }
        }
        crossed
    }

    /// The replica's slice of a shared budget (`None` when the budget is this process's alone).
    pub fn slice(&self) -> Option<&Slice> {
        self.slice.as_ref()
    }

    fn holds(&self, kind: Period, now: i64) -> bool {
        self.kind == kind && now >= self.start && self.end.is_none_or(|end| now < end)
    }

    pub fn snapshot(&self) -> SpendSnapshot {
        // Relaxed throughout: each counter is exact on its own; a report may see a settle
        // half-applied across counters, which is harmless for reading.
        let tokens = self.spent_tokens.load(Ordering::Relaxed);
        let micro_usd = self.spent_micro_usd.load(Ordering::Relaxed);
        SpendSnapshot {
            tokens,
            micro_usd,
            input_tokens: self.input_tokens.load(Ordering::Relaxed),
            cached_input_tokens: self.cached_input_tokens.load(Ordering::Relaxed),
            output_tokens: self.output_tokens.load(Ordering::Relaxed),
            reasoning_tokens: self.reasoning_tokens.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            reserved_tokens: self
                .committed_tokens
                .load(Ordering::Relaxed)
                .saturating_sub(tokens),
            reserved_micro_usd: self
                .committed_micro_usd
                .load(Ordering::Relaxed)
                .saturating_sub(micro_usd),
        }
    }

    /// Adds spend that was settled elsewhere (a ledger loaded at start, another replica).
    pub fn preload(&self, spent: &SpendSnapshot) {
        for (counter, value) in [
            (&self.committed_tokens, spent.tokens),
            (&self.committed_micro_usd, spent.micro_usd),
            (&self.spent_tokens, spent.tokens),
            (&self.spent_micro_usd, spent.micro_usd),
            (&self.input_tokens, spent.input_tokens),
            (&self.cached_input_tokens, spent.cached_input_tokens),
            (&self.output_tokens, spent.output_tokens),
            (&self.reasoning_tokens, spent.reasoning_tokens),
            (&self.requests, spent.requests),
        ] {
            counter.fetch_add(value, Ordering::Relaxed);
        }
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    Tokens { limit: u64 },
    Usd { limit_micro_usd: u64 },
}

/// One budget account (a project's). Limits are not stored here: they come from the config
/// snapshot of each request, so a reload changes limits without touching spend.
#[derive(Debug)]
pub struct Account {
    current: ArcSwap<PeriodSpend>,
    in_flight: AtomicI64,
    /// Shared budgets: poked when a request is refused for want of headroom, so the syncer
    /// asks Redis for more at once (the refused request does not wait for it).
    refill: Option<Arc<Notify>>,
}

impl Account {
    pub fn new(kind: Period, now: DateTime<Utc>) -> Self {
        Account {
            current: ArcSwap::from_pointee(PeriodSpend::new(kind, now, false)),
            in_flight: AtomicI64::new(0),
            refill: None,
        }
    }

    /// An account whose budget is shared with other replicas: each of its periods starts with an
    /// empty [`Slice`] and admits nothing until the syncer grants it a lease.
    pub fn shared(kind: Period, now: DateTime<Utc>, refill: Arc<Notify>) -> Self {
        Account {
            current: ArcSwap::from_pointee(PeriodSpend::new(kind, now, true)),
            in_flight: AtomicI64::new(0),
            refill: Some(refill),
        }
    }

    /// The period of `kind` that holds `now`, rolling the account over when the current one
    /// has ended (or the kind changed on reload). Requests still in flight keep their own
    /// `Arc` to the old period and settle there.
    pub fn period(&self, kind: Period, now: DateTime<Utc>) -> Arc<PeriodSpend> {
        let current = self.current.load_full();
        if current.holds(kind, now.timestamp()) {
            return current;
        }
        let fresh = Arc::new(PeriodSpend::new(kind, now, self.refill.is_some()));
        // Only one racer installs its period; the others adopt the winner's.
        let previous = self.current.compare_and_swap(&current, fresh.clone());
        if Arc::ptr_eq(&previous, &current) {
            fresh
        } else {
            let installed = self.current.load_full();
            if installed.holds(kind, now.timestamp()) {
                installed
            } else {
                // A racer installed a different kind (a concurrent reload); take ours anyway.
                self.current.store(fresh.clone());
                fresh
            }
        }
    }

    /// The current period without rolling it over (for reports).
    pub fn current(&self) -> Arc<PeriodSpend> {
        self.current.load_full()
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Reserves `estimate` against `limit` in the period that holds `now`.
    pub fn reserve(
        self: &Arc<Self>,
        limit: Option<&BudgetLimit>,
        estimate: Charge,
        now: DateTime<Utc>,
    ) -> Result<Reservation, Exhausted> {
        let kind = limit.map_or(Period::Monthly, |l| l.period);
        let period = self.period(kind, now);
        let token_limit = limit.and_then(|l| l.tokens);
        let usd_limit = limit.and_then(|l| l.micro_usd);
        reserve_one(&period.committed_tokens, estimate.tokens, token_limit)
            .map_err(|limit| Exhausted::Tokens { limit })?;
        if let Err(limit_micro_usd) =
            reserve_one(&period.committed_micro_usd, estimate.micro_usd, usd_limit)
        {
            // Give the tokens back; a concurrent admission may have been refused meanwhile,
            // which errs on the safe side.
            period
                .committed_tokens
                .fetch_sub(estimate.tokens, Ordering::AcqRel);
            return Err(Exhausted::Usd { limit_micro_usd });
        }
        if let Some(slice) = &period.slice {
            if let Err(exhausted) = take_from_slice(slice, estimate, token_limit, usd_limit) {
                period
                    .committed_tokens
                    .fetch_sub(estimate.tokens, Ordering::AcqRel);
                period
                    .committed_micro_usd
                    .fetch_sub(estimate.micro_usd, Ordering::AcqRel);
                if let Some(refill) = &self.refill {
                    refill.notify_one();
                }
                return Err(exhausted);
            }
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Reservation {
            account: self.clone(),
            period,
            estimate,
            settled: false,
        })
    }
}

/// Takes a reservation from the replica's slice of a shared budget, checking only the limited
/// resources. The other replicas' view of a resource is `limit`, so that is what a refusal names.
fn take_from_slice(
    slice: &Slice,
    estimate: Charge,
    token_limit: Option<u64>,
    usd_limit: Option<u64>,
) -> Result<(), Exhausted> {
    if !slice.tokens.take(estimate.tokens, token_limit.is_some()) {
        return Err(Exhausted::Tokens {
            limit: token_limit.unwrap_or(0),
        });
    }
    if !slice
        .micro_usd
        .take(estimate.micro_usd, usd_limit.is_some())
    {
        slice.tokens.settle(estimate.tokens, 0);
        return Err(Exhausted::Usd {
            limit_micro_usd: usd_limit.unwrap_or(0),
        });
    }
    Ok(())
}

/// Adds `amount` to `committed` unless that would pass `limit`. Returns the limit on refusal.
fn reserve_one(committed: &AtomicU64, amount: u64, limit: Option<u64>) -> Result<(), u64> {
    let Some(limit) = limit else {
        committed.fetch_add(amount, Ordering::AcqRel);
        return Ok(());
    };
    // AcqRel on success: the admission decision must see every earlier commit and settle of
    // this counter, and publish its own before any later admission decides.
    committed
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
            let next = c.checked_add(amount)?;
            (next <= limit && c < limit).then_some(next)
        })
        .map(|_| ())
        .map_err(|_| limit)
}

/// An admitted request's hold on its account. Settle it with the real usage; if it is dropped
/// unsettled (a panic, a cancelled task) the estimate is charged, never nothing.
#[derive(Debug)]
pub struct Reservation {
    account: Arc<Account>,
    period: Arc<PeriodSpend>,
    estimate: Charge,
    settled: bool,
}

impl Reservation {
    pub fn estimate(&self) -> Charge {
        self.estimate
    }

    pub fn period(&self) -> &Arc<PeriodSpend> {
        &self.period
    }

    /// Replaces the reservation with the real charge.
    pub fn settle(mut self, charge: Charge, usage: &Usage) {
        self.apply(charge, usage, true);
    }

    /// Gives the reservation back without counting a request (another check refused it).
    pub fn cancel(mut self) {
        self.apply(Charge::default(), &Usage::default(), false);
    }

    fn apply(&mut self, charge: Charge, usage: &Usage, count: bool) {
        if self.settled {
            return;
        }
        self.settled = true;
        let p = &self.period;
        // Spend first, then move `committed` by the difference: a reader that sees the new
        // committed value also sees the spend (Release pairs with the Acquire in reserve).
        p.spent_tokens.fetch_add(charge.tokens, Ordering::Relaxed);
        p.spent_micro_usd
            .fetch_add(charge.micro_usd, Ordering::Relaxed);
        p.input_tokens
            .fetch_add(usage.input_tokens, Ordering::Relaxed);
        p.cached_input_tokens
            .fetch_add(usage.cached_input_tokens, Ordering::Relaxed);
        p.output_tokens
            .fetch_add(usage.output_tokens, Ordering::Relaxed);
        p.reasoning_tokens
            .fetch_add(usage.reasoning_tokens, Ordering::Relaxed);
        if count {
            p.requests.fetch_add(1, Ordering::Relaxed);
        }
        adjust(&p.committed_tokens, self.estimate.tokens, charge.tokens);
        adjust(
            &p.committed_micro_usd,
            self.estimate.micro_usd,
            charge.micro_usd,
        );
        if let Some(slice) = &p.slice {
            slice.tokens.settle(self.estimate.tokens, charge.tokens);
            slice
                .micro_usd
                .settle(self.estimate.micro_usd, charge.micro_usd);
        }
        self.account.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            tracing::warn!("reservation dropped unsettled; charging its estimate");
            let estimate = self.estimate;
            self.apply(estimate, &Usage::default(), true);
        }
    }
}

fn adjust(committed: &AtomicU64, reserved: u64, actual: u64) {
    if actual >= reserved {
        committed.fetch_add(actual - reserved, Ordering::AcqRel);
    } else {
        committed.fetch_sub(reserved - actual, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-26T12:00:00Z".parse().unwrap()
    }

    fn limit(tokens: u64) -> BudgetLimit {
        BudgetLimit {
            tokens: Some(tokens),
            micro_usd: None,
            period: Period::Monthly,
        }
    }

    fn usage(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        }
    }

    #[test]
    fn admits_until_committed_would_pass_the_limit() {
        let account = Arc::new(Account::new(Period::Monthly, now()));
        let l = limit(100);
        let est = Charge {
            tokens: 40,
            micro_usd: 0,
        };
        let a = account.reserve(Some(&l), est, now()).unwrap();
        let b = account.reserve(Some(&l), est, now()).unwrap();
        assert_eq!(
            account.reserve(Some(&l), est, now()).unwrap_err(),
            Exhausted::Tokens { limit: 100 }
        );
        a.settle(
            Charge {
                tokens: 10,
                micro_usd: 0,
            },
            &usage(5, 5),
        );
        // 10 spent + 40 reserved: another 40 fits.
        let c = account.reserve(Some(&l), est, now()).unwrap();
        let snap = account.current().snapshot();
        assert_eq!(snap.tokens, 10);
        assert_eq!(snap.reserved_tokens, 80);
        assert_eq!(account.in_flight(), 2);
        drop(b);
        c.settle(
            Charge {
                tokens: 40,
                micro_usd: 0,
            },
            &usage(20, 20),
        );
        let snap = account.current().snapshot();
        assert_eq!(
            snap.tokens, 90,
            "the dropped reservation is charged its estimate"
        );
        assert_eq!(snap.reserved_tokens, 0);
        assert_eq!(snap.requests, 3);
        assert_eq!(account.in_flight(), 0);
    }

    #[test]
    fn a_refused_usd_reservation_gives_its_tokens_back() {
        let account = Arc::new(Account::new(Period::Monthly, now()));
        let l = BudgetLimit {
            tokens: Some(1000),
            micro_usd: Some(5),
            period: Period::Monthly,
        };
        let est = Charge {
            tokens: 10,
            micro_usd: 10,
        };
        assert_eq!(
            account.reserve(Some(&l), est, now()).unwrap_err(),
            Exhausted::Usd { limit_micro_usd: 5 }
        );
        assert_eq!(account.current().snapshot().reserved_tokens, 0);
        assert_eq!(account.in_flight(), 0);
    }

    #[test]
    fn a_request_settles_in_the_period_that_admitted_it() {
        let account = Arc::new(Account::new(Period::Daily, now()));
        let l = BudgetLimit {
            tokens: Some(100),
            micro_usd: None,
            period: Period::Daily,
        };
        let est = Charge {
            tokens: 50,
            micro_usd: 0,
        };
        let old = account.reserve(Some(&l), est, now()).unwrap();
        let tomorrow: DateTime<Utc> = "2026-11-27T00:00:00Z".parse().unwrap();
        let new = account.reserve(Some(&l), est, tomorrow).unwrap();
        old.settle(
            Charge {
                tokens: 30,
                micro_usd: 0,
            },
            &usage(10, 20),
        );
        new.settle(
            Charge {
                tokens: 7,
                micro_usd: 0,
            },
            &usage(3, 4),
        );
        let current = account.current().snapshot();
        assert_eq!(current.tokens, 7);
        assert_eq!(current.reserved_tokens, 0);
    }

    #[test]
    fn contended_reservations_never_commit_past_the_limit() {
        let account = Arc::new(Account::new(Period::Monthly, now()));
        let l = limit(1_000);
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1_000 {
                        let est = Charge {
                            tokens: 7,
                            micro_usd: 0,
                        };
                        if let Ok(r) = account.reserve(Some(&l), est, now()) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            r.settle(est, &usage(3, 4));
                        }
                    }
                });
            }
        });
        let snap = account.current().snapshot();
        assert!(snap.tokens <= 1_000);
        assert_eq!(snap.tokens, admitted.load(Ordering::Relaxed) * 7);
        assert_eq!(
            snap.tokens, 994,
            "the budget fills up to the last whole estimate"
        );
    }

    fn shared(kind: Period) -> (Arc<Account>, Arc<Notify>) {
        let refill = Arc::new(Notify::new());
        (
            Arc::new(Account::shared(kind, now(), refill.clone())),
            refill,
        )
    }

    fn tokens(n: u64) -> Charge {
        Charge {
            tokens: n,
            micro_usd: 0,
        }
    }

    fn poked(refill: &Notify) -> bool {
        use futures_util::FutureExt as _;
        refill.notified().now_or_never().is_some()
    }

    #[test]
    fn a_shared_account_admits_only_within_its_slice() {
        let (account, refill) = shared(Period::Monthly);
        let l = limit(1_000);
        assert_eq!(
            account.reserve(Some(&l), tokens(40), now()).unwrap_err(),
            Exhausted::Tokens { limit: 1_000 },
            "nothing is leased yet"
        );
        assert!(poked(&refill), "a refusal asks the syncer for a lease");
        let period = account.current();
        let slice = period.slice().unwrap();
        assert_eq!(slice.tokens.take_wanted(), 40);
        assert_eq!(period.snapshot().reserved_tokens, 0);

        assert_eq!(slice.tokens.grant(100), 100);
        let a = account.reserve(Some(&l), tokens(40), now()).unwrap();
        let _b = account.reserve(Some(&l), tokens(40), now()).unwrap();
        assert!(account.reserve(Some(&l), tokens(40), now()).is_err());
        assert_eq!(slice.tokens.left(), 20);
        a.settle(tokens(10), &usage(5, 5));
        assert_eq!(
            slice.tokens.left(),
            50,
            "a settle gives back estimate − charge"
        );
        let _c = account.reserve(Some(&l), tokens(40), now()).unwrap();
        assert_eq!(account.in_flight(), 2);
    }

    #[test]
    fn taking_back_never_takes_what_is_committed() {
        let (account, _) = shared(Period::Monthly);
        let l = limit(1_000);
        let period = account.current();
        let slice = period.slice().unwrap();
        slice.tokens.grant(100);
        let r = account.reserve(Some(&l), tokens(60), now()).unwrap();
        assert_eq!(slice.tokens.take_back(30), 30);
        assert_eq!(slice.tokens.take_back(i64::MAX), 10);
        assert_eq!(slice.tokens.take_back(i64::MAX), 0);
        // Used more than its estimate: the headroom goes below zero, and nothing is taken.
        r.settle(tokens(70), &usage(30, 40));
        assert_eq!(slice.tokens.left(), -10);
        assert_eq!(slice.tokens.take_back(5), 0);
        assert_eq!(slice.tokens.rebase(), 10);
        assert_eq!(slice.tokens.left(), 0);
    }

    #[test]
    fn an_unlimited_resource_of_a_shared_budget_is_not_checked() {
        let (account, _) = shared(Period::Monthly);
        let l = limit(1_000);
        let period = account.current();
        let slice = period.slice().unwrap();
        slice.tokens.grant(100);
        let est = Charge {
            tokens: 10,
            micro_usd: 5_000,
        };
        let r = account.reserve(Some(&l), est, now()).unwrap();
        assert_eq!(slice.micro_usd.left(), -5_000);
        r.settle(
            Charge {
                tokens: 10,
                micro_usd: 3_000,
            },
            &usage(5, 5),
        );
        assert_eq!(slice.micro_usd.left(), -3_000);
        // A refused usd reservation gives its tokens back.
        let both = BudgetLimit {
            tokens: Some(1_000),
            micro_usd: Some(1_000_000),
            period: Period::Monthly,
        };
        assert_eq!(
            account.reserve(Some(&both), est, now()).unwrap_err(),
            Exhausted::Usd {
                limit_micro_usd: 1_000_000
            }
        );
        assert_eq!(slice.tokens.left(), 90);
        assert_eq!(period.snapshot().reserved_tokens, 0);
    }

    #[test]
    fn a_new_period_of_a_shared_account_starts_with_an_empty_slice() {
        let (account, _) = shared(Period::Daily);
        let l = BudgetLimit {
            tokens: Some(100),
            micro_usd: None,
            period: Period::Daily,
        };
        account.current().slice().unwrap().tokens.grant(100);
        let today = account.reserve(Some(&l), tokens(50), now()).unwrap();
        let tomorrow: DateTime<Utc> = "2026-11-27T00:00:00Z".parse().unwrap();
        assert!(account.reserve(Some(&l), tokens(50), tomorrow).is_err());
        let fresh = account.current();
        assert_eq!(fresh.slice().unwrap().tokens.left(), 0);
        today.settle(tokens(20), &usage(10, 10));
        assert_eq!(fresh.snapshot().tokens, 0);
    }

    #[test]
    fn a_plain_account_has_no_slice() {
        let account = Arc::new(Account::new(Period::Monthly, now()));
        assert!(account.current().slice().is_none());
        let tomorrow: DateTime<Utc> = "2026-12-01T00:00:00Z".parse().unwrap();
        assert!(account.period(Period::Monthly, tomorrow).slice().is_none());
    }

    /// Requests reserve and settle while a syncer grants and takes back: `headroom + committed`
    /// moves only by what the syncer's calls return, so its lease is exact, and the admitted
    /// estimates never pass what was granted.
    #[test]
    fn the_syncer_knows_its_lease_exactly_under_contention() {
        let (account, _) = shared(Period::Monthly);
        let l = limit(u64::MAX / 2);
        let period = account.current();
        let slice = period.slice().unwrap();
        let admitted = AtomicU64::new(0);
        let done = AtomicU64::new(0);
        let mut lease = 0i64;
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (account, l, admitted, done) = (&account, &l, &admitted, &done);
                s.spawn(move || {
                    for i in 0..5_000u64 {
                        let est = 5 + (i + t) % 7;
                        if let Ok(r) = account.reserve(Some(l), tokens(est), now()) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            r.settle(tokens(est - (i % 3)), &usage(1, 1));
                        }
                    }
                    done.fetch_add(1, Ordering::Release);
                });
            }
            let mut round = 0u64;
            while done.load(Ordering::Acquire) < 4 {
                lease += slice.tokens.grant(50);
                if round.is_multiple_of(3) {
                    lease -= slice.tokens.take_back(20);
                }
                round += 1;
                std::thread::yield_now();
            }
        });
        let snap = period.snapshot();
        assert_eq!(snap.reserved_tokens, 0);
        assert_eq!(
            slice.tokens.left() + i64::try_from(snap.tokens).unwrap(),
            lease,
            "headroom + spend is exactly the lease"
        );
        assert!(snap.tokens <= u64::try_from(lease).unwrap());
        assert!(admitted.load(Ordering::Relaxed) > 0);
    }
}
