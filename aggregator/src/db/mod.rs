//! PostgreSQL: the connection pool, migrations and the batch write; in-doubt COMMIT
//! resolution (`in_doubt`), the `verify` check ([`verify()`]), TLS ([`tls`]: every
//! session is opened there) and the schema's state before consuming ([`schema`]: pending
//! migrations, the runtime role) in submodules.
//!
//! The batch write is the heart of exactly-once counting. For one batch it runs ONE
//! statement in ONE transaction (one round trip in the common case):
//!
//! 1. the batch's columns arrive as arrays and are `UNNEST`ed into rows;
//! 2. rows are inserted into `votes` in `vote_id` order with `ON CONFLICT (vote_id) DO
//!    NOTHING RETURNING vote_id`: only the returned rows are new;
//! 3. the new rows, grouped per (election, candidate) and sorted, increment ONE tally
//!    shard row each (sorted keys: concurrent replicas never deadlock on tallies);
//! 4. the same per-candidate increments, one row per election, are written to the
//!    results outbox (`results_outbox`, see [`outbox`]): the event announcing them
//!    commits or rolls back with them;
//! 5. rows whose UUID already existed with another payload are written to
//!    `vote_conflicts`.
//!
//! Invariant kept: within a committed transaction, the tally increment for a candidate
//! equals the number of `votes` rows inserted for it and the increment its outbox event
//! carries, so `sum(tally_shards.votes) = count(votes)` per candidate at every commit
//! (checked by [`verify`]), and the events of the committed transactions add up to the
//! tallies.
//!
//! Rare case: a vote inserted by ANOTHER replica's concurrent transaction is not visible
//! to this statement's snapshot, so whether it conflicts cannot be judged there. Those
//! rows come back as "unresolved" and a second statement in the same transaction (with a
//! fresh READ COMMITTED snapshot) judges them.

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bool, Int2, Int4, Nullable, Text, Timestamptz, Uuid};
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncPgConnection, RunQueryDsl, TransactionManager as _};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::FutureExt as _;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{SessionTimeouts, redact_url};
use crate::error::DbError;
use crate::vote::Vote;

pub mod drift_check;
mod in_doubt;
mod open_errors;
pub mod outbox;
pub mod schema;
pub mod tls;
mod verify;

pub use self::in_doubt::{InDoubt, Resolution, resolve_in_doubt};
pub use self::tls::{PgConnector, SslMode};
pub use self::verify::{TallyDrift, VerifyReport, verify};

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

/// `application_name` of the service's sessions (unless the URL sets one), so operators
/// (and the chaos suite's `pg_terminate_backend`) can tell the replicas' sessions apart.
pub const APPLICATION_NAME: &str = crate::SERVICE_NAME;

/// `application_name` of the results relay's session (see [`with_application_name`]).
pub const RELAY_APPLICATION_NAME: &str = "vote-aggregator-results-relay";

/// `url` with `application_name=name` unless it sets one (appended: every other pair is
/// kept byte for byte).
pub fn with_application_name(url: &SecretString, name: &str) -> SecretString {
    let raw = url.expose_secret();
    let has =
        url::Url::parse(raw).is_ok_and(|u| u.query_pairs().any(|(k, _)| k == "application_name"));
    if has {
        return url.clone();
    }
    let sep = if raw.contains('?') { '&' } else { '?' };
    SecretString::from(format!("{raw}{sep}application_name={name}"))
}

