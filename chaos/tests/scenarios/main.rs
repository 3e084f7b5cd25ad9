//! The chaos suite in its SHORT form (15–20 s of faults per scenario), part of `make
//! test`: every scenario must pass (0 lost, 0 double-counted, tally drift 0, every
//! malformed message dead-lettered, the results stream rebuilding `vote_statistics`
//! exactly, every fault verified, every replica recovered), and deliberately broken
//! aggregators must make their scenarios FAIL: one that acks before commit fails
//! `kill-restart` and `commit-ack` with lost votes, one that commits with
//! `synchronous_commit=off` fails `db-kill` with lost votes, and one whose results relay
//! deletes events before publishing them fails `relay-confirm`'s results check. The
//! suite catches the bugs it exists for.
//!
//! Each scenario starts its own private PostgreSQL + RabbitMQ pair and three real
//! replicas, so they run one at a time (a shared lock) to stay within a 2-core machine.
//! The seed is random and printed (shown when a test fails); set `VOTES_CHAOS_SEED` to
//! replay one, or run `vote-tools chaos --scenario NAME --seed N`. The replicas are the
//! separate fault-injection build at `target/debug/fault-injection/vote-aggregator`, which
//! `make fault-build` (and so `make test`) makes first.

use std::time::Duration;

use vote_chaos::ChaosReport;
use vote_chaos::scenario::{self, Broken, Scenario, ScenarioOptions};

/// One scenario at a time: each brings its own containers and replicas.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Upper bound of one short run (containers, faults, drain): it stops by itself long
/// before; this only turns a hang into a failure.
const RUN_BOUND: Duration = Duration::from_secs(420);

fn seed() -> u64 {
    std::env::var("VOTES_CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(rand::random)
}

async fn run(scenario: Scenario, opts: ScenarioOptions) -> anyhow::Result<ChaosReport> {
    let _one_at_a_time = SERIAL.lock().await;
    vote_testkit::infra::init_test_logging();
    let report = tokio::time::timeout(RUN_BOUND, scenario::run(scenario, &opts))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{scenario} (seed {}) did not finish within {RUN_BOUND:?}",
                opts.seed
            )
        })??;
    println!("{report}");
    Ok(report)
}

/// Runs `scenario` for `secs` seconds of faults and asserts every promise of the suite (checker passed, every fault verified).
async fn must_pass(scenario: Scenario, secs: u64) -> anyhow::Result<ChaosReport> {
    let mut opts = ScenarioOptions::new(Duration::from_secs(secs), seed());
    opts.progress = true;
    let report = run(scenario, opts).await?;
    assert_passed(&report);
    Ok(report)
}

/// Every promise of the suite: checker passed (0 lost, 0 double-counted, tally drift 0),
/// enough load, every malformed message dead-lettered, every fault verified, every
/// replica recovered by itself.
fn assert_passed(report: &ChaosReport) {
    let summary = report.summary();
    assert!(report.passed(), "{summary}\n{:#?}", report.violations());
    assert_eq!(report.check.lost, 0, "{summary}");
    assert_eq!(report.check.double_counted, 0, "{summary}");
    assert_eq!(report.check.tally_drift, 0, "{summary}");
    assert!(report.check.published > 1_000, "too little load: {summary}");
    assert_eq!(
        report.dead_letters.distinct, report.dead_letters.malformed_confirmed,
        "dead-lettered = malformed: {summary}"
    );
    assert!(report.dead_letters.malformed_confirmed > 0, "{summary}");
    assert!(report.verified() > 0, "{summary}");
    assert_eq!(report.verified(), report.faults.len(), "{summary}");
    assert_eq!(report.recovered(), report.replicas, "{summary}");
    assert!(report.results.passed(), "{}", report.results);
    assert!(
        report.results.events > 0,
        "no results events: {}",
        report.results
    );
}

/// Runs a broker-cluster `scenario` for `secs` seconds of faults at a modest rate (three
/// RabbitMQ nodes share the 2 cores with everything else) and asserts every promise of the
/// suite, plus that a broker fault really struck a cluster node.
async fn must_pass_on_cluster(scenario: Scenario, secs: u64) -> anyhow::Result<()> {
    let mut opts = ScenarioOptions::new(Duration::from_secs(secs), seed());
    opts.rate = 150.0;
    opts.progress = true;
    let report = run(scenario, opts).await?;
    assert_passed(&report);
    assert!(
        report.faults.iter().any(|f| f.kind.needs_broker_cluster()),
        "no broker-node fault: {}",
        report.summary()
    );
    Ok(())
}

/// Runs `scenario` against the `broken` build under `rate` messages per second and
/// asserts that it FAILS with lost votes.
async fn must_catch_broken_build(
    scenario: Scenario,
    broken: Broken,
    secs: u64,
    rate: f64,
) -> anyhow::Result<()> {
    let mut opts = ScenarioOptions::new(Duration::from_secs(secs), seed());
    opts.broken = Some(broken);
    opts.rate = rate;
    opts.progress = true;
    let report = run(scenario, opts).await?;
    let summary = report.summary();
    assert!(!report.passed(), "the broken build PASSED: {summary}");
    assert!(
        report.check.lost > 0,
        "the broken build failed, but not by losing votes: {summary}\n{:#?}",
        report.violations()
    );
    assert!(report.verified() > 0, "{summary}");
    // Expected failure: its logs are not needed.
    let _ = std::fs::remove_dir_all(&report.dir);
    Ok(())
}

