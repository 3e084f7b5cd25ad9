//! Scenarios: a workload + a seeded fault schedule + the checker, on a private cluster.
//!
//! This module owns the shape of a run, the same for every scenario:
//! 1. start a [`Cluster`] (private servers, replicas behind their own proxies) in a
//!    folder named after the scenario and seed;
//! 2. publish a seeded stream at a steady rate (duplicates, conflicts, ~1 % malformed,
//!    quorum queue, confirms, retries) for as long as the faults last;
//! 3. strike faults on the scenario's seeded schedule until the duration is used up (a
//!    fault in progress is finished and healed);
//! 4. stop the publisher (it flushes its unconfirmed messages), assert that every replica
//!    recovers by itself (`/readyz` 200), run the exactly-once checker (drain timeout),
//!    read the dead-letter queue;
//! 5. report; keep logs, ledger and report when the run failed.
//!
//! The seed drives the workload and every random choice of the schedule (which fault,
//! which replica, how long), so `--seed` replays the same plan. Timing of the system
//! itself is of course not replayed.

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use rand::SeedableRng as _;
use rand::seq::SliceRandom as _;
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;
use vote_testkit::checker::{self, CheckOptions};
use vote_testkit::infra::InfraOptions;
use vote_testkit::inspect::{Broker, Db};
use vote_testkit::publish::{Published, SteadyLoad};
use vote_testkit::workload::WorkloadSpec;

use crate::cluster::{Cluster, ClusterOptions};
use crate::load::message_stream;
use crate::nemesis::{Clock, Fault, FaultKind, Nemeses, between};
use crate::report::{ChaosReport, DeadLetters, Recovery};

use vote_aggregator::fault::{ACK_BEFORE_COMMIT_ENV, SYNCHRONOUS_COMMIT_OFF_ENV};

/// A deliberately broken aggregator (a fault-injection build with one of its switches
/// on): a scenario run against it must FAIL, which proves the suite catches that bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Broken {
    /// Acks each batch when its transaction starts, before COMMIT: a replica crash loses
    /// votes (caught by `kill-restart` and `commit-ack`).
    AckBeforeCommit,
    /// Commits with `synchronous_commit=off`: a database crash right after an ack loses
    /// votes (caught by `db-kill`).
    SynchronousCommitOff,
}

impl Broken {
    /// Every kind.
    pub const ALL: [Broken; 2] = [Broken::AckBeforeCommit, Broken::SynchronousCommitOff];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Broken::AckBeforeCommit => "ack-before-commit",
            Broken::SynchronousCommitOff => "synchronous-commit-off",
        }
    }

    /// The replica environment variable that switches it on (to `1`).
    pub fn env(self) -> &'static str {
        match self {
            Broken::AckBeforeCommit => ACK_BEFORE_COMMIT_ENV,
            Broken::SynchronousCommitOff => SYNCHRONOUS_COMMIT_OFF_ENV,
        }
    }
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Broken {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        by_name(&Broken::ALL, Broken::name, s, "broken build", "")
    }
}

/// A named scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// A SIGKILL every 2–5 s across the replicas, each restarted after a moment.
    KillRestart,
    /// Replicas frozen past the heartbeat timeout, then resumed (zombies commit late).
    ZombiePause,
    /// RabbitMQ restarted under load, gracefully and hard (SIGKILL).
    BrokerRestart,
    /// PostgreSQL restarted under load.
    DbRestart,
    /// PostgreSQL SIGKILLed right after acks (fsync and synchronous commit on), then
    /// recovered from its WAL.
    DbKill,
    /// Every replica session terminated with `pg_terminate_backend`, repeatedly.
    BackendTerminate,
    /// One replica at a time cut off from the broker or the database.
    Partition,
    /// A replica killed exactly between COMMIT and ack (fault-injection hook).
    CommitAck,
    /// All of the above, interleaved.
    Mixed,
}

