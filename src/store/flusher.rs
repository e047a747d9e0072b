//! The background writer: owns the [`Ledger`] on a dedicated thread (SQLite calls block) and
//! moves [`Pending`] usage into it every interval, on demand, and once more when stopped.
//!
//! Invariant: a drained batch is either written (one transaction) or restored to `pending`,
//! never dropped and never written twice; the last flush happens before [`Flusher::shutdown`]
//! returns. Failures are counted for the metrics and logged once per streak.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Ledger, Pending, StoreError};

type Ack = oneshot::Sender<Result<(), StoreError>>;

enum Command {
    /// Flush now and answer with the result.
    Flush(Ack),
    /// Flush a last time, close the ledger, answer and stop.
    Shutdown(Ack),
}

/// The handle of the writer thread. Dropping it without [`Flusher::shutdown`] also stops the
/// thread after a final flush, but nobody waits for it.
#[derive(Debug)]
pub struct Flusher {
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    failures: Arc<AtomicU64>,
    path: PathBuf,
}

impl Flusher {
    /// Starts the writer thread, which flushes `pending` into `ledger` every `interval`.
    pub fn spawn(
        ledger: Ledger,
        pending: Arc<Pending>,
        interval: Duration,
    ) -> Result<Flusher, StoreError> {
        let (commands, receiver) = mpsc::channel();
        let failures = Arc::new(AtomicU64::new(0));
        let path = ledger.path().to_path_buf();
        let writer = Writer {
            ledger,
            pending,
            failures: failures.clone(),
            streak: 0,
        };
        let thread = std::thread::Builder::new()
            .name("tollgate-ledger".to_owned())
            .spawn(move || writer.run(&receiver, interval))
            .map_err(|source| StoreError::Spawn {
                path: path.clone(),
                source,
            })?;
        Ok(Flusher {
            commands,
            thread: Some(thread),
            failures,
            path,
        })
    }

    /// Failed writes since start (each failed flush counts once), for the metrics.
    pub fn failures(&self) -> Arc<AtomicU64> {
        self.failures.clone()
    }

    /// Flushes now and waits for the write. On error the batch is back in `pending`.
    pub async fn flush_now(&self) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        self.commands
            .send(Command::Flush(ack))
            .map_err(|_| self.stopped())?;
        done.await.map_err(|_| self.stopped())?
    }

    /// Flushes a last time, closes the ledger and waits for the thread to end. Usage settled
    /// after this call stays in `pending`: stop the request path first.
    pub async fn shutdown(mut self) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        self.commands
            .send(Command::Shutdown(ack))
            .map_err(|_| self.stopped())?;
        let result = done.await.map_err(|_| self.stopped())?;
        if let Some(thread) = self.thread.take() {
            // The thread has answered and only returns now: this join is short, but it blocks.
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                return Err(self.stopped());
            }
        }
        result
    }

    fn stopped(&self) -> StoreError {
        StoreError::Stopped {
            path: self.path.clone(),
        }
    }
}

/// What the thread owns.
struct Writer {
    ledger: Ledger,
    pending: Arc<Pending>,
    failures: Arc<AtomicU64>,
    /// Consecutive failed flushes: 0 while healthy.
    streak: u64,
}

