//! The commit task of one batch: ONE transaction, retried with capped backoff until it
//! commits or the session is gone, with in-doubt resolution when a COMMIT's answer was
//! lost; and the metrics of the outcome.
//!
//! Each commit runs as its own task so nothing the consume loop waits for (a dead-letter
//! confirm, an ack) can hold its transaction open. It never acks: the pipeline hands the
//! committed batch back to the consume loop, which acks in delivery order.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::Ctx;
use super::batch::Batch;
use crate::db::{self, BatchOutcome};
use crate::error::DbError;
use crate::metrics::{DEP_POSTGRES, Metrics};
use crate::supervisor::retry_backoff;

/// A commit running as its own task: it makes progress whatever the consume loop is
/// awaiting (a dead-letter confirm, an ack), so a transaction is never held open by
/// anything but the database.
pub(super) type CommitTask = tokio::task::JoinHandle<Committed>;

/// A batch after its commit task ended.
pub(super) struct Committed {
    /// The batch; after a commit, its columns are empty (moved into the replica's memory
    /// of recently stored votes).
    pub batch: Batch,
    /// False when the session ended before the batch could be committed (the broker
    /// redelivers its deliveries; nothing may be acked).
    pub done: bool,
}

/// Commits `batch` as a task, retrying with capped backoff until it succeeds or
/// `session_gone` fires (then it gives up between attempts: the session's deliveries are
/// back in the queue and can no longer be acked). Metrics are recorded here; the caller
/// acks.
pub(super) fn spawn_commit(
    ctx: &Ctx,
    batch: Batch,
    session_gone: &CancellationToken,
) -> CommitTask {
    // The task carries the session's span (and so the replica's): its log lines say whose
    // batch they are about.
    tokio::spawn(commit(ctx.clone(), batch, session_gone.clone()).in_current_span())
}

async fn commit(ctx: Ctx, mut batch: Batch, session_gone: CancellationToken) -> Committed {
    let mut backoff = retry_backoff();
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
                // Committed: its counted rows are stored for good (`votes` is
                // append-only), so later copies of them are judged without reading
                // `votes`. First, so batches waiting for this one to be remembered go on
                // at once.
                let columns = batch.rows.take_columns();
                ctx.recent.remember(columns, &outcome);
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
                warn!(error = %error, votes = batch.rows.columns().len(), in_doubt = in_doubt.is_some(),
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
            db::resolve_in_doubt(pool, url, batch.rows.columns(), doubt),
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
    let recent = Some(&*ctx.recent);
    db::write_batch_attempt(pool, url, batch.rows.columns(), batch.shard, limit, recent)
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
    m.votes_duplicate_from_memory
        .inc_by(outcome.known_duplicates as u64);
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
        known_duplicates = outcome.known_duplicates,
        "batch committed"
    );
}