impl Scenario {
    /// Every scenario, in the order `all` runs them.
    pub const ALL: [Scenario; 9] = [
        Scenario::KillRestart,
        Scenario::ZombiePause,
        Scenario::BrokerRestart,
        Scenario::DbRestart,
        Scenario::DbKill,
        Scenario::BackendTerminate,
        Scenario::Partition,
        Scenario::CommitAck,
        Scenario::Mixed,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::KillRestart => "kill-restart",
            Scenario::ZombiePause => "zombie-pause",
            Scenario::BrokerRestart => "broker-restart",
            Scenario::DbRestart => "db-restart",
            Scenario::DbKill => "db-kill",
            Scenario::BackendTerminate => "backend-terminate",
            Scenario::Partition => "partition",
            Scenario::CommitAck => "commit-ack",
            Scenario::Mixed => "mixed",
        }
    }

    /// The kinds of fault it injects. The schedule deals them from a seeded shuffle
    /// bag: every kind once per round, in random order, so a long enough run sees all.
    pub fn faults(self) -> &'static [FaultKind] {
        match self {
            Scenario::KillRestart => &[FaultKind::Kill],
            Scenario::ZombiePause => &[FaultKind::Pause],
            Scenario::BrokerRestart => &[FaultKind::BrokerRestart, FaultKind::BrokerKill],
            Scenario::DbRestart => &[FaultKind::DatabaseRestart],
            Scenario::DbKill => &[FaultKind::DbKill],
            Scenario::BackendTerminate => &[FaultKind::BackendTerminate],
            Scenario::Partition => &[FaultKind::Partition],
            Scenario::CommitAck => &[FaultKind::CommitAck],
            Scenario::Mixed => &[
                FaultKind::Kill,
                FaultKind::Pause,
                FaultKind::BrokerRestart,
                FaultKind::BrokerKill,
                FaultKind::DatabaseRestart,
                FaultKind::DbKill,
                FaultKind::BackendTerminate,
                FaultKind::Partition,
                FaultKind::CommitAck,
            ],
        }
    }

    /// Seconds between the starts of two faults (min, max); a fault that takes longer
    /// is followed by the next one after a short breather.
    pub fn cadence_secs(self) -> (f64, f64) {
        match self {
            Scenario::KillRestart => (2.0, 5.0),
            Scenario::ZombiePause => (8.0, 11.0),
            Scenario::BrokerRestart | Scenario::DbRestart | Scenario::DbKill => (4.0, 8.0),
            Scenario::BackendTerminate => (1.0, 3.0),
            Scenario::Partition => (4.0, 7.0),
            Scenario::CommitAck => (3.0, 6.0),
            Scenario::Mixed => (2.0, 5.0),
        }
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        by_name(&Scenario::ALL, Scenario::name, s, "scenario", " or all")
    }
}

/// The member of `all` called `s`, or an error listing every name (and `also`).
fn by_name<T: Copy>(
    all: &[T],
    name: fn(T) -> &'static str,
    s: &str,
    what: &str,
    also: &str,
) -> anyhow::Result<T> {
    all.iter()
        .copied()
        .find(|x| name(*x) == s)
        .with_context(|| {
            let names: Vec<&str> = all.iter().map(|x| name(*x)).collect();
            format!(
                "unknown {what} {s:?}: use one of {}{also}",
                names.join(", ")
            )
        })
}

/// How to run a scenario.
#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    /// How long faults are injected (the workload runs as long).
    pub duration: Duration,
    /// Seed of the workload and the schedule.
    pub seed: u64,
    /// Replicas (at least 2).
    pub replicas: usize,
    /// Messages published per second.
    pub rate: f64,
    /// How long the checker waits for the queue to drain after the faults.
    pub drain_timeout: Duration,
    /// Parent of the per-run folder `<scenario>-<seed>`.
    pub out_dir: PathBuf,
    /// Keep the run's folder even when it passed.
    pub keep: bool,
    /// Run a deliberately broken aggregator: the run should FAIL.
    pub broken: Option<Broken>,
    /// More PostgreSQL settings (`name=value`) for the scenario's server.
    pub postgres_settings: Vec<String>,
    /// `AMQP_HEARTBEAT_SECONDS` of the replicas.
    pub heartbeat_secs: u16,
    /// Print each fault as it happens (to stderr).
    pub progress: bool,
}