/// The URL the service's sessions connect with: the operator's URL plus
/// `application_name` (unless set) and, through the startup `options` parameter (no extra
/// round trip), the settings every session pins:
/// - `synchronous_commit=on`: a COMMIT returns only once its WAL is flushed, so an ack
///   after COMMIT never covers a vote a server crash could still lose (a database or
///   role default of `off` is overridden);
/// - with `timeouts` (the service's pool): `statement_timeout`, `lock_timeout` and
///   `idle_in_transaction_session_timeout`, so a session the client gave up on cannot
///   keep its locks on the server. Migrations and `verify` pass `None`: they may wait
///   for the migration lock or scan for longer.
///
/// Operator `options` in the URL are kept; these settings are appended after them and so
/// win.
pub fn session_url(url: &str, timeouts: Option<&SessionTimeouts>) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return url.to_string();
    };
    // Every other query pair is kept byte for byte: libpq-style parsers percent-decode
    // but do not read '+' as a space, so re-encoding them could change a value.
    let query = u.query().unwrap_or_default().to_string();
    let mut kept: Vec<String> = Vec::new();
    let mut options = Vec::new();
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        match piece.split_once('=') {
            Some(("options", value)) => {
                options.push(
                    percent_encoding::percent_decode_str(value)
                        .decode_utf8_lossy()
                        .into_owned(),
                );
            }
            _ => kept.push(piece.to_string()),
        }
    }
    if !kept.iter().any(|p| p.starts_with("application_name=")) {
        kept.push(format!("application_name={APPLICATION_NAME}"));
    }
    options.push(format!("-c synchronous_commit={}", synchronous_commit()));
    if let Some(t) = timeouts {
        options.push(format!(
            "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
            t.statement.as_millis(),
            t.lock.as_millis(),
            t.idle_in_transaction.as_millis()
        ));
    }
    let options = options.join(" ");
    let encoded =
        percent_encoding::utf8_percent_encode(&options, percent_encoding::NON_ALPHANUMERIC);
    kept.push(format!("options={encoded}"));
    u.set_query(Some(&kept.join("&")));
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_url_pins_settings_after_the_operators_options() {
        let url = session_url(
            "postgres://u:p@db/votes?options=-c%20work_mem%3D8MB&sslmode=disable&password=a+b",
            Some(&SessionTimeouts::default()),
        );
        assert!(url.contains("sslmode=disable"), "{url}");
        assert!(
            url.contains("password=a+b"),
            "other pairs are kept as written: {url}"
        );
        assert!(url.contains("application_name=vote-aggregator"), "{url}");
        let options = url::Url::parse(&url)
            .expect("url")
            .query_pairs()
            .find(|(k, _)| k == "options")
            .map(|(_, v)| v.into_owned())
            .expect("options");
        assert_eq!(
            options,
            "-c work_mem=8MB -c synchronous_commit=on -c statement_timeout=10000 \
             -c lock_timeout=5000 -c idle_in_transaction_session_timeout=10000"
        );
        let relay =
            with_application_name(&SecretString::from("postgres://db/v?sslmode=disable"), "r");
        assert_eq!(
            relay.expose_secret(),
            "postgres://db/v?sslmode=disable&application_name=r"
        );
        let bare = session_url("postgres://db/votes?application_name=mine", None);
        assert!(bare.contains("application_name=mine") && !bare.contains("statement_timeout"));
    }
}

/// `on`, except in the deliberately broken fault-injection build that proves the chaos
/// suite catches a server crash losing acked commits.
fn synchronous_commit() -> &'static str {
    #[cfg(feature = "fault-injection")]
    if crate::fault::synchronous_commit_off() {
        return "off";
    }
    "on"
}

/// Builds the pool without connecting: the service starts (and reports `/readyz` 503)
/// even while PostgreSQL is down, and connects when it comes back. Every session sets
/// `timeouts` (see [`session_url`]) and is opened by [`PgConnector`] (TLS as the URL's
/// `sslmode` says). A URL whose TLS settings do not load (which `Config::from_lookup`
/// refuses at start-up) makes every checkout fail with that one line. Why a session
/// could not be opened is logged (`open_errors`).
pub fn pool(url: &SecretString, size: u32, timeouts: &SessionTimeouts) -> PgPool {
    let target = session_url(url.expose_secret(), Some(timeouts));
    let connector = PgConnector::from_url(&target)
        .map(|c| c.shown_as(url.expose_secret()))
        .map_err(|e| e.to_string());
    let mut config = ManagerConfig::default();
    config.custom_setup = Box::new(move |_url| {
        let connector = connector.clone();
        async move {
            match connector {
                Ok(c) => c
                    .connect()
                    .await
                    .map_err(|e| diesel::result::ConnectionError::BadConnection(e.to_string())),
                Err(line) => Err(diesel::result::ConnectionError::BadConnection(line)),
            }
        }
        .boxed()
    });
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(target, config);
    Pool::builder()
        .max_size(size)
        .connection_timeout(CHECKOUT_TIMEOUT)
        .test_on_check_out(false)
        .error_sink(Box::new(open_errors::LogOpenErrors::default()))
        .build_unchecked(manager)
}

