//! PostgreSQL: the connection pool, migrations, the batch write and the `verify` check.
//!
//! The batch write is the heart of exactly-once counting. For one batch it runs ONE
//! statement in ONE transaction (one round trip in the common case):
//!
//! 1. the batch's columns arrive as arrays and are `UNNEST`ed into rows;
//! 2. rows are inserted into `votes` in `vote_id` order with `ON CONFLICT (vote_id) DO
//!    NOTHING RETURNING vote_id`: only the returned rows are new;
//! 3. the new rows, grouped per (election, candidate) and sorted, increment ONE tally
//!    shard row each (sorted keys: concurrent replicas never deadlock on tallies);
//! 4. rows whose UUID already existed with another payload are written to
//!    `vote_conflicts`.
//!
//! Invariant kept: within a committed transaction, the tally increment for a candidate
//! equals the number of `votes` rows inserted for it, so `sum(tally_shards.votes) =
//! count(votes)` per candidate at every commit (checked by [`verify`]).
//!
//! Rare case: a vote inserted by ANOTHER replica's concurrent transaction is not visible
//! to this statement's snapshot, so whether it conflicts cannot be judged there. Those
//! rows come back as "unresolved" and a second statement in the same transaction (with a
//! fresh READ COMMITTED snapshot) judges them.

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bool, Int2, Int4, Nullable, Text, Timestamptz, Uuid};
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use secrecy::{ExposeSecret, SecretString};

use crate::config::redact_url;
use crate::error::DbError;
use crate::vote::Vote;

/// The schema, compiled into the binary from `migrations/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

/// Advisory lock key held while migrating ("votesmig" in ASCII), so replicas starting
/// together apply migrations one at a time.
const MIGRATION_LOCK_KEY: i64 = 0x766f_7465_736d_6967;

/// How long a pool checkout (including connecting) may take before it counts as a
/// connection failure.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of PostgreSQL connections.
pub type PgPool = Pool<AsyncPgConnection>;

/// Adds `application_name=vote-aggregator` to a URL that sets none, so operators (and the
/// chaos suite's `pg_terminate_backend`) can tell the replicas' sessions apart.
fn with_application_name(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if !u.query_pairs().any(|(k, _)| k == "application_name") => {
            u.query_pairs_mut()
                .append_pair("application_name", "vote-aggregator");
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Builds the pool without connecting: the service starts (and reports `/readyz` 503)
/// even while PostgreSQL is down, and connects when it comes back.
pub fn pool(url: &SecretString, size: u32) -> PgPool {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(with_application_name(
        url.expose_secret(),
    ));
    Pool::builder()
        .max_size(size)
        .connection_timeout(CHECKOUT_TIMEOUT)
        .test_on_check_out(false)
        .build_unchecked(manager)
}

type PooledConn<'a> = bb8::PooledConnection<'a, AsyncDieselConnectionManager<AsyncPgConnection>>;

async fn checkout<'a>(pool: &'a PgPool, url: &SecretString) -> Result<PooledConn<'a>, DbError> {
    pool.get().await.map_err(|e| DbError::Connect {
        url: redact_url(url.expose_secret()),
        reason: e.to_string(),
    })
}

/// Applies pending migrations under a session advisory lock. Returns the versions
/// applied (empty when the schema was current).
///
/// # Errors
/// [`DbError::Connect`] when PostgreSQL cannot be reached, [`DbError::Migration`] when
/// a migration fails (the failed migration's transaction is rolled back).
pub async fn run_migrations(url: &SecretString) -> Result<Vec<String>, DbError> {
    let raw = url.expose_secret().to_string();
    let shown = redact_url(&raw);
    // diesel_migrations is synchronous; the wrapper drives the async connection from a
    // blocking thread.
    tokio::task::spawn_blocking(move || {
        let mut conn =
            <AsyncConnectionWrapper<AsyncPgConnection> as diesel::Connection>::establish(&raw)
                .map_err(|e| DbError::Connect {
                    url: shown,
                    reason: e.to_string(),
                })?;
        let lock =
            diesel::sql_query("SELECT pg_advisory_lock($1)").bind::<BigInt, _>(MIGRATION_LOCK_KEY);
        diesel::RunQueryDsl::execute(lock, &mut conn)?;
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.iter().map(ToString::to_string).collect())
            .map_err(|e| DbError::Migration(e.to_string()));
        // Closing the session releases the lock anyway; unlock explicitly to be prompt.
        let unlock = diesel::sql_query("SELECT pg_advisory_unlock($1)")
            .bind::<BigInt, _>(MIGRATION_LOCK_KEY);
        let _ = diesel::RunQueryDsl::execute(unlock, &mut conn);
        applied
    })
    .await
    .map_err(|e| DbError::Migration(format!("migration task failed: {e}")))?
}