impl Writer {
    fn run(mut self, commands: &mpsc::Receiver<Command>, interval: Duration) {
        let mut next = Instant::now() + interval;
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            match commands.recv_timeout(wait) {
                Ok(Command::Flush(ack)) => {
                    let result = self.flush();
                    // The caller may have stopped waiting; the flush happened all the same.
                    let _ = ack.send(result);
                }
                Ok(Command::Shutdown(ack)) => {
                    let result = self.flush();
                    if result.is_ok() {
                        // A stopped ledger has everything in `usage` (the next start would
                        // fold it otherwise).
                        if let Err(err) = self.ledger.fold() {
                            tracing::warn!(error = %err, "cannot fold the ledger's log at shutdown");
                        }
                    }
                    // Close the file before answering, so the caller sees a closed ledger.
                    drop(self);
                    let _ = ack.send(result);
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    // Logged and counted inside; the batch waits in `pending` for the next try.
                    let _ = self.flush();
                    next = Instant::now() + interval;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // The handle was dropped without `shutdown`: flush what is left and stop.
                    let _ = self.flush();
                    return;
                }
            }
        }
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        let batch = self.pending.drain();
        if batch.is_empty() {
            return Ok(());
        }
        match self.ledger.write(&batch) {
            Ok(()) => {
                if self.streak > 0 {
                    tracing::info!(
                        ledger = %self.ledger.path().display(),
                        failed_flushes = self.streak,
                        "the ledger is written again"
                    );
                    self.streak = 0;
                }
                Ok(())
            }
            Err(err) => {
                // The write was one transaction: nothing of it landed, so all of it goes back.
                self.pending.restore(&batch);
                // Relaxed: a statistic, read on its own.
                self.failures.fetch_add(1, Ordering::Relaxed);
                if self.streak == 0 {
                    tracing::error!(
                        error = %err,
                        "cannot write usage to the ledger; keeping it in memory and retrying"
                    );
                }
                self.streak += 1;
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::*;
    use crate::store::{ReportQuery, UsageDelta, UsageKey};

    fn key(project: &str) -> UsageKey {
        UsageKey {
            project: Arc::from(project),
            credential: Arc::from("c"),
            model: Arc::from("m"),
            day: NaiveDate::from_ymd_opt(2026, 11, 26).unwrap(),
        }
    }

    fn delta(n: u64) -> UsageDelta {
        UsageDelta {
            requests: 1,
            input_tokens: n,
            output_tokens: n,
            micro_usd: 10 * n,
            ..UsageDelta::default()
        }
    }

    fn spent(path: &std::path::Path, project: &str) -> UsageDelta {
        let from = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        Ledger::open_read_only(path)
            .unwrap()
            .spend(project, from, None)
            .unwrap()
    }

    /// A long interval: only `flush_now` and `shutdown` write.
    const NEVER: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn flush_now_writes_what_was_added() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.db");
        let pending = Arc::new(Pending::new());
        let flusher = Flusher::spawn(Ledger::open(&path).unwrap(), pending.clone(), NEVER).unwrap();
        pending.add(key("a").parts(), &delta(1));
        pending.add(key("a").parts(), &delta(2));
        pending.add(key("b").parts(), &delta(4));
        flusher.flush_now().await.unwrap();
        let mut three = delta(1);
        three.add(&delta(2));
        assert_eq!(spent(&path, "a"), three);
        assert_eq!(spent(&path, "b"), delta(4));
        assert!(pending.drain().is_empty());
        flusher.flush_now().await.unwrap();
        assert_eq!(spent(&path, "a"), three, "an empty flush writes nothing");

        pending.add(key("c").parts(), &delta(8));
        flusher.shutdown().await.unwrap();
        assert_eq!(spent(&path, "c"), delta(8), "shutdown flushes a last time");
    }

    #[tokio::test]
    async fn the_interval_flushes_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.db");
        let pending = Arc::new(Pending::new());
        let flusher = Flusher::spawn(
            Ledger::open(&path).unwrap(),
            pending.clone(),
            Duration::from_millis(10),
        )
        .unwrap();
        pending.add(key("a").parts(), &delta(1));
        let deadline = Instant::now() + Duration::from_secs(10);
        while spent(&path, "a") != delta(1) {
            assert!(Instant::now() < deadline, "no flush within 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        flusher.shutdown().await.unwrap();
        assert_eq!(spent(&path, "a"), delta(1));
    }

    #[tokio::test]
    async fn a_failed_write_is_restored_and_written_once_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.db");
        let pending = Arc::new(Pending::new());
        let flusher = Flusher::spawn(Ledger::open(&path).unwrap(), pending.clone(), NEVER).unwrap();
        let failures = flusher.failures();
        pending.add(key("a").parts(), &delta(1));
        flusher.flush_now().await.unwrap();

        // Another connection makes the log refuse rows: the next writes fail.
        let admin = rusqlite::Connection::open(&path).unwrap();
        admin
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON usage_log \
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        pending.add(key("a").parts(), &delta(2));
        let e = flusher.flush_now().await.unwrap_err();
        assert!(matches!(e, StoreError::Write { .. }), "{e}");
        assert!(e.to_string().contains("tollgate.db"), "{e}");
        assert_eq!(failures.load(Ordering::Relaxed), 1);
        pending.add(key("a").parts(), &delta(4));
        assert!(flusher.flush_now().await.is_err());
        assert_eq!(failures.load(Ordering::Relaxed), 2);

        admin.execute_batch("DROP TRIGGER refuse").unwrap();
        flusher.flush_now().await.unwrap();
        let mut all = delta(1);
        all.add(&delta(2));
        all.add(&delta(4));
        assert_eq!(spent(&path, "a"), all, "the restored batches, exactly once");
        flusher.flush_now().await.unwrap();
        flusher.shutdown().await.unwrap();
        assert_eq!(spent(&path, "a"), all);
        assert_eq!(failures.load(Ordering::Relaxed), 2);
        let rows = Ledger::open_read_only(&path)
            .unwrap()
            .report(&ReportQuery::default())
            .unwrap();
        assert_eq!(rows.len(), 1);
    }

    #[tokio::test]
    async fn dropping_the_handle_flushes_and_stops_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.db");
        let pending = Arc::new(Pending::new());
        let mut flusher =
            Flusher::spawn(Ledger::open(&path).unwrap(), pending.clone(), NEVER).unwrap();
        let thread = flusher.thread.take().unwrap();
        pending.add(key("a").parts(), &delta(3));
        drop(flusher);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        assert_eq!(spent(&path, "a"), delta(3));
    }
}
