//! The batch write, the heart of exactly-once counting: one batch in ONE transaction,
//! committed or not as a whole; the caller acks the batch's deliveries only after
//! [`write_batch_attempt`] returned `Ok`.
//!
//! For one batch (statements in [`batch_sql`](super::batch_sql)):
//!
//! 1. BEGIN, sent in the same flight as the write (pipelined: one round trip for both);
//! 2. ONE statement (prepared once per session; the only one most batches run) inserts
//!    the first row of each UUID into `votes` in `vote_id` order with `ON CONFLICT (vote_id) DO NOTHING RETURNING`: only
//!    the returned rows are new; the same statement adds exactly those rows, per
//!    (election, candidate), to ONE tally shard row each and, one row per election, to
//!    the results outbox (`results_outbox`, see [`outbox`](super::outbox)), so the event
//!    announcing them commits or rolls back with them;
//! 3. only if some rows were not inserted (a UUID stored before, a redelivery, another
//!    payload of a UUID in the batch), they are judged in the same transaction
//!    ([`judge`](super::judge)): from memory for exact copies of votes this process
//!    stored itself, recently ([`RecentlyStored`]); else by one prepared read of their
//!    stored votes, and a conflict statement (recording them in `vote_conflicts`) only
//!    for rows read back with another payload;
//! 4. COMMIT.
//!
//! So a batch costs two round trips, three when rows are read back (and two more to
//! record a conflict: that statement is prepared unnamed each time): the transaction is
//! run by hand ([`txn`](super::txn)), so BEGIN need not wait for its own answer.
//!
//! Invariant kept: within a committed transaction, the tally increment for a candidate
//! equals the number of `votes` rows inserted for it and the increment its outbox event
//! carries, so `sum(tally_shards.votes) = count(votes)` per candidate at every commit
//! (checked by [`verify`](super::verify())), and the events of the committed transactions
//! add up to the tallies.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Text, Uuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use secrecy::{ExposeSecret, SecretString};

use super::batch_sql::WriteBatch;
use super::judge;
use super::recent::{RecentlyStored, StoreIdentity};
use super::{CHECKOUT_TIMEOUT, InDoubt, PgPool, UuidHasher, checkout, tls, txn};
use crate::error::DbError;
use crate::vote::Vote;

/// A row's UUID and payload, borrowed: what two rows (or a row and a vote) must share to
/// be the same vote.
pub(super) type RowRef<'a> = (
    &'a uuid::Uuid,
    &'a str,
    &'a str,
    Option<&'a str>,
    &'a chrono::DateTime<chrono::Utc>,
);

/// One batch, as columns ready to bind. Built once per batch and reused across retries.
#[derive(Debug, Default)]
pub struct BatchColumns {
    pub(super) vote_ids: Vec<uuid::Uuid>,
    pub(super) election_ids: Vec<String>,
    pub(super) candidate_ids: Vec<String>,
    pub(super) precinct_ids: Vec<Option<String>>,
    pub(super) cast_ats: Vec<chrono::DateTime<chrono::Utc>>,
    /// First row of its UUID in this batch (the one offered for insertion); later rows of
    /// the same UUID carry a different payload and are only judged for conflicts.
    pub(super) is_first: Vec<bool>,
}

impl BatchColumns {
    /// Adds a row. `is_first` is false for a later row of a UUID already in the batch.
    pub fn push(&mut self, vote: &Vote, is_first: bool) {
        self.push_owned(vote.clone(), is_first);
    }

    /// Adds a row, moving the vote's fields in.
    fn push_owned(&mut self, vote: Vote, is_first: bool) {
        self.vote_ids.push(vote.vote_id);
        self.election_ids.push(vote.election_id);
        self.candidate_ids.push(vote.candidate_id);
        self.precinct_ids.push(vote.precinct_id);
        self.cast_ats.push(vote.cast_at);
        self.is_first.push(is_first);
    }

    /// Room for `rows` rows in every column.
    pub(super) fn with_capacity(rows: usize) -> Self {
        BatchColumns {
            vote_ids: Vec::with_capacity(rows),
            election_ids: Vec::with_capacity(rows),
            candidate_ids: Vec::with_capacity(rows),
            precinct_ids: Vec::with_capacity(rows),
            cast_ats: Vec::with_capacity(rows),
            is_first: Vec::with_capacity(rows),
        }
    }

