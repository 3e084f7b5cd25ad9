//! The `vote-tools` command line: its arguments (also read from the environment and
//! `.env`, like the service) and what each command does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use vote_aggregator::config::DEFAULT_QUEUE_NAME;
use vote_aggregator::config::variables as var;
use vote_testkit::checker::{self, CheckOptions};
use vote_testkit::ledger::Ledger;
use vote_testkit::publish::{self, PublishOptions};
use vote_testkit::workload::{Workload, WorkloadSpec};

/// Test and operations tool for vote-aggregator: publish test votes, check that they were
/// counted exactly once, measure capacity, run a demo of the whole system, run the chaos
/// suite.
#[derive(Parser)]
#[command(name = "vote-tools", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish test votes (persistent, with publisher confirms) to the votes queue.
    ///
    /// A vote counts as published only once the broker confirmed it; unconfirmed
    /// publishes are retried (which itself creates duplicates the system must absorb).
    /// Example: `vote-tools publish -n 10`, then `SELECT * FROM vote_statistics`.
    Publish(PublishArgs),
    /// Check a finished run against its ledger: waits for the queue to drain, then checks
    /// the four invariants. Exit 0 when all hold, 1 with the first offending ids when not.
    Check(CheckArgs),
    /// Measure capacity baselines against this machine's own ceilings (broker alone,
    /// database alone), for replicas x batch sizes x queue types, on fresh containers
    /// with fsync on. Writes report.json, report.md and throughput.png to --out.
    Load(LoadArgs),
    /// Start PostgreSQL, RabbitMQ and 3 replicas, publish 20 000 votes with duplicates and
    /// malformed ones, and show the results. Leaves nothing running unless --keep.
    Demo(DemoArgs),
    /// Run chaos scenarios: faults injected on a seeded schedule into real replicas under
    /// steady load, then the exactly-once checker.
    ///
    /// Scenarios: kill-restart, zombie-pause, broker-restart, db-restart, db-kill,
    /// backend-terminate, partition, commit-ack, relay-confirm, mixed (or all). The replicas are the
    /// fault-injection build that `make fault-build` puts in
    /// target/<profile>/fault-injection/. Needs Docker and the server images (see
    /// `make images`). Exit 0 when every scenario passed, 1 when one failed, 2 on bad usage.
    #[command(long_about)]
    Chaos(crate::chaos_cli::ChaosArgs),
    /// Run the deployment test on the Docker Compose stack: kill, crash, scale 3 → 5 → 2
    /// → 3, rolling upgrade and rollback, RabbitMQ and PostgreSQL restarts, under a steady
    /// confirmed publisher; then the exactly-once checker, `verify` and Prometheus.
    ///
    /// Runs `deploy/compose.sh` on its own project name (only what it started is
    /// removed). Needs Docker, Compose and the images (`make deploy-test` builds them).
    /// Logs, secrets and report.txt go to --out-dir. Exit 0 when it passed, 1 when not.
    #[command(long_about)]
    DeployTest(crate::deploy_cli::DeployTestArgs),
    /// Read the results stream (the `votes.results` exchange) like a downstream consumer:
    /// rebuild every tally from a snapshot of `vote_statistics` plus the events after it,
    /// each event once (see docs/RESULTS.md).
    ///
    /// `--follow` prints the tallies whenever they change; `--check` follows for
    /// `--seconds`, then compares the reconstruction with `vote_statistics` exactly and
    /// exits 0 when equal, 1 naming the first differing candidate.
    #[command(long_about)]
    Results(crate::results_cli::ResultsArgs),
}

#[derive(Args)]
struct Broker {
    /// RabbitMQ URL.
    #[arg(long, env = var::AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// Queue the aggregator consumes.
    #[arg(long, env = var::QUEUE_NAME, default_value = DEFAULT_QUEUE_NAME)]
    queue: String,
}

#[derive(Args)]
struct PublishArgs {
    #[command(flatten)]
    broker: Broker,
    /// Distinct votes to publish.
    #[arg(short = 'n', long = "votes", default_value_t = 10)]
    votes: usize,
    /// Elections the votes are spread over.
    #[arg(long, default_value_t = 1)]
    elections: usize,
    /// Candidates per election (skewed: candidate k gets weight 1/(k+1)).
    #[arg(long, default_value_t = 4)]
    candidates: usize,
    /// Precincts per election.
    #[arg(long, default_value_t = 10)]
    precincts: usize,
    /// Messages per second (default: as fast as confirms allow).
    #[arg(long)]
    rate: Option<f64>,
    /// Share of votes published again (0..1): some immediately, some late.
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,
    /// Share of those republished with another candidate, to provoke conflicts (0..1).
    #[arg(long, default_value_t = 0.1)]
    conflict_share: f64,
    /// Share of the exact duplicates held back and sent after everything else (0..1).
    #[arg(long, default_value_t = 0.5)]
    late_share: f64,
    /// Pause before the late duplicates, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    late_delay_ms: u64,
    /// Malformed messages, as a share of the votes (0..1).
    #[arg(long, default_value_t = 0.0)]
    malformed: f64,
    /// Publishing connections (a vote and its immediate duplicate leave on different
    /// connections, so replicas race on them).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Seed of every random choice (the same seed publishes the same votes).
    #[arg(long)]
    seed: Option<u64>,
    /// Write what was confirmed to this file, for `vote-tools check`.
    #[arg(long)]
    ledger: Option<PathBuf>,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    broker: Broker,
    /// PostgreSQL URL of the aggregator's database.
    #[arg(long, env = var::DATABASE_URL, hide_env_values = true)]
    database_url: String,
    /// Ledger written by `vote-tools publish --ledger`.
    #[arg(long)]
    ledger: PathBuf,
    /// Seconds to wait for the queue to drain before failing.
    #[arg(long, default_value_t = 120)]
    drain_timeout: u64,
}

