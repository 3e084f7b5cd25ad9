//! `vote-tools load` (`make load`): capacity baselines measured against the machine's
//! own ceilings, in the same run.
//!
//! For every configuration (replicas × batch size × queue type) on fresh containers
//! (PostgreSQL with fsync ON, as in production):
//! 1. **capacity**: pre-fill the queue with N votes (plus `--duplicates`), start the replica
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
//! - **floor** (the `floor` module): the least any correct exactly-once consumer
//!   must do, co-located like the aggregator.
//!
//! Throughput is quoted as a ratio to those: on a shared, noisy machine a bare votes/s
//! figure means little. With `--rounds N` the whole matrix is measured N times, the
//! floors and the configurations in alternating order ([`DrainOrder`]), and each
//! configuration reports its median round. Timings are benchmarks, never test assertions.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use diesel::QueryableByName;
use diesel::sql_types::Text;
use serde::{Deserialize, Serialize};
use vote_aggregator::config::QueueType;
use vote_aggregator::config::variables as var;
use vote_aggregator::db::{self};

use vote_testkit::infra::{self, BrokerCluster, InfraOptions};
use vote_testkit::ledger::Ledger;
use vote_testkit::procinfo;
use vote_testkit::publish::{PublishOptions, publish_messages};
use vote_testkit::testbed::TestBed;
use vote_testkit::workload::{Workload, WorkloadSpec};

mod ceilings;
mod cpu;
mod floor;
mod measure;

use ceilings::{broker_ceiling, db_ceiling};
use floor::{FloorWrite, floor};
use measure::measure_config;

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
    /// Measure against a three-node RabbitMQ cluster (every queue's members on all three
    /// nodes; replicas and publishers given every node) instead of one broker.
    pub broker_cluster: bool,
    /// Reach the servers through Docker's published ports (its userland port proxy) and
    /// the test kit's fault proxies, as before, instead of directly on the host network:
    /// only to show what that path costs.
    pub via_port_proxy: bool,
    /// Also measure a second floor whose consumer writes each batch with the aggregator's
    /// own batch write (tally, results outbox, conflict judging, memory of recent votes)
    /// instead of the bare INSERT: the gap to the floor then splits into what that write
    /// costs and what the replica's process (consume loop, metrics, results relay) costs.
    pub floor_with_aggregator_write: bool,
    /// Times the whole matrix is measured, in alternating [`DrainOrder`]; each
    /// configuration reports the round with its median `ratio_to_floor`, and the range
    /// over the rounds.
    pub rounds: usize,
    /// Service variables set on every replica on top of the runner's own (see
    /// [`parse_replica_env`]).
    pub replica_env: Vec<(String, String)>,
}

/// Variables the runner sets itself for each configuration: `--replica-env` may not
/// change them (the figures would not describe the configuration they are filed under).
const RUNNER_OWNED_VARIABLES: &[&str] = &[
    var::DATABASE_URL,
    var::DATABASE_URL_FILE,
    var::AMQP_URL,
    var::AMQP_URL_FILE,
    var::QUEUE_NAME,
    var::QUEUE_TYPE,
    var::BATCH_SIZE,
    var::PREFETCH_COUNT,
    var::METRICS_ADDR,
    var::REPLICA_ID,
];

/// Parses one `--replica-env NAME=VALUE`: NAME must be a service variable the runner does
/// not set itself. The value is checked by the replicas at start-up (a bad one fails the
/// run with their error).
///
/// # Errors
/// When there is no `=`, or NAME is unknown or owned by the runner.
pub fn parse_replica_env(arg: &str) -> Result<(String, String), String> {
    let Some((name, value)) = arg.split_once('=') else {
        return Err(format!("'{arg}' is not NAME=VALUE"));
    };
    if !var::VARIABLES.iter().any(|v| v.name == name) {
        return Err(format!(
            "{name} is not a service variable (see `vote-aggregator --help`)"
        ));
    }
    if RUNNER_OWNED_VARIABLES.contains(&name) {
        return Err(format!(
            "{name} is set by the load runner for each configuration; use its own options"
        ));
    }
    Ok((name.to_string(), value.to_string()))
}

/// The servers of a run: the private pair, and with [`LoadOptions::broker_cluster`] the
/// three-node RabbitMQ cluster that replaces the pair's broker (which is then stopped).
pub(super) struct Servers {
    pub pair: infra::PrivateInfra,
    pub brokers: Option<BrokerCluster>,
}

impl Servers {
    /// The container ids of the broker's node(s), for the CPU figures.
    pub fn broker_container_ids(&self) -> Vec<&str> {
        match &self.brokers {
            Some(b) => (0..b.len()).map(|i| b.container_id(i)).collect(),
            None => vec![self.pair.rabbitmq_container_id()],
        }
    }
}

