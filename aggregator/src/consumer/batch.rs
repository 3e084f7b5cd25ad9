//! A batch being filled: the columns of its rows, the facts kept for the metrics, and
//! the in-memory dedupe of deliveries that carry the same vote twice.
//!
//! A batch also remembers its last delivery tag: the ONE multiple-ack that covers all
//! its deliveries once its transaction has committed.

use std::time::Instant;

use crate::db::DistinctRows;
use crate::vote::Vote;

/// Per-row facts kept beside the columns, for metrics after the commit.
pub(super) struct RowMeta {
    pub redelivered: bool,
    pub published_at_ms: Option<i64>,
}

/// A batch being filled.
pub(super) struct Batch {
    /// The rows, in-batch copies dropped before the round trip.
    pub rows: DistinctRows,
    pub meta: Vec<RowMeta>,
    /// Exact duplicates dropped in memory, by redelivered flag.
    pub dup_redelivered: u64,
    pub dup_fresh: u64,
    pub deliveries: usize,
    pub last_tag: u64,
    pub opened: Instant,
    /// Tally shard this batch increments.
    pub shard: i16,
    /// Already acked (only the deliberately broken fault-injection build does this).
    pub acked: bool,
}

impl Batch {
    pub fn new(capacity: usize) -> Self {
        Batch {
            rows: DistinctRows::with_capacity(capacity),
            meta: Vec::with_capacity(capacity),
            dup_redelivered: 0,
            dup_fresh: 0,
            deliveries: 0,
            last_tag: 0,
            opened: Instant::now(),
            shard: 0,
            acked: false,
        }
    }

    pub fn add(&mut self, vote: Vote, tag: u64, redelivered: bool, published_at_ms: Option<i64>) {
        if self.deliveries == 0 {
            self.opened = Instant::now();
        }
        self.deliveries += 1;
        self.last_tag = tag;
        if !self.rows.add(vote) {
            if redelivered {
                self.dup_redelivered += 1;
            } else {
                self.dup_fresh += 1;
            }
            return;
        }
        self.meta.push(RowMeta {
            redelivered,
            published_at_ms,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.deliveries == 0
    }
}
