//! The consume loop of one broker session: deliveries → batches → one transaction each
//! → ack.
//!
//! Invariants this module keeps:
//! - A delivery is acked only after the transaction holding its vote has COMMITTED
//!   (or, for a malformed one, after its copy in the dead-letter queue is confirmed).
//! - Each batch is acked with ONE `basic.ack(last_tag, multiple=true)`, and only after
//!   every earlier batch was acked; so a multiple-ack never covers a delivery whose batch
//!   has not committed.
//! - Up to [`COMMIT_PIPELINE_DEPTH`] batches commit at once while the next one fills
//!   (prefetch ≈ 2 × batch size); their results are taken strictly in the order they
//!   started, so acks stay in delivery order. When the pipeline is full and the next
//!   batch too, reading stops (back-pressure) until the oldest commit ends.
//! - A commit that fails is retried with capped backoff, holding its deliveries
//!   unacked; the broker cannot redeliver them while the channel lives, and redelivers
//!   them if the process dies.
//! - When the session breaks, everything unacked is simply dropped: delivery tags are
//!   per channel, so they can never be acked on a new one. The broker redelivers them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::broker::{self, Session};
use crate::config::Config;
use crate::db::{self, BatchColumns, BatchOutcome, PgPool};
use crate::error::{BrokerError, DbError};
use crate::metrics::{DEP_POSTGRES, DEP_RABBITMQ, Metrics};
use crate::vote::{self, Vote};

/// Batch transactions one replica runs at once. Two keep the database busy while the
/// previous COMMIT's round trip and fsync complete; acks still go strictly in order.
/// (The pool needs at least this many connections to overlap; fewer only serialises.)
const COMMIT_PIPELINE_DEPTH: usize = 2;

/// Everything a session needs, shared with the commit tasks.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub config: Arc<Config>,
    pub pool: PgPool,
    pub metrics: Metrics,
}

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// Shutdown was requested; the batch in hand was committed and acked.
    Stopped,
    /// The broker connection or channel failed; reconnect.
    Lost(String),
}

/// Per-row facts kept beside the columns, for metrics after the commit.
struct RowMeta {
    redelivered: bool,
    published_at_ms: Option<i64>,
}

/// A batch being filled.
struct Batch {
    columns: BatchColumns,
    meta: Vec<RowMeta>,
    /// Rows of each UUID in this batch (first one first), with their payloads, for
    /// in-memory dedupe before the round trip.
    by_id: HashMap<Uuid, Vec<Vote>>,
    /// Exact duplicates dropped in memory, by redelivered flag.
    dup_redelivered: u64,
    dup_fresh: u64,
    deliveries: usize,
    last_tag: u64,
    opened: Instant,
    /// Tally shard this batch increments.
    shard: i16,
    /// Already acked (only the deliberately broken fault-injection build does this).
    acked: bool,
}

impl Batch {
    fn new(capacity: usize) -> Self {
        Batch {
            columns: BatchColumns::default(),
            meta: Vec::with_capacity(capacity),
            by_id: HashMap::with_capacity(capacity),
            dup_redelivered: 0,
            dup_fresh: 0,
            deliveries: 0,
            last_tag: 0,
            opened: Instant::now(),
            shard: 0,
            acked: false,
        }
    }

    fn add(&mut self, vote: Vote, tag: u64, redelivered: bool, published_at_ms: Option<i64>) {
        if self.deliveries == 0 {
            self.opened = Instant::now();
        }
        self.deliveries += 1;
        self.last_tag = tag;
        let seen = self.by_id.entry(vote.vote_id).or_default();
        if seen.iter().any(|v| v.same_payload(&vote)) {
            if redelivered {
                self.dup_redelivered += 1;
            } else {
                self.dup_fresh += 1;
            }
            return;
        }
        self.columns.push(&vote, seen.is_empty());
        self.meta.push(RowMeta {
            redelivered,
            published_at_ms,
        });
        seen.push(vote);
    }

    fn is_empty(&self) -> bool {
        self.deliveries == 0
    }
}

