//! `tollgate usage` against a ledger written by the test: formats, date range, grouping, and
//! the errors for a missing ledger and a bad config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use chrono::NaiveDate;
use tollgate::store::{Ledger, UsageDelta, UsageKey};

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    ledger: PathBuf,
}

/// A config in a temp dir whose `[store] path` is `ledger/usage.db` beside it.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pricing = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pricing.toml");
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[pricing]
file = {pricing:?}

[store]
path = "ledger/usage.db"

[[projects]]
name = "search"
api_key_env = "OPENAI_KEY_USAGE_TEST"
"#,
            pricing = pricing.display().to_string()
        ),
    )
    .unwrap();
    let ledger = dir.path().join("ledger/usage.db");
    Setup {
        _dir: dir,
        config,
        ledger,
    }
}

fn key(project: &str, credential: &str, model: &str, day: &str) -> UsageKey {
    UsageKey {
        project: Arc::from(project),
        credential: Arc::from(credential),
        model: Arc::from(model),
        day: day.parse::<NaiveDate>().unwrap(),
    }
}

fn usage(requests: u64, input: u64, output: u64, micro_usd: u64) -> UsageDelta {
    UsageDelta {
        requests,
        input_tokens: input,
        cached_input_tokens: input / 10,
        output_tokens: output,
        reasoning_tokens: output / 10,
        micro_usd,
    }
}

/// Three days of usage for two projects; `batch` spends the most.
fn write_ledger(path: &Path) {
    let mut ledger = Ledger::open(path).unwrap();
    ledger
        .write(&[
            (
                key("search", "api", "gpt-4o-mini", "2026-11-24"),
                usage(10, 1000, 100, 210_000),
            ),
            (
                key("search", "ci", "gpt-4o-mini", "2026-11-25"),
                usage(5, 500, 50, 105_000),
            ),
            (
                key("batch", "worker", "gpt-4o", "2026-11-25"),
                usage(2, 20_000, 2_000, 70_000_000),
            ),
            (
                key("batch", "worker", "gpt-4o-mini", "2026-11-26"),
                usage(1, 100, 10, 21_000),
            ),
        ])
        .unwrap();
    // A second write adds to the rows.
    ledger
        .write(&[(
            key("search", "api", "gpt-4o-mini", "2026-11-24"),
            usage(10, 1000, 100, 210_000),
        )])
        .unwrap();
}

fn run(setup: &Setup, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("usage")
        .arg("--config")
        .arg(&setup.config)
        .args(args)
        .env("OPENAI_KEY_USAGE_TEST", "sk-usage-test")
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap()
}

fn stdout_of(output: &Output) -> String {
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    assert!(
        output.status.success(),
        "status {:?}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn table_by_project_puts_the_biggest_spender_first_and_totals() {
    let setup = setup();
    write_ledger(&setup.ledger);
    let text = stdout_of(&run(&setup, &[]));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "project",
            "requests",
            "input",
            "cached_input",
            "output",
            "reasoning",
            "tokens",
            "usd"
        ]
    );
    let cells =
        |line: &str| -> Vec<String> { line.split_whitespace().map(str::to_owned).collect() };
    assert_eq!(
        cells(lines[1]),
        [
            "batch",
            "3",
            "20100",
            "2010",
            "2010",
            "201",
            "22110",
            "70.021000"
        ]
    );
    assert_eq!(
        cells(lines[2]),
        ["search", "25", "2500", "250", "250", "25", "2750", "0.525000"]
    );
    assert!(lines[3].chars().all(|c| c == '-'), "{text}");
    assert_eq!(
        cells(lines[4]),
        [
            "TOTAL",
            "28",
            "22600",
            "2260",
            "2260",
            "226",
            "24860",
            "70.546000"
        ]
    );
    // Columns line up: every line is as wide as the header.
    for line in &lines[1..] {
        assert_eq!(line.len(), lines[0].len(), "{text}");
    }
}

