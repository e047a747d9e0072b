//! The SQLite ledger: one row of usage per (project, credential, model, UTC day), and a log of
//! the batches written since those rows were last brought up to date.
//!
//! A flush appends its batch to `usage_log` (new rows at the end of one table: a few pages
//! written), and every [`FOLD_EVERY`] or [`FOLD_ROWS`] the log is folded into `usage` (each
//! key's row updated once for all the batches since the last fold, instead of once per flush).
//! Reads go through the `usage_all` view, which is both, so they never wait for a fold.
//!
//! Invariant: rows only grow, and a batch is written in one transaction that adds to them, so
//! a write either counts the whole batch once or changes nothing and can be retried; a fold
//! moves the log into `usage` in one transaction, so each delta is counted in exactly one of
//! the two. Counts
//! are stored as SQLite integers (`i64`); a `u64` that does not fit is saturated on the way in
//! (no real count comes near 2^63) and a negative value read back is reported as corrupt.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};

use super::{StoreError, UsageDelta, UsageKey};
use crate::maps::FastMap;

/// The schema this build writes and reads, kept in SQLite's `user_version`.
pub const SCHEMA_VERSION: i64 = 2;

/// `MIGRATIONS[n]` takes a ledger from schema version `n` to `n + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    r#"
CREATE TABLE usage (
    project             TEXT    NOT NULL,
    credential          TEXT    NOT NULL,
    model               TEXT    NOT NULL,
    day                 TEXT    NOT NULL, -- UTC day the request was admitted, YYYY-MM-DD
    requests            INTEGER NOT NULL DEFAULT 0,
    input_tokens        INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens       INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens    INTEGER NOT NULL DEFAULT 0,
    micro_usd           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (project, credential, model, day)
) WITHOUT ROWID;
-- A project's spend over a period (budgets at start-up).
CREATE INDEX usage_by_project_day ON usage (project, day);
-- Reports over a range of days.
CREATE INDEX usage_by_day ON usage (day);
"#,
    r#"
-- Batches appended by flushes and not yet folded into `usage` (see `Ledger::fold`).
CREATE TABLE usage_log (
    project             TEXT    NOT NULL,
    credential          TEXT    NOT NULL,
    model               TEXT    NOT NULL,
    day                 TEXT    NOT NULL,
    requests            INTEGER NOT NULL DEFAULT 0,
    input_tokens        INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens       INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens    INTEGER NOT NULL DEFAULT 0,
    micro_usd           INTEGER NOT NULL DEFAULT 0
);
-- What every read sums: the folded rows and the log.
CREATE VIEW usage_all AS
    SELECT project, credential, model, day, requests, input_tokens, cached_input_tokens,
           output_tokens, reasoning_tokens, micro_usd FROM usage
    UNION ALL
    SELECT project, credential, model, day, requests, input_tokens, cached_input_tokens,
           output_tokens, reasoning_tokens, micro_usd FROM usage_log;
"#,
];

/// How often the log is folded into `usage` at most: the longer, the fewer times a busy key's
/// row is rewritten (once per fold rather than once per flush).
pub const FOLD_EVERY: Duration = Duration::from_secs(10);

/// How many log rows make a fold due before [`FOLD_EVERY`]: bounds the log (and what a read
/// scans of it) under a heavy load of many keys.
pub const FOLD_ROWS: u64 = 200_000;

const APPEND: &str = "
INSERT INTO usage_log (project, credential, model, day, requests, input_tokens,
                       cached_input_tokens, output_tokens, reasoning_tokens, micro_usd)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

/// The head of an insert into `usage`, its columns in `UsageDelta` order after the key's.
macro_rules! into_usage {
    () => {
        "INSERT INTO usage (project, credential, model, day, requests, input_tokens,
                   cached_input_tokens, output_tokens, reasoning_tokens, micro_usd)"
    };
}

/// The tail of an insert into `usage`: a key that has its row adds to it.
macro_rules! add_to_row {
    () => {
        "ON CONFLICT (project, credential, model, day) DO UPDATE SET
    requests            = requests            + excluded.requests,
    input_tokens        = input_tokens        + excluded.input_tokens,
    cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
    output_tokens       = output_tokens       + excluded.output_tokens,
    reasoning_tokens    = reasoning_tokens    + excluded.reasoning_tokens,
    micro_usd           = micro_usd           + excluded.micro_usd"
    };
}

const UPSERT: &str = concat!(
    into_usage!(),
    "\nVALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)\n",
    add_to_row!()
);

