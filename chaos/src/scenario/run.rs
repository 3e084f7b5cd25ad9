//! One run of a scenario, in the order the module above describes: start the cluster,
//! publish while the seeded schedule strikes, heal, check recovery, drain, check the
//! invariants, read the dead letters, and write the report.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;
use vote_testkit::checker::{self, CheckOptions};
use vote_testkit::infra::InfraOptions;
use vote_testkit::ledger::Ledger;
use vote_testkit::publish::{Published, SteadyLoad};
use vote_testkit::results::{ResultsCheck, ResultsReader};

use super::{Scenario, ScenarioOptions, workload_spec};
use crate::cluster::{Cluster, ClusterOptions};
use crate::drain::{DRAIN_SETTLE, Endpoints, read_dead_letters, wait_drained};
use crate::load::message_stream;
use crate::nemesis::{Clock, Fault, FaultKind, Nemeses, between};
use crate::report::{ChaosReport, DeadLetters, Recovery};

/// Runs `scenario` and reports. A violated invariant is a report that did not pass.
///
/// # Errors
/// Only when the run could not be carried out at all (Docker, servers or replicas
/// unavailable, a replica build without fault injection).
pub async fn run(scenario: Scenario, opts: &ScenarioOptions) -> anyhow::Result<ChaosReport> {
    let dir = fresh_run_dir(scenario, opts)?;
    eprintln!(
        "chaos {scenario}: seed {} (replay: {}) · logs in {}",
        opts.seed,
        replay_command(scenario, opts),
        dir.display()
    );
    let mut cluster = start_cluster(scenario, opts, &dir).await?;
    // The results consumer binds its queue and takes its snapshot before any load.
    let mut results = start_results_reader(&cluster).await?;

    // Workload.
    let spec = workload_spec(opts);
    let lag = (opts.rate * 2.0) as usize;
    let messages = message_stream(&spec, lag);
    let load = SteadyLoad::start(
        &cluster.bed.amqp_url,
        &cluster.bed.queue,
        opts.seed,
        messages,
        opts.rate,
    );

    // Faults.
    let clock = Clock::start();
    let nemeses = Nemeses::new(opts.heartbeat_secs);
    let mut rng = schedule_rng(scenario, opts.seed);
    let faults = run_schedule(scenario, opts, &nemeses, &mut cluster, &mut rng, &clock).await;
    let last_fault_healed = faults.iter().map(|f| f.healed).max().unwrap_or_default();
    let after_faults = Instant::now();
    if opts.progress {
        eprintln!(
            "  faults over at +{:.1}s; checking recovery, stopping the publisher, draining",
            clock.now().as_secs_f64()
        );
    }

    // Recovery (with the publisher still running), then the checker.
    let recovery = recover(&mut cluster, after_faults).await;
    let mut problems = Vec::new();
    let published = match load.finish(Duration::from_secs(30)).await {
        Ok(p) => p,
        Err(e) => {
            problems.push(format!("publisher failed: {e:#}"));
            Published::default()
        }
    };
    let ledger = &published.ledger;
    // Drain first, with a settle period longer than the service's longest retry backoff
    // (5 s): a replica may hold a batch unacked while it waits to retry its commit, and
    // the queue's "ready" count does not show held deliveries.
    let drained_at = wait_drained(
        &Endpoints::of(&cluster.bed),
        DRAIN_SETTLE,
        opts.drain_timeout,
    )
    .await
    .context("cannot watch the queue drain")?;
    let check = checker::check(
        ledger,
        &cluster.bed.database_url,
        &cluster.bed.amqp_url,
        &CheckOptions {
            // Already drained (or timed out: then this makes the report say so).
            drain_timeout: Duration::from_secs(10),
            settle: Duration::from_secs(1),
        },
    )
    .await
    .context("the checker could not read the system's state")?;
    // From the end of the fault schedule (the last fault healed and verified).
    let drain_after_last_fault = match drained_at {
        Some(at) => at.saturating_duration_since(after_faults),
        None => {
            problems.push(format!(
                "the queue did not drain within {:?} after the faults",
                opts.drain_timeout
            ));
            after_faults.elapsed()
        }
    };
    // Every event of a committed count must reach the consumer (the relays publish what
    // the outbox still holds); it must rebuild vote_statistics exactly.
    let results = match results.check(RESULTS_TIMEOUT).await {
        Ok(check) => check,
        Err(e) => {
            problems.push(format!("the results consumer failed: {e:#}"));
            ResultsCheck::default()
        }
    };
    let dead_letters = match read_dead_letters(&Endpoints::of(&cluster.bed), &published).await {
        Ok(dl) => dl,
        Err(e) => {
            problems.push(format!("cannot read the dead-letter queue: {e:#}"));
            DeadLetters::default()
        }
    };
    let mut report = ChaosReport {
        scenario: scenario.name().to_owned(),
        seed: opts.seed,
        duration: opts.duration,
        broken: opts.broken,
        replicas: opts.replicas,
        rate: opts.rate,
        faults,
        last_fault_healed,
        attempted: published.attempted,
        retried: ledger.retried,
        unconfirmed: published.unconfirmed,
        publisher_connections: published.connections,
        check,
        dead_letters,
        results,
        drain_after_last_fault,
        recovery,
        problems,
        dir: dir.clone(),
        kept: false,
    };
    if let Err(e) = cluster.shutdown().await {
        report
            .problems
            .push(format!("replicas did not shut down cleanly: {e:#}"));
    }
    report.kept = opts.keep || !report.passed();
    keep_or_remove(&report, ledger, &dir);
    Ok(report)
}