/// Rolls a broker's quorum-queue log (the Ra WAL) over to a new file (an asynchronous
/// request: `sys:get_state` returns once the log has taken it) and waits for its segment
/// writer, which writes the old file's messages out to segment files.
const SETTLE_QUORUM_LOG: &str = "ra_log_wal:force_roll_over(ra_log_wal), \
     _ = sys:get_state(ra_log_wal), \
     ok = ra_log_segment_writer:await(ra_log_segment_writer).";
/// Counts a broker's quorum-queue log files: one (the new file) once the old one is
/// written out and deleted; none would mean the path is wrong, and the wait fails.
const COUNT_QUORUM_LOG_FILES: &str =
    "find /var/lib/rabbitmq -path '*quorum*' -name '*.wal' | wc -l";
/// Longest a broker may take to write out its old quorum-queue log.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

impl Servers {
    /// Runs `cmd` in broker node `node` (the pair's one broker without a cluster).
    async fn exec_in_broker(&self, node: usize, cmd: &[&str]) -> anyhow::Result<String> {
        match &self.brokers {
            Some(brokers) => brokers.exec(node, cmd).await,
            None => self.pair.exec_in_rabbitmq(cmd).await,
        }
    }

    /// Brings the servers to the same state before each drain, so that no drain pays for
    /// work an earlier phase left behind. Without it, RabbitMQ rolled its quorum-queue
    /// log over every 512 MiB (`wal_max_size_bytes`), at the same points of every run's
    /// sequence of pre-fills, and writing out the unread messages of the old log
    /// competed with whichever drain started then: in four runs of three rounds each, the
    /// second round's floor and the third round's aggregator drained slower every time.
    /// PostgreSQL is checkpointed too (dropping a bed's database requests a checkpoint,
    /// which would otherwise land in the next phase).
    ///
    /// # Errors
    /// When a server cannot be reached or refuses.
    pub(super) async fn settle(&self) -> anyhow::Result<()> {
        let nodes = self.brokers.as_ref().map_or(1, BrokerCluster::len);
        for node in 0..nodes {
            self.exec_in_broker(node, &["rabbitmqctl", "-q", "eval", SETTLE_QUORUM_LOG])
                .await?;
            let deadline = Instant::now() + SETTLE_LIMIT;
            loop {
                let files = self
                    .exec_in_broker(node, &["sh", "-c", COUNT_QUORUM_LOG_FILES])
                    .await?;
                if files.trim().parse::<u32>().is_ok_and(|n| n == 1) {
                    break;
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "RabbitMQ node {node} still had {} quorum log files {SETTLE_LIMIT:?} after \
                         rolling its log over: is its disk that slow?",
                        files.trim()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
        let mut conn = AsyncPgConnection::establish(&self.pair.admin_database_url()).await?;
        diesel::sql_query("CHECKPOINT").execute(&mut conn).await?;
        Ok(())
    }
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
    /// How clients reached the servers: `host network (loopback)` or `docker port proxy`.
    #[serde(default)]
    pub data_path: String,
    /// Version of vote-aggregator.
    pub aggregator_version: String,
}

/// One configuration's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// The floor of exactly-once ingest (see `floor`), same queue type, batch size and
    /// prefetch, co-located like the aggregator: votes/s.
    pub floor_votes_per_second: f64,
    /// `votes_per_second / floor_votes_per_second`: the share of the machine's real
    /// capacity for exactly-once ingest that the aggregator achieves.
    pub ratio_to_floor: f64,
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
    /// During the floor's drain, CPU seconds per 1000 votes of the floor consumer's
    /// process (the load runner, in which nothing else runs meanwhile; `None` when the
    /// test kit's proxies run in it too: `--via-port-proxy`, `--broker-cluster`). Beside
    /// `drain_aggregator_cpu_seconds_per_1000_votes`.
    #[serde(default)]
    pub floor_consumer_cpu_seconds_per_1000_votes: Option<f64>,
    /// During the capacity drain, context switches of the replicas' threads per 1000
    /// counted votes (how often they waited and were woken)...
    #[serde(default)]
    pub drain_aggregator_context_switches_per_1000_votes: Option<f64>,
    /// ... and of the floor consumer's process during the floor's drain (`None` under the
    /// same condition as its CPU).
    #[serde(default)]
    pub floor_consumer_context_switches_per_1000_votes: Option<f64>,
    /// During the floor's drain, CPU seconds per 1000 votes of the RabbitMQ container(s).
    #[serde(default)]
    pub floor_broker_cpu_seconds_per_1000_votes: Option<f64>,
    /// During the floor's drain, CPU seconds per 1000 votes of the PostgreSQL container.
    #[serde(default)]
    pub floor_database_cpu_seconds_per_1000_votes: Option<f64>,
    /// Share of the machine's CPU busy during the floor's drain, whoever used it: near 1
    /// when the cores bounded the floor too.
    #[serde(default)]
    pub floor_machine_busy_share: Option<f64>,
    /// What the measured per-vote CPU costs allow on this many cores if nothing else
    /// waited: cores / (CPU seconds per vote, summed over the three). A ceiling for the
    /// whole pipeline on this machine.
    pub cpu_bound_votes_per_second: Option<f64>,
    /// What bounded this configuration, judged from the ratios and CPU use.
    pub limited_by: String,
    /// Rounds this configuration was measured in; the figures are those of the round
    /// with the median `ratio_to_floor`.
    #[serde(default = "one_round")]
    pub rounds: usize,
    /// Lowest and highest `ratio_to_floor` over the rounds.
    #[serde(default)]
    pub ratio_to_floor_range: (f64, f64),
    /// With `--floor-with-aggregator-write`: the second floor, measured in the same round.
    #[serde(default)]
    pub floor_with_aggregator_write: Option<WriteFloor>,
    /// Every round's headline figures, in the order measured (one with `--rounds 1`; the
    /// other fields are the median round's).
    #[serde(default)]
    pub every_round: Vec<RoundFigures>,
    /// Whether the round these figures are from drained the floors or the aggregator
    /// first.
    #[serde(default)]
    pub drain_order: DrainOrder,
    /// Of every duplicate the replicas counted (copies within one batch included), the
    /// share recognised by the replica that had stored the original itself, from its
    /// memory, without reading `votes`. Read when the configuration ends: the drain's
    /// duplicates, and any a publisher retry in the latency phase made. `None` when there
    /// were none or a replica's metrics could not be read.
    #[serde(default)]
    pub duplicates_from_memory_share: Option<f64>,
}

impl ConfigResult {
    /// CPU seconds per 1000 votes during the aggregator's drain: the replicas, RabbitMQ,
    /// PostgreSQL (a server's `None` when its CPU could not be read).
    pub fn cpu_parts(&self) -> [Option<f64>; 3] {
        [
            Some(self.drain_aggregator_cpu_seconds_per_1000_votes),
            self.drain_broker_cpu_seconds_per_1000_votes,
            self.drain_database_cpu_seconds_per_1000_votes,
        ]
    }

    /// The same during the floor's drain: its consumer, RabbitMQ, PostgreSQL.
    pub fn floor_cpu_parts(&self) -> [Option<f64>; 3] {
        [
            self.floor_consumer_cpu_seconds_per_1000_votes,
            self.floor_broker_cpu_seconds_per_1000_votes,
            self.floor_database_cpu_seconds_per_1000_votes,
        ]
    }

    /// The sum of [`cpu_parts`](Self::cpu_parts); `None` when one is.
    pub fn cpu_total(&self) -> Option<f64> {
        self.cpu_parts().into_iter().sum()
    }

    /// The sum of [`floor_cpu_parts`](Self::floor_cpu_parts); `None` when one is.
    pub fn floor_cpu_total(&self) -> Option<f64> {
        self.floor_cpu_parts().into_iter().sum()
    }

    /// Floor CPU total ÷ aggregator CPU total: the share of the floor a drain bound by the
    /// cores can reach with these per-vote costs.
    pub fn cpu_ratio_of_totals(&self) -> Option<f64> {
        Some(self.floor_cpu_total()? / self.cpu_total()?.max(1e-9))
    }
}

/// One round's headline figures for a configuration: the rate ratio beside the ratio of
/// CPU per vote and how busy the machine was, which tell whether the drains differed by
/// CPU per vote or by waiting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundFigures {
    /// The aggregator's counted votes/s.
    pub votes_per_second: f64,
    /// The floor's votes/s in the same round.
    pub floor_votes_per_second: f64,
    /// `votes_per_second / floor_votes_per_second`.
    pub ratio_to_floor: f64,
    /// See [`ConfigResult::cpu_ratio_of_totals`].
    pub cpu_ratio_of_totals: Option<f64>,
    /// See [`ConfigResult::cpu_parts`].
    #[serde(default)]
    pub cpu_seconds_per_1000_votes: [Option<f64>; 3],
    /// See [`ConfigResult::floor_cpu_parts`].
    #[serde(default)]
    pub floor_cpu_seconds_per_1000_votes: [Option<f64>; 3],
    /// Share of the machine busy (whoever used it) during the aggregator's drain.
    pub machine_busy_share: Option<f64>,
    /// Share of the machine busy during the floor's drain.
    pub floor_machine_busy_share: Option<f64>,
    /// See [`ConfigResult::drain_order`].
    #[serde(default)]
    pub drain_order: DrainOrder,
    /// See [`ConfigResult::duplicates_from_memory_share`].
    #[serde(default)]
    pub duplicates_from_memory_share: Option<f64>,
    /// Context switches per 1000 votes of the replicas and of the floor consumer
    /// ([`ConfigResult::drain_aggregator_context_switches_per_1000_votes`]).
    #[serde(default)]
    pub context_switches_per_1000_votes: [Option<f64>; 2],
}

impl RoundFigures {
    fn of(c: &ConfigResult) -> Self {
        RoundFigures {
            votes_per_second: c.votes_per_second,
            floor_votes_per_second: c.floor_votes_per_second,
            ratio_to_floor: c.ratio_to_floor,
            cpu_ratio_of_totals: c.cpu_ratio_of_totals(),
            cpu_seconds_per_1000_votes: c.cpu_parts(),
            floor_cpu_seconds_per_1000_votes: c.floor_cpu_parts(),
            machine_busy_share: c.drain_machine_busy_share,
            floor_machine_busy_share: c.floor_machine_busy_share,
            drain_order: c.drain_order,
            duplicates_from_memory_share: c.duplicates_from_memory_share,
            context_switches_per_1000_votes: [
                c.drain_aggregator_context_switches_per_1000_votes,
                c.floor_consumer_context_switches_per_1000_votes,
            ],
        }
    }
}

/// The floor whose consumer writes each batch with the aggregator's own batch write
/// (`--floor-with-aggregator-write`), measured beside the bare floor: the bare floor's
/// rate against it is what that write costs, and it against the aggregator what the
/// replica's process costs beyond the write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteFloor {
    /// Counted votes/s of its drain.
    pub votes_per_second: f64,
    /// CPU seconds per 1000 votes of its consumer's process during the drain (`None` when
    /// the test kit's proxies run in it too).
    pub consumer_cpu_seconds_per_1000_votes: Option<f64>,
    /// CPU seconds per 1000 votes of the RabbitMQ container(s) during its drain.
    pub broker_cpu_seconds_per_1000_votes: Option<f64>,
    /// CPU seconds per 1000 votes of the PostgreSQL container during its drain.
    pub database_cpu_seconds_per_1000_votes: Option<f64>,
}