#[derive(Args)]
struct LoadArgs {
    /// Distinct votes pre-filled for each configuration.
    #[arg(short = 'n', long = "votes", default_value_t = 200_000)]
    votes: usize,
    /// Share of votes published twice in the pre-fill.
    #[arg(long, default_value_t = 0.1)]
    duplicates: f64,
    /// Replica counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    replicas: Vec<usize>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,500,1000")]
    batch_sizes: Vec<usize>,
    /// Queue types, comma-separated (quorum, classic).
    #[arg(long, value_delimiter = ',', default_value = "classic,quorum")]
    queue_types: Vec<String>,
    /// Seconds of the steady-rate latency phase.
    #[arg(long, default_value_t = 10)]
    steady_seconds: u64,
    /// PREFETCH_COUNT as a multiple of the batch size (the service's default is 2).
    #[arg(long, default_value_t = 2)]
    prefetch_factor: usize,
    /// Against a three-node RabbitMQ cluster (the queue replicated on all three nodes)
    /// instead of one broker.
    #[arg(long)]
    broker_cluster: bool,
    /// Output folder.
    #[arg(long, default_value = "target/load")]
    out: PathBuf,
    /// Workload seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Reach the servers through Docker's port proxy and the test kit's fault proxies
    /// (the old data path) instead of the host network: to show what it costs.
    #[arg(long)]
    via_port_proxy: bool,
    /// Also measure a second floor that writes each batch with the aggregator's own batch
    /// write (tally, results outbox, conflict judging, memory of recent votes) instead of
    /// the bare INSERT: splits the gap to the floor into that write and the replica's
    /// process.
    #[arg(long)]
    floor_with_aggregator_write: bool,
    /// Measure the whole matrix (ceilings, floor, configurations) this many times, one
    /// round after the other; each configuration reports the round with its median ratio
    /// to the floor, and the range over the rounds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    rounds: u32,
    /// Set a service variable on every replica, e.g. `--replica-env RESULTS_RELAY=false`
    /// (repeatable): to measure a setting. Not the ones the runner sets per configuration
    /// (URLs, queue, batch size, prefetch, metrics address, replica id).
    #[arg(long = "replica-env", value_name = "NAME=VALUE", value_parser = crate::load::parse_replica_env)]
    replica_env: Vec<(String, String)>,
}

#[derive(Args)]
struct DemoArgs {
    /// Leave the servers and replicas running and print how to connect.
    #[arg(long)]
    keep: bool,
    /// Distinct votes to publish.
    #[arg(short = 'n', long = "votes", default_value_t = 20_000)]
    votes: usize,
    /// Replicas to run.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Seed of the workload.
    #[arg(long)]
    seed: Option<u64>,
}