    /// Row `i` as a vote's UUID and payload, all its fields (`None` past the end).
    fn row(&self, i: usize) -> Option<RowRef<'_>> {
        (i < self.len()).then(|| {
            (
                &self.vote_ids[i],
                self.election_ids[i].as_str(),
                self.candidate_ids[i].as_str(),
                self.precinct_ids[i].as_deref(),
                &self.cast_ats[i],
            )
        })
    }

    /// Whether row `i` here and row `j` of `other` are the same vote: its UUID and every
    /// field of its payload.
    pub(super) fn same_row(&self, i: usize, other: &BatchColumns, j: usize) -> bool {
        self.row(i).is_some_and(|r| other.row(j) == Some(r))
    }

    /// The rows at `indices` (out-of-range ones skipped), moved into columns of exactly
    /// their size; what they held here is left empty.
    pub(super) fn take_rows(&mut self, indices: &[i32]) -> BatchColumns {
        let rows = self.in_range(indices);
        let mut out = BatchColumns::with_capacity(rows.len());
        for i in rows {
            out.vote_ids.push(self.vote_ids[i]);
            out.election_ids
                .push(std::mem::take(&mut self.election_ids[i]));
            out.candidate_ids
                .push(std::mem::take(&mut self.candidate_ids[i]));
            out.precinct_ids.push(self.precinct_ids[i].take());
            out.cast_ats.push(self.cast_ats[i]);
            out.is_first.push(self.is_first[i]);
        }
        out
    }

    /// Whether row `i` is `vote`: its UUID and every field of its payload.
    fn row_is(&self, i: usize, vote: &Vote) -> bool {
        let fields = (
            &vote.vote_id,
            vote.election_id.as_str(),
            vote.candidate_id.as_str(),
            vote.precinct_id.as_deref(),
            &vote.cast_at,
        );
        self.row(i) == Some(fields)
    }

    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.vote_ids.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.vote_ids.is_empty()
    }

    /// Whether row `ord` is the first of its UUID in the batch.
    pub(super) fn is_first(&self, ord: i32) -> bool {
        usize::try_from(ord).is_ok_and(|i| self.is_first.get(i) == Some(&true))
    }

    /// Row `ord`, as [`row`](Self::row) gives it.
    pub(super) fn row_at(&self, ord: i32) -> Option<RowRef<'_>> {
        self.row(usize::try_from(ord).ok()?)
    }

    /// The UUID of row `ord`.
    pub(super) fn vote_id(&self, ord: i32) -> Option<uuid::Uuid> {
        self.vote_ids.get(usize::try_from(ord).ok()?).copied()
    }

    /// The rows at `indices`, in that order, copied, with the indices they were taken
    /// from (out-of-range ones skipped, so the two stay aligned).
    pub(super) fn rows(&self, indices: &[i32]) -> (BatchColumns, Vec<i32>) {
        let rows = self.in_range(indices);
        let mut out = BatchColumns::with_capacity(rows.len());
        let mut taken = Vec::with_capacity(rows.len());
        for i in rows {
            out.vote_ids.push(self.vote_ids[i]);
            out.election_ids.push(self.election_ids[i].clone());
            out.candidate_ids.push(self.candidate_ids[i].clone());
            out.precinct_ids.push(self.precinct_ids[i].clone());
            out.cast_ats.push(self.cast_ats[i]);
            out.is_first.push(self.is_first[i]);
            taken.push(i as i32);
        }
        (out, taken)
    }

    /// The `indices` that are rows of this batch, in order.
    fn in_range(&self, indices: &[i32]) -> Vec<usize> {
        indices
            .iter()
            .filter_map(|&i| usize::try_from(i).ok())
            .filter(|&i| i < self.len())
            .collect()
    }

    fn ords(&self) -> Vec<i32> {
        (0..self.len() as i32).collect()
    }

    /// The rows the stored UUIDs `inserted` stand for (the earliest offered row of each,
    /// ascending), and every other row.
    ///
    /// # Errors
    /// [`DbError::BatchAnswer`] when a UUID is not one this batch offered.
    fn split_inserted(&self, inserted: &[uuid::Uuid]) -> Result<(Vec<i32>, Vec<i32>), DbError> {
        let mut unclaimed: HashSet<uuid::Uuid, UuidHasher> = inserted.iter().copied().collect();
        let mut counted = Vec::with_capacity(inserted.len());
        let mut rest = Vec::new();
        for (ord, (id, first)) in self.vote_ids.iter().zip(&self.is_first).enumerate() {
            if *first && unclaimed.remove(id) {
                counted.push(ord as i32);
            } else {
                rest.push(ord as i32);
            }
        }
        if let Some(id) = unclaimed.iter().next() {
            return Err(DbError::BatchAnswer {
                what: format!("vote {id} was stored but not offered"),
            });
        }
        Ok((counted, rest))
    }
}

