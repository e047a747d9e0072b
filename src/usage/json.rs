//! Incremental JSON scanner: finds the `usage` object and the `model` string of a JSON document
//! fed in arbitrary pieces, without parsing the rest of it.
//!
//! It is a small tokenizer (depth, in-string, escape, current key) that watches the members of
//! the top-level object and, when asked, of the object under its top-level `response` key. Only
//! the bytes of a watched `usage` value and of a watched `model` string are kept, each in a
//! capped buffer; the captured usage is then read into a small struct, by a reader for the plain
//! shape OpenAI sends ([`read_plain_usage`]) or, for any other shape, by serde, which has the last
//! word on what a usage object is.
//!
//! Invariants: memory is bounded (a few fixed fields plus two capped, reused buffers) whatever
//! the document's size; the scanner jumps from one byte that matters to the next (`find`); and
//! what it finds depends only on the bytes fed, never on where they were split.

use serde::Deserialize;

use super::find::{self, Index, Set};
use super::Usage;

/// Largest `usage` value kept; a longer one is reported as malformed rather than buffered.
pub(crate) const MAX_USAGE_BYTES: usize = 16 * 1024;
/// Largest `model` string kept (with its quotes); a longer one is ignored.
pub(crate) const MAX_MODEL_BYTES: usize = 1024;
/// Room made for a usage value when its capture starts: OpenAI's are 150-300 bytes.
const USUAL_USAGE_BYTES: usize = 512;
/// Room made for a `model` string when its capture starts.
const USUAL_MODEL_BYTES: usize = 64;
/// Longest key we need to recognise (`response`, `choices`); longer keys are "other".
const KEY_BUF: usize = 8;

/// What a scanner found so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Findings {
    /// The last well-formed usage object seen.
    pub(crate) usage: Option<Usage>,
    /// The first `model` string seen.
    pub(crate) model: Option<String>,
    /// A usage value was present but unreadable (sticky).
    pub(crate) malformed: bool,
}

/// The watched keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Other,
    Usage,
    Model,
    Response,
    Choices,
}

/// The value being captured, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    None,
    /// A usage object (or array): ends when the depth drops back to `depth`.
    UsageContainer {
        depth: u32,
    },
    /// A usage string (always malformed, but captured so it is judged whole).
    UsageString,
    /// A usage literal (`null`, a number, ...): ends at the next delimiter.
    UsageLiteral,
    /// A `model` string, quotes included.
    Model,
}

/// Outcome of reading a captured usage value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parsed {
    Null,
    Usage(Usage),
    Malformed,
}

/// Streaming scanner for one or more JSON documents (one per SSE event, reset between them).
#[derive(Debug)]
pub(crate) struct JsonScanner {
    /// Also watch the object under the top-level `response` key (Responses API stream events).
    nested_response: bool,
    depth: u32,
    in_string: bool,
    escape: bool,
    /// The container at depth 1 is an object (so its members are watched).
    top_is_object: bool,
    /// The container at depth 2 is the object value of the top-level `response` key.
    response_is_object: bool,
    /// In a watched object, the next string is a key.
    expect_key: bool,
    /// The current string is a key of a watched object.
    reading_key: bool,
    key_buf: [u8; KEY_BUF],
    /// Length of the key read so far; past `KEY_BUF` the key matches nothing.
    key_len: usize,
    /// The last key read in a watched object, until its value starts.
    key: Key,
    /// Saw the `:` after a watched key; the next significant byte starts its value.
    awaiting_value: bool,
    /// Just opened the top-level `choices` array; the next significant byte tells if it is empty.
    choices_open: bool,
    /// Pass over whole members of a watched object that nobody watches ([`Self::skip_members`]);
    /// off only in tests, as the oracle that the byte-by-byte way gives the same findings.
    fast_members: bool,
    capture: Capture,
    usage_buf: Vec<u8>,
    usage_overflow: bool,
    model_buf: Vec<u8>,
    model_overflow: bool,
    /// The current document has a top-level `usage` that is not `null`.
    doc_usage_non_null: bool,
    /// The current document has a top-level `"choices": []`.
    doc_choices_empty: bool,
    found: Findings,
}

impl Default for JsonScanner {
    fn default() -> Self {
        Self::new(false)
    }
}

impl JsonScanner {
    /// A scanner that watches top-level members, and with `nested_response` also the members of
    /// the top-level `response` object.
    pub(crate) fn new(nested_response: bool) -> Self {
        JsonScanner {
            nested_response,
            depth: 0,
            in_string: false,
            escape: false,
            top_is_object: false,
            response_is_object: false,
            expect_key: false,
            reading_key: false,
            key_buf: [0; KEY_BUF],
            key_len: 0,
            key: Key::Other,
            awaiting_value: false,
            choices_open: false,
            fast_members: true,
            capture: Capture::None,
            usage_buf: Vec::new(),
            usage_overflow: false,
            model_buf: Vec::new(),
            model_overflow: false,
            doc_usage_non_null: false,
            doc_choices_empty: false,
            found: Findings::default(),
        }
    }

    /// Feeds the next bytes of the document.
    pub(crate) fn feed(&mut self, input: &[u8]) {
        let mut index = Index::new(input);
        let mut at = 0;
        while let Some(&b) = input.get(at) {
            if self.fast_members
                && self.expect_key
                && !self.in_string
                && self.skipping()
                && self.watched()
            {
                // Between two members of a watched object: the members nobody watches are
                // passed over whole; the others (and anything unusual) go the way below.
                let used = self.skip_members(&mut index, at);
                if used > 0 {
                    at += used;
                    continue;
                }
            }
            if self.in_string {
                at += self.feed_string(&mut index, at);
            } else if self.nested() {
                // Inside a container no watched key can start in: only the depth matters, and
                // the bytes of a usage value being captured, which are taken in one piece.
                let used = self.skip_nested(&mut index, at);
                if used == 0 {
                    self.feed_byte(b);
                    at += 1;
                } else {
                    self.capture_bytes(input.get(at..at + used).unwrap_or_default());
                    at += used;
                }
            } else if b == b'"' && self.awaiting_value && self.key == Key::Other {
                // A string value of a member nobody watches: passed over whole.
                self.awaiting_value = false;
                at += self.skip_string(&mut index, at);
            } else if b == b'"' && self.expect_key && self.skipping() && self.watched() {
                match self.read_whole_key(&mut index, at) {
                    0 => {
                        self.feed_byte(b);
                        at += 1;
                    }
                    used => at += used,
                }
            } else if self.skipping() {
                // Between tokens that matter, a run of whitespace, literals and (outside the
                // watched objects) separators changes nothing: pass over it in one go.
                let set = if self.watched() {
                    Set::Structural
                } else {
                    Set::StringOrBracket
                };
                match index.next(at, set) {
                    Some(next) if next == at => {
                        self.feed_byte(b);
                        at += 1;
                    }
                    Some(next) => at = next,
                    None => at = input.len(),
                }
            } else {
                self.feed_byte(b);
                at += 1;
            }
        }
    }