/// How long the results check waits for the relays to empty the outbox.
const RESULTS_TIMEOUT: Duration = Duration::from_secs(60);

/// The chaos run's results consumer (every election), once the replicas have migrated
/// (`vote_statistics` exists); retried briefly.
async fn start_results_reader(cluster: &Cluster) -> anyhow::Result<ResultsReader> {
    let started = Instant::now();
    loop {
        match ResultsReader::start(
            &cluster.bed.database_url,
            &cluster.bed.amqp_url,
            "chaos",
            "#",
        )
        .await
        {
            Ok(reader) => return Ok(reader),
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context("cannot start the results consumer")),
        }
    }
}

/// The run's own folder under `opts.out_dir`, emptied: `<scenario>-<seed>[-broken-<bug>]`.
fn fresh_run_dir(scenario: Scenario, opts: &ScenarioOptions) -> anyhow::Result<PathBuf> {
    let label = match opts.broken {
        Some(broken) => format!("{}-{}-broken-{broken}", scenario.name(), opts.seed),
        None => format!("{}-{}", scenario.name(), opts.seed),
    };
    let dir = opts.out_dir.join(&label);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// The command line that replays this run's plan.
fn replay_command(scenario: Scenario, opts: &ScenarioOptions) -> String {
    let mut replay = format!(
        "vote-tools chaos --scenario {scenario} --seed {} --duration {}s --rate {}",
        opts.seed,
        opts.duration.as_secs(),
        opts.rate
    );
    if let Some(broken) = opts.broken {
        replay.push_str(&format!(" --broken {broken}"));
    }
    for setting in &opts.postgres_settings {
        replay.push_str(&format!(" --postgres-setting {setting}"));
    }
    replay
}

/// The cluster a scenario runs on: durable PostgreSQL settings when the scenario crashes
/// the server, and the broken build's switch on every replica when asked for.
async fn start_cluster(
    scenario: Scenario,
    opts: &ScenarioOptions,
    dir: &Path,
) -> anyhow::Result<Cluster> {
    let mut extra_env = Vec::new();
    if let Some(broken) = opts.broken {
        extra_env.push((broken.env().to_owned(), "1".to_owned()));
    }
    Cluster::start(&ClusterOptions {
        replicas: opts.replicas,
        log_dir: dir.to_path_buf(),
        heartbeat_secs: opts.heartbeat_secs,
        extra_env,
        infra: InfraOptions {
            // A crash loses nothing acked only on a durable server: the default settings.
            fsync: scenario.faults().contains(&FaultKind::DbKill),
            postgres_settings: opts.postgres_settings.clone(),
            ..InfraOptions::default()
        },
        broker_cluster: scenario.uses_broker_cluster(),
    })
    .await
}

/// The schedule's random stream: the seed, on a stream of its own per scenario, so that
/// the same seed gives each scenario its own plan and the workload's stream is untouched.
fn schedule_rng(scenario: Scenario, seed: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1 + scenario.index() as u64);
    rng
}

