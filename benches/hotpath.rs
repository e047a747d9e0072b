//! Microbenches of what tollgate does per request, each beside the alternative or the part it
//! is made of: token lookup (and the SHA-256 alone), usage extraction from JSON and SSE bodies at
//! several chunkings, the usage-chunk filter, budget reserve-and-settle (limited and unlimited,
//! one thread and two), a metrics scrape, and the ledger's write of a flush's batch. How to run and
//! read them: `benches/README.md`.
//!
//! Short by default (2 s of measurement, 20 samples per bench) so that the suite takes about a
//! minute; criterion's own flags (`-- --measurement-time 10`) lengthen it.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use http::{header, HeaderMap, HeaderValue};

use tollgate::budget::{Account, Charge};
use tollgate::config::{BudgetLimit, Config};
use tollgate::period::Period;
use tollgate::state::AppState;
use tollgate::store::{Ledger, UsageDelta, UsageKey};
use tollgate::usage::{Encoding, Format, Meter, Usage, UsageChunkFilter};

type Error = Box<dyn std::error::Error + Send + Sync>;
type Bench = fn(&mut Criterion) -> Result<(), Error>;

fn main() -> ExitCode {
    let mut criterion = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
        .configure_from_args();
    let benches: [(&str, Bench); 6] = [
        ("auth", auth),
        ("usage json", usage_json),
        ("usage sse", usage_sse),
        ("budget", budget),
        ("metrics", metrics),
        ("ledger", ledger),
    ];
    for (name, bench) in benches {
        if let Err(err) = bench(&mut criterion) {
            eprintln!("hotpath bench: {name}: {err}");
            return ExitCode::from(1);
        }
    }
    criterion.final_summary();
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Configs

const KEY_ENV: &str = "TOLLGATE_BENCH_OPENAI_KEY";

/// Deterministic tokens shaped like `tollgate token new`'s.
fn token(project: usize, credential: usize) -> String {
    let seed = tollgate::auth::hash_token(&format!("bench-{project}-{credential}"));
    format!("tg-{}", hex::encode(&seed[..24]))
}

/// A config of `projects` projects with `per_project` credentials each, loaded through
/// `tollgate::config::load_str` as a file would be (the pricing table is the repo's).
fn config(projects: usize, per_project: usize) -> Result<Config, Error> {
    let mut toml = String::with_capacity(projects * per_project * 120);
    toml.push_str("[upstream]\nbase_url = \"http://127.0.0.1:9\"\n\n");
    for p in 0..projects {
        let _ = writeln!(
            toml,
            "[[projects]]\nname = \"team-{p:05}\"\napi_key_env = \"{KEY_ENV}\""
        );
        let _ = match p % 3 {
            0 => writeln!(toml, "allowed_models = [\"gpt-4o-mini\", \"gpt-4.1*\"]"),
            1 => writeln!(toml, "allowed_models = [\"gpt-4*\", \"o4-mini\", \"o3*\"]"),
            _ => writeln!(toml, "denied_models = [\"o1*\"]"),
        };
        let _ = writeln!(
            toml,
            "budget = {{ tokens = 1000000000000, usd = 1000000.0, period = \"monthly\" }}"
        );
        for c in 0..per_project {
            let hash = hex::encode(tollgate::auth::hash_token(&token(p, c)));
            let _ = writeln!(
                toml,
                "[[projects.credentials]]\nname = \"svc-{c:03}\"\ntoken_sha256 = \"{hash}\""
            );
        }
        toml.push('\n');
    }
    // A path in the repo's config/ so that `pricing.file = "pricing.toml"` finds the real table.
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/bench.toml");
    let env = |name: &str| (name == KEY_ENV).then(|| "sk-proj-bench".to_owned());
    Ok(tollgate::config::load_str(&toml, &source, &env)?)
}

/// splitmix64, for reproducible picks.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n.max(1) as u64) as usize
    }
}

