//! Decoding compressed response bodies on the side, for the meter only: the client gets the
//! upstream's bytes untouched, while a streaming decoder writes the decoded bytes into a sink
//! that feeds the scanner and keeps nothing.
//!
//! gzip and deflate run on flate2's raw `Decompress` with the gzip framing parsed here, so each
//! member's CRC-32 (and zlib's Adler-32) is checked as soon as its trailer arrives; brotli and
//! zstd use their crates' streaming writers, flushed after every chunk.
//!
//! Invariants: memory is the decoder's window and buffers (bounded; zstd windows are capped at
//! 8 MiB, the limit for HTTP content coding), never the decoded body; all output a chunk can
//! produce reaches the scanner before `observe` returns, so the result does not depend on
//! chunking; a corrupt stream stops decoding and marks the report malformed, it never panics.
//! Corruption that no check covers (zstd without its optional checksum, brotli) shows only as
//! decoded bytes that do not make sense.

use std::fmt;
use std::io::{self, Write};

use brotli_decompressor::DecompressorWriter;
use flate2::{Crc, Decompress, FlushDecompress, Status};
use memchr::memchr;

use super::Scanner;

/// Largest zstd window accepted: 2^23 = 8 MiB, the limit RFC 8878 sets for HTTP content coding.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;
/// Size of the brotli decoder's output buffer.
const BROTLI_BUFFER: usize = 4096;
/// Size of the inflater's output buffer.
const INFLATE_BUFFER: usize = 16 * 1024;

/// A `Content-Encoding` the meter can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    /// HTTP "deflate": zlib-wrapped, or raw deflate from servers that get it wrong.
    Deflate,
    Brotli,
    Zstd,
}

impl Encoding {
    /// From a Content-Encoding header value (case-insensitive; `None` header = Identity).
    /// Returns None for an encoding we cannot decode (then the proxy does not meter the body),
    /// including a list of several codings.
    pub fn from_header(value: Option<&[u8]>) -> Option<Encoding> {
        let Some(value) = value else {
            return Some(Encoding::Identity);
        };
        let value = value.trim_ascii();
        let is = |name: &[u8]| value.eq_ignore_ascii_case(name);
        if value.is_empty() || is(b"identity") {
            Some(Encoding::Identity)
        } else if is(b"gzip") || is(b"x-gzip") {
            Some(Encoding::Gzip)
        } else if is(b"deflate") {
            Some(Encoding::Deflate)
        } else if is(b"br") {
            Some(Encoding::Brotli)
        } else if is(b"zstd") {
            Some(Encoding::Zstd)
        } else {
            None
        }
    }
}

/// Where decoders write: straight into the scanner.
#[derive(Debug, Default)]
struct Sink(Scanner);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn corrupt(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A deflate decompressor writing into a fixed buffer that is handed to the sink at once.
struct Inflater {
    raw: Decompress,
    out: Box<[u8]>,
}

impl Inflater {
    fn new(zlib: bool) -> Self {
        Inflater {
            raw: Decompress::new(zlib),
            out: vec![0; INFLATE_BUFFER].into_boxed_slice(),
        }
    }

    /// Inflates `input` into the sink (and the CRC, for gzip). Returns how much of `input` was
    /// used and whether the deflate stream ended; stops early only at the stream's end.
    fn run(
        &mut self,
        input: &[u8],
        sink: &mut Sink,
        mut crc: Option<&mut Crc>,
    ) -> io::Result<(usize, bool)> {
        let mut used = 0;
        loop {
            let rest = input.get(used..).unwrap_or_default();
            let (in_before, out_before) = (self.raw.total_in(), self.raw.total_out());
            let result = self
                .raw
                .decompress(rest, &mut self.out, FlushDecompress::None);
            let read = delta(in_before, self.raw.total_in());
            let written = delta(out_before, self.raw.total_out());
            // Output made before an error still reaches the scanner.
            let produced = self.out.get(..written).unwrap_or_default();
            if let Some(crc) = crc.as_deref_mut() {
                crc.update(produced);
            }
            sink.0.feed(produced);
            used += read;
            let status = result.map_err(|_| corrupt("corrupt deflate stream"))?;
            if status == Status::StreamEnd {
                return Ok((used, true));
            }
            let output_full = written == self.out.len();
            let progress = read > 0 || written > 0;
            // Go on while the output buffer filled (more may be pending) or input is left.
            if !progress || (!output_full && used >= input.len()) {
                return Ok((used, false));
            }
        }
    }
}

fn delta(before: u64, after: u64) -> usize {
    usize::try_from(after.saturating_sub(before)).unwrap_or(usize::MAX)
}

/// Where a gzip member stands (RFC 1952).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GzipPhase {
    /// The 10-byte fixed header: bytes seen so far, and the flags once read.
    Fixed {
        seen: u8,
        flags: u8,
    },
    /// FEXTRA: its 2-byte little-endian length.
    ExtraLen {
        seen: u8,
        len: u16,
        flags: u8,
    },
    Extra {
        left: u16,
        flags: u8,
    },
    /// FNAME, zero-terminated.
    Name {
        flags: u8,
    },
    /// FCOMMENT, zero-terminated.
    Comment {
        flags: u8,
    },
    /// FHCRC: two bytes.
    HeaderCrc {
        left: u8,
    },
    Body,
    /// CRC-32 and ISIZE.
    Trailer {
        seen: u8,
    },
}

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const FRESERVED: u8 = 0xe0;