fn one_round() -> usize {
    1
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
    /// `--replica-env` variables every replica ran with, beside the runner's own.
    #[serde(default)]
    pub replica_env: Vec<(String, String)>,
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
    // Fresh private servers with fsync ON: baselines must pay for durability. On the host
    // network (loopback ports) unless asked otherwise: no proxy copies the data.
    let pair = infra::start_private(InfraOptions {
        fsync: true,
        host_network: !opts.via_port_proxy,
        ..InfraOptions::default()
    })
    .await?;
    let brokers = if opts.broker_cluster {
        let brokers = infra::start_broker_cluster().await?;
        pair.stop_rabbitmq().await?;
        Some(brokers)
    } else {
        None
    };
    let servers = Servers { pair, brokers };
    let mut machine = machine(&servers).await?;
    machine.data_path = match (opts.via_port_proxy, opts.broker_cluster) {
        (true, _) => "docker port proxy + test-kit proxy".into(),
        // The cluster's nodes sit behind test-kit proxies on their own Docker networks.
        (false, true) => {
            "PostgreSQL: host network (loopback); RabbitMQ cluster: test-kit proxies".into()
        }
        (false, false) => "host network (loopback)".into(),
    };
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

    let mut rounds = Vec::with_capacity(opts.rounds);
    for round in 1..=opts.rounds.max(1) {
        if opts.rounds > 1 {
            eprintln!("load: round {round}/{}", opts.rounds);
        }
        rounds.push(measure_round(&servers, &workload, opts, round).await?);
    }
    let configs = median_rounds(rounds);
    Ok(LoadReport {
        started_at,
        wall_seconds: started.elapsed().as_secs_f64(),
        command,
        votes: opts.votes,
        duplicates: opts.duplicates,
        steady_seconds: opts.steady.as_secs_f64(),
        seed: opts.seed,
        replica_env: opts.replica_env.clone(),
        machine,
        configs,
    })
}