fn bearer(token: &str) -> Result<HeaderMap, Error> {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::try_from(format!("Bearer {token}"))?,
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(headers)
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// `authenticate` against 100,000 credentials (1,000 projects × 100), for tokens that are there
/// and tokens that are not; and the SHA-256 of a token alone, the part of it that does not
/// depend on the number of credentials.
fn auth(c: &mut Criterion) -> Result<(), Error> {
    const PROJECTS: usize = 1_000;
    const PER_PROJECT: usize = 100;
    let started = Instant::now();
    let config = config(PROJECTS, PER_PROJECT)?;
    eprintln!(
        "auth: config with {} credentials generated and loaded in {:.2} s (built once)",
        config.tokens.len(),
        started.elapsed().as_secs_f64()
    );
    // A ring of prepared requests, so that each lookup hits a different bucket (as real traffic
    // does) and building the header map is not timed.
    const RING: usize = 4096;
    let mut rng = Rng(7);
    let hits = (0..RING)
        .map(|_| bearer(&token(rng.below(PROJECTS), rng.below(PER_PROJECT))))
        .collect::<Result<Vec<_>, _>>()?;
    let misses = (0..RING)
        .map(|i| bearer(&token(PROJECTS + i, 0)))
        .collect::<Result<Vec<_>, _>>()?;
    let now = Utc::now();
    if !hits
        .iter()
        .all(|h| tollgate::auth::authenticate(&config, h, now).is_ok())
    {
        return Err("a known token did not authenticate".into());
    }

    let mut group = c.benchmark_group("auth");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("authenticate/hit (100k credentials)", |b| {
        b.iter(|| {
            i = (i + 1) % RING;
            black_box(tollgate::auth::authenticate(&config, &hits[i], now)).is_ok()
        })
    });
    group.bench_function("authenticate/miss (100k credentials)", |b| {
        b.iter(|| {
            i = (i + 1) % RING;
            black_box(tollgate::auth::authenticate(&config, &misses[i], now)).is_err()
        })
    });
    // The same token again and again: everything it touches stays in cache. The gap to the
    // random hits above is the cost of reaching a cold bucket, project and credential.
    let hot = &hits[0];
    group.bench_function("authenticate/hit, same token (hot cache)", |b| {
        b.iter(|| black_box(tollgate::auth::authenticate(&config, black_box(hot), now)).is_ok())
    });
    let token = token(0, 0);
    group.bench_function("sha256 of a token alone", |b| {
        b.iter(|| tollgate::auth::hash_token(black_box(&token)))
    });
    group.finish();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Usage extraction

const USAGE: &str = r#""usage":{"prompt_tokens":42,"completion_tokens":37,"total_tokens":79,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#;

/// A chat.completion whose message content is `content_bytes` long (escapes included), with
/// the usage after the choices as OpenAI orders it.
fn completion(content_bytes: usize) -> String {
    let mut content = String::with_capacity(content_bytes + 64);
    // Text with the escapes real answers have: quotes, newlines, a non-ASCII escape.
    let line = r#"Here is \"quoted\" text, a newline\nand a caf\u00e9; "#;
    while content.len() < content_bytes {
        content.push_str(line);
    }
    content.truncate(content_bytes - content_bytes % line.len().max(1));
    format!(
        r#"{{"id":"chatcmpl-Mk7aQ2sLw9XyZ0bC1dE2fG3hI4jK5","object":"chat.completion","created":1760000000,"model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],{USAGE},"service_tier":"default","system_fingerprint":"fp_0a1b2c3d4e"}}"#
    )
}

fn meter_json(body: &[u8], frame: usize) -> tollgate::usage::Report {
    let mut meter = Meter::new(Format::Json, Encoding::Identity);
    for chunk in body.chunks(frame.max(1)) {
        meter.observe(chunk);
    }
    meter.report()
}

/// `Meter` over a ~700-byte and a 64 KiB chat.completion, whole and (64 KiB) in the 8 KiB
/// frames hyper typically hands over.
fn usage_json(c: &mut Criterion) -> Result<(), Error> {
    let small = completion(160);
    let large = completion(64 * 1024 - 600);
    let mut group = c.benchmark_group("usage json");
    // The fixed part: a meter made and asked for its report, no body.
    group.throughput(Throughput::Elements(1));
    group.bench_function("Meter::new + report, no body", |b| {
        b.iter(|| meter_json(black_box(b""), 1))
    });
    for (name, body, frame) in [
        ("~700 B whole", &small, usize::MAX),
        ("64 KiB whole", &large, usize::MAX),
        ("64 KiB in 8 KiB frames", &large, 8 * 1024),
    ] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("{name} ({} B)", body.len())),
            |b| b.iter(|| meter_json(black_box(body.as_bytes()), frame)),
        );
    }
    group.finish();
    Ok(())
}

