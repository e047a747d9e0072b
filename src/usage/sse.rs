//! Server-sent events: the event scanner the meter runs over streamed responses, and the filter
//! that removes the usage-only chunk the proxy asked for on the client's behalf.
//!
//! The scanner is a byte-level line state machine (field name, optional space, value, line
//! terminator `\n`, `\r\n` or `\r`); a blank line ends an event. The bytes of `data:` lines go
//! straight to the [`JsonScanner`] as they arrive (lines of one event joined by `\n`, as the SSE
//! spec joins them), so no event is ever buffered by the meter. `event:`, `id:`, `retry:` and
//! comment lines are skipped.
//!
//! Invariant: state is a few fields whatever the event size, and the outcome depends only on the
//! bytes, not on how they were split (a `\r` at the end of a chunk waits for the next byte to
//! know whether a `\n` belongs to the same line terminator).

use std::fmt;

use bytes::Bytes;
use memchr::memchr2;

use super::json::{Findings, JsonScanner};
use super::Report;

const DATA: &[u8] = b"data";
const DONE: &[u8] = b"[DONE]";
/// Largest partial event the [`UsageChunkFilter`] holds back.
pub(crate) const MAX_HELD_EVENT: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineState {
    /// At the start of a line.
    Start,
    /// In a field name that is `data` so far: the number of bytes matched.
    Name(u8),
    /// Right after `data:`: one optional space.
    DataSpace,
    /// In the value of a `data` line.
    Data,
    /// In a line we skip (other fields, comments).
    Ignore,
}

/// Incremental SSE scanner feeding each event's data to a JSON scanner.
#[derive(Debug)]
pub(crate) struct SseScanner {
    json: JsonScanner,
    line: LineState,
    /// The last line ended with `\r`: a `\n` next is part of the same terminator.
    pending_cr: bool,
    /// Data events dispatched, `[DONE]` excepted.
    events: u64,
    /// The current event has had a `data` line.
    has_data: bool,
    /// Bytes of data in the current event (lines joined by `\n`).
    data_len: u64,
    /// The current event's data is a prefix of `[DONE]` so far.
    done_prefix: bool,
    /// The last dispatched event was a usage-only chat chunk.
    last_usage_only: bool,
}

impl SseScanner {
    /// With `nested_response`, the JSON of each event is also searched under its top-level
    /// `response` key (Responses API events).
    pub(crate) fn new(nested_response: bool) -> Self {
        SseScanner {
            json: JsonScanner::new(nested_response),
            line: LineState::Start,
            pending_cr: false,
            events: 0,
            has_data: false,
            data_len: 0,
            done_prefix: true,
            last_usage_only: false,
        }
    }

    /// Feeds the next bytes of the stream.
    pub(crate) fn feed(&mut self, input: &[u8]) {
        let mut rest = input;
        while let Some(used) = self.step(rest) {
            rest = rest.get(used..).unwrap_or_default();
        }
    }

    /// A partial event is pending.
    pub(crate) fn incomplete(&self) -> bool {
        self.line != LineState::Start || self.has_data
    }

    /// Data events dispatched so far (`[DONE]` not counted).
    pub(crate) fn events(&self) -> u64 {
        self.events
    }

    /// Findings so far, judging a usage value cut off by the end of input as malformed.
    pub(crate) fn findings(&self) -> Findings {
        self.json.findings()
    }

    /// What a [`super::Meter`] of an uncompressed stream reports after the same bytes.
    pub(crate) fn report(&self) -> Report {
        Report::from_findings(self.findings(), self.events(), self.incomplete())
    }

    #[cfg(test)]
    pub(crate) fn buffered_capacity(&self) -> usize {
        self.json.buffered_capacity()
    }

