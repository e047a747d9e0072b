//! The usage ledger: settled usage queued in memory ([`Pending`]), written in batches by a
//! background [`Flusher`] to a SQLite [`Ledger`], and read back for budgets and reports. With
//! `redis_url`, [`SharedBudgets`] also shares each budget period's spend with other replicas.
//!
//! Invariant: every increment added to [`Pending`] is taken by exactly one [`Pending::drain`]
//! (or put back by [`Pending::restore`] when its write failed), so the ledger counts each settled
//! request once. The request path touches only [`Pending`]: atomics behind a lock-free map
//! lookup, no I/O and no mutex.

mod flusher;
mod redis;
mod sqlite;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use chrono::{DateTime, Days, NaiveDate, Utc};
use thiserror::Error;

pub use flusher::Flusher;
pub use redis::{SharedBudgets, SharedBudgetsError};
pub use sqlite::{Dimension, Ledger, ReportQuery, ReportRow, SCHEMA_VERSION};

use crate::budget::SpendSnapshot;
use crate::maps::ConcurrentMap;
use crate::period::Period;
use crate::usage::Usage;

/// Why the ledger could not be opened, written or read. Messages name the ledger file.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot create the directory of the ledger {}: {source}", .path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no ledger at {} (nothing recorded yet, or store.path points elsewhere)", .path.display())]
    Missing { path: PathBuf },
    #[error(
        "the ledger {} is in use by another tollgate process (it holds {}); give each process \
         a ledger of its own",
        .path.display(),
        .lock.display()
    )]
    InUse { path: PathBuf, lock: PathBuf },
    #[error("cannot lock the ledger {} ({}): {source}", .path.display(), .lock.display())]
    Lock {
        path: PathBuf,
        lock: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the ledger {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot prepare the schema of the ledger {}: {source}", .path.display())]
    Migrate {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the ledger {} has schema version {found}, this tollgate knows up to {known}",
        .path.display()
    )]
    UnknownSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("cannot write usage to the ledger {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot read usage from the ledger {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the ledger {} holds an invalid {what}: {value}", .path.display())]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        value: String,
    },
    #[error("cannot start the writer of the ledger {}: {source}", .path.display())]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the writer of the ledger {} has stopped", .path.display())]
    Stopped { path: PathBuf },
}

/// What one ledger row counts: a project's usage through one credential of one model on one
/// UTC day (the day the request was admitted, so a request is counted in one day only).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UsageKey {
    pub project: Arc<str>,
    pub credential: Arc<str>,
    pub model: Arc<str>,
    pub day: NaiveDate,
}

impl UsageKey {
    /// The key, borrowed.
    pub fn parts(&self) -> KeyRef<'_> {
        KeyRef {
            project: &self.project,
            credential: &self.credential,
            model: &self.model,
            day: self.day,
        }
    }
}

/// A [`UsageKey`] made of borrowed names: what [`Pending::add`] looks a cell up by, so that a
/// settled request clones the names (reference counts that other threads' requests write too)
/// only when it makes a cell or queues one.
#[derive(Clone, Copy, Debug)]
pub struct KeyRef<'a> {
    pub project: &'a Arc<str>,
    pub credential: &'a Arc<str>,
    pub model: &'a Arc<str>,
    pub day: NaiveDate,
}

impl KeyRef<'_> {
    pub fn to_owned(self) -> UsageKey {
        UsageKey {
            project: self.project.clone(),
            credential: self.credential.clone(),
            model: self.model.clone(),
            day: self.day,
        }
    }
}

/// A usage key's parts, whoever holds them: a map of [`UsageKey`]s can be searched with a
/// [`KeyRef`] through `Borrow<dyn KeyParts>`, since both hash and compare by these parts.
pub trait KeyParts {
    fn key_parts(&self) -> (&str, &str, &str, NaiveDate);
}

impl KeyParts for UsageKey {
    fn key_parts(&self) -> (&str, &str, &str, NaiveDate) {
        (&self.project, &self.credential, &self.model, self.day)
    }
}

impl KeyParts for KeyRef<'_> {
    fn key_parts(&self) -> (&str, &str, &str, NaiveDate) {
        (self.project, self.credential, self.model, self.day)
    }
}

impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for UsageKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

impl std::hash::Hash for dyn KeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key_parts().hash(state);
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key_parts() == other.key_parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

// By the parts, as `dyn KeyParts` hashes: `Borrow` requires the two to agree.
impl std::hash::Hash for UsageKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key_parts().hash(state);
    }
}

/// Usage to add to a ledger row, or a sum of rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageDelta {
    pub requests: u64,
    /// Includes `cached_input_tokens`, as OpenAI reports it.
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    /// Includes `reasoning_tokens`, as OpenAI reports it.
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub micro_usd: u64,
}

impl UsageDelta {
    /// One settled request with its usage and charge.
    pub fn request(usage: &Usage, micro_usd: u64) -> Self {
        UsageDelta {
            requests: 1,
            input_tokens: usage.input_tokens,
            cached_input_tokens: usage.cached_input_tokens,
            output_tokens: usage.output_tokens,
            reasoning_tokens: usage.reasoning_tokens,
            micro_usd,
        }
    }

    /// The tokens a budget counts: input plus output (cached and reasoning tokens are already
    /// inside those).
    pub fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    pub fn add(&mut self, other: &UsageDelta) {
        self.requests = self.requests.saturating_add(other.requests);
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.cached_input_tokens = self
            .cached_input_tokens
            .saturating_add(other.cached_input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(other.reasoning_tokens);
        self.micro_usd = self.micro_usd.saturating_add(other.micro_usd);
    }

    pub fn is_zero(&self) -> bool {
        *self == UsageDelta::default()
    }

    /// This usage as settled spend, for [`crate::budget::PeriodSpend::preload`].
    pub fn to_spend_snapshot(&self) -> SpendSnapshot {
        SpendSnapshot {
            tokens: self.tokens(),
            micro_usd: self.micro_usd,
            input_tokens: self.input_tokens,
            cached_input_tokens: self.cached_input_tokens,
            output_tokens: self.output_tokens,
            reasoning_tokens: self.reasoning_tokens,
            requests: self.requests,
            reserved_tokens: 0,
            reserved_micro_usd: 0,
        }
    }
}

/// The days `[from, until)` of the period of `kind` that holds `now`, for [`Ledger::spend`]:
/// `until` is `None` for [`Period::Total`], which starts on 1970-01-01.
pub fn period_days(kind: Period, now: DateTime<Utc>) -> (NaiveDate, Option<NaiveDate>) {
    let (start, end) = kind.bounds(now);
    let day = |seconds: i64| DateTime::from_timestamp(seconds, 0).map(|t| t.date_naive());
    let from = day(start).unwrap_or(NaiveDate::MIN);
    (from, end.and_then(day))
}

/// One key's pending usage: independent counters, each taken whole by `swap(0)`, and whether
/// its key is in the queue of keys to take.
#[derive(Debug, Default)]
struct DeltaCell {
    requests: AtomicU64,
    input_tokens: AtomicU64,
    cached_input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    reasoning_tokens: AtomicU64,
    micro_usd: AtomicU64,
    /// Set by the first add after a take, which queues the key; cleared by the take.
    queued: AtomicBool,
}

impl DeltaCell {
    fn counters(&self) -> [&AtomicU64; 6] {
        [
            &self.requests,
            &self.input_tokens,
            &self.cached_input_tokens,
            &self.output_tokens,
            &self.reasoning_tokens,
            &self.micro_usd,
        ]
    }

    /// Adds `delta`; true when the cell was not queued, so the caller must queue its key.
    fn add(&self, delta: &UsageDelta) -> bool {
        let values = [
            delta.requests,
            delta.input_tokens,
            delta.cached_input_tokens,
            delta.output_tokens,
            delta.reasoning_tokens,
            delta.micro_usd,
        ];
        if values == [0; 6] {
            return false;
        }
        for (counter, value) in self.counters().into_iter().zip(values) {
            // Relaxed: each counter is its own sum and is taken by an atomic swap, which sees
            // every add before it in the counter's modification order; no other memory is
            // published through these counters (`queued` orders them for `take`).
            if value != 0 {
                counter.fetch_add(value, Ordering::Relaxed);
            }
        }
        // AcqRel, with the AcqRel swap in `take`: if this swap reads `true` it comes before
        // the take's swap, so the adds above happen before the take's swaps, which see them;
        // if it reads `false` (never queued, or a take cleared it first), the key is queued
        // again and a later take gets whatever this take missed.
        !self.queued.swap(true, Ordering::AcqRel)
    }

