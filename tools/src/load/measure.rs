//! Measuring one configuration: drain a pre-filled queue with real replica processes
//! (capacity), publish at a steady rate (latency), and sample the replicas' and servers'
//! CPU (see [`cpu`](super::cpu)) and memory (cost); at the end, read from the replicas'
//! metrics how their duplicates were recognised.

use std::time::{Duration, Instant};

use anyhow::Context;
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Double};
use vote_aggregator::config::QueueType;
use vote_aggregator::config::variables as var;

use vote_testkit::fleet::{Fleet, FleetOptions, ReplicaSpec};

use vote_testkit::ledger::Ledger;
use vote_testkit::procinfo;
use vote_testkit::progress::Progress;
use vote_testkit::prometheus::Scrape;
use vote_testkit::publish::{PublishOptions, publish_messages};
use vote_testkit::testbed::TestBed;
use vote_testkit::workload::{Message, Workload};

use super::cpu::{CpuWindow, process_cpu_seconds};
use super::{ConfigResult, LoadOptions, Servers, fresh_bed, prefill, stored_rate};

/// How often the replicas' metrics are read during a drain: often enough to place the CPU
/// window, rarely enough that reading them costs the replicas nothing to speak of.
const DRAIN_POLL: Duration = Duration::from_millis(100);