/// Keeps the run's folder with its ledger and report when `report.kept`, else removes it.
fn keep_or_remove(report: &ChaosReport, ledger: &Ledger, dir: &Path) {
    if report.kept {
        let saved = ledger.save(&dir.join("ledger.json")).and_then(|()| {
            std::fs::write(dir.join("report.txt"), format!("{report}\n"))
                .context("cannot write report.txt")
        });
        if let Err(e) = saved {
            eprintln!("warning: {e:#}");
        }
    } else if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("warning: cannot remove {}: {e}", dir.display());
    }
}

/// Strikes faults on the scenario's seeded schedule until `opts.duration` is used up.
async fn run_schedule(
    scenario: Scenario,
    opts: &ScenarioOptions,
    nemeses: &Nemeses,
    cluster: &mut Cluster,
    rng: &mut ChaCha8Rng,
    clock: &Clock,
) -> Vec<Fault> {
    let kinds = scenario.faults();
    let (lo, hi) = scenario.cadence_secs();
    let breather = Duration::from_millis(500);
    let mut faults: Vec<Fault> = Vec::new();
    let mut bag: Vec<FaultKind> = Vec::new();
    // Let the load build up before the first fault.
    let mut next = between(rng, 1.0, 2.0);
    let mut previous: Option<FaultKind> = None;
    while next < opts.duration {
        let now = clock.now();
        if now < next {
            tokio::time::sleep(next - now).await;
        }
        if bag.is_empty() {
            bag = kinds.to_vec();
            bag.shuffle(rng);
            // Never the same kind twice in a row across rounds either (so a short
            // broker-restart run has both the graceful and the hard variant).
            if bag.len() > 1 && bag.last() == previous.as_ref() {
                let last = bag.len() - 1;
                bag.swap(0, last);
            }
        }
        let Some(kind) = bag.pop() else { break };
        previous = Some(kind);
        // Each fault starts from a recovered system (after a broker restart the replicas
        // reconnect with up to 5 s of backoff): a pause or a partition of a replica that
        // has no session yet would prove nothing. A replica that never gets ready shows
        // up as an unverified fault or in the final recovery check.
        let _ = cluster.fleet.wait_all_ready(Duration::from_secs(60)).await;
        let started = clock.now();
        let companions = scenario.companions();
        let struck = if companions.is_empty() {
            vec![nemeses.strike(kind, cluster, rng, clock).await]
        } else {
            let companion = companions[rng.random_range(0..companions.len())];
            nemeses
                .strike_together(kind, companion, cluster, rng, clock)
                .await
        };
        for fault in struck {
            if opts.progress {
                print_fault(&fault);
            }
            faults.push(fault);
        }
        next = (started + between(rng, lo, hi)).max(clock.now() + breather);
    }
    faults
}

/// One line per fault on stderr, as it happens.
fn print_fault(fault: &Fault) {
    let text = match &fault.outcome {
        Ok(e) => format!("ok  {e}"),
        Err(e) => format!("NOT VERIFIED: {e}"),
    };
    eprintln!(
        "  +{:>6.1}s {:<21} {:<16} {}{}",
        fault.at.as_secs_f64(),
        fault.kind.name(),
        fault.target,
        text,
        fault
            .heal_error
            .as_deref()
            .map(|e| format!(" · NO RECOVERY: {e}"))
            .unwrap_or_default()
    );
}

/// Waits (bounded) until every replica answers `/readyz` 200, without restarting any;
/// records for each how long after `since` (the end of the faults) it was ready.
async fn recover(cluster: &mut Cluster, since: Instant) -> Vec<Recovery> {
    let mut out = Vec::with_capacity(cluster.replicas());
    for i in 0..cluster.replicas() {
        let replica = cluster.fleet.name(i).to_owned();
        let ready = if !cluster.fleet.is_running(i) {
            Err(format!(
                "not running (last exit: {:?})",
                cluster.fleet.exit_status(i)
            ))
        } else if cluster.fleet.is_paused(i) {
            Err("still paused".to_owned())
        } else {
            cluster
                .fleet
                .wait_ready(i, Duration::from_secs(60))
                .await
                .map(|()| since.elapsed())
                .map_err(|e| format!("{e:#}").replace('\n', " | "))
        };
        out.push(Recovery { replica, ready });
    }
    out
}
