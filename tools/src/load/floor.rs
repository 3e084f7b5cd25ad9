//! The floor of exactly-once ingest: the least any correct implementation must do to
//! store each vote once, measured in the same run and co-located like the aggregator.
//!
//! A minimal consumer, in this process: receive with the aggregator's prefetch, decode
//! each vote with the aggregator's own decoder, write each batch's full rows (the same
//! columns as `votes`) with one prepared `INSERT … ON CONFLICT (vote_id) DO NOTHING` in one
//! transaction (BEGIN sent in the same flight as the INSERT, as the aggregator does),
//! COMMIT (fsync on, like the load servers), ack the batch with one
//! `multiple` ack, with the aggregator's commit pipeline depth (two batches committing
//! while the next fills; acks strictly in delivery order). Nothing else: no tally, no
//! conflict judging, no dead-lettering, no metrics, no retries (a failure ends the run).
//!
//! `ratio_to_floor` = aggregator votes/s ÷ this: how much of the machine's real capacity
//! for exactly-once ingest the design gives away.
//!
//! With `--floor-with-aggregator-write` a second floor is measured: the same consumer,
//! writing each batch with the aggregator's own batch write instead
//! (`db::write_batch_attempt`: tally, results outbox, conflict judging, the memory of
//! recent votes, in-batch copies dropped first, as a replica does). The bare floor against
//! it is what that write costs; it against the aggregator, what the replica's process
//! (consume loop, metrics, results relay, one thread) costs beyond the write.
//!
//! The CPU each floor's drain costs per vote (this process, RabbitMQ, PostgreSQL) is
//! reported beside the aggregator's: where the extra cost goes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Array, Nullable, Text, Timestamptz, Uuid};
use diesel_async::RunQueryDsl as _;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;
use lapin::options::BasicAckOptions;
use secrecy::SecretString;
use tokio::task::JoinHandle;
use vote_aggregator::config::QueueType;
use vote_aggregator::db::{self, DistinctRows, PgPool, RecentlyStored, txn};
use vote_aggregator::vote::{self, Vote};

use vote_testkit::workload::Workload;

use super::cpu::{CpuWindow, DrainCpu};
use super::{LoadOptions, Servers, WriteFloor, consume, fresh_bed, prefill, stored_rate};

/// The aggregator's commit pipeline depth (`consumer::pipeline`): batches committing at
/// once while the next one fills.
const PIPELINE_DEPTH: usize = 2;
/// The aggregator's default `BATCH_TIMEOUT_MS`: a partial batch is written after this
/// long without a new delivery.
const BATCH_TIMEOUT: Duration = Duration::from_millis(50);
/// A drain that makes no progress for this long is an error, not a figure.
const STALL_LIMIT: Duration = Duration::from_secs(300);
/// The aggregator's default `TALLY_SHARDS`, for the floor that uses its batch write.
const TALLY_SHARDS: i16 = 16;
/// Longest one batch write may take in the floor that uses the aggregator's (there, a
/// failure ends the run: the floor does not retry).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The batch's rows, inserted in `vote_id` order: two transactions in flight that share a
/// UUID (a duplicate publish) then take their row locks in the same order and cannot
/// deadlock (seen without it: "deadlock detected"). Correctness needs this, so the floor
/// pays it. Like the aggregator's batch write, a statement each session prepares once
/// (a static query id; `diesel::sql_query` is never kept prepared): the floor must not pay
/// for planning that a correct implementation avoids.
struct Insert<'a>(&'a Rows);

impl QueryId for Insert<'_> {
    type QueryId = Insert<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for Insert<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let r = self.0;
        out.push_sql(
            "INSERT INTO votes (vote_id, election_id, candidate_id, precinct_id, cast_at) \
             SELECT * FROM unnest(",
        );
        out.push_bind_param::<Array<Uuid>, _>(&r.vote_ids)?;
        out.push_sql("::uuid[], ");
        out.push_bind_param::<Array<Text>, _>(&r.election_ids)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Text>, _>(&r.candidate_ids)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&r.precinct_ids)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Timestamptz>, _>(&r.cast_ats)?;
        out.push_sql(
            "::timestamptz[]) AS t(vote_id, election_id, candidate_id, precinct_id, cast_at) \
             ORDER BY vote_id ON CONFLICT (vote_id) DO NOTHING",
        );
        Ok(())
    }
}