/// A commit running as its own task: it makes progress whatever the consume loop is
/// awaiting (a dead-letter confirm, an ack), so a transaction is never held open by
/// anything but the database.
type CommitTask = tokio::task::JoinHandle<Committed>;

/// A batch after its commit task ended.
struct Committed {
    batch: Batch,
    /// False when the session ended before the batch could be committed (the broker
    /// redelivers its deliveries; nothing may be acked).
    done: bool,
}

/// Commits `batch` as a task, retrying with capped backoff until it succeeds or
/// `session_gone` fires (then it gives up between attempts: the session's deliveries are
/// back in the queue and can no longer be acked). Metrics are recorded here; the caller
/// acks.
fn spawn_commit(ctx: &Ctx, batch: Batch, session_gone: &CancellationToken) -> CommitTask {
    tokio::spawn(commit(ctx.clone(), batch, session_gone.clone()))
}

async fn commit(ctx: Ctx, batch: Batch, session_gone: CancellationToken) -> Committed {
    let mut backoff = crate::supervisor::retry_backoff();
    // Set while an earlier attempt's COMMIT has no known outcome.
    let mut in_doubt: Option<db::InDoubt> = None;
    loop {
        let started = Instant::now();
        let attempt = attempt(&ctx, &batch, &mut in_doubt).await;
        match attempt {
            Ok(outcome) => {
                ctx.metrics
                    .commit_duration_seconds
                    .observe(started.elapsed().as_secs_f64());
                ctx.metrics.commits_failing.set(0);
                ctx.metrics.set_up(DEP_POSTGRES, true);
                record_outcome(&ctx.metrics, &batch, &outcome);
                return Committed { batch, done: true };
            }
            Err(error) => {
                if error.is_transient() && !matches!(error, DbError::CommitInProgress { .. }) {
                    ctx.metrics.database_connection_failures.inc();
                    ctx.metrics.set_up(DEP_POSTGRES, false);
                }
                ctx.metrics.commits_failing.set(1);
                ctx.metrics.commit_retries.inc();
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %error, votes = batch.columns.len(), in_doubt = in_doubt.is_some(),
                      retry_in_ms = wait.as_millis() as u64,
                      "batch not committed; holding its deliveries unacked and retrying");
                tokio::select! {
                    _ = session_gone.cancelled() => {
                        // Giving up is not a failing database: readiness follows the next
                        // session's commits.
                        ctx.metrics.commits_failing.set(0);
                        return Committed { batch, done: false };
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// One attempt at a batch: if an earlier attempt's COMMIT is in doubt, ask the server
/// how it ended (and reuse its outcome if it committed); otherwise write the batch. A
/// write whose COMMIT answer is lost leaves `in_doubt` set for the next attempt.
async fn attempt(
    ctx: &Ctx,
    batch: &Batch,
    in_doubt: &mut Option<db::InDoubt>,
) -> Result<BatchOutcome, DbError> {
    let (pool, url, limit) = (
        &ctx.pool,
        &ctx.config.database_url,
        ctx.config.db_attempt_timeout,
    );
    if let Some(doubt) = in_doubt {
        let asked = tokio::time::timeout(
            limit,
            db::resolve_in_doubt(pool, url, &batch.columns, doubt),
        )
        .await
        .map_err(|_| DbError::Timeout {
            ms: limit.as_millis() as u64,
        })??;
        match asked {
            // Its votes count as counted by this replica (not as duplicates of a rewrite).
            db::Resolution::Committed => return Ok(doubt.outcome.clone()),
            db::Resolution::StillRunning => {
                return Err(DbError::CommitInProgress { xid: doubt.xid });
            }
            db::Resolution::NotCommitted => *in_doubt = None,
        }
    }
    db::write_batch_attempt(pool, url, &batch.columns, batch.shard, limit)
        .await
        .map_err(|failure| {
            if failure.in_doubt.is_some() {
                *in_doubt = failure.in_doubt;
            }
            failure.error
        })
}

fn record_outcome(m: &Metrics, batch: &Batch, outcome: &BatchOutcome) {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut decided = vec![false; batch.meta.len()];
    for &i in &outcome.counted {
        let i = i as usize;
        decided[i] = true;
        if let Some(published) = batch.meta.get(i).and_then(|r| r.published_at_ms) {
            let delta = now_ms - published;
            if delta >= 0 {
                m.publish_to_commit_seconds.observe(delta as f64 / 1000.0);
            }
        }
    }
    for &i in &outcome.conflicting {
        decided[i as usize] = true;
    }
    let (mut dup_re, mut dup_fresh) = (batch.dup_redelivered, batch.dup_fresh);
    for (meta, _) in batch.meta.iter().zip(&decided).filter(|(_, d)| !**d) {
        if meta.redelivered {
            dup_re += 1;
        } else {
            dup_fresh += 1;
        }
    }
    m.votes_counted.inc_by(outcome.counted.len() as u64);
    m.votes_conflicting.inc_by(outcome.conflicting.len() as u64);
    m.votes_duplicate
        .with_label_values(&["true"])
        .inc_by(dup_re);
    m.votes_duplicate
        .with_label_values(&["false"])
        .inc_by(dup_fresh);
    m.batch_size.observe(batch.deliveries as f64);
    m.batches_committed.inc();
    debug!(
        deliveries = batch.deliveries,
        counted = outcome.counted.len(),
        conflicting = outcome.conflicting.len(),
        "batch committed"
    );
}

async fn ack(session: &Session, ctx: &Ctx, tag: u64) -> Result<(), String> {
    session
        .consume
        .basic_ack(tag, BasicAckOptions { multiple: true })
        .await
        .map_err(|e| {
            ctx.metrics.ack_failures.inc();
            format!("ack of delivery tag {tag} failed: {e}")
        })
}

/// Runs one session until shutdown (clean stop) or until the broker fails.
///
/// # Errors
/// Only errors retrying cannot fix (a queue declared with other arguments, refused
/// credentials); transient failures end the session with [`SessionEnd::Lost`].
pub(crate) async fn run_session(
    ctx: &Ctx,
    mut session: Session,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, BrokerError> {
    let config = &ctx.config;
    let lost = |what: &str, e: lapin::Error| SessionEnd::Lost(format!("{what}: {e}"));
    if let Err(e) = session
        .consume
        .basic_qos(config.prefetch_count, BasicQosOptions::default())
        .await
    {
        return Ok(lost("basic.qos", e));
    }
    let consumer_tag = format!("vote-aggregator/{}/{}", config.replica_id, Uuid::new_v4());
    let mut consumer = match session
        .consume
        .basic_consume(
            config.queue_name.as_str().into(),
            consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return Ok(lost("basic.consume", e)),
    };
    ctx.metrics.set_up(DEP_RABBITMQ, true);
    info!(queue = %config.queue_name, prefetch = config.prefetch_count,
          batch_size = config.batch_size, "consuming");

    let monitor_stop = shutdown.child_token();
    spawn_queue_monitor(ctx, &session, monitor_stop.clone()).await;
    let _stop_monitor = monitor_stop.drop_guard();

    let mut filling = Batch::new(config.batch_size);
    // Commits in flight, resolved strictly in the order they started (= delivery order),
    // so each multiple-ack only ever covers committed batches.
    let mut committing: FuturesOrdered<CommitTask> = FuturesOrdered::new();
    // Fired when the session is lost: commits still retrying give up (their deliveries
    // are back in the queue and can no longer be acked on this channel).
    let session_gone = CancellationToken::new();
    // However this function ends (even dropped when the shutdown grace runs out), commit
    // tasks still retrying give up.
    let _give_up_on_exit = session_gone.clone().drop_guard();
    // Consecutive batches of this session use different tally shards, so two commits in
    // flight never queue on the same tally rows.
    let mut next_shard = rand::rng().random_range(0..config.tally_shards);

    let end = loop {
        let full = filling.deliveries >= config.batch_size;
        let deadline = tokio::time::Instant::from_std(filling.opened + config.batch_timeout);
        let due = !filling.is_empty() && (full || tokio::time::Instant::now() >= deadline);

        // Start the next commit as soon as a batch is due and the pipeline has room.
        if committing.len() < COMMIT_PIPELINE_DEPTH && due {
            let mut batch = std::mem::replace(&mut filling, Batch::new(config.batch_size));
            batch.shard = next_shard as i16;
            next_shard = (next_shard + 1) % config.tally_shards;
            #[cfg(feature = "fault-injection")]
            if crate::fault::ack_before_commit() {
                // Deliberately broken (test builds only): ack now, before COMMIT.
                if let Err(e) = ack(&session, ctx, batch.last_tag).await {
                    break SessionEnd::Lost(e);
                }
                crate::fault::in_commit_ack_window();
                batch.acked = true;
            }
            committing.push_back(spawn_commit(ctx, batch, &session_gone));
            continue;
        }

        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break SessionEnd::Stopped,
            Some(joined) = committing.next(), if !committing.is_empty() => {
                if let Err(e) = ack_committed(&session, ctx, joined).await {
                    break SessionEnd::Lost(e);
                }
            }
            next = consumer.next(), if !full => match next {
                Some(Ok(delivery)) => {
                    ctx.metrics.votes_received.inc();
                    note_delivery_count(ctx, &delivery.properties);
                    match vote::decode(&delivery.data) {
                        Ok(v) => {
                            let published = broker::published_at_ms(&delivery.properties);
                            filling.add(v, delivery.delivery_tag, delivery.redelivered, published);
                        }
                        Err(rejection) => {
                            if let Err(e) = dead_letter(ctx, &mut session, &delivery, &rejection).await {
                                break SessionEnd::Lost(e);
                            }
                        }
                    }
                }
                Some(Err(e)) => break lost("consumer", e),
                None => break SessionEnd::Lost("consumer was cancelled by the broker".into()),
            },
            _ = tokio::time::sleep_until(deadline),
                if !filling.is_empty() && committing.len() < COMMIT_PIPELINE_DEPTH => {}
        }
    };

    match end {
        SessionEnd::Stopped => {
            // Stop deliveries, then finish what is in hand: the commits in flight, then the
            // partial batch. Deliveries still in the socket are requeued on close.
            let _ = session
                .consume
                .basic_cancel(consumer_tag.as_str().into(), BasicCancelOptions::default())
                .await;
            if !filling.is_empty() {
                filling.shard = next_shard as i16;
                committing.push_back(spawn_commit(ctx, filling, &session_gone));
            }
            // Stop at the first batch that cannot be acked: a later multiple-ack would
            // cover its deliveries.
            while let Some(joined) = committing.next().await {
                if let Err(e) = ack_committed(&session, ctx, joined).await {
                    warn!(error = %e, "could not ack a batch in hand; the broker will redeliver it and those after it");
                    break;
                }
            }
            let _ = session.consume.close(200, "shutdown".into()).await;
            let _ = session.connection.close(200, "shutdown".into()).await;
            ctx.metrics.set_up(DEP_RABBITMQ, false);
            info!("consumer stopped cleanly");
            Ok(SessionEnd::Stopped)
        }
        SessionEnd::Lost(reason) => {
            // Release every delivery at once (closing the connection returns them to the
            // queue, for another replica to take), then let the commits in flight end:
            // an attempt under way finishes or times out (its rows are durable or not;
            // either way the UUID key dedupes the redelivery), and none is retried, so a
            // database outage cannot hold this session open. Nothing more is acked.
            session_gone.cancel();
            let _ = session.connection.close(320, "session lost".into()).await;
            ctx.metrics.set_up(DEP_RABBITMQ, false);
            while committing.next().await.is_some() {}
            Ok(SessionEnd::Lost(reason))
        }
    }
}

/// Every 2 s, reads the votes queue's depth and the number of messages the broker
/// dead-lettered without a reason (see [`broker::unexplained_queue`]) into the metrics,
/// on a channel of its own so a failure there cannot touch the acks. Warns when
/// unexplained dead letters appear: they may be valid votes that were never counted.
async fn spawn_queue_monitor(ctx: &Ctx, session: &Session, stop: CancellationToken) {
    let Ok(channel) = session.connection.create_channel().await else {
        return;
    };
    let ctx = ctx.clone();
    let unexplained = broker::unexplained_queue(&ctx.config.queue_name);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let depth = broker::message_count(&channel, &ctx.config, &ctx.config.queue_name).await;
            let odd = broker::message_count(&channel, &ctx.config, &unexplained).await;
            let (Ok(depth), Ok(odd)) = (depth, odd) else {
                break;
            };
            ctx.metrics.queue_depth.set(i64::from(depth));
            let before = ctx.metrics.dead_letters_unexplained.get();
            ctx.metrics.dead_letters_unexplained.set(i64::from(odd));
            if i64::from(odd) > before {
                warn!(queue = %unexplained, messages = odd,
                      "the broker dead-lettered messages without a reason (TTL, a delivery-limit policy, a reject); \
                       they may be valid votes that were NOT counted: inspect them and move them back to the votes queue \
                       (the vote UUID makes recounting safe)");
            }
        }
    });
}

/// Deliveries already delivered this often get a warning: a broker-side delivery limit
/// (a policy can impose one even though the queue is declared without) would soon
/// dead-letter them uncounted.
const HIGH_DELIVERY_COUNT: i64 = 10;

/// Counts (and now and then logs) deliveries the broker reports as delivered at least
/// [`HIGH_DELIVERY_COUNT`] times (quorum queues' `x-delivery-count` header).
fn note_delivery_count(ctx: &Ctx, props: &lapin::BasicProperties) {
    let Some(count) = broker::delivery_count(props) else {
        return;
    };
    if count < HIGH_DELIVERY_COUNT {
        return;
    }
    ctx.metrics.high_delivery_count.inc();
    if ctx.metrics.high_delivery_count.get() % 1000 == 1 {
        warn!(
            delivery_count = count,
            queue = %ctx.config.queue_name,
            "a vote has been delivered {count} times without being acked (replicas crashing or \
             losing their connection?); make sure no policy sets a delivery-limit on this queue, \
             or votes will be dead-lettered uncounted"
        );
    }
}

/// Acks a committed batch (one `multiple` ack up to its last delivery tag), unless the
/// broken test build already acked it.
///
/// # Errors
/// When the commit task failed (its batch is not committed, so nothing at or after it may
/// be acked) or the ack could not be sent.
async fn ack_committed(
    session: &Session,
    ctx: &Ctx,
    joined: Result<Committed, tokio::task::JoinError>,
) -> Result<(), String> {
    let done = joined.map_err(|e| format!("commit task failed: {e}"))?;
    let batch = &done.batch;
    if batch.acked || !done.done {
        return Ok(());
    }
    #[cfg(feature = "fault-injection")]
    crate::fault::in_commit_ack_window();
    ack(session, ctx, batch.last_tag).await
}

/// Sends a malformed delivery to the dead-letter queue with its reason, then acks it.
async fn dead_letter(
    ctx: &Ctx,
    session: &mut Session,
    delivery: &lapin::message::Delivery,
    rejection: &vote::Rejection,
) -> Result<(), String> {
    ctx.metrics
        .votes_rejected
        .with_label_values(&[rejection.kind.as_str()])
        .inc();
    let reason = rejection.to_string();
    info!(reason = %reason, bytes = delivery.data.len(), "dead-lettering malformed message");
    match broker::dead_letter(
        session,
        &ctx.config,
        &delivery.data,
        &delivery.properties,
        &reason,
    )
    .await
    {
        Ok(()) => session
            .consume
            .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: false })
            .await
            .map_err(|e| format!("ack of dead-lettered delivery failed: {e}")),
        Err(e) => {
            // Never requeue a poison message: reject so the broker's own dead-lettering
            // moves it to the unexplained queue (its x-death header then says "rejected").
            warn!(error = %e, "dead-letter publish failed; rejecting without requeue instead");
            if !session.publish.status().connected() {
                // The broker closed the publish channel: open it again for the next one.
                match broker::open_publish_channel(&session.connection, &ctx.config).await {
                    Ok(channel) => session.publish = channel,
                    Err(e) => warn!(error = %e, "cannot reopen the dead-letter channel"),
                }
            }
            session
                .consume
                .basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: false })
                .await
                .map_err(|e| format!("reject of malformed delivery failed: {e}"))
        }
    }
}
