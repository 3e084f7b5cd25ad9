//! Duplicate-delivery suite: three REAL replica processes with different batch sizes on
//! one queue, fed duplicates on purpose; every scenario must pass the checker, every
//! replica must have done part of the work, and the per-replica counts must add up.
//!
//! Summaries are printed (see them with `cargo test --test duplicates -- --nocapture`);
//! replica logs are kept under `target/tmp/duplicates/<scenario>/`.

use std::time::Duration;

use vote_aggregator::config::variables as var;
use vote_testkit::checker::{self, CheckOptions, Report};
use vote_testkit::fleet::{Fleet, FleetOptions, ReplicaSpec, Scrape};
use vote_testkit::infra;
use vote_testkit::inspect::eventually;
use vote_testkit::ledger::Ledger;
use vote_testkit::publish::{PublishOptions, publish_workload};
use vote_testkit::testbed::TestBed;
use vote_testkit::workload::{Workload, WorkloadSpec};

/// How a scenario publishes.
struct Plan {
    name: &'static str,
    spec: WorkloadSpec,
    /// Publishing connections (2 = a vote and its copy race from two connections).
    connections: usize,
    /// Send the late duplicates only after every original was counted.
    late_after_commit: bool,
}

/// Three replicas, batch sizes 50 / 200 / 500.
fn replicas() -> Vec<ReplicaSpec> {
    [("r1", "50"), ("r2", "200"), ("r3", "500")]
        .into_iter()
        .map(|(name, batch)| ReplicaSpec {
            name: name.to_string(),
            env: vec![(var::BATCH_SIZE.to_string(), batch.to_string())],
        })
        .collect()
}

async fn run(plan: Plan) -> anyhow::Result<(Report, Vec<Scrape>)> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let log_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("duplicates")
        .join(plan.name);
    std::fs::create_dir_all(&log_dir)?;
    let base_env = bed.replica_base_env();
    let fleet = Fleet::start(FleetOptions::new(&log_dir, base_env)?, replicas()).await?;

    let workload = Workload::generate(&plan.spec);
    let mut ledger = Ledger::new(&bed.queue, plan.spec.seed);
    let options = PublishOptions {
        connections: plan.connections,
        ..PublishOptions::default()
    };
    publish_workload(
        &bed.amqp_url,
        &bed.queue,
        &workload,
        &options,
        &mut ledger,
        async |ledger| {
            if plan.late_after_commit {
                let mut db = bed.db().await?;
                let originals = ledger.votes.len() as i64;
                eventually(
                    "originals committed",
                    Duration::from_secs(120),
                    async || Ok(db.vote_count().await? >= originals),
                )
                .await?;
            }
            Ok(())
        },
    )
    .await?;

    let report = checker::check(
        &ledger,
        &bed.database_url,
        &bed.amqp_url,
        &CheckOptions {
            drain_timeout: Duration::from_secs(120),
            settle: Duration::from_secs(2),
        },
    )
    .await?;
    // Let the last acks land before reading per-replica figures.
    let total = ledger.votes.len() as u64
        + ledger.duplicates_sent
        + ledger.conflicts.len() as u64
        + ledger.malformed;
    eventually("replicas idle", Duration::from_secs(30), async || {
        let judged: u64 = fleet
            .scrape_all()
            .await
            .into_iter()
            .flatten()
            .map(|s| s.counted() + s.duplicates() + s.conflicting() + s.rejected())
            .sum();
        Ok(judged >= total)
    })
    .await?;
    let scrapes: Vec<Scrape> = fleet
        .scrape_all()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    println!("[{}] {report}", plan.name);
    for (i, s) in scrapes.iter().enumerate() {
        println!(
            "[{}]   {}: received {} · counted {} · duplicates {} · conflicting {} · rejected {}",
            plan.name,
            fleet.name(i),
            s.received(),
            s.counted(),
            s.duplicates(),
            s.conflicting(),
            s.rejected()
        );
    }
    for status in fleet.shutdown().await? {
        assert!(
            status.is_some_and(|s| s.success()),
            "replica exit: {status:?}"
        );
    }
    assert!(report.passed(), "{report}\n{:#?}", report.violations());

    // Load was really shared, and the replicas' own figures add up to the truth.
    for (i, s) in scrapes.iter().enumerate() {
        assert!(
            s.counted() > 0,
            "replica {i} counted nothing: load was not shared"
        );
    }
    let sum = |f: fn(&Scrape) -> u64| scrapes.iter().map(f).sum::<u64>();
    assert_eq!(sum(Scrape::counted), report.published as u64);
    assert_eq!(sum(Scrape::rejected), report.malformed);
    assert!(sum(Scrape::conflicting) >= report.conflicts_expected as u64);
    assert!(sum(Scrape::duplicates) >= report.duplicates_sent);
    assert_eq!(
        sum(Scrape::received),
        sum(Scrape::counted)
            + sum(Scrape::duplicates)
            + sum(Scrape::conflicting)
            + sum(Scrape::rejected),
        "every delivery judged exactly one way"
    );
    Ok((report, scrapes))
}

