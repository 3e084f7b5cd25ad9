//! `vote-tools load` (`make load`): capacity baselines measured against the machine's
//! own ceilings, in the same run.
//!
//! For every configuration (replicas × batch size × queue type) on fresh containers
//! (PostgreSQL with fsync ON, as in production):
//! 1. **capacity**: pre-fill the queue with N votes (+10 % duplicates), start the replica
//!    processes, and time the drain from the first counted vote to the last: counted
//!    votes/s;
//! 2. **latency**: publish at 50 % of that capacity for a while, and read every vote's
//!    publish-to-commit latency (`votes.recorded_at`, written during the batch's INSERT
//!    just before COMMIT, minus `cast_at`, set when the vote was published) into an HDR
//!    histogram: p50/p95/p99/max;
//! 3. **cost**: CPU seconds and peak RSS of each replica process, from `/proc`.
//!
//! And the ceilings, measured in the same run with the same data:
//! - **broker ceiling**: a minimal consumer that only receives and acks (same prefetch,
//!   same queue type, one `multiple` ack per batch), no database;
//! - **database ceiling**: the aggregator's own batch statement fed from memory at the
//!   same batch size, one transaction at a time, no broker.
//!
//! Throughput is quoted as a ratio to those ceilings: on a shared, noisy machine a bare
//! votes/s figure means little. Timings are benchmarks, never test assertions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Double, Text};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use vote_aggregator::config::QueueType;
use vote_aggregator::db::{self, BatchColumns};

use vote_testkit::fleet::{Fleet, FleetOptions, ReplicaSpec};
use vote_testkit::infra::{self, Infra, InfraOptions};
use vote_testkit::ledger::Ledger;
use vote_testkit::procinfo;
use vote_testkit::progress::Progress;
use vote_testkit::publish::{PublishOptions, publish_messages};
use vote_testkit::testbed::TestBed;
use vote_testkit::workload::{Message, Workload, WorkloadSpec};

/// What to measure.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Distinct votes pre-filled per configuration.
    pub votes: usize,
    /// Share of votes published twice in the pre-fill.
    pub duplicates: f64,
    /// Replica counts to try.
    pub replicas: Vec<usize>,
    /// Batch sizes to try.
    pub batch_sizes: Vec<usize>,
    /// Queue types to try.
    pub queue_types: Vec<QueueType>,
    /// Length of the steady-rate latency phase.
    pub steady: Duration,
    /// `PREFETCH_COUNT` = this × batch size (the service's default is 2).
    pub prefetch_factor: usize,
    /// Where the JSON, Markdown and PNG go.
    pub out_dir: PathBuf,
    /// Workload seed.
    pub seed: u64,
    /// Show progress.
    pub progress: bool,
}

/// The machine and software the figures were measured on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// CPU cores available.
    pub cores: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// `SELECT version()` of the PostgreSQL server.
    pub postgres: String,
    /// RabbitMQ image (or external server).
    pub rabbitmq: String,
    /// PostgreSQL `fsync` setting during the run.
    pub postgres_fsync: String,
    /// Version of vote-aggregator.
    pub aggregator_version: String,
}

