//! Fuzzing on a budget: property tests of everything in tollgate that reads bytes an outsider
//! chose (response bodies, request bodies, multipart forms, the config file).
//!
//! Two kinds of property: on arbitrary input the code never panics (and stays independent of how
//! the input was split), and on generated well-formed input it finds exactly what was put in.
//!
//! Each property runs 256 cases by default, so the whole file takes a few seconds. For a longer
//! run: `PROPTEST_CASES=100000 cargo test --release --test fuzz` (about a minute per 10,000
//! cases and property in release mode).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};

use tollgate::inspect::{inspect_json, multipart_model};
use tollgate::usage::{Encoding, Format, Meter, Report, Usage, UsageChunkFilter};

/// 256 cases unless `PROPTEST_CASES` says otherwise (`ProptestConfig::default` reads it).
fn cases() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 256;
    }
    config
}

// ---------------------------------------------------------------------------------------------
// Inputs

const ENCODINGS: [Encoding; 5] = [
    Encoding::Identity,
    Encoding::Gzip,
    Encoding::Deflate,
    Encoding::Brotli,
    Encoding::Zstd,
];

fn encoding() -> impl Strategy<Value = Encoding> {
    proptest::sample::select(&ENCODINGS[..])
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Sse), Just(Format::Json)]
}

/// Pieces that SSE and JSON scanners care about, to reach deeper states than random bytes do.
const SOUP: &[&[u8]] = &[
    b"data:",
    b"data: ",
    b"data",
    b"event: message",
    b": comment",
    b"id: 7",
    b"\n",
    b"\r\n",
    b"\r",
    b"\n\n",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"\"",
    b"\\",
    b"\\u00",
    b"\"usage\"",
    b"\"usage\":",
    b"\"model\":\"m\"",
    b"\"choices\":[]",
    b"\"choices\":[{}]",
    b"\"response\":",
    b"\"prompt_tokens\":12",
    b"\"completion_tokens\":",
    b"\"input_tokens\":3,\"output_tokens\":4",
    b"{\"prompt_tokens\":1,\"completion_tokens\":2}",
    b"\"type\":\"duration\"",
    b"null",
    b"true",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"\"twelve\"",
    b"[DONE]",
    b"\xff\xfe",
    b" ",
];

/// Arbitrary bytes: raw; a soup of SSE and JSON pieces with random bytes between; or a valid
/// stream or JSON body with a few bytes deleted, inserted or replaced (which reaches the states
/// deep inside a usage object that random bytes never get to).
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => proptest::sample::select(SOUP).prop_map(<[u8]>::to_vec),
        1 => vec(any::<u8>(), 1..8),
    ];
    prop_oneof![
        vec(any::<u8>(), 0..2048),
        vec(piece, 0..128).prop_map(|pieces| pieces.concat()),
        (gen_stream(), vec(edit(), 1..6))
            .prop_map(|(stream, edits)| apply(stream.render().bytes, &edits)),
        (gen_request(), vec(edit(), 1..6)).prop_map(|(body, edits)| apply(body, &edits)),
    ]
}

/// One byte-level edit of a valid body.
#[derive(Debug, Clone)]
enum Edit {
    Delete(Index),
    Insert(Index, u8),
    Replace(Index, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    let byte = prop_oneof![
        proptest::sample::select(&b"\"\\{}[]:,\n\r 0n\xff"[..]),
        any::<u8>(),
    ];
    prop_oneof![
        any::<Index>().prop_map(Edit::Delete),
        (any::<Index>(), byte.clone()).prop_map(|(at, b)| Edit::Insert(at, b)),
        (any::<Index>(), byte).prop_map(|(at, b)| Edit::Replace(at, b)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        match edit {
            Edit::Insert(at, b) => bytes.insert(at.index(bytes.len() + 1), *b),
            Edit::Delete(at) if !bytes.is_empty() => {
                bytes.remove(at.index(bytes.len()));
            }
            Edit::Replace(at, b) if !bytes.is_empty() => {
                let at = at.index(bytes.len());
                bytes[at] = *b;
            }
            Edit::Delete(_) | Edit::Replace(..) => {}
        }
    }
    bytes
}

/// A chat request or a chat answer with a usage, as JSON bytes.
fn gen_request() -> impl Strategy<Value = Vec<u8>> {
    (
        model_name(),
        any::<String>(),
        any::<bool>(),
        any::<u64>(),
        gen_usage(),
    )
        .prop_map(|(model, content, stream, max_tokens, usage)| {
            json!({
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "stream": stream,
                "max_tokens": max_tokens,
                "usage": usage.to_json(),
            })
            .to_string()
            .into_bytes()
        })
}

/// Where to split a body into chunks: a few random cuts, or (sometimes) every byte.
#[derive(Debug, Clone)]
struct Chunking {
    cuts: Vec<Index>,
    every_byte: bool,
}

fn chunking() -> impl Strategy<Value = Chunking> {
    (vec(any::<Index>(), 0..24), proptest::bool::weighted(0.1))
        .prop_map(|(cuts, every_byte)| Chunking { cuts, every_byte })
}

impl Chunking {
    fn split<'a>(&self, body: &'a [u8]) -> Vec<&'a [u8]> {
        if self.every_byte {
            return body.chunks(1).collect();
        }
        let mut cuts: Vec<usize> = self.cuts.iter().map(|i| i.index(body.len() + 1)).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::with_capacity(cuts.len() + 1);
        let mut start = 0;
        for cut in cuts {
            pieces.push(&body[start..cut]);
            start = cut;
        }
        pieces.push(&body[start..]);
        pieces
    }
}

