//! Judging the rows a batch write did not insert, inside its transaction, after the
//! write: each such row's UUID is stored (the write waited for any concurrent inserter),
//! so the row is a duplicate (stored with exactly its payload) or a conflict (stored
//! with another payload; recorded once in `vote_conflicts`).
//!
//! Cheapest first:
//! 1. copies of votes this process stored itself, recently, from memory
//!    ([`RecentlyStored`]), with no statement;
//! 2. the rest by one prepared statement that reads their stored votes by primary key
//!    ([`StoredVotes`]), compared here: a row read back with exactly its payload is a
//!    duplicate (`votes` is append-only, so that payload stays stored);
//! 3. only the rows read back with another payload (a conflict, or a timestamp finer
//!    than the microseconds the database keeps) go to the conflict statement
//!    ([`RESOLVE_CONFLICTS_SQL`]), which judges them again in SQL and records the
//!    conflicts. The comparison here only ever clears a row as a duplicate; whether a
//!    row conflicts is always the database's answer.
//!
//! A stored vote this process cannot read (a value another writer stored that has no
//! form here, such as an infinite `cast_at`) sends every row to the conflict statement,
//! with a warning once per process. A row whose UUID is not stored after the write is
//! impossible by the write's guarantee: the batch is refused (rolled back and retried),
//! never acked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use diesel::QueryableByName;
use diesel::sql_types::{Array, Int4, Nullable, Text, Timestamptz, Uuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::UuidHasher;
use super::batch::{BatchColumns, RowRef};
use super::batch_sql::{RESOLVE_CONFLICTS_SQL, StoredVotes};
use super::recent::{EarlierCommits, RecentlyStored, StoreIdentity};
use crate::error::DbError;

/// How the rows a batch write did not insert were judged; every row not conflicting is
/// a duplicate of a counted vote.
#[derive(Debug, Default)]
pub(super) struct Judged {
    /// Rows whose UUID is stored with another payload (recorded in `vote_conflicts` by
    /// the time the transaction commits), ascending.
    pub conflicting: Vec<i32>,
    /// How many duplicates memory recognised, with no statement.
    pub known_duplicates: usize,
}

/// A stored vote, as [`StoredVotes`] reads it.
#[derive(QueryableByName)]
struct StoredVote {
    #[diesel(sql_type = Uuid)]
    vote_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    election_id: String,
    #[diesel(sql_type = Text)]
    candidate_id: String,
    #[diesel(sql_type = Nullable<Text>)]
    precinct_id: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    cast_at: chrono::DateTime<chrono::Utc>,
}

impl StoredVote {
    /// Its UUID and payload, to compare with a batch's row.
    fn row(&self) -> RowRef<'_> {
        (
            &self.vote_id,
            &self.election_id,
            &self.candidate_id,
            self.precinct_id.as_deref(),
            &self.cast_at,
        )
    }
}

/// What [`RESOLVE_CONFLICTS_SQL`] answers.
#[derive(QueryableByName)]
struct ConflictResult {
    #[diesel(sql_type = Array<Int4>)]
    conflicting: Vec<i32>,
    #[diesel(sql_type = Array<Int4>)]
    missing: Vec<i32>,
}

/// Judges `rest`, the rows of `batch` the write to `store` did not insert: from memory
/// when `recent` knows them as duplicates, else in the database.
///
/// # Errors
/// [`DbError`] when a statement fails, or [`DbError::BatchAnswer`] when a row's UUID is
/// not stored (the caller rolls the batch back).
pub(super) async fn judge_rest(
    conn: &mut AsyncPgConnection,
    batch: &BatchColumns,
    store: &StoreIdentity,
    mut rest: Vec<i32>,
    recent: Option<&RecentlyStored>,
) -> Result<Judged, DbError> {
    let known_duplicates = match recent {
        Some(r) => drop_remembered(r, store, batch, &mut rest).await,
        None => 0,
    };
    let conflicting = if rest.is_empty() {
        Vec::new()
    } else {
        judge_stored(conn, batch, &rest).await?
    };
    Ok(Judged {
        conflicting,
        known_duplicates,
    })
}

/// Drops from `rest` the rows `recent` knows as duplicates; returns how many.
async fn drop_remembered(
    recent: &RecentlyStored,
    store: &StoreIdentity,
    batch: &BatchColumns,
    rest: &mut Vec<i32>,
) -> usize {
    let mut known = recent.drop_duplicates(store, batch, rest);
    // A first row of its UUID left may be a copy of a vote in a batch of this process
    // whose COMMIT let this write go on but which is not remembered yet: wait for those
    // batches, then look again. (A later payload of a UUID is left only beside its first
    // row, or when this batch stored that UUID: memory cannot vouch for it alone.)
    let memory_may_know = rest.iter().any(|&ord| batch.is_first(ord));
    if memory_may_know && recent.wait_for_earlier_commits().await != EarlierCommits::None {
        known += recent.drop_duplicates(store, batch, rest);
    }
    known
}