    /// Takes everything added so far and marks the cell unqueued. Each add lands either before
    /// a counter's swap (taken now) or after it (left for the next take, and queued again),
    /// never both and never neither. The counters of one add may be split between two takes;
    /// their sums are still exact.
    fn take(&self) -> UsageDelta {
        // Cleared before the counters are taken: an add that the swaps below miss finds the
        // flag clear and queues the key again. AcqRel: see `add`.
        self.queued.swap(false, Ordering::AcqRel);
        // Relaxed: see `add`.
        let [requests, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, micro_usd] =
            self.counters().map(|c| c.swap(0, Ordering::Relaxed));
        UsageDelta {
            requests,
            input_tokens,
            cached_input_tokens,
            output_tokens,
            reasoning_tokens,
            micro_usd,
        }
    }

    fn is_zero(&self) -> bool {
        // Relaxed: a hint for the sweep, which loses nothing when it is stale (see `Pending`).
        self.counters()
            .iter()
            .all(|c| c.load(Ordering::Relaxed) == 0)
    }
}

/// One key's pending usage, shared: by the map of [`Pending`], by the queue while it waits for a
/// drain, and by whoever keeps it to add to it again (a credential's usage slot, see
/// `state::UsageSlot`), so that the next add finds it without a lookup.
#[derive(Debug)]
pub struct PendingCell {
    key: UsageKey,
    delta: DeltaCell,
}

impl PendingCell {
    /// The UTC day whose ledger row this cell adds to.
    pub fn day(&self) -> NaiveDate {
        self.key.day
    }
}

/// Usage settled but not yet written to the ledger.
///
/// A drain visits only the cells that got usage since their last take: the first add after a
/// take queues the cell itself (a lock-free channel send of a reference), and the drain takes
/// the queued cells. So a drain costs what was settled since the last one, not the number of
/// cells, which with many credentials and models is far larger (every cell stays until a sweep
/// finds it idle, a day or two later).
///
/// A cell with usage not yet taken is always in the queue (the add that made it non-zero
/// queued it, or found it queued), and the drain takes it from there, not from the map. So a
/// sweep may remove a cell that someone still adds to: those adds queue it again and are
/// drained all the same, while a lookup after the removal makes a new cell for the key (two
/// cells of one key are two entries of a batch, whose parts add up).
#[derive(Debug)]
pub struct Pending {
    cells: ConcurrentMap<UsageKey, Arc<PendingCell>>,
    /// Where adds queue the cells that got usage since their last take.
    queue: mpsc::Sender<Arc<PendingCell>>,
    /// What drains keep, one drain at a time (off the request path).
    drains: Mutex<Drains>,
}

#[derive(Debug)]
struct Drains {
    /// The other end of `Pending::queue`.
    queued: mpsc::Receiver<Arc<PendingCell>>,
    /// The day of the last sweep for idle cells.
    swept: Option<NaiveDate>,
}

impl Default for Pending {
    fn default() -> Self {
        let (queue, queued) = mpsc::channel();
        Pending {
            cells: ConcurrentMap::default(),
            queue,
            drains: Mutex::new(Drains {
                queued,
                swept: None,
            }),
        }
    }
}

impl Pending {
    pub fn new() -> Self {
        Pending::default()
    }

    /// Adds `delta` to `key`'s pending usage: a `get` by the borrowed key (no allocation, no
    /// reference count), atomic adds, and an `entry` (which clones the key's names) only the
    /// first time a key is seen.
    pub fn add(&self, key: KeyRef<'_>, delta: &UsageDelta) {
        match self.cells.get(&key as &dyn KeyParts) {
            Some(cell) => self.add_to(&cell, delta),
            None => self.add_to(&self.cell(key), delta),
        }
    }

