//! The consume loop of one broker session: deliveries → batches → one transaction each
//! → ack.
//!
//! Invariants this module keeps:
//! - A delivery is acked only after the transaction holding its vote has COMMITTED
//!   (or, for a malformed one, after its copy in the dead-letter queue is confirmed).
//! - Each batch is acked with ONE `basic.ack(last_tag, multiple=true)`, and only after
//!   every earlier batch was acked; so a multiple-ack never covers a delivery whose batch
//!   has not committed.
//! - Up to [`pipeline::COMMIT_PIPELINE_DEPTH`] batches commit at once while the next one fills
//!   (prefetch ≈ 2 × batch size); their results are taken strictly in the order they
//!   started, so acks stay in delivery order. When the pipeline is full and the next
//!   batch too, reading stops (back-pressure) until the oldest commit ends.
//! - A commit that fails is retried with capped backoff, holding its deliveries
//!   unacked; the broker cannot redeliver them while the channel lives, and redelivers
//!   them if the process dies.
//! - When the session breaks, everything unacked is simply dropped: delivery tags are
//!   per channel, so they can never be acked on a new one. The broker redelivers them.
//! - The loop waits for deliveries only in its `select!` branch that polls the consumer
//!   with the task's waker; a look at lapin's buffer with a no-op waker is always followed,
//!   at the latest after [`GATHER_PAUSE`], by such a poll while the batch has room, so no
//!   delivery is left unread while there is room for it.
//!   (Why it looks at all: when the buffer runs dry while deliveries flow, reading pauses
//!   and then takes what gathered, so a busy replica pays about one timer wake-up per
//!   millisecond instead of a cross-thread wake-up per delivery. Commits, acks, batch
//!   deadlines and shutdown are served during the pause.)
//!
//! Where each part lives:
//! - this module: one session from set-up to teardown ([`run_session`]), the consume loop,
//!   acks and dead-lettering;
//! - [`pipeline`]: the batch being filled and the commits in flight, in order;
//! - [`batch`]: one batch and its in-memory dedupe;
//! - [`commit`]: the commit task (retries, in-doubt resolution, outcome metrics);
//! - [`monitor`]: the queue-depth monitor of a session.

mod batch;
mod commit;
mod monitor;
mod pipeline;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _};
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};
use uuid::Uuid;

use self::pipeline::{Joined, Pipeline};
use crate::broker::{self, Session};
use crate::config::Config;
use crate::db::{PgPool, RecentlyStored};
use crate::error::BrokerError;
use crate::metrics::{DEP_RABBITMQ, Metrics};
use crate::vote;

/// Everything a session needs, shared with the commit tasks.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub config: Arc<Config>,
    pub pool: PgPool,
    pub metrics: Metrics,
    /// Votes this replica stored recently: their copies are judged duplicates without a
    /// statement (see [`db::RecentlyStored`](crate::db::RecentlyStored)).
    pub recent: Arc<RecentlyStored>,
}

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// Shutdown was requested; the batch in hand was committed and acked.
    Stopped,
    /// The broker connection or channel failed; reconnect.
    Lost(String),
}

/// A session consuming: the channels, the consumer and its tag, and the queue monitor
/// (stopped when this is dropped).
struct Consuming {
    session: Session,
    consumer: Consumer,
    consumer_tag: String,
    _stop_monitor: DropGuard,
}

/// Deliveries read in one turn of the consume loop before it yields to the runtime: a
/// database answer waits at most this many deliveries' work (a few microseconds each)
/// before it is read.
const READ_PER_TURN: u32 = 4;

/// How long reading pauses after the consumer's buffer ran dry while deliveries were
/// flowing. Parking on an empty buffer costs a cross-thread wake-up per delivery when
/// the consumer keeps up with the broker; pausing lets the deliveries of the next
/// millisecond or two (Tokio's timer ticks in milliseconds) gather, to be read after one
/// wake-up. A batch's deadline is still kept during the pause, and once a pause finds the
/// buffer still empty the loop parks on the consumer as before, so an idle replica does
/// not tick. The saving is for a busy replica: at a few deliveries a second each costs
/// one pause more, and a vote arriving during a pause is read up to about 2 ms later
/// (against `BATCH_TIMEOUT_MS`, 50 ms by default).
const GATHER_PAUSE: Duration = Duration::from_millis(1);

