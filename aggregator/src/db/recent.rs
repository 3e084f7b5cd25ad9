//! The votes this process stored itself, recently: what lets a batch judge a duplicate
//! of one of them without asking the database.
//!
//! A row the batch write did not insert has a stored vote of its UUID; whether it is a
//! duplicate or a conflict depends only on that stored payload. When this process
//! inserted that UUID in a transaction that COMMITTED, it knows the stored payload:
//! `votes` is append-only (a trigger refuses UPDATE, DELETE and TRUNCATE), so the
//! payload stored is the one it inserted. A row with exactly that payload is then a
//! duplicate, judged without reading `votes`. This is the usual duplicate by far: a
//! publisher's retry or a redelivery arriving shortly after its original, which the
//! same replica counted.
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
//! - A row whose original is in one of this process's batches still committing is
//!   refused by the write once that COMMIT ended (`ON CONFLICT` waits for it), and its
//!   answer can come back before that batch was remembered. So a batch with a row left
//!   to judge that memory could still vouch for (the first row of its UUID in the batch)
//!   first waits, bounded ([`RecentlyStored::waiting_at_most`]), for the batches of this
//!   process that hold a commit ticket (`RecentlyStored::commit_ticket`, taken after a
//!   batch's last statement, released once it is remembered or has failed), and looks
//!   again. It never waits for a batch still running statements (that one may be waiting
//!   for this batch's locks), only for ones past them, whose COMMIT waits for no other
//!   batch.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use uuid::Uuid;

use super::{BatchColumns, BatchOutcome, UuidHasher};
use crate::config::SessionTimeouts;

/// Votes a replica remembers (whole batches; at least the newest batch, whatever its
/// size): the last ones it committed, where a publisher's retry or a copy racing its
/// original on another connection puts most duplicates. Counted in votes, not batches:
/// how far a copy lands from its original depends on the traffic, not on `BATCH_SIZE`.
/// In `make load`, where copies race their originals on four publisher connections,
/// 4 000 votes recognised about half of the copies the write refused and this many nearly
/// all. Only the counted rows are kept (about 4.4 MiB for this many, as
/// `examples/batch_memory_cost.rs` measures), whatever the batches' size or fill. A
/// duplicate that arrives later is judged by the database.
pub const VOTES_REMEMBERED: usize = 16_384;

/// Longest a batch with rows left to judge waits, by default, for this process's batches
/// that are committing to be remembered, before it judges those rows by statement. A
/// COMMIT takes milliseconds; this bounds the wait when the database is slow (the batch
/// holds its locks meanwhile; see [`wait_limit`]).
pub const EARLIER_COMMITS_WAIT: Duration = Duration::from_millis(500);

/// The wait for earlier commits under these session timeouts: [`EARLIER_COMMITS_WAIT`],
/// but at most half of `idle_in_transaction_session_timeout` (the waiting session is idle
/// in its transaction) and of `lock_timeout` (another replica's statement may be waiting
/// for its locks).
pub fn wait_limit(timeouts: &SessionTimeouts) -> Duration {
    EARLIER_COMMITS_WAIT
        .min(timeouts.idle_in_transaction / 2)
        .min(timeouts.lock / 2)
}

/// What a wait for earlier commits found (`RecentlyStored::wait_for_earlier_commits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlierCommits {
    /// No batch held a commit ticket.
    None,
    /// Every batch that held one then has been remembered or has failed.
    Settled,
    /// The limit ran out first.
    TimedOut,
}

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

/// The rows a committed batch counted (moved out of its columns, nothing else kept, so
/// memory is bounded by the votes remembered whatever the batches' size or fill).
#[derive(Debug)]
struct RememberedBatch {
    /// Its place in the order batches were remembered.
    number: u64,
    /// The remembered votes.
    columns: BatchColumns,
}

#[derive(Debug, Default)]
struct Inner {
    /// Where every remembered vote was stored (`None`: nothing remembered yet).
    store: Option<StoreIdentity>,
    /// Each remembered vote's batch (its number) and row.
    by_id: HashMap<Uuid, (u64, usize), UuidHasher>,
    /// The remembered batches, oldest first, numbered consecutively.
    batches: VecDeque<RememberedBatch>,
    /// The number the next remembered batch gets.
    next_number: u64,
}

impl Inner {
    /// Whether what is remembered was stored in `store`.
    fn is_of(&self, store: &StoreIdentity) -> bool {
        self.store.as_ref() == Some(store)
    }

    /// Row `i` of `columns` is remembered with exactly its payload.
    fn holds(&self, columns: &BatchColumns, i: usize) -> bool {
        let Some(&(number, row)) = columns.vote_ids.get(i).and_then(|id| self.by_id.get(id)) else {
            return false;
        };
        let oldest = self.batches.front().map_or(0, |b| b.number);
        number
            .checked_sub(oldest)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| self.batches.get(at))
            .is_some_and(|b| b.columns.same_row(row, columns, i))
    }

    /// Forgets the oldest batch.
    fn forget_oldest(&mut self) {
        let Some(oldest) = self.batches.pop_front() else {
            return;
        };
        for (row, id) in oldest.columns.vote_ids.iter().enumerate() {
            if self.by_id.get(id) == Some(&(oldest.number, row)) {
                self.by_id.remove(id);
            }
        }
    }
}

