//! The batch write's statements: the write (run for every batch) and the read of stored
//! votes (run for batches with rows not inserted that memory did not judge), each a query
//! every session prepares once and reuses; and the conflict statement (run only for rows
//! read back with another payload), sent as plain SQL: prepared, PostgreSQL's generic
//! plan for it measured slower than planning it for its rows each time.
//!
//! `diesel::sql_query` is never kept in the statement cache (its text could change from
//! call to call), so PostgreSQL would parse and plan it on every call. [`WriteBatch`] and
//! [`StoredVotes`] each render one constant text and say so to diesel (a static query
//! id), so each session prepares them once.

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, Bool, Int2, Int4, Nullable, Text, Timestamptz, Untyped, Uuid};

use super::batch::BatchColumns;

/// Declares a query of one constant text (placeholders bound in order by its
/// `QueryFragment`) that diesel caches under a static id: each session prepares it once.
macro_rules! prepared_query {
    ($query:ident) => {
        impl QueryId for $query<'_> {
            type QueryId = $query<'static>;
            // The cache key: every value renders the same text.
            const HAS_STATIC_QUERY_ID: bool = true;
        }

        impl Query for $query<'_> {
            type SqlType = Untyped;
        }
    };
}

/// The batch write: inserts the offered rows (the first row of each UUID in the batch)
/// and, in the same statement, adds exactly the inserted rows to ONE tally shard and to
/// the results outbox. Returns the UUIDs it inserted, the transaction's id and which
/// stored state it wrote to ([`StoreIdentity`](super::StoreIdentity)).
///
/// - Rows go in in `vote_id` order, so two transactions that share a UUID take their row
///   locks in the same order and cannot deadlock; `ord` breaks ties, so of two offered
///   rows of one UUID (which callers never send) the earlier one is stored.
/// - `ON CONFLICT (vote_id) DO NOTHING` waits for a concurrent transaction that inserted
///   the same UUID to end: when this statement returns, every UUID it did not insert is
///   stored and committed (or inserted by this statement), so every other row's UUID
///   has a stored vote to judge it by ([`judge`](super::judge)).
/// - The tally and the outbox read the inserted rows themselves (`RETURNING`): each
///   stored vote is counted once, for the candidate stored, whatever the caller sent.
///   Per-candidate keys are sorted, so concurrent replicas never deadlock on tallies.
///
/// Placeholders `$1`…`$8` each appear once, in order (see [`SqlText`]).
pub(super) const WRITE_BATCH_SQL: &str = r#"
WITH ins AS (
    INSERT INTO votes (vote_id, election_id, candidate_id, precinct_id, cast_at)
    SELECT vote_id, election_id, candidate_id, precinct_id, cast_at
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                $6::bool[], $7::int4[])
        AS t(vote_id, election_id, candidate_id, precinct_id, cast_at, is_first, ord)
    WHERE is_first
    ORDER BY vote_id, ord
    ON CONFLICT (vote_id) DO NOTHING
    RETURNING vote_id, election_id, candidate_id
),
per_candidate AS (
    SELECT election_id, candidate_id, count(*) AS n
    FROM ins
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
)
SELECT coalesce((SELECT array_agg(vote_id) FROM ins), '{}') AS counted,
       pg_current_xact_id()::text::bigint AS xid,
       -- Which stored state this is (see StoreIdentity): the server's run, the
       -- database, the table; in a form no session setting changes.
       extract(epoch FROM pg_postmaster_start_time())::text
         || ' db=' || (SELECT oid FROM pg_database WHERE datname = current_database())::text
         || ' votes=' || 'votes'::regclass::oid::text AS store
"#;

/// Reads the stored votes of the given UUIDs (a UUID with none stored has no row), by
/// primary key, in a fresh READ COMMITTED snapshot: every vote committed before it runs,
/// whoever stored it, and this transaction's own. Its generic plan scans the primary
/// key's index for the array (`EXPLAIN (GENERIC_PLAN)` on PostgreSQL 17), so preparing
/// it loses nothing.
pub(super) const STORED_VOTES_SQL: &str = "SELECT vote_id, election_id, candidate_id, \
     precinct_id, cast_at FROM votes WHERE vote_id = ANY($1::uuid[])";

/// Judges rows the batch write did not insert (those [`StoredVotes`] read back with
/// another payload) against the stored vote of their UUID (visible to this statement's
/// fresh READ COMMITTED snapshot, whoever stored it): another payload is a conflict,
/// recorded once in `vote_conflicts`; the same payload is a duplicate. Rows whose UUID
/// has no stored vote come back as `missing` (the write guarantees there are none; the
/// caller refuses the batch if there are).
pub(super) const RESOLVE_CONFLICTS_SQL: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                         $6::int4[])
        AS t(vote_id, election_id, candidate_id, precinct_id, cast_at, ord)
),
judged AS (
    SELECT i.*,
           CASE WHEN v.vote_id IS NULL THEN NULL ELSE
             (v.election_id, v.candidate_id, v.precinct_id, v.cast_at)
               IS DISTINCT FROM (i.election_id, i.candidate_id, i.precinct_id, i.cast_at)
           END AS conflicting
    FROM input i LEFT JOIN votes v ON v.vote_id = i.vote_id
),
conflicts AS (
    INSERT INTO vote_conflicts (vote_id, election_id, candidate_id, precinct_id, cast_at)
    SELECT vote_id, election_id, candidate_id, precinct_id, cast_at
    FROM judged WHERE conflicting
    -- The whole payload key: two replicas recording two payloads of one UUID take the
    -- key's locks in the same order.
    ORDER BY vote_id, election_id, candidate_id, precinct_id, cast_at
    ON CONFLICT ON CONSTRAINT vote_conflicts_payload_key DO NOTHING
)
SELECT coalesce((SELECT array_agg(ord) FROM judged WHERE conflicting), '{}') AS conflicting,
       coalesce((SELECT array_agg(ord) FROM judged WHERE conflicting IS NULL), '{}') AS missing