/// One configuration's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigResult {
    /// Replica processes.
    pub replicas: usize,
    /// `BATCH_SIZE`.
    pub batch_size: usize,
    /// `PREFETCH_COUNT` (prefetch factor × batch size).
    pub prefetch: usize,
    /// `quorum` or `classic`.
    pub queue_type: String,
    /// Counted votes per second while draining the pre-filled queue.
    pub votes_per_second: f64,
    /// Deliveries per second while draining (votes + duplicates).
    pub deliveries_per_second: f64,
    /// Minimal receive-and-ack consumer, same prefetch and queue type: deliveries/s.
    pub broker_ceiling_votes_per_second: f64,
    /// The batch statement from memory at this batch size: votes/s.
    pub db_ceiling_votes_per_second: f64,
    /// `deliveries_per_second / broker_ceiling_votes_per_second`.
    pub ratio_to_broker_ceiling: f64,
    /// `votes_per_second / db_ceiling_votes_per_second`.
    pub ratio_to_db_ceiling: f64,
    /// Rate of the latency phase (50 % of capacity), votes/s.
    pub steady_rate: f64,
    /// Publish-to-commit latency percentiles at that rate, ms.
    pub latency_p50_ms: f64,
    /// See `latency_p50_ms`.
    pub latency_p95_ms: f64,
    /// See `latency_p50_ms`.
    pub latency_p99_ms: f64,
    /// See `latency_p50_ms`.
    pub latency_max_ms: f64,
    /// Votes whose latency was measured.
    pub latency_samples: u64,
    /// Replica CPU seconds (user + system, all replicas) per 1000 counted votes.
    pub cpu_seconds_per_1000_votes: f64,
    /// Largest peak RSS of one replica, MiB.
    pub peak_rss_mib: f64,
    /// During the capacity drain: CPU seconds per 1000 counted votes of the replicas...
    pub drain_aggregator_cpu_seconds_per_1000_votes: f64,
    /// ... of the RabbitMQ container (None when its cgroup cannot be read) ...
    pub drain_broker_cpu_seconds_per_1000_votes: Option<f64>,
    /// ... and of the PostgreSQL container.
    pub drain_database_cpu_seconds_per_1000_votes: Option<f64>,
    /// Share of the machine's CPU (all cores) that replicas + broker + database used
    /// during the drain.
    pub drain_machine_cpu_share: Option<f64>,
    /// Share of the machine's CPU busy during the drain, whoever used it (from
    /// /proc/stat): above the previous figure when other work shares the machine.
    pub drain_machine_busy_share: Option<f64>,
    /// What the measured per-vote CPU costs allow on this many cores if nothing else
    /// waited: cores / (CPU seconds per vote, summed over the three). A ceiling for the
    /// whole pipeline on this machine.
    pub cpu_bound_votes_per_second: Option<f64>,
    /// What bounded this configuration, judged from the ratios and CPU use.
    pub limited_by: String,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// Wall time of the run, seconds.
    pub wall_seconds: f64,
    /// The command line that produced it.
    pub command: String,
    /// Distinct votes per drain.
    pub votes: usize,
    /// Share of duplicates in the pre-fill.
    pub duplicates: f64,
    /// Seconds of the steady-rate phase.
    pub steady_seconds: f64,
    /// Workload seed.
    pub seed: u64,
    /// Where it ran.
    pub machine: Machine,
    /// One entry per configuration.
    pub configs: Vec<ConfigResult>,
}

