//! The votes this process stored itself, recently: what lets a batch judge a duplicate
//! of one of them without asking the database.
//!
//! A row the batch write did not insert has a stored vote of its UUID; whether it is a
//! duplicate or a conflict depends only on that stored payload. When this process
//! inserted that UUID in a transaction that COMMITTED, it knows the stored payload:
//! `votes` is append-only (a trigger refuses UPDATE, DELETE and TRUNCATE), so the
//! payload stored is the one it inserted. A row with exactly that payload is then a
//! duplicate, and needs no judging statement. This is the usual duplicate by far: a
//! publisher's retry or a redelivery arriving a batch or two after its original, which
//! the same replica counted.
//!
//! Invariants:
//! - Only rows of COMMITTED transactions are remembered, and only the ones the database
//!   reported inserted ([`BatchOutcome::counted`](super::BatchOutcome::counted)).
//! - Memory never decides whether a row is STORED: every row still goes through the
//!   batch write, and only a row the database refused as already stored is looked up
//!   here. A vote missing from the database (a restore from an older backup) is
//!   therefore inserted again, never dropped. Its classification is another matter:
//!   if the database loses committed rows while the replica runs (a restore without
//!   stopping the replicas, a failover to a standby that was behind) and then stores
//!   another payload of a remembered UUID, a copy of the remembered payload is taken
//!   for a duplicate instead of a conflict. Restart the replicas after a restore or a
//!   failover.
//! - Anything not found with an identical payload (another payload: a conflict, which
//!   must be recorded; a UUID stored by another replica; one forgotten) is judged by the
//!   database, as before.
//! - Bounded: the newest [`RecentlyStored::capacity`] votes, forgotten a whole batch at a
//!   time, oldest first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::BatchColumns;

/// Batches of `BATCH_SIZE` votes a replica remembers (the capacity is this many times
/// `BATCH_SIZE` votes): the last committed ones, where a publisher's immediate retry or a
/// batch boundary puts most duplicates. Measured at batch 500, it added about 2 MiB to a
/// replica's peak RSS; a duplicate that arrives later is judged by the database.
pub const BATCHES_REMEMBERED: usize = 8;

/// A stored vote's payload (everything but its UUID).
#[derive(Debug, PartialEq, Eq)]
struct Payload {
    election_id: String,
    candidate_id: String,
    precinct_id: Option<String>,
    cast_at: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<Uuid, Payload>,
    /// The UUIDs each remembered batch added, oldest first.
    batches: VecDeque<Vec<Uuid>>,
}

impl Inner {
    /// Row `i` of `columns` is remembered with exactly its payload.
    fn holds(&self, columns: &BatchColumns, i: usize) -> bool {
        let Some(stored) = columns.vote_ids.get(i).and_then(|id| self.by_id.get(id)) else {
            return false;
        };
        stored.election_id == columns.election_ids[i]
            && stored.candidate_id == columns.candidate_ids[i]
            && stored.precinct_id == columns.precinct_ids[i]
            && stored.cast_at == columns.cast_ats[i]
    }
}

/// The newest votes this process inserted in committed transactions. Shared by the
/// commit tasks of a replica (a short lock, never held across an await).
#[derive(Debug)]
pub struct RecentlyStored {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl RecentlyStored {
    /// Remembers at most `capacity` votes (or the newest batch alone, when it is larger).
    pub fn new(capacity: usize) -> Self {
        RecentlyStored {
            inner: Mutex::new(Inner::default()),
            capacity,
        }
    }