/// Adds the log's sums to `usage`, one row per key (`WHERE true`: SQLite's way to keep an
/// upsert's `ON` apart from the `SELECT`).
const FOLD: &str = concat!(
    into_usage!(),
    "\nSELECT project, credential, model, day, SUM(requests), SUM(input_tokens),
       SUM(cached_input_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(micro_usd)
FROM usage_log WHERE true GROUP BY project, credential, model, day\n",
    add_to_row!()
);

/// The sums every read returns, in `UsageDelta` order.
const SUMS: &str = "COALESCE(SUM(requests), 0), COALESCE(SUM(input_tokens), 0), \
     COALESCE(SUM(cached_input_tokens), 0), COALESCE(SUM(output_tokens), 0), \
     COALESCE(SUM(reasoning_tokens), 0), COALESCE(SUM(micro_usd), 0)";

/// How long a statement waits for another connection's lock (a report, a second process)
/// before failing: long enough to ride out a checkpoint, short enough to surface a stuck lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const DAY_FORMAT: &str = "%Y-%m-%d";

/// The usage ledger file. Not `Sync`: one owner (the flusher's thread, or the CLI).
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
    /// A writer's lock on `<path>.lock`: one writer per ledger, since a fold deletes the whole
    /// log and adds the sums this writer logged (another writer's rows would go uncounted).
    _lock: Option<std::fs::File>,
    path: PathBuf,
    /// Rows in `usage_log`.
    logged: u64,
    /// When the log was last folded (or the ledger opened).
    folded: Instant,
    /// The sums of what this process logged since the last fold.
    unfolded: FastMap<UsageKey, UsageDelta>,
}

/// What [`Ledger::report`] sums and how it groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportQuery {
    /// First day included. (`None`: from the first row)
    pub since: Option<NaiveDate>,
    /// First day excluded. (`None`: up to the last row)
    pub until: Option<NaiveDate>,
    /// The columns to group by, in output order; duplicates are ignored. Empty: one row, the
    /// grand total (none when nothing matched).
    pub by: Vec<Dimension>,
}

/// A column a report can group by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dimension {
    Project,
    Model,
    Credential,
    Day,
}

impl Dimension {
    pub const ALL: [Dimension; 4] = [
        Dimension::Project,
        Dimension::Model,
        Dimension::Credential,
        Dimension::Day,
    ];

    pub const NAMES: &'static str = "project, model, credential, day";

    /// The name used on the command line, in headers and as the ledger column.
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Project => "project",
            Dimension::Model => "model",
            Dimension::Credential => "credential",
            Dimension::Day => "day",
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dimension {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Dimension::ALL
            .into_iter()
            .find(|d| d.as_str() == name)
            .ok_or_else(|| {
                format!(
                    "unknown dimension `{name}`: expected one of {}",
                    Self::NAMES
                )
            })
    }
}

/// One group of a report: the dimensions it was grouped by are `Some`, the others `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportRow {
    pub project: Option<String>,
    pub model: Option<String>,
    pub credential: Option<String>,
    pub day: Option<NaiveDate>,
    pub usage: UsageDelta,
}

impl ReportRow {
    /// The value of `dimension` as text (`""` when the row is not grouped by it).
    pub fn dimension(&self, dimension: Dimension) -> String {
        match dimension {
            Dimension::Project => self.project.clone().unwrap_or_default(),
            Dimension::Model => self.model.clone().unwrap_or_default(),
            Dimension::Credential => self.credential.clone().unwrap_or_default(),
            Dimension::Day => self.day.map(day_text).unwrap_or_default(),
        }
    }
}