/// Which drains of a queue type and batch size go first in a round.
///
/// Odd rounds drain the floors, then the replica configurations in `--replicas` order;
/// even rounds the mirror image: the configurations in reverse, then the floors in
/// reverse. Whatever a drain leaves behind for the next one, or a machine that slows
/// during a round, then falls on the floor and the aggregator alike over the rounds,
/// instead of always on whichever is measured later. The ceilings (broker, then database)
/// come first either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainOrder {
    /// The floors, then the configurations (every round before this order existed).
    #[default]
    FloorsFirst,
    /// The configurations in reverse, then the floors in reverse.
    AggregatorFirst,
}

impl DrainOrder {
    /// The order of round `round`, counted from 1.
    pub fn of_round(round: usize) -> Self {
        if round.is_multiple_of(2) {
            DrainOrder::AggregatorFirst
        } else {
            DrainOrder::FloorsFirst
        }
    }

    /// `items` in this order's sequence (reversed when the aggregator goes first).
    fn arrange<T: Copy>(self, items: &[T]) -> Vec<T> {
        match self {
            DrainOrder::FloorsFirst => items.to_vec(),
            DrainOrder::AggregatorFirst => items.iter().rev().copied().collect(),
        }
    }

    /// How the report shows it.
    pub fn shown(self) -> &'static str {
        match self {
            DrainOrder::FloorsFirst => "floors first",
            DrainOrder::AggregatorFirst => "aggregator first",
        }
    }
}

