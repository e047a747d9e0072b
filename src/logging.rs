//! The process's log: one line per event on standard output, as text (`key=value` fields) or
//! JSON, filtered by `RUST_LOG` (default `info`).
//!
//! Invariant: writing a line takes no lock of the process's and, on a runtime worker, no system
//! call of its own. Each event is formatted into a buffer; a worker appends it to a buffer of
//! its own thread, written with one write(2) when the next line would not fit in
//! [`BATCH_BYTES`] and whenever the worker parks (runs out of work, see [`flush_thread`]);
//! other threads write each line at once. Batches and lines are written through a duplicate of
//! the descriptor, so no `Stdout` mutex is taken, and a batch of at most 4 KiB of whole lines
//! is never split or interleaved (the kernel serialises writes to a file; a pipe takes up to
//! 4 KiB atomically).
//!
//! What this trades: a worker's lines reach the output when it parks, at once when traffic is
//! light, after at most 4 KiB of lines under load; lines of two workers may be out of order by
//! up to one batch (each line has its timestamp); a crash loses what is buffered (at most 4 KiB
//! per worker). Usage is never in the log alone: the ledger is the record.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::OnceLock;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, MakeWriter};
use tracing_subscriber::EnvFilter;

/// Largest batch of lines written at once: `PIPE_BUF`, what a pipe writes atomically.
pub const BATCH_BYTES: usize = 4096;

/// The duplicate of standard output that lines are written to.
static OUTPUT: OnceLock<File> = OnceLock::new();

thread_local! {
    /// This thread batches its lines (it is a runtime worker that parks).
    static BATCHING: Cell<bool> = const { Cell::new(false) };
    static BATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Writes this thread's batched lines, and from now on batches them. The runtime calls it when
/// a worker parks (`on_thread_park`) and when a thread stops (`on_thread_stop`).
pub fn flush_thread() {
    BATCHING.with(|batching| batching.set(true));
    BATCH.with(|batch| {
        if let Ok(mut batch) = batch.try_borrow_mut() {
            write_out(&batch);
            batch.clear();
        }
    });
}

fn write_out(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    match OUTPUT.get() {
        Some(mut file) => {
            let _ = file.write_all(bytes);
        }
        None => {
            let _ = std::io::stdout().write_all(bytes);
        }
    }
}

/// The writer tracing formats each event into, once per event.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineWriter;

impl Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if !BATCHING.with(Cell::get) || line.len() > BATCH_BYTES {
            write_out(line);
            return Ok(line.len());
        }
        BATCH.with(|batch| match batch.try_borrow_mut() {
            Ok(mut batch) => {
                if batch.len() + line.len() > BATCH_BYTES {
                    write_out(&batch);
                    batch.clear();
                }
                if batch.capacity() == 0 {
                    batch.reserve_exact(BATCH_BYTES);
                }
                batch.extend_from_slice(line);
            }
            // Logging while flushing (cannot happen: nothing logs in `write_out`).
            Err(_) => write_out(line),
        });
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LineWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Installs the global subscriber. Colours only for a person at a terminal.
pub fn init(format: Format) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stdout = std::io::stdout();
    let ansi = stdout.is_terminal();
    // Without a descriptor to duplicate (stdout closed), lines go through `Stdout`.
    if let Ok(fd) = stdout.as_fd().try_clone_to_owned() {
        let _ = OUTPUT.set(File::from(fd));
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(LineWriter);
    match format {
        Format::Text => builder.fmt_fields(TextFields).init(),
        Format::Json => builder.json().flatten_event(true).init(),
    }
}

/// Text fields as `message key=value ...`, like tracing's default, for a fraction of its cost
/// (the per-request line has eleven fields): integers are written without the formatting
/// machinery, and string values are quoted and escaped only when they hold more than
/// `[A-Za-z0-9._:/+-]`, so that a client-chosen string (a model name) cannot forge a field or
/// a line. Display values (`key = %value`) are written as they are, as tracing's default does.
#[derive(Debug, Default, Clone, Copy)]
pub struct TextFields;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    /// Writes the separator and `key=`; false once a write has failed.
    fn key(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let separator = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.result = self
            .writer
            .write_str(separator)
            .and_then(|()| self.writer.write_str(field.name()))
            .and_then(|()| self.writer.write_char('='));
        self.result.is_ok()
    }

    fn integer(&mut self, field: &Field, value: impl itoa::Integer) {
        if self.key(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }
}

impl Visit for TextVisitor<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.integer(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.integer(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else if self.key(field) {
            self.result = if is_plain(value) {
                self.writer.write_str(value)
            } else {
                write!(self.writer, "{value:?}")
            };
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            if self.result.is_err() {
                return;
            }
            let separator = if std::mem::take(&mut self.first) {
                ""
            } else {
                " "
            };
            self.result = write!(self.writer, "{separator}{value:?}");
        } else if self.key(field) {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

/// A value written as it is: non-empty, and nothing that could end it or start another field.
fn is_plain(value: &str) -> bool {
    !value.is_empty()
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'+' | b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Formats the events `emit` logs with `TextFields`, without time or level.
    fn text(emit: impl FnOnce()) -> String {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_ansi(false)
            .fmt_fields(TextFields)
            .with_writer(move || SharedBuffer(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writes_the_message_then_each_field() {
        let line = text(|| {
            let name = "search";
            tracing::info!(
                project = %name,
                model = "gpt-4o-mini",
                status = 200u16,
                delta = -3i64,
                cached = false,
                cost_usd = %"0.000029",
                "request"
            );
        });
        assert_eq!(
            line,
            "request project=search model=gpt-4o-mini status=200 delta=-3 cached=false cost_usd=0.000029\n"
        );
    }

    #[test]
    fn quotes_and_escapes_what_could_forge_a_field_or_a_line() {
        let line = text(|| {
            tracing::warn!(
                model = "gpt-4o status=500\nfake",
                empty = "",
                error = %"connection refused: os error 111",
                "upstream request failed"
            );
        });
        assert_eq!(
            line,
            "upstream request failed model=\"gpt-4o status=500\\nfake\" empty=\"\" error=connection refused: os error 111\n"
        );
    }

    #[test]
    fn plain_values_are_the_safe_alphabet_only() {
        assert!(is_plain("gpt-4.1-mini"));
        assert!(is_plain("2026-11-26T12:00:00Z"));
        assert!(!is_plain(""));
        assert!(!is_plain("a b"));
        assert!(!is_plain("a=b"));
        assert!(!is_plain("\"x\""));
        assert!(!is_plain("é"));
    }
}