fn meter(format: Format, encoding: Encoding, pieces: &[&[u8]]) -> Report {
    let mut meter = Meter::new(format, encoding);
    for piece in pieces {
        meter.observe(piece);
    }
    meter.report()
}

fn filter(pieces: &[&[u8]]) -> Vec<u8> {
    filter_and_report(pieces).0
}

/// What the filter lets through, and what it reports as the stream's meter.
fn filter_and_report(pieces: &[&[u8]]) -> (Vec<u8>, Report) {
    let mut filter = UsageChunkFilter::new();
    let mut out = Vec::new();
    for piece in pieces {
        out.extend_from_slice(&filter.push(piece));
    }
    let report = filter.report();
    out.extend_from_slice(&filter.finish());
    (out, report)
}

fn compress(encoding: Encoding, raw_deflate: bool, data: &[u8]) -> Vec<u8> {
    let level = flate2::Compression::default();
    match encoding {
        Encoding::Identity => data.to_vec(),
        Encoding::Gzip => {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), level);
            w.write_all(data).unwrap();
            w.finish().unwrap()
        }
        // Servers send both zlib-wrapped and raw deflate as "deflate"; both are read.
        Encoding::Deflate if raw_deflate => {
            let mut w = flate2::write::DeflateEncoder::new(Vec::new(), level);
            w.write_all(data).unwrap();
            w.finish().unwrap()
        }
        Encoding::Deflate => {
            let mut w = flate2::write::ZlibEncoder::new(Vec::new(), level);
            w.write_all(data).unwrap();
            w.finish().unwrap()
        }
        Encoding::Brotli => {
            let mut w = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 20);
            w.write_all(data).unwrap();
            w.into_inner()
        }
        Encoding::Zstd => zstd::stream::encode_all(data, 3).unwrap(),
    }
}

// ---------------------------------------------------------------------------------------------
// Generated usage objects and streams

/// A usage object as OpenAI spells it: chat (`prompt_tokens`...) or Responses
/// (`input_tokens`...), with or without the detail objects.
#[derive(Debug, Clone)]
struct GenUsage {
    responses_style: bool,
    input: u64,
    output: u64,
    cached: Option<u64>,
    reasoning: Option<u64>,
}

fn gen_usage() -> impl Strategy<Value = GenUsage> {
    let count = prop_oneof![0u64..100_000, any::<u64>()];
    (
        any::<bool>(),
        count.clone(),
        count.clone(),
        proptest::option::of(count.clone()),
        proptest::option::of(count),
    )
        .prop_map(
            |(responses_style, input, output, cached, reasoning)| GenUsage {
                responses_style,
                input,
                output,
                cached,
                reasoning,
            },
        )
}

impl GenUsage {
    fn to_json(&self) -> Value {
        let mut usage = if self.responses_style {
            json!({"input_tokens": self.input, "output_tokens": self.output})
        } else {
            json!({"prompt_tokens": self.input, "completion_tokens": self.output})
        };
        usage["total_tokens"] = json!(self.input.saturating_add(self.output));
        let (input_details, output_details) = if self.responses_style {
            ("input_tokens_details", "output_tokens_details")
        } else {
            ("prompt_tokens_details", "completion_tokens_details")
        };
        if let Some(cached) = self.cached {
            usage[input_details] = json!({"cached_tokens": cached, "audio_tokens": 0});
        }
        if let Some(reasoning) = self.reasoning {
            usage[output_details] = json!({"reasoning_tokens": reasoning, "audio_tokens": 0});
        }
        usage
    }