/// The two ceilings of one queue type and batch size in a round.
#[derive(Clone, Copy)]
struct Ceilings {
    broker: f64,
    database: f64,
}

/// The floors of one queue type and batch size in a round.
struct Floors {
    bare: floor::Floor,
    /// With `--floor-with-aggregator-write`.
    with_aggregator_write: Option<floor::Floor>,
}

/// Where a round is: configurations measured so far, and in all.
struct RoundProgress {
    done: usize,
    total: usize,
}

/// One round (counted from 1): every ceiling, floor and configuration of the matrix, in
/// the round's [`DrainOrder`]. The configurations come back in the same order every
/// round (queue type, batch size, then `--replicas` order): [`median_rounds`] matches
/// rounds by position.
async fn measure_round(
    servers: &Servers,
    workload: &Workload,
    opts: &LoadOptions,
    round: usize,
) -> anyhow::Result<Vec<ConfigResult>> {
    let order = DrainOrder::of_round(round);
    let mut db_ceilings: HashMap<usize, f64> = HashMap::new();
    let mut configs = Vec::new();
    let mut progress = RoundProgress {
        done: 0,
        total: opts.queue_types.len() * opts.batch_sizes.len() * opts.replicas.len(),
    };
    for &queue_type in &opts.queue_types {
        for &batch in &opts.batch_sizes {
            let broker = broker_ceiling(servers, workload, queue_type, batch, opts).await?;
            eprintln!(
                "load: broker ceiling {} batch {batch}: {broker:.0} deliveries/s",
                queue_type.as_str()
            );
            // No broker in it: one per batch size serves every queue type.
            let database = match db_ceilings.entry(batch) {
                Entry::Occupied(e) => *e.get(),
                Entry::Vacant(e) => {
                    let c = db_ceiling(servers, workload, batch).await?;
                    eprintln!("load: database ceiling batch {batch}: {c:.0} votes/s");
                    *e.insert(c)
                }
            };
            let ceilings = Ceilings { broker, database };
            let group = (queue_type, batch);
            let (floors, measured) = match order {
                DrainOrder::FloorsFirst => {
                    let floors = measure_floors(servers, workload, group, order, opts).await?;
                    let measured =
                        measure_configs(servers, workload, group, order, opts, &mut progress)
                            .await?;
                    (floors, measured)
                }
                DrainOrder::AggregatorFirst => {
                    let measured =
                        measure_configs(servers, workload, group, order, opts, &mut progress)
                            .await?;
                    let floors = measure_floors(servers, workload, group, order, opts).await?;
                    (floors, measured)
                }
            };
            for mut r in measured {
                r.drain_order = order;
                relate(&mut r, ceilings, &floors);
                configs.push(r);
            }
        }
    }
    Ok(configs)
}

/// The floors of one queue type and batch size (the bare one, and with
/// `--floor-with-aggregator-write` the one with the aggregator's write), in `order`.
async fn measure_floors(
    servers: &Servers,
    workload: &Workload,
    (queue_type, batch): (QueueType, usize),
    order: DrainOrder,
    opts: &LoadOptions,
) -> anyhow::Result<Floors> {
    let writes: &[FloorWrite] = if opts.floor_with_aggregator_write {
        &[FloorWrite::Insert, FloorWrite::Aggregator]
    } else {
        &[FloorWrite::Insert]
    };
    let (mut bare, mut with_aggregator_write) = (None, None);
    for write in order.arrange(writes) {
        let f = floor(servers, workload, queue_type, batch, write, opts).await?;
        eprintln!(
            "load: {} {} batch {batch}: {:.0} votes/s",
            write.shown(),
            queue_type.as_str(),
            f.votes_per_second
        );
        match write {
            FloorWrite::Insert => bare = Some(f),
            FloorWrite::Aggregator => with_aggregator_write = Some(f),
        }
    }
    let bare = bare.context("the bare floor is measured in every round")?;
    Ok(Floors {
        bare,
        with_aggregator_write,
    })
}