/// gzip members one after another. The header is parsed here and the deflate data inflated
/// raw, so each member's CRC-32 and length are checked as soon as its trailer arrives: a
/// corrupt body is caught without waiting for an end-of-body signal the meter never gets.
struct Gzip {
    phase: GzipPhase,
    inflater: Inflater,
    crc: Crc,
    trailer: [u8; 8],
    sink: Sink,
}

impl Gzip {
    fn new(sink: Sink) -> Self {
        Gzip {
            phase: GzipPhase::Fixed { seen: 0, flags: 0 },
            inflater: Inflater::new(false),
            crc: Crc::new(),
            trailer: [0; 8],
            sink,
        }
    }

    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        let mut rest = chunk;
        while let Some(&byte) = rest.first() {
            let mut used = 1;
            self.phase = match self.phase {
                GzipPhase::Fixed { seen, flags } => {
                    let ok = match seen {
                        0 => byte == 0x1f,
                        1 => byte == 0x8b,
                        2 => byte == 8,
                        3 => byte & FRESERVED == 0,
                        _ => true,
                    };
                    if !ok {
                        return Err(corrupt("not a gzip member"));
                    }
                    let flags = if seen == 3 { byte } else { flags };
                    if seen == 9 {
                        after_fixed_header(flags)
                    } else {
                        GzipPhase::Fixed {
                            seen: seen + 1,
                            flags,
                        }
                    }
                }
                GzipPhase::ExtraLen { seen, len, flags } => {
                    let len = len | u16::from(byte) << (8 * u16::from(seen));
                    match (seen, len) {
                        (0, _) => GzipPhase::ExtraLen {
                            seen: 1,
                            len,
                            flags,
                        },
                        (_, 0) => after_extra(flags),
                        (_, left) => GzipPhase::Extra { left, flags },
                    }
                }
                GzipPhase::Extra { left, flags } => {
                    let skip = usize::from(left).min(rest.len());
                    used = skip;
                    let left = left.saturating_sub(u16::try_from(skip).unwrap_or(u16::MAX));
                    if left == 0 {
                        after_extra(flags)
                    } else {
                        GzipPhase::Extra { left, flags }
                    }
                }
                GzipPhase::Name { flags } => match memchr(0, rest) {
                    Some(end) => {
                        used = end + 1;
                        after_name(flags)
                    }
                    None => {
                        used = rest.len();
                        GzipPhase::Name { flags }
                    }
                },
                GzipPhase::Comment { flags } => match memchr(0, rest) {
                    Some(end) => {
                        used = end + 1;
                        after_comment(flags)
                    }
                    None => {
                        used = rest.len();
                        GzipPhase::Comment { flags }
                    }
                },
                GzipPhase::HeaderCrc { left } => {
                    if left > 1 {
                        GzipPhase::HeaderCrc { left: left - 1 }
                    } else {
                        GzipPhase::Body
                    }
                }
                GzipPhase::Body => {
                    let (read, ended) =
                        self.inflater
                            .run(rest, &mut self.sink, Some(&mut self.crc))?;
                    used = read;
                    if ended {
                        GzipPhase::Trailer { seen: 0 }
                    } else if read == 0 {
                        // The inflater took nothing and did not end: cannot go on.
                        return Err(corrupt("stalled deflate stream"));
                    } else {
                        GzipPhase::Body
                    }
                }
                GzipPhase::Trailer { seen } => {
                    if let Some(slot) = self.trailer.get_mut(usize::from(seen)) {
                        *slot = byte;
                    }
                    if seen < 7 {
                        GzipPhase::Trailer { seen: seen + 1 }
                    } else {
                        self.check_trailer()?;
                        GzipPhase::Fixed { seen: 0, flags: 0 }
                    }
                }
            };
            rest = rest.get(used..).unwrap_or_default();
        }
        Ok(())
    }

    fn check_trailer(&mut self) -> io::Result<()> {
        let [c0, c1, c2, c3, s0, s1, s2, s3] = self.trailer;
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        let size = u32::from_le_bytes([s0, s1, s2, s3]);
        if crc != self.crc.sum() || size != self.crc.amount() {
            return Err(corrupt("gzip checksum mismatch"));
        }
        // The next member, if any, starts afresh.
        self.crc.reset();
        self.inflater.raw.reset(false);
        Ok(())
    }
}

