//! Reading back what the system did: the database (votes, tallies, conflicts, the
//! `vote_statistics` view) and the broker (queue depth, dead-lettered messages).
//!
//! Tests and the checker use these instead of the aggregator's own metrics, so they
//! judge the outcome from the stores themselves.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Double, Nullable, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use lapin::Connection;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;
use uuid::Uuid;

/// (election, candidate) → count.
pub type PerCandidate = BTreeMap<(String, String), i64>;

/// A connection to one vote database.
pub struct Db {
    conn: AsyncPgConnection,
}

#[derive(QueryableByName)]
struct KeyCount {
    #[diesel(sql_type = Text)]
    election_id: String,
    #[diesel(sql_type = Text)]
    candidate_id: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct One {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    vote_id: Uuid,
}

/// One row of the `vote_statistics` view.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct Statistic {
    /// Election.
    #[diesel(sql_type = Text)]
    pub election_id: String,
    /// Candidate.
    #[diesel(sql_type = Text)]
    pub candidate_id: String,
    /// Votes counted.
    #[diesel(sql_type = BigInt)]
    pub votes: i64,
    /// Share of the election's votes, in percent (2 decimals).
    #[diesel(sql_type = Nullable<Double>)]
    pub percentage: Option<f64>,
}

impl Db {
    /// Connects to the database at `url`.
    ///
    /// # Errors
    /// When PostgreSQL is unreachable.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let conn = AsyncPgConnection::establish(url).await.with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {}",
                vote_aggregator::config::redact_url(url)
            )
        })?;
        Ok(Db { conn })
    }

    /// The underlying connection, for queries this module does not wrap.
    pub fn connection(&mut self) -> &mut AsyncPgConnection {
        &mut self.conn
    }

    async fn per_candidate(&mut self, sql: &str) -> anyhow::Result<PerCandidate> {
        let rows: Vec<KeyCount> = diesel::sql_query(sql).load(&mut self.conn).await?;
        Ok(rows
            .into_iter()
            .map(|r| ((r.election_id, r.candidate_id), r.n))
            .collect())
    }

    /// Rows in `votes` per candidate.
    ///
    /// # Errors
    /// On a failed query.
    pub async fn counted_per_candidate(&mut self) -> anyhow::Result<PerCandidate> {
        self.per_candidate(
            "SELECT election_id, candidate_id, count(*)::bigint AS n FROM votes GROUP BY 1, 2",
        )
        .await
    }

    /// Sum of tally shards per candidate.
    ///
    /// # Errors
    /// On a failed query.
    pub async fn tallies(&mut self) -> anyhow::Result<PerCandidate> {
        self.per_candidate(
            "SELECT election_id, candidate_id, sum(votes)::bigint AS n FROM tally_shards GROUP BY 1, 2",
        )
        .await
    }

    /// Runs `sql`, which returns one row with one `bigint` column named `n`.
    ///
    /// # Errors
    /// On a failed query.
    pub async fn scalar(&mut self, sql: &str) -> anyhow::Result<i64> {
        let row: One = diesel::sql_query(sql).get_result(&mut self.conn).await?;
        Ok(row.n)
    }

    /// [`Db::scalar`] with text parameters: `params[0]` binds `$1`, and so on (for names
    /// such as the service's `application_name`, which are bound, never pasted in).
    ///
    /// # Errors
    /// On a failed query.
    pub async fn scalar_with(&mut self, sql: &str, params: &[&str]) -> anyhow::Result<i64> {
        let mut query = diesel::sql_query(sql).into_boxed::<diesel::pg::Pg>();
        for p in params {
            query = query.bind::<Text, _>(p.to_string());
        }
        let row: One = query.get_result(&mut self.conn).await?;
        Ok(row.n)
    }

    /// Rows in `votes`.
    ///
    /// # Errors
    /// On a failed query.
    pub async fn vote_count(&mut self) -> anyhow::Result<i64> {
        self.scalar("SELECT count(*)::bigint AS n FROM votes").await
    }

    /// Rows in `vote_conflicts`.
    ///
    /// # Errors
    /// On a failed query.
    pub async fn conflict_count(&mut self) -> anyhow::Result<i64> {
        self.scalar("SELECT count(*)::bigint AS n FROM vote_conflicts")
            .await
    }

    /// Every vote id stored.
    ///
    /// # Errors
    /// On a failed query.
    pub async fn vote_ids(&mut self) -> anyhow::Result<Vec<Uuid>> {
        let rows: Vec<IdRow> = diesel::sql_query("SELECT vote_id FROM votes")
            .load(&mut self.conn)
            .await?;
        Ok(rows.into_iter().map(|r| r.vote_id).collect())
    }

    /// Distinct vote ids with a recorded conflict.
    ///
    /// # Errors
    /// On a failed query.
    pub async fn conflicting_ids(&mut self) -> anyhow::Result<Vec<Uuid>> {
        let rows: Vec<IdRow> = diesel::sql_query("SELECT DISTINCT vote_id FROM vote_conflicts")
            .load(&mut self.conn)
            .await?;
        Ok(rows.into_iter().map(|r| r.vote_id).collect())
    }

    /// The `vote_statistics` view, ordered by election then votes descending.
    ///
    /// # Errors
    /// On a failed query.
    pub async fn statistics(&mut self) -> anyhow::Result<Vec<Statistic>> {
        Ok(diesel::sql_query(
            "SELECT election_id, candidate_id, votes, percentage::float8 AS percentage \
             FROM vote_statistics ORDER BY election_id, votes DESC, candidate_id",
        )
        .load(&mut self.conn)
        .await?)
    }

    /// Runs a multi-statement SQL script (no parameters).
    ///
    /// # Errors
    /// On the first failing statement.
    pub async fn batch_execute(&mut self, sql: &str) -> anyhow::Result<()> {
        use diesel_async::SimpleAsyncConnection;
        Ok(self.conn.batch_execute(sql).await?)
    }

    /// Runs arbitrary SQL (for tests that tamper on purpose).
    ///
    /// # Errors
    /// On a failed statement.
    pub async fn execute(&mut self, sql: &str) -> anyhow::Result<usize> {
        Ok(diesel::sql_query(sql).execute(&mut self.conn).await?)
    }
}