    fn expected(&self) -> Usage {
        Usage {
            input_tokens: self.input,
            cached_input_tokens: self.cached.unwrap_or(0),
            output_tokens: self.output,
            reasoning_tokens: self.reasoning.unwrap_or(0),
        }
    }
}

/// One SSE event of a generated stream.
#[derive(Debug, Clone)]
enum GenEvent {
    /// A chat content chunk, with `"usage": null` when the client asked for usage.
    Content {
        model: String,
        text: String,
        null_usage: bool,
    },
    /// The chat usage-only chunk: `"choices": []` and a usage.
    ChatUsage { model: String, usage: GenUsage },
    /// A Responses API event; `response.completed` carries a usage.
    Responses {
        model: String,
        usage: Option<GenUsage>,
    },
}

fn model_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9.-]{1,24}",
        1 => any::<String>().prop_map(|s| s.chars().take(40).collect()),
    ]
}

fn gen_event() -> impl Strategy<Value = GenEvent> {
    prop_oneof![
        3 => (model_name(), any::<String>(), any::<bool>()).prop_map(|(model, text, null_usage)| {
            GenEvent::Content { model, text, null_usage }
        }),
        1 => (model_name(), gen_usage()).prop_map(|(model, usage)| GenEvent::ChatUsage { model, usage }),
        1 => (model_name(), proptest::option::of(gen_usage()))
            .prop_map(|(model, usage)| GenEvent::Responses { model, usage }),
    ]
}

impl GenEvent {
    fn model(&self) -> &str {
        match self {
            GenEvent::Content { model, .. }
            | GenEvent::ChatUsage { model, .. }
            | GenEvent::Responses { model, .. } => model,
        }
    }

    fn usage(&self) -> Option<&GenUsage> {
        match self {
            GenEvent::Content { .. } => None,
            GenEvent::ChatUsage { usage, .. } => Some(usage),
            GenEvent::Responses { usage, .. } => usage.as_ref(),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            GenEvent::Content {
                model,
                text,
                null_usage,
            } => {
                let mut chunk = json!({
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}],
                });
                if *null_usage {
                    chunk["usage"] = Value::Null;
                }
                chunk
            }
            GenEvent::ChatUsage { model, usage } => json!({
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [],
                "usage": usage.to_json(),
            }),
            GenEvent::Responses { model, usage } => json!({
                "type": if usage.is_some() { "response.completed" } else { "response.in_progress" },
                "sequence_number": 3,
                "response": {
                    "id": "resp_1",
                    "object": "response",
                    "model": model,
                    "output": [],
                    "usage": usage.as_ref().map_or(Value::Null, GenUsage::to_json),
                },
            }),
        }
    }
}

/// A generated stream and how it is written on the wire.
#[derive(Debug, Clone)]
struct GenStream {
    events: Vec<GenEvent>,
    /// Pretty-printed JSON, so an event's data spans several `data:` lines.
    pretty: Vec<bool>,
    /// Consumed line by line: bit 0 a space after `data:`, bits 1-2 the line terminator,
    /// bits 3-5 an extra `event:`, `id:` or comment line before an event.
    style: Vec<u8>,
    done: bool,
}

fn gen_stream() -> impl Strategy<Value = GenStream> {
    (
        vec(gen_event(), 0..10),
        vec(any::<bool>(), 10),
        vec(any::<u8>(), 1..64),
        any::<bool>(),
    )
        .prop_map(|(events, pretty, style, done)| GenStream {
            events,
            pretty,
            style,
            done,
        })
}

/// The wire bytes of a stream, and the byte range of each event (the `[DONE]` event last).
struct Rendered {
    bytes: Vec<u8>,
    events: Vec<Range<usize>>,
}