    /// Nothing is being captured and no value or array is about to start: only structural
    /// bytes can change the state.
    fn skipping(&self) -> bool {
        matches!(self.capture, Capture::None) && !self.awaiting_value && !self.choices_open
    }

    /// Below the watched objects (depth 2 or more, and not the watched `response` object),
    /// with nothing about to start and no capture but a usage container's, which runs until a
    /// closing bracket: [`Self::skip_nested`] may go on.
    fn nested(&self) -> bool {
        self.depth >= 2
            && !(self.depth == 2 && self.response_is_object)
            && matches!(self.capture, Capture::None | Capture::UsageContainer { .. })
            && !self.awaiting_value
            && !self.choices_open
    }

    /// Passes over the inside of a nested container in one loop, from `start`: strings are
    /// skipped whole ([`Self::skip_string`]) and brackets move the depth. Stops before a
    /// closing bracket that would bring the depth to 2 or less (where objects may be watched
    /// and usage captures end), which [`Self::feed_byte`] then takes; a string left open at the
    /// end of the input leaves the scanner in it. Returns the number of bytes used.
    fn skip_nested(&mut self, index: &mut Index<'_>, start: usize) -> usize {
        let input = index.bytes();
        let mut at = start;
        while let Some(pos) = index.next(at, Set::StringOrBracket) {
            at = pos;
            match input.get(at) {
                Some(b'"') => {
                    at += self.skip_string(index, at);
                    continue;
                }
                Some(b'{' | b'[') => self.depth = self.depth.saturating_add(1),
                _ => {
                    if self.depth <= 3 {
                        return at - start;
                    }
                    self.depth -= 1;
                }
            }
            at += 1;
        }
        input.len().saturating_sub(start)
    }

    /// Passes over the string that opens at `at` (its quote); returns the bytes used. A string
    /// that does not end in the input uses all of it and leaves the scanner in it (and after a
    /// backslash, in its escape).
    fn skip_string(&mut self, index: &mut Index<'_>, at: usize) -> usize {
        match string_end(index, at + 1) {
            StringEnd::Quote(end) => end + 1 - at,
            StringEnd::Open { escape } => {
                self.in_string = true;
                self.escape = escape;
                index.bytes().len().saturating_sub(at)
            }
        }
    }

    /// Passes over the members from `start` (in a watched object, between two members: after its
    /// `{` or a `,`) that change nothing: an unwatched key, or `model` once a model was found,
    /// with a string or literal value, or `usage` with `null`; each whole, with its `,` (the
    /// last one up to the object's `}`), and only whole; and opens the top level's `choices`
    /// array. Returns the bytes used; the scanner is left as the byte-by-byte way would leave
    /// it after the same bytes. Stops at the first member it cannot pass over whole (a watched
    /// key, a container value, an escape in the key, a byte out of place, the end of the
    /// input), which that way then reads.
    fn skip_members(&mut self, index: &mut Index<'_>, start: usize) -> usize {
        let input = index.bytes();
        let mut done = start;
        loop {
            let at = skip_whitespace(input, done);
            if input.get(at) != Some(&b'"') {
                break;
            }
            let Some((key, end)) = self.whole_key(index, at) else {
                break;
            };
            let colon = skip_whitespace(input, end + 1);
            if input.get(colon) != Some(&b':') {
                break;
            }
            let value = skip_whitespace(input, colon + 1);
            if key == Key::Choices && input.get(value) == Some(&b'[') {
                // What `begin_value` and `feed_byte` make of `"choices": [`: the array opened,
                // and its first significant byte to be looked at (is it empty?).
                self.choices_open = true;
                self.depth = self.depth.saturating_add(1);
                self.response_is_object = false;
                self.expect_key = false;
                return value + 1 - start;
            }
            let value_end = match input.get(value) {
                Some(b'"') => match string_end(index, value + 1) {
                    StringEnd::Quote(quote) => quote + 1,
                    StringEnd::Open { .. } => break,
                },
                Some(b'{' | b'[' | b'}' | b']' | b':' | b',') | None => break,
                Some(_) => match index.next(value, Set::Structural) {
                    Some(run) => run,
                    None => break,
                },
            };
            let inert = match key {
                Key::Other => true,
                // `begin_value` starts no capture once a model is known.
                Key::Model => self.found.model.is_some(),
                // `"usage": null` is no usage, and not a malformed one.
                Key::Usage => {
                    input.get(value..value_end).map(<[u8]>::trim_ascii_end) == Some(b"null")
                }
                Key::Choices | Key::Response => false,
            };
            if !inert {
                break;
            }
            let next = skip_whitespace(input, value_end);
            match input.get(next) {
                Some(b',') => done = next + 1,
                Some(b'}') => {
                    // The last member: the byte-by-byte way closes the object.
                    self.expect_key = false;
                    return value_end - start;
                }
                _ => break,
            }
        }
        done - start
    }

    /// Ends the current document (an SSE event ended): a usage value still open is judged as
    /// cut off, then the tokenizer is reset for the next document. Findings are kept.
    pub(crate) fn end_document(&mut self) {
        match self.capture {
            Capture::UsageContainer { .. } | Capture::UsageString => self.found.malformed = true,
            Capture::UsageLiteral => self.finish_usage(),
            Capture::Model | Capture::None => {}
        }
        self.reset();
    }

    /// What was found, judging a usage value still being captured as if the input ended here.
    pub(crate) fn findings(&self) -> Findings {
        let mut found = self.found.clone();
        match self.capture {
            Capture::UsageContainer { .. } | Capture::UsageString => found.malformed = true,
            Capture::UsageLiteral => match parse_usage(&self.usage_buf) {
                Parsed::Null => {}
                Parsed::Usage(usage) => found.usage = Some(usage),
                Parsed::Malformed => found.malformed = true,
            },
            Capture::Model | Capture::None => {}
        }
        found
    }

