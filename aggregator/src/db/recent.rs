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
//!   reported inserted ([`BatchOutcome::counted`]).
//! - Memory never decides whether a row is STORED: every row still goes through the
//!   batch write, and only a row the database refused as already stored is looked up
//!   here. A vote missing from the database (a restore from an older backup) is
//!   therefore inserted again, never dropped.
//! - Memory is used only for the stored state it was filled from ([`StoreIdentity`]:
//!   the server's run, the database and the `votes` table, reported by every batch
//!   write), and a batch written to another stored state neither uses nor keeps what was
//!   remembered before: a copy of a lost vote is judged by the database, so another
//!   payload stored since is recorded as a conflict. That covers the usual ways
//!   committed rows get lost: a restore from an older backup or a failover to a standby
//!   that was behind (another server run), a database restored or swapped in under the
//!   same name (another database), a table restored by dropping it (another table). It
//!   does not cover rows deleted from the same table with its triggers disabled (only
//!   the table's owner can), or reloaded into it: restart the replicas after that, as
//!   `make restore` does.
//! - Anything not found with an identical payload (another payload: a conflict, which
//!   must be recorded; a UUID stored by another replica; one forgotten) is judged by the
//!   database, as before.
//! - Bounded: the newest `capacity` votes ([`RecentlyStored::new`]), forgotten a
//!   whole batch at a time, oldest first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{BatchColumns, BatchOutcome};

/// Batches of `BATCH_SIZE` votes a replica remembers (the capacity is this many times
/// `BATCH_SIZE` votes): the last committed ones, where a publisher's immediate retry or a
/// batch boundary puts most duplicates. Measured at batch 500, it added about 2 MiB to a
/// replica's peak RSS; a duplicate that arrives later is judged by the database.
pub const BATCHES_REMEMBERED: usize = 8;

/// Which stored state a batch write went to: the PostgreSQL server's run (its start
/// time), the database and the `votes` table (their OIDs), as the write statement reports
/// them. Rows committed under one identity stay stored as long as writes report the same
/// one, short of the table's owner deleting rows with its triggers disabled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreIdentity(String);

impl StoreIdentity {
    /// The identity as the batch write reported it.
    pub(super) fn new(reported: String) -> Self {
        StoreIdentity(reported)
    }
}

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
    /// Where every remembered vote was stored (`None`: nothing remembered yet).
    store: Option<StoreIdentity>,
    by_id: HashMap<Uuid, Payload>,
    /// The UUIDs each remembered batch added, oldest first.
    batches: VecDeque<Vec<Uuid>>,
}

impl Inner {
    /// Whether what is remembered was stored in `store`.
    fn is_of(&self, store: &StoreIdentity) -> bool {
        self.store.as_ref() == Some(store)
    }

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

