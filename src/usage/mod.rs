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