    /// Scans `input` up to the end of the next event. Returns the bytes used up to and
    /// including the terminator of the blank line that ended an event, or `None` if all of
    /// `input` was used without ending one.
    fn step(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.line {
                LineState::Start => {
                    if b == b'\n' || b == b'\r' {
                        self.pending_cr = b == b'\r';
                        self.dispatch();
                        return Some(i + 1);
                    }
                    self.line = LineState::Name(0);
                }
                LineState::Name(matched) => {
                    i += 1;
                    match b {
                        b':' => {
                            self.line = if usize::from(matched) == DATA.len() {
                                LineState::DataSpace
                            } else {
                                LineState::Ignore
                            };
                        }
                        b'\n' | b'\r' => {
                            // A field name alone: `data` is a data line with an empty value.
                            if usize::from(matched) == DATA.len() {
                                self.begin_data_line();
                            }
                            self.end_line(b);
                        }
                        _ => {
                            // Any other field name: the rest of the line is skipped.
                            self.line = match DATA.get(usize::from(matched)) {
                                Some(&expected) if expected == b => {
                                    LineState::Name(matched.saturating_add(1))
                                }
                                _ => LineState::Ignore,
                            };
                        }
                    }
                }
                LineState::DataSpace => {
                    self.begin_data_line();
                    self.line = LineState::Data;
                    if b == b' ' {
                        i += 1;
                    }
                }
                LineState::Data => {
                    let rest = input.get(i..).unwrap_or_default();
                    match memchr2(b'\n', b'\r', rest) {
                        Some(pos) => {
                            self.data(rest.get(..pos).unwrap_or_default());
                            i += pos + 1;
                            self.end_line(rest.get(pos).copied().unwrap_or(b'\n'));
                        }
                        None => {
                            self.data(rest);
                            i = input.len();
                        }
                    }
                }
                LineState::Ignore => {
                    let rest = input.get(i..).unwrap_or_default();
                    match memchr2(b'\n', b'\r', rest) {
                        Some(pos) => {
                            i += pos + 1;
                            self.end_line(rest.get(pos).copied().unwrap_or(b'\n'));
                        }
                        None => i = input.len(),
                    }
                }
            }
        }
        None
    }

    fn end_line(&mut self, terminator: u8) {
        self.line = LineState::Start;
        self.pending_cr = terminator == b'\r';
    }

    fn begin_data_line(&mut self) {
        if self.has_data {
            // Data lines of one event are joined with a line feed.
            self.json.feed(b"\n");
            self.data_len = self.data_len.saturating_add(1);
            self.done_prefix = false;
        }
        self.has_data = true;
    }

    fn data(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.done_prefix {
            let start = usize::try_from(self.data_len).unwrap_or(usize::MAX);
            self.done_prefix = start
                .checked_add(bytes.len())
                .and_then(|end| DONE.get(start..end))
                .is_some_and(|expected| expected == bytes);
        }
        self.data_len = self
            .data_len
            .saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
        self.json.feed(bytes);
    }

    /// A blank line: the current event ends.
    fn dispatch(&mut self) {
        let is_done = self.done_prefix && self.data_len == DONE.len() as u64;
        // Per the SSE spec an event with an empty data buffer is not dispatched.
        if self.has_data && self.data_len > 0 && !is_done {
            self.events = self.events.saturating_add(1);
        }
        self.last_usage_only = self.has_data && self.json.is_usage_only_chunk();
        self.json.end_document();
        self.has_data = false;
        self.data_len = 0;
        self.done_prefix = true;
    }
}

/// Removes the usage-only chunk (`"choices":[]` and a non-null `usage`) from a chat or legacy
/// completions stream, for clients whose request the proxy changed to `include_usage`.
///
/// Input is identity-encoded SSE. Complete events pass through unchanged except that one; the
/// trailing partial event is held until its blank line arrives. Memory is bounded: an event
/// that grows past 1 MiB is given up on (its bytes are forwarded as they come and it is never
/// removed), which cannot hide a real usage chunk, those being a few hundred bytes. The output
/// concatenated over all calls does not depend on how the input was split.
pub struct UsageChunkFilter {
    sse: SseScanner,
    /// Bytes of the current, incomplete event.
    held: Vec<u8>,
    /// Length of the current event so far (held or, once given up on, forwarded).
    event_len: usize,
    /// The current event passed `MAX_HELD_EVENT`: its bytes are forwarded as they come.
    passthrough: bool,
    /// The last event ended on `\r`; if the next byte is `\n` it belongs to that event, and
    /// is forwarded if that event was (`Some(true)`) or dropped with it (`Some(false)`).
    cr_tail: Option<bool>,
}

impl fmt::Debug for UsageChunkFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageChunkFilter")
            .field("held_bytes", &self.held.len())
            .field("event_len", &self.event_len)
            .field("passthrough", &self.passthrough)
            .finish_non_exhaustive()
    }
}

impl Default for UsageChunkFilter {
    fn default() -> Self {
        Self::new()
    }
}