/// Reads the stored votes of the rows at `rest` and returns, ascending, the rows that
/// conflict with them (recorded in `vote_conflicts` by then).
///
/// # Errors
/// As [`judge_rest`].
async fn judge_stored(
    conn: &mut AsyncPgConnection,
    batch: &BatchColumns,
    rest: &[i32],
) -> Result<Vec<i32>, DbError> {
    let ids: Vec<uuid::Uuid> = rest.iter().filter_map(|&ord| batch.vote_id(ord)).collect();
    let stored: Vec<StoredVote> = match (StoredVotes { vote_ids: &ids }).load(conn).await {
        Ok(stored) => stored,
        // Read, but not representable here: the database judges every row.
        Err(diesel::result::Error::DeserializationError(e)) => {
            warn_unreadable_once(&*e);
            return record_conflicts(conn, batch, rest).await;
        }
        Err(e) => return Err(e.into()),
    };
    let ReadBack { missing, differing } = compare_with_stored(batch, rest, &stored);
    refuse_missing(&missing)?;
    if differing.is_empty() {
        return Ok(Vec::new());
    }
    record_conflicts(conn, batch, &differing).await
}

/// The rows at `rest` a read of stored votes did not clear as duplicates.
#[derive(Debug, Default, PartialEq, Eq)]
struct ReadBack {
    /// Rows whose UUID has no stored vote.
    missing: Vec<i32>,
    /// Rows whose stored vote has another payload (or one compared unequal here).
    differing: Vec<i32>,
}

/// Compares each row at `rest` with the stored vote of its UUID in `stored`: a row with
/// exactly that payload is a duplicate and is left out.
fn compare_with_stored(batch: &BatchColumns, rest: &[i32], stored: &[StoredVote]) -> ReadBack {
    let by_id: HashMap<uuid::Uuid, &StoredVote, UuidHasher> =
        stored.iter().map(|v| (v.vote_id, v)).collect();
    let mut read_back = ReadBack::default();
    for &ord in rest {
        match batch.vote_id(ord).and_then(|id| by_id.get(&id)) {
            None => read_back.missing.push(ord),
            Some(v) if batch.row_at(ord) == Some(v.row()) => {}
            Some(_) => read_back.differing.push(ord),
        }
    }
    read_back
}

/// Warns, the first time in this process, that stored votes could not be read back.
fn warn_unreadable_once(error: &dyn std::error::Error) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            %error,
            "stored votes could not be read back: such batches are judged by the conflict \
             statement instead, which is slower; a value another writer stored that this \
             service cannot represent (such as an infinite cast_at) or a votes table changed \
             by hand causes this"
        );
    }
}

/// Judges the rows at `ords` in SQL, records their conflicts, and returns the
/// conflicting ones, ascending.
///
/// # Errors
/// As [`judge_rest`].
async fn record_conflicts(
    conn: &mut AsyncPgConnection,
    batch: &BatchColumns,
    ords: &[i32],
) -> Result<Vec<i32>, DbError> {
    let (rows, ords) = batch.rows(ords);
    // Sent unprepared (planned for its rows each time): prepared, its generic plan made
    // batch-100 runs about a third slower in `make load`. It runs only for rows read back
    // with another payload, rare.
    let judged: ConflictResult = diesel::sql_query(RESOLVE_CONFLICTS_SQL)
        .bind::<Array<Uuid>, _>(&rows.vote_ids)
        .bind::<Array<Text>, _>(&rows.election_ids)
        .bind::<Array<Text>, _>(&rows.candidate_ids)
        .bind::<Array<Nullable<Text>>, _>(&rows.precinct_ids)
        .bind::<Array<Timestamptz>, _>(&rows.cast_ats)
        .bind::<Array<Int4>, _>(&ords)
        .get_result(conn)
        .await?;
    refuse_missing(&judged.missing)?;
    let mut conflicting = judged.conflicting;
    conflicting.sort_unstable();
    Ok(conflicting)
}

/// Refuses the batch when some rows were neither inserted nor found stored.
///
/// # Errors
/// [`DbError::BatchAnswer`] naming how many and the first: nothing is committed, the
/// transaction is rolled back and the batch retried.
fn refuse_missing(missing: &[i32]) -> Result<(), DbError> {
    match missing.iter().min() {
        None => Ok(()),
        Some(ord) => Err(DbError::BatchAnswer {
            what: format!(
                "{} rows were neither inserted nor found stored (row {ord} first)",
                missing.len()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::batch::tests::vote;
    use crate::vote::Vote;

    fn stored(v: &Vote) -> StoredVote {
        StoredVote {
            vote_id: v.vote_id,
            election_id: v.election_id.clone(),
            candidate_id: v.candidate_id.clone(),
            precinct_id: v.precinct_id.clone(),
            cast_at: v.cast_at,
        }
    }

    #[test]
    fn only_an_exact_copy_of_the_stored_vote_is_cleared() {
        let same = vote(1, "a");
        let mut finer = vote(2, "a");
        let mut with_precinct = vote(3, "a");
        let other = vote(4, "b");
        let absent = vote(5, "a");
        let mut batch = BatchColumns::default();
        batch.push(&same, true);
        finer.cast_at += chrono::Duration::nanoseconds(400);
        batch.push(&finer, true);
        with_precinct.precinct_id = Some("p".into());
        batch.push(&with_precinct, true);
        batch.push(&other, true);
        batch.push(&absent, true);
        let on_disk = [
            stored(&same),
            stored(&vote(2, "a")),
            stored(&vote(3, "a")),
            stored(&vote(4, "a")),
        ];
        assert_eq!(
            compare_with_stored(&batch, &[0, 1, 2, 3, 4, 9], &on_disk),
            ReadBack {
                missing: vec![4, 9],
                differing: vec![1, 2, 3],
            }
        );
    }
}