/// A batch's columns filled from deliveries, with the in-batch dedupe every writer of
/// a batch applies before the round trip: a vote already in the batch with the same
/// payload is dropped (a copy); another payload of a UUID in the batch is kept as a later
/// row (judged for conflicts, never inserted).
#[derive(Debug, Default)]
pub struct DistinctRows {
    columns: BatchColumns,
    /// The first row of each UUID in the batch. Its later rows (another payload each,
    /// rare) come after it in `columns`: a copy is looked for from there on (a scan to
    /// the end of the batch, only for a UUID seen before in it).
    first_row: HashMap<uuid::Uuid, usize, UuidHasher>,
}

impl DistinctRows {
    /// Room for `capacity` rows.
    pub fn with_capacity(capacity: usize) -> Self {
        DistinctRows {
            columns: BatchColumns::with_capacity(capacity),
            first_row: HashMap::with_capacity_and_hasher(capacity, Default::default()),
        }
    }

    /// Adds `vote` as a row; returns false, adding nothing, when it is a copy of a row
    /// already in the batch. The vote's fields move into the columns (no copy is kept).
    pub fn add(&mut self, vote: Vote) -> bool {
        let rows = self.columns.len();
        match self.first_row.entry(vote.vote_id) {
            Entry::Vacant(first) => {
                first.insert(rows);
                self.columns.push_owned(vote, true);
            }
            Entry::Occupied(first) => {
                let c = &self.columns;
                if (*first.get()..rows).any(|i| c.row_is(i, &vote)) {
                    return false;
                }
                self.columns.push_owned(vote, false);
            }
        }
        true
    }

    /// The rows, ready to bind.
    pub fn columns(&self) -> &BatchColumns {
        &self.columns
    }

    /// The rows, taken out (this is left empty).
    pub fn take_columns(&mut self) -> BatchColumns {
        self.first_row.clear();
        std::mem::take(&mut self.columns)
    }
}

/// What the database decided for a batch, by row index (as pushed).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows inserted and counted.
    pub counted: Vec<i32>,
    /// Rows whose UUID was already counted with another payload (recorded in
    /// `vote_conflicts`). Every other row is a duplicate of a counted vote.
    pub conflicting: Vec<i32>,
    /// How many of the duplicate rows were recognised as copies of votes this process
    /// stored ([`RecentlyStored`]) instead of being judged by the database.
    pub known_duplicates: usize,
    /// Which stored state the batch was written to.
    pub store: StoreIdentity,
    /// Set on a batch committed with a [`RecentlyStored`]: its ticket among the batches
    /// committing, which [`RecentlyStored::remember`] releases; pass the outcome to it
    /// (until then, batches with rows left to judge wait for it, up to their limit; see
    /// [`recent`](super::recent)).
    pub commit_ticket: Option<u64>,
}

#[derive(QueryableByName)]
struct WriteResult {
    #[diesel(sql_type = Array<Uuid>)]
    counted: Vec<uuid::Uuid>,
    #[diesel(sql_type = BigInt)]
    xid: i64,
    #[diesel(sql_type = Text)]
    store: String,
}

/// Why one attempt at a batch failed.
#[derive(Debug)]
pub struct WriteFailure {
    /// The error (already redacted).
    pub error: DbError,
    /// Set when the failure came after COMMIT was sent (the outcome is unknown).
    pub in_doubt: Option<InDoubt>,
}

/// How far one attempt got, kept outside the attempt's future so it survives a timeout.
#[derive(Default)]
struct Progress {
    cancel: Option<tokio_postgres::CancelToken>,
    commit_sent: Option<InDoubt>,
}

/// Writes one batch in one transaction, giving up after `attempt_timeout` (checkout,
/// statement and COMMIT together). The caller acks the batch's deliveries only after this
/// returns `Ok` (the commit happened).
///
/// On timeout the running statement is cancelled on the server (a cancel request), and
/// the connection is discarded, so the abandoned attempt keeps no locks there; the
/// session's own `statement_timeout`/`lock_timeout` (see [`session_url`](super::session_url)) normally end a
/// stuck statement before that.
///
/// # Errors
/// [`WriteFailure`]: nothing was committed, or (with [`WriteFailure::in_doubt`]) COMMIT
/// was sent and its outcome is unknown.
pub async fn write_batch_attempt(
    pool: &PgPool,
    url: &SecretString,
    batch: &BatchColumns,
    shard: i16,
    attempt_timeout: Duration,
    recent: Option<&RecentlyStored>,
) -> Result<BatchOutcome, WriteFailure> {
    let mut progress = Progress::default();
    let attempt = tokio::time::timeout(
        attempt_timeout,
        write_batch_once(pool, url, batch, shard, recent, &mut progress),
    )
    .await;
    match attempt {
        Ok(result) => result.map_err(|error| WriteFailure {
            error,
            in_doubt: progress.commit_sent.take(),
        }),
        Err(_) => {
            // Cancel the statement on the server, but never a COMMIT already sent (a
            // cancelled wait for a synchronous standby would still commit locally).
            if let (Some(token), None) = (progress.cancel, &progress.commit_sent) {
                // Best effort, bounded: the server's own statement_timeout is the backstop.
                let _ =
                    tokio::time::timeout(CHECKOUT_TIMEOUT, tls::cancel(token, url.expose_secret()))
                        .await;
            }
            Err(WriteFailure {
                error: DbError::Timeout {
                    ms: attempt_timeout.as_millis() as u64,
                },
                in_doubt: progress.commit_sent,
            })
        }
    }
}