/// The newest votes this process inserted in committed transactions. Shared by the
/// commit tasks of a replica (a short lock, never held across an await).
#[derive(Debug)]
pub struct RecentlyStored {
    inner: Mutex<Inner>,
    capacity: usize,
    /// Batches between their last statement and being remembered (ticket numbers).
    committing: Mutex<Committing>,
    /// Fired whenever such a batch's ticket is released.
    released: Notify,
    /// Longest wait for them ([`RecentlyStored::wait_for_earlier_commits`]).
    wait_limit: Duration,
}

/// The batches of this process whose COMMIT is under way: tickets in the order taken.
#[derive(Debug, Default)]
struct Committing {
    next: u64,
    open: BTreeSet<u64>,
}

/// A batch's place among those committing ([`RecentlyStored::commit_ticket`]): released
/// when dropped, unless handed over to the batch's outcome (after its COMMIT succeeded),
/// which [`RecentlyStored::remember`] then releases once the batch is remembered.
#[derive(Debug)]
pub(super) struct CommitTicket<'a> {
    recent: &'a RecentlyStored,
    id: Option<u64>,
}

impl CommitTicket<'_> {
    /// For a batch whose COMMIT succeeded: the ticket, for its outcome.
    pub(super) fn hand_over(mut self) -> Option<u64> {
        self.id.take()
    }
}

impl Drop for CommitTicket<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.recent.release(id);
        }
    }
}

impl RecentlyStored {
    /// Remembers at most `capacity` votes (or the newest batch alone, when it is larger);
    /// waits for earlier commits at most [`EARLIER_COMMITS_WAIT`].
    pub fn new(capacity: usize) -> Self {
        RecentlyStored {
            inner: Mutex::new(Inner::default()),
            capacity,
            committing: Mutex::new(Committing::default()),
            released: Notify::new(),
            wait_limit: EARLIER_COMMITS_WAIT,
        }
    }

    /// Waits for earlier commits at most `limit` (see [`wait_limit`]).
    #[must_use]
    pub fn waiting_at_most(mut self, limit: Duration) -> Self {
        self.wait_limit = limit;
        self
    }

    /// Takes a ticket for a batch past its last statement, about to COMMIT: batches with
    /// rows left to judge wait for it ([`RecentlyStored::wait_for_earlier_commits`]).
    pub(super) fn commit_ticket(&self) -> CommitTicket<'_> {
        let mut c = lock(&self.committing);
        let id = c.next;
        c.next += 1;
        c.open.insert(id);
        CommitTicket {
            recent: self,
            id: Some(id),
        }
    }

    fn release(&self, id: u64) {
        if lock(&self.committing).open.remove(&id) {
            self.released.notify_waiters();
        }
    }

    /// Waits, at most the limit, until every batch that holds a commit ticket now has
    /// released it (remembered, or failed).
    pub(super) async fn wait_for_earlier_commits(&self) -> EarlierCommits {
        let Some(last) = lock(&self.committing).open.last().copied() else {
            return EarlierCommits::None;
        };
        let released = async {
            loop {
                let notified = self.released.notified();
                tokio::pin!(notified);
                // Registered before looking, so a release in between is not missed.
                notified.as_mut().enable();
                if lock(&self.committing).open.range(..=last).next().is_none() {
                    return;
                }
                notified.await;
            }
        };
        match tokio::time::timeout(self.wait_limit, released).await {
            Ok(()) => EarlierCommits::Settled,
            Err(_) => EarlierCommits::TimedOut,
        }
    }

    /// Remembers the rows `outcome` counted (indices into `columns`) of a batch whose
    /// transaction COMMITTED, moving their payloads out of `columns` (the committed batch
    /// no longer needs them);
    /// forgets the oldest batches beyond the capacity, and everything remembered of
    /// another stored state than the outcome's. Then releases the batch's commit ticket
    /// ([`BatchOutcome::commit_ticket`]).
    pub fn remember(&self, columns: BatchColumns, outcome: &BatchOutcome) {
        self.keep(columns, outcome);
        if let Some(id) = outcome.commit_ticket {
            self.release(id);
        }
    }

    fn keep(&self, mut columns: BatchColumns, outcome: &BatchOutcome) {
        // Outside the lock: the counted rows, moved into columns of their own.
        let counted = columns.take_rows(&outcome.counted);
        let mut inner = self.lock();
        if !inner.is_of(&outcome.store) {
            *inner = Inner {
                store: Some(outcome.store.clone()),
                ..Inner::default()
            };
        }
        if counted.is_empty() {
            return;
        }
        let number = inner.next_number;
        inner.next_number += 1;
        for (row, &id) in counted.vote_ids.iter().enumerate() {
            inner.by_id.insert(id, (number, row));
        }
        inner.batches.push_back(RememberedBatch {
            number,
            columns: counted,
        });
        while inner.by_id.len() > self.capacity && inner.batches.len() > 1 {
            inner.forget_oldest();
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
        lock(&self.inner)
    }
}