impl GenStream {
    fn render(&self) -> Rendered {
        let mut style = self.style.iter().copied().cycle();
        let mut out = Vec::new();
        let mut ranges = Vec::new();
        // The last line ended with a lone `\r`: a blank line must not start with `\n` then, or
        // the two would read as one `\r\n`.
        let mut after_cr = false;
        fn line(out: &mut Vec<u8>, text: &[u8], after_cr: &mut bool, s: u8) {
            out.extend_from_slice(text);
            let terminator: &[u8] = match (s >> 1) & 3 {
                1 => b"\r\n",
                2 => b"\r",
                _ => b"\n",
            };
            let terminator: &[u8] = if text.is_empty() && *after_cr && terminator == b"\n" {
                b"\r\n"
            } else {
                terminator
            };
            out.extend_from_slice(terminator);
            *after_cr = terminator == b"\r";
        }
        let datas: Vec<String> = self
            .events
            .iter()
            .zip(self.pretty.iter().cycle())
            .map(|(event, pretty)| {
                if *pretty {
                    serde_json::to_string_pretty(&event.to_json()).unwrap()
                } else {
                    event.to_json().to_string()
                }
            })
            .chain(self.done.then(|| "[DONE]".to_owned()))
            .collect();
        for data in datas {
            let start = out.len();
            let s = style.next().unwrap_or(0);
            match (s >> 3) & 7 {
                1 => line(&mut out, b"event: message", &mut after_cr, s),
                2 => line(&mut out, b"id: 42", &mut after_cr, s),
                3 => line(&mut out, b": keep-alive", &mut after_cr, s),
                _ => {}
            }
            for text in data.split('\n') {
                let s = style.next().unwrap_or(0);
                let field: &[u8] = if s & 1 == 1 { b"data: " } else { b"data:" };
                let mut bytes = field.to_vec();
                bytes.extend_from_slice(text.as_bytes());
                line(&mut out, &bytes, &mut after_cr, s);
            }
            let s = style.next().unwrap_or(0);
            line(&mut out, b"", &mut after_cr, s);
            ranges.push(start..out.len());
        }
        Rendered {
            bytes: out,
            events: ranges,
        }
    }

    /// What the meter must report for the whole stream: usage, model and events (compared field
    /// by field, so that a new `Report` field does not break this file).
    fn expected(&self) -> (Option<Usage>, Option<String>, u64) {
        (
            self.events
                .iter()
                .rev()
                .find_map(GenEvent::usage)
                .map(GenUsage::expected),
            self.events.first().map(|e| e.model().to_owned()),
            self.events.len() as u64,
        )
    }

    /// What the usage-chunk filter must let through: every event but the chat usage chunks.
    fn filtered(&self, rendered: &Rendered) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, range) in rendered.events.iter().enumerate() {
            if !matches!(self.events.get(i), Some(GenEvent::ChatUsage { .. })) {
                out.extend_from_slice(&rendered.bytes[range.clone()]);
            }
        }
        out
    }
}

/// Arbitrary JSON, with keys that the scanners watch showing up often.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        // A string holding a usage object's text: must stay a string.
        gen_usage().prop_map(|u| Value::String(format!("\"usage\": {}", u.to_json()))),
    ];
    let key = prop_oneof![
        Just("usage".to_owned()),
        Just("model".to_owned()),
        Just("response".to_owned()),
        Just("choices".to_owned()),
        "[a-z_]{1,10}",
        any::<String>(),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((key.clone(), inner.clone()), 0..6)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
            // A decoy usage object, deeper than the top level.
            gen_usage().prop_map(|u| json!({ "usage": u.to_json() })),
        ]
    })
}

/// Whitespace JSON allows between tokens.
fn ws() -> impl Strategy<Value = &'static str> {
    const SPACES: &[&str] = &["", " ", "\n", "\t", "\r\n  ", "  "];
    proptest::sample::select(SPACES)
}

/// A JSON object written member by member in the order given, with random whitespace.
fn write_object(members: &[(String, Value)], pretty: &[bool], spaces: &[&str]) -> String {
    let mut space = spaces.iter().cycle();
    let mut pretty = pretty.iter().cycle();
    let mut out = String::from("{");
    for (i, (key, value)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(space.next().unwrap_or(&""));
        out.push_str(&Value::from(key.as_str()).to_string());
        out.push_str(space.next().unwrap_or(&""));
        out.push(':');
        out.push_str(space.next().unwrap_or(&""));
        if *pretty.next().unwrap_or(&false) {
            out.push_str(&serde_json::to_string_pretty(value).unwrap());
        } else {
            out.push_str(&value.to_string());
        }
    }
    out.push_str(space.next().unwrap_or(&""));
    out.push('}');
    out
}

/// Pieces of multipart forms.
const MULTIPART_SOUP: &[&[u8]] = &[
    b"--XyZ",
    b"--XyZ--",
    b"\r\n",
    b"\n",
    b"Content-Disposition: form-data; name=\"model\"",
    b"Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"",
    b"Content-Type: audio/wav",
    b"gpt-4o-transcribe",
    b"\xff",
    b";",
    b"\"",
];

/// Whitespace around a multipart `model` value (the reader trims it).
const PADDING: &[&str] = &["", " ", "\t", "  "];

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

// ---------------------------------------------------------------------------------------------
// Config

/// Env lookups for configs under test.
fn env(name: &str) -> Option<String> {
    match name {
        "OPENAI_KEY" | "TOLLGATE_ADMIN_TOKEN" => Some(SECRET.to_owned()),
        _ => None,
    }
}