fn spec(votes: usize, seed: u64) -> WorkloadSpec {
    WorkloadSpec {
        votes,
        elections: 2,
        candidates: 5,
        seed,
        ..WorkloadSpec::default()
    }
}

#[tokio::test]
async fn a_duplicates_back_to_back() -> anyhow::Result<()> {
    let (r, _) = run(Plan {
        name: "a-back-to-back",
        spec: WorkloadSpec {
            duplicates: 0.2,
            conflict_share: 0.0,
            late_share: 0.0,
            ..spec(5_000, 101)
        },
        connections: 1,
        late_after_commit: false,
    })
    .await?;
    assert!(r.duplicates_sent > 800);
    Ok(())
}

#[tokio::test]
async fn b_duplicates_after_the_original_committed() -> anyhow::Result<()> {
    let (r, _) = run(Plan {
        name: "b-late",
        spec: WorkloadSpec {
            duplicates: 0.2,
            conflict_share: 0.0,
            late_share: 1.0,
            ..spec(5_000, 102)
        },
        connections: 1,
        late_after_commit: true,
    })
    .await?;
    assert!(r.duplicates_sent > 800);
    Ok(())
}

#[tokio::test]
async fn c_the_same_vote_from_two_connections_races_two_replicas() -> anyhow::Result<()> {
    let (r, _) = run(Plan {
        name: "c-concurrent",
        spec: WorkloadSpec {
            duplicates: 0.5,
            conflict_share: 0.0,
            late_share: 0.0,
            ..spec(5_000, 103)
        },
        connections: 2,
        late_after_commit: false,
    })
    .await?;
    assert!(r.duplicates_sent > 2_000);
    Ok(())
}

#[tokio::test]
async fn d_conflicting_duplicates() -> anyhow::Result<()> {
    let (r, _) = run(Plan {
        name: "d-conflicts",
        spec: WorkloadSpec {
            duplicates: 0.05,
            conflict_share: 1.0,
            ..spec(5_000, 104)
        },
        connections: 1,
        late_after_commit: false,
    })
    .await?;
    assert!(r.conflicts_expected > 150);
    Ok(())
}

#[tokio::test]
async fn e_malformed_messages() -> anyhow::Result<()> {
    let (r, _) = run(Plan {
        name: "e-malformed",
        spec: WorkloadSpec {
            malformed: 0.01,
            ..spec(5_000, 105)
        },
        connections: 1,
        late_after_commit: false,
    })
    .await?;
    assert_eq!(r.malformed, 50);
    Ok(())
}

#[tokio::test]
async fn f_everything_together_with_50000_votes() -> anyhow::Result<()> {
    let (r, _) = run(Plan {
        name: "f-everything",
        spec: WorkloadSpec {
            duplicates: 0.2,
            conflict_share: 0.25,
            late_share: 0.5,
            malformed: 0.01,
            ..spec(50_000, 106)
        },
        connections: 2,
        late_after_commit: true,
    })
    .await?;
    assert_eq!(r.published, 50_000);
    assert_eq!(r.malformed, 500);
    Ok(())
}