/// One batch's rows as columns, and the delivery tag that acks all of it.
#[derive(Default)]
struct Rows {
    vote_ids: Vec<uuid::Uuid>,
    election_ids: Vec<String>,
    candidate_ids: Vec<String>,
    precinct_ids: Vec<Option<String>>,
    cast_ats: Vec<chrono::DateTime<chrono::Utc>>,
    /// For the aggregator's batch write: its rows, filled as a replica fills them (the
    /// bare INSERT's columns above stay empty).
    aggregator: Option<DistinctRows>,
    deliveries: usize,
    last_tag: u64,
}

impl Rows {
    fn new(write: FloorWrite) -> Self {
        Rows {
            aggregator: (write == FloorWrite::Aggregator).then(DistinctRows::default),
            ..Rows::default()
        }
    }

    fn push(&mut self, v: Vote, tag: u64) {
        self.deliveries += 1;
        self.last_tag = tag;
        if let Some(a) = &mut self.aggregator {
            a.add(v);
            return;
        }
        self.vote_ids.push(v.vote_id);
        self.election_ids.push(v.election_id);
        self.candidate_ids.push(v.candidate_id);
        self.precinct_ids.push(v.precinct_id);
        self.cast_ats.push(v.cast_at);
    }

    /// Deliveries in the batch.
    fn len(&self) -> usize {
        self.deliveries
    }
}

/// What the floor achieved.
pub(super) struct Floor {
    /// Counted votes/s draining the pre-filled workload (see [`stored_rate`]).
    pub votes_per_second: f64,
    /// CPU per 1000 votes over the drain, from its first delivery to its last ack: of this
    /// process, of RabbitMQ and of PostgreSQL.
    pub cpu: DrainCpu,
    /// `cpu.consumers` when it is the floor consumer's alone: `None` when the test kit's
    /// proxies (`--via-port-proxy`, `--broker-cluster`) forward traffic in this process.
    pub consumer_cpu: Option<f64>,
    /// `cpu.consumer_switches`, under the same condition.
    pub consumer_switches: Option<f64>,
}

impl Floor {
    /// This floor's figures, as the second floor beside the bare one.
    pub(super) fn as_write_floor(&self) -> WriteFloor {
        WriteFloor {
            votes_per_second: self.votes_per_second,
            consumer_cpu_seconds_per_1000_votes: self.consumer_cpu,
            broker_cpu_seconds_per_1000_votes: self.cpu.broker,
            database_cpu_seconds_per_1000_votes: self.cpu.database,
        }
    }
}

/// The floor consumer draining the pre-filled workload.
///
/// # Errors
/// When a server fails, a body does not decode (the load workload has no malformed
/// votes) or the drain stalls.
pub(super) async fn floor(
    servers: &Servers,
    workload: &Workload,
    queue_type: QueueType,
    batch: usize,
    write: FloorWrite,
    opts: &LoadOptions,
) -> anyhow::Result<Floor> {
    let bed = fresh_bed(servers, queue_type).await?;
    let ledger = prefill(servers, &bed, workload, opts).await?;
    let expected = ledger.votes.len() as u64;
    let url = SecretString::from(bed.database_url.clone());
    let pool = db::pool(&url, PIPELINE_DEPTH as u32, &Default::default());
    let (conn, ch, mut consumer) = consume(&bed, batch, opts, "floor").await?;
    // Opened at the first delivery, closed after the last ack; this process is the consumer.
    let mut cpu_window = CpuWindow::new(servers, vec![std::process::id()]);

    // Shared by this drain's commit tasks, as by a replica's.
    let recent = Arc::new(RecentlyStored::new(db::recent::VOTES_REMEMBERED));
    let mut next_shard: i16 = 0;
    let mut filling = Rows::new(write);
    let mut committing: FuturesOrdered<JoinHandle<anyhow::Result<(u64, u64)>>> =
        FuturesOrdered::new();
    let mut counted = 0u64;
    let mut last_progress = Instant::now();
    while counted < expected {
        // Acks go out as soon as the oldest commit is done, while reading goes on.
        let idle = tokio::select! {
            Some(done) = committing.next(), if !committing.is_empty() => {
                counted += ack(&ch, done).await?;
                last_progress = Instant::now();
                false
            }
            next = tokio::time::timeout(BATCH_TIMEOUT, consumer.next()) => match next {
                Ok(Some(delivery)) => {
                    cpu_window.open_once();
                    let d = delivery?;
                    let v = vote::decode(&d.data).map_err(|r| {
                        anyhow::anyhow!("floor consumer got an undecodable vote: {r:?}")
                    })?;
                    filling.push(v, d.delivery_tag);
                    false
                }
                Ok(None) => anyhow::bail!("floor consumer was cancelled by the broker"),
                Err(_) => true,
            },
        };
        if filling.len() >= batch || (idle && filling.len() > 0) {
            if committing.len() == PIPELINE_DEPTH {
                // Pipeline full: the oldest commit first, as the aggregator does.
                if let Some(done) = committing.next().await {
                    counted += ack(&ch, done).await?;
                    last_progress = Instant::now();
                }
            }
            let rows = std::mem::replace(&mut filling, Rows::new(write));
            let task = match &write {
                FloorWrite::Insert => tokio::spawn(commit(pool.clone(), rows)),
                FloorWrite::Aggregator => {
                    let shard = next_shard;
                    next_shard = (next_shard + 1) % TALLY_SHARDS;
                    let (pool, url, recent) = (pool.clone(), url.clone(), recent.clone());
                    tokio::spawn(write_as_aggregator(pool, url, recent, rows, shard))
                }
            };
            committing.push_back(task);
        }
        if last_progress.elapsed() > STALL_LIMIT {
            anyhow::bail!("floor consumer stalled at {counted}/{expected}");
        }
    }
    let cpu = cpu_window.close(counted);
    let _ = conn.close(200, "done".into()).await;
    let proxies_in_process = opts.via_port_proxy || opts.broker_cluster;
    Ok(Floor {
        votes_per_second: stored_rate(&bed).await?,
        consumer_cpu: (!proxies_in_process).then_some(cpu.consumers),
        consumer_switches: cpu.consumer_switches.filter(|_| !proxies_in_process),
        cpu,
    })
}