/// A message taken from a dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The body, as published.
    pub body: Vec<u8>,
    /// The `x-reject-reason` header, when present.
    pub reason: Option<String>,
}

/// Broker-side views.
pub struct Broker {
    connection: Connection,
}

impl Broker {
    /// Connects (to one of the nodes when `amqp_url` lists several, see [`crate::nodes`]).
    ///
    /// # Errors
    /// When no node is reachable.
    pub async fn connect(amqp_url: &str) -> anyhow::Result<Self> {
        Ok(Broker {
            connection: crate::nodes::connect(amqp_url).await?,
        })
    }

    /// (ready messages, consumers) of a queue, by passive declare.
    ///
    /// # Errors
    /// When the queue does not exist or the broker fails.
    pub async fn queue_state(&self, queue: &str) -> anyhow::Result<(u32, u32)> {
        let ch = self.connection.create_channel().await?;
        let counts = vote_aggregator::broker::queue_counts(&ch, queue)
            .await
            .with_context(|| format!("queue '{queue}' not found"))?;
        let _ = ch.close(200, "ok".into()).await;
        Ok((counts.messages, counts.consumers))
    }

    /// Takes every message from `queue` (acking them), waiting up to `settle` for late
    /// arrivals after the queue looks empty.
    ///
    /// # Errors
    /// When the broker fails.
    pub async fn drain(&self, queue: &str, settle: Duration) -> anyhow::Result<Vec<DeadLetter>> {
        let ch = self.connection.create_channel().await?;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + settle;
        loop {
            match ch
                .basic_get(queue.into(), BasicGetOptions::default())
                .await?
            {
                Some(msg) => {
                    let reason = msg
                        .delivery
                        .properties
                        .headers()
                        .as_ref()
                        .and_then(|h| {
                            h.inner()
                                .get(vote_aggregator::broker::REJECT_REASON_HEADER)
                                .cloned()
                        })
                        .and_then(|v| match v {
                            AMQPValue::LongString(s) => {
                                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                            }
                            _ => None,
                        });
                    msg.delivery.ack(BasicAckOptions::default()).await?;
                    out.push(DeadLetter {
                        body: msg.delivery.data.clone(),
                        reason,
                    });
                }
                None if tokio::time::Instant::now() >= deadline => break,
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let _ = ch.close(200, "ok".into()).await;
        Ok(out)
    }
}

/// Polls `check` every 50 ms until it returns `Ok(true)` or `timeout` passes.
///
/// # Errors
/// When time runs out (naming `what`) or `check` fails.
pub async fn eventually<F>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: AsyncFnMut() -> anyhow::Result<bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub use crate::prometheus::metric_value;

/// GETs `path` from a replica's HTTP endpoint: the service's own one-shot client
/// ([`vote_aggregator::http_client::get`]; no timeout of its own, wrap it in
/// [`tokio::time::timeout`]): (status, body).
///
/// # Errors
/// When the endpoint cannot be reached or the answer is not valid HTTP.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(vote_aggregator::http_client::get(addr, path).await?)
}