/// A short lock, never held across an await. A panic while holding it leaves consistent
/// state (each step is one insert or remove): keep using it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vote::Vote;
    use chrono::DateTime;

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

    /// Small batches (a vote each at low traffic, in columns sized for a full batch) or
    /// batches of copies keep only their counted rows: memory stays bounded by the votes
    /// remembered, not by the batches' size.
    #[test]
    fn only_counted_rows_are_kept_whatever_the_batch_size() {
        let recent = RecentlyStored::new(3);
        for n in 0..10u128 {
            let mut c = BatchColumns::with_capacity(500);
            c.push(&vote(2 * n, "a"), true);
            c.push(&vote(2 * n + 1, "a"), true);
            recent.remember(c, &committed("s", &[0]));
        }
        assert_eq!(recent.len(), 3);
        let inner = recent.lock();
        assert_eq!(inner.batches.len(), 3);
        for b in &inner.batches {
            assert_eq!(b.columns.len(), 1, "the row it did not count is not kept");
            assert!(
                b.columns.vote_ids.capacity() <= 1,
                "nor room for a full batch"
            );
        }
        drop(inner);
        assert!(recent.is_duplicate(&store("s"), &columns(&[vote(18, "a")]), 0));
        assert!(!recent.is_duplicate(&store("s"), &columns(&[vote(19, "a")]), 0));
    }

    /// Memory whose waits end only when the batches settle (a limit no test reaches).
    fn patient() -> std::sync::Arc<RecentlyStored> {
        std::sync::Arc::new(RecentlyStored::new(100).waiting_at_most(Duration::from_secs(600)))
    }

    /// A batch waiting, as a task, for the batches committing now.
    fn spawn_waiter(
        recent: &std::sync::Arc<RecentlyStored>,
    ) -> tokio::task::JoinHandle<EarlierCommits> {
        let recent = recent.clone();
        tokio::spawn(async move { recent.wait_for_earlier_commits().await })
    }

    /// A batch committed, not remembered yet: a copy of its vote waits for it, then is a
    /// duplicate from memory.
    #[tokio::test]
    async fn a_wait_ends_when_the_earlier_batch_is_remembered() {
        let recent = patient();
        let at = store("s");
        let earlier = BatchOutcome {
            commit_ticket: recent.commit_ticket().hand_over(),
            ..committed("s", &[0])
        };
        let copy = columns(&[vote(1, "a")]);
        let mut rows = vec![0];
        assert_eq!(recent.drop_duplicates(&at, &copy, &mut rows), 0);
        let waiter = spawn_waiter(&recent);
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "waits while the earlier batch is not remembered"
        );
        recent.remember(columns(&[vote(1, "a")]), &earlier);
        assert!(matches!(waiter.await, Ok(EarlierCommits::Settled)));
        assert_eq!(recent.drop_duplicates(&at, &copy, &mut rows), 1);
    }

    #[tokio::test]
    async fn a_ticket_dropped_without_a_commit_is_released_and_nothing_is_waited_for() {
        let recent = patient();
        drop(recent.commit_ticket());
        assert_eq!(
            recent.wait_for_earlier_commits().await,
            EarlierCommits::None
        );
    }

    /// Only the batches committing when the wait began are waited for: a later one may
    /// be waiting for the waiter's locks.
    #[tokio::test]
    async fn a_wait_never_covers_a_batch_that_began_committing_after_it() {
        let recent = patient();
        let first = recent.commit_ticket();
        let waiter = spawn_waiter(&recent);
        tokio::task::yield_now().await;
        let _later = recent.commit_ticket();
        drop(first);
        assert!(matches!(waiter.await, Ok(EarlierCommits::Settled)));
    }

    #[tokio::test]
    async fn a_wait_for_a_commit_that_never_ends_stops_at_its_limit() {
        let recent = RecentlyStored::new(100).waiting_at_most(Duration::from_millis(20));
        let _stuck = recent.commit_ticket();
        assert_eq!(
            recent.wait_for_earlier_commits().await,
            EarlierCommits::TimedOut
        );
    }

    #[test]
    fn the_wait_stays_under_half_the_session_timeouts() {
        let short = SessionTimeouts {
            statement: Duration::from_secs(10),
            lock: Duration::from_millis(300),
            idle_in_transaction: Duration::from_millis(200),
        };
        assert_eq!(wait_limit(&short), Duration::from_millis(100));
        assert_eq!(
            wait_limit(&SessionTimeouts::default()),
            EARLIER_COMMITS_WAIT
        );
    }
}
