//! In-doubt resolution: how a batch transaction whose COMMIT answer was lost ended,
//! asked of the server instead of guessed, so a retry never mistakes its own earlier
//! commit for duplicates (nor counts a lost one as done).

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Nullable, Text, Uuid};
use diesel_async::RunQueryDsl;
use secrecy::SecretString;

use super::{BatchColumns, BatchOutcome, PgPool, checkout};
use crate::error::DbError;

/// A batch transaction whose COMMIT was sent but whose answer never came (connection
/// lost, attempt timed out): it may or may not have committed. Its id and outcome let a
/// retry ask the server ([`resolve_in_doubt`]) instead of writing again and mistaking its
/// own earlier commit for duplicates. Only batches that counted at least one vote are ever
/// in doubt (for the others a rewrite reports the same).
#[derive(Debug, Clone)]
pub struct InDoubt {
    /// Transaction id (`pg_current_xact_id()`).
    pub xid: i64,
    /// What the batch statement decided inside that transaction.
    pub outcome: BatchOutcome,
}

#[derive(QueryableByName)]
struct InDoubtCheck {
    #[diesel(sql_type = Nullable<Text>)]
    status: Option<String>,
    #[diesel(sql_type = BigInt)]
    found: i64,
}

/// How an in-doubt COMMIT ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// It committed: its outcome stands.
    Committed,
    /// It did not commit: write the batch again.
    NotCommitted,
    /// Still running on the server: ask again later.
    StillRunning,
}

/// Asks PostgreSQL how the in-doubt transaction of `batch` ended.
///
/// `pg_xact_status` alone is not enough: a transaction id whose WAL never reached disk
/// is handed out again after a server crash (or a failover), so "committed" may be
/// another transaction's status. The batch counts as committed only if, besides, every
/// vote it counted is stored with that transaction as its `xmin`.
///
/// # Errors
/// [`DbError`] when the server cannot be asked.
pub async fn resolve_in_doubt(
    pool: &PgPool,
    url: &SecretString,
    batch: &BatchColumns,
    doubt: &InDoubt,
) -> Result<Resolution, DbError> {
    let counted: Vec<uuid::Uuid> = doubt
        .outcome
        .counted
        .iter()
        .filter_map(|&i| batch.vote_id(i))
        .collect();
    let mut conn = checkout(pool, url).await?;
    let checked: Result<InDoubtCheck, _> = diesel::sql_query(
        "SELECT pg_xact_status($1::text::xid8) AS status, \
                (SELECT count(*) FROM votes WHERE vote_id = ANY($2) \
                   AND xmin::text::bigint = $3) AS found",
    )
    .bind::<Text, _>(doubt.xid.to_string())
    .bind::<Array<Uuid>, _>(&counted)
    .bind::<BigInt, _>(doubt.xid.rem_euclid(1 << 32))
    .get_result(&mut conn)
    .await;
    let check = match checked {
        Ok(c) => c,
        // An id the server has not handed out (again) since its restart: lost with the
        // crash, so not committed.
        Err(diesel::result::Error::DatabaseError(_, info))
            if info.message().contains("in the future") =>
        {
            return Ok(Resolution::NotCommitted);
        }
        Err(e) => return Err(e.into()),
    };
    Ok(match check.status.as_deref() {
        Some("in progress") => Resolution::StillRunning,
        Some("committed") if check.found == counted.len() as i64 => Resolution::Committed,
        _ => Resolution::NotCommitted,
    })
}
