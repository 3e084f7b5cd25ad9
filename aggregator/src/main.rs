//! `vote-aggregator`: parses the command line and the environment, wires signals to the
//! shutdown token, and calls the library. No logic lives here.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tokio_util::sync::CancellationToken;
use vote_aggregator::config::{self, Config};
use vote_aggregator::{db, telemetry};

/// Counts votes from a RabbitMQ queue into PostgreSQL exactly once.
///
/// Configuration comes from environment variables, listed below.
#[derive(Parser)]
#[command(name = "vote-aggregator", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume votes and count them (the default). Applies pending migrations first
    /// unless RUN_MIGRATIONS=false. Stops cleanly on SIGTERM or SIGINT: the batch in hand
    /// is committed and acked within SHUTDOWN_GRACE_SECONDS.
    Run,
    /// Apply pending database migrations and exit. Safe to run from several replicas at
    /// once (an advisory lock serialises them). Needs only DATABASE_URL.
    Migrate,
    /// Check that every candidate's tally equals its counted votes. Exits 0 when
    /// consistent, 2 with a table of differences when not. Needs only DATABASE_URL.
    Verify,
    /// Exit 0 when the replica on this host (at METRICS_ADDR) answers /healthz (or, with
    /// --ready, /readyz) with 200 within --timeout-seconds, else 1 with one line saying
    /// why. For container health checks: needs no shell tools and no server URL.
    Healthcheck {
        /// How long to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout_seconds: u64,
        /// Ask /readyz (connected to both servers and consuming) instead of /healthz.
        #[arg(long)]
        ready: bool,
    },
    /// Print the README's configuration table (Markdown) and exit.
    #[command(hide = true)]
    ConfigTable,
    /// Print the README's metrics table (Markdown) and exit.
    #[command(hide = true)]
    MetricsTable,
}

fn main() -> ExitCode {
    // `--help` ends with every variable, rendered from the one table the parser uses.
    let matches = Cli::command()
        .after_help(config::variables::help_text())
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Some(Command::ConfigTable) => {
            print!("{}", config::variables::markdown_table());
            return ExitCode::SUCCESS;
        }
        Some(Command::MetricsTable) => {
            print!("{}", vote_aggregator::metrics::markdown_table());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    telemetry::init(config::log_format_from_env(), "info");
    // One thread: a replica uses well under one core, and measured under load
    // (`make load`), the multi-thread runtime spent ~20 % more CPU per vote on cross-thread
    // wake-ups. Scale out with replicas, not threads.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => run().await,
            Command::Migrate => migrate().await,
            Command::Verify => verify().await,
            Command::Healthcheck {
                timeout_seconds,
                ready,
            } => healthcheck(timeout_seconds, ready).await,
            Command::ConfigTable | Command::MetricsTable => Ok(ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<ExitCode> {
    let config = Config::from_env()?;
    #[cfg(feature = "fault-injection")]
    tracing::warn!("{}", vote_aggregator::fault::BUILD_MARKER);
    let shutdown = CancellationToken::new();
    tokio::spawn(forward_signals(shutdown.clone()));
    vote_aggregator::run(config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn healthcheck(timeout_seconds: u64, ready: bool) -> anyhow::Result<ExitCode> {
    use vote_aggregator::http::paths;
    let listen = Config::metrics_addr_from_env()?;
    let timeout = std::time::Duration::from_secs(timeout_seconds);
    let path = if ready { paths::READYZ } else { paths::HEALTHZ };
    match vote_aggregator::http_client::healthcheck(listen, path, timeout).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(why) => {
            eprintln!("unhealthy: {why}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn migrate() -> anyhow::Result<ExitCode> {
    let url = Config::database_url_from_env()?;
    let applied = db::run_migrations(&url).await?;
    if applied.is_empty() {
        println!("schema is up to date");
    } else {
        for version in applied {
            println!("applied migration {version}");
        }
    }
    if !db::schema::runtime_grants_in_place(&url).await? {
        eprintln!(
            "warning: PostgreSQL role {} is missing or has no grants in this database (the migrating user may not create roles), so the replicas' runtime users cannot count: have an administrator run scripts/roles.sql (make roles), which creates it and applies them",
            db::schema::RUNTIME_GROUP_ROLE
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify() -> anyhow::Result<ExitCode> {
    let url = Config::database_url_from_env()?;
    let report = db::verify(&url).await?;
    if report.drift.is_empty() {
        println!(
            "consistent: {} votes, {} tallied, {} candidates, tally drift 0",
            report.votes, report.tallied, report.candidates
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "election",
        "candidate",
        "tally",
        "counted votes",
        "difference",
    ]);
    for d in &report.drift {
        table.add_row([
            d.election_id.clone(),
            d.candidate_id.clone(),
            d.tally.to_string(),
            d.counted.to_string(),
            format!("{:+}", d.tally - d.counted),
        ]);
    }
    println!("{table}");
    println!(
        "INCONSISTENT: {} of {} candidates have a tally that differs from their counted votes ({} votes, {} tallied)",
        report.drift.len(),
        report.candidates,
        report.votes,
        report.tallied
    );
    Ok(ExitCode::from(2))
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn forward_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("warning: cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing the batch in hand"),
        _ = int.recv() => tracing::info!("SIGINT: finishing the batch in hand"),
    }
    shutdown.cancel();
}