#[test]
fn json_has_rows_and_a_total() {
    let setup = setup();
    write_ledger(&setup.ledger);
    let text = stdout_of(&run(&setup, &["--format", "json"]));
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = value["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["project"], "batch");
    assert_eq!(rows[0]["micro_usd"], 70_021_000);
    assert_eq!(rows[0]["usd"], 70.021);
    assert_eq!(rows[1]["project"], "search");
    assert_eq!(rows[1]["requests"], 25);
    assert!(rows[1].get("model").is_none());
    assert_eq!(value["total"]["requests"], 28);
    assert_eq!(value["total"]["tokens"], 24_860);
    assert_eq!(value["total"]["micro_usd"], 70_546_000);
}

#[test]
fn csv_by_project_and_model() {
    let setup = setup();
    write_ledger(&setup.ledger);
    let text = stdout_of(&run(&setup, &["--format", "csv", "--by", "project,model"]));
    let expected = "project,model,requests,input,cached_input,output,reasoning,tokens,usd\r\n\
batch,gpt-4o,2,20000,2000,2000,200,22000,70.000000\r\n\
search,gpt-4o-mini,25,2500,250,250,25,2750,0.525000\r\n\
batch,gpt-4o-mini,1,100,10,10,1,110,0.021000\r\n";
    assert_eq!(text, expected);
}

#[test]
fn table_by_project_and_model() {
    let setup = setup();
    write_ledger(&setup.ledger);
    let text = stdout_of(&run(&setup, &["--by", "project,model"]));
    let firsts: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().take(2).collect())
        .collect();
    assert_eq!(firsts[0], ["project", "model"]);
    assert_eq!(firsts[1], ["batch", "gpt-4o"]);
    assert_eq!(firsts[2], ["search", "gpt-4o-mini"]);
    assert_eq!(firsts[3], ["batch", "gpt-4o-mini"]);
    assert_eq!(firsts[5][0], "TOTAL");
}

#[test]
fn since_and_until_are_inclusive_days() {
    let setup = setup();
    write_ledger(&setup.ledger);
    let text = stdout_of(&run(
        &setup,
        &[
            "--since",
            "2026-11-25",
            "--until",
            "2026-11-25",
            "--by",
            "day,project",
            "--format",
            "csv",
        ],
    ));
    let expected = "day,project,requests,input,cached_input,output,reasoning,tokens,usd\r\n\
2026-11-25,batch,2,20000,2000,2000,200,22000,70.000000\r\n\
2026-11-25,search,5,500,50,50,5,550,0.105000\r\n";
    assert_eq!(text, expected);

    let text = stdout_of(&run(&setup, &["--since", "2026-11-26", "--format", "csv"]));
    assert_eq!(
        text,
        "project,requests,input,cached_input,output,reasoning,tokens,usd\r\n\
batch,1,100,10,10,1,110,0.021000\r\n"
    );
    let text = stdout_of(&run(
        &setup,
        &[
            "--until",
            "2026-11-24",
            "--by",
            "credential",
            "--format",
            "csv",
        ],
    ));
    assert_eq!(
        text,
        "credential,requests,input,cached_input,output,reasoning,tokens,usd\r\n\
api,20,2000,200,200,20,2200,0.420000\r\n"
    );
    let text = stdout_of(&run(&setup, &["--since", "2027-01-01", "--format", "json"]));
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["rows"].as_array().unwrap().len(), 0);
    assert_eq!(value["total"]["requests"], 0);
}

#[test]
fn bad_arguments_are_refused() {
    let setup = setup();
    write_ledger(&setup.ledger);
    let output = run(&setup, &["--since", "2026-11-26", "--until", "2026-11-25"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--since 2026-11-26 is after --until 2026-11-25"),
        "{stderr}"
    );

    let output = run(&setup, &["--since", "26/11/2026"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not a date such as 2026-11-26"),
        "{stderr}"
    );

    let output = run(&setup, &["--by", "project,region"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown dimension `region`"), "{stderr}");
}

#[test]
fn a_missing_ledger_is_a_clear_error() {
    let setup = setup();
    let output = run(&setup, &[]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no ledger at"), "{stderr}");
    assert!(stderr.contains("ledger/usage.db"), "{stderr}");
    assert!(output.stdout.is_empty());
    assert!(!setup.ledger.exists(), "reporting creates no ledger");
}

#[test]
fn a_bad_config_exits_1_with_its_error() {
    let setup = setup();
    write_ledger(&setup.ledger);
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("usage")
        .arg("--config")
        .arg(&setup.config)
        .env_remove("OPENAI_KEY_USAGE_TEST")
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("projects[0].api_key_env"), "{stderr}");
    assert!(stderr.contains("tollgate.toml"), "{stderr}");
}
