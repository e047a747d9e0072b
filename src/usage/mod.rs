//! Usage reported by the upstream, and the incremental meters that find it in response bodies.
//!
//! Design: a [`Meter`] looks at a response body chunk by chunk as the proxy forwards it, and
//! never holds the body. Compressed bodies go through a streaming decoder on the side
//! (`decode.rs`; gzip CRCs and zlib checksums are checked as their trailers arrive) whose output
//! is fed straight to a scanner. For JSON bodies the scanner is a small tokenizer (`json.rs`)
//! that tracks depth, strings and the current key, jumps between the bytes that matter eight at a
//! time (`find.rs`), and keeps only the bytes of the top-level `usage` value (capped at 16 KiB)
//! and of the `model` string; only that captured usage object is read. For SSE bodies (`sse.rs`)
//! a byte-level line scanner finds event boundaries and feeds each event's `data` to the same
//! tokenizer, which then also looks under the top-level `response` key (Responses API events).
//! Every piece is a state machine over bytes, so any chunking of the same body gives the same
//! [`Report`], and memory stays bounded whatever the body's size.
//!
//! A body cut short is not malformed unless the cut falls inside a usage value; the caller knows
//! a cut body from its own end-of-stream, and [`Report::events`] helps it estimate.
//!
//! [`UsageChunkFilter`] removes the usage-only chunk from chat and legacy completion streams when
//! the proxy itself asked for `stream_options.include_usage`, holding at most one partial event
//! (1 MiB at most).

mod decode;
mod find;
#[cfg(test)]
mod fixtures;
mod json;
mod sse;

use std::fmt;

pub use decode::Encoding;
pub use sse::UsageChunkFilter;

use decode::Pipeline;
use json::JsonScanner;
use sse::SseScanner;

/// Tokens one response reports. `input_tokens` includes `cached_input_tokens` and
/// `output_tokens` includes `reasoning_tokens`, as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
}

impl Usage {
    /// OpenAI's `total_tokens`: input plus output.
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// What kind of body a [`Meter`] reads, from the response's `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A single JSON document (`application/json`).
    Json,
    /// Server-sent events (`text/event-stream`).
    Sse,
}

/// What a [`Meter`] found in a body so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Some once a well-formed usage object with token counts was seen; the last one wins.
    /// Whisper's `{"type":"duration"}` usage counts as a zero-token usage.
    pub usage: Option<Usage>,
    /// The response's own `model` (top level, or `response.model` in Responses events); the
    /// first one seen.
    pub model: Option<String>,
    /// Number of SSE data events seen (`[DONE]` excepted; 0 for JSON); used to estimate the
    /// output tokens of a cut stream.
    pub events: u64,
    /// A usage object was present but unreadable (wrong types, truncated, too large), or the
    /// body could not be decoded. Sticky: a later good usage object does not clear it.
    pub malformed: bool,
    /// The body ended inside a JSON document or an SSE event.
    pub incomplete: bool,
}

impl Report {
    fn from_findings(found: json::Findings, events: u64, incomplete: bool) -> Report {
        Report {
            usage: found.usage,
            model: found.model,
            events,
            malformed: found.malformed,
            incomplete,
        }
    }
}

/// The scanner for one body format.
#[derive(Debug)]
enum Scanner {
    Json(JsonScanner),
    Sse(SseScanner),
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner::Json(JsonScanner::default())
    }
}

impl Scanner {
    fn new(format: Format) -> Self {
        match format {
            Format::Json => Scanner::Json(JsonScanner::new(false)),
            Format::Sse => Scanner::Sse(SseScanner::new(true)),
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        match self {
            Scanner::Json(scanner) => scanner.feed(bytes),
            Scanner::Sse(scanner) => scanner.feed(bytes),
        }
    }

    fn report(&self) -> Report {
        match self {
            Scanner::Json(scanner) => {
                Report::from_findings(scanner.findings(), 0, scanner.incomplete())
            }
            Scanner::Sse(scanner) => scanner.report(),
        }
    }
}

/// Looks at a response body as it passes, chunk by chunk, without holding it.
///
/// Memory is bounded whatever the body's size (the decoder's window plus two small capped
/// buffers), and any split of the same bytes into chunks gives the same [`Report`]. (For a
/// corrupt zstd or brotli body only `malformed` is independent of the split: those decoders
/// drop an amount of already decoded output on error that depends on where chunks ended.)
pub struct Meter {
    pipeline: Pipeline,
}

impl fmt::Debug for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meter")
            .field("pipeline", &self.pipeline)
            .field("report", &self.report())
            .finish()
    }
}