    /// The document was opened and not closed.
    pub(crate) fn incomplete(&self) -> bool {
        self.depth > 0 || self.in_string
    }

    /// The current document is a usage-only chunk so far: top-level `"choices": []` and a
    /// top-level `usage` that is not `null`.
    pub(crate) fn is_usage_only_chunk(&self) -> bool {
        self.doc_choices_empty && self.doc_usage_non_null
    }

    /// Capacity held by the capture buffers (for tests of the memory bound).
    #[cfg(test)]
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.usage_buf.capacity() + self.model_buf.capacity()
    }

    fn reset(&mut self) {
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.top_is_object = false;
        self.response_is_object = false;
        self.expect_key = false;
        self.reading_key = false;
        self.key_len = 0;
        self.key = Key::Other;
        self.awaiting_value = false;
        self.choices_open = false;
        self.capture = Capture::None;
        self.doc_usage_non_null = false;
        self.doc_choices_empty = false;
    }

    fn watched(&self) -> bool {
        (self.depth == 1 && self.top_is_object) || (self.depth == 2 && self.response_is_object)
    }

    /// Consumes string content from `at` up to and including the next quote or escape; returns
    /// the number of bytes used (at least one: there is a byte at `at`).
    fn feed_string(&mut self, index: &mut Index<'_>, at: usize) -> usize {
        let input = index.bytes();
        if self.escape {
            // The escaped byte (for `\uXXXX` the `u`; the hex digits follow as plain content).
            self.escape = false;
            self.capture_bytes(input.get(at..=at).unwrap_or_default());
            return 1;
        }
        match index.next(at, Set::QuoteOrBackslash) {
            None => {
                self.string_content(input.get(at..).unwrap_or_default());
                input.len().saturating_sub(at)
            }
            Some(pos) => {
                self.string_content(input.get(at..pos).unwrap_or_default());
                self.capture_bytes(input.get(pos..=pos).unwrap_or_default());
                if input.get(pos) == Some(&b'\\') {
                    self.escape = true;
                    if self.reading_key {
                        // Escaped keys never match the plain names we look for.
                        self.key_len = KEY_BUF + 1;
                    }
                } else {
                    self.in_string = false;
                    self.end_string();
                }
                pos + 1 - at
            }
        }
    }

    fn string_content(&mut self, bytes: &[u8]) {
        self.capture_bytes(bytes);
        if self.reading_key {
            let end = self.key_len.saturating_add(bytes.len());
            match self.key_buf.get_mut(self.key_len..end) {
                Some(dst) => {
                    dst.copy_from_slice(bytes);
                    self.key_len = end;
                }
                None => self.key_len = KEY_BUF + 1,
            }
        }
    }

    fn end_string(&mut self) {
        if self.reading_key {
            self.reading_key = false;
            self.key = self.match_key(self.key_buf.get(..self.key_len));
        }
        match self.capture {
            Capture::UsageString => self.finish_usage(),
            Capture::Model => self.finish_model(),
            _ => {}
        }
    }

    /// The key read, by its unescaped bytes (`None` when it was longer than any we watch or
    /// escaped).
    fn match_key(&self, key: Option<&[u8]>) -> Key {
        match key {
            Some(b"usage") => Key::Usage,
            Some(b"model") => Key::Model,
            Some(b"response") if self.depth == 1 && self.nested_response => Key::Response,
            Some(b"choices") if self.depth == 1 => Key::Choices,
            _ => Key::Other,
        }
    }

    /// A key of a watched object that starts at `at` (its opening quote) and ends in the input,
    /// without escapes, is read in one step; returns the bytes used, or 0 to leave the key to
    /// the byte-by-byte path.
    fn read_whole_key(&mut self, index: &mut Index<'_>, at: usize) -> usize {
        match self.whole_key(index, at) {
            Some((key, end)) => {
                self.key = key;
                self.expect_key = false;
                end + 1 - at
            }
            None => 0,
        }
    }

    /// The key whose opening quote is at `at`, if it ends in the input without an escape, and
    /// the index of its closing quote.
    fn whole_key(&self, index: &mut Index<'_>, at: usize) -> Option<(Key, usize)> {
        let end = index.next(at + 1, Set::QuoteOrBackslash)?;
        let input = index.bytes();
        if input.get(end) != Some(&b'"') {
            return None;
        }
        let key = input.get(at + 1..end).filter(|key| key.len() <= KEY_BUF);
        Some((self.match_key(key), end))
    }

    /// One byte outside any string.
    fn feed_byte(&mut self, b: u8) {
        if matches!(self.capture, Capture::UsageLiteral) {
            if is_delimiter(b) {
                self.finish_usage();
            } else {
                self.capture_bytes(&[b]);
                return;
            }
        }
        if is_whitespace(b) {
            self.capture_bytes(&[b]);
            return;
        }
        if self.choices_open {
            self.choices_open = false;
            if b == b']' {
                self.doc_choices_empty = true;
            }
        }
        let starting = if self.awaiting_value {
            self.awaiting_value = false;
            self.begin_value(b)
        } else {
            Key::Other
        };
        self.capture_bytes(&[b]);
        match b {
            b'"' => {
                self.in_string = true;
                if self.expect_key && self.watched() {
                    self.expect_key = false;
                    self.reading_key = true;
                    self.key_len = 0;
                }
            }
            b'{' | b'[' => {
                self.depth = self.depth.saturating_add(1);
                match self.depth {
                    1 => {
                        self.top_is_object = b == b'{';
                        self.expect_key = self.top_is_object;
                    }
                    2 => {
                        self.response_is_object = starting == Key::Response && b == b'{';
                        self.expect_key = self.response_is_object;
                    }
                    _ => {}
                }
            }
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                if self.depth < 2 {
                    self.response_is_object = false;
                }
                if self.depth == 0 {
                    self.top_is_object = false;
                }
                self.expect_key = false;
                if matches!(self.capture, Capture::UsageContainer { depth } if depth == self.depth)
                {
                    self.finish_usage();
                }
            }
            b':' if self.watched() => self.awaiting_value = true,
            b',' if self.watched() => {
                self.expect_key = true;
                self.key = Key::Other;
            }
            _ => {}
        }
    }

    /// The first significant byte of the value of a watched key; starts a capture if the key
    /// is one we want. Returns the key.
    fn begin_value(&mut self, b: u8) -> Key {
        let key = std::mem::replace(&mut self.key, Key::Other);
        match key {
            Key::Usage => {
                if matches!(b, b'}' | b']' | b',' | b':') {
                    // `"usage":` with no value.
                    self.found.malformed = true;
                    return key;
                }
                // Only the top level's `usage` makes a usage-only chunk, whether or not the
                // `response` object is watched too.
                if b != b'n' && self.depth == 1 {
                    self.doc_usage_non_null = true;
                }
                self.usage_buf.clear();
                // One allocation for a usage object of the usual size, rather than a doubling
                // per few bytes.
                self.usage_buf.reserve(USUAL_USAGE_BYTES);
                self.usage_overflow = false;
                self.capture = match b {
                    b'{' | b'[' => Capture::UsageContainer { depth: self.depth },
                    b'"' => Capture::UsageString,
                    _ => Capture::UsageLiteral,
                };
            }
            Key::Model => {
                if b == b'"' && self.found.model.is_none() {
                    self.model_buf.clear();
                    self.model_buf.reserve(USUAL_MODEL_BYTES);
                    self.model_overflow = false;
                    self.capture = Capture::Model;
                }
            }
            Key::Choices => self.choices_open = b == b'[',
            Key::Response | Key::Other => {}
        }
        key
    }

    fn capture_bytes(&mut self, bytes: &[u8]) {
        match self.capture {
            Capture::None => {}
            Capture::Model => push_capped(
                &mut self.model_buf,
                &mut self.model_overflow,
                bytes,
                MAX_MODEL_BYTES,
            ),
            Capture::UsageContainer { .. } | Capture::UsageString | Capture::UsageLiteral => {
                push_capped(
                    &mut self.usage_buf,
                    &mut self.usage_overflow,
                    bytes,
                    MAX_USAGE_BYTES,
                )
            }
        }
    }

    fn finish_usage(&mut self) {
        self.capture = Capture::None;
        if self.usage_overflow {
            self.found.malformed = true;
            return;
        }
        match parse_usage(&self.usage_buf) {
            Parsed::Null => {}
            Parsed::Usage(usage) => self.found.usage = Some(usage),
            Parsed::Malformed => self.found.malformed = true,
        }
    }

    fn finish_model(&mut self) {
        self.capture = Capture::None;
        if !self.model_overflow && self.found.model.is_none() {
            self.found.model = read_string(&self.model_buf);
        }
    }
}