/// Every replica count of one queue type and batch size, drained in `order` and returned
/// in `--replicas` order (see [`measure_round`]).
async fn measure_configs(
    servers: &Servers,
    workload: &Workload,
    (queue_type, batch): (QueueType, usize),
    order: DrainOrder,
    opts: &LoadOptions,
    progress: &mut RoundProgress,
) -> anyhow::Result<Vec<ConfigResult>> {
    let mut measured = Vec::with_capacity(opts.replicas.len());
    for replicas in order.arrange(&opts.replicas) {
        progress.done += 1;
        eprintln!(
            "load: [{}/{}] {replicas} replica(s), batch {batch}, {} queue",
            progress.done,
            progress.total,
            queue_type.as_str()
        );
        let r = measure_config(servers, workload, queue_type, batch, replicas, opts).await?;
        measured.push(r);
    }
    if order == DrainOrder::AggregatorFirst {
        measured.reverse();
    }
    Ok(measured)
}

/// Sets `r`'s ceilings and floor figures, its ratios to them and what bounded it, and
/// prints its line.
fn relate(r: &mut ConfigResult, ceilings: Ceilings, floors: &Floors) {
    let f = &floors.bare;
    r.broker_ceiling_votes_per_second = ceilings.broker;
    r.db_ceiling_votes_per_second = ceilings.database;
    r.floor_votes_per_second = f.votes_per_second;
    r.floor_consumer_cpu_seconds_per_1000_votes = f.consumer_cpu;
    r.floor_consumer_context_switches_per_1000_votes = f.consumer_switches;
    r.floor_broker_cpu_seconds_per_1000_votes = f.cpu.broker;
    r.floor_database_cpu_seconds_per_1000_votes = f.cpu.database;
    r.floor_machine_busy_share = f.cpu.machine_busy;
    r.floor_with_aggregator_write = floors
        .with_aggregator_write
        .as_ref()
        .map(floor::Floor::as_write_floor);
    r.ratio_to_floor = r.votes_per_second / r.floor_votes_per_second.max(1.0);
    r.ratio_to_floor_range = (r.ratio_to_floor, r.ratio_to_floor);
    r.ratio_to_broker_ceiling =
        r.deliveries_per_second / r.broker_ceiling_votes_per_second.max(1.0);
    r.ratio_to_db_ceiling = r.votes_per_second / r.db_ceiling_votes_per_second.max(1.0);
    r.limited_by = limited_by(r);
    eprintln!(
        "load:   {} replica(s), {} queue: {:.0} votes/s ({:.2} of the floor, {:.0}% of broker ceiling, {:.0}% of database ceiling) · p99 {:.1} ms · {:.3} CPU s/1000 votes · peak RSS {:.1} MiB",
        r.replicas,
        r.queue_type,
        r.votes_per_second,
        r.ratio_to_floor,
        r.ratio_to_broker_ceiling * 100.0,
        r.ratio_to_db_ceiling * 100.0,
        r.latency_p99_ms,
        r.cpu_seconds_per_1000_votes,
        r.peak_rss_mib
    );
}

/// Per configuration (same position in every round), the round with the median
/// `ratio_to_floor` (the lower middle one for an even count), with the round count and the
/// ratio's range: on a shared, noisy machine one drain can be off by a tenth either way.
fn median_rounds(rounds: Vec<Vec<ConfigResult>>) -> Vec<ConfigResult> {
    let n = rounds.first().map_or(0, Vec::len);
    let mut by_config: Vec<Vec<ConfigResult>> = (0..n).map(|_| Vec::new()).collect();
    for round in rounds {
        for (i, c) in round.into_iter().enumerate() {
            if let Some(samples) = by_config.get_mut(i) {
                samples.push(c);
            }
        }
    }
    by_config
        .into_iter()
        .filter_map(|mut samples| {
            let every_round = samples.iter().map(RoundFigures::of).collect();
            samples.sort_by(|a, b| a.ratio_to_floor.total_cmp(&b.ratio_to_floor));
            let range = (
                samples.first()?.ratio_to_floor,
                samples.last()?.ratio_to_floor,
            );
            let count = samples.len();
            let mut median = samples.swap_remove(lower_middle(count));
            median.rounds = count;
            median.ratio_to_floor_range = range;
            median.every_round = every_round;
            Some(median)
        })
        .collect()
}