fn after_fixed_header(flags: u8) -> GzipPhase {
    if flags & FEXTRA != 0 {
        GzipPhase::ExtraLen {
            seen: 0,
            len: 0,
            flags,
        }
    } else {
        after_extra(flags)
    }
}

fn after_extra(flags: u8) -> GzipPhase {
    if flags & FNAME != 0 {
        GzipPhase::Name { flags }
    } else {
        after_name(flags)
    }
}

fn after_name(flags: u8) -> GzipPhase {
    if flags & FCOMMENT != 0 {
        GzipPhase::Comment { flags }
    } else {
        after_comment(flags)
    }
}

fn after_comment(flags: u8) -> GzipPhase {
    if flags & FHCRC != 0 {
        GzipPhase::HeaderCrc { left: 2 }
    } else {
        GzipPhase::Body
    }
}

/// HTTP "deflate": zlib (RFC 1950) as the spec says, or raw deflate as some servers send it;
/// the first two bytes tell which.
struct Deflate {
    /// The first byte, while waiting for the second.
    first: Option<u8>,
    inflater: Option<Inflater>,
    ended: bool,
    sink: Sink,
}

impl Deflate {
    fn new(sink: Sink) -> Self {
        Deflate {
            first: None,
            inflater: None,
            ended: false,
            sink,
        }
    }

    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        if self.ended {
            return Err(corrupt("data after the end of the deflate stream"));
        }
        let inflater = match &mut self.inflater {
            Some(inflater) => inflater,
            None => {
                let (a, b) = match (self.first, chunk) {
                    (None, [a]) => {
                        self.first = Some(*a);
                        return Ok(());
                    }
                    (None, &[a, b, ..]) | (Some(a), &[b, ..]) => (a, b),
                    (_, []) => return Ok(()),
                };
                self.inflater.insert(Inflater::new(is_zlib_header(a, b)))
            }
        };
        if let Some(first) = self.first.take() {
            let (used, ended) = inflater.run(&[first], &mut self.sink, None)?;
            if used != 1 || ended {
                return Err(corrupt("deflate stream of one byte"));
            }
        }
        let (used, ended) = inflater.run(chunk, &mut self.sink, None)?;
        self.ended = ended;
        if used < chunk.len() {
            return Err(corrupt("data after the end of the deflate stream"));
        }
        Ok(())
    }
}

enum State {
    /// Identity: bytes go to the scanner as they are.
    Plain(Scanner),
    Gzip(Box<Gzip>),
    Deflate(Box<Deflate>),
    Brotli(Box<DecompressorWriter<Sink>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, Sink>>),
    /// Decoding failed: the scanner keeps what it found before.
    Failed(Scanner),
}

