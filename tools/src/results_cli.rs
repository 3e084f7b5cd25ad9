//! `vote-tools results`: the reference results consumer ([`vote_testkit::results`]) on
//! the command line. `--follow` keeps its own tallies from the `votes.results` stream and
//! prints them as they change; `--check` compares its reconstruction with
//! `vote_statistics` exactly (even under load) and exits 1 naming the first differing
//! candidate.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use vote_aggregator::config::variables as var;
use vote_aggregator::results::Tallies;
use vote_testkit::results::ResultsReader;

/// The options of `vote-tools results`.
#[derive(Args)]
pub struct ResultsArgs {
    /// RabbitMQ URL (a user with the results reader's permissions suffices).
    #[arg(long, env = var::AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// PostgreSQL URL: reads `vote_statistics` (the starting snapshot) and, for
    /// `--check`, `results_outbox`.
    #[arg(long, env = var::DATABASE_URL, hide_env_values = true)]
    database_url: String,
    /// Keep reading and print the tallies whenever they change (until Ctrl-C).
    #[arg(long, conflicts_with = "check")]
    follow: bool,
    /// Compare the reconstruction with `vote_statistics`; exit 0 when equal, 1 when not.
    #[arg(long)]
    check: bool,
    /// How long `--check` first follows the stream, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Name of the reader's queue: `votes.results.reader.<name>` (durable; a one-off
    /// `--check` deletes it at the end).
    #[arg(long, default_value = "vote-tools")]
    name: String,
    /// Elections to read, as a topic binding key (`#`: all).
    #[arg(long, default_value = "#")]
    elections: String,
}

/// Runs `vote-tools results`.
///
/// # Errors
/// When the servers cannot be reached or refuse.
pub async fn run(args: ResultsArgs) -> anyhow::Result<ExitCode> {
    if !args.follow && !args.check {
        anyhow::bail!(
            "say what to do: --follow (print the tallies live) or --check (compare with vote_statistics)"
        );
    }
    let mut reader = ResultsReader::start(
        &args.database_url,
        &args.amqp_url,
        &args.name,
        &args.elections,
    )
    .await?;
    eprintln!(
        "reading {} (bound to votes.results with {:?}) from a snapshot of {} candidates",
        reader.queue,
        args.elections,
        reader.reconstruction.tallies().len()
    );
    if args.follow {
        let mut shown = Tallies::new();
        loop {
            let read = tokio::select! {
                r = reader.read_until_quiet(Duration::from_millis(500), |_| {}) => r,
                _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            };
            if let Err(e) = read {
                eprintln!("warning: {e:#}; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let now = reader.reconstruction.tallies();
            if now != shown {
                print!("{}", render(&now, &reader));
                shown = now;
            }
        }
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(args.seconds);
    while tokio::time::Instant::now() < until {
        reader
            .read_until_quiet(Duration::from_millis(500), |_| {})
            .await?;
    }
    let check = reader.check(Duration::from_secs(60)).await?;
    println!("{check}");
    reader.delete_queue().await?;
    Ok(if check.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The tallies as lines `election candidate votes`, with the stream's counters.
fn render(tallies: &Tallies, reader: &ResultsReader) -> String {
    let r = &reader.reconstruction;
    let mut out = format!(
        "-- {} events · {} repeats deduped · {} in the starting snapshot\n",
        r.events, r.repeats, r.in_snapshot
    );
    for ((election, candidate), votes) in tallies {
        out.push_str(&format!("{election}\t{candidate}\t{votes}\n"));
    }
    out
}
