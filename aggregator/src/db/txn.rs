//! A transaction run by hand so that BEGIN shares a flight with its first statement: the
//! session pipelines both (sent before the first answer comes back; the server runs them
//! in order), which saves a round trip per transaction over diesel's transaction
//! manager (that one sends BEGIN alone and waits for its answer).
//!
//! Invariant kept: from [`begin_with`] until [`commit`] or [`rollback`] has answered,
//! diesel's transaction manager calls the session broken, so a failure or a drop (a
//! timeout) in between makes the pool discard the session instead of lending it out
//! with a transaction open.

use std::future::Future;

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection, TransactionManager};

type Tm = diesel_async::AnsiTransactionManager;

/// `BEGIN`, as a statement each session prepares once: an unprepared statement would
/// first wait for its own round trip to prepare, and hold the statement behind it.
struct Begin;

impl QueryId for Begin {
    type QueryId = Begin;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for Begin {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("BEGIN");
        Ok(())
    }
}

/// Marks the session broken for the pool; call before [`begin_with`].
pub fn mark_open(conn: &mut AsyncPgConnection) {
    Tm::transaction_manager_status_mut(conn).set_in_error();
}

/// Runs BEGIN and then `first`, a statement on the same session not yet polled (diesel
/// sends a query when its future is first polled, and this polls BEGIN's first), in one
/// flight.
///
/// # Errors
/// When either fails. If BEGIN failed and `first` did not, `first` ran on its own and
/// committed by itself: callers must treat their work as possibly committed (for a batch,
/// not acked; its retry finds the votes stored).
pub async fn begin_with<R>(
    conn: &AsyncPgConnection,
    first: impl Future<Output = QueryResult<R>>,
) -> QueryResult<R> {
    let begin = Begin.execute(&mut &*conn);
    let (begun, done) = futures_util::join!(begin, first);
    begun?;
    done
}

/// COMMIT; the session is whole again once it answered.
///
/// # Errors
/// When COMMIT fails or its answer is lost (the session then stays marked broken).
pub async fn commit(conn: &mut AsyncPgConnection) -> QueryResult<()> {
    conn.batch_execute("COMMIT").await?;
    *Tm::transaction_manager_status_mut(conn) = Default::default();
    Ok(())
}

/// ROLLBACK, best effort: if it fails, the session stays marked broken and the pool
/// discards it.
pub async fn rollback(conn: &mut AsyncPgConnection) {
    if conn.batch_execute("ROLLBACK").await.is_ok() {
        *Tm::transaction_manager_status_mut(conn) = Default::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_is_prepared_under_a_static_id() {
        let rendered = diesel::debug_query::<Pg, _>(&Begin).to_string();
        assert!(rendered.starts_with("BEGIN"), "{rendered}");
        assert!(Begin::query_id().is_some());
    }
}