/// The scanner, behind the decoder the body's encoding needs.
pub(crate) struct Pipeline {
    state: State,
    failed: bool,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Plain(_) => "identity",
            State::Gzip(_) => "gzip",
            State::Deflate(_) => "deflate",
            State::Brotli(_) => "br",
            State::Zstd(_) => "zstd",
            State::Failed(_) => "failed",
        };
        f.debug_struct("Pipeline")
            .field("state", &state)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    pub(crate) fn new(scanner: Scanner, encoding: Encoding) -> Self {
        let sink = Sink(scanner);
        let state = match encoding {
            Encoding::Identity => State::Plain(sink.0),
            Encoding::Gzip => State::Gzip(Box::new(Gzip::new(sink))),
            Encoding::Deflate => State::Deflate(Box::new(Deflate::new(sink))),
            Encoding::Brotli => {
                State::Brotli(Box::new(DecompressorWriter::new(sink, BROTLI_BUFFER)))
            }
            Encoding::Zstd => match zstd_decoder() {
                Ok(raw) => State::Zstd(Box::new(zstd::stream::write::Decoder::with_decoder(
                    sink, raw,
                ))),
                Err(_) => {
                    return Pipeline {
                        state: State::Failed(sink.0),
                        failed: true,
                    }
                }
            },
        };
        Pipeline {
            state,
            failed: false,
        }
    }

    /// The next bytes of the body, as the upstream sent them.
    pub(crate) fn write(&mut self, chunk: &[u8]) {
        let result = match &mut self.state {
            State::Plain(scanner) => {
                scanner.feed(chunk);
                Ok(())
            }
            State::Gzip(gzip) => gzip.write(chunk),
            State::Deflate(deflate) => deflate.write(chunk),
            State::Brotli(decoder) => pump(decoder.as_mut(), chunk),
            State::Zstd(decoder) => pump(decoder.as_mut(), chunk),
            State::Failed(_) => Ok(()),
        };
        if result.is_err() {
            self.fail();
        }
    }

    pub(crate) fn scanner(&self) -> &Scanner {
        match &self.state {
            State::Plain(scanner) | State::Failed(scanner) => scanner,
            State::Gzip(gzip) => &gzip.sink.0,
            State::Deflate(deflate) => &deflate.sink.0,
            State::Brotli(decoder) => &decoder.get_ref().0,
            State::Zstd(decoder) => &decoder.get_ref().0,
        }
    }

    /// The body could not be decoded.
    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    /// Stops decoding: keeps the scanner, frees the decoder.
    fn fail(&mut self) {
        self.failed = true;
        // A writer may still hold output made before the error: hand it over first (its own
        // error, if any, changes nothing), so what reaches the scanner does not depend on
        // where the chunk boundaries fell.
        let scanner = match &mut self.state {
            State::Plain(scanner) | State::Failed(scanner) => std::mem::take(scanner),
            State::Gzip(gzip) => std::mem::take(&mut gzip.sink.0),
            State::Deflate(deflate) => std::mem::take(&mut deflate.sink.0),
            State::Brotli(decoder) => {
                let _ = decoder.flush();
                std::mem::take(&mut decoder.get_mut().0)
            }
            State::Zstd(decoder) => {
                let _ = decoder.flush();
                std::mem::take(&mut decoder.get_mut().0)
            }
        };
        // Dropping the brotli decoder flushes its last output, into the placeholder scanner.
        self.state = State::Failed(scanner);
    }
}

/// Writes a chunk through a decoder and flushes, so every byte it can decode reaches the
/// scanner now rather than at the next write.
fn pump<W: Write>(decoder: &mut W, chunk: &[u8]) -> io::Result<()> {
    decoder.write_all(chunk)?;
    decoder.flush()
}

/// RFC 1950: method 8 (deflate), window at most 32 KiB, and the check bits.
fn is_zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
}

fn zstd_decoder() -> io::Result<zstd::stream::raw::Decoder<'static>> {
    let mut raw = zstd::stream::raw::Decoder::new()?;
    raw.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
        ZSTD_WINDOW_LOG_MAX,
    ))?;
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_from_header() {
        let cases: [(Option<&[u8]>, Option<Encoding>); 13] = [
            (None, Some(Encoding::Identity)),
            (Some(b""), Some(Encoding::Identity)),
            (Some(b"identity"), Some(Encoding::Identity)),
            (Some(b"gzip"), Some(Encoding::Gzip)),
            (Some(b" GZip "), Some(Encoding::Gzip)),
            (Some(b"x-gzip"), Some(Encoding::Gzip)),
            (Some(b"Deflate"), Some(Encoding::Deflate)),
            (Some(b"BR"), Some(Encoding::Brotli)),
            (Some(b"zstd"), Some(Encoding::Zstd)),
            (Some(b"compress"), None),
            (Some(b"gzip, br"), None),
            (Some(b"\xff"), None),
            (Some(b"brotli"), None),
        ];
        for (header, expected) in cases {
            assert_eq!(Encoding::from_header(header), expected, "{header:?}");
        }
    }

    #[test]
    fn zlib_header_detection() {
        assert!(is_zlib_header(0x78, 0x9c));
        assert!(is_zlib_header(0x78, 0x01));
        assert!(is_zlib_header(0x78, 0xda));
        assert!(!is_zlib_header(0x78, 0x00));
        // Raw deflate usually starts with a block header that is not a zlib header.
        assert!(!is_zlib_header(0xed, 0x9d));
        assert!(!is_zlib_header(0xcb, 0x48));
    }
}
