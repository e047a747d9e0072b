//! The process's log: one line per event on standard output, as text (`key=value` fields) or
//! JSON, filtered by `RUST_LOG` (default `info`).
//!
//! Invariant: writing a line takes no lock of the process's and, on a runtime worker, no system
//! call of its own. Each event is formatted into a buffer; a worker appends it to a buffer of
//! its own thread, written with one write(2) when the next line would not fit in
//! [`BATCH_BYTES`], and by [`flush_thread`]: the proxy's event loops call it every
//! [`FLUSH_INTERVAL`], the main runtime's workers whenever they park (run out of work). Other
//! threads write each line at once. Batches and lines are written through a duplicate of the
//! descriptor, so no `Stdout` mutex is taken, and a batch of at most 4 KiB of whole lines is
//! never split or interleaved (the kernel serialises writes to a file; a pipe takes up to 4 KiB
//! atomically). The request line, written once per request, skips tracing's formatting when
//! lines are plain text ([`request`]): it is the same line, formatted in place.
//!
//! What this trades: a proxy thread's lines reach the output within [`FLUSH_INTERVAL`], or
//! after at most 4 KiB of lines under load, rather than one write(2) per request when traffic
//! is light; lines of two threads may be out of order by up to one batch (each line has its
//! timestamp); a crash loses what is buffered (at most 4 KiB or 100 ms of lines per thread).
//! Usage is never in the log alone: the ledger is the record.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Largest batch of lines written at once: `PIPE_BUF`, what a pipe writes atomically.
pub const BATCH_BYTES: usize = 4096;

/// The duplicate of standard output that lines are written to.
static OUTPUT: OnceLock<File> = OnceLock::new();

/// Lines are text without colours ([`init`] with [`Format::Text`], not at a terminal): the
/// request line is then written by [`request`] itself.
static PLAIN_TEXT: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread batches its lines (it is a runtime worker that parks).
    static BATCHING: Cell<bool> = const { Cell::new(false) };
    static BATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// How long a proxy thread's lines may wait in its batch.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Writes this thread's batched lines, and from now on batches them. The main runtime calls it
/// when a worker parks (`on_thread_park`) and when a thread stops (`on_thread_stop`); a proxy
/// thread every [`FLUSH_INTERVAL`] (see [`flush_every_interval`]) and when it ends.
pub fn flush_thread() {
    BATCHING.with(|batching| batching.set(true));
    BATCH.with(|batch| {
        if let Ok(mut batch) = batch.try_borrow_mut() {
            write_out(&batch);
            batch.clear();
        }
    });
}

/// Batches this thread's lines from now on and writes them every [`FLUSH_INTERVAL`]; runs until
/// dropped. For a current-thread event loop that serves many requests between two parks, where
/// a write per park would be a write per request at low load.
pub async fn flush_every_interval() {
    BATCHING.with(|batching| batching.set(true));
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        flush_thread();
    }
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
        emit(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Adds one whole line to this thread's batch, or writes it at once on a thread that does not
/// batch.
fn emit(line: &[u8]) {
    if !BATCHING.with(Cell::get) || line.len() > BATCH_BYTES {
        write_out(line);
        return;
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
        // tracing's own event format colours the level for a person at a terminal.
        Format::Text if ansi => builder.fmt_fields(TextFields).init(),
        Format::Text => {
            builder
                .fmt_fields(TextFields)
                .event_format(TextEvent)
                .init();
            PLAIN_TEXT.store(true, Ordering::Relaxed);
        }
        Format::Json => builder.json().flatten_event(true).init(),
    }
}

/// A text line as tracing's default format writes it without colours (`2026-11-27T00:31:52.028991Z
///  INFO target: fields`), with the timestamp's date and time of day formatted once per second
/// and thread rather than once per line.
#[derive(Debug, Default, Clone, Copy)]
pub struct TextEvent;

impl<S, N> FormatEvent<S, N> for TextEvent
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        CLOCK.with(|clock| clock.borrow_mut().write_now(&mut writer))?;
        writer.write_str(level_label(*meta.level()))?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                writer.write_str(span.name())?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(writer, "{{{fields}}}")?;
                    }
                }
                writer.write_char(':')?;
            }
            writer.write_char(' ')?;
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// One proxied request, as its log line tells it.
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    pub project: &'a str,
    pub credential: &'a str,
    pub model: &'a str,
    pub status: u16,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_usd: &'a str,
    pub duration_ms: u64,
    pub upstream_first_byte_ms: u64,
}

/// The target of the request line: the proxy's, where it is logged from.
const REQUEST_TARGET: &str = "tollgate::proxy";