impl ScenarioOptions {
    /// Defaults for a run of `duration` with `seed`: 3 replicas, 500 msg/s, 120 s drain
    /// timeout, 2 s heartbeat, folder under [`default_out_dir`].
    pub fn new(duration: Duration, seed: u64) -> Self {
        ScenarioOptions {
            duration,
            seed,
            replicas: 3,
            rate: 500.0,
            drain_timeout: Duration::from_secs(120),
            out_dir: default_out_dir(),
            keep: false,
            broken: None,
            postgres_settings: Vec::new(),
            heartbeat_secs: 2,
            progress: false,
        }
    }
}

/// `<target dir>/chaos`, found from the current executable (`target/<profile>/…` or
/// `target/<profile>/deps/…`); `./target/chaos` when that fails.
pub fn default_out_dir() -> PathBuf {
    let fallback = PathBuf::from("target").join("chaos");
    let Ok(exe) = std::env::current_exe() else {
        return fallback;
    };
    let mut dir = exe.parent();
    if dir
        .and_then(|d| d.file_name())
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir = dir.and_then(|d| d.parent());
    }
    // `dir` is target/<profile>; its parent is the target directory.
    dir.and_then(|d| d.parent())
        .map(|t| t.join("chaos"))
        .unwrap_or(fallback)
}

/// The workload of a run: enough votes for `rate` × (duration + margin) messages.
fn workload_spec(opts: &ScenarioOptions) -> WorkloadSpec {
    let (duplicates, malformed) = (0.15, 0.01);
    let messages = opts.rate * (opts.duration.as_secs_f64() + 20.0);
    WorkloadSpec {
        votes: (messages / (1.0 + duplicates + malformed)).ceil() as usize,
        elections: 2,
        candidates: 5,
        precincts: 20,
        duplicates,
        conflict_share: 0.1,
        late_share: 0.4,
        malformed,
        seed: opts.seed,
    }
}