const SECRET: &str = "sk-proj-fuzz-secret-0123456789";

const VALID_CONFIG: &str = r#"# a config that loads
[server]
listen = "127.0.0.1:0"
max_body_bytes = 65536
header_read_timeout_ms = 10000
body_read_timeout_ms = 30000
max_connections = 100
max_concurrent_streams = 64

[admin]
listen = "127.0.0.1:0"
token_env = "TOLLGATE_ADMIN_TOKEN"

[upstream]
base_url = "http://127.0.0.1:9/prefix"
connect_timeout_ms = 500
request_timeout_ms = 1500
idle_timeout_ms = 400

[reservation]
default_output_tokens = 4096

[store]
path = "ledger.db"
flush_interval_ms = 200
on_store_error = "open"

[[projects]]
name = "alpha"
api_key_env = "OPENAI_KEY"
openai_project = "proj_alpha"
allowed_models = ["gpt-4o-mini", "gpt-4.1*"]
denied_models = ["gpt-4.1-nano"]
budget = { tokens = 100000, usd = 10.0, period = "monthly", alert_at = [0.5, 0.8] }
rate_limits = [{ model = "gpt-4o*", rpm = 500, tpm = 200000 }]

[[projects.credentials]]
name = "svc"
token_sha256 = "6c2a9bd0b9f5ac3b4e1e2d8f04b3b4f8e3dd5c8c6a1a9e3b2f2e8a7f6e5d4c3b"
expires_at = "2030-01-01T00:00:00Z"

[[projects.credentials]]
name = "ci"
token_sha256 = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
disabled = true
budget = { tokens = 1000, period = "daily" }
allowed_models = ["gpt-4o-mini"]

[[projects]]
name = "beta"
api_key_env = "OPENAI_KEY"
"#;

/// A directory with a copy of the price table, where the config under test pretends to live:
/// every relative path a mutated config names resolves inside it.
fn config_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pricing = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/pricing.toml");
        std::fs::copy(pricing, dir.path().join("pricing.toml")).unwrap();
        dir
    })
    .path()
}

/// Loads `text`; an error must start with the file's path, name a key path or a line, and
/// never show the secret.
fn check_config(text: &str) -> Result<(), TestCaseError> {
    let path = config_dir().join("tollgate.toml");
    if let Err(error) = tollgate::config::load_str(text, &path, &env) {
        let message = error.to_string();
        let prefix = format!("{}: ", path.display());
        prop_assert!(message.starts_with(&prefix), "{message}");
        prop_assert_eq!(error.file(), path.as_path());
        prop_assert!(
            !error.key_path().is_empty() || message.contains("line "),
            "names neither a key path nor a line: {}",
            message
        );
        prop_assert!(!message.contains(SECRET), "{}", message);
    }
    Ok(())
}

/// One edit of a config's lines.
#[derive(Debug, Clone)]
enum Mutation {
    Delete(Index),
    Duplicate(Index),
    Swap(Index, Index),
    /// Keeps the key, replaces the value.
    Replace(Index, String),
    /// Cuts the line short.
    Truncate(Index, Index),
}

fn toml_value() -> impl Strategy<Value = String> {
    const FIXED: &[&str] = &[
        "\"\"",
        "\"x\"",
        "-1",
        "0",
        "1",
        "9",
        "0.0",
        "-0.5",
        "1.5",
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775808",
        "1e400",
        "nan",
        "inf",
        "true",
        "[]",
        "{}",
        "[1, \"a\"]",
        "[\"\"]",
        "[\"gpt-[\"]",
        "{ tokens = -5 }",
        "{ period = \"hourly\" }",
        "{ usd = 0.0, period = \"total\" }",
        "[{ model = \"*\" }]",
        "[{ rpm = 0 }]",
        "\"2020-13-45T00:00:00Z\"",
        "1979-05-27T07:32:00Z",
        "\"*\"",
        "\"ftp://x\"",
        "\"http://\"",
        "\"http://a#b\"",
        "\"http://a:99999\"",
        "\"127.0.0.1:99999\"",
        "\"[::1]:0\"",
        "\"redis://\"",
        "\"rediss://:pw@host\"",
        "\"OPENAI_KEY\"",
        "\"MISSING_ENV\"",
        "\"name with spaces\"",
        "\"zz\"",
        "'''multi\nline'''",
        "\"\\u0000\"",
        "\"\\uD800\"",
    ];
    let fixed = proptest::sample::select(FIXED).prop_map(str::to_owned);
    prop_oneof![
        3 => fixed,
        1 => "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
        1 => "[ -~]{0,12}",
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<Index>().prop_map(Mutation::Delete),
        1 => any::<Index>().prop_map(Mutation::Duplicate),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        3 => (any::<Index>(), toml_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, at)| Mutation::Truncate(i, at)),
    ]
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for mutation in mutations {
        if lines.is_empty() {
            break;
        }
        let n = lines.len();
        match mutation {
            Mutation::Delete(i) => {
                lines.remove(i.index(n));
            }
            Mutation::Duplicate(i) => {
                let line = lines[i.index(n)].clone();
                lines.insert(i.index(n), line);
            }
            Mutation::Swap(a, b) => lines.swap(a.index(n), b.index(n)),
            Mutation::Replace(i, value) => {
                let line = &mut lines[i.index(n)];
                if let Some(at) = line.find(" = ") {
                    line.truncate(at + 3);
                    line.push_str(value);
                }
            }
            Mutation::Truncate(i, at) => {
                let line = &mut lines[i.index(n)];
                let cut = line
                    .char_indices()
                    .map(|(at, _)| at)
                    .nth(at.index(line.chars().count().max(1)))
                    .unwrap_or(line.len());
                line.truncate(cut);
            }
        }
    }
    lines.join("\n")
}