impl Ledger {
    /// Opens the ledger at `path` for writing, creating it and its directory when missing, in
    /// WAL mode with `synchronous = FULL` (a write is on disk when it commits), brings its
    /// schema up to [`SCHEMA_VERSION`] and folds the log a previous run left. One writer at a
    /// time: a second one is refused ([`StoreError::InUse`]) while the first holds the file.
    pub fn open(path: &Path) -> Result<Ledger, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let lock = lock(path)?;
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Still correct, only slower and blocking readers: say so once.
            tracing::warn!(ledger = %path.display(), mode, "the ledger could not switch to WAL mode");
        }
        // FULL: every write is on disk when it commits, so a power loss loses no more than a
        // process crash does (the usage settled since the last write). NORMAL would sync the WAL
        // only at checkpoints, and a power loss could take back everything written since one.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        // The fold's GROUP BY sorts in memory, not in a temporary file.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        let logged: i64 = conn
            .query_row("SELECT COUNT(*) FROM usage_log", [], |row| row.get(0))
            .map_err(open_err)?;
        let mut ledger = Ledger {
            conn,
            _lock: Some(lock),
            path: path.to_path_buf(),
            logged: u64::try_from(logged).unwrap_or(0),
            folded: Instant::now(),
            unfolded: FastMap::default(),
        };
        // What the last run logged and did not fold.
        ledger.fold()?;
        Ok(ledger)
    }

    /// Opens an existing ledger for reading only (reports): never creates or migrates it, and
    /// can run beside a tollgate that is writing it.
    pub fn open_read_only(path: &Path) -> Result<Ledger, StoreError> {
        let missing = || StoreError::Missing {
            path: path.to_path_buf(),
        };
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => {}
            _ => return Err(missing()),
        }
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let version = user_version(&conn).map_err(open_err)?;
        if version != SCHEMA_VERSION {
            return Err(StoreError::UnknownSchema {
                path: path.to_path_buf(),
                found: version,
                known: SCHEMA_VERSION,
            });
        }
        Ok(Ledger {
            conn,
            _lock: None,
            path: path.to_path_buf(),
            logged: 0,
            folded: Instant::now(),
            unfolded: FastMap::default(),
        })
    }

    /// The file this ledger is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds every delta of `batch` to the ledger, in one transaction: all or nothing. The batch
    /// is appended to the log, which is folded into `usage` when a fold is due (a failed fold
    /// is logged and tried again at the next write: the batch is written either way).
    pub fn write(&mut self, batch: &[(UsageKey, UsageDelta)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let write_err = write_error(&self.path);
        let tx = begin_write(&mut self.conn, &self.path)?;
        {
            let mut append = tx.prepare_cached(APPEND).map_err(write_err)?;
            let mut day = DayText::default();
            for (key, delta) in batch {
                add_row(&mut append, key, day.of(key.day), delta).map_err(write_err)?;
            }
        }
        tx.commit().map_err(write_err)?;
        self.logged += batch.len() as u64;
        for (key, delta) in batch {
            match self.unfolded.get_mut(key) {
                Some(sum) => sum.add(delta),
                None => {
                    self.unfolded.insert(key.clone(), *delta);
                }
            }
        }
        if self.logged >= FOLD_ROWS || self.folded.elapsed() >= FOLD_EVERY {
            if let Err(err) = self.fold() {
                tracing::warn!(error = %err, "cannot fold the ledger's log; trying again later");
            }
        }
        Ok(())
    }

    /// Folds the log into `usage`, in one transaction: each key's row gets the log's sums and
    /// the log is emptied.
    pub fn fold(&mut self) -> Result<(), StoreError> {
        self.folded = Instant::now();
        if self.logged == 0 {
            return Ok(());
        }
        let write_err = write_error(&self.path);
        let tx = begin_write(&mut self.conn, &self.path)?;
        if self.unfolded.is_empty() {
            // A log this process did not write (the last run's): summed by SQLite.
            tx.prepare_cached(FOLD)
                .and_then(|mut fold| fold.execute([]))
                .map_err(write_err)?;
        } else {
            // The log is exactly what this process wrote since the last fold: its sums are at
            // hand, one upsert per key.
            let mut upsert = tx.prepare_cached(UPSERT).map_err(write_err)?;
            let mut day = DayText::default();
            for (key, delta) in &self.unfolded {
                add_row(&mut upsert, key, day.of(key.day), delta).map_err(write_err)?;
            }
        }
        tx.prepare_cached("DELETE FROM usage_log")
            .and_then(|mut delete| delete.execute([]))
            .map_err(write_err)?;
        tx.commit().map_err(write_err)?;
        self.logged = 0;
        self.unfolded.clear();
        Ok(())
    }

    /// `project`'s usage over the days `[from, until)` (`until = None`: no end).
    pub fn spend(
        &self,
        project: &str,
        from: NaiveDate,
        until: Option<NaiveDate>,
    ) -> Result<UsageDelta, StoreError> {
        let sql = format!(
            "SELECT {SUMS} FROM usage_all WHERE project = ?1 AND day >= ?2 AND (?3 IS NULL OR day < ?3)"
        );
        let sums = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut stmt| {
                stmt.query_row(
                    params![project, day_text(from), until.map(day_text)],
                    |row| sums(row, 0),
                )
            })
            .map_err(|source| self.read_err(source))?;
        self.delta(sums)
    }

    /// Usage summed over the days `[since, until)` and grouped by `filter.by`, the most
    /// expensive group first (ties by the dimension values, ascending).
    pub fn report(&self, filter: &ReportQuery) -> Result<Vec<ReportRow>, StoreError> {
        let mut by: Vec<Dimension> = Vec::with_capacity(filter.by.len());
        for dimension in &filter.by {
            if !by.contains(dimension) {
                by.push(*dimension);
            }
        }
        let columns: Vec<&str> = by.iter().map(|d| d.as_str()).collect();
        let mut conditions = Vec::new();
        let mut values = Vec::new();
        if let Some(since) = filter.since {
            values.push(day_text(since));
            conditions.push(format!("day >= ?{}", values.len()));
        }
        if let Some(until) = filter.until {
            values.push(day_text(until));
            conditions.push(format!("day < ?{}", values.len()));
        }
        // Only the fixed dimension names above reach the SQL text; dates are parameters.
        let mut sql = String::from("SELECT ");
        for column in &columns {
            sql.push_str(column);
            sql.push_str(", ");
        }
        sql.push_str(SUMS);
        sql.push_str(" FROM usage_all");
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        if !columns.is_empty() {
            sql.push_str(" GROUP BY ");
            sql.push_str(&columns.join(", "));
        }
        // Without GROUP BY an aggregate answers one row even when nothing matched.
        sql.push_str(" HAVING COUNT(*) > 0 ORDER BY SUM(micro_usd) DESC");
        for column in &columns {
            sql.push_str(", ");
            sql.push_str(column);
        }

        let raw: Vec<(Vec<String>, [i64; 6])> = self
            .conn
            .prepare(&sql)
            .and_then(|mut stmt| {
                let rows = stmt.query_map(rusqlite::params_from_iter(values.iter()), |row| {
                    let mut keys = Vec::with_capacity(by.len());
                    for index in 0..by.len() {
                        keys.push(row.get::<_, String>(index)?);
                    }
                    Ok((keys, sums(row, by.len())?))
                })?;
                rows.collect()
            })
            .map_err(|source| self.read_err(source))?;

        let mut rows = Vec::with_capacity(raw.len());
        for (keys, sums) in raw {
            let mut row = ReportRow {
                usage: self.delta(sums)?,
                ..ReportRow::default()
            };
            for (dimension, value) in by.iter().zip(keys) {
                match dimension {
                    Dimension::Project => row.project = Some(value),
                    Dimension::Model => row.model = Some(value),
                    Dimension::Credential => row.credential = Some(value),
                    Dimension::Day => row.day = Some(self.day(&value)?),
                }
            }
            rows.push(row);
        }
        Ok(rows)
    }

    fn read_err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Read {
            path: self.path.clone(),
            source,
        }
    }

    fn delta(&self, sums: [i64; 6]) -> Result<UsageDelta, StoreError> {
        let [requests, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, micro_usd] =
            sums;
        let count = |value: i64| {
            u64::try_from(value).map_err(|_| StoreError::Corrupt {
                path: self.path.clone(),
                what: "count",
                value: value.to_string(),
            })
        };
        Ok(UsageDelta {
            requests: count(requests)?,
            input_tokens: count(input_tokens)?,
            cached_input_tokens: count(cached_input_tokens)?,
            output_tokens: count(output_tokens)?,
            reasoning_tokens: count(reasoning_tokens)?,
            micro_usd: count(micro_usd)?,
        })
    }

    fn day(&self, text: &str) -> Result<NaiveDate, StoreError> {
        NaiveDate::parse_from_str(text, DAY_FORMAT).map_err(|_| StoreError::Corrupt {
            path: self.path.clone(),
            what: "day",
            value: text.to_owned(),
        })
    }
}

