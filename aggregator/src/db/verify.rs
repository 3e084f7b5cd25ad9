//! The `verify` check: invariant 1 of docs/DESIGN.md (every candidate's tally equals
//! its counted votes), read in one consistent snapshot.

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use secrecy::SecretString;

use crate::error::DbError;

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

/// Checks invariant 1 of docs/DESIGN.md: for every (election, candidate), the sum of its
/// tally shards equals its rows in `votes`. Runs in one REPEATABLE READ snapshot so a
/// live system is checked consistently.
///
/// # Errors
/// [`DbError`] when the database cannot be read.
pub async fn verify(url: &SecretString) -> Result<VerifyReport, DbError> {
    let mut conn = super::connect_one(url).await?;
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