#[tokio::test]
async fn kill_restart() -> anyhow::Result<()> {
    must_pass(Scenario::KillRestart, 15).await?;
    Ok(())
}

#[tokio::test]
async fn zombie_pause() -> anyhow::Result<()> {
    must_pass(Scenario::ZombiePause, 18).await?;
    Ok(())
}

#[tokio::test]
async fn broker_restart() -> anyhow::Result<()> {
    must_pass(Scenario::BrokerRestart, 18).await?;
    Ok(())
}

#[tokio::test]
async fn db_restart() -> anyhow::Result<()> {
    must_pass(Scenario::DbRestart, 15).await?;
    Ok(())
}

#[tokio::test]
async fn db_kill() -> anyhow::Result<()> {
    must_pass(Scenario::DbKill, 15).await?;
    Ok(())
}

#[tokio::test]
async fn backend_terminate() -> anyhow::Result<()> {
    must_pass(Scenario::BackendTerminate, 15).await?;
    Ok(())
}

#[tokio::test]
async fn partition() -> anyhow::Result<()> {
    must_pass(Scenario::Partition, 15).await?;
    Ok(())
}

#[tokio::test]
async fn commit_ack() -> anyhow::Result<()> {
    must_pass(Scenario::CommitAck, 15).await?;
    Ok(())
}

/// Every verified fault leaves confirmed events in the outbox, which another relay
/// publishes again: the results consumer must see repeats, drop them, and still rebuild
/// every tally exactly.
#[tokio::test]
async fn relay_confirm() -> anyhow::Result<()> {
    let report = must_pass(Scenario::RelayConfirm, 12).await?;
    assert!(
        report.results.repeats > 0,
        "a kill between confirm and delete must re-publish: {}",
        report.results
    );
    Ok(())
}

#[tokio::test]
async fn mixed() -> anyhow::Result<()> {
    must_pass(Scenario::Mixed, 20).await?;
    Ok(())
}

/// A random SIGKILL loses votes only when it lands while a batch is acked but not yet
/// committed. So: as much load as the publisher can push (the replicas commit back to
/// back, and the broken build acks each batch when its commit STARTS), and enough kills
/// (about 7 in 25 s) that missing the window every time is very unlikely (each kill
/// lost votes in ~3 of 4 trials at this load).
#[tokio::test]
async fn broken_build_fails_kill_restart() -> anyhow::Result<()> {
    must_catch_broken_build(Scenario::KillRestart, Broken::AckBeforeCommit, 25, 5_000.0).await
}

/// Deterministic: every abort of the hook lands after the ack and before the COMMIT.
#[tokio::test]
async fn broken_build_fails_commit_ack() -> anyhow::Result<()> {
    must_catch_broken_build(Scenario::CommitAck, Broken::AckBeforeCommit, 12, 1_000.0).await
}

/// A replica that commits with `synchronous_commit=off` acks batches whose WAL may still
/// sit in PostgreSQL's memory; `db-kill` SIGKILLs the server right after such acks.
#[tokio::test]
async fn broken_build_fails_db_kill() -> anyhow::Result<()> {
    must_catch_broken_build(Scenario::DbKill, Broken::SynchronousCommitOff, 15, 1_000.0).await
}

#[tokio::test]
async fn broker_node_kill() -> anyhow::Result<()> {
    must_pass_on_cluster(Scenario::BrokerNodeKill, 10).await
}

#[tokio::test]
async fn broker_node_partition() -> anyhow::Result<()> {
    must_pass_on_cluster(Scenario::BrokerNodePartition, 10).await
}

#[tokio::test]
async fn broker_rolling_restart() -> anyhow::Result<()> {
    must_pass_on_cluster(Scenario::BrokerRollingRestart, 10).await
}

#[tokio::test]
async fn cluster_mixed() -> anyhow::Result<()> {
    must_pass_on_cluster(Scenario::ClusterMixed, 10).await
}

/// Deterministic: every abort of the relay hook lands after the delete committed and
/// before the publish, so the events of that round never reach the stream. Votes are all
/// counted; the results check must catch the loss.
#[tokio::test]
async fn broken_build_fails_relay_confirm() -> anyhow::Result<()> {
    let mut opts = ScenarioOptions::new(Duration::from_secs(10), seed());
    opts.broken = Some(Broken::OutboxDeleteBeforeConfirm);
    opts.progress = true;
    let report = run(Scenario::RelayConfirm, opts).await?;
    let summary = report.summary();
    assert!(!report.passed(), "the broken build PASSED: {summary}");
    assert!(
        report.results.difference.is_some(),
        "the broken build failed, but not by a results difference: {summary}\n{:#?}",
        report.violations()
    );
    assert_eq!(report.check.lost, 0, "{summary}");
    assert!(report.verified() > 0, "{summary}");
    let _ = std::fs::remove_dir_all(&report.dir);
    Ok(())
}