fn push_capped(buf: &mut Vec<u8>, overflow: &mut bool, bytes: &[u8], cap: usize) {
    if *overflow {
        return;
    }
    if buf.len().saturating_add(bytes.len()) > cap {
        *overflow = true;
    } else {
        buf.extend_from_slice(bytes);
    }
}

/// Where a string ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StringEnd {
    /// At this index of the input, the closing quote.
    Quote(usize),
    /// Not in the input; `escape` when its last byte is a backslash that escapes what follows.
    Open { escape: bool },
}

/// Where the string whose content starts at `from` ends.
fn string_end(index: &mut Index<'_>, from: usize) -> StringEnd {
    let input = index.bytes();
    let mut at = from;
    loop {
        let Some(pos) = index.next(at, Set::QuoteOrBackslash) else {
            return StringEnd::Open { escape: false };
        };
        if input.get(pos) == Some(&b'"') {
            return StringEnd::Quote(pos);
        }
        // A backslash: the next byte is escaped, whatever it is.
        at = pos.saturating_add(2);
        if at > input.len() {
            return StringEnd::Open { escape: true };
        }
    }
}

/// The index of the first byte of `input` at or after `from` that is not JSON whitespace (the
/// length of `input` if there is none).
fn skip_whitespace(input: &[u8], from: usize) -> usize {
    let mut at = from;
    while input.get(at).is_some_and(|&b| is_whitespace(b)) {
        at += 1;
    }
    at
}

fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Ends a literal.
fn is_delimiter(b: u8) -> bool {
    is_whitespace(b) || matches!(b, b',' | b'}' | b']' | b':' | b'"' | b'{' | b'[')
}

/// A JSON string, quotes included, as serde reads it: a plain one (no escape, no control
/// character) is taken as it is, anything else is left to serde.
fn read_string(quoted: &[u8]) -> Option<String> {
    let content = quoted.strip_prefix(b"\"")?;
    if find::not_plain(content) == Some(content.len().wrapping_sub(1)) {
        let plain = content.get(..content.len() - 1)?;
        return std::str::from_utf8(plain).ok().map(str::to_owned);
    }
    serde_json::from_slice(quoted).ok()
}

/// The usage object as OpenAI spells it across endpoints.
#[derive(Debug, Default, PartialEq, Deserialize)]
struct RawUsage {
    /// `"tokens"` or `"duration"` on audio transcriptions; anything else is ignored.
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<InputDetails>,
    input_tokens_details: Option<InputDetails>,
    /// The audio transcription spelling.
    input_token_details: Option<InputDetails>,
    completion_tokens_details: Option<OutputDetails>,
    output_tokens_details: Option<OutputDetails>,
}

#[derive(Debug, PartialEq, Deserialize)]
struct InputDetails {
    cached_tokens: Option<u64>,
}

#[derive(Debug, PartialEq, Deserialize)]
struct OutputDetails {
    reasoning_tokens: Option<u64>,
}

impl RawUsage {
    fn into_usage(self) -> Option<Usage> {
        let input = self.input_tokens.or(self.prompt_tokens);
        let output = self.output_tokens.or(self.completion_tokens);
        if input.is_none() && output.is_none() {
            // Whisper reports seconds of audio, not tokens: a zero-token usage was reported.
            let duration = self
                .kind
                .as_ref()
                .and_then(serde_json::Value::as_str)
                .is_some_and(|kind| kind == "duration");
            return duration.then(Usage::default);
        }
        let cached = [
            self.input_tokens_details,
            self.input_token_details,
            self.prompt_tokens_details,
        ]
        .into_iter()
        .flatten()
        .find_map(|details| details.cached_tokens);
        let reasoning = [self.output_tokens_details, self.completion_tokens_details]
            .into_iter()
            .flatten()
            .find_map(|details| details.reasoning_tokens);
        Some(Usage {
            input_tokens: input.unwrap_or(0),
            cached_input_tokens: cached.unwrap_or(0),
            output_tokens: output.unwrap_or(0),
            reasoning_tokens: reasoning.unwrap_or(0),
        })
    }
}