/// A 200-chunk chat completion stream as the upstream sends it when asked for usage: the
/// content chunks, the usage-only chunk, `[DONE]`.
fn sse_stream() -> String {
    let words = [
        "Sure,", " here", " is", " a", " short", " mock", " answer", " for", " you.",
    ];
    let mut out = String::new();
    for i in 0..200 {
        let delta = if i == 0 {
            r#"{"role":"assistant","content":"","refusal":null}"#.to_owned()
        } else {
            format!(r#"{{"content":"{}"}}"#, words[i % words.len()])
        };
        let finish = if i == 199 { r#""stop""# } else { "null" };
        let _ = write!(
            out,
            "data: {{\"id\":\"chatcmpl-Mk7aQ2sLw9XyZ0bC1dE2fG3hI4jK5\",\"object\":\"chat.completion.chunk\",\"created\":1760000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_0a1b2c3d4e\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}],\"usage\":null,\"obfuscation\":\"a1B\"}}\n\n"
        );
    }
    let _ = write!(
        out,
        "data: {{\"id\":\"chatcmpl-Mk7aQ2sLw9XyZ0bC1dE2fG3hI4jK5\",\"object\":\"chat.completion.chunk\",\"created\":1760000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_0a1b2c3d4e\",\"choices\":[],{USAGE},\"obfuscation\":\"Xy\"}}\n\ndata: [DONE]\n\n"
    );
    out
}

/// How a stream is cut into frames: every `n` bytes, or one SSE event per frame.
#[derive(Clone, Copy)]
enum Cut {
    Bytes(usize),
    Events,
}

impl Cut {
    fn label(self) -> String {
        match self {
            Cut::Bytes(usize::MAX) => "whole".to_owned(),
            Cut::Bytes(n) => format!("{n} B"),
            Cut::Events => "one event per frame".to_owned(),
        }
    }

    fn frames(self, stream: &[u8]) -> Vec<&[u8]> {
        match self {
            Cut::Bytes(n) => stream.chunks(n.max(1)).collect(),
            Cut::Events => {
                let mut frames = Vec::new();
                let mut rest = stream;
                while let Some(at) = rest.windows(2).position(|w| w == b"\n\n") {
                    let (event, tail) = rest.split_at(at + 2);
                    frames.push(event);
                    rest = tail;
                }
                if !rest.is_empty() {
                    frames.push(rest);
                }
                frames
            }
        }
    }
}

/// SSE `Meter` over the 200-chunk stream cut at a representative set of frame sizes (every size
/// from 1 byte up would be thousands of benches; these span one byte per call, odd sizes that
/// split every event boundary and `data:` prefix, a TCP-segment-ish 512 and 4096, the whole
/// stream, and one event per frame, which is how a real token stream arrives), then the
/// `UsageChunkFilter` that takes the usage chunk out.
fn usage_sse(c: &mut Criterion) -> Result<(), Error> {
    let stream = sse_stream();
    let bytes = stream.as_bytes();

    framed_group(
        c,
        "sse meter (200 chunks)",
        bytes,
        &[
            Cut::Bytes(1),
            Cut::Bytes(7),
            Cut::Bytes(64),
            Cut::Bytes(512),
            Cut::Bytes(4096),
            Cut::Bytes(usize::MAX),
            Cut::Events,
        ],
        |frames| {
            let mut meter = Meter::new(Format::Sse, Encoding::Identity);
            for frame in frames {
                meter.observe(black_box(frame));
            }
            meter.report()
        },
    );
    framed_group(
        c,
        "usage chunk filter (200 chunks)",
        bytes,
        &[
            Cut::Bytes(64),
            Cut::Bytes(4096),
            Cut::Bytes(usize::MAX),
            Cut::Events,
        ],
        |frames| {
            let mut filter = UsageChunkFilter::new();
            let mut out = 0usize;
            for frame in frames {
                out += filter.push(black_box(frame)).len();
            }
            out + filter.finish().len()
        },
    );
    Ok(())
}

/// A group with one bench per cut of `bytes` into frames, each running `run` over the frames.
fn framed_group<R>(
    c: &mut Criterion,
    name: &str,
    bytes: &[u8],
    cuts: &[Cut],
    run: impl Fn(&[&[u8]]) -> R,
) {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    for &cut in cuts {
        let frames = cut.frames(bytes);
        group.bench_with_input(
            BenchmarkId::from_parameter(cut.label()),
            &frames,
            |b, frames| b.iter(|| run(frames)),
        );
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Budget

/// Reserve and settle on one account: with a limit (compare-and-swap) and without (plain add),
/// on one thread, then on two threads at once on the same account (the cost of contention on
/// its cache lines; reported per operation of one thread).
fn budget(c: &mut Criterion) -> Result<(), Error> {
    let now: DateTime<Utc> = Utc::now();
    let limit = BudgetLimit {
        tokens: Some(u64::MAX / 4),
        micro_usd: Some(u64::MAX / 4),
        period: Period::Monthly,
    };
    let estimate = Charge {
        tokens: 4_400,
        micro_usd: 2_700,
    };
    let usage = Usage {
        input_tokens: 42,
        output_tokens: 37,
        ..Usage::default()
    };
    let actual = Charge {
        tokens: usage.total(),
        micro_usd: 30,
    };
    let once = move |account: &Arc<Account>, limit: Option<&BudgetLimit>| {
        if let Ok(reservation) = account.reserve(limit, estimate, now) {
            reservation.settle(actual, &usage);
        }
    };

    let mut group = c.benchmark_group("budget reserve+settle");
    group.throughput(Throughput::Elements(1));
    for (name, limit) in [("limited", Some(&limit)), ("unlimited", None)] {
        let account = Arc::new(Account::new(Period::Monthly, now));
        group.bench_function(format!("1 thread/{name}"), |b| {
            b.iter(|| once(black_box(&account), limit))
        });
        let account = Arc::new(Account::new(Period::Monthly, now));
        group.bench_function(format!("2 threads, same account/{name}"), |b| {
            b.iter_custom(|iters| {
                let barrier = Barrier::new(2);
                std::thread::scope(|scope| {
                    let other = scope.spawn(|| {
                        barrier.wait();
                        for _ in 0..iters {
                            once(&account, limit);
                        }
                    });
                    barrier.wait();
                    let started = Instant::now();
                    for _ in 0..iters {
                        once(&account, limit);
                    }
                    let _ = other.join();
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// One `/metrics` scrape with 1,000 projects, each with usage recorded for several credentials
/// and two models, 200s and a few 429s, and rejections.
fn metrics(c: &mut Criterion) -> Result<(), Error> {
    let state = AppState::new(config(1_000, 10)?)?;
    let live = state.live.load_full();
    let models: [Arc<str>; 2] = [Arc::from("gpt-4o-mini"), Arc::from("gpt-4.1-mini")];
    for (p, project_state) in live.states.iter().enumerate() {
        let Some(project) = live.config.projects.get(p) else {
            continue;
        };
        for credential in project.credentials.iter().take(3) {
            for model in &models {
                let usage = Usage {
                    input_tokens: 1_000 + p as u64,
                    cached_input_tokens: 100,
                    output_tokens: 500,
                    reasoning_tokens: 0,
                };
                project_state
                    .cell(&credential.name, model)
                    .add(&usage, 1_234);
                project_state.count_request(model, 200);
            }
        }
        if p % 10 == 0 {
            project_state.count_request(&models[0], 429);
            project_state.count_rejection("budget_exceeded");
        }
        project_state.duration.observe(Duration::from_millis(250));
        project_state.first_byte.observe(Duration::from_millis(100));
    }
    state.unauthenticated.count_rejection("invalid_token");
    let scrape = state.metrics.render(&live, &state.unauthenticated);
    eprintln!(
        "metrics: one scrape is {} KiB, {} lines",
        scrape.len() / 1024,
        scrape.lines().count()
    );

    let mut group = c.benchmark_group("metrics");
    // A scrape takes tens of milliseconds: fewer samples, a little longer.
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes(scrape.len() as u64));
    group.bench_function("render (1,000 projects)", |b| {
        b.iter(|| {
            state
                .metrics
                .render(black_box(&live), &state.unauthenticated)
        })
    });
    group.finish();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ledger

/// The ledger's writes over a fold interval as the load bench makes them: 50 flushes (10 s at
/// 200 ms) of 3,000 rows each, drawn at random from 20,000 keys (1,000 projects × 10
/// credentials × 2 models) whose rows all exist already, then the fold that adds them to those
/// rows. Throughput is per row written.
fn ledger(c: &mut Criterion) -> Result<(), Error> {
    const ROWS: usize = 3_000;
    const FLUSHES: usize = 50;
    let dir = tempfile::tempdir()?;
    let day = Utc::now().date_naive();
    let models: [Arc<str>; 2] = [Arc::from("gpt-4o-mini"), Arc::from("gpt-4.1-mini")];
    let keys: Vec<UsageKey> = (0..1_000)
        .flat_map(|p| (0..10).flat_map(move |c| (0..2).map(move |m| (p, c, m))))
        .map(|(p, c, m): (usize, usize, usize)| UsageKey {
            project: Arc::from(format!("team-{p:04}")),
            credential: Arc::from(format!("svc-{c:02}")),
            model: models[m].clone(),
            day,
        })
        .collect();
    let delta = UsageDelta {
        requests: 1,
        input_tokens: 30,
        cached_input_tokens: 0,
        output_tokens: 38,
        reasoning_tokens: 0,
        micro_usd: 27,
    };
    let every: Vec<(UsageKey, UsageDelta)> = keys.iter().map(|k| (k.clone(), delta)).collect();
    let mut ledger = Ledger::open(&dir.path().join("ledger.db"))?;
    ledger.write(&every)?;
    ledger.fold()?;
    let mut rng = Rng(0x5eed);
    let mut group = c.benchmark_group("ledger");
    group.throughput(Throughput::Elements((FLUSHES * ROWS) as u64));
    group.sample_size(10);
    group.bench_function("50 writes of 3,000 of 20,000 rows, then a fold", |b| {
        b.iter_batched(
            || {
                (0..FLUSHES)
                    .map(|_| {
                        (0..ROWS)
                            .map(|_| (keys[rng.below(keys.len())].clone(), delta))
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            },
            |batches| {
                for batch in &batches {
                    black_box(ledger.write(batch))?;
                }
                black_box(ledger.fold())
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
    Ok(())
}