/// Logs the line of one proxied request (`INFO`, target `tollgate::proxy`, message `request`):
/// the same line `tracing::info!` with these fields writes, and filtered the same way. When
/// lines are plain text it is formatted here, straight into this thread's batch: it is the one
/// line every request writes, and tracing's dispatch and field visitors cost several times the
/// formatting itself.
pub fn request(line: &RequestLine<'_>) {
    if !tracing::enabled!(target: REQUEST_TARGET, Level::INFO) {
        return;
    }
    if !PLAIN_TEXT.load(Ordering::Relaxed) {
        request_event(line);
        return;
    }
    LINE.with(|text| {
        let Ok(mut text) = text.try_borrow_mut() else {
            return request_event(line);
        };
        text.clear();
        if write_request_text(&mut text, line).is_ok() {
            emit(text.as_bytes());
        }
    });
}

/// The request line through tracing, for the JSON format, a terminal and tests.
fn request_event(line: &RequestLine<'_>) {
    tracing::info!(
        target: REQUEST_TARGET,
        project = line.project,
        credential = line.credential,
        model = line.model,
        status = line.status,
        input_tokens = line.input_tokens,
        cached_input_tokens = line.cached_input_tokens,
        output_tokens = line.output_tokens,
        reasoning_tokens = line.reasoning_tokens,
        cost_usd = line.cost_usd,
        duration_ms = line.duration_ms,
        upstream_first_byte_ms = line.upstream_first_byte_ms,
        "request"
    );
}

/// The request line as [`TextEvent`] and [`TextFields`] write it.
fn write_request_text(out: &mut String, line: &RequestLine<'_>) -> fmt::Result {
    CLOCK.with(|clock| clock.borrow_mut().write_now(out))?;
    out.push_str(level_label(Level::INFO));
    out.push_str(REQUEST_TARGET);
    out.push_str(": request");
    let mut digits = itoa::Buffer::new();
    for (name, value) in [
        (" project=", line.project),
        (" credential=", line.credential),
        (" model=", line.model),
    ] {
        out.push_str(name);
        write_str_value(out, value)?;
    }
    out.push_str(" status=");
    out.push_str(digits.format(line.status));
    for (name, value) in [
        (" input_tokens=", line.input_tokens),
        (" cached_input_tokens=", line.cached_input_tokens),
        (" output_tokens=", line.output_tokens),
        (" reasoning_tokens=", line.reasoning_tokens),
    ] {
        out.push_str(name);
        out.push_str(digits.format(value));
    }
    out.push_str(" cost_usd=");
    write_str_value(out, line.cost_usd)?;
    for (name, value) in [
        (" duration_ms=", line.duration_ms),
        (" upstream_first_byte_ms=", line.upstream_first_byte_ms),
    ] {
        out.push_str(name);
        out.push_str(digits.format(value));
    }
    out.push('\n');
    Ok(())
}

/// A string field's value, as [`TextFields`] writes it: as it is when plain, else quoted.
fn write_str_value(out: &mut impl fmt::Write, value: &str) -> fmt::Result {
    if is_plain(value) {
        out.write_str(value)
    } else {
        write!(out, "{value:?}")
    }
}

/// A level as tracing's default text format writes it, padded to the same width.
fn level_label(level: Level) -> &'static str {
    match level {
        Level::ERROR => " ERROR ",
        Level::WARN => "  WARN ",
        Level::INFO => "  INFO ",
        Level::DEBUG => " DEBUG ",
        Level::TRACE => " TRACE ",
    }
}

thread_local! {
    /// The request line being formatted, reused.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    static CLOCK: RefCell<Clock> = const { RefCell::new(Clock { second: u64::MAX, prefix: String::new() }) };
}

/// This thread's `YYYY-MM-DDTHH:MM:SS.` for the second it last formatted.
struct Clock {
    second: u64,
    prefix: String,
}

impl Clock {
    /// Writes the current UTC time with microseconds, as RFC 3339 (`...T00:31:52.028991Z`).
    fn write_now(&mut self, writer: &mut impl fmt::Write) -> fmt::Result {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if now.as_secs() != self.second {
            self.second = now.as_secs();
            self.prefix.clear();
            let time = i64::try_from(self.second)
                .ok()
                .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
                .unwrap_or_default();
            write!(self.prefix, "{}.", time.format("%Y-%m-%dT%H:%M:%S"))?;
        }
        writer.write_str(&self.prefix)?;
        let micros = now.subsec_micros();
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(micros);
        writer.write_str(ZEROS.get(digits.len()..).unwrap_or_default())?;
        writer.write_str(digits)?;
        writer.write_char('Z')
    }
}

