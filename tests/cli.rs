//! The command line: `check` on good and bad configs, `token new` and `token hash`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::process::{Command, Stdio};

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

fn repo(path: &str) -> String {
    format!("{}/{}", env!("CARGO_MANIFEST_DIR"), path)
}

#[test]
fn check_accepts_the_example_config_and_prints_a_summary() {
    let output = tollgate()
        .args(["check", "--config", &repo("config/tollgate.toml")])
        .env("OPENAI_KEY_SEARCH", "sk-proj-example-search")
        .env("OPENAI_KEY_BATCH", "sk-proj-example-batch")
        .env("TOLLGATE_ADMIN_TOKEN", "admin")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("search"), "{stdout}");
    assert!(stdout.contains("batch"), "{stdout}");
    assert!(
        !stdout.contains("sk-proj-example"),
        "the summary must not show keys"
    );
}

#[test]
fn check_names_the_file_and_key_path_of_an_error_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[pricing]
file = "PRICING"

[[projects]]
name = "p"
api_key_env = "OPENAI_KEY_P"
budget = { tokens = 10, period = "fortnightly" }
"#
        .replace("PRICING", &repo("config/pricing.toml")),
    )
    .unwrap();
    let output = tollgate()
        .args(["check", "--config"])
        .arg(&path)
        .env("OPENAI_KEY_P", "sk-proj-x")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.toml"), "{stderr}");
    assert!(stderr.contains("projects[0].budget.period"), "{stderr}");
}

#[test]
fn serve_refuses_a_bad_config_with_exit_1() {
    let output = tollgate()
        .args(["serve", "--config", "/nonexistent/tollgate.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/tollgate.toml"), "{stderr}");
}

#[test]
fn token_new_prints_a_token_and_its_hash_line() {
    let output = tollgate().args(["token", "new"]).output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let mut lines = stdout.lines();
    let token = lines.next().unwrap();
    assert!(token.starts_with("tg-"));
    // 24 random bytes, hex: 192 bits of entropy.
    assert_eq!(token.len(), 3 + 48);
    let line = lines.next().unwrap();
    let expected = hex::encode(tollgate::auth::hash_token(token));
    assert_eq!(line, format!("token_sha256 = \"{expected}\""));

    let again = tollgate().args(["token", "new"]).output().unwrap();
    assert_ne!(again.stdout, stdout.as_bytes(), "tokens must be random");
}

#[test]
fn token_hash_reads_stdin() {
    let mut child = tollgate()
        .args(["token", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"abc\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}