/// Runs every configuration and returns the figures (the caller writes the outputs).
///
/// # Errors
/// When the servers cannot start or a phase fails (a drain that never finishes is an
/// error: the figures would be meaningless).
pub async fn run(opts: &LoadOptions, command: String) -> anyhow::Result<LoadReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339();
    eprintln!(
        "load: seed {} · {} votes (+{:.0}% duplicates) per drain · steady phase {:?}",
        opts.seed,
        opts.votes,
        opts.duplicates * 100.0,
        opts.steady
    );
    // Fresh private servers with fsync ON: baselines must pay for durability.
    let servers = infra::start_private(InfraOptions {
        fsync: true,
        ..InfraOptions::default()
    })
    .await?;
    let machine = machine(&servers).await?;
    let workload = Workload::generate(&WorkloadSpec {
        votes: opts.votes,
        elections: 3,
        candidates: 6,
        precincts: 50,
        duplicates: opts.duplicates,
        conflict_share: 0.0,
        late_share: 0.0,
        malformed: 0.0,
        seed: opts.seed,
    });

    let mut broker_ceilings: HashMap<(String, usize), f64> = HashMap::new();
    let mut db_ceilings: HashMap<usize, f64> = HashMap::new();
    let mut configs = Vec::new();
    let total = opts.queue_types.len() * opts.batch_sizes.len() * opts.replicas.len();
    let mut n = 0;
    for &queue_type in &opts.queue_types {
        for &batch in &opts.batch_sizes {
            let key = (queue_type.as_str().to_string(), batch);
            if !broker_ceilings.contains_key(&key) {
                let c = broker_ceiling(&servers, &workload, queue_type, batch, opts).await?;
                eprintln!(
                    "load: broker ceiling {} batch {batch}: {c:.0} deliveries/s",
                    queue_type.as_str()
                );
                broker_ceilings.insert(key.clone(), c);
            }
            if let std::collections::hash_map::Entry::Vacant(e) = db_ceilings.entry(batch) {
                let c = db_ceiling(&servers, &workload, batch).await?;
                eprintln!("load: database ceiling batch {batch}: {c:.0} votes/s");
                e.insert(c);
            }
            for &replicas in &opts.replicas {
                n += 1;
                eprintln!(
                    "load: [{n}/{total}] {replicas} replica(s), batch {batch}, {} queue",
                    queue_type.as_str()
                );
                let mut r =
                    measure_config(&servers, &workload, queue_type, batch, replicas, opts).await?;
                r.broker_ceiling_votes_per_second = broker_ceilings[&key];
                r.db_ceiling_votes_per_second = db_ceilings[&batch];
                r.ratio_to_broker_ceiling =
                    r.deliveries_per_second / r.broker_ceiling_votes_per_second.max(1.0);
                r.ratio_to_db_ceiling = r.votes_per_second / r.db_ceiling_votes_per_second.max(1.0);
                r.limited_by = limited_by(&r);
                eprintln!(
                    "load:   {:.0} votes/s ({:.0}% of broker ceiling, {:.0}% of database ceiling) · p99 {:.1} ms · {:.3} CPU s/1000 votes · peak RSS {:.1} MiB",
                    r.votes_per_second,
                    r.ratio_to_broker_ceiling * 100.0,
                    r.ratio_to_db_ceiling * 100.0,
                    r.latency_p99_ms,
                    r.cpu_seconds_per_1000_votes,
                    r.peak_rss_mib
                );
                configs.push(r);
            }
        }
    }
    Ok(LoadReport {
        started_at,
        wall_seconds: started.elapsed().as_secs_f64(),
        command,
        votes: opts.votes,
        duplicates: opts.duplicates,
        steady_seconds: opts.steady.as_secs_f64(),
        seed: opts.seed,
        machine,
        configs,
    })
}

/// A judgement, not a measurement: close to a ceiling means bounded by it; a machine
/// whose cores were saturated during the drain is CPU-bound, and the split of that CPU
/// says who used it; otherwise the aggregator's own pipeline is the limit.
fn limited_by(r: &ConfigResult) -> String {
    let broker = r.ratio_to_broker_ceiling;
    let db = r.ratio_to_db_ceiling;
    let split = match (
        r.drain_broker_cpu_seconds_per_1000_votes,
        r.drain_database_cpu_seconds_per_1000_votes,
    ) {
        (Some(b), Some(d)) => {
            let a = r.drain_aggregator_cpu_seconds_per_1000_votes;
            let t = (a + b + d).max(1e-9);
            format!(
                " (CPU: broker {:.0} %, database {:.0} %, aggregator {:.0} %)",
                100.0 * b / t,
                100.0 * d / t,
                100.0 * a / t
            )
        }
        _ => String::new(),
    };
    if r.drain_machine_cpu_share.is_some_and(|s| s >= 0.85) {
        format!("machine CPU: cores saturated{split}")
    } else if r.drain_machine_busy_share.is_some_and(|s| s >= 0.9) {
        format!("machine CPU: cores saturated, partly by other work on the machine{split}")
    } else if broker >= 0.8 && broker >= db {
        format!("broker: near its receive-and-ack ceiling{split}")
    } else if db >= 0.8 {
        format!("database: near its batch-statement ceiling{split}")
    } else {
        format!("commit pipeline: below both ceilings with CPU to spare{split}")
    }
}