    /// `key`'s cell, made if new: for a caller that keeps it and adds to it with
    /// [`Self::add_to`].
    pub fn cell(&self, key: KeyRef<'_>) -> Arc<PendingCell> {
        if let Some(cell) = self.cells.get(&key as &dyn KeyParts) {
            return cell.clone();
        }
        self.cells
            .entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(PendingCell {
                    key: key.to_owned(),
                    delta: DeltaCell::default(),
                })
            })
            .clone()
    }

    /// Adds `delta` to `cell` (one of this `Pending`'s), queueing it if it was not: atomic adds
    /// and, the first time after a take, a reference count and a channel send.
    pub fn add_to(&self, cell: &Arc<PendingCell>, delta: &UsageDelta) {
        if cell.delta.add(delta) {
            // Fails only if the receiver is gone, and `self` holds it.
            let _ = self.queue.send(cell.clone());
        }
    }

    /// Takes all pending usage, one entry per queued cell with a non-zero delta (a cell queued
    /// again while the drain runs, or two cells of one key, give a key a second entry: the parts
    /// add up), and, once a day,
    /// forgets the idle cells of days before yesterday (requests admitted yesterday may still
    /// be settling).
    pub fn drain(&self) -> Vec<(UsageKey, UsageDelta)> {
        self.drain_at(Utc::now().date_naive(), false)
    }

    /// [`Self::drain`] on `today`, sweeping if it is the first drain of the day or `sweep`.
    ///
    /// The queue is taken until it is empty: a cell queued again meanwhile (an add after its
    /// take) is taken again, and adds come far slower than takes go, so it ends.
    fn drain_at(&self, today: NaiveDate, sweep: bool) -> Vec<(UsageKey, UsageDelta)> {
        let mut drains = lock(&self.drains);
        let mut batch = Vec::new();
        for cell in drains.queued.try_iter() {
            let delta = cell.delta.take();
            if !delta.is_zero() {
                batch.push((cell.key.clone(), delta));
            }
        }
        if sweep || drains.swept != Some(today) {
            drains.swept = Some(today);
            self.sweep_at(today);
        }
        batch
    }

    /// Forgets the idle cells of days before yesterday. Costs a pass over every cell.
    fn sweep_at(&self, today: NaiveDate) {
        let oldest_kept = today.checked_sub_days(Days::new(1)).unwrap_or(today);
        let old: Vec<UsageKey> = self
            .cells
            .iter()
            .filter(|cell| cell.key().day < oldest_kept)
            .map(|cell| cell.key().clone())
            .collect();
        // The iterator's read locks are released: removing while iterating would deadlock.
        for key in old {
            // A cell with usage not yet taken stays (it would be drained from the queue all
            // the same; kept, its key is not made anew).
            self.cells.remove_if(&key, |_, cell| cell.delta.is_zero());
        }
    }

    /// Puts back a batch that could not be written, to be taken by a later drain.
    pub fn restore(&self, batch: &[(UsageKey, UsageDelta)]) {
        for (key, delta) in batch {
            self.add(key.parts(), delta);
        }
    }

    /// How many keys have a cell (for metrics and tests).
    pub fn keys(&self) -> usize {
        self.cells.len()
    }
}