    /// Remembers the rows `outcome` counted (indices into `columns`) of a batch whose
    /// transaction COMMITTED, taking their payloads out of `columns` (a committed batch
    /// needs them no more); forgets the oldest batches beyond the capacity, and
    /// everything remembered of another stored state than the outcome's.
    pub fn remember(&self, mut columns: BatchColumns, outcome: &BatchOutcome) {
        let counted = &outcome.counted;
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
        if !inner.is_of(&outcome.store) {
            *inner = Inner {
                store: Some(outcome.store.clone()),
                ..Inner::default()
            };
        }
        if added.is_empty() {
            return;
        }
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

    /// Drops from `rows` (indices into `columns`, a batch written to `store`) every row
    /// known stored there with exactly its payload, under one lock; returns how many it
    /// dropped. Nothing is dropped when memory was filled from another stored state.
    pub fn drop_duplicates(
        &self,
        store: &StoreIdentity,
        columns: &BatchColumns,
        rows: &mut Vec<i32>,
    ) -> usize {
        let inner = self.lock();
        if !inner.is_of(store) {
            return 0;
        }
        let before = rows.len();
        rows.retain(|&ord| !usize::try_from(ord).is_ok_and(|i| inner.holds(columns, i)));
        before - rows.len()
    }

    /// Votes remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether row `i` of `columns`, written to `store`, is known stored there with
    /// exactly its payload (so it is a duplicate of a counted vote).
    #[cfg(test)]
    fn is_duplicate(&self, store: &StoreIdentity, columns: &BatchColumns, i: usize) -> bool {
        let inner = self.lock();
        inner.is_of(store) && inner.holds(columns, i)
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

    fn store(name: &str) -> StoreIdentity {
        StoreIdentity::new(name.into())
    }

    /// What a committed batch written to `at` reported: rows `counted` inserted.
    fn committed(at: &str, counted: &[i32]) -> BatchOutcome {
        BatchOutcome {
            counted: counted.to_vec(),
            store: store(at),
            ..BatchOutcome::default()
        }
    }

    #[test]
    fn a_committed_row_makes_the_same_payload_a_duplicate_and_no_other() {
        let recent = RecentlyStored::new(100);
        let stored = vote(1, "alice");
        recent.remember(
            columns(&[stored.clone(), vote(2, "bob")]),
            &committed("s", &[0]),
        );
        let at = store("s");
        let copy = columns(std::slice::from_ref(&stored));
        assert!(recent.is_duplicate(&at, &copy, 0));
        assert!(
            !recent.is_duplicate(&at, &columns(&[vote(2, "bob")]), 0),
            "row 1 of the first batch was not counted by it: not known stored"
        );
        assert!(!recent.is_duplicate(&at, &copy, 9), "no such row");

        // Every field of the payload counts: another value of any one is a conflict.
        let mut others: Vec<(&str, Vote)> = Vec::new();
        let mut v = stored.clone();
        v.election_id = "f".into();
        others.push(("election", v));
        let mut v = stored.clone();
        v.candidate_id = "bob".into();
        others.push(("candidate", v));
        let mut v = stored.clone();
        v.precinct_id = Some("q".into());
        others.push(("precinct", v));
        let mut v = stored.clone();
        v.precinct_id = None;
        others.push(("no precinct", v));
        let mut v = stored.clone();
        v.cast_at += chrono::Duration::microseconds(1);
        others.push(("cast_at", v));
        for (field, other) in others {
            assert!(
                !recent.is_duplicate(&at, &columns(&[other]), 0),
                "another {field} is not a duplicate"
            );
        }
    }

    #[test]
    fn dropping_duplicates_keeps_every_row_memory_cannot_vouch_for() {
        let recent = RecentlyStored::new(100);
        recent.remember(
            columns(&[vote(1, "a"), vote(2, "a")]),
            &committed("s", &[0, 1]),
        );
        let later = columns(&[vote(1, "a"), vote(1, "b"), vote(3, "a"), vote(2, "a")]);
        let mut rows = vec![0, 1, 2, 3, -1, 99];
        assert_eq!(recent.drop_duplicates(&store("s"), &later, &mut rows), 2);
        assert_eq!(rows, vec![1, 2, -1, 99], "order kept, unknown rows kept");
    }

    #[test]
    fn memory_of_another_stored_state_is_neither_used_nor_kept() {
        let recent = RecentlyStored::new(100);
        recent.remember(columns(&[vote(1, "a")]), &committed("before", &[0]));
        let copy = columns(&[vote(1, "a")]);
        assert!(recent.is_duplicate(&store("before"), &copy, 0));
        let mut rows = vec![0];
        assert_eq!(
            recent.drop_duplicates(&store("after"), &copy, &mut rows),
            0,
            "a write to another stored state is judged by the database"
        );
        assert_eq!(rows, vec![0]);

        recent.remember(columns(&[vote(2, "a")]), &committed("after", &[0]));
        assert_eq!(recent.len(), 1, "what was remembered before is forgotten");
        assert!(!recent.is_duplicate(&store("after"), &copy, 0));
        assert!(recent.is_duplicate(&store("after"), &columns(&[vote(2, "a")]), 0));
        assert!(
            !recent.is_duplicate(&store("before"), &columns(&[vote(2, "a")]), 0),
            "nor is the new memory used for the old state"
        );
    }

    #[test]
    fn the_oldest_batches_are_forgotten_beyond_the_capacity() {
        let recent = RecentlyStored::new(3);
        let at = store("s");
        recent.remember(
            columns(&[vote(1, "a"), vote(2, "a")]),
            &committed("s", &[0, 1]),
        );
        recent.remember(
            columns(&[vote(3, "a"), vote(4, "a")]),
            &committed("s", &[0, 1]),
        );
        assert_eq!(recent.len(), 2, "the first batch is forgotten whole");
        assert!(!recent.is_duplicate(&at, &columns(&[vote(1, "a")]), 0));
        assert!(recent.is_duplicate(&at, &columns(&[vote(4, "a")]), 0));
        // One batch larger than the capacity is still kept until the next one.
        recent.remember(
            columns(&[vote(5, "a"), vote(6, "a"), vote(7, "a"), vote(8, "a")]),
            &committed("s", &[0, 1, 2, 3]),
        );
        assert_eq!(recent.len(), 4);
        assert!(recent.is_duplicate(&at, &columns(&[vote(8, "a")]), 0));
    }
}