/// Starts a write to the ledger at `path`. IMMEDIATE: the write lock is taken up front rather
/// than a read lock failing to upgrade midway when another connection writes.
fn begin_write<'c>(
    conn: &'c mut Connection,
    path: &Path,
) -> Result<rusqlite::Transaction<'c>, StoreError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(write_error(path))
}

/// A failed write to the ledger at `path`.
fn write_error(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
    move |source| StoreError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs `statement` (`APPEND` or `UPSERT`) for one key's delta, `day` being its day as text.
fn add_row(
    statement: &mut rusqlite::CachedStatement<'_>,
    key: &UsageKey,
    day: &str,
    delta: &UsageDelta,
) -> rusqlite::Result<usize> {
    statement.execute(params![
        &*key.project,
        &*key.credential,
        &*key.model,
        day,
        int(delta.requests),
        int(delta.input_tokens),
        int(delta.cached_input_tokens),
        int(delta.output_tokens),
        int(delta.reasoning_tokens),
        int(delta.micro_usd),
    ])
}

/// Takes the writer's lock of the ledger at `path`, held for as long as the file lives.
fn lock(path: &Path) -> Result<std::fs::File, StoreError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock);
    let lock_err = |source| StoreError::Lock {
        path: path.to_path_buf(),
        lock: lock.clone(),
        source,
    };
    let file = file.map_err(lock_err)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse {
            path: path.to_path_buf(),
            lock,
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(lock_err(source)),
    }
}