/// TOML-looking pieces, to get past the tokenizer more often than random text does.
const TOML_SOUP: &[&str] = &[
    "[server]\n",
    "[admin]\n",
    "[upstream]\n",
    "[store]\n",
    "[pricing]\n",
    "[[projects]]\n",
    "[[projects.credentials]]\n",
    "[projects.budget]\n",
    "name = ",
    "\"alpha\"",
    "api_key_env = \"OPENAI_KEY\"\n",
    "token_sha256 = \"6c2a9bd0b9f5ac3b4e1e2d8f04b3b4f8e3dd5c8c6a1a9e3b2f2e8a7f6e5d4c3b\"\n",
    "budget = { tokens = ",
    "period = \"weekly\"",
    "allowed_models = [",
    "\"gpt-*\"",
    "rate_limits = [{ model = \"*\", rpm = ",
    "listen = ",
    "\"127.0.0.1:0\"",
    "base_url = ",
    "\"http://x\"",
    "max_body_bytes = ",
    "fallback = { input = ",
    "file = ",
    "unknown_key = ",
    "=",
    " = ",
    "\n",
    "\r\n",
    "{",
    "}",
    "[",
    "]",
    ",",
    ".",
    "\"",
    "'",
    "'''",
    "\"\"\"",
    "#",
    "1",
    "-1",
    "1e999",
    "true",
    "\\u0000",
    "\t",
    "é",
    "\u{feff}",
];