/// Opens one session outside the pool (migrations, `verify`) with the settings
/// [`session_url`] pins (no timeouts).
///
/// # Errors
/// TLS settings that do not load (which the configuration check refuses earlier) as
/// [`DbError::Connect`]; connection failures as [`PgConnector::connect`] reports them.
pub async fn connect_one(url: &SecretString) -> Result<AsyncPgConnection, DbError> {
    let target = session_url(url.expose_secret(), None);
    let connector = PgConnector::from_url(&target).map_err(|e| DbError::Connect {
        url: redact_url(url.expose_secret()),
        reason: e.to_string(),
    })?;
    connector.shown_as(url.expose_secret()).connect().await
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
/// [`DbError::Connect`] when PostgreSQL cannot be reached,
/// [`DbError::MigrationNotPermitted`] when the user may not change the schema (a runtime
/// role), [`DbError::Migration`] when a migration fails (the failed migration's
/// transaction is rolled back).
pub async fn run_migrations(url: &SecretString) -> Result<Vec<String>, DbError> {
    let conn = connect_one(url).await?;
    // diesel_migrations is synchronous; the wrapper drives the async connection from a
    // blocking thread (on this runtime, which keeps driving the session's socket).
    tokio::task::spawn_blocking(move || {
        let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
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
    .map_err(|e| schema::classify_migration_error(url.expose_secret(), e))
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

    /// The rows at `indices`, in that order.
    fn rows(&self, indices: impl Iterator<Item = usize>) -> BatchColumns {
        let mut out = BatchColumns::default();
        for i in indices {
            out.vote_ids.push(self.vote_ids[i]);
            out.election_ids.push(self.election_ids[i].clone());
            out.candidate_ids.push(self.candidate_ids[i].clone());
            out.precinct_ids.push(self.precinct_ids[i].clone());
            out.cast_ats.push(self.cast_ats[i]);
            out.is_first.push(self.is_first[i]);
        }
        out
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
    #[diesel(sql_type = BigInt)]
    xid: i64,
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
-- One offered row per UUID (the earliest), so each inserted row maps back to exactly one
-- ord: two rows of one UUID can never both be counted, whatever the caller sent.
offered AS (
    SELECT DISTINCT ON (vote_id) * FROM input WHERE is_first ORDER BY vote_id, ord
),
ins AS (
    INSERT INTO votes (vote_id, election_id, candidate_id, precinct_id, cast_at)
    SELECT vote_id, election_id, candidate_id, precinct_id, cast_at
    FROM offered
    ORDER BY vote_id
    ON CONFLICT (vote_id) DO NOTHING
    RETURNING vote_id
),
counted AS (
    SELECT o.ord, o.election_id, o.candidate_id
    FROM offered o JOIN ins ON ins.vote_id = o.vote_id
),
per_candidate AS (
    SELECT election_id, candidate_id, count(*) AS n
    FROM counted
    GROUP BY election_id, candidate_id
),
tally AS (
    INSERT INTO tally_shards AS t (election_id, candidate_id, shard, votes)
    SELECT election_id, candidate_id, $8::int2, n
    FROM per_candidate
    ORDER BY election_id, candidate_id
    ON CONFLICT (election_id, candidate_id, shard)
    DO UPDATE SET votes = t.votes + excluded.votes, updated_at = now()
),
-- The results outbox: one event per election this transaction counted votes for, with
-- exactly the increments the tally upsert above adds (event id, xid: column defaults).
outbox AS (
    INSERT INTO results_outbox (election_id, increments)
    SELECT election_id, jsonb_object_agg(candidate_id, n)
    FROM per_candidate
    GROUP BY election_id
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
       coalesce((SELECT array_agg(ord) FROM judged WHERE conflicting IS NULL), '{}') AS unresolved,
       pg_current_xact_id()::text::bigint AS xid
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
/// session's own `statement_timeout`/`lock_timeout` (see [`session_url`]) normally end a
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
) -> Result<BatchOutcome, WriteFailure> {
    let mut progress = Progress::default();
    let attempt = tokio::time::timeout(
        attempt_timeout,
        write_batch_once(pool, url, batch, shard, &mut progress),
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
    write_batch_once(pool, url, batch, shard, &mut Progress::default()).await
}

async fn write_batch_once(
    pool: &PgPool,
    url: &SecretString,
    batch: &BatchColumns,
    shard: i16,
    progress: &mut Progress,
) -> Result<BatchOutcome, DbError> {
    type Tm = diesel_async::AnsiTransactionManager;
    let mut conn = checkout(pool, url).await?;
    progress.cancel = Some(conn.cancel_token());
    // A failure (or a drop on timeout) between BEGIN and the end of COMMIT leaves the
    // transaction manager "in a transaction", so the pool discards the connection.
    Tm::begin_transaction(&mut *conn).await?;
    let written = batch_statements(&mut conn, batch, shard).await;
    let (outcome, xid) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = Tm::rollback_transaction(&mut *conn).await;
            return Err(e);
        }
    };
    if !outcome.counted.is_empty() {
        progress.commit_sent = Some(InDoubt {
            xid,
            outcome: outcome.clone(),
        });
    }
    Tm::commit_transaction(&mut *conn).await?;
    progress.commit_sent = None;
    Ok(outcome)
}

/// The batch's statements inside the open transaction: the write, then (rarely) the
/// second judgement of rows another transaction inserted concurrently.
async fn batch_statements(
    conn: &mut AsyncPgConnection,
    batch: &BatchColumns,
    shard: i16,
) -> Result<(BatchOutcome, i64), DbError> {
    let ords = batch.ords();
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
        let rows = batch.rows(res.unresolved.iter().map(|&i| i as usize));
        let resolved: ConflictResult = diesel::sql_query(RESOLVE_CONFLICTS_SQL)
            .bind::<Array<Uuid>, _>(&rows.vote_ids)
            .bind::<Array<Text>, _>(&rows.election_ids)
            .bind::<Array<Text>, _>(&rows.candidate_ids)
            .bind::<Array<Nullable<Text>>, _>(&rows.precinct_ids)
            .bind::<Array<Timestamptz>, _>(&rows.cast_ats)
            .bind::<Array<Int4>, _>(&res.unresolved)
            .get_result(conn)
            .await?;
        outcome.conflicting.extend(resolved.conflicting);
    }
    Ok((outcome, res.xid))
}