/// Runs `scenario` and reports. A violated invariant is a report that did not pass.
///
/// # Errors
/// Only when the run could not be carried out at all (Docker, servers or replicas
/// unavailable, a replica build without fault injection).
pub async fn run(scenario: Scenario, opts: &ScenarioOptions) -> anyhow::Result<ChaosReport> {
    let label = match opts.broken {
        Some(broken) => format!("{}-{}-broken-{broken}", scenario.name(), opts.seed),
        None => format!("{}-{}", scenario.name(), opts.seed),
    };
    let dir = opts.out_dir.join(&label);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
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
    eprintln!(
        "chaos {scenario}: seed {} (replay: {replay}) · logs in {}",
        opts.seed,
        dir.display()
    );

    let mut extra_env = Vec::new();
    if let Some(broken) = opts.broken {
        extra_env.push((broken.env().to_owned(), "1".to_owned()));
    }
    let mut cluster = Cluster::start(&ClusterOptions {
        replicas: opts.replicas,
        log_dir: dir.clone(),
        heartbeat_secs: opts.heartbeat_secs,
        extra_env,
        infra: InfraOptions {
            // A crash loses nothing acked only on a durable server: the default settings.
            fsync: scenario.faults().contains(&FaultKind::DbKill),
            postgres_settings: opts.postgres_settings.clone(),
            ..InfraOptions::default()
        },
    })
    .await?;

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
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    rng.set_stream(
        1 + Scenario::ALL
            .iter()
            .position(|s| *s == scenario)
            .unwrap_or(0) as u64,
    );
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
    let drained_at = wait_drained(&cluster, DRAIN_SETTLE, opts.drain_timeout)
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
    let dead_letters = match read_dead_letters(&cluster, &published).await {
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
    if report.kept {
        let saved = ledger.save(&dir.join("ledger.json")).and_then(|()| {
            std::fs::write(dir.join("report.txt"), format!("{report}\n"))
                .context("cannot write report.txt")
        });
        if let Err(e) = saved {
            eprintln!("warning: {e:#}");
        }
    } else if let Err(e) = std::fs::remove_dir_all(&dir) {
        eprintln!("warning: cannot remove {}: {e}", dir.display());
    }
    Ok(report)
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
        let fault = nemeses.strike(kind, cluster, rng, clock).await;
        if opts.progress {
            let text = match &fault.outcome {
                Ok(e) => format!("ok  {e}"),
                Err(e) => format!("NOT VERIFIED: {e}"),
            };
            eprintln!(
                "  +{:>6.1}s {:<17} {:<16} {}{}",
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
        faults.push(fault);
        next = (started + between(rng, lo, hi)).max(clock.now() + breather);
    }
    faults
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

/// How long the queue must stay empty and the stored counts unchanged to call the system
/// drained: longer than the service's longest commit retry backoff (5 s).
const DRAIN_SETTLE: Duration = Duration::from_secs(6);

/// Waits until the queue is empty and the stored votes and conflicts stopped changing for
/// `settle`. Returns the moment the system drained (the later of the last change and
/// the queue becoming empty), or `None` after `timeout`.
async fn wait_drained(
    cluster: &Cluster,
    settle: Duration,
    timeout: Duration,
) -> anyhow::Result<Option<Instant>> {
    let mut db = Db::connect(&cluster.bed.database_url).await?;
    let broker = Broker::connect(&cluster.bed.amqp_url).await?;
    let started = Instant::now();
    let mut last = None;
    let mut changed_at = Instant::now();
    let mut empty_since: Option<Instant> = None;
    loop {
        let (ready, _) = broker.queue_state(&cluster.bed.queue).await?;
        let counts = (
            db.vote_count().await.unwrap_or(-1),
            db.conflict_count().await.unwrap_or(-1),
        );
        let now = Instant::now();
        if last != Some(counts) {
            last = Some(counts);
            changed_at = now;
        }
        empty_since = if ready == 0 {
            empty_since.or(Some(now))
        } else {
            None
        };
        if let Some(empty) = empty_since
            && now.duration_since(changed_at) >= settle
            && now.duration_since(empty) >= settle
        {
            return Ok(Some(changed_at.max(empty)));
        }
        if started.elapsed() >= timeout {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes every message from the dead-letter queue and matches it against what was
/// published.
async fn read_dead_letters(
    cluster: &Cluster,
    published: &Published,
) -> anyhow::Result<DeadLetters> {
    let broker = Broker::connect(&cluster.bed.amqp_url).await?;
    let letters = broker
        .drain(&cluster.bed.dead_letter_queue(), Duration::from_millis(500))
        .await?;
    let bodies: HashSet<&Vec<u8>> = letters.iter().map(|l| &l.body).collect();
    Ok(DeadLetters {
        total: letters.len(),
        distinct: bodies.len(),
        malformed_confirmed: published.malformed_confirmed.len(),
        missing: published
            .malformed_confirmed
            .iter()
            .filter(|b| !bodies.contains(b))
            .count(),
        foreign: bodies
            .iter()
            .filter(|b| !published.malformed_sent.contains(**b))
            .count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        for s in Scenario::ALL {
            assert_eq!(s.name().parse::<Scenario>().expect("known"), s);
            assert!(!s.faults().is_empty());
        }
        let e = "nope".parse::<Scenario>().expect_err("unknown");
        assert!(e.to_string().contains("kill-restart"), "{e}");
    }

    #[test]
    fn broken_builds_round_trip_by_name() {
        for b in Broken::ALL {
            assert_eq!(b.name().parse::<Broken>().expect("known"), b);
            assert!(b.env().starts_with(vote_aggregator::fault::ENV_PREFIX));
        }
        let e = "nope".parse::<Broken>().expect_err("unknown");
        assert!(e.to_string().contains("synchronous-commit-off"), "{e}");
    }

    #[test]
    fn mixed_uses_every_kind_of_fault() {
        let kinds: HashSet<FaultKind> = Scenario::Mixed.faults().iter().copied().collect();
        for s in Scenario::ALL {
            for k in s.faults() {
                assert!(kinds.contains(k), "{k} missing from mixed");
            }
        }
    }
}