/// Cheap liveness query through the pool.
///
/// # Errors
/// [`DbError`] when no connection can be had or the query fails.
pub async fn ping(pool: &PgPool, url: &SecretString) -> Result<(), DbError> {
    let mut conn = checkout(pool, url).await?;
    diesel::sql_query("SELECT 1").execute(&mut conn).await?;
    Ok(())
}

/// One batch, as columns ready to bind. Built once per batch and reused across retries.
#[derive(Debug, Default)]
pub struct BatchColumns {
    vote_ids: Vec<uuid::Uuid>,
    election_ids: Vec<String>,
    candidate_ids: Vec<String>,
    precinct_ids: Vec<Option<String>>,
    cast_ats: Vec<chrono::DateTime<chrono::Utc>>,
    /// First row of its UUID in this batch (the one offered for insertion); later rows of
    /// the same UUID carry a different payload and are only judged for conflicts.
    is_first: Vec<bool>,
}

impl BatchColumns {
    /// Adds a row. `is_first` is false for a later row of a UUID already in the batch.
    pub fn push(&mut self, vote: &Vote, is_first: bool) {
        self.vote_ids.push(vote.vote_id);
        self.election_ids.push(vote.election_id.clone());
        self.candidate_ids.push(vote.candidate_id.clone());
        self.precinct_ids.push(vote.precinct_id.clone());
        self.cast_ats.push(vote.cast_at);
        self.is_first.push(is_first);
    }

    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.vote_ids.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.vote_ids.is_empty()
    }

    fn ords(&self) -> Vec<i32> {
        (0..self.len() as i32).collect()
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
}

#[derive(QueryableByName)]
struct WriteResult {
    #[diesel(sql_type = Array<Int4>)]
    counted: Vec<i32>,
    #[diesel(sql_type = Array<Int4>)]
    conflicting: Vec<i32>,
    #[diesel(sql_type = Array<Int4>)]
    unresolved: Vec<i32>,
}

#[derive(QueryableByName)]
struct ConflictResult {
    #[diesel(sql_type = Array<Int4>)]
    conflicting: Vec<i32>,
}

const WRITE_BATCH_SQL: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                         $6::bool[], $7::int4[])
        AS t(vote_id, election_id, candidate_id, precinct_id, cast_at, is_first, ord)
),
ins AS (
    INSERT INTO votes (vote_id, election_id, candidate_id, precinct_id, cast_at)
    SELECT vote_id, election_id, candidate_id, precinct_id, cast_at
    FROM input WHERE is_first
    ORDER BY vote_id
    ON CONFLICT (vote_id) DO NOTHING
    RETURNING vote_id
),
counted AS (
    SELECT i.ord, i.election_id, i.candidate_id
    FROM input i JOIN ins ON ins.vote_id = i.vote_id
    WHERE i.is_first
),
tally AS (
    INSERT INTO tally_shards AS t (election_id, candidate_id, shard, votes)
    SELECT election_id, candidate_id, $8::int2, count(*)
    FROM counted
    GROUP BY election_id, candidate_id
    ORDER BY election_id, candidate_id
    ON CONFLICT (election_id, candidate_id, shard)
    DO UPDATE SET votes = t.votes + excluded.votes, updated_at = now()
),
-- Only rows that were not counted need judging (in the common case: none).
rest AS (
    SELECT i.* FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM counted c WHERE c.ord = i.ord)
),
first_counted AS (
    SELECT i.* FROM input i JOIN counted c ON c.ord = i.ord
),
judged AS (
    SELECT r.*,
           CASE
             -- Stored before this statement: compare with the stored vote.
             WHEN v.vote_id IS NOT NULL THEN
               (v.election_id, v.candidate_id, v.precinct_id, v.cast_at)
                 IS DISTINCT FROM (r.election_id, r.candidate_id, r.precinct_id, r.cast_at)
             -- Counted by this very statement: compare with that row.
             WHEN f.vote_id IS NOT NULL THEN
               (f.election_id, f.candidate_id, f.precinct_id, f.cast_at)
                 IS DISTINCT FROM (r.election_id, r.candidate_id, r.precinct_id, r.cast_at)
             -- Inserted by a concurrent transaction: unresolved here.
             ELSE NULL
           END AS conflicting
    FROM rest r
    LEFT JOIN votes v ON v.vote_id = r.vote_id
    LEFT JOIN first_counted f ON f.vote_id = r.vote_id
),
conflicts AS (
    INSERT INTO vote_conflicts (vote_id, election_id, candidate_id, precinct_id, cast_at)
    SELECT vote_id, election_id, candidate_id, precinct_id, cast_at
    FROM judged WHERE conflicting
    ORDER BY vote_id
    ON CONFLICT ON CONSTRAINT vote_conflicts_payload_key DO NOTHING
)
SELECT coalesce((SELECT array_agg(ord) FROM counted), '{}') AS counted,
       coalesce((SELECT array_agg(ord) FROM judged WHERE conflicting), '{}') AS conflicting,
       coalesce((SELECT array_agg(ord) FROM judged WHERE conflicting IS NULL), '{}') AS unresolved