/// Index of the median of `len` sorted figures: the lower middle one for an even count
/// (0 for none).
pub(crate) fn lower_middle(len: usize) -> usize {
    len.saturating_sub(1) / 2
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

async fn machine(servers: &Servers) -> anyhow::Result<Machine> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        v: String,
    }
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    let mut conn = AsyncPgConnection::establish(&servers.pair.admin_database_url()).await?;
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
        rabbitmq: match &servers.brokers {
            Some(b) => format!(
                "{} × {} nodes (cluster)",
                servers.pair.rabbitmq_image(),
                b.len()
            ),
            None => servers.pair.rabbitmq_image().to_owned(),
        },
        postgres_fsync: fsync.v,
        data_path: String::new(),
        aggregator_version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// A fresh database and queue of `queue_type`, declared and migrated.
pub(super) async fn fresh_bed(servers: &Servers, queue_type: QueueType) -> anyhow::Result<TestBed> {
    let mut bed = TestBed::new(&servers.pair).await?;
    if let Some(brokers) = &servers.brokers {
        bed.amqp_url = brokers.amqp_url_list();
    }
    let mut config = bed.config("load-declarer");
    config.queue_type = queue_type;
    let session = vote_aggregator::broker::connect_first(&config).await?;
    let _ = session.connection.close(200, "declared".into()).await;
    db::run_migrations(&config.database_url).await?;
    Ok(bed)
}

/// The URL of the bed's broker, or of the first node of a cluster (the queue's leader
/// serves a consumer from wherever it is): what a single-connection consumer uses.
fn first_node(bed: &TestBed) -> String {
    vote_testkit::nodes::node_urls(&bed.amqp_url)
        .into_iter()
        .next()
        .unwrap_or_else(|| bed.amqp_url.clone())
}