    /// How many votes it keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Votes remembered now.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remembers the rows `counted` (indices into `columns`) of a batch whose
    /// transaction COMMITTED, taking their payloads out of `columns` (a committed batch
    /// needs them no more); forgets the oldest batches beyond the capacity.
    pub fn remember(&self, mut columns: BatchColumns, counted: &[i32]) {
        let mut added = Vec::with_capacity(counted.len());
        let mut payloads = Vec::with_capacity(counted.len());
        for &ord in counted {
            let i = ord as usize;
            let Some(&id) = columns.vote_ids.get(i) else {
                continue;
            };
            let payload = Payload {
                election_id: std::mem::take(&mut columns.election_ids[i]),
                candidate_id: std::mem::take(&mut columns.candidate_ids[i]),
                precinct_id: columns.precinct_ids[i].take(),
                cast_at: columns.cast_ats[i],
            };
            added.push(id);
            payloads.push(payload);
        }
        let mut inner = self.lock();
        for (&id, payload) in added.iter().zip(payloads) {
            inner.by_id.insert(id, payload);
        }
        inner.batches.push_back(added);
        while inner.by_id.len() > self.capacity && inner.batches.len() > 1 {
            if let Some(oldest) = inner.batches.pop_front() {
                for id in oldest {
                    inner.by_id.remove(&id);
                }
            }
        }
    }

    /// Whether row `i` of `columns` is known stored with exactly its payload (so it is a
    /// duplicate of a counted vote).
    pub fn is_duplicate(&self, columns: &BatchColumns, i: usize) -> bool {
        self.lock().holds(columns, i)
    }

    /// Drops from `rows` (indices into `columns`) every row known stored with exactly its
    /// payload, under one lock; returns how many it dropped.
    pub fn drop_duplicates(&self, columns: &BatchColumns, rows: &mut Vec<i32>) -> usize {
        let inner = self.lock();
        let before = rows.len();
        rows.retain(|&ord| !usize::try_from(ord).is_ok_and(|i| inner.holds(columns, i)));
        before - rows.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent map (each step is one
        // insert or remove): keep using it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vote::Vote;

    fn vote(n: u128, candidate: &str) -> Vote {
        Vote {
            vote_id: Uuid::from_u128(n),
            election_id: "e".into(),
            candidate_id: candidate.into(),
            precinct_id: Some("p".into()),
            cast_at: DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default(),
        }
    }

    fn columns(votes: &[Vote]) -> BatchColumns {
        let mut c = BatchColumns::default();
        for v in votes {
            c.push(v, true);
        }
        c
    }

    #[test]
    fn a_committed_row_makes_the_same_payload_a_duplicate_and_no_other() {
        let recent = RecentlyStored::new(100);
        recent.remember(columns(&[vote(1, "alice"), vote(2, "bob")]), &[0]);
        let later = columns(&[vote(1, "alice"), vote(1, "bob"), vote(2, "bob")]);
        assert!(recent.is_duplicate(&later, 0), "same UUID and payload");
        assert!(
            !recent.is_duplicate(&later, 1),
            "another payload is a conflict"
        );
        assert!(
            !recent.is_duplicate(&later, 2),
            "row 1 of the first batch was not counted by it: not known stored"
        );
        assert!(!recent.is_duplicate(&later, 9), "no such row");
    }

    #[test]
    fn the_oldest_batches_are_forgotten_beyond_the_capacity() {
        let recent = RecentlyStored::new(3);
        recent.remember(columns(&[vote(1, "a"), vote(2, "a")]), &[0, 1]);
        recent.remember(columns(&[vote(3, "a"), vote(4, "a")]), &[0, 1]);
        assert_eq!(recent.len(), 2, "the first batch is forgotten whole");
        assert!(!recent.is_duplicate(&columns(&[vote(1, "a")]), 0));
        assert!(recent.is_duplicate(&columns(&[vote(4, "a")]), 0));
        // One batch larger than the capacity is still kept until the next one.
        recent.remember(
            columns(&[vote(5, "a"), vote(6, "a"), vote(7, "a"), vote(8, "a")]),
            &[0, 1, 2, 3],
        );
        assert_eq!(recent.len(), 4);
        assert!(recent.is_duplicate(&columns(&[vote(8, "a")]), 0));
    }
}