"#;

/// Judges rows whose UUID another transaction inserted concurrently (now committed and
/// visible to this statement's fresh snapshot).
const RESOLVE_CONFLICTS_SQL: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                         $6::int4[])
        AS t(vote_id, election_id, candidate_id, precinct_id, cast_at, ord)
),
judged AS (
    SELECT i.*,
           (v.election_id, v.candidate_id, v.precinct_id, v.cast_at)
             IS DISTINCT FROM (i.election_id, i.candidate_id, i.precinct_id, i.cast_at)
             AS conflicting
    FROM input i JOIN votes v ON v.vote_id = i.vote_id
),
conflicts AS (
    INSERT INTO vote_conflicts (vote_id, election_id, candidate_id, precinct_id, cast_at)
    SELECT vote_id, election_id, candidate_id, precinct_id, cast_at
    FROM judged WHERE conflicting
    ORDER BY vote_id
    ON CONFLICT ON CONSTRAINT vote_conflicts_payload_key DO NOTHING
)
SELECT coalesce((SELECT array_agg(ord) FROM judged WHERE conflicting), '{}') AS conflicting
"#;

/// Writes one batch in one transaction. The caller acks the batch's deliveries only
/// after this returns `Ok` (the commit happened).
///
/// # Errors
/// [`DbError`]; nothing was committed (or, if the connection died during COMMIT, the
/// outcome is unknown — redelivery plus the UUID key make both cases safe).
pub async fn write_batch(
    pool: &PgPool,
    url: &SecretString,
    batch: &BatchColumns,
    shard: i16,
) -> Result<BatchOutcome, DbError> {
    let mut conn = checkout(pool, url).await?;
    let ords = batch.ords();
    conn.transaction::<_, DbError, _>(async |conn| {
        let res: WriteResult = diesel::sql_query(WRITE_BATCH_SQL)
            .bind::<Array<Uuid>, _>(&batch.vote_ids)
            .bind::<Array<Text>, _>(&batch.election_ids)
            .bind::<Array<Text>, _>(&batch.candidate_ids)
            .bind::<Array<Nullable<Text>>, _>(&batch.precinct_ids)
            .bind::<Array<Timestamptz>, _>(&batch.cast_ats)
            .bind::<Array<Bool>, _>(&batch.is_first)
            .bind::<Array<Int4>, _>(&ords)
            .bind::<Int2, _>(shard)
            .get_result(conn)
            .await?;
        let mut outcome = BatchOutcome {
            counted: res.counted,
            conflicting: res.conflicting,
        };
        if !res.unresolved.is_empty() {
            let pick = |i: &i32| *i as usize;
            let idx: Vec<usize> = res.unresolved.iter().map(pick).collect();
            let resolved: ConflictResult = diesel::sql_query(RESOLVE_CONFLICTS_SQL)
                .bind::<Array<Uuid>, _>(idx.iter().map(|&i| batch.vote_ids[i]).collect::<Vec<_>>())
                .bind::<Array<Text>, _>(
                    idx.iter()
                        .map(|&i| batch.election_ids[i].clone())
                        .collect::<Vec<_>>(),
                )
                .bind::<Array<Text>, _>(
                    idx.iter()
                        .map(|&i| batch.candidate_ids[i].clone())
                        .collect::<Vec<_>>(),
                )
                .bind::<Array<Nullable<Text>>, _>(
                    idx.iter()
                        .map(|&i| batch.precinct_ids[i].clone())
                        .collect::<Vec<_>>(),
                )
                .bind::<Array<Timestamptz>, _>(
                    idx.iter().map(|&i| batch.cast_ats[i]).collect::<Vec<_>>(),
                )
                .bind::<Array<Int4>, _>(&res.unresolved)
                .get_result(conn)
                .await?;
            outcome.conflicting.extend(resolved.conflicting);
        }
        Ok(outcome)
    })
    .await
}

