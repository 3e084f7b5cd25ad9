//! `vote-tools demo` (`make demo`): the first thing a newcomer runs. Starts PostgreSQL
//! and RabbitMQ (containers, or the servers in `VOTES_TEST_DATABASE_URL` /
//! `VOTES_TEST_AMQP_URL`), runs several real replicas, publishes votes with duplicates,
//! conflicting copies and malformed messages, then shows the tallies, the checker's
//! verdict and each replica's share. Leaves nothing running unless `--keep`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use vote_aggregator::config::variables as var;

use vote_testkit::checker::{self, CheckOptions};
use vote_testkit::fleet::{Fleet, FleetOptions, ReplicaSpec};
use vote_testkit::infra;
use vote_testkit::ledger::Ledger;
use vote_testkit::publish::{PublishOptions, publish_workload};
use vote_testkit::testbed::TestBed;
use vote_testkit::workload::{Workload, WorkloadSpec};

const BATCH_SIZES: [usize; 4] = [100, 250, 500, 1000];

/// Runs the demo.
///
/// # Errors
/// When the servers or replicas cannot start, or publishing fails.
pub async fn run(votes: usize, replicas: usize, seed: u64, keep: bool) -> anyhow::Result<ExitCode> {
    if votes == 0 || !(1..=8).contains(&replicas) {
        anyhow::bail!("demo needs at least 1 vote and 1 to 8 replicas");
    }
    println!("vote-aggregator demo · seed {seed} (replay with --seed {seed})\n");

    if keep {
        // Before the servers start, so their containers are labelled as kept (later test
        // runs leave them alone). A demo that fails leaves them too: `make clean-containers`.
        infra::keep_at_exit();
    }
    let started = Instant::now();
    println!("1/5 starting PostgreSQL and RabbitMQ ...");
    let servers = infra::shared().await?;
    let bed = TestBed::new(servers).await?;
    println!(
        "    ready in {:.1}s: PostgreSQL {} · RabbitMQ {}",
        started.elapsed().as_secs_f64(),
        servers.postgres_host_port(),
        servers.rabbitmq_host_port()
    );

    let log_dir = std::env::current_dir()?.join("target").join("demo");
    std::fs::create_dir_all(&log_dir)?;
    let specs: Vec<ReplicaSpec> = (0..replicas)
        .map(|i| ReplicaSpec {
            name: format!("replica-{}", i + 1),
            env: vec![(
                var::BATCH_SIZE.to_string(),
                BATCH_SIZES[i % BATCH_SIZES.len()].to_string(),
            )],
        })
        .collect();
    let batch_list: Vec<String> = specs.iter().map(|s| s.env[0].1.clone()).collect();
    println!(
        "2/5 starting {replicas} vote-aggregator processes (batch sizes {}) ...",
        batch_list.join(" / ")
    );
    let base_env = bed.replica_base_env();
    let t = Instant::now();
    let fleet = Fleet::start(FleetOptions::new(&log_dir, base_env)?, specs).await?;
    println!(
        "    ready in {:.1}s · logs in {}",
        t.elapsed().as_secs_f64(),
        log_dir.display()
    );

    let spec = WorkloadSpec {
        votes,
        elections: 2,
        candidates: 4,
        precincts: 20,
        duplicates: 0.1,
        conflict_share: 0.1,
        late_share: 0.5,
        malformed: 0.005,
        seed,
    };
    let workload = Workload::generate(&spec);
    println!(
        "3/5 publishing {votes} votes + 10% duplicates (half of them late, a tenth conflicting) + 0.5% malformed, with publisher confirms"
    );
    let mut ledger = Ledger::new(&bed.queue, seed);
    let options = PublishOptions {
        connections: 2,
        progress: true,
        ..PublishOptions::default()
    };
    publish_workload(
        &bed.amqp_url,
        &bed.queue,
        &workload,
        &options,
        &mut ledger,
        async |_| Ok(()),
    )
    .await?;

    println!("4/5 waiting for the queue to drain, then checking every invariant ...");
    let report = checker::check(
        &ledger,
        &bed.database_url,
        &bed.amqp_url,
        &CheckOptions {
            drain_timeout: Duration::from_secs(180),
            settle: Duration::from_secs(2),
        },
    )
    .await?;

    println!("5/5 results\n");
    let mut db = bed.db().await?;
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "election",
        "candidate",
        "votes",
        "percentage",
    ]);
    for s in db.statistics().await? {
        table.add_row([
            s.election_id,
            s.candidate_id,
            s.votes.to_string(),
            s.percentage
                .map(|p| format!("{p:.2} %"))
                .unwrap_or_default(),
        ]);
    }
    println!("SELECT * FROM vote_statistics;\n{table}\n");

    println!("checker: {report}");
    let violations = report.violations();
    if violations.is_empty() {
        println!("PASS: every confirmed vote counted exactly once, tallies consistent\n");
    } else {
        for v in &violations {
            println!("FAIL: {v}");
        }
        println!();
    }

    let mut shares = Table::new();
    shares.load_preset(UTF8_FULL_CONDENSED).set_header([
        "replica",
        "batch size",
        "received",
        "counted",
        "duplicates",
        "conflicting",
        "dead-lettered",
        "share of counted",
    ]);
    let scrapes = fleet.scrape_all().await;
    let total: u64 = scrapes.iter().flatten().map(|s| s.counted()).sum();
    for (i, s) in scrapes.iter().enumerate() {
        let Ok(s) = s else { continue };
        shares.add_row([
            fleet.name(i).to_string(),
            batch_list[i].clone(),
            s.received().to_string(),
            s.counted().to_string(),
            s.duplicates().to_string(),
            s.conflicting().to_string(),
            s.rejected().to_string(),
            format!("{:.1} %", 100.0 * s.counted() as f64 / total.max(1) as f64),
        ]);
    }
    println!("replica shares\n{shares}\n");

    if keep {
        println!("Left running (--keep):");
        println!("  {}={}", var::DATABASE_URL, bed.database_url);
        println!("  {}={}", var::AMQP_URL, bed.amqp_url);
        println!("  {}={}", var::QUEUE_NAME, bed.queue);
        for i in 0..fleet.len() {
            println!(
                "  {} pid {} · http://{}/metrics",
                fleet.name(i),
                fleet.pid(i).map(|p| p.to_string()).unwrap_or("-".into()),
                fleet.metrics_addr(i)
            );
        }
        println!(
            "  psql \"{}\" -c 'SELECT * FROM vote_statistics'",
            bed.database_url
        );
        println!(
            "Publish more with: {}='{}' {}={} vote-tools publish -n 1000",
            var::AMQP_URL,
            bed.amqp_url,
            var::QUEUE_NAME,
            bed.queue
        );
        // Only this run's containers (its own labels), not every test container on the
        // engine as `make clean-containers` would remove.
        let filters: String = infra::own_labels()
            .iter()
            .map(|(key, value)| format!(" --filter label={key}={value}"))
            .collect();
        println!(
            "Stop everything with: kill {} ; docker rm -fv $(docker ps -aq{filters})",
            (0..fleet.len())
                .filter_map(|i| fleet.pid(i).map(|p| p.to_string()))
                .collect::<Vec<_>>()
                .join(" ")
        );
        fleet.detach();
        // The database outlives this process: it is what the lines above point to.
        bed.keep();
    } else {
        println!("Stopping the replicas and servers (run with --keep to leave them running).");
        fleet.shutdown().await?;
        bed.finish().await?;
    }
    Ok(if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
