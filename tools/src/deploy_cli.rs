//! `vote-tools deploy-test`: the deployment test on the Docker Compose stack (see
//! [`vote_chaos::deploy`]). Prints each step as it goes, then the report and one summary
//! line. Exit code 0 when it passed, 1 when not.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use vote_chaos::deploy::{self, DeployOptions};

/// The options of `vote-tools deploy-test`.
#[derive(Args)]
pub struct DeployTestArgs {
    /// The service image the stack starts with and rolls back to (must exist locally;
    /// `make image` builds it).
    #[arg(long, default_value = "vote-aggregator:latest")]
    image: String,
    /// Messages published per second during the steps.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seed of the workload (random when not given).
    #[arg(long)]
    seed: Option<u64>,
    /// Folder for the compose logs, the secrets and the report.
    #[arg(long, default_value = "target/deploy")]
    out_dir: PathBuf,
    /// The repository holding docker-compose.yml (default: the working directory).
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Leave the stack running at the end (remove it with its project name:
    /// `COMPOSE_PROJECT_NAME=<project> deploy/compose.sh down -v`).
    #[arg(long)]
    keep: bool,
}

/// Runs the deployment test.
///
/// # Errors
/// When it could not start at all.
pub async fn run(args: DeployTestArgs) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let repo = std::path::absolute(&args.repo)?;
    let out_dir = std::path::absolute(&args.out_dir)?;
    let opts = DeployOptions {
        repo,
        out_dir,
        image: args.image,
        rate: args.rate,
        seed,
        keep: args.keep,
    };
    let report = tokio::select! {
        report = deploy::run(&opts) => report?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: removing compose project {}", deploy::project_name());
            if let Err(e) = deploy::tear_down(&opts).await {
                eprintln!("error: {e:#}");
            }
            return Ok(ExitCode::from(130));
        }
    };
    println!("{report}");
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
