//! The SQLite ledger: one row of usage per (project, credential, model, UTC day).
//!
//! Invariant: rows only grow, and a batch is written in one transaction that adds to them, so
//! a write either counts the whole batch once or changes nothing and can be retried. Counts
//! are stored as SQLite integers (`i64`); a `u64` that does not fit is saturated on the way in
//! (no real count comes near 2^63) and a negative value read back is reported as corrupt.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::NaiveDate;
use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};

use super::{StoreError, UsageDelta, UsageKey};

/// The schema this build writes and reads, kept in SQLite's `user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// `MIGRATIONS[n]` takes a ledger from schema version `n` to `n + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [r#"
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
"#];

const UPSERT: &str = "
INSERT INTO usage (project, credential, model, day, requests, input_tokens,
                   cached_input_tokens, output_tokens, reasoning_tokens, micro_usd)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
ON CONFLICT (project, credential, model, day) DO UPDATE SET
    requests            = requests            + excluded.requests,
    input_tokens        = input_tokens        + excluded.input_tokens,
    cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
    output_tokens       = output_tokens       + excluded.output_tokens,
    reasoning_tokens    = reasoning_tokens    + excluded.reasoning_tokens,
    micro_usd           = micro_usd           + excluded.micro_usd";

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
    path: PathBuf,
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
    /// Opens the ledger at `path`, creating it and its directory when missing, in WAL mode
    /// with `synchronous = NORMAL` (a power cut may lose the last writes, never corrupt the
    /// file), and brings its schema up to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Ledger, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: path.to_path_buf(),
                source,
            })?;
        }
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
        migrate(&mut conn, path)?;
        Ok(Ledger {
            conn,
            path: path.to_path_buf(),
        })
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
            path: path.to_path_buf(),
        })
    }

    /// The file this ledger is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds every delta of `batch` to its row, in one transaction: all or nothing.
    pub fn write(&mut self, batch: &[(UsageKey, UsageDelta)]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let path = &self.path;
        let write_err = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        // IMMEDIATE: take the write lock up front rather than fail to upgrade a read lock
        // midway if another connection writes.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(write_err)?;
        {
            let mut upsert = tx.prepare_cached(UPSERT).map_err(write_err)?;
            // A batch is mostly one day: formatted again only when a row's day differs from the
            // previous row's, not for every row.
            let mut day: Option<(NaiveDate, String)> = None;
            for (key, delta) in batch {
                let text = match &day {
                    Some((date, text)) if *date == key.day => text,
                    _ => &day.insert((key.day, day_text(key.day))).1,
                };
                upsert
                    .execute(params![
                        &*key.project,
                        &*key.credential,
                        &*key.model,
                        text,
                        int(delta.requests),
                        int(delta.input_tokens),
                        int(delta.cached_input_tokens),
                        int(delta.output_tokens),
                        int(delta.reasoning_tokens),
                        int(delta.micro_usd),
                    ])
                    .map_err(write_err)?;
            }
        }
        tx.commit().map_err(write_err)
    }

    /// `project`'s usage over the days `[from, until)` (`until = None`: no end).
    pub fn spend(
        &self,
        project: &str,
        from: NaiveDate,
        until: Option<NaiveDate>,
    ) -> Result<UsageDelta, StoreError> {
        let sql = format!(
            "SELECT {SUMS} FROM usage WHERE project = ?1 AND day >= ?2 AND (?3 IS NULL OR day < ?3)"
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
        sql.push_str(" FROM usage");
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
                    StoreError::UnknownSchema {
                        found: 2,
                        known: 1,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("schema version 2"), "{e}");
        }
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