fn toml_soup() -> impl Strategy<Value = String> {
    vec(proptest::sample::select(TOML_SOUP), 0..64).prop_map(|pieces| pieces.concat())
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(cases())]

    /// The meter on arbitrary bytes, any format and encoding: never panics, and the report does
    /// not depend on the chunking (for zstd and brotli only `malformed` is promised: those
    /// decoders drop an amount of output on error that depends on the chunking).
    #[test]
    fn meter_survives_arbitrary_bytes(
        format in format(),
        encoding in encoding(),
        body in hostile_bytes(),
        chunking in chunking(),
    ) {
        let whole = meter(format, encoding, &[&body]);
        let split = meter(format, encoding, &chunking.split(&body));
        if matches!(encoding, Encoding::Zstd | Encoding::Brotli) {
            prop_assert_eq!(split.malformed, whole.malformed);
        } else {
            prop_assert_eq!(split, whole);
        }
    }

    /// The same with the hostile bytes compressed properly: the decoder is happy and the scanner
    /// gets the garbage, whatever the chunking.
    #[test]
    fn meter_survives_compressed_garbage(
        format in format(),
        encoding in encoding(),
        raw_deflate in any::<bool>(),
        plain in hostile_bytes(),
        chunking in chunking(),
    ) {
        let body = compress(encoding, raw_deflate, &plain);
        let expected = meter(format, Encoding::Identity, &[&plain]);
        let split = meter(format, encoding, &chunking.split(&body));
        prop_assert_eq!(split, expected);
    }

    /// Generated streams (chat chunks with and without `"usage": null`, usage-only chunks,
    /// Responses events; `data:` with and without a space; LF, CRLF and CR; JSON over several
    /// `data:` lines; `event:`, `id:` and comment lines; `[DONE]` or not), in every encoding
    /// and any chunking: the report has the last usage, the first model and every event.
    #[test]
    fn meter_reads_generated_streams(
        stream in gen_stream(),
        encoding in encoding(),
        raw_deflate in any::<bool>(),
        chunking in chunking(),
    ) {
        let rendered = stream.render();
        let body = compress(encoding, raw_deflate, &rendered.bytes);
        let report = meter(Format::Sse, encoding, &chunking.split(&body));
        let text = String::from_utf8_lossy(&rendered.bytes);
        prop_assert_eq!((report.usage, report.model, report.events), stream.expected(), "stream: {:?}", text);
        prop_assert!(!report.malformed, "stream: {:?}", text);
    }

    /// The usage-chunk filter on arbitrary bytes: never panics, and what it lets through does
    /// not depend on the chunking.
    #[test]
    fn usage_filter_is_chunking_independent(body in hostile_bytes(), chunking in chunking()) {
        let whole = filter(&[&body]);
        let split = filter(&chunking.split(&body));
        prop_assert_eq!(split, whole);
    }

    /// A filtered stream is metered by the filter's scanner: on any bytes and chunking it
    /// reports what a meter of the same stream reports.
    #[test]
    fn usage_filter_reports_what_a_meter_reports(
        body in prop_oneof![hostile_bytes(), gen_stream().prop_map(|s| s.render().bytes)],
        chunking in chunking(),
    ) {
        let pieces = chunking.split(&body);
        let (_, report) = filter_and_report(&pieces);
        prop_assert_eq!(report, meter(Format::Sse, Encoding::Identity, &pieces));
    }

    /// On generated streams the filter removes exactly the chat usage-only chunks, byte for
    /// byte, whatever the chunking.
    #[test]
    fn usage_filter_removes_exactly_the_usage_chunks(
        stream in gen_stream(),
        chunking in chunking(),
    ) {
        let rendered = stream.render();
        let out = filter(&chunking.split(&rendered.bytes));
        let expected = stream.filtered(&rendered);
        prop_assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected));
    }

    /// A JSON body made of arbitrary members (decoy `usage` keys below the top level, usage
    /// text inside strings, nested `response` objects) with the real `usage` inserted at a
    /// random position of the top-level object: the meter finds exactly that usage.
    #[test]
    fn meter_finds_the_top_level_usage(
        members in vec(
            ("[a-z_]{1,10}|\\PC{0,12}", arb_json())
                .prop_filter("the one usage key", |(k, _)| k != "usage"),
            0..8,
        ),
        usage in gen_usage(),
        at in any::<Index>(),
        pretty in vec(any::<bool>(), 1..8),
        spaces in vec(ws(), 1..16),
        encoding in encoding(),
        raw_deflate in any::<bool>(),
        chunking in chunking(),
    ) {
        let mut members = members;
        members.insert(at.index(members.len() + 1), ("usage".to_owned(), usage.to_json()));
        let text = write_object(&members, &pretty, &spaces);
        prop_assert!(serde_json::from_str::<Value>(&text).is_ok(), "{}", text);
        let body = compress(encoding, raw_deflate, text.as_bytes());
        let report = meter(Format::Json, encoding, &chunking.split(&body));
        prop_assert_eq!(report.usage, Some(usage.expected()), "{}", text);
        prop_assert!(!report.malformed, "{}", text);
    }

    /// The multipart reader on arbitrary bytes and boundaries never panics.
    #[test]
    fn multipart_survives_arbitrary_bytes(
        body in prop_oneof![
            vec(any::<u8>(), 0..1024),
            vec(proptest::sample::select(MULTIPART_SOUP), 0..48).prop_map(|p| p.concat()),
        ],
        boundary in prop_oneof![Just("XyZ".to_owned()), any::<String>()],
    ) {
        let _ = block_on(multipart_model(Bytes::from(body), &boundary));
    }

    /// On generated forms (random fields, files and order) it finds the `model` field.
    #[test]
    fn multipart_finds_the_model_field(
        fields in vec(
            (
                "[a-z_]{1,12}".prop_filter("one model field", |n| n != "model"),
                proptest::option::of("[a-z]{1,8}\\.[a-z]{2,4}"),
                proptest::option::of(prop_oneof![
                    Just("audio/wav"), Just("image/png"), Just("text/plain; charset=utf-8"),
                ]),
                vec(any::<u8>(), 0..256),
            ),
            0..6,
        ),
        model in "[A-Za-z0-9._:-]{1,48}",
        model_padding in proptest::sample::select(PADDING),
        at in any::<Index>(),
        boundary in "[A-Za-z0-9'()+_,.:=?-]{0,69}[A-Za-z0-9]",
    ) {
        let delimiter = format!("\r\n--{boundary}");
        let mut parts: Vec<Vec<u8>> = Vec::new();
        for (name, filename, content_type, value) in &fields {
            let mut part = format!("Content-Disposition: form-data; name=\"{name}\"");
            if let Some(filename) = filename {
                part.push_str(&format!("; filename=\"{filename}\""));
            }
            part.push_str("\r\n");
            if let Some(content_type) = content_type {
                part.push_str(&format!("Content-Type: {content_type}\r\n"));
            }
            part.push_str("\r\n");
            let mut part = part.into_bytes();
            part.extend_from_slice(value);
            prop_assume!(!part.windows(delimiter.len()).any(|w| w == delimiter.as_bytes()));
            parts.push(part);
        }
        let model_part = format!(
            "Content-Disposition: form-data; name=\"model\"\r\n\r\n{model_padding}{model}{model_padding}"
        );
        parts.insert(at.index(parts.len() + 1), model_part.into_bytes());
        let mut body = Vec::new();
        for part in &parts {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            body.extend_from_slice(part);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let found = block_on(multipart_model(Bytes::from(body), &boundary));
        prop_assert_eq!(found.ok().flatten(), Some(model));
    }

    /// The JSON request inspector on arbitrary bytes never panics.
    #[test]
    fn inspect_json_survives_arbitrary_bytes(body in hostile_bytes()) {
        let _ = inspect_json(&body);
    }

    /// On generated request objects it finds the model, `stream` and the output cap, wherever
    /// they are and whatever else the object holds.
    #[test]
    fn inspect_json_finds_the_model(
        members in vec(
            ("[a-z_]{1,12}|\\PC{0,12}", arb_json()).prop_filter("not a field tollgate reads", |(k, _)| {
                !matches!(
                    k.as_str(),
                    "model" | "stream" | "stream_options" | "max_completion_tokens"
                        | "max_tokens" | "max_output_tokens" | "n"
                )
            }),
            0..8,
        ),
        model in proptest::option::of(proptest::option::of(any::<String>())),
        stream in proptest::option::of(any::<bool>()),
        caps in (
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(0u64..16),
        ),
        order in vec(any::<Index>(), 6),
        pretty in vec(any::<bool>(), 1..8),
        spaces in vec(ws(), 1..16),
    ) {
        let (max_completion_tokens, max_tokens, max_output_tokens, n) = caps;
        let mut members = members;
        let mut order = order.iter();
        let mut put = |members: &mut Vec<(String, Value)>, key: &str, value: Value| {
            let at = order.next().map_or(0, |i| i.index(members.len() + 1));
            members.insert(at, (key.to_owned(), value));
        };
        if let Some(model) = &model {
            put(&mut members, "model", model.clone().map_or(Value::Null, Value::String));
        }
        if let Some(stream) = stream {
            put(&mut members, "stream", Value::Bool(stream));
        }
        for (key, cap) in [
            ("max_completion_tokens", max_completion_tokens),
            ("max_tokens", max_tokens),
            ("max_output_tokens", max_output_tokens),
            ("n", n),
        ] {
            if let Some(cap) = cap {
                put(&mut members, key, Value::from(cap));
            }
        }
        let text = write_object(&members, &pretty, &spaces);
        let inspected = inspect_json(text.as_bytes());
        prop_assert!(inspected.is_ok(), "{:?}: {}", inspected, text);
        let inspected = inspected.unwrap();
        prop_assert_eq!(inspected.model, model.flatten(), "{}", text);
        prop_assert_eq!(inspected.stream, stream.unwrap_or(false));
        let cap = max_completion_tokens.or(max_tokens).or(max_output_tokens);
        prop_assert_eq!(
            inspected.max_output_tokens,
            cap.map(|c| c.saturating_mul(n.unwrap_or(1).max(1)))
        );
    }

    /// The config loader on arbitrary text never panics, and its errors say where.
    #[test]
    fn config_loader_survives_arbitrary_text(
        text in prop_oneof![any::<String>(), "\\PC{0,200}", toml_soup()],
    ) {
        check_config(&text)?;
    }

    /// On a valid config with lines deleted, duplicated, swapped, cut short or given other
    /// values: never panics, and every error starts with the file and names a key path or a
    /// line.
    #[test]
    fn config_loader_survives_mutations(mutations in vec(mutation(), 1..6)) {
        check_config(&mutate(VALID_CONFIG, &mutations))?;
    }
}

/// The base of the mutations loads: the mutations start from a config that is valid.
#[test]
fn the_config_under_mutation_is_valid() {
    let path = config_dir().join("tollgate.toml");
    if let Err(error) = tollgate::config::load_str(VALID_CONFIG, &path, &env) {
        panic!("{error}");
    }
}
