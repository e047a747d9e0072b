//! Usage reported by the upstream, and the incremental meters that find it in response bodies.

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
// STUB-BEGIN
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}
impl Encoding {
    pub fn from_header(_v: Option<&[u8]>) -> Option<Encoding> {
        Some(Encoding::Identity)
    }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Sse,
}
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub usage: Option<Usage>,
    pub model: Option<String>,
    pub events: u64,
    pub malformed: bool,
}
pub struct Meter;
impl Meter {
    pub fn new(_f: Format, _e: Encoding) -> Meter {
        Meter
    }
    pub fn observe(&mut self, _c: &[u8]) {}
    pub fn report(&self) -> Report {
        Report::default()
    }
}
pub struct UsageChunkFilter;
impl UsageChunkFilter {
    pub fn new() -> Self {
        UsageChunkFilter
    }
    pub fn push(&mut self, c: &[u8]) -> bytes::Bytes {
        bytes::Bytes::copy_from_slice(c)
    }
    pub fn finish(&mut self) -> bytes::Bytes {
        bytes::Bytes::new()
    }
}