/// Runs the parsed command line; its result is the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    // A .env file is optional; a malformed one is reported.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: cannot read .env: {e}");
        return ExitCode::FAILURE;
    }
    // The chaos publisher's own connection errors during broker faults are expected:
    // lapin's error logs about them would only be noise.
    let filter = match cli.command {
        Command::Chaos(_) | Command::DeployTest(_) => "warn,lapin=off",
        _ => "warn",
    };
    vote_aggregator::telemetry::init(vote_aggregator::config::log_format_from_env(), filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
        match cli.command {
            Command::Publish(args) => publish_cmd(args).await,
            Command::Check(args) => check_cmd(args).await,
            Command::Load(args) => load_cmd(args).await,
            Command::Demo(args) => {
                crate::demo::run(args.votes, args.replicas, seed(args.seed), args.keep).await
            }
            Command::Chaos(args) => crate::chaos_cli::run(args).await,
            Command::DeployTest(args) => crate::deploy_cli::run(args).await,
            Command::Results(args) => crate::results_cli::run(args).await,
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

/// The given seed, or a fresh one (printed by the caller so the run can be replayed).
pub(crate) fn seed(given: Option<u64>) -> u64 {
    given.unwrap_or_else(rand::random)
}

async fn publish_cmd(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let spec = WorkloadSpec {
        votes: args.votes,
        elections: args.elections,
        candidates: args.candidates,
        precincts: args.precincts,
        duplicates: args.duplicates,
        conflict_share: args.conflict_share,
        late_share: args.late_share,
        malformed: args.malformed,
        seed: seed(args.seed),
    };
    spec.validate()?;
    if args.votes == 0 {
        anyhow::bail!("-n/--votes must be at least 1");
    }
    if let Some(rate) = args.rate
        && !(rate > 0.0 && rate.is_finite())
    {
        anyhow::bail!("--rate must be a positive number of messages per second, got {rate}");
    }
    if args.connections == 0 || args.connections > 64 {
        anyhow::bail!(
            "--connections must be from 1 to 64, got {}",
            args.connections
        );
    }
    eprintln!("seed {} (replay with --seed {})", spec.seed, spec.seed);
    let workload = Workload::generate(&spec);
    let options = PublishOptions {
        rate: args.rate,
        connections: args.connections,
        progress: true,
        ..PublishOptions::default()
    };
    let mut ledger = Ledger::new(&args.broker.queue, spec.seed);
    let url = &args.broker.amqp_url;
    let late_delay = Duration::from_millis(args.late_delay_ms);
    publish::publish_workload(
        url,
        &args.broker.queue,
        &workload,
        &options,
        &mut ledger,
        async |_| {
            tokio::time::sleep(late_delay).await;
            Ok(())
        },
    )
    .await?;
    println!(
        "published {} votes (confirmed) · duplicates {} · conflicting copies {} · malformed {} · retried {} · attempted {} · indeterminate {}",
        ledger.votes.len(),
        ledger.duplicates_sent,
        ledger.conflicts.len(),
        ledger.malformed,
        ledger.retried,
        ledger.attempted.len(),
        ledger.indeterminate().count()
    );
    if let Some(path) = &args.ledger {
        ledger.save(path)?;
        println!("ledger written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn load_cmd(args: LoadArgs) -> anyhow::Result<ExitCode> {
    use vote_aggregator::config::QueueType;
    if args.votes < 1_000 {
        anyhow::bail!(
            "--votes must be at least 1000 for a meaningful rate, got {}",
            args.votes
        );
    }
    if !(0.0..=1.0).contains(&args.duplicates) {
        anyhow::bail!(
            "--duplicates must be a fraction from 0 to 1, got {}",
            args.duplicates
        );
    }
    if args.replicas.iter().any(|&r| r == 0 || r > 16) {
        anyhow::bail!("--replicas must each be from 1 to 16");
    }
    if !(1..=20).contains(&args.prefetch_factor) {
        anyhow::bail!(
            "--prefetch-factor must be from 1 to 20, got {}",
            args.prefetch_factor
        );
    }
    if args.batch_sizes.iter().any(|&b| b == 0 || b > 10_000) {
        anyhow::bail!("--batch-sizes must each be from 1 to 10000");
    }
    let queue_types = args
        .queue_types
        .iter()
        .map(|q| {
            q.parse::<QueueType>()
                .map_err(|()| anyhow::anyhow!("--queue-types: '{q}' is not quorum or classic"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options = crate::load::LoadOptions {
        votes: args.votes,
        duplicates: args.duplicates,
        replicas: args.replicas,
        batch_sizes: args.batch_sizes,
        queue_types,
        steady: Duration::from_secs(args.steady_seconds),
        prefetch_factor: args.prefetch_factor,
        broker_cluster: args.broker_cluster,
        out_dir: args.out.clone(),
        seed: seed(args.seed),
        progress: true,
        via_port_proxy: args.via_port_proxy,
        floor_with_aggregator_write: args.floor_with_aggregator_write,
        rounds: args.rounds as usize,
        replica_env: args.replica_env,
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let report = crate::load::run(&options, command).await?;
    println!("{}", crate::load_report::table(&report));
    for line in crate::load_report::targets(&report) {
        println!("{line}");
    }
    let written = crate::load_report::write_all(&report, &args.out)?;
    println!("wrote {}", written.json.display());
    println!("wrote {}", written.markdown.display());
    if let Some(chart) = written.chart {
        println!("wrote {}", chart.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn check_cmd(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let ledger = Ledger::load(&args.ledger)?;
    if ledger.queue != args.broker.queue {
        eprintln!(
            "note: checking queue '{}' recorded in the ledger (QUEUE_NAME is '{}')",
            ledger.queue, args.broker.queue
        );
    }
    let options = CheckOptions {
        drain_timeout: Duration::from_secs(args.drain_timeout),
        ..CheckOptions::default()
    };
    let report = checker::check(&ledger, &args.database_url, &args.broker.amqp_url, &options)
        .await
        .context("cannot read the system's state")?;
    println!("{report}");
    let secs = report.drain_time.as_secs_f64();
    println!(
        "drained in {secs:.1}s after the check started ({:.0} confirmed votes/s over that time)",
        report.published as f64 / secs.max(0.001)
    );
    let violations = report.violations();
    if violations.is_empty() {
        println!("PASS: every invariant holds");
        Ok(ExitCode::SUCCESS)
    } else {
        for v in violations {
            println!("FAIL: {v}");
        }
        Ok(ExitCode::FAILURE)
    }
}