"#;

/// [`WRITE_BATCH_SQL`] with one batch's values bound: a query diesel prepares once per
/// session (its text never changes) and then only binds and executes.
pub(super) struct WriteBatch<'a> {
    pub columns: &'a BatchColumns,
    pub ords: &'a [i32],
    pub shard: i16,
}

prepared_query!(WriteBatch);

impl QueryFragment<Pg> for WriteBatch<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let c = self.columns;
        let mut sql = SqlText(WRITE_BATCH_SQL);
        sql.push_until_bind(&mut out);
        out.push_bind_param::<Array<Uuid>, _>(&c.vote_ids)?;
        sql.push_until_bind(&mut out);
        out.push_bind_param::<Array<Text>, _>(&c.election_ids)?;
        sql.push_until_bind(&mut out);
        out.push_bind_param::<Array<Text>, _>(&c.candidate_ids)?;
        sql.push_until_bind(&mut out);
        out.push_bind_param::<Array<Nullable<Text>>, _>(&c.precinct_ids)?;
        sql.push_until_bind(&mut out);
        out.push_bind_param::<Array<Timestamptz>, _>(&c.cast_ats)?;
        sql.push_until_bind(&mut out);
        out.push_bind_param::<Array<Bool>, _>(&c.is_first)?;
        sql.push_until_bind(&mut out);
        out.push_bind_param::<Array<Int4>, _>(&self.ords)?;
        sql.push_until_bind(&mut out);
        out.push_bind_param::<Int2, _>(&self.shard)?;
        out.push_sql(sql.0);
        Ok(())
    }
}

/// [`STORED_VOTES_SQL`] with its UUIDs bound: prepared once per session.
pub(super) struct StoredVotes<'a> {
    pub vote_ids: &'a [uuid::Uuid],
}

prepared_query!(StoredVotes);

impl QueryFragment<Pg> for StoredVotes<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let mut sql = SqlText(STORED_VOTES_SQL);
        sql.push_until_bind(&mut out);
        out.push_bind_param::<Array<Uuid>, _>(&self.vote_ids)?;
        out.push_sql(sql.0);
        Ok(())
    }
}

/// What is left to push of a constant SQL text whose placeholders `$1`, `$2`, … each
/// appear once and in order. diesel numbers the binds it pushes the same way, so the
/// rendered text equals the constant (a test checks it).
struct SqlText(&'static str);

impl SqlText {
    /// Pushes the text before the next placeholder and skips the placeholder.
    fn push_until_bind(&mut self, out: &mut AstPass<'_, '_, Pg>) {
        let at = self
            .0
            .char_indices()
            .zip(self.0.chars().skip(1))
            .find(|((_, c), next)| *c == '$' && next.is_ascii_digit())
            .map_or(self.0.len(), |((i, _), _)| i);
        out.push_sql(&self.0[..at]);
        let after = &self.0[at..];
        let digits = after
            .chars()
            .skip(1)
            .take_while(char::is_ascii_digit)
            .count();
        self.0 = &after[(1 + digits).min(after.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vote::Vote;

    #[test]
    fn the_prepared_batch_write_renders_the_constant_text() {
        let mut columns = BatchColumns::default();
        let vote = Vote {
            vote_id: uuid::Uuid::nil(),
            election_id: "e".into(),
            candidate_id: "c".into(),
            precinct_id: None,
            cast_at: chrono::Utc::now(),
        };
        columns.push(&vote, true);
        let ords = [0];
        let query = WriteBatch {
            columns: &columns,
            ords: &ords,
            shard: 3,
        };
        let rendered = diesel::debug_query::<Pg, _>(&query).to_string();
        let text = rendered.split(" -- binds:").next().unwrap_or_default();
        assert_eq!(text, WRITE_BATCH_SQL);
        assert!(rendered.contains("binds: ["), "{rendered}");
        assert_eq!(WriteBatch::query_id(), WriteBatch::query_id());
        assert!(WriteBatch::query_id().is_some(), "cached under a static id");
    }

    #[test]
    fn the_prepared_read_of_stored_votes_renders_the_constant_text() {
        let ids = [uuid::Uuid::nil()];
        let query = StoredVotes { vote_ids: &ids };
        let rendered = diesel::debug_query::<Pg, _>(&query).to_string();
        let text = rendered.split(" -- binds:").next().unwrap_or_default();
        assert_eq!(text, STORED_VOTES_SQL);
        assert!(
            StoredVotes::query_id().is_some(),
            "cached under a static id"
        );
        assert_ne!(StoredVotes::query_id(), WriteBatch::query_id());
    }
}