/// Runs one session until shutdown (clean stop) or until the broker fails.
///
/// # Errors
/// Only errors retrying cannot fix (a queue declared with other arguments, refused
/// credentials); transient failures end the session with [`SessionEnd::Lost`].
pub(crate) async fn run_session(
    ctx: &Ctx,
    session: Session,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, BrokerError> {
    let mut consuming = match start_consuming(ctx, session, shutdown).await {
        Ok(c) => c,
        Err(lost) => return Ok(lost),
    };
    let mut pipeline = Pipeline::new(ctx);
    match consume(ctx, &mut consuming, &mut pipeline, shutdown).await {
        SessionEnd::Stopped => {
            stop(ctx, consuming, pipeline).await;
            Ok(SessionEnd::Stopped)
        }
        SessionEnd::Lost(reason) => {
            abandon(ctx, consuming, pipeline).await;
            Ok(SessionEnd::Lost(reason))
        }
    }
}

fn lost(what: &str, e: lapin::Error) -> SessionEnd {
    SessionEnd::Lost(format!("{what}: {e}"))
}

/// Session set-up: prefetch, the consumer, the queue monitor.
async fn start_consuming(
    ctx: &Ctx,
    session: Session,
    shutdown: &CancellationToken,
) -> Result<Consuming, SessionEnd> {
    let config = &ctx.config;
    session
        .consume
        .basic_qos(config.prefetch_count, BasicQosOptions::default())
        .await
        .map_err(|e| lost("basic.qos", e))?;
    let consumer_tag = format!(
        "{}/{}/{}",
        broker::CLIENT_NAME,
        config.replica_id,
        Uuid::new_v4()
    );
    let consumer = session
        .consume
        .basic_consume(
            config.queue_name.as_str().into(),
            consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lost("basic.consume", e))?;
    ctx.metrics.set_up(DEP_RABBITMQ, true);
    info!(queue = %config.queue_name, prefetch = config.prefetch_count,
          batch_size = config.batch_size, "consuming");

    let monitor_stop = shutdown.child_token();
    monitor::spawn_queue_monitor(ctx, &session, monitor_stop.clone()).await;
    Ok(Consuming {
        session,
        consumer,
        consumer_tag,
        _stop_monitor: monitor_stop.drop_guard(),
    })
}

/// The consume loop: reads deliveries into the pipeline, starts commits as batches fall
/// due, acks committed batches in order; until shutdown or the session breaks.
async fn consume(
    ctx: &Ctx,
    c: &mut Consuming,
    pipeline: &mut Pipeline,
    shutdown: &CancellationToken,
) -> SessionEnd {
    // While set, reading pauses until then: the consumer's buffer ran dry while
    // deliveries were flowing (see [`GATHER_PAUSE`]).
    let mut gathering: Option<Instant> = None;
    loop {
        // Start the next commit as soon as a batch is due and the pipeline has room.
        if pipeline.has_room() && pipeline.due() {
            #[cfg_attr(not(feature = "fault-injection"), allow(unused_mut))]
            let mut batch = pipeline.seal();
            #[cfg(feature = "fault-injection")]
            if crate::fault::ack_before_commit() {
                // Deliberately broken (test builds only): ack now, before COMMIT.
                if let Err(e) = ack(&c.session, ctx, batch.last_tag).await {
                    return SessionEnd::Lost(e);
                }
                crate::fault::in_commit_ack_window();
                batch.acked = true;
            }
            pipeline.start_commit(batch);
            continue;
        }
        let reading = !pipeline.is_full() && gathering.is_none();
        let committing = pipeline.is_committing();
        // The loop wakes at the batch's deadline (it could start committing then) or when
        // the gathering pause ends, whichever comes first.
        let deadline = pipeline.waits_for_deadline().then(|| pipeline.deadline());
        let wake_at = match (gathering, deadline) {
            (Some(g), Some(d)) => Some(g.min(d)),
            (g, d) => g.or(d),
        };

        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return SessionEnd::Stopped,
            Some(joined) = pipeline.next_committed(), if committing => {
                if let Err(e) = ack_committed(&c.session, ctx, joined).await {
                    return SessionEnd::Lost(e);
                }
            }
            next = c.consumer.next(), if reading => {
                if let Err(end) = take(ctx, c, pipeline, next).await {
                    return end;
                }
                match read_buffered(ctx, c, pipeline).await {
                    Ok(Buffer::Dry) => gathering = Some(Instant::now() + GATHER_PAUSE),
                    Ok(Buffer::MayHoldMore) => {}
                    Err(end) => return end,
                }
                // The consumer's stream is not a Tokio resource: with deliveries buffered
                // it is always ready, and on this one-thread runtime the database's
                // answers (read by the I/O driver, which runs only between tasks) would
                // wait while this loop runs. `yield_now` resumes this task only after the
                // driver has run and the tasks it woke (the commits) were polled; Tokio's
                // cooperative budget alone yields only every 128 steps, which measured as
                // a slower commit pipeline.
                tokio::task::yield_now().await;
            },
            // (Without `wake_at` the sleep is built but never polled, so never registered.)
            _ = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {
                if gathering.is_some_and(|g| Instant::now() >= g) {
                    gathering = None;
                }
            }
        }
    }
}