/// [`write_batch_attempt`] without a time limit or in-doubt details (tools and tests).
///
/// # Errors
/// [`DbError`] when the batch was not (or not surely) committed.
pub async fn write_batch(
    pool: &PgPool,
    url: &SecretString,
    batch: &BatchColumns,
    shard: i16,
) -> Result<BatchOutcome, DbError> {
    write_batch_once(pool, url, batch, shard, None, &mut Progress::default()).await
}

async fn write_batch_once(
    pool: &PgPool,
    url: &SecretString,
    batch: &BatchColumns,
    shard: i16,
    recent: Option<&RecentlyStored>,
    progress: &mut Progress,
) -> Result<BatchOutcome, DbError> {
    let mut conn = checkout(pool, url).await?;
    progress.cancel = Some(conn.cancel_token());
    txn::mark_open(&mut conn);
    let ords = batch.ords();
    let write = WriteBatch {
        columns: batch,
        ords: &ords,
        shard,
    }
    .get_result::<WriteResult>(&mut &*conn);
    // If BEGIN failed and the write did not, the write committed on its own (one
    // statement: votes, tallies and outbox together); the batch is not acked, and its
    // retry finds those votes stored.
    let written = match txn::begin_with(&conn, write).await {
        Ok(w) => judge_written(&mut conn, batch, w, recent).await,
        Err(e) => Err(e.into()),
    };
    let (mut outcome, xid) = match written {
        Ok(w) => w,
        Err(e) => {
            txn::rollback(&mut conn).await;
            return Err(e);
        }
    };
    if !outcome.counted.is_empty() {
        progress.commit_sent = Some(InDoubt {
            xid,
            outcome: outcome.clone(),
        });
    }
    // Released when this attempt fails or is dropped; on success, once remembered.
    let ticket = recent
        .filter(|_| !outcome.counted.is_empty())
        .map(RecentlyStored::commit_ticket);
    txn::commit(&mut conn).await?;
    progress.commit_sent = None;
    outcome.commit_ticket = ticket.and_then(|t| t.hand_over());
    Ok(outcome)
}

/// Inside the open transaction, after the write: the outcome once the rows it did not
/// insert are judged ([`judge`](super::judge)), and the transaction's id.
async fn judge_written(
    conn: &mut AsyncPgConnection,
    batch: &BatchColumns,
    written: WriteResult,
    recent: Option<&RecentlyStored>,
) -> Result<(BatchOutcome, i64), DbError> {
    let (counted, rest) = batch.split_inserted(&written.counted)?;
    let store = StoreIdentity::new(written.store);
    let judged = judge::judge_rest(conn, batch, &store, rest, recent).await?;
    let outcome = BatchOutcome {
        counted,
        conflicting: judged.conflicting,
        known_duplicates: judged.known_duplicates,
        store,
        commit_ticket: None,
    };
    Ok((outcome, written.xid))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A vote for the tests of this module and of the judging: UUID `n`, `candidate`,
    /// no precinct, a fixed time.
    pub(in crate::db) fn vote(n: u128, candidate: &str) -> Vote {
        Vote {
            vote_id: uuid::Uuid::from_u128(n),
            election_id: "e".into(),
            candidate_id: candidate.into(),
            precinct_id: None,
            cast_at: chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default(),
        }
    }

    #[test]
    fn a_copy_in_the_batch_is_dropped_and_another_payload_kept_as_a_later_row() {
        let mut rows = DistinctRows::with_capacity(4);
        assert!(rows.add(vote(1, "a")));
        assert!(!rows.add(vote(1, "a")), "an exact copy is dropped");
        assert!(rows.add(vote(1, "b")), "another payload is kept");
        assert!(rows.add(vote(2, "a")));
        assert!(
            !rows.add(vote(1, "b")),
            "a copy of a later row is dropped too"
        );
        let mut other_time = vote(1, "a");
        other_time.cast_at += chrono::Duration::microseconds(1);
        assert!(rows.add(other_time), "every field of the payload counts");
        let columns = rows.take_columns();
        assert_eq!(columns.len(), 4);
        assert_eq!(columns.is_first, vec![true, false, true, false]);
        assert_eq!(columns.candidate_ids, vec!["a", "b", "a", "a"]);
        assert!(rows.columns().is_empty());
    }
}