/// Reads a captured usage value: `null`, a usage object, or anything else (malformed).
fn parse_usage(bytes: &[u8]) -> Parsed {
    let bytes = bytes.trim_ascii();
    if bytes == b"null" {
        return Parsed::Null;
    }
    // Serde would also read a struct from an array; only an object is a usage object.
    if bytes.first() != Some(&b'{') {
        return Parsed::Malformed;
    }
    if let Some(raw) = read_plain_usage(bytes) {
        return raw.into_usage().map_or(Parsed::Malformed, Parsed::Usage);
    }
    match serde_json::from_slice::<RawUsage>(bytes).map(RawUsage::into_usage) {
        Ok(Some(usage)) => Parsed::Usage(usage),
        Ok(None) | Err(_) => Parsed::Malformed,
    }
}

/// Reads a usage object of the shape OpenAI sends (keys without escapes, token counts as plain
/// integers or `null`, the `*_details` objects, other members holding a plain integer, `null`
/// or a boolean) as serde would, for a fraction of its cost; `None` for anything else (a `type`
/// member, a float, a string, a duplicate member, ...), which serde then reads.
fn read_plain_usage(bytes: &[u8]) -> Option<RawUsage> {
    let mut reader = PlainReader { bytes, at: 0 };
    let mut raw = RawUsage::default();
    // Members seen, one bit each: serde refuses a duplicate.
    let mut seen = 0u16;
    reader.object(|reader, key| {
        // Each member's bit in `seen`, and where its value goes.
        let (bit, member) = match key {
            b"prompt_tokens" => (0, Member::Count(&mut raw.prompt_tokens)),
            b"completion_tokens" => (1, Member::Count(&mut raw.completion_tokens)),
            b"input_tokens" => (2, Member::Count(&mut raw.input_tokens)),
            b"output_tokens" => (3, Member::Count(&mut raw.output_tokens)),
            b"prompt_tokens_details" => (4, Member::Input(&mut raw.prompt_tokens_details)),
            b"input_tokens_details" => (5, Member::Input(&mut raw.input_tokens_details)),
            b"input_token_details" => (6, Member::Input(&mut raw.input_token_details)),
            b"completion_tokens_details" => (7, Member::Output(&mut raw.completion_tokens_details)),
            b"output_tokens_details" => (8, Member::Output(&mut raw.output_tokens_details)),
            // Any JSON value: serde's to read.
            b"type" => return None,
            _ => return reader.plain_value(),
        };
        once(&mut seen, bit)?;
        match member {
            Member::Count(slot) => *slot = reader.count()?,
            Member::Input(slot) => *slot = reader.input_details()?,
            Member::Output(slot) => *slot = reader.output_details()?,
        }
        Some(())
    })?;
    reader.skip_whitespace();
    (reader.at == bytes.len()).then_some(raw)
}

