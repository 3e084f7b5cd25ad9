//! The commit pipeline of one session: the batch being filled and the commits in flight,
//! in the order they started.
//!
//! Invariants it keeps:
//! - At most [`COMMIT_PIPELINE_DEPTH`] commits are started while reading goes on; their
//!   results come out of [`Pipeline::next_committed`] strictly in the order they started
//!   (= delivery order), so each multiple-ack only ever covers committed batches.
//! - Consecutive batches of a session use different tally shards, so two commits in
//!   flight never queue on the same tally rows.
//! - However the pipeline ends (even dropped when the shutdown grace runs out), commit
//!   tasks still retrying give up: their deliveries are back in the queue and can no
//!   longer be acked on this channel.
//!
//! It never acks: the consume loop acks what [`Pipeline::next_committed`] hands back.

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rand::Rng;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::Ctx;
use super::batch::Batch;
use super::commit::{CommitTask, Committed, spawn_commit};
use crate::vote::Vote;

/// Batch transactions one replica runs at once. Two keep the database busy while the
/// previous COMMIT's round trip and fsync complete; acks still go strictly in order.
/// (The pool needs at least this many connections to overlap; fewer only serialises.)
pub(super) const COMMIT_PIPELINE_DEPTH: usize = 2;

/// What a commit task hands back: the batch and whether it committed, or the task's
/// failure.
pub(super) type Joined = Result<Committed, tokio::task::JoinError>;

/// The batch being filled and the commits in flight of one session.
pub(super) struct Pipeline {
    ctx: Ctx,
    filling: Batch,
    /// Commits in flight, resolved strictly in the order they started (= delivery order),
    /// so each multiple-ack only ever covers committed batches.
    committing: FuturesOrdered<CommitTask>,
    /// Fired when the session is lost: commits still retrying give up (their deliveries
    /// are back in the queue and can no longer be acked on this channel).
    session_gone: CancellationToken,
    /// However the pipeline ends (even dropped when the shutdown grace runs out), commit
    /// tasks still retrying give up.
    _give_up_on_exit: DropGuard,
    /// Consecutive batches of this session use different tally shards, so two commits in
    /// flight never queue on the same tally rows.
    next_shard: u16,
}

impl Pipeline {
    pub fn new(ctx: &Ctx) -> Self {
        let session_gone = CancellationToken::new();
        Pipeline {
            filling: Batch::new(ctx.config.batch_size),
            committing: FuturesOrdered::new(),
            _give_up_on_exit: session_gone.clone().drop_guard(),
            session_gone,
            next_shard: rand::rng().random_range(0..ctx.config.tally_shards),
            ctx: ctx.clone(),
        }
    }

    /// Adds a valid vote to the batch being filled.
    pub fn add(&mut self, vote: Vote, tag: u64, redelivered: bool, published_at_ms: Option<i64>) {
        self.filling.add(vote, tag, redelivered, published_at_ms);
    }

    /// The batch being filled has `BATCH_SIZE` deliveries: read no more until it commits.
    pub fn is_full(&self) -> bool {
        self.filling.deliveries >= self.ctx.config.batch_size
    }

    /// When the batch being filled is due even if not full.
    pub fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.filling.opened + self.ctx.config.batch_timeout)
    }

    /// The batch being filled is due: not empty, and full or past its deadline.
    pub fn due(&self) -> bool {
        !self.filling.is_empty()
            && (self.is_full() || tokio::time::Instant::now() >= self.deadline())
    }

    /// Another commit may start.
    pub fn has_room(&self) -> bool {
        self.committing.len() < COMMIT_PIPELINE_DEPTH
    }

    /// The consume loop should wake at [`Pipeline::deadline`]: a batch is filling and
    /// could start committing then.
    pub fn waits_for_deadline(&self) -> bool {
        !self.filling.is_empty() && self.has_room()
    }

    /// Commits are in flight.
    pub fn is_committing(&self) -> bool {
        !self.committing.is_empty()
    }

    /// Takes the batch being filled (a fresh one takes its place) and gives it the next
    /// tally shard.
    pub fn seal(&mut self) -> Batch {
        let size = self.ctx.config.batch_size;
        let mut batch = std::mem::replace(&mut self.filling, Batch::new(size));
        batch.shard = self.next_shard as i16;
        self.next_shard = (self.next_shard + 1) % self.ctx.config.tally_shards;
        batch
    }

    /// Starts committing `batch` as a task of its own, behind the commits in flight.
    pub fn start_commit(&mut self, batch: Batch) {
        self.committing
            .push_back(spawn_commit(&self.ctx, batch, &self.session_gone));
    }

    /// The oldest commit's result, once it ended (`None` when none is in flight).
    pub async fn next_committed(&mut self) -> Option<Joined> {
        self.committing.next().await
    }

    /// On a clean stop: starts committing the partial batch too (behind the commits in
    /// flight, even beyond [`COMMIT_PIPELINE_DEPTH`]); then [`Pipeline::next_committed`]
    /// hands back every batch in hand.
    pub fn finish(&mut self) {
        if !self.filling.is_empty() {
            let batch = self.seal();
            self.start_commit(batch);
        }
    }

    /// On a lost session: commits still retrying give up between attempts; nothing more
    /// may be acked.
    pub fn give_up(&self) {
        self.session_gone.cancel();
    }

    /// Waits for every commit in flight to end (after [`Pipeline::give_up`]: an attempt
    /// under way finishes or times out, none is retried).
    pub async fn settle(mut self) {
        while self.committing.next().await.is_some() {}
    }
}