/// How [`read_buffered`] left the consumer's buffer.
enum Buffer {
    /// Empty when last looked at.
    Dry,
    /// Not looked at again: the batch filled, or the turn's share of deliveries was taken.
    MayHoldMore,
}

/// After the turn's first delivery, takes up to `READ_PER_TURN − 1` more that lapin has
/// already buffered, without waiting for any (the batch's room permitting), so a turn
/// reads at most [`READ_PER_TURN`].
///
/// Looking with a no-op waker leaves nothing for lapin's I/O thread to wake: after a
/// [`Buffer::Dry`] the loop pauses reading for [`GATHER_PAUSE`] rather than park on the
/// consumer, so deliveries arriving meanwhile are read together after one timer wake-up
/// instead of costing a cross-thread wake-up (a system call and a context switch on each
/// side) apiece. An empty look leaves lapin's listener registered with the no-op waker;
/// the loop's next real poll replaces it with the task's waker (or finds the listener
/// already notified and looks again), so nothing that arrived is missed.
///
/// # Errors
/// As [`take`].
async fn read_buffered(
    ctx: &Ctx,
    c: &mut Consuming,
    pipeline: &mut Pipeline,
) -> Result<Buffer, SessionEnd> {
    for _ in 1..READ_PER_TURN {
        if pipeline.is_full() {
            return Ok(Buffer::MayHoldMore);
        }
        match c.consumer.next().now_or_never() {
            Some(next) => take(ctx, c, pipeline, next).await?,
            None => return Ok(Buffer::Dry),
        }
    }
    Ok(Buffer::MayHoldMore)
}

/// One item of the consumer's stream: a vote goes into the batch being filled, a
/// malformed message to the dead-letter queue.
///
/// # Errors
/// [`SessionEnd::Lost`] when the consumer failed or was cancelled, or dead-lettering
/// could not be completed.
async fn take(
    ctx: &Ctx,
    c: &mut Consuming,
    pipeline: &mut Pipeline,
    next: Option<Result<Delivery, lapin::Error>>,
) -> Result<(), SessionEnd> {
    let delivery = match next {
        Some(Ok(delivery)) => delivery,
        Some(Err(e)) => return Err(lost("consumer", e)),
        None => {
            return Err(SessionEnd::Lost(
                "consumer was cancelled by the broker".into(),
            ));
        }
    };
    ctx.metrics.votes_received.inc();
    note_delivery_count(ctx, &delivery.properties);
    match vote::decode(&delivery.data) {
        Ok(v) => {
            let published = broker::published_at_ms(&delivery.properties);
            pipeline.add(v, delivery.delivery_tag, delivery.redelivered, published);
            Ok(())
        }
        Err(rejection) => dead_letter(ctx, &mut c.session, &delivery, &rejection)
            .await
            .map_err(SessionEnd::Lost),
    }
}

/// Teardown after a shutdown request: stop deliveries, then finish what is in hand: the
/// commits in flight, then the partial batch. Deliveries still in the socket are requeued
/// on close.
async fn stop(ctx: &Ctx, c: Consuming, mut pipeline: Pipeline) {
    let session = &c.session;
    let _ = session
        .consume
        .basic_cancel(
            c.consumer_tag.as_str().into(),
            BasicCancelOptions::default(),
        )
        .await;
    pipeline.finish();
    // Stop at the first batch that cannot be acked: a later multiple-ack would
    // cover its deliveries.
    while let Some(joined) = pipeline.next_committed().await {
        if let Err(e) = ack_committed(session, ctx, joined).await {
            warn!(error = %e, "could not ack a batch in hand; the broker will redeliver it and those after it");
            break;
        }
    }
    let _ = session.consume.close(200, "shutdown".into()).await;
    let _ = session.connection.close(200, "shutdown".into()).await;
    ctx.metrics.set_up(DEP_RABBITMQ, false);
    info!("consumer stopped cleanly");
}

/// Teardown after the session broke: release every delivery at once (closing the
/// connection returns them to the queue, for another replica to take), then let the
/// commits in flight end: an attempt under way finishes or times out (its rows are
/// durable or not; either way the UUID key dedupes the redelivery), and none is retried,
/// so a database outage cannot hold this session open. Nothing more is acked.
async fn abandon(ctx: &Ctx, c: Consuming, pipeline: Pipeline) {
    pipeline.give_up();
    let _ = c.session.connection.close(320, "session lost".into()).await;
    ctx.metrics.set_up(DEP_RABBITMQ, false);
    pipeline.settle().await;
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
async fn ack_committed(session: &Session, ctx: &Ctx, joined: Joined) -> Result<(), String> {
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
                match broker::open_publish_channel(&session.connection, &session.node.shown).await {
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