async fn machine(servers: &infra::PrivateInfra) -> anyhow::Result<Machine> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        v: String,
    }
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    let mut conn = AsyncPgConnection::establish(&servers.admin_database_url()).await?;
    let version: Row = diesel::sql_query("SELECT version() AS v")
        .get_result(&mut conn)
        .await?;
    let fsync: Row = diesel::sql_query("SELECT current_setting('fsync') AS v")
        .get_result(&mut conn)
        .await?;
    let memory_bytes = procinfo::memory_total_bytes().unwrap_or(0) as f64;
    Ok(Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: memory_bytes / 1024.0 / 1024.0 / 1024.0,
        kernel: procinfo::kernel_release().unwrap_or_default(),
        postgres: version.v,
        rabbitmq: servers.rabbitmq_image().to_owned(),
        postgres_fsync: fsync.v,
        aggregator_version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// A fresh database and queue of `queue_type`, declared and migrated.
async fn fresh_bed(servers: &Infra, queue_type: QueueType) -> anyhow::Result<TestBed> {
    let bed = TestBed::new(servers).await?;
    let mut config = bed.config("load-declarer");
    config.queue_type = queue_type;
    let session = vote_aggregator::broker::connect(&config).await?;
    let _ = session.connection.close(200, "declared".into()).await;
    db::run_migrations(&config.database_url).await?;
    Ok(bed)
}

async fn prefill(bed: &TestBed, workload: &Workload, opts: &LoadOptions) -> anyhow::Result<Ledger> {
    let mut ledger = Ledger::new(&bed.queue, opts.seed);
    publish_messages(
        &bed.amqp_url,
        &bed.queue,
        &workload.main,
        &PublishOptions {
            connections: 4,
            progress: opts.progress,
            ..PublishOptions::default()
        },
        &mut ledger,
    )
    .await?;
    Ok(ledger)
}

/// Receive-and-ack only: the fastest any consumer of this queue can go on this machine.
async fn broker_ceiling(
    servers: &Infra,
    workload: &Workload,
    queue_type: QueueType,
    batch: usize,
    opts: &LoadOptions,
) -> anyhow::Result<f64> {
    let bed = fresh_bed(servers, queue_type).await?;
    prefill(&bed, workload, opts).await?;
    let expected = workload.main.len();
    let conn = lapin::Connection::connect(&bed.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(
        (batch * opts.prefetch_factor.max(1)).min(65_535) as u16,
        BasicQosOptions::default(),
    )
    .await?;
    let mut consumer = ch
        .basic_consume(
            bed.queue.as_str().into(),
            "broker-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut received = 0usize;
    let mut first: Option<Instant> = None;
    let mut pending = 0usize;
    while received < expected {
        let next = tokio::time::timeout(Duration::from_millis(50), consumer.next()).await;
        match next {
            Ok(Some(d)) => {
                let d = d?;
                first.get_or_insert_with(Instant::now);
                received += 1;
                pending += 1;
                if pending >= batch || received == expected {
                    ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                        .await?;
                    pending = 0;
                }
            }
            Ok(None) => anyhow::bail!("broker ceiling consumer was cancelled"),
            Err(_) if first.is_some_and(|f| f.elapsed() > Duration::from_secs(300)) => {
                anyhow::bail!("broker ceiling consumer stalled at {received}/{expected}")
            }
            Err(_) => {}
        }
    }
    let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(1.0);
    let _ = conn.close(200, "done".into()).await;
    Ok(received as f64 / secs.max(0.001))
}

/// The batch statement fed from memory, one transaction at a time.
async fn db_ceiling(servers: &Infra, workload: &Workload, batch: usize) -> anyhow::Result<f64> {
    let bed = fresh_bed(servers, QueueType::Classic).await?;
    let url = SecretString::from(bed.database_url.clone());
    let pool = db::pool(&url, 1, &Default::default());
    let votes: Vec<_> = workload
        .main
        .iter()
        .filter_map(|m| match m {
            Message::Original(v) | Message::Duplicate(v) => Some(v),
            _ => None,
        })
        .collect();
    let batches: Vec<BatchColumns> = votes
        .chunks(batch)
        .map(|chunk| {
            let mut c = BatchColumns::default();
            let mut seen = std::collections::HashSet::new();
            for v in chunk {
                // The aggregator drops in-batch exact duplicates before the round trip.
                if seen.insert(v.vote_id) {
                    c.push(v, true);
                }
            }
            c
        })
        .collect();
    let started = Instant::now();
    let mut counted = 0usize;
    for (i, b) in batches.iter().enumerate() {
        let outcome = db::write_batch(&pool, &url, b, (i % 16) as i16).await?;
        counted += outcome.counted.len();
    }
    Ok(counted as f64 / started.elapsed().as_secs_f64().max(0.001))
}

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

async fn measure_config(
    servers: &infra::PrivateInfra,
    workload: &Workload,
    queue_type: QueueType,
    batch: usize,
    replicas: usize,
    opts: &LoadOptions,
) -> anyhow::Result<ConfigResult> {
    let bed = fresh_bed(servers, queue_type).await?;
    let ledger = prefill(&bed, workload, opts).await?;
    let expected = ledger.votes.len() as u64;
    let deliveries = expected + ledger.duplicates_sent;

    let log_dir = opts
        .out_dir
        .join("logs")
        .join(format!("{}-b{batch}-r{replicas}", queue_type.as_str()));
    std::fs::create_dir_all(&log_dir)?;
    let mut base_env = bed.replica_base_env();
    base_env.retain(|(k, _)| k != "QUEUE_TYPE");
    base_env.push(("QUEUE_TYPE".into(), queue_type.as_str().into()));
    base_env.push(("BATCH_SIZE".into(), batch.to_string()));
    let prefetch = (batch * opts.prefetch_factor.max(1)).min(65_535);
    base_env.push(("PREFETCH_COUNT".into(), prefetch.to_string()));
    base_env.push(("RUN_MIGRATIONS".into(), "false".into()));
    base_env.push(("RUST_LOG".into(), "warn".into()));
    let specs: Vec<ReplicaSpec> = (0..replicas)
        .map(|i| ReplicaSpec {
            name: format!("load-{}", i + 1),
            env: vec![],
        })
        .collect();
    let fleet = Fleet::start(FleetOptions::new(&log_dir, base_env)?, specs).await?;

    // Capacity: from the first counted vote to the last.
    let progress = Progress::new("draining", expected, opts.progress);
    let mut first: Option<(Instant, u64)> = None;
    let mut cpu_at_first: Option<CpuSample> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    let (drain_secs, counted_in_window) = loop {
        let counted: u64 = fleet
            .scrape_all()
            .await
            .into_iter()
            .flatten()
            .map(|s| s.counted())
            .sum();
        progress.set(counted);
        if counted > 0 && first.is_none() {
            first = Some((Instant::now(), counted));
            cpu_at_first = Some(CpuSample::take(servers, &fleet));
        }
        if counted >= expected {
            let (t, c0) = first.unwrap_or((Instant::now(), 0));
            break (t.elapsed().as_secs_f64(), counted - c0);
        }
        if Instant::now() > deadline {
            anyhow::bail!("drain did not finish in 10 minutes ({counted}/{expected})");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    progress.finish(expected);
    let drain_cpu = match cpu_at_first {
        Some(start) => {
            CpuSample::take(servers, &fleet).costs_since(&start, counted_in_window, drain_secs)
        }
        None => DrainCpu::default(),
    };
    let votes_per_second = counted_in_window as f64 / drain_secs.max(0.001);
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
    // The vote's cast_at is set at generation; generate just-in-time by publishing in
    // small rate-limited slices so cast_at stays within a few ms of the publish.
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
    for i in 0..fleet.len() {
        if let Some(pid) = fleet.pid(i) {
            cpu += process_cpu_seconds(pid).unwrap_or(0.0);
            peak_rss_kib = peak_rss_kib.max(procinfo::peak_rss_kib(pid).unwrap_or(0));
        }
    }
    let total_counted: CountRow = diesel::sql_query("SELECT count(*)::bigint AS n FROM votes")
        .get_result(db_view.connection())
        .await?;
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
        ratio_to_broker_ceiling: 0.0,
        ratio_to_db_ceiling: 0.0,
        steady_rate,
        latency_p50_ms: ms(0.50),
        latency_p95_ms: ms(0.95),
        latency_p99_ms: ms(0.99),
        latency_max_ms: hist.max() as f64 / 1000.0,
        latency_samples: hist.len(),
        drain_aggregator_cpu_seconds_per_1000_votes: drain_cpu.aggregator,
        drain_broker_cpu_seconds_per_1000_votes: drain_cpu.broker,
        drain_database_cpu_seconds_per_1000_votes: drain_cpu.database,
        drain_machine_cpu_share: drain_cpu.machine_share,
        drain_machine_busy_share: drain_cpu.machine_busy,
        cpu_bound_votes_per_second: drain_cpu.cpu_bound,
        cpu_seconds_per_1000_votes: cpu / (total_counted.n.max(1) as f64 / 1000.0),
        peak_rss_mib: peak_rss_kib as f64 / 1024.0,
        limited_by: String::new(),
    })
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

/// CPU seconds used so far by the replicas and the two server containers.
struct CpuSample {
    /// (busy, total) clock ticks of the whole machine.
    machine: Option<(u64, u64)>,
    aggregator: f64,
    broker: Option<f64>,
    database: Option<f64>,
}

/// Per-1000-vote CPU costs over a drain.
#[derive(Default)]
struct DrainCpu {
    aggregator: f64,
    broker: Option<f64>,
    database: Option<f64>,
    machine_share: Option<f64>,
    machine_busy: Option<f64>,
    cpu_bound: Option<f64>,
}

impl CpuSample {
    fn take(servers: &infra::PrivateInfra, fleet: &Fleet) -> Self {
        CpuSample {
            machine: procinfo::machine_ticks(),
            aggregator: (0..fleet.len())
                .filter_map(|i| fleet.pid(i).and_then(process_cpu_seconds))
                .sum(),
            broker: container_cpu_seconds(servers.rabbitmq_container_id()),
            database: container_cpu_seconds(servers.postgres_container_id()),
        }
    }

    fn costs_since(&self, start: &CpuSample, votes: u64, secs: f64) -> DrainCpu {
        let per_1000 = |now: f64, then: f64| (now - then) / (votes.max(1) as f64 / 1000.0);
        let aggregator = per_1000(self.aggregator, start.aggregator);
        let broker = self.broker.zip(start.broker).map(|(n, t)| per_1000(n, t));
        let database = self
            .database
            .zip(start.database)
            .map(|(n, t)| per_1000(n, t));
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        let total = broker.zip(database).map(|(b, d)| aggregator + b + d);
        DrainCpu {
            aggregator,
            broker,
            database,
            machine_share: total.map(|t| t * votes as f64 / 1000.0 / (secs.max(0.001) * cores)),
            machine_busy: self.machine.zip(start.machine).and_then(|(n, t)| {
                let total = n.1.checked_sub(t.1)?;
                (total > 0).then(|| n.0.saturating_sub(t.0) as f64 / total as f64)
            }),
            cpu_bound: total.map(|t| cores * 1000.0 / t.max(1e-9)),
        }
    }
}

/// CPU seconds used by a Docker container so far, from its cgroup (v1 `cpuacct` or v2
/// `cpu.stat`); `None` when neither can be read (e.g. a remote Docker host).
fn container_cpu_seconds(id: &str) -> Option<f64> {
    if let Ok(ns) =
        std::fs::read_to_string(format!("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage"))
    {
        return ns.trim().parse::<f64>().ok().map(|ns| ns / 1e9);
    }
    let stat = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat"
    ))
    .ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|us| us / 1e6)
}

/// User + system CPU seconds of a live process.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    procinfo::stat(pid).map(|s| s.cpu_seconds)
}
