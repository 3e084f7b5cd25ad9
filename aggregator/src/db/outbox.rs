//! The results outbox in PostgreSQL: claiming committed events for the relay, deleting
//! them once the broker confirmed them, and the figures of the pending-events gauges.
//!
//! Events are written by the batch statement (see the parent module) in the transaction
//! that counts their votes, so a row exists only for a committed count. The relay never
//! tracks a watermark: ids and `created_at` are assigned before COMMIT, so commit order
//! differs from their order and "after the last one seen" would skip late commits.
//! Instead a claim locks the oldest rows it can get with `FOR UPDATE SKIP LOCKED` (several
//! relays never take the same row) and the same transaction deletes them after the
//! broker's confirms. A relay that dies before that COMMIT leaves the rows in place
//! (rolled back, unlocked) and another relay publishes them again: the only source of
//! repeated events, which consumers drop by event id.

use std::collections::BTreeMap;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Double, Text, Timestamptz, Uuid};
use diesel_async::{RunQueryDsl, TransactionManager as _};
use secrecy::SecretString;

use super::{PgPool, PooledConn, checkout};
use crate::error::DbError;
use crate::results::Event;

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Uuid)]
    event_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    election_id: String,
    #[diesel(sql_type = Text)]
    increments: String,
    #[diesel(sql_type = Text)]
    xid: String,
    #[diesel(sql_type = Timestamptz)]
    created_at: chrono::DateTime<chrono::Utc>,
}

impl Row {
    fn into_event(self) -> Result<Event, DbError> {
        let bad = |what: &str| {
            DbError::Query(diesel::result::Error::DeserializationError(
                format!("results_outbox row {}: {what}", self.event_id).into(),
            ))
        };
        let increments: BTreeMap<String, i64> = serde_json::from_str(&self.increments)
            .map_err(|_| bad("increments not an object of counts"))?;
        let xid: u64 = self.xid.parse().map_err(|_| bad("xid not a number"))?;
        Ok(Event::new(
            self.event_id,
            self.election_id,
            increments,
            xid,
            self.created_at,
        ))
    }
}

const CLAIM_SQL: &str = "SELECT event_id, election_id, increments::text AS increments, \
     xid::text AS xid, created_at FROM results_outbox \
     ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED";

/// Events claimed by one relay round: locked in an open transaction on `conn` until
/// [`Claim::delete_and_commit`] (published) or [`Claim::release`] / drop (not).
pub struct Claim<'a> {
    conn: PooledConn<'a>,
    /// The claimed events, oldest first.
    pub events: Vec<Event>,
}

type Tm = diesel_async::AnsiTransactionManager;

/// Claims up to `limit` committed events no other relay holds, oldest first. An empty
/// claim is fine (nothing pending); release it.
///
/// # Errors
/// [`DbError`] when PostgreSQL cannot be reached or the query fails.
pub async fn claim<'a>(
    pool: &'a PgPool,
    url: &SecretString,
    limit: usize,
) -> Result<Claim<'a>, DbError> {
    let mut conn = checkout(pool, url).await?;
    // A failure (or a drop) inside the transaction leaves the manager "in a
    // transaction", so the pool discards the connection and the server rolls back.
    Tm::begin_transaction(&mut *conn).await?;
    let rows: Vec<Row> = diesel::sql_query(CLAIM_SQL)
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .load(&mut *conn)
        .await?;
    let events = rows
        .into_iter()
        .map(Row::into_event)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Claim { conn, events })
}

impl Claim<'_> {
    /// Deletes the claimed events and commits: called only once the broker confirmed
    /// every one of them.
    ///
    /// # Errors
    /// [`DbError`] when the delete or the COMMIT fails: the events stay and are
    /// published again (a repeat, not a loss).
    pub async fn delete_and_commit(mut self) -> Result<(), DbError> {
        let ids: Vec<uuid::Uuid> = self.events.iter().map(|e| e.event_id).collect();
        diesel::sql_query("DELETE FROM results_outbox WHERE event_id = ANY($1)")
            .bind::<diesel::sql_types::Array<Uuid>, _>(&ids)
            .execute(&mut *self.conn)
            .await?;
        Tm::commit_transaction(&mut *self.conn).await?;
        Ok(())
    }

    /// Ends the claim without deleting anything: the events stay for the next round.
    pub async fn release(mut self) {
        let _ = Tm::rollback_transaction(&mut *self.conn).await;
    }
}

/// What is waiting in the outbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pending {
    /// Events not yet confirmed by the broker (claimed ones included).
    pub events: i64,
    /// Age of the oldest of them in seconds (0 when there is none).
    pub oldest_age_seconds: f64,
}

#[derive(QueryableByName)]
struct PendingRow {
    #[diesel(sql_type = BigInt)]
    events: i64,
    #[diesel(sql_type = Double)]
    oldest: f64,
}

/// Reads [`Pending`] (one index-backed `min` and a count of a table the relays keep
/// small).
///
/// # Errors
/// [`DbError`] when PostgreSQL cannot be asked.
pub async fn pending(pool: &PgPool, url: &SecretString) -> Result<Pending, DbError> {
    let mut conn = checkout(pool, url).await?;
    let row: PendingRow = diesel::sql_query(
        "SELECT count(*) AS events, coalesce(extract(epoch FROM \
         clock_timestamp() - min(created_at)), 0)::float8 AS oldest FROM results_outbox",
    )
    .get_result(&mut *conn)
    .await?;
    Ok(Pending {
        events: row.events,
        oldest_age_seconds: row.oldest.max(0.0),
    })
}