impl Meter {
    pub fn new(format: Format, encoding: Encoding) -> Meter {
        Meter {
            pipeline: Pipeline::new(Scanner::new(format), encoding),
        }
    }

    /// The next bytes of the body exactly as the upstream sent them (still compressed).
    pub fn observe(&mut self, chunk: &[u8]) {
        self.pipeline.write(chunk);
    }

    /// What was found so far, as if the body ended here: callable any time. A usage value cut
    /// off by the end of what was observed counts as malformed.
    pub fn report(&self) -> Report {
        let mut report = self.pipeline.scanner().report();
        report.malformed |= self.pipeline.failed();
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::error::Error;
    use std::io::{self, Write};

    type TestResult = Result<(), Box<dyn Error>>;

    fn usage(input: u64, cached: u64, output: u64, reasoning: u64) -> Option<Usage> {
        Some(Usage {
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            reasoning_tokens: reasoning,
        })
    }

    fn meter_split(format: Format, encoding: Encoding, body: &[u8], cuts: &[usize]) -> Report {
        let mut meter = Meter::new(format, encoding);
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, body.len());
            meter.observe(&body[start..cut]);
            start = cut;
        }
        meter.observe(&body[start..]);
        meter.report()
    }

    fn meter(format: Format, encoding: Encoding, body: &[u8]) -> Report {
        meter_split(format, encoding, body, &[])
    }

    fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data)?;
        encoder.finish()
    }

    fn zlib(data: &[u8]) -> io::Result<Vec<u8>> {
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data)?;
        encoder.finish()
    }

    fn raw_deflate(data: &[u8]) -> io::Result<Vec<u8>> {
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data)?;
        encoder.finish()
    }

    fn zstd(data: &[u8]) -> io::Result<Vec<u8>> {
        zstd::stream::encode_all(data, 3)
    }

    /// zstd with the frame's optional content checksum, as the `zstd` tool writes it.
    fn zstd_checked(data: &[u8]) -> io::Result<Vec<u8>> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
        encoder.include_checksum(true)?;
        encoder.write_all(data)?;
        encoder.finish()
    }

    /// Flips `len` bytes at `at` (clamped to the body).
    fn corrupt(mut body: Vec<u8>, at: usize, len: usize) -> Vec<u8> {
        let at = at.min(body.len().saturating_sub(1));
        let end = at.saturating_add(len).min(body.len());
        for byte in &mut body[at..end] {
            *byte = !*byte;
        }
        body
    }

    fn compress(encoding: Encoding, data: &[u8]) -> io::Result<Vec<u8>> {
        match encoding {
            Encoding::Identity => Ok(data.to_vec()),
            Encoding::Gzip => gzip(data),
            Encoding::Deflate => zlib(data),
            Encoding::Zstd => zstd(data),
            Encoding::Brotli => Err(io::Error::other("no brotli encoder in this crate")),
        }
    }

    fn expected_chat_sse() -> Report {
        Report {
            usage: usage(19, 0, 5, 0),
            model: Some("gpt-4o-mini-2024-07-18".to_owned()),
            events: 6,
            malformed: false,
            incomplete: false,
        }
    }

    fn expected_responses_sse() -> Report {
        Report {
            usage: usage(37, 32, 11, 4),
            model: Some("gpt-4.1-mini-2025-04-14".to_owned()),
            events: 10,
            malformed: false,
            incomplete: false,
        }
    }

    fn expected_chat_json() -> Report {
        Report {
            usage: usage(1200, 1024, 300, 192),
            model: Some("o4-mini-2025-04-16".to_owned()),
            events: 0,
            malformed: false,
            incomplete: false,
        }
    }

    #[test]
    fn identity_bodies_of_every_endpoint() {
        let cases = [
            (Format::Json, fixtures::CHAT_JSON, expected_chat_json()),
            (
                Format::Sse,
                fixtures::CHAT_STREAM_USAGE,
                expected_chat_sse(),
            ),
            (
                Format::Sse,
                fixtures::RESPONSES_STREAM,
                expected_responses_sse(),
            ),
            (
                Format::Json,
                fixtures::MODERATION_JSON,
                Report {
                    model: Some("omni-moderation-2024-09-26".to_owned()),
                    ..Report::default()
                },
            ),
            (
                Format::Json,
                fixtures::WHISPER_JSON,
                Report {
                    usage: Some(Usage::default()),
                    ..Report::default()
                },
            ),
            (
                Format::Sse,
                fixtures::AUDIO_STREAM,
                Report {
                    usage: usage(31, 0, 4, 0),
                    events: 3,
                    ..Report::default()
                },
            ),
        ];
        for (format, body, expected) in cases {
            assert_eq!(meter(format, Encoding::Identity, body.as_bytes()), expected);
        }
    }

    #[test]
    fn report_is_callable_any_time() {
        let body = fixtures::CHAT_STREAM_USAGE.as_bytes();
        let mut meter = Meter::new(Format::Sse, Encoding::Identity);
        assert_eq!(meter.report(), Report::default());
        let half = body.len() / 2;
        meter.observe(&body[..half]);
        let partial = meter.report();
        assert_eq!(partial.usage, None);
        assert!(partial.events > 0 && partial.events < 6);
        meter.observe(&body[half..]);
        assert_eq!(meter.report(), expected_chat_sse());
    }

    #[test]
    fn truncated_stream_keeps_event_count() {
        let body = fixtures::RESPONSES_STREAM;
        let cut = body.find("event: response.completed").unwrap_or(0);
        let report = meter(Format::Sse, Encoding::Identity, &body.as_bytes()[..cut]);
        assert_eq!(
            report,
            Report {
                usage: None,
                model: Some("gpt-4.1-mini-2025-04-14".to_owned()),
                events: 9,
                malformed: false,
                incomplete: false,
            }
        );
    }

    #[test]
    fn gzip_deflate_zstd_bodies() -> TestResult {
        for encoding in [Encoding::Gzip, Encoding::Deflate, Encoding::Zstd] {
            let sse = compress(encoding, fixtures::CHAT_STREAM_USAGE.as_bytes())?;
            assert_eq!(
                meter(Format::Sse, encoding, &sse),
                expected_chat_sse(),
                "{encoding:?}"
            );
            let json = compress(encoding, fixtures::CHAT_JSON.as_bytes())?;
            assert_eq!(
                meter(Format::Json, encoding, &json),
                expected_chat_json(),
                "{encoding:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn raw_deflate_is_accepted() -> TestResult {
        let body = raw_deflate(fixtures::RESPONSES_STREAM.as_bytes())?;
        assert_eq!(
            meter(Format::Sse, Encoding::Deflate, &body),
            expected_responses_sse()
        );
        for at in 0..=body.len() {
            assert_eq!(
                meter_split(Format::Sse, Encoding::Deflate, &body, &[at]),
                expected_responses_sse(),
                "split at {at}"
            );
        }
        Ok(())
    }

    #[test]
    fn multi_member_gzip() -> TestResult {
        let body = fixtures::CHAT_STREAM_USAGE.as_bytes();
        let (a, b) = body.split_at(body.len() / 2);
        let mut gz = gzip(a)?;
        gz.extend_from_slice(&gzip(b)?);
        assert_eq!(meter(Format::Sse, Encoding::Gzip, &gz), expected_chat_sse());
        let cuts: Vec<usize> = (1..gz.len()).collect();
        assert_eq!(
            meter_split(Format::Sse, Encoding::Gzip, &gz, &cuts),
            expected_chat_sse()
        );
        Ok(())
    }

    #[test]
    fn brotli_bodies() {
        assert_eq!(
            meter(
                Format::Sse,
                Encoding::Brotli,
                fixtures::CHAT_STREAM_USAGE_BR
            ),
            expected_chat_sse()
        );
        assert_eq!(
            meter(Format::Json, Encoding::Brotli, fixtures::CHAT_JSON_BR),
            expected_chat_json()
        );
        let body = fixtures::CHAT_STREAM_USAGE_BR;
        for at in 0..=body.len() {
            assert_eq!(
                meter_split(Format::Sse, Encoding::Brotli, body, &[at]),
                expected_chat_sse(),
                "split at {at}"
            );
        }
    }

    #[test]
    fn corrupt_gzip_is_malformed() -> TestResult {
        let body = gzip(fixtures::CHAT_STREAM_USAGE.as_bytes())?;
        let len = body.len();
        // Anywhere in the header, the compressed data or the CRC/size trailer.
        for at in [0, 3, len / 2, len - 8, len - 2] {
            let report = meter(Format::Sse, Encoding::Gzip, &corrupt(body.clone(), at, 1));
            assert!(report.malformed, "flipped byte {at}");
        }
        // Not gzip at all.
        let report = meter(Format::Json, Encoding::Gzip, fixtures::CHAT_JSON.as_bytes());
        assert!(report.malformed);
        assert_eq!(report.usage, None);
        Ok(())
    }

    #[test]
    fn gzip_header_fields_are_skipped() -> TestResult {
        let plain = fixtures::CHAT_STREAM_USAGE.as_bytes();
        let mut encoder = flate2::GzBuilder::new()
            .filename("stream.sse")
            .comment("made by a test")
            .extra(vec![1, 2, 3, 4, 5])
            .mtime(1_761_000_000)
            .write(Vec::new(), flate2::Compression::best());
        encoder.write_all(plain)?;
        let body = encoder.finish()?;
        for at in 0..=body.len() {
            assert_eq!(
                meter_split(Format::Sse, Encoding::Gzip, &body, &[at]),
                expected_chat_sse(),
                "split at {at}"
            );
        }
        Ok(())
    }

    #[test]
    fn corrupt_zstd_brotli_deflate_are_malformed() -> TestResult {
        let plain = fixtures::CHAT_JSON.as_bytes();
        // The magic or header, the data, and the checksum. Brotli has no checksum: some flips
        // in its data decode to other bytes or look like a cut stream, and cannot be caught.
        let brotli = fixtures::CHAT_JSON_BR.to_vec();
        let zstd = zstd_checked(plain)?;
        let zlib = zlib(plain)?;
        for (encoding, body, positions) in [
            (
                Encoding::Zstd,
                &zstd,
                vec![0, zstd.len() / 3, zstd.len() / 2, zstd.len() - 2],
            ),
            (
                Encoding::Deflate,
                &zlib,
                vec![0, zlib.len() / 3, zlib.len() / 2, zlib.len() - 2],
            ),
            (Encoding::Brotli, &brotli, vec![0, 10, 50, 250]),
        ] {
            for at in positions {
                let report = meter(Format::Json, encoding, &corrupt(body.to_vec(), at, 2));
                assert!(report.malformed, "{encoding:?} flipped at {at}");
            }
        }
        // Raw deflate has no checksum; bytes after its end are still caught.
        let mut body = raw_deflate(plain)?;
        body.extend_from_slice(b"more");
        let report = meter(Format::Json, Encoding::Deflate, &body);
        assert!(report.malformed);
        assert_eq!(report.usage, expected_chat_json().usage);
        // Garbage that is no stream of the kind at all.
        for encoding in [Encoding::Zstd, Encoding::Brotli] {
            let report = meter(Format::Json, encoding, fixtures::CHAT_JSON.as_bytes());
            assert!(report.malformed, "{encoding:?}");
            assert_eq!(report.usage, None);
        }
        Ok(())
    }

    #[test]
    fn usage_found_before_corruption_is_kept() -> TestResult {
        let mut body = gzip(fixtures::CHAT_STREAM_USAGE.as_bytes())?;
        body.extend_from_slice(b"trailing garbage that is not a gzip member");
        let report = meter(Format::Sse, Encoding::Gzip, &body);
        assert_eq!(report.usage, expected_chat_sse().usage);
        assert!(report.malformed);
        Ok(())
    }

    #[test]
    fn zstd_window_is_bounded() -> TestResult {
        use zstd::stream::raw::CParameter;
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
        encoder.set_parameter(CParameter::WindowLog(25))?;
        encoder.include_contentsize(false)?;
        encoder.write_all(fixtures::CHAT_JSON.as_bytes())?;
        let body = encoder.finish()?;
        let report = meter(Format::Json, Encoding::Zstd, &body);
        assert!(report.malformed);
        assert_eq!(report.usage, None);
        Ok(())
    }

    #[test]
    fn huge_image_body_through_gzip() -> TestResult {
        let body = gzip(fixtures::big_image_json(5 * 1024 * 1024).as_bytes())?;
        let mut meter = Meter::new(Format::Json, Encoding::Gzip);
        for chunk in body.chunks(16 * 1024) {
            meter.observe(chunk);
        }
        assert_eq!(
            meter.report(),
            Report {
                usage: usage(50, 0, 4160, 0),
                ..Report::default()
            }
        );
        Ok(())
    }

    #[test]
    fn every_split_point_identity() {
        let cases = [
            (
                Format::Sse,
                fixtures::CHAT_STREAM_USAGE,
                expected_chat_sse(),
            ),
            (
                Format::Sse,
                fixtures::RESPONSES_STREAM,
                expected_responses_sse(),
            ),
            (Format::Json, fixtures::CHAT_JSON, expected_chat_json()),
        ];
        for (format, body, expected) in cases {
            for at in 0..=body.len() {
                assert_eq!(
                    meter_split(format, Encoding::Identity, body.as_bytes(), &[at]),
                    expected,
                    "split at {at}"
                );
            }
        }
    }

    #[test]
    fn every_split_point_compressed() -> TestResult {
        for encoding in [Encoding::Gzip, Encoding::Deflate, Encoding::Zstd] {
            let body = compress(encoding, fixtures::RESPONSES_STREAM.as_bytes())?;
            for at in 0..=body.len() {
                assert_eq!(
                    meter_split(Format::Sse, encoding, &body, &[at]),
                    expected_responses_sse(),
                    "{encoding:?} split at {at}"
                );
            }
        }
        Ok(())
    }

    fn encodings() -> impl Strategy<Value = Encoding> {
        prop_oneof![
            Just(Encoding::Identity),
            Just(Encoding::Gzip),
            Just(Encoding::Deflate),
            Just(Encoding::Zstd),
        ]
    }

    proptest! {
        #[test]
        fn meter_is_chunking_independent(
            encoding in encodings(),
            which in 0usize..3,
            mut cuts in proptest::collection::vec(0usize..8000, 0..64),
            one_byte in proptest::bool::weighted(0.2),
        ) {
            let (format, plain, expected) = [
                (Format::Sse, fixtures::CHAT_STREAM_USAGE, expected_chat_sse()),
                (Format::Sse, fixtures::RESPONSES_STREAM, expected_responses_sse()),
                (Format::Json, fixtures::CHAT_JSON, expected_chat_json()),
            ][which].clone();
            let body = compress(encoding, plain.as_bytes())?;
            if one_byte {
                cuts = (1..body.len()).collect();
            }
            cuts.sort_unstable();
            prop_assert_eq!(meter_split(format, encoding, &body, &cuts), expected);
        }

        #[test]
        fn brotli_is_chunking_independent(
            mut cuts in proptest::collection::vec(0usize..2000, 0..64),
        ) {
            cuts.sort_unstable();
            let body = fixtures::CHAT_STREAM_USAGE_BR;
            prop_assert_eq!(meter_split(Format::Sse, Encoding::Brotli, body, &cuts), expected_chat_sse());
        }

        #[test]
        fn meter_never_panics_on_garbage(
            encoding in prop_oneof![encodings(), Just(Encoding::Brotli)],
            sse in proptest::bool::ANY,
            bytes in proptest::collection::vec(any::<u8>(), 0..1024),
            mut cuts in proptest::collection::vec(0usize..1024, 0..16),
        ) {
            cuts.sort_unstable();
            let format = if sse { Format::Sse } else { Format::Json };
            let split = meter_split(format, encoding, &bytes, &cuts);
            let whole = meter(format, encoding, &bytes);
            // As for corrupt bodies below: zstd and brotli promise only `malformed`.
            if matches!(encoding, Encoding::Zstd | Encoding::Brotli) {
                prop_assert_eq!(split.malformed, whole.malformed);
            } else {
                prop_assert_eq!(split, whole);
            }
        }

        /// Whether a corrupt body is caught does not depend on its chunking (corruption that
        /// only makes the stream look cut short cannot be caught without an end-of-body
        /// signal). For gzip and deflate the whole report is the same too: the inflater hands
        /// over every byte it decoded before the error. zstd and brotli decoders may hold back
        /// output when they fail, an amount that depends on the chunking, so only `malformed`
        /// is promised there.
        #[test]
        fn corrupt_bodies_are_malformed_however_split(
            encoding in prop_oneof![encodings(), Just(Encoding::Brotli)],
            at in 0usize..4000,
            len in 1usize..4,
            mut cuts in proptest::collection::vec(0usize..4000, 0..32),
        ) {
            let plain = fixtures::CHAT_STREAM_USAGE.as_bytes();
            let body = match encoding {
                Encoding::Brotli => fixtures::CHAT_STREAM_USAGE_BR.to_vec(),
                Encoding::Zstd => zstd_checked(plain)?,
                _ => compress(encoding, plain)?,
            };
            let body = corrupt(body, at, len);
            cuts.sort_unstable();
            let whole = meter(Format::Sse, encoding, &body);
            let split = meter_split(Format::Sse, encoding, &body, &cuts);
            match encoding {
                Encoding::Identity | Encoding::Gzip | Encoding::Deflate => {
                    prop_assert_eq!(split, whole);
                }
                Encoding::Zstd | Encoding::Brotli => {
                    prop_assert_eq!(split.malformed, whole.malformed);
                }
            }
        }
    }
}