/// A consumer of the bed's queue on the first node, with the aggregator's prefetch
/// (`batch` × prefetch factor): the connection, its channel (to ack on) and the stream.
pub(super) async fn consume(
    bed: &TestBed,
    batch: usize,
    opts: &LoadOptions,
    tag: &str,
) -> anyhow::Result<(lapin::Connection, lapin::Channel, lapin::Consumer)> {
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    let conn = lapin::Connection::connect(&first_node(bed), Default::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(
        (batch * opts.prefetch_factor.max(1)).min(65_535) as u16,
        BasicQosOptions::default(),
    )
    .await?;
    let consumer = ch
        .basic_consume(
            bed.queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await?;
    Ok((conn, ch, consumer))
}

/// Votes per second of a finished drain, read from the database: the votes stored, over
/// the span of their `recorded_at` (each row's own insert time). The floor and the
/// aggregator are measured by this one clock and definition (the aggregator's drain also
/// polls the replicas' metrics, every 100 ms, only to find its end and to place the CPU
/// window).
///
/// # Errors
/// When the database cannot be read.
pub(super) async fn stored_rate(bed: &TestBed) -> anyhow::Result<f64> {
    #[derive(diesel::QueryableByName)]
    struct Span {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        secs: f64,
    }
    use diesel_async::RunQueryDsl as _;
    let mut db = bed.db().await?;
    let span: Span = diesel::sql_query(
        "SELECT count(*)::bigint AS n, \
         coalesce(EXTRACT(EPOCH FROM max(recorded_at) - min(recorded_at)), 0)::float8 AS secs \
         FROM votes",
    )
    .get_result(db.connection())
    .await?;
    Ok(span.n as f64 / span.secs.max(0.001))
}

/// Pre-fills the bed's queue with the workload, then settles the servers
/// ([`Servers::settle`]): the drain that follows starts from the same state as every other.
pub(super) async fn prefill(
    servers: &Servers,
    bed: &TestBed,
    workload: &Workload,
    opts: &LoadOptions,
) -> anyhow::Result<Ledger> {
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
    servers.settle().await?;
    Ok(ledger)
}

#[cfg(test)]
mod tests {
    use super::{ConfigResult, median_rounds, parse_replica_env};

    /// A round's result for one configuration: its rates, and CPU per 1000 votes of the
    /// consumer, the broker and the database, the same for the floor's drain as for the
    /// aggregator's except the consumer's.
    fn round(votes: f64, floor: f64, consumer: f64, floor_consumer: f64) -> ConfigResult {
        ConfigResult {
            votes_per_second: votes,
            floor_votes_per_second: floor,
            ratio_to_floor: votes / floor,
            drain_aggregator_cpu_seconds_per_1000_votes: consumer,
            drain_broker_cpu_seconds_per_1000_votes: Some(0.02),
            drain_database_cpu_seconds_per_1000_votes: Some(0.01),
            floor_consumer_cpu_seconds_per_1000_votes: Some(floor_consumer),
            floor_broker_cpu_seconds_per_1000_votes: Some(0.02),
            floor_database_cpu_seconds_per_1000_votes: Some(0.01),
            ..ConfigResult::default()
        }
    }

    #[test]
    fn odd_rounds_drain_the_floors_first_and_even_rounds_the_mirror_image() {
        use super::DrainOrder;
        assert_eq!(DrainOrder::of_round(1), DrainOrder::FloorsFirst);
        assert_eq!(DrainOrder::of_round(2), DrainOrder::AggregatorFirst);
        assert_eq!(DrainOrder::of_round(3), DrainOrder::FloorsFirst);
        assert_eq!(DrainOrder::FloorsFirst.arrange(&[1, 3]), vec![1, 3]);
        assert_eq!(DrainOrder::AggregatorFirst.arrange(&[1, 3]), vec![3, 1]);
    }

    #[test]
    fn a_round_of_an_older_report_reads_as_floors_first_with_no_share() {
        use super::DrainOrder;
        // Reports written before the order existed were all floors first.
        let old: super::RoundFigures = serde_json::from_str(
            r#"{"votes_per_second":1.0,"floor_votes_per_second":1.0,"ratio_to_floor":1.0,
                "cpu_ratio_of_totals":null,"machine_busy_share":null,"floor_machine_busy_share":null}"#,
        )
        .unwrap();
        assert_eq!(old.drain_order, DrainOrder::FloorsFirst);
        assert_eq!(old.duplicates_from_memory_share, None);
    }

    #[test]
    fn the_median_round_keeps_every_round_in_the_order_measured() {
        let rounds = vec![
            vec![round(80.0, 100.0, 0.02, 0.02)],
            vec![round(100.0, 100.0, 0.02, 0.02)],
            vec![round(90.0, 100.0, 0.03, 0.02)],
        ];
        let [median]: [ConfigResult; 1] = median_rounds(rounds).try_into().unwrap();
        assert_eq!(median.votes_per_second, 90.0);
        assert_eq!(median.rounds, 3);
        assert_eq!(median.ratio_to_floor_range, (0.8, 1.0));
        let ratios: Vec<f64> = median
            .every_round
            .iter()
            .map(|r| r.ratio_to_floor)
            .collect();
        assert_eq!(ratios, [0.8, 1.0, 0.9]);
        let cpu: Vec<f64> = median
            .every_round
            .iter()
            .map(|r| (r.cpu_ratio_of_totals.unwrap() * 100.0).round() / 100.0)
            .collect();
        // 0.05 / 0.05 in the first two rounds, 0.05 / 0.06 in the third.
        assert_eq!(cpu, [1.0, 1.0, 0.83]);
        let third = &median.every_round[2];
        assert_eq!(
            third.cpu_seconds_per_1000_votes,
            [Some(0.03), Some(0.02), Some(0.01)]
        );
        assert_eq!(
            third.floor_cpu_seconds_per_1000_votes,
            [Some(0.02), Some(0.02), Some(0.01)]
        );
    }

    #[test]
    fn no_cpu_ratio_without_the_servers_cpu() {
        let mut r = round(90.0, 100.0, 0.02, 0.02);
        r.floor_broker_cpu_seconds_per_1000_votes = None;
        assert_eq!(r.cpu_ratio_of_totals(), None);
        r = round(90.0, 100.0, 0.02, 0.02);
        r.drain_database_cpu_seconds_per_1000_votes = None;
        assert_eq!(r.cpu_ratio_of_totals(), None);
    }

    #[test]
    fn replica_env_takes_a_service_variable_the_runner_does_not_set() {
        assert_eq!(
            parse_replica_env("RESULTS_RELAY=false"),
            Ok(("RESULTS_RELAY".into(), "false".into()))
        );
        // The value may itself hold '=' (only the first splits).
        assert_eq!(
            parse_replica_env("RUST_LOG=a=b").map(|(_, v)| v),
            Ok("a=b".into())
        );
    }

    #[test]
    fn replica_env_refuses_what_would_mislabel_or_do_nothing() {
        let err = |arg: &str| parse_replica_env(arg).unwrap_err();
        assert!(err("RESULTS_RELAY").contains("not NAME=VALUE"));
        assert!(err("NO_SUCH_SETTING=1").contains("not a service variable"));
        assert!(err("BATCH_SIZE=100").contains("set by the load runner"));
        assert!(err("DATABASE_URL=postgres://x").contains("set by the load runner"));
    }
}
