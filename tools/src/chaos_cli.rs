//! `vote-tools chaos`: runs chaos scenarios against real replicas on private containers
//! and prints a Jepsen-style report per scenario. Exit code 0 when every scenario passed,
//! 1 when one failed or could not run, 2 on bad usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use vote_chaos::scenario::{self, Broken, Scenario, ScenarioOptions};

/// The options of `vote-tools chaos`.
#[derive(Args)]
pub struct ChaosArgs {
    /// Scenario to run, `all` (the single-broker ones) or `cluster` (the broker-cluster
    /// ones: three RabbitMQ nodes each).
    #[arg(long)]
    scenario: String,
    /// How long faults are injected, e.g. 60s, 2m, 90 (seconds). The run takes longer:
    /// containers start first, the queue drains after.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the workload and the fault schedule (printed when chosen at random).
    #[arg(long)]
    seed: Option<u64>,
    /// Replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Messages published per second.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// How long the checker waits for the queue to drain after the faults.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Folder for each run's logs, ledger and report (default: `<target>/chaos`).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Keep each run's folder even when it passed.
    #[arg(long)]
    keep: bool,
    /// Run a deliberately BROKEN aggregator: `ack-before-commit` (the default; caught by
    /// kill-restart and commit-ack) or `synchronous-commit-off` (caught by db-kill). The
    /// scenarios should FAIL, which proves the suite catches the bug it exists for.
    #[arg(long, value_name = "BUG", num_args = 0..=1, default_missing_value = "ack-before-commit")]
    broken: Option<Broken>,
    /// An extra PostgreSQL setting for the scenario's server, `name=value` (repeatable),
    /// e.g. `--postgres-setting wal_writer_delay=1000ms`.
    #[arg(long, value_name = "NAME=VALUE")]
    postgres_setting: Vec<String>,
}

/// Parses `60s`, `2m`, `1500ms` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => s.split_at(at),
        None => (s, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 60s, 2m, 1500ms)"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Runs the chosen scenarios one after another and prints each report and a summary.
///
/// # Errors
/// None of its own: a scenario that cannot run is reported and counted as failed.
pub async fn run(cli: ChaosArgs) -> anyhow::Result<ExitCode> {
    let scenarios: Vec<Scenario> = if cli.scenario == "all" {
        Scenario::ALL.to_vec()
    } else if cli.scenario == "cluster" {
        Scenario::CLUSTER.to_vec()
    } else {
        match cli.scenario.parse() {
            Ok(s) => vec![s],
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
        }
    };
    if !(cli.rate > 0.0 && cli.rate.is_finite()) {
        eprintln!("error: --rate must be a positive number of messages per second");
        return Ok(ExitCode::from(2));
    }
    let seed = cli.seed.unwrap_or_else(rand::random);
    eprintln!("vote-tools chaos: seed {seed} (replay with --seed {seed})");
    let mut opts = ScenarioOptions::new(cli.duration, seed);
    opts.replicas = cli.replicas;
    opts.rate = cli.rate;
    opts.drain_timeout = cli.drain_timeout;
    opts.keep = cli.keep;
    opts.broken = cli.broken;
    opts.postgres_settings = cli.postgres_setting;
    opts.progress = true;
    if let Some(dir) = cli.out_dir {
        opts.out_dir = dir;
    }
    let mut summaries = Vec::new();
    for scenario in scenarios {
        match scenario::run(scenario, &opts).await {
            Ok(report) => {
                println!("{report}\n");
                summaries.push((report.passed(), report.summary()));
            }
            Err(e) => {
                eprintln!("error: scenario {scenario} could not run: {e:#}");
                summaries.push((false, format!("{scenario} seed {seed}: ERROR: {e:#}")));
            }
        }
    }
    println!("=== chaos summary (seed {seed}) ===");
    for (_, line) in &summaries {
        println!("{line}");
    }
    Ok(if summaries.iter().all(|(passed, _)| *passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("s").is_err());
    }
}