#[derive(QueryableByName)]
struct LatencyRow {
    #[diesel(sql_type = Double)]
    micros: f64,
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

pub(super) async fn measure_config(
    servers: &Servers,
    workload: &Workload,
    queue_type: QueueType,
    batch: usize,
    replicas: usize,
    opts: &LoadOptions,
) -> anyhow::Result<ConfigResult> {
    let bed = fresh_bed(servers, queue_type).await?;
    let ledger = prefill(servers, &bed, workload, opts).await?;
    let expected = ledger.votes.len() as u64;
    let deliveries = expected + ledger.duplicates_sent;

    let log_dir = opts
        .out_dir
        .join("logs")
        .join(format!("{}-b{batch}-r{replicas}", queue_type.as_str()));
    std::fs::create_dir_all(&log_dir)?;
    let mut base_env = bed.replica_base_env();
    base_env.retain(|(k, _)| k != var::QUEUE_TYPE);
    base_env.push((var::QUEUE_TYPE.into(), queue_type.as_str().into()));
    base_env.push((var::BATCH_SIZE.into(), batch.to_string()));
    let prefetch = (batch * opts.prefetch_factor.max(1)).min(65_535);
    base_env.push((var::PREFETCH_COUNT.into(), prefetch.to_string()));
    base_env.push((var::RUN_MIGRATIONS.into(), "false".into()));
    base_env.push((var::RUST_LOG.into(), "warn".into()));
    // `--replica-env` last: it may override the runner's other defaults above.
    for (name, value) in &opts.replica_env {
        base_env.retain(|(k, _)| k != name);
        base_env.push((name.clone(), value.clone()));
    }
    let specs: Vec<ReplicaSpec> = (0..replicas)
        .map(|i| ReplicaSpec {
            name: format!("load-{}", i + 1),
            env: vec![],
        })
        .collect();
    let fleet = Fleet::start(FleetOptions::new(&log_dir, base_env)?, specs).await?;
    let replica_pids: Vec<u32> = (0..fleet.len()).filter_map(|i| fleet.pid(i)).collect();

    // Drain: wait until every vote is counted, sampling CPU from the first counted one.
    let progress = Progress::new("draining", expected, opts.progress);
    let mut first_counted: Option<u64> = None;
    let mut cpu_window = CpuWindow::new(servers, replica_pids.clone());
    let deadline = Instant::now() + Duration::from_secs(600);
    let counted_in_window = loop {
        let counted: u64 = fleet
            .scrape_all()
            .await
            .into_iter()
            .flatten()
            .map(|s| s.counted())
            .sum();
        progress.set(counted);
        if counted > 0 && first_counted.is_none() {
            first_counted = Some(counted);
            cpu_window.open_once();
        }
        if counted >= expected {
            break counted - first_counted.unwrap_or(0);
        }
        if Instant::now() > deadline {
            anyhow::bail!("drain did not finish in 10 minutes ({counted}/{expected})");
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    let drain_cpu = cpu_window.close(counted_in_window);
    progress.finish(expected);
    // Throughput from the stored rows, like the floor's (the polls above only find the end
    // of the drain and the CPU window).
    let votes_per_second = stored_rate(&bed).await?;
    let deliveries_per_second = votes_per_second * deliveries as f64 / expected.max(1) as f64;

    // Latency at half of capacity: new votes whose cast_at is their publish time.
    let steady_rate = (votes_per_second / 2.0).max(10.0);
    let steady_count = (steady_rate * opts.steady.as_secs_f64()).round() as usize;
    let steady_start = chrono::Utc::now();
    let fresh: Vec<Message> = (0..steady_count)
        .map(|i| {
            Message::Original(vote_testkit::votes::vote(
                "steady",
                &format!("candidate-{}", i % 6),
            ))
        })
        .collect();
    // Each vote's cast_at is set the moment it is first sent (a retry resends the same
    // payload), so recorded_at - cast_at is the publish-to-commit latency.
    let mut steady_ledger = Ledger::new(&bed.queue, opts.seed);
    publish_steady(&bed, &fresh, steady_rate, &mut steady_ledger).await?;
    let mut db_view = bed.db().await?;
    let want = (expected + steady_ledger.votes.len() as u64) as i64;
    vote_testkit::inspect::eventually(
        "steady votes committed",
        Duration::from_secs(120),
        async || Ok(db_view.vote_count().await? >= want),
    )
    .await?;
    use diesel_async::RunQueryDsl;
    let rows: Vec<LatencyRow> = diesel::sql_query(
        "SELECT (EXTRACT(EPOCH FROM (recorded_at - cast_at)) * 1000000)::float8 AS micros \
         FROM votes WHERE election_id = 'steady' AND cast_at >= $1",
    )
    .bind::<diesel::sql_types::Timestamptz, _>(steady_start)
    .load(db_view.connection())
    .await?;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
        .context("histogram bounds")?;
    for r in &rows {
        let _ = hist.record(r.micros.max(1.0) as u64);
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;

    // Cost: CPU and peak memory of each replica process.
    let mut cpu = 0.0;
    let mut peak_rss_kib = 0u64;
    for &pid in &replica_pids {
        cpu += process_cpu_seconds(pid).unwrap_or(0.0);
        peak_rss_kib = peak_rss_kib.max(procinfo::peak_rss_kib(pid).unwrap_or(0));
    }
    let total_counted: CountRow = diesel::sql_query("SELECT count(*)::bigint AS n FROM votes")
        .get_result(db_view.connection())
        .await?;
    let duplicates_from_memory_share = duplicates_from_memory_share(&fleet).await;
    fleet.shutdown().await?;
    Ok(ConfigResult {
        replicas,
        batch_size: batch,
        prefetch,
        queue_type: queue_type.as_str().into(),
        votes_per_second,
        deliveries_per_second,
        broker_ceiling_votes_per_second: 0.0,
        db_ceiling_votes_per_second: 0.0,
        floor_votes_per_second: 0.0,
        floor_consumer_cpu_seconds_per_1000_votes: None,
        drain_aggregator_context_switches_per_1000_votes: drain_cpu.consumer_switches,
        floor_consumer_context_switches_per_1000_votes: None,
        floor_broker_cpu_seconds_per_1000_votes: None,
        floor_database_cpu_seconds_per_1000_votes: None,
        floor_machine_busy_share: None,
        ratio_to_floor: 0.0,
        ratio_to_broker_ceiling: 0.0,
        ratio_to_db_ceiling: 0.0,
        steady_rate,
        latency_p50_ms: ms(0.50),
        latency_p95_ms: ms(0.95),
        latency_p99_ms: ms(0.99),
        latency_max_ms: hist.max() as f64 / 1000.0,
        latency_samples: hist.len(),
        drain_aggregator_cpu_seconds_per_1000_votes: drain_cpu.consumers,
        drain_broker_cpu_seconds_per_1000_votes: drain_cpu.broker,
        drain_database_cpu_seconds_per_1000_votes: drain_cpu.database,
        drain_machine_cpu_share: drain_cpu.machine_share,
        drain_machine_busy_share: drain_cpu.machine_busy,
        cpu_bound_votes_per_second: drain_cpu.cpu_bound,
        cpu_seconds_per_1000_votes: cpu / (total_counted.n.max(1) as f64 / 1000.0),
        peak_rss_mib: peak_rss_kib as f64 / 1024.0,
        limited_by: String::new(),
        rounds: 1,
        ratio_to_floor_range: (0.0, 0.0),
        every_round: Vec::new(),
        floor_with_aggregator_write: None,
        drain_order: Default::default(),
        duplicates_from_memory_share,
    })
}

/// [`ConfigResult::duplicates_from_memory_share`] of a fleet, read now.
async fn duplicates_from_memory_share(fleet: &Fleet) -> Option<f64> {
    let scrapes: anyhow::Result<Vec<Scrape>> = fleet.scrape_all().await.into_iter().collect();
    share_from_memory(&scrapes.ok()?)
}

/// Of the duplicates counted on these pages, the share counted as recognised from memory
/// (`None` when none was counted).
fn share_from_memory(scrapes: &[Scrape]) -> Option<f64> {
    let duplicates: u64 = scrapes.iter().map(Scrape::duplicates).sum();
    let from_memory: u64 = scrapes.iter().map(Scrape::duplicates_from_memory).sum();
    (duplicates > 0).then(|| from_memory as f64 / duplicates as f64)
}

/// Publishes `votes` at `rate` on one connection, stamping each vote's `cast_at` with
/// its publish time, and records each vote as attempted before it is sent and as
/// confirmed once it is.
async fn publish_steady(
    bed: &TestBed,
    votes: &[Message],
    rate: f64,
    ledger: &mut Ledger,
) -> anyhow::Result<()> {
    let originals: Vec<Message> = votes
        .iter()
        .filter(|m| matches!(m, Message::Original(_)))
        .cloned()
        .collect();
    let options = PublishOptions {
        rate: Some(rate),
        stamp_cast_at: true,
        ..PublishOptions::default()
    };
    publish_messages(&bed.amqp_url, &bed.queue, &originals, &options, ledger).await
}

#[cfg(test)]
mod tests {
    use vote_testkit::prometheus::Scrape;

    use super::share_from_memory;

    #[test]
    fn the_share_from_memory_is_over_every_replica_and_every_duplicate() {
        let page = |dups_true: u64, dups_false: u64, from_memory: u64| {
            Scrape::parse(&format!(
                "vote_aggregator_votes_duplicate_total{{redelivered=\"true\"}} {dups_true}\n\
                 vote_aggregator_votes_duplicate_total{{redelivered=\"false\"}} {dups_false}\n\
                 vote_aggregator_votes_duplicate_from_memory_total {from_memory}\n"
            ))
            .unwrap()
        };
        // 30 of 40 duplicates from memory on one replica, 0 of 10 on the other.
        let share = share_from_memory(&[page(5, 35, 30), page(0, 10, 0)]);
        assert_eq!(share, Some(0.6));
        assert_eq!(share_from_memory(&[page(0, 0, 0)]), None);
        assert_eq!(share_from_memory(&[]), None);
    }
}