/// Acks a committed batch's deliveries with one `multiple` ack; returns the rows it
/// inserted.
async fn ack(
    ch: &lapin::Channel,
    done: Result<anyhow::Result<(u64, u64)>, tokio::task::JoinError>,
) -> anyhow::Result<u64> {
    let (tag, inserted) = done.context("floor commit task")??;
    ch.basic_ack(tag, BasicAckOptions { multiple: true })
        .await?;
    Ok(inserted)
}

/// One transaction: BEGIN and the batch's INSERT in one flight, then COMMIT, run the way
/// the aggregator runs its batch transactions (`db::txn`), so the two pay the same round
/// trips. Returns the tag to ack and the rows inserted (a vote stored before is not
/// inserted again).
async fn commit(pool: PgPool, rows: Rows) -> anyhow::Result<(u64, u64)> {
    let mut conn = pool.get().await.context("floor: database connection")?;
    txn::mark_open(&mut conn);
    let insert = Insert(&rows).execute(&mut &*conn);
    let inserted = txn::begin_with(&conn, insert)
        .await
        .context("floor: batch insert")?;
    txn::commit(&mut conn).await.context("floor: COMMIT")?;
    Ok((rows.last_tag, inserted as u64))
}

/// How the floor writes a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum FloorWrite {
    /// The bare `INSERT … ON CONFLICT DO NOTHING` ([`commit`]).
    Insert,
    /// The aggregator's own batch write ([`write_as_aggregator`]).
    Aggregator,
}

impl FloorWrite {
    /// How the load runner's progress lines name this floor.
    pub(super) fn shown(self) -> &'static str {
        match self {
            FloorWrite::Insert => "floor",
            FloorWrite::Aggregator => "floor with the aggregator's write",
        }
    }
}

/// One batch written as a replica writes it: `db::write_batch_attempt` (one transaction
/// with the tally, the outbox and conflict judging, duplicates of recent votes judged
/// from memory), then the counted rows remembered. Returns the tag to ack and the rows
/// counted.
async fn write_as_aggregator(
    pool: PgPool,
    url: SecretString,
    recent: Arc<RecentlyStored>,
    rows: Rows,
    shard: i16,
) -> anyhow::Result<(u64, u64)> {
    let columns = rows
        .aggregator
        .map(|mut a| a.take_columns())
        .unwrap_or_default();
    let outcome =
        db::write_batch_attempt(&pool, &url, &columns, shard, WRITE_TIMEOUT, Some(&recent))
            .await
            .map_err(|f| anyhow::anyhow!("floor: batch write: {}", f.error))?;
    let counted = outcome.counted.len() as u64;
    recent.remember(columns, &outcome);
    Ok((rows.last_tag, counted))
}