impl UsageChunkFilter {
    pub fn new() -> Self {
        UsageChunkFilter {
            // Watching `response` as a meter does, so that the filter's scanner can meter the
            // stream too (see [`Self::report`]); usage-only chunks are judged on the top level.
            sse: SseScanner::new(true),
            held: Vec::new(),
            event_len: 0,
            passthrough: false,
            cr_tail: None,
        }
    }

    /// Returns the bytes to forward now: every complete event except a usage-only chunk; a
    /// partial trailing event is held until its end arrives.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = Vec::new();
        let mut rest = chunk;
        loop {
            rest = self.take_cr_tail(rest, &mut out);
            if rest.is_empty() {
                break;
            }
            match self.sse.step(rest) {
                Some(used) => {
                    let (event_end, tail) = rest.split_at(used.min(rest.len()));
                    let too_big = self.passthrough
                        || self.event_len.saturating_add(event_end.len()) > MAX_HELD_EVENT;
                    let forward = too_big || !self.sse.last_usage_only;
                    if forward {
                        out.extend_from_slice(&self.held);
                        out.extend_from_slice(event_end);
                    }
                    self.held.clear();
                    self.event_len = 0;
                    self.passthrough = false;
                    if self.sse.pending_cr {
                        self.cr_tail = Some(forward);
                    }
                    rest = tail;
                }
                None => {
                    self.event_len = self.event_len.saturating_add(rest.len());
                    if self.passthrough {
                        out.extend_from_slice(rest);
                    } else if self.event_len > MAX_HELD_EVENT {
                        self.passthrough = true;
                        out.extend_from_slice(&self.held);
                        out.extend_from_slice(rest);
                        // Give the memory back: this event may be huge.
                        self.held = Vec::new();
                    } else {
                        self.held.extend_from_slice(rest);
                    }
                    break;
                }
            }
        }
        Bytes::from(out)
    }

    /// What a [`super::Meter`] with `Format::Sse` and `Encoding::Identity` fed the same
    /// chunks would report: the filter scans every byte it is given anyway, so a filtered
    /// stream needs no meter of its own.
    pub fn report(&self) -> Report {
        self.sse.report()
    }

    /// End of stream: returns whatever partial event is held, forwarded as is.
    pub fn finish(&mut self) -> Bytes {
        self.event_len = 0;
        self.passthrough = false;
        self.cr_tail = None;
        Bytes::from(std::mem::take(&mut self.held))
    }

    /// Routes a `\n` that completes the `\r\n` ending the previous event along with it.
    fn take_cr_tail<'a>(&mut self, rest: &'a [u8], out: &mut Vec<u8>) -> &'a [u8] {
        let Some(forwarded) = self.cr_tail else {
            return rest;
        };
        let Some((&first, tail)) = rest.split_first() else {
            return rest;
        };
        self.cr_tail = None;
        if first != b'\n' {
            return rest;
        }
        self.sse.pending_cr = false;
        if forwarded {
            out.push(b'\n');
        }
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::fixtures;
    use crate::usage::Usage;
    use proptest::prelude::*;

    fn scan(stream: &[u8]) -> (Findings, u64) {
        let mut sse = SseScanner::new(true);
        sse.feed(stream);
        (sse.findings(), sse.events())
    }

    fn scan_split(stream: &[u8], cuts: &[usize]) -> (Findings, u64) {
        let mut sse = SseScanner::new(true);
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, stream.len());
            sse.feed(&stream[start..cut]);
            start = cut;
        }
        sse.feed(&stream[start..]);
        (sse.findings(), sse.events())
    }

    fn usage(input: u64, cached: u64, output: u64, reasoning: u64) -> Option<Usage> {
        Some(Usage {
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            reasoning_tokens: reasoning,
        })
    }

    fn filter_split(stream: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut filter = UsageChunkFilter::new();
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, stream.len());
            out.extend_from_slice(&filter.push(&stream[start..cut]));
            start = cut;
        }
        out.extend_from_slice(&filter.push(&stream[start..]));
        out.extend_from_slice(&filter.finish());
        out
    }

    fn filter(stream: &[u8]) -> Vec<u8> {
        filter_split(stream, &[])
    }

    fn crlf(s: &str) -> String {
        s.replace('\n', "\r\n")
    }

    fn cr(s: &str) -> String {
        s.replace('\n', "\r")
    }

    #[test]
    fn chat_stream_with_usage_chunk() {
        let (found, events) = scan(fixtures::CHAT_STREAM_USAGE.as_bytes());
        assert_eq!(found.usage, usage(19, 0, 5, 0));
        assert_eq!(found.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert!(!found.malformed);
        // Five content chunks and the usage chunk; `[DONE]` is not an event.
        assert_eq!(events, 6);
    }

    #[test]
    fn chat_stream_without_usage_key() {
        let (found, events) = scan(fixtures::CHAT_STREAM_NO_USAGE.as_bytes());
        assert_eq!(found.usage, None);
        assert!(!found.malformed);
        assert_eq!(found.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert_eq!(events, 3);
    }

    #[test]
    fn legacy_stream() {
        let (found, events) = scan(fixtures::LEGACY_STREAM_USAGE.as_bytes());
        assert_eq!(found.usage, usage(6, 0, 3, 0));
        assert_eq!(found.model.as_deref(), Some("gpt-3.5-turbo-instruct"));
        assert_eq!(events, 4);
    }

    #[test]
    fn responses_stream_usage_under_response() {
        let (found, events) = scan(fixtures::RESPONSES_STREAM.as_bytes());
        assert_eq!(found.usage, usage(37, 32, 11, 4));
        assert_eq!(found.model.as_deref(), Some("gpt-4.1-mini-2025-04-14"));
        assert!(!found.malformed);
        assert_eq!(events, 10);
    }

    #[test]
    fn responses_incomplete_and_failed_carry_usage() {
        for kind in ["response.incomplete", "response.failed"] {
            let stream = format!(
                "event: {kind}\ndata: {{\"type\":\"{kind}\",\"response\":{{\"status\":\"x\",\"model\":\"gpt-4o\",\"usage\":{{\"input_tokens\":3,\"output_tokens\":2,\"output_tokens_details\":{{\"reasoning_tokens\":1}}}}}}}}\n\n"
            );
            let (found, events) = scan(stream.as_bytes());
            assert_eq!(found.usage, usage(3, 0, 2, 1), "{kind}");
            assert_eq!(found.model.as_deref(), Some("gpt-4o"));
            assert_eq!(events, 1);
        }
    }

    #[test]
    fn audio_transcription_stream() {
        let (found, events) = scan(fixtures::AUDIO_STREAM.as_bytes());
        assert_eq!(found.usage, usage(31, 0, 4, 0));
        assert_eq!(found.model, None);
        assert_eq!(events, 3);
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        for stream in [
            crlf(fixtures::CHAT_STREAM_USAGE),
            cr(fixtures::CHAT_STREAM_USAGE),
        ] {
            let (found, events) = scan(stream.as_bytes());
            assert_eq!(found.usage, usage(19, 0, 5, 0));
            assert_eq!(events, 6);
        }
        for stream in [
            crlf(fixtures::RESPONSES_STREAM),
            cr(fixtures::RESPONSES_STREAM),
        ] {
            let (found, events) = scan(stream.as_bytes());
            assert_eq!(found.usage, usage(37, 32, 11, 4));
            assert_eq!(events, 10);
        }
    }

    #[test]
    fn data_without_space_multiline_comments_and_other_fields() {
        let stream = concat!(
            ": keep-alive\n\n",
            "id: 7\nretry: 1000\nevent: message\n",
            "data:{\"model\":\"gpt-4o\",\n",
            "data: \"usage\":\n",
            "data:  {\"prompt_tokens\":4,\n",
            "data:\"completion_tokens\":2}}\n\n",
            "data\n\n",
            "data:\n\n",
            "datum: {\"usage\":{\"prompt_tokens\":100}}\n\n",
            "data : {\"usage\":{\"prompt_tokens\":100}}\n\n",
        );
        let (found, events) = scan(stream.as_bytes());
        assert_eq!(found.usage, usage(4, 0, 2, 0));
        assert_eq!(found.model.as_deref(), Some("gpt-4o"));
        assert!(!found.malformed);
        // The multi-line event only: empty data events are not dispatched.
        assert_eq!(events, 1);
    }

    #[test]
    fn done_is_not_an_event_but_lookalikes_are() {
        let (_, events) = scan(b"data: [DONE]\n\ndata:[DONE]\n\ndata: [DONE]x\n\ndata: [DON\n\n");
        assert_eq!(events, 2);
    }

    #[test]
    fn truncated_stream_counts_events_without_usage() {
        let stream = fixtures::CHAT_STREAM_USAGE;
        let at = stream.find("\"choices\":[]").unwrap_or(0);
        let (found, events) = scan(&stream.as_bytes()[..at]);
        assert_eq!(found.usage, None);
        assert!(!found.malformed);
        assert_eq!(events, 5);
        // Cut inside the usage object: present but unreadable.
        let at = stream.find("\"completion_tokens\":5").unwrap_or(0);
        let (found, events) = scan(&stream.as_bytes()[..at]);
        assert_eq!(found.usage, None);
        assert!(found.malformed);
        assert_eq!(events, 5);
    }

    #[test]
    fn usage_object_cut_by_the_end_of_its_event_is_malformed() {
        let stream = "data: {\"usage\":{\"prompt_tokens\":4\n\ndata: {\"usage\":null}\n\n";
        let (found, events) = scan(stream.as_bytes());
        assert_eq!(found.usage, None);
        assert!(found.malformed);
        assert_eq!(events, 2);
    }

    #[test]
    fn an_error_event_mid_stream() {
        let stream = format!(
            "{}data: {}\n\n",
            &fixtures::CHAT_STREAM_NO_USAGE[..fixtures::CHAT_STREAM_NO_USAGE.len() - 14],
            fixtures::ERROR_JSON
        );
        let (found, events) = scan(stream.as_bytes());
        assert_eq!(found.usage, None);
        assert!(!found.malformed);
        assert_eq!(events, 4);
    }

    #[test]
    fn huge_data_line_is_not_buffered() {
        let image = fixtures::big_image_json(3 * 1024 * 1024);
        let stream = format!("event: image\ndata: {image}\n\n");
        let mut sse = SseScanner::new(true);
        for chunk in stream.as_bytes().chunks(8 * 1024) {
            sse.feed(chunk);
        }
        assert_eq!(sse.findings().usage, usage(50, 0, 4160, 0));
        assert!(sse.buffered_capacity() <= 2 * crate::usage::json::MAX_USAGE_BYTES);
    }

    #[test]
    fn every_split_point_chat_and_responses() {
        let streams = [
            fixtures::CHAT_STREAM_USAGE.to_owned(),
            fixtures::RESPONSES_STREAM.to_owned(),
            crlf(fixtures::LEGACY_STREAM_USAGE),
            cr(fixtures::AUDIO_STREAM),
        ];
        for stream in &streams {
            let whole = scan(stream.as_bytes());
            for at in 0..=stream.len() {
                assert_eq!(scan_split(stream.as_bytes(), &[at]), whole, "split at {at}");
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        for stream in [fixtures::CHAT_STREAM_USAGE, fixtures::RESPONSES_STREAM] {
            let cuts: Vec<usize> = (1..stream.len()).collect();
            assert_eq!(
                scan_split(stream.as_bytes(), &cuts),
                scan(stream.as_bytes())
            );
        }
    }

    #[test]
    fn filter_removes_chat_usage_chunk() {
        let expected = fixtures::CHAT_STREAM_USAGE.replacen(fixtures::CHAT_USAGE_EVENT, "", 1);
        assert_ne!(expected, fixtures::CHAT_STREAM_USAGE);
        assert_eq!(
            filter(fixtures::CHAT_STREAM_USAGE.as_bytes()),
            expected.as_bytes()
        );
        let (found, events) = scan(expected.as_bytes());
        assert_eq!((found.usage, events), (None, 5));
    }

    #[test]
    fn filter_removes_legacy_usage_chunk() {
        let expected = fixtures::LEGACY_STREAM_USAGE.replacen(fixtures::LEGACY_USAGE_EVENT, "", 1);
        assert_ne!(expected, fixtures::LEGACY_STREAM_USAGE);
        assert_eq!(
            filter(fixtures::LEGACY_STREAM_USAGE.as_bytes()),
            expected.as_bytes()
        );
    }

    #[test]
    fn filter_with_crlf_and_cr() {
        for convert in [crlf, cr] {
            let stream = convert(fixtures::CHAT_STREAM_USAGE);
            let expected = stream.replacen(&convert(fixtures::CHAT_USAGE_EVENT), "", 1);
            assert_ne!(expected, stream);
            for at in 0..=stream.len() {
                assert_eq!(
                    filter_split(stream.as_bytes(), &[at]),
                    expected.as_bytes(),
                    "split at {at}"
                );
            }
        }
    }

    #[test]
    fn filter_leaves_other_streams_byte_identical() {
        for stream in [
            fixtures::CHAT_STREAM_NO_USAGE,
            fixtures::RESPONSES_STREAM,
            fixtures::AUDIO_STREAM,
            ": comment\n\n\n\ndata: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[{}],\"usage\":{\"prompt_tokens\":1}}\n\n",
        ] {
            assert_eq!(filter(stream.as_bytes()), stream.as_bytes());
        }
    }

    #[test]
    fn filter_holds_partial_event_until_its_end() {
        let stream = fixtures::CHAT_STREAM_NO_USAGE.as_bytes();
        let first_end = fixtures::CHAT_STREAM_NO_USAGE.find("\n\n").unwrap_or(0) + 2;
        let mut filter = UsageChunkFilter::new();
        assert!(filter.push(&stream[..first_end - 1]).is_empty());
        assert_eq!(
            filter.push(&stream[first_end - 1..first_end + 5]),
            &stream[..first_end]
        );
        assert_eq!(filter.finish(), &stream[first_end..first_end + 5]);
    }

    #[test]
    fn filter_gives_up_on_huge_events() {
        let huge = format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1}},\"pad\":\"{}\"}}\n\n",
            "p".repeat(MAX_HELD_EVENT)
        );
        let stream = format!("{huge}{}", fixtures::CHAT_USAGE_EVENT);
        let expected = huge.as_bytes();
        assert_eq!(filter(stream.as_bytes()), expected);
        let cuts: Vec<usize> = (1..stream.len() / 4096).map(|k| k * 4096).collect();
        let mut filter = UsageChunkFilter::new();
        let mut out = Vec::new();
        let mut start = 0;
        for cut in cuts {
            let got = filter.push(&stream.as_bytes()[start..cut]);
            out.extend_from_slice(&got);
            start = cut;
            assert!(filter.held.capacity() <= 2 * MAX_HELD_EVENT);
        }
        out.extend_from_slice(&filter.push(&stream.as_bytes()[start..]));
        out.extend_from_slice(&filter.finish());
        assert_eq!(out, expected);
    }

    #[test]
    fn filter_every_split_point() {
        for (stream, event) in [
            (fixtures::CHAT_STREAM_USAGE, fixtures::CHAT_USAGE_EVENT),
            (fixtures::LEGACY_STREAM_USAGE, fixtures::LEGACY_USAGE_EVENT),
        ] {
            let expected = stream.replacen(event, "", 1);
            for at in 0..=stream.len() {
                assert_eq!(
                    filter_split(stream.as_bytes(), &[at]),
                    expected.as_bytes(),
                    "split at {at}"
                );
            }
        }
    }

    fn streams() -> Vec<String> {
        vec![
            fixtures::CHAT_STREAM_USAGE.to_owned(),
            fixtures::RESPONSES_STREAM.to_owned(),
            crlf(fixtures::CHAT_STREAM_USAGE),
            cr(fixtures::LEGACY_STREAM_USAGE),
            fixtures::AUDIO_STREAM.to_owned(),
        ]
    }

    proptest! {
        #[test]
        fn scanner_is_chunking_independent(
            which in 0usize..5,
            mut cuts in proptest::collection::vec(0usize..8000, 0..64),
            small in proptest::bool::ANY,
        ) {
            let stream = &streams()[which];
            if small {
                // Mostly one-byte chunks.
                cuts = (0..stream.len()).filter(|i| i % 3 != 0).collect();
            }
            cuts.sort_unstable();
            prop_assert_eq!(scan_split(stream.as_bytes(), &cuts), scan(stream.as_bytes()));
        }

        #[test]
        fn filter_is_chunking_independent(
            which in 0usize..5,
            mut cuts in proptest::collection::vec(0usize..8000, 0..64),
        ) {
            let stream = &streams()[which];
            cuts.sort_unstable();
            prop_assert_eq!(filter_split(stream.as_bytes(), &cuts), filter(stream.as_bytes()));
        }

        #[test]
        fn scanner_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut sse = SseScanner::new(true);
            sse.feed(&bytes);
            let _ = sse.findings();
            let mut filter = UsageChunkFilter::new();
            let mut out = filter.push(&bytes).to_vec();
            out.extend_from_slice(&filter.finish());
            prop_assert!(out.len() <= bytes.len());
        }
    }
}