/// Leading zeros of a six-digit fraction, by the number of digits it has.
const ZEROS: &str = "000000";

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
            self.result = write_str_value(&mut self.writer, value);
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

    /// The lines `emit` logs, through `TextEvent` or else tracing's default format.
    fn lines(own: bool, emit: impl Fn()) -> String {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(TextFields)
            .with_writer(move || SharedBuffer(sink.clone()));
        if own {
            let subscriber = builder.event_format(TextEvent).finish();
            tracing::subscriber::with_default(subscriber, emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        let bytes = buffer.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn text_lines_are_tracings_default_lines() {
        let emit = || {
            tracing::info!(project = "search", status = 200u16, "request");
            tracing::warn!(error = %"refused", "upstream request failed");
            tracing::error!("fatal");
        };
        let (ours, theirs) = (lines(true, emit), lines(false, emit));
        let before = chrono::Utc::now();
        assert_eq!(ours.lines().count(), 3);
        for (our, their) in ours.lines().zip(theirs.lines()) {
            // Same timestamp shape (RFC 3339, microseconds, UTC), then the same text.
            let (stamp, rest) = our.split_at(27);
            assert_eq!(rest, &their[27..]);
            let parsed = chrono::DateTime::parse_from_rfc3339(stamp).unwrap();
            assert!(
                stamp.ends_with('Z') && stamp.as_bytes()[19] == b'.',
                "{stamp}"
            );
            let age = before.signed_duration_since(parsed);
            assert!(age >= chrono::TimeDelta::zero() && age < chrono::TimeDelta::seconds(60));
        }
        assert!(
            ours.contains("  INFO tollgate::logging::tests: request project=search status=200\n")
        );
        assert!(ours.contains(" ERROR tollgate::logging::tests: fatal\n"));
    }

    #[test]
    fn timestamps_keep_their_leading_zeros() {
        let mut clock = Clock {
            second: u64::MAX,
            prefix: String::new(),
        };
        let mut out = String::new();
        for _ in 0..200 {
            out.clear();
            clock.write_now(&mut Writer::new(&mut out)).unwrap();
            assert_eq!(out.len(), 27, "{out}");
            assert!(chrono::DateTime::parse_from_rfc3339(&out).is_ok(), "{out}");
        }
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

    fn request_line(model: &str) -> RequestLine<'_> {
        RequestLine {
            project: "search",
            credential: "search-api",
            model,
            status: 200,
            input_tokens: 42,
            cached_input_tokens: 0,
            output_tokens: 37,
            reasoning_tokens: 0,
            cost_usd: "0.000029",
            duration_ms: 3,
            upstream_first_byte_ms: 1,
        }
    }

    #[test]
    fn the_request_line_written_directly_is_the_line_tracing_writes() {
        for model in [
            "gpt-4o-mini-2024-07-18",
            "",
            "gpt-4o status=500\nfake",
            "modèle",
        ] {
            let line = request_line(model);
            let theirs = lines(true, || request_event(&line));
            let mut ours = String::new();
            write_request_text(&mut ours, &line).unwrap();
            assert_eq!(&ours[27..], &theirs[27..], "{model:?}");
            assert!(
                chrono::DateTime::parse_from_rfc3339(&ours[..27]).is_ok(),
                "{ours}"
            );
        }
        let mut ours = String::new();
        write_request_text(&mut ours, &request_line("gpt-4o-mini")).unwrap();
        assert!(ours.ends_with(
            "Z  INFO tollgate::proxy: request project=search credential=search-api model=gpt-4o-mini status=200 input_tokens=42 cached_input_tokens=0 output_tokens=37 reasoning_tokens=0 cost_usd=0.000029 duration_ms=3 upstream_first_byte_ms=1\n"
        ), "{ours}");
    }

    #[test]
    fn the_request_line_follows_the_filter() {
        let logged = |filter: &str| {
            let buffer = Arc::new(Mutex::new(Vec::new()));
            let sink = buffer.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .fmt_fields(TextFields)
                .with_env_filter(EnvFilter::new(filter))
                .with_writer(move || SharedBuffer(sink.clone()))
                .finish();
            tracing::subscriber::with_default(subscriber, || request(&request_line("gpt-4o")));
            let bytes = buffer.lock().unwrap().clone();
            String::from_utf8(bytes).unwrap()
        };
        assert!(logged("info").contains("tollgate::proxy: request project=search"));
        assert!(logged("tollgate::proxy=debug").contains(" model=gpt-4o status=200 "));
        assert_eq!(logged("warn"), "");
        assert_eq!(logged("info,tollgate::proxy=warn"), "");
    }
}