/// Applies the migrations the file lacks, in one transaction, so a crash mid-way leaves the
/// old version and a concurrent opener waits rather than migrating twice.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let migrate_err = |source| StoreError::Migrate {
        path: path.to_path_buf(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(migrate_err)?;
    let version = user_version(&tx).map_err(migrate_err)?;
    let unknown = || StoreError::UnknownSchema {
        path: path.to_path_buf(),
        found: version,
        known: SCHEMA_VERSION,
    };
    let done = usize::try_from(version).map_err(|_| unknown())?;
    if done > MIGRATIONS.len() {
        return Err(unknown());
    }
    if done == MIGRATIONS.len() {
        return Ok(());
    }
    for migration in &MIGRATIONS[done..] {
        tx.execute_batch(migration).map_err(migrate_err)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(migrate_err)?;
    tx.commit().map_err(migrate_err)
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// The six sums starting at column `first`.
fn sums(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<[i64; 6]> {
    let mut out = [0; 6];
    for (offset, slot) in out.iter_mut().enumerate() {
        *slot = row.get(first + offset)?;
    }
    Ok(out)
}

fn day_text(day: NaiveDate) -> String {
    day.format(DAY_FORMAT).to_string()
}

/// The text of the last day asked for: the rows of a write or a fold are mostly one day, so a
/// day is formatted again only when a row's differs from the row before.
#[derive(Default)]
struct DayText(Option<(NaiveDate, String)>);

impl DayText {
    fn of(&mut self, day: NaiveDate) -> &str {
        let (date, text) = self.0.get_or_insert_with(|| (day, day_text(day)));
        if *date != day {
            (*date, *text) = (day, day_text(day));
        }
        text
    }
}

/// A count as a SQLite integer. 2^63 tokens or micro-dollars cannot happen; saturating keeps
/// such a value from failing its batch forever.
fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;

    fn day(text: &str) -> NaiveDate {
        text.parse().unwrap()
    }

    fn key(project: &str, credential: &str, model: &str, on: &str) -> UsageKey {
        UsageKey {
            project: Arc::from(project),
            credential: Arc::from(credential),
            model: Arc::from(model),
            day: day(on),
        }
    }

    fn delta(n: u64) -> UsageDelta {
        UsageDelta {
            requests: n,
            input_tokens: 100 * n,
            cached_input_tokens: 10 * n,
            output_tokens: 50 * n,
            reasoning_tokens: 5 * n,
            micro_usd: 1_000 * n,
        }
    }

    fn ledger() -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("db/nested/tollgate.db")).unwrap();
        (dir, ledger)
    }

    /// A spread of rows over two projects, credentials, models and days.
    fn sample() -> Vec<(UsageKey, UsageDelta)> {
        let mut batch = Vec::new();
        let mut n = 1;
        for project in ["search", "batch"] {
            for credential in ["api", "ci"] {
                for model in ["gpt-4o", "gpt-4o-mini"] {
                    for on in ["2026-11-24", "2026-11-25", "2026-11-26"] {
                        batch.push((key(project, credential, model, on), delta(n)));
                        n += 1;
                    }
                }
            }
        }
        batch
    }

    #[test]
    fn open_creates_the_directory_in_wal_mode_with_the_schema() {
        let (dir, ledger) = ledger();
        assert!(dir.path().join("db/nested/tollgate.db").is_file());
        let mode: String = ledger
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = ledger
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        assert_eq!(user_version(&ledger.conn).unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn writes_add_up_and_survive_a_reopen() {
        let (dir, mut ledger) = ledger();
        let k = key("search", "api", "gpt-4o", "2026-11-26");
        ledger.write(&[(k.clone(), delta(1))]).unwrap();
        ledger.write(&[(k.clone(), delta(2))]).unwrap();
        ledger.write(&[]).unwrap();
        let spend = ledger.spend("search", day("2026-11-26"), None).unwrap();
        assert_eq!(spend, delta(3));
        assert_eq!(spend.tokens(), 450);
        drop(ledger);

        let path = dir.path().join("db/nested/tollgate.db");
        let mut ledger = Ledger::open(&path).unwrap();
        assert_eq!(
            ledger.spend("search", day("2026-11-01"), None).unwrap(),
            delta(3)
        );
        ledger.write(&[(k, delta(4))]).unwrap();
        assert_eq!(
            ledger.spend("search", day("2026-11-01"), None).unwrap(),
            delta(7)
        );
        let count: i64 = ledger
            .conn
            .query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 1, "one row per key");
    }

    #[test]
    fn spend_sums_one_project_over_a_half_open_range_of_days() {
        let (_dir, mut ledger) = ledger();
        let batch = [
            (key("p", "a", "m1", "2026-10-31"), delta(1)),
            (key("p", "a", "m1", "2026-11-01"), delta(2)),
            (key("p", "b", "m2", "2026-11-15"), delta(4)),
            (key("p", "a", "m1", "2026-11-30"), delta(8)),
            (key("p", "a", "m1", "2026-12-01"), delta(16)),
            (key("q", "a", "m1", "2026-11-15"), delta(32)),
        ];
        ledger.write(&batch).unwrap();
        let nov = ledger
            .spend("p", day("2026-11-01"), Some(day("2026-12-01")))
            .unwrap();
        assert_eq!(nov, delta(2 + 4 + 8));
        let from_nov = ledger.spend("p", day("2026-11-01"), None).unwrap();
        assert_eq!(from_nov, delta(2 + 4 + 8 + 16));
        let one_day = ledger
            .spend("p", day("2026-11-15"), Some(day("2026-11-16")))
            .unwrap();
        assert_eq!(one_day, delta(4));
        let empty = ledger
            .spend("p", day("2026-11-02"), Some(day("2026-11-02")))
            .unwrap();
        assert_eq!(empty, UsageDelta::default());
        let nobody = ledger.spend("nobody", day("1970-01-01"), None).unwrap();
        assert_eq!(nobody, UsageDelta::default());
    }

    /// The report for `by`, computed in Rust from the batch.
    fn expected_report(
        batch: &[(UsageKey, UsageDelta)],
        since: Option<NaiveDate>,
        until: Option<NaiveDate>,
        by: &[Dimension],
    ) -> Vec<ReportRow> {
        let mut groups: BTreeMap<Vec<String>, ReportRow> = BTreeMap::new();
        for (k, d) in batch {
            if since.is_some_and(|s| k.day < s) || until.is_some_and(|u| k.day >= u) {
                continue;
            }
            let mut row = ReportRow::default();
            for dimension in by {
                match dimension {
                    Dimension::Project => row.project = Some(k.project.to_string()),
                    Dimension::Model => row.model = Some(k.model.to_string()),
                    Dimension::Credential => row.credential = Some(k.credential.to_string()),
                    Dimension::Day => row.day = Some(k.day),
                }
            }
            let group: Vec<String> = by.iter().map(|d| row.dimension(*d)).collect();
            groups.entry(group).or_insert(row).usage.add(d);
        }
        let mut rows: Vec<(Vec<String>, ReportRow)> = groups.into_iter().collect();
        rows.sort_by(|(ka, a), (kb, b)| {
            b.usage
                .micro_usd
                .cmp(&a.usage.micro_usd)
                .then_with(|| ka.cmp(kb))
        });
        rows.into_iter().map(|(_, row)| row).collect()
    }

    #[test]
    fn report_groups_by_every_combination_of_dimensions() {
        let (_dir, mut ledger) = ledger();
        let batch = sample();
        ledger.write(&batch).unwrap();
        let ranges = [
            (None, None),
            (Some(day("2026-11-25")), None),
            (None, Some(day("2026-11-26"))),
            (Some(day("2026-11-25")), Some(day("2026-11-26"))),
        ];
        for mask in 0u32..16 {
            let by: Vec<Dimension> = Dimension::ALL
                .into_iter()
                .enumerate()
                .filter(|(bit, _)| mask & (1 << bit) != 0)
                .map(|(_, d)| d)
                .collect();
            for (since, until) in ranges {
                let query = ReportQuery {
                    since,
                    until,
                    by: by.clone(),
                };
                let rows = ledger.report(&query).unwrap();
                let expected = expected_report(&batch, since, until, &by);
                assert_eq!(rows, expected, "{query:?}");
                let mut total = UsageDelta::default();
                for row in &rows {
                    total.add(&row.usage);
                }
                let all = expected_report(&batch, since, until, &[]);
                assert_eq!(total, all[0].usage, "{query:?}");
            }
        }
    }

    #[test]
    fn report_orders_by_cost_then_dimensions_and_ignores_repeated_dimensions() {
        let (_dir, mut ledger) = ledger();
        let cheap = UsageDelta {
            requests: 1,
            micro_usd: 5,
            ..UsageDelta::default()
        };
        let dear = UsageDelta {
            micro_usd: 900,
            ..cheap
        };
        ledger
            .write(&[
                (key("b", "c", "m", "2026-11-26"), cheap),
                (key("a", "c", "m", "2026-11-26"), cheap),
                (key("z", "c", "m", "2026-11-26"), dear),
            ])
            .unwrap();
        let query = ReportQuery {
            by: vec![Dimension::Project, Dimension::Project],
            ..ReportQuery::default()
        };
        let rows = ledger.report(&query).unwrap();
        let projects: Vec<&str> = rows.iter().filter_map(|r| r.project.as_deref()).collect();
        assert_eq!(projects, ["z", "a", "b"]);
        assert!(rows.iter().all(|r| r.model.is_none() && r.day.is_none()));
    }

    #[test]
    fn an_empty_report_has_no_rows() {
        let (_dir, ledger) = ledger();
        for by in [vec![], vec![Dimension::Day]] {
            let rows = ledger
                .report(&ReportQuery {
                    by,
                    ..ReportQuery::default()
                })
                .unwrap();
            assert!(rows.is_empty(), "{rows:?}");
        }
    }

    #[test]
    fn read_only_open_reads_and_refuses_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.db");
        let e = Ledger::open_read_only(&path).unwrap_err();
        assert!(matches!(e, StoreError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("tollgate.db"), "{e}");
        assert!(!path.exists(), "a read-only open creates nothing");

        let mut writer = Ledger::open(&path).unwrap();
        writer.write(&sample()).unwrap();
        drop(writer);
        let mut reader = Ledger::open_read_only(&path).unwrap();
        assert_eq!(
            reader.report(&ReportQuery::default()).unwrap()[0].usage,
            expected_report(&sample(), None, None, &[])[0].usage
        );
        let e = reader
            .write(&[(key("p", "c", "m", "2026-11-26"), delta(1))])
            .unwrap_err();
        assert!(matches!(e, StoreError::Write { .. }), "{e}");
    }

    #[test]
    fn read_only_open_beside_a_live_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.db");
        let mut writer = Ledger::open(&path).unwrap();
        writer.write(&sample()).unwrap();
        let reader = Ledger::open_read_only(&path).unwrap();
        writer
            .write(&[(key("late", "c", "m", "2026-11-26"), delta(1))])
            .unwrap();
        assert_eq!(
            reader.spend("late", day("2026-11-01"), None).unwrap(),
            delta(1)
        );
    }

    #[test]
    fn a_ledger_from_a_newer_tollgate_is_refused() {
        let (dir, ledger) = ledger();
        ledger
            .conn
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(ledger);
        let path = dir.path().join("db/nested/tollgate.db");
        for e in [
            Ledger::open(&path).unwrap_err(),
            Ledger::open_read_only(&path).unwrap_err(),
        ] {
            assert!(
                matches!(
                    e,
                    StoreError::UnknownSchema { found, known, .. }
                        if found == SCHEMA_VERSION + 1 && known == SCHEMA_VERSION
                ),
                "{e}"
            );
            let expected = format!("schema version {}", SCHEMA_VERSION + 1);
            assert!(e.to_string().contains(&expected), "{e}");
        }
    }

    /// (rows in `usage`, rows in `usage_log`)
    fn rows(ledger: &Ledger) -> (i64, i64) {
        let count = |table: &str| {
            ledger
                .conn
                .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        (count("usage"), count("usage_log"))
    }

    /// Every row of the ledger, summed by key, as reads see them.
    fn everything(ledger: &Ledger) -> Vec<ReportRow> {
        ledger
            .report(&ReportQuery {
                by: Dimension::ALL.to_vec(),
                ..ReportQuery::default()
            })
            .unwrap()
    }

    #[test]
    fn a_batch_is_read_from_the_log_before_a_fold_and_counted_once_after() {
        let (_dir, mut ledger) = ledger();
        let batch = sample();
        ledger.write(&batch).unwrap();
        assert_eq!(rows(&ledger), (0, batch.len() as i64), "logged, not folded");
        let logged = everything(&ledger);
        assert_eq!(logged.len(), batch.len());
        ledger.fold().unwrap();
        assert_eq!(rows(&ledger), (batch.len() as i64, 0));
        assert_eq!(everything(&ledger), logged, "a fold changes no read");

        // Logged twice and once more after a fold: each key's row has all three.
        ledger.write(&batch).unwrap();
        ledger.write(&batch).unwrap();
        ledger.fold().unwrap();
        ledger.write(&batch).unwrap();
        assert_eq!(rows(&ledger), (batch.len() as i64, batch.len() as i64));
        for (row, once) in everything(&ledger).iter().zip(&logged) {
            let mut four = once.usage;
            for _ in 0..3 {
                four.add(&once.usage);
            }
            assert_eq!(row.usage, four, "{row:?}");
        }
        assert_eq!(
            ledger.spend("search", day("2026-11-25"), None).unwrap(),
            [2, 3, 5, 6, 8, 9, 11, 12]
                .into_iter()
                .map(|n| delta(4 * n))
                .fold(UsageDelta::default(), |mut sum, d| {
                    sum.add(&d);
                    sum
                }),
        );
    }

    #[test]
    fn a_fold_is_due_after_its_interval() {
        let (_dir, mut ledger) = ledger();
        ledger.write(&sample()).unwrap();
        assert_eq!(rows(&ledger).1, 24);
        ledger.folded -= FOLD_EVERY;
        ledger.write(&sample()[..1]).unwrap();
        assert_eq!(rows(&ledger), (24, 0), "the write folded the log");
    }

    #[test]
    fn the_log_a_crash_left_is_folded_at_the_next_open() {
        let (dir, mut ledger) = ledger();
        ledger.write(&sample()).unwrap();
        ledger.fold().unwrap();
        ledger.write(&sample()).unwrap();
        let before = everything(&ledger);
        // Gone without a fold, as after SIGKILL.
        drop(ledger);
        let ledger = Ledger::open(&dir.path().join("db/nested/tollgate.db")).unwrap();
        assert_eq!(rows(&ledger), (24, 0));
        assert_eq!(everything(&ledger), before);
        assert_eq!(before[0].usage.requests % 2, 0, "both writes: {before:?}");
    }

    #[test]
    fn a_failed_fold_keeps_the_log_and_loses_nothing() {
        let (_dir, mut ledger) = ledger();
        let batch = sample();
        ledger.write(&batch).unwrap();
        let once = everything(&ledger);
        ledger
            .conn
            .execute_batch(
                "CREATE TRIGGER refuse_insert BEFORE INSERT ON usage \
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        assert!(matches!(ledger.fold(), Err(StoreError::Write { .. })));
        assert_eq!(rows(&ledger), (0, 24), "nothing moved");
        assert_eq!(everything(&ledger), once);
        // The write that makes the fold due again still writes its batch.
        ledger.folded -= FOLD_EVERY;
        ledger.write(&batch).unwrap();
        assert_eq!(rows(&ledger), (0, 48));
        ledger
            .conn
            .execute_batch("DROP TRIGGER refuse_insert")
            .unwrap();
        ledger.fold().unwrap();
        assert_eq!(rows(&ledger), (24, 0));
        for (row, once) in everything(&ledger).iter().zip(&once) {
            let mut twice = once.usage;
            twice.add(&once.usage);
            assert_eq!(row.usage, twice, "{row:?}");
        }
    }

    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_ledger() {
        let (dir, mut first) = ledger();
        let path = dir.path().join("db/nested/tollgate.db");
        first.write(&sample()).unwrap();
        let e = Ledger::open(&path).unwrap_err();
        assert!(matches!(e, StoreError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("tollgate.db.lock"), "{e}");
        // Readers are not writers.
        let reader = Ledger::open_read_only(&path).unwrap();
        assert_eq!(reader.report(&ReportQuery::default()).unwrap().len(), 1);
        drop(first);
        let second = Ledger::open(&path).unwrap();
        assert_eq!(rows(&second), (24, 0));
    }

    #[test]
    fn a_ledger_of_schema_1_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute(
                "INSERT INTO usage VALUES ('p', 'c', 'm', '2026-11-26', 1, 2, 3, 4, 5, 6)",
                [],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let mut ledger = Ledger::open(&path).unwrap();
        assert_eq!(user_version(&ledger.conn).unwrap(), SCHEMA_VERSION);
        ledger
            .write(&[(key("p", "c", "m", "2026-11-26"), delta(1))])
            .unwrap();
        let sum = ledger.spend("p", day("2026-11-26"), None).unwrap();
        assert_eq!(
            (sum.requests, sum.input_tokens, sum.micro_usd),
            (2, 102, 1_006)
        );
    }

    #[test]
    fn negative_counts_are_reported_as_corrupt() {
        let (_dir, ledger) = ledger();
        ledger
            .conn
            .execute(
                "INSERT INTO usage (project, credential, model, day, micro_usd) VALUES ('p', 'c', 'm', '2026-11-26', -1)",
                [],
            )
            .unwrap();
        let e = ledger.spend("p", day("2026-11-01"), None).unwrap_err();
        assert!(
            matches!(e, StoreError::Corrupt { what: "count", .. }),
            "{e}"
        );
        ledger
            .conn
            .execute("UPDATE usage SET micro_usd = 1, day = '26/11/2026'", [])
            .unwrap();
        let e = ledger
            .report(&ReportQuery {
                by: vec![Dimension::Day],
                ..ReportQuery::default()
            })
            .unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { what: "day", .. }), "{e}");
    }

    #[test]
    fn dimensions_parse_from_their_names() {
        for d in Dimension::ALL {
            assert_eq!(d.as_str().parse::<Dimension>(), Ok(d));
        }
        let e = "region".parse::<Dimension>().unwrap_err();
        assert_eq!(
            e,
            "unknown dimension `region`: expected one of project, model, credential, day"
        );
    }
}