/// A mutex guard, whether or not a panic poisoned it: the data are plain values that a panic
/// cannot leave half-written.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> NaiveDate {
        text.parse().unwrap()
    }

    fn key(project: &str, model: &str, on: &str) -> UsageKey {
        UsageKey {
            project: Arc::from(project),
            credential: Arc::from("c"),
            model: Arc::from(model),
            day: day(on),
        }
    }

    /// A drain on `today` that also sweeps, as the first drain of a day does.
    fn drain_on(pending: &Pending, today: NaiveDate) -> Vec<(UsageKey, UsageDelta)> {
        pending.drain_at(today, true)
    }

    fn delta(n: u64) -> UsageDelta {
        UsageDelta {
            requests: 1,
            input_tokens: n,
            cached_input_tokens: n / 2,
            output_tokens: 2 * n,
            reasoning_tokens: n / 3,
            micro_usd: 7 * n,
        }
    }

    fn total(batches: &[Vec<(UsageKey, UsageDelta)>]) -> UsageDelta {
        let mut sum = UsageDelta::default();
        for (_, d) in batches.iter().flatten() {
            sum.add(d);
        }
        sum
    }

    #[test]
    fn delta_arithmetic() {
        let mut a = delta(10);
        assert_eq!(a.tokens(), 30);
        a.add(&delta(20));
        assert_eq!(
            a,
            UsageDelta {
                requests: 2,
                input_tokens: 30,
                cached_input_tokens: 15,
                output_tokens: 60,
                reasoning_tokens: 9,
                micro_usd: 210,
            }
        );
        assert!(!a.is_zero());
        assert!(UsageDelta::default().is_zero());
        let usage = Usage {
            input_tokens: 5,
            cached_input_tokens: 1,
            output_tokens: 3,
            reasoning_tokens: 2,
        };
        let one = UsageDelta::request(&usage, 42);
        assert_eq!(one.requests, 1);
        assert_eq!(one.tokens(), usage.total());
        let snap = one.to_spend_snapshot();
        assert_eq!((snap.tokens, snap.micro_usd, snap.requests), (8, 42, 1));
        assert_eq!((snap.reserved_tokens, snap.reserved_micro_usd), (0, 0));
    }

    #[test]
    fn period_days_match_period_bounds() {
        let now: DateTime<Utc> = "2026-11-26T12:00:00Z".parse().unwrap();
        assert_eq!(
            period_days(Period::Daily, now),
            (day("2026-11-26"), Some(day("2026-11-27")))
        );
        assert_eq!(
            period_days(Period::Weekly, now),
            (day("2026-11-23"), Some(day("2026-11-30")))
        );
        assert_eq!(
            period_days(Period::Monthly, now),
            (day("2026-11-01"), Some(day("2026-12-01")))
        );
        assert_eq!(period_days(Period::Total, now), (day("1970-01-01"), None));
    }

    #[test]
    fn a_borrowed_key_finds_the_cell_of_its_owned_key() {
        use std::hash::BuildHasher;
        let pending = Pending::new();
        let owned = key("p", "m1", "2026-11-26");
        // Other names, same text: found by the text, not by the pointers.
        let (project, credential, model) = (
            Arc::<str>::from("p"),
            owned.credential.to_string().into(),
            Arc::<str>::from("m1"),
        );
        let borrowed = KeyRef {
            project: &project,
            credential: &credential,
            model: &model,
            day: day("2026-11-26"),
        };
        let hasher = crate::maps::Hasher::default();
        assert_eq!(
            hasher.hash_one(&owned),
            hasher.hash_one(&borrowed as &dyn KeyParts)
        );
        pending.add(owned.parts(), &delta(1));
        assert!(pending.cells.get(&borrowed as &dyn KeyParts).is_some());
        let other = KeyRef {
            model: &owned.project,
            ..borrowed
        };
        assert!(pending.cells.get(&other as &dyn KeyParts).is_none());
        pending.add(borrowed, &delta(2));
        assert_eq!(pending.keys(), 1);
    }

    #[test]
    fn drain_takes_sums_per_key_and_skips_zero_deltas() {
        let pending = Pending::new();
        let a = key("p", "m1", "2026-11-26");
        let b = key("p", "m2", "2026-11-26");
        pending.add(a.parts(), &delta(1));
        pending.add(a.parts(), &delta(2));
        pending.add(b.parts(), &delta(3));
        pending.add(b.parts(), &UsageDelta::default());
        let mut batch = drain_on(&pending, day("2026-11-26"));
        batch.sort_by(|a, b| a.0.cmp(&b.0));
        let mut expected_a = delta(1);
        expected_a.add(&delta(2));
        assert_eq!(batch, vec![(a.clone(), expected_a), (b, delta(3))]);
        assert!(drain_on(&pending, day("2026-11-26")).is_empty());
        assert_eq!(pending.keys(), 2, "today's cells are kept for reuse");

        pending.restore(&[(a.clone(), delta(5))]);
        assert_eq!(drain_on(&pending, day("2026-11-26")), vec![(a, delta(5))]);
    }

    #[test]
    fn drain_forgets_idle_cells_older_than_yesterday() {
        let pending = Pending::new();
        let old = key("p", "m", "2026-11-24");
        let yesterday = key("p", "m", "2026-11-25");
        let today = key("p", "m", "2026-11-26");
        for k in [&old, &yesterday, &today] {
            pending.add(k.parts(), &delta(1));
        }
        // The drain takes the old cell's usage, then the sweep finds it idle.
        assert_eq!(drain_on(&pending, day("2026-11-26")).len(), 3);
        assert_eq!(pending.keys(), 2, "the idle cell of 11-24 is gone");
        assert!(drain_on(&pending, day("2026-11-26")).is_empty());
        // A late settle of an old day makes a fresh cell and is not lost.
        pending.add(old.parts(), &delta(9));
        assert_eq!(drain_on(&pending, day("2026-11-26")), vec![(old, delta(9))]);
    }

    #[test]
    fn adds_to_a_kept_cell_are_drained_after_a_sweep_removed_it() {
        let pending = Pending::new();
        let old = key("p", "m", "2026-11-24");
        let kept = pending.cell(old.parts());
        assert!(drain_on(&pending, day("2026-11-26")).is_empty());
        assert_eq!(pending.keys(), 0, "the idle cell is out of the map");
        pending.add_to(&kept, &delta(5));
        assert_eq!(
            drain_on(&pending, day("2026-11-26")),
            vec![(old.clone(), delta(5))]
        );
        // A lookup now makes a second cell of the key; both are drained, and add up.
        pending.add(old.parts(), &delta(3));
        pending.add_to(&kept, &delta(2));
        let batch = drain_on(&pending, day("2026-11-26"));
        assert_eq!(batch.len(), 2);
        assert!(batch.iter().all(|(k, _)| *k == old));
        let mut expected = delta(3);
        expected.add(&delta(2));
        assert_eq!(total(&[batch]), expected);
    }

    /// Adders race a drainer: every increment is taken exactly once, whether it lands in a
    /// cell before or after a swap, and whether the drainer is removing cells meanwhile. Half
    /// the adders look the cell up each time, half keep the cell they first got (as a usage
    /// slot does) and add to it even after a sweep removed it from the map.
    fn concurrent_adds_are_drained_exactly_once(today: NaiveDate) {
        const THREADS: u64 = 4;
        const ADDS: u64 = 20_000;
        let pending = Pending::new();
        let keys: Vec<UsageKey> = (0..6)
            .map(|i| key(&format!("p{}", i % 3), &format!("m{}", i % 2), "2026-11-20"))
            .collect();
        let done = AtomicU64::new(0);
        let mut drained = Vec::new();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (pending, keys, done) = (&pending, &keys, &done);
                s.spawn(move || {
                    let kept: Vec<Arc<PendingCell>> =
                        keys.iter().map(|k| pending.cell(k.parts())).collect();
                    for i in 0..ADDS {
                        let at = ((t + i) % keys.len() as u64) as usize;
                        if t % 2 == 0 {
                            pending.add(keys[at].parts(), &delta(i % 97 + 1));
                        } else {
                            pending.add_to(&kept[at], &delta(i % 97 + 1));
                        }
                    }
                    done.fetch_add(1, Ordering::Release);
                });
            }
            let drainer = s.spawn(|| {
                let mut batches = Vec::new();
                loop {
                    let finished = done.load(Ordering::Acquire) == THREADS;
                    batches.push(drain_on(&pending, today));
                    if finished {
                        return batches;
                    }
                }
            });
            drained = drainer.join().unwrap();
        });
        drained.push(drain_on(&pending, today));

        let mut expected = UsageDelta::default();
        for _ in 0..THREADS {
            for i in 0..ADDS {
                expected.add(&delta(i % 97 + 1));
            }
        }
        assert_eq!(total(&drained), expected);
        assert_eq!(expected.requests, THREADS * ADDS);
    }

    #[test]
    fn concurrent_adds_are_drained_exactly_once_keeping_cells() {
        concurrent_adds_are_drained_exactly_once(day("2026-11-20"));
    }

    #[test]
    fn concurrent_adds_are_drained_exactly_once_removing_cells() {
        // Every cell is of a past day: each drain that finds one idle removes it, so adds keep
        // racing the removal and re-creating cells.
        concurrent_adds_are_drained_exactly_once(day("2026-12-31"));
    }
}
