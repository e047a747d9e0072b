//! The `tollgate` command line: parse, set up logging, load the config (exit 1 with the error),
//! and hand over to the library.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{Days, NaiveDate};
use clap::{Parser, Subcommand, ValueEnum};
use rand::RngCore;
use tokio::sync::watch;

use tollgate::report::{self, ReportFormat};
use tollgate::state::AppState;
use tollgate::store::{Dimension, ReportQuery};
use tollgate::{auth, config, Listeners};

/// mimalloc, not glibc's malloc: buffers and headers allocated on one runtime worker are freed
/// on the other, and glibc's arena locks made that the process's most contended lock (futex
/// waits on every few requests under load).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A budget-enforcing reverse proxy for the OpenAI API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the proxy and admin listeners.
    Serve {
        #[arg(long, env = "TOLLGATE_CONFIG", default_value = "config/tollgate.toml")]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a config and print a summary of it.
    Check {
        #[arg(long, env = "TOLLGATE_CONFIG", default_value = "config/tollgate.toml")]
        config: PathBuf,
    },
    /// Print the usage recorded in the ledger (`store.path` of the config).
    Usage {
        #[arg(long, env = "TOLLGATE_CONFIG", default_value = "config/tollgate.toml")]
        config: PathBuf,
        /// First UTC day included, YYYY-MM-DD.
        #[arg(long, value_name = "DATE", value_parser = parse_day)]
        since: Option<NaiveDate>,
        /// Last UTC day included, YYYY-MM-DD.
        #[arg(long, value_name = "DATE", value_parser = parse_day)]
        until: Option<NaiveDate>,
        /// Group by these, comma-separated: project, model, credential, day.
        #[arg(
            long,
            value_name = "DIMENSIONS",
            value_delimiter = ',',
            default_value = "project",
            value_parser = parse_dimension
        )]
        by: Vec<Dimension>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Make and hash internal tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh random token and the config line with its hash.
    New,
    /// Read a token on stdin and print its SHA-256 hex.
    Hash,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
    Csv,
}

impl From<OutputFormat> for ReportFormat {
    fn from(format: OutputFormat) -> Self {
        match format {
            OutputFormat::Table => ReportFormat::Table,
            OutputFormat::Json => ReportFormat::Json,
            OutputFormat::Csv => ReportFormat::Csv,
        }
    }
}

fn parse_day(text: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| format!("`{text}` is not a date such as 2026-11-26"))
}

fn parse_dimension(text: &str) -> Result<Dimension, String> {
    text.trim().parse()
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, log_format } => serve(config, log_format),
        Command::Check { config } => match config::load(&config) {
            Ok(loaded) => {
                out(&config::summary(&loaded));
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(1)
            }
        },
        Command::Usage {
            config,
            since,
            until,
            by,
            format,
        } => usage(&config, since, until, by, format.into()),
        Command::Token {
            command: TokenCommand::New,
        } => {
            let mut bytes = [0u8; 24];
            rand::rng().fill_bytes(&mut bytes);
            let token = format!("tg-{}", hex::encode(bytes));
            let hash = hex::encode(auth::hash_token(&token));
            out(&format!("{token}\ntoken_sha256 = \"{hash}\"\n"));
            ExitCode::SUCCESS
        }
        Command::Token {
            command: TokenCommand::Hash,
        } => {
            let mut input = String::new();
            if let Err(err) = std::io::stdin().read_to_string(&mut input) {
                eprintln!("error: cannot read stdin: {err}");
                return ExitCode::from(1);
            }
            let token = input.trim();
            if token.is_empty() {
                eprintln!("error: no token on stdin");
                return ExitCode::from(1);
            }
            out(&format!("{}\n", hex::encode(auth::hash_token(token))));
            ExitCode::SUCCESS
        }
    }
}

/// `tollgate usage`: the config names the ledger; `until` is inclusive here and exclusive in
/// the query.
fn usage(
    path: &std::path::Path,
    since: Option<NaiveDate>,
    until: Option<NaiveDate>,
    by: Vec<Dimension>,
    format: ReportFormat,
) -> ExitCode {
    let loaded = match config::load(path) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(1);
        }
    };
    if let (Some(since), Some(until)) = (since, until) {
        if since > until {
            eprintln!("error: --since {since} is after --until {until}");
            return ExitCode::from(1);
        }
    }
    let query = ReportQuery {
        since,
        // The day after the last day wanted; past the end of the calendar, no end at all.
        until: until.and_then(|day| day.checked_add_days(Days::new(1))),
        by,
    };
    match report::generate(&loaded.store.path, &query, format) {
        Ok(text) => {
            out(&text);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(1)
        }
    }
}

/// The CLI's output, on stdout.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

fn init_logging(format: LogFormat) {
    tollgate::logging::init(match format {
        LogFormat::Text => tollgate::logging::Format::Text,
        LogFormat::Json => tollgate::logging::Format::Json,
    });
}

fn serve(path: PathBuf, log_format: LogFormat) -> ExitCode {
    init_logging(log_format);
    let loaded = match config::load(&path) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(tollgate::logging::flush_thread)
        .on_thread_stop(tollgate::logging::flush_thread)
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::from(1);
        }
    };
    // The server runs as a task on the workers, not in `block_on` on the main thread: every
    // wake-up of a future that `block_on` polls (the accept loops) would cross threads.
    runtime.block_on(async move {
        tokio::spawn(serve_loaded(loaded))
            .await
            .unwrap_or(ExitCode::from(1))
    })
}

async fn serve_loaded(loaded: config::Config) -> ExitCode {
    let listeners = match Listeners::bind(&loaded).await {
        Ok(listeners) => listeners,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        proxy = %loaded.server.listen,
        admin = %loaded.admin.listen,
        projects = loaded.projects.len(),
        "starting"
    );
    let state = match AppState::new(loaded) {
        Ok(state) => state,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(1);
        }
    };
    let (stop, stopped) = watch::channel(false);
    let signals = tokio::spawn(signals(state.clone(), stop));
    let result = tollgate::serve(state, listeners, stopped).await;
    signals.abort();
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(1)
        }
    }
}

/// SIGTERM and SIGINT stop the server gracefully; SIGHUP reloads the config.
async fn signals(state: std::sync::Arc<AppState>, stop: watch::Sender<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Err(err) = tollgate::admin::reload_from_source(&state) {
                    tracing::error!(error = %err, "config reload refused; keeping the running config");
                }
            }
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop.send(true);
}