/// One (election, candidate) whose tally disagrees with its counted votes.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct TallyDrift {
    /// Election.
    #[diesel(sql_type = Text)]
    pub election_id: String,
    /// Candidate.
    #[diesel(sql_type = Text)]
    pub candidate_id: String,
    /// Sum of its `tally_shards.votes`.
    #[diesel(sql_type = BigInt)]
    pub tally: i64,
    /// Rows in `votes`.
    #[diesel(sql_type = BigInt)]
    pub counted: i64,
}

/// Result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Rows in `votes`.
    pub votes: i64,
    /// Sum over all tally shards.
    pub tallied: i64,
    /// (election, candidate) pairs checked.
    pub candidates: i64,
    /// Pairs whose tally differs from their count (empty when consistent).
    pub drift: Vec<TallyDrift>,
}

#[derive(QueryableByName)]
struct Totals {
    #[diesel(sql_type = BigInt)]
    votes: i64,
    #[diesel(sql_type = BigInt)]
    tallied: i64,
    #[diesel(sql_type = BigInt)]
    candidates: i64,
}

/// Checks invariant 1 of DESIGN.md: for every (election, candidate), the sum of its
/// tally shards equals its rows in `votes`. Runs in one REPEATABLE READ snapshot so a
/// live system is checked consistently.
///
/// # Errors
/// [`DbError`] when the database cannot be read.
pub async fn verify(url: &SecretString) -> Result<VerifyReport, DbError> {
    let mut conn = AsyncPgConnection::establish(url.expose_secret())
        .await
        .map_err(|e| DbError::Connect {
            url: redact_url(url.expose_secret()),
            reason: e.to_string(),
        })?;
    conn.build_transaction()
        .repeatable_read()
        .read_only()
        .run::<_, DbError, _>(async |conn| {
            let pairs = r#"
                WITH t AS (SELECT election_id, candidate_id, sum(votes)::bigint AS tally
                           FROM tally_shards GROUP BY 1, 2),
                     c AS (SELECT election_id, candidate_id, count(*)::bigint AS counted
                           FROM votes GROUP BY 1, 2)
                SELECT coalesce(t.election_id, c.election_id) AS election_id,
                       coalesce(t.candidate_id, c.candidate_id) AS candidate_id,
                       coalesce(t.tally, 0) AS tally, coalesce(c.counted, 0) AS counted
                FROM t FULL JOIN c USING (election_id, candidate_id)"#;
            let totals: Totals = diesel::sql_query(format!(
                "WITH p AS ({pairs}) SELECT coalesce(sum(counted), 0)::bigint AS votes, \
                 coalesce(sum(tally), 0)::bigint AS tallied, count(*) AS candidates FROM p"
            ))
            .get_result(conn)
            .await?;
            let drift: Vec<TallyDrift> = diesel::sql_query(format!(
                "{pairs} WHERE coalesce(t.tally, 0) <> coalesce(c.counted, 0) ORDER BY 1, 2"
            ))
            .load(conn)
            .await?;
            Ok(VerifyReport {
                votes: totals.votes,
                tallied: totals.tallied,
                candidates: totals.candidates,
                drift,
            })
        })
        .await
}