/// Where a member of a usage object goes.
enum Member<'a> {
    Count(&'a mut Option<u64>),
    Input(&'a mut Option<InputDetails>),
    Output(&'a mut Option<OutputDetails>),
}

/// Marks member `bit` seen; `None` if it was already.
fn once(seen: &mut u16, bit: u32) -> Option<()> {
    let mask = 1u16 << bit;
    if *seen & mask != 0 {
        return None;
    }
    *seen |= mask;
    Some(())
}

/// The cursor of [`read_plain_usage`]. Every method returns `None` when the input leaves the
/// plain shape.
struct PlainReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> PlainReader<'a> {
    fn skip_whitespace(&mut self) {
        self.at = skip_whitespace(self.bytes, self.at);
    }

    /// The next significant byte, consumed.
    fn next(&mut self) -> Option<u8> {
        self.skip_whitespace();
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.at..).unwrap_or_default()
    }

    /// An object, each member's key passed to `member`, which reads the value.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        (self.next()? == b'{').then_some(())?;
        self.skip_whitespace();
        if self.rest().first() == Some(&b'}') {
            self.at += 1;
            return Some(());
        }
        loop {
            (self.next()? == b'"').then_some(())?;
            let rest = self.rest();
            // Printable ASCII without escapes up to the closing quote: anything else is for
            // serde to judge.
            let len = find::not_plain(rest)?;
            if rest.get(len) != Some(&b'"') {
                return None;
            }
            let key = rest.get(..len)?;
            self.at += len + 1;
            (self.next()? == b':').then_some(())?;
            member(self, key)?;
            match self.next()? {
                b',' => {}
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// A plain integer (no sign, fraction, exponent or leading zero; fits a u64) or `null`.
    fn count(&mut self) -> Option<Option<u64>> {
        self.skip_whitespace();
        let rest = self.rest();
        if rest.starts_with(b"null") {
            self.at += 4;
            return Some(None);
        }
        let mut value = 0u64;
        let mut digits = 0;
        while let Some(&b) = rest.get(digits).filter(|b| b.is_ascii_digit()) {
            value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
            digits += 1;
        }
        let leading_zero = digits > 1 && rest.first() == Some(&b'0');
        if digits == 0 || leading_zero || matches!(rest.get(digits), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.at += digits;
        Some(Some(value))
    }

    /// A member serde ignores: a plain integer, `null`, `true` or `false`.
    fn plain_value(&mut self) -> Option<()> {
        self.skip_whitespace();
        let word: &[u8] = match self.rest().first()? {
            b't' => b"true",
            b'f' => b"false",
            _ => return self.count().map(|_| ()),
        };
        self.rest().starts_with(word).then_some(())?;
        self.at += word.len();
        Some(())
    }

    /// A `*_details` value: `null` or an object whose `field` is a count; returns that count's
    /// slot filled.
    fn details(&mut self, field: &[u8]) -> Option<Option<Option<u64>>> {
        self.skip_whitespace();
        if self.rest().starts_with(b"null") {
            self.at += 4;
            return Some(None);
        }
        let mut count = None;
        let mut seen = 0u16;
        self.object(|reader, key| {
            if key == field {
                once(&mut seen, 0)?;
                count = reader.count()?;
                Some(())
            } else {
                reader.plain_value()
            }
        })?;
        Some(Some(count))
    }

    fn input_details(&mut self) -> Option<Option<InputDetails>> {
        let details = self.details(b"cached_tokens")?;
        Some(details.map(|cached_tokens| InputDetails { cached_tokens }))
    }

    fn output_details(&mut self) -> Option<Option<OutputDetails>> {
        let details = self.details(b"reasoning_tokens")?;
        Some(details.map(|reasoning_tokens| OutputDetails { reasoning_tokens }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::fixtures;
    use proptest::prelude::*;

    fn scan(body: &str) -> Findings {
        let mut scanner = JsonScanner::new(false);
        scanner.feed(body.as_bytes());
        scanner.findings()
    }

    fn usage(input: u64, cached: u64, output: u64, reasoning: u64) -> Option<Usage> {
        Some(Usage {
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            reasoning_tokens: reasoning,
        })
    }

    fn found(usage: Option<Usage>, model: Option<&str>) -> Findings {
        Findings {
            usage,
            model: model.map(str::to_owned),
            malformed: false,
        }
    }

    #[test]
    fn chat_completion_with_cached_and_reasoning_tokens() {
        assert_eq!(
            scan(fixtures::CHAT_JSON),
            found(usage(1200, 1024, 300, 192), Some("o4-mini-2025-04-16"))
        );
    }

    #[test]
    fn legacy_completion() {
        assert_eq!(
            scan(fixtures::LEGACY_JSON),
            found(usage(6, 0, 16, 0), Some("gpt-3.5-turbo-instruct"))
        );
    }

    #[test]
    fn embeddings_have_no_completion_tokens() {
        assert_eq!(
            scan(fixtures::EMBEDDINGS_JSON),
            found(usage(8, 0, 0, 0), Some("text-embedding-3-small"))
        );
    }

    #[test]
    fn responses_body() {
        assert_eq!(
            scan(fixtures::RESPONSES_JSON),
            found(usage(2048, 1536, 410, 256), Some("o3-2025-04-16"))
        );
    }

    #[test]
    fn image_generation() {
        assert_eq!(
            scan(fixtures::IMAGES_JSON),
            found(usage(50, 0, 4160, 0), None)
        );
    }

    #[test]
    fn audio_transcription_tokens_and_singular_details() {
        assert_eq!(scan(fixtures::AUDIO_JSON), found(usage(31, 0, 12, 0), None));
    }

    #[test]
    fn whisper_duration_is_a_zero_token_usage() {
        assert_eq!(
            scan(fixtures::WHISPER_JSON),
            found(Some(Usage::default()), None)
        );
    }

    #[test]
    fn moderations_have_no_usage() {
        assert_eq!(
            scan(fixtures::MODERATION_JSON),
            found(None, Some("omni-moderation-2024-09-26"))
        );
    }

    #[test]
    fn error_body_has_no_usage() {
        assert_eq!(scan(fixtures::ERROR_JSON), found(None, None));
    }

    #[test]
    fn usage_null_is_not_malformed() {
        assert_eq!(
            scan(r#"{"model":"m","usage":null}"#),
            found(None, Some("m"))
        );
        assert_eq!(scan(r#"{"usage" : null , "x":1}"#), found(None, None));
    }

    #[test]
    fn details_absent_or_null_count_as_zero() {
        let body = r#"{"usage":{"prompt_tokens":5,"completion_tokens":7,
            "prompt_tokens_details":null,"completion_tokens_details":{"audio_tokens":1}}}"#;
        assert_eq!(scan(body), found(usage(5, 0, 7, 0), None));
        let body = r#"{"usage":{"input_tokens":5,"output_tokens":7,"output_tokens_details":null}}"#;
        assert_eq!(scan(body), found(usage(5, 0, 7, 0), None));
    }

    #[test]
    fn wrong_types_are_malformed() {
        for body in [
            r#"{"usage":{"prompt_tokens":"12","completion_tokens":3}}"#,
            r#"{"usage":{"prompt_tokens":-1,"completion_tokens":3}}"#,
            r#"{"usage":{"prompt_tokens":1.5,"completion_tokens":3}}"#,
            r#"{"usage":{"input_tokens":1,"output_tokens":true}}"#,
            r#"{"usage":{"input_tokens":1,"input_tokens_details":{"cached_tokens":"1"}}}"#,
            r#"{"usage":{"input_tokens":1,"input_tokens_details":7}}"#,
            r#"{"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":99999999999999999999999}}"#,
            r#"{"usage":{}}"#,
            r#"{"usage":{"type":"tokens"}}"#,
            r#"{"usage":[12,3]}"#,
            r#"{"usage":"12"}"#,
            r#"{"usage":12}"#,
            r#"{"usage":nul}"#,
            r#"{"usage":}"#,
        ] {
            let got = scan(body);
            assert_eq!(got.usage, None, "{body}");
            assert!(got.malformed, "{body}");
        }
    }

    #[test]
    fn truncated_usage_is_malformed_but_truncation_before_it_is_not() {
        let body = fixtures::CHAT_JSON;
        let at = body.find("\"usage\"").unwrap_or(0);
        let before = scan(&body[..at]);
        assert_eq!(before, found(None, Some("o4-mini-2025-04-16")));
        let inside = scan(&body[..at + 30]);
        assert_eq!(inside.usage, None);
        assert!(inside.malformed);
    }

    #[test]
    fn oversized_usage_is_malformed() {
        let padding = "x".repeat(MAX_USAGE_BYTES);
        let body = format!(r#"{{"usage":{{"prompt_tokens":1,"note":"{padding}"}}}}"#);
        let got = scan(&body);
        assert_eq!(got.usage, None);
        assert!(got.malformed);
    }

    #[test]
    fn only_top_level_keys_count() {
        let body = r#"{"data":[{"usage":{"prompt_tokens":1},"model":"inner"}],
            "meta":{"usage":{"prompt_tokens":2}},"text":"\"usage\":{\"prompt_tokens\":3}",
            "response":{"usage":{"input_tokens":4},"model":"nested"},"model":"outer"}"#;
        assert_eq!(scan(body), found(None, Some("outer")));
    }

    #[test]
    fn nested_response_is_watched_only_when_asked() {
        let body = r#"{"type":"response.completed","response":{"id":"r","model":"gpt-x",
            "output":[{"usage":{"input_tokens":100}}],"usage":{"input_tokens":4,"output_tokens":2}}}"#;
        let mut scanner = JsonScanner::new(true);
        scanner.feed(body.as_bytes());
        assert_eq!(scanner.findings(), found(usage(4, 0, 2, 0), Some("gpt-x")));
    }

    #[test]
    fn last_well_formed_usage_wins_and_malformed_sticks() {
        let body =
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
        assert_eq!(scan(body), found(usage(2, 0, 3, 0), None));
        let body = r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":"x"}}"#;
        let got = scan(body);
        assert_eq!(got.usage, usage(1, 0, 0, 0));
        assert!(got.malformed);
    }

    #[test]
    fn model_is_first_string_seen_and_unescaped() {
        assert_eq!(
            scan(r#"{"model":"gpt\u002d4o","model":"other"}"#).model,
            Some("gpt-4o".to_owned())
        );
        assert_eq!(
            scan(r#"{"model":7,"model":"late"}"#).model,
            Some("late".to_owned())
        );
        let long = "m".repeat(MAX_MODEL_BYTES);
        assert_eq!(scan(&format!(r#"{{"model":"{long}"}}"#)).model, None);
    }

    #[test]
    fn escapes_and_tricky_strings_do_not_confuse_the_scanner() {
        let body = r#"{"a":"he said \"usage\": {\\","b":["}","{"],"c\"":{"usage":1},
            "usage":{"input_tokens":9,"output_tokens":1}}"#;
        assert_eq!(scan(body), found(usage(9, 0, 1, 0), None));
    }

    #[test]
    fn escaped_key_is_not_matched() {
        assert_eq!(
            scan(r#"{"us\u0061ge":{"prompt_tokens":1}}"#),
            found(None, None)
        );
    }

    #[test]
    fn huge_image_body_is_skipped_with_bounded_memory() {
        let body = fixtures::big_image_json(5 * 1024 * 1024);
        let mut scanner = JsonScanner::new(false);
        for chunk in body.as_bytes().chunks(16 * 1024) {
            scanner.feed(chunk);
        }
        assert_eq!(scanner.findings(), found(usage(50, 0, 4160, 0), None));
        assert!(scanner.buffered_capacity() <= 2 * MAX_USAGE_BYTES);
    }

    /// Containers nested four deep, escapes next to brackets and quotes, a decoy usage deep
    /// inside, and a usage object with nested containers of its own.
    const DEEP: &str = r#"{"choices":[{"message":{"content":"a \"q\" \\","x":[[{}],{"usage":{"input_tokens":9}},"]}\\"]}}],"usage":{"input_tokens":1,"output_tokens_details":{"reasoning_tokens":2},"x":[{"y":"\"}"}]}}"#;

    #[test]
    fn nested_containers_are_passed_over_whole() {
        assert_eq!(scan(DEEP), found(usage(1, 0, 0, 2), None));
        let mut scanner = JsonScanner::new(true);
        scanner.feed(format!(r#"{{"type":"x","response":{DEEP}}}"#).as_bytes());
        assert_eq!(scanner.findings(), found(usage(1, 0, 0, 2), None));
        let mut scanner = JsonScanner::new(true);
        let nested = r#"{"response":{"output":[{"content":[{"text":"}]\""}]}],"usage":{"input_tokens":3,"x":{"y":[1]}}}}"#;
        scanner.feed(nested.as_bytes());
        assert_eq!(scanner.findings(), found(usage(3, 0, 0, 0), None));
    }

    #[test]
    fn every_split_point_gives_the_same_findings() {
        let bodies = [
            fixtures::CHAT_JSON,
            fixtures::RESPONSES_JSON,
            fixtures::AUDIO_JSON,
            r#"{"usage" : null ,"model" : "a\"b", "x":[1,{"usage":2}],"usage":{"input_tokens":1}}"#,
            DEEP,
        ];
        for body in bodies {
            let whole = scan(body);
            for at in 0..=body.len() {
                let mut scanner = JsonScanner::new(false);
                scanner.feed(&body.as_bytes()[..at]);
                scanner.feed(&body.as_bytes()[at..]);
                assert_eq!(scanner.findings(), whole, "split at {at}");
            }
        }
    }

    #[test]
    fn openai_usage_objects_take_the_plain_reader() {
        for body in [
            fixtures::CHAT_JSON,
            fixtures::RESPONSES_JSON,
            fixtures::LEGACY_JSON,
        ] {
            let value: serde_json::Value = serde_json::from_str(body).unwrap();
            let text = value["usage"].to_string();
            let plain = read_plain_usage(text.as_bytes());
            assert!(plain.is_some(), "{text}");
            let serde = serde_json::from_str::<RawUsage>(&text).unwrap();
            assert_eq!(plain.unwrap(), serde, "{text}");
        }
        // What it leaves to serde.
        for text in [
            r#"{"type":"duration","seconds":3}"#,
            r#"{"input_tokens":1.0}"#,
            r#"{"input_tokens":1,"input_tokens":2}"#,
            r#"{"input_tokens":null,"input_tokens":2}"#,
            r#"{"input_tokens_details":{"cached_tokens":1,"cached_tokens":1}}"#,
            r#"{"input\u005ftokens":1}"#,
            r#"{"input_tokens":"1"}"#,
            r#"{"input_tokens":01}"#,
            r#"{"input_tokens":18446744073709551616}"#,
            "{\"input_tokens\":1,\"caf\u{e9}\":1}",
            "{\"input_tokens\":1,\"tab\there\":1}",
        ] {
            assert!(read_plain_usage(text.as_bytes()).is_none(), "{text}");
        }
    }

    #[test]
    fn plain_model_strings_are_read_as_serde_reads_them() {
        for quoted in [
            r#""gpt-4o-mini-2024-07-18""#,
            r#""""#,
            r#""a\"b""#,
            r#""\u0067pt""#,
            "\"caf\u{e9}\"",
            "\"tab\there\"",
            r#""open"#,
        ] {
            let serde = serde_json::from_str::<String>(quoted).ok();
            assert_eq!(read_string(quoted.as_bytes()), serde, "{quoted}");
        }
    }

    /// The members of a usage object as OpenAI sends them.
    const OPENAI_KEYS: [&str; 9] = [
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "prompt_tokens_details",
        "input_tokens_details",
        "completion_tokens_details",
        "output_tokens_details",
    ];

    /// A usage-like object, written member by member (so keys can repeat).
    fn usage_like() -> impl Strategy<Value = String> {
        let others = [
            "input_token_details",
            "cached_tokens",
            "reasoning_tokens",
            "type",
            "input\\u005ftokens",
            "é",
        ];
        let key = proptest::sample::select([&OPENAI_KEYS[..], &others[..]].concat());
        let valid = proptest::sample::select(vec!["0", "7", "1234", "18446744073709551615"]);
        let invalid = proptest::sample::select(vec![
            "01",
            "-1",
            "1.5",
            "2e3",
            "18446744073709551616",
            "null",
            "true",
            "false",
            "\"tokens\"",
            "[]",
            "nul",
        ]);
        let leaf = prop_oneof![4 => valid, 1 => invalid].prop_map(str::to_owned);
        let space = proptest::sample::select(vec!["", " ", "\n", "\t"]);
        let object = |members: Vec<(&str, String, &str)>| {
            let members: Vec<String> = members
                .iter()
                .map(|(key, value, space)| format!("{space}\"{key}\"{space}:{space}{value}"))
                .collect();
            format!("{{{}}}", members.join(","))
        };
        let details = proptest::collection::vec((key.clone(), leaf.clone(), space.clone()), 0..4)
            .prop_map(object);
        let value = prop_oneof![3 => leaf, 1 => details];
        proptest::collection::vec((key, value, space), 0..8).prop_map(object)
    }

    /// A usage object of OpenAI's shape: each key once, counts, details objects.
    fn openai_like() -> impl Strategy<Value = String> {
        let keys = proptest::sample::subsequence(OPENAI_KEYS.to_vec(), 0..=OPENAI_KEYS.len());
        let counts = proptest::collection::vec(any::<u64>(), 9);
        let space = proptest::sample::select(vec!["", " ", "\n  "]);
        (keys, counts, space).prop_map(|(keys, counts, space)| {
            let members: Vec<String> = keys
                .iter()
                .zip(&counts)
                .map(|(key, count)| {
                    let value = if key.ends_with("_details") {
                        format!(
                            "{{{space}\"audio_tokens\":0,\"cached_tokens\":{count},\"reasoning_tokens\":{count},\"flag\":true{space}}}"
                        )
                    } else {
                        count.to_string()
                    };
                    format!("{space}\"{key}\":{space}{value}")
                })
                .collect();
            format!("{{{}{space}}}", members.join(","))
        })
    }

    /// A document shaped like OpenAI's bodies and stream events, with the odd byte out of
    /// place: top-level members of every kind (watched keys and not, strings with escapes,
    /// literals, containers, `usage` as `null`, an object or junk), loose whitespace, and now
    /// and then a `response` object of the same kind.
    fn document() -> impl Strategy<Value = String> {
        let key = proptest::sample::select(vec![
            "usage",
            "model",
            "choices",
            "response",
            "id",
            "object",
            "created",
            "a\\\"b",
            "us\\u0061ge",
            "system_fingerprint",
            "",
            "usagex",
            "model ",
        ]);
        let value = proptest::sample::select(vec![
            "null",
            "nul",
            "null x",
            "1760000000",
            "-1.5e3",
            "true",
            "\"gpt-4o-mini\"",
            "\"a \\\"usage\\\": {\\\\\"",
            "\"}],\"",
            "[]",
            "[{\"usage\":{\"input_tokens\":7}}]",
            "{\"input_tokens\":3,\"output_tokens\":4}",
            "{\"prompt_tokens\":1,\"x\":[{\"y\":\"]\"}]}",
            "\"usage\"",
            "",
            "x",
        ]);
        let space = proptest::sample::select(vec!["", " ", "\n  ", "\t", "z"]);
        let any_member = (key, space.clone(), value, space.clone())
            .prop_map(|(k, s1, v, s2)| format!("{s1}\"{k}\"{s2}:{s1}{v}{s2}"));
        // The members of OpenAI's stream events and bodies, as they come.
        let usual_member = proptest::sample::select(vec![
            r#""choices":[]"#,
            r#""choices": [ ]"#,
            r#""choices":[{"delta":{"content":"hi"},"index":0}]"#,
            r#""usage":null"#,
            r#""usage":{"prompt_tokens":5,"completion_tokens":6}"#,
            r#""model":"gpt-4o-mini-2024-07-18""#,
            r#""id":"chatcmpl-1""#,
            r#""created":1760000000"#,
        ])
        .prop_map(str::to_owned);
        let member = prop_oneof![any_member, usual_member];
        let object = proptest::collection::vec(member, 0..10).prop_map(|m| m.join(","));
        (object.clone(), object, proptest::bool::weighted(0.2), space).prop_map(
            |(outer, inner, nest, s)| {
                if nest {
                    format!("{{{outer}{s},\"response\":{{{inner}}}}}")
                } else {
                    format!("{{{outer}}}{s}")
                }
            },
        )
    }

    /// Everything a scanner can tell, after `docs` fed in pieces cut at `cuts`, each document
    /// ended as an SSE event ends.
    fn scan_events(fast: bool, nested: bool, docs: &[String], cuts: &[usize]) -> Vec<String> {
        let mut scanner = JsonScanner::new(nested);
        scanner.fast_members = fast;
        let mut seen = Vec::new();
        for doc in docs {
            let bytes = doc.as_bytes();
            let mut at = 0;
            for &cut in cuts.iter().filter(|&&c| c < bytes.len()) {
                if cut >= at {
                    scanner.feed(&bytes[at..cut]);
                    at = cut;
                }
            }
            scanner.feed(&bytes[at..]);
            seen.push(format!(
                "{:?} incomplete={} usage_only={}",
                scanner.findings(),
                scanner.incomplete(),
                scanner.is_usage_only_chunk()
            ));
            scanner.end_document();
        }
        seen
    }

    proptest! {
        #[test]
        fn passing_over_members_whole_finds_what_the_byte_by_byte_way_finds(
            docs in proptest::collection::vec(document(), 1..4),
            mut cuts in proptest::collection::vec(0usize..300, 0..6),
            nested in proptest::bool::ANY,
        ) {
            cuts.sort_unstable();
            let fast = scan_events(true, nested, &docs, &cuts);
            let slow = scan_events(false, nested, &docs, &cuts);
            prop_assert_eq!(fast, slow, "{:?}", docs);
        }

        #[test]
        fn the_plain_usage_reader_reads_openai_shapes(text in openai_like()) {
            let plain = read_plain_usage(text.as_bytes());
            prop_assert!(plain.is_some(), "{}", text);
            prop_assert_eq!(plain.unwrap(), serde_json::from_str::<RawUsage>(&text).unwrap());
        }

        #[test]
        fn the_plain_usage_reader_reads_what_serde_reads(text in usage_like()) {
            if let Some(plain) = read_plain_usage(text.as_bytes()) {
                let serde = serde_json::from_str::<RawUsage>(&text);
                prop_assert!(serde.is_ok(), "{}: {:?}", text, serde.err());
                prop_assert_eq!(plain, serde.unwrap(), "{}", text);
            }
        }
    }
}
