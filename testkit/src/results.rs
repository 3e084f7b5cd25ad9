//! The reference results consumer (docs/RESULTS.md), used by `vote-tools results` and by
//! the chaos checker: it binds its own durable queue to `votes.results`, THEN reads
//! `vote_statistics` together with `pg_current_snapshot()` (one statement in a
//! REPEATABLE READ transaction), and from there keeps its own tallies from the stream
//! ([`Reconstruction`]: each event once by id; events the snapshot already holds
//! skipped).
//!
//! Why this order is exact: an event the snapshot does not see was committed after it was
//! taken, so after the queue was bound; its relay can only publish it after that commit,
//! so the queue gets it. An event the snapshot sees is skipped wherever it shows up.
//!
//! [`ResultsReader::check`] compares the reconstruction with the database exactly, even
//! under load: it takes a second snapshot, waits until the outbox holds no event that
//! snapshot sees (each was confirmed by the broker, so it is in the queue), reads the
//! queue dry, and compares the reconstruction as of that snapshot with
//! `vote_statistics` read in it.

use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use secrecy::SecretString;
use vote_aggregator::results::{
    Difference, EXCHANGE, Event, READER_QUEUE_PREFIX, Reconstruction, Snapshot, Tallies,
};

/// A results reader: its queue, its reconstruction, its broker session when one is open.
pub struct ResultsReader {
    database_url: SecretString,
    amqp_url: String,
    /// Its queue (`votes.results.reader.<name>`).
    pub queue: String,
    /// The tallies rebuilt so far.
    pub reconstruction: Reconstruction,
    session: Option<(Connection, Channel, Consumer)>,
}

#[derive(QueryableByName)]
struct Start {
    #[diesel(sql_type = Text)]
    snapshot: String,
    #[diesel(sql_type = Text)]
    stats: String,
}

/// The outcome of [`ResultsReader::check`].
#[derive(Debug, Clone, Default)]
pub struct ResultsCheck {
    /// Distinct events received.
    pub events: u64,
    /// Repeated deliveries dropped by event id.
    pub repeats: u64,
    /// Events the starting snapshot already held.
    pub in_snapshot: u64,
    /// Candidates compared.
    pub candidates: usize,
    /// The first candidate whose reconstructed tally differs, if any.
    pub difference: Option<Difference>,
    /// Why the comparison could not be made (outbox never emptied), if so.
    pub incomplete: Option<String>,
}

impl ResultsCheck {
    /// Whether the reconstruction equals `vote_statistics`.
    pub fn passed(&self) -> bool {
        self.difference.is_none() && self.incomplete.is_none()
    }
}

impl fmt::Display for ResultsCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "results: {} events · {} repeats deduped · ",
            self.events, self.repeats
        )?;
        match (&self.incomplete, &self.difference) {
            (Some(why), _) => write!(f, "NOT COMPARED: {why}"),
            (None, Some(d)) => write!(f, "reconstruction DIFFERS from vote_statistics: {d}"),
            (None, None) => write!(
                f,
                "reconstruction matches vote_statistics ({} candidates)",
                self.candidates
            ),
        }
    }
}

impl ResultsReader {
    /// Declares the durable quorum queue `votes.results.reader.<name>` (kept across
    /// broker restarts), binds it to `votes.results` with `binding` (`#`: every
    /// election), then reads the starting snapshot.
    ///
    /// # Errors
    /// When RabbitMQ or PostgreSQL cannot be reached or refuse.
    pub async fn start(
        database_url: &str,
        amqp_url: &str,
        name: &str,
        binding: &str,
    ) -> anyhow::Result<Self> {
        let queue = format!("{READER_QUEUE_PREFIX}{name}");
        let connection = connect(amqp_url).await?;
        let channel = connection.create_channel().await?;
        // The exchange exists once a relay ran; declaring it (same arguments) here lets a
        // reader start first. A reader user without that right relies on the relay.
        let _ = declare_exchange(&connection).await;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .with_context(|| format!("cannot declare results queue {queue}"))?;
        channel
            .queue_bind(
                queue.as_str().into(),
                EXCHANGE.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot bind {queue} to {EXCHANGE}"))?;
        let _ = connection.close(200, "bound".into()).await;
        let database_url = SecretString::from(database_url.to_owned());
        let (snapshot, base) = statistics(&database_url).await?;
        Ok(ResultsReader {
            database_url,
            amqp_url: amqp_url.to_owned(),
            queue,
            reconstruction: Reconstruction::new(snapshot, base),
            session: None,
        })
    }

    /// Applies deliveries until none came for `quiet` (connecting first if needed),
    /// calling `seen` with each new event. A broken session is dropped and reopened on
    /// the next call.
    ///
    /// # Errors
    /// When RabbitMQ cannot be reached, or a message is not a results event.
    pub async fn read_until_quiet(
        &mut self,
        quiet: Duration,
        mut seen: impl FnMut(&Event),
    ) -> anyhow::Result<()> {
        if self.session.is_none() {
            let connection = connect(&self.amqp_url).await?;
            let channel = connection.create_channel().await?;
            channel.basic_qos(500, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    self.queue.as_str().into(),
                    "results-reader".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("cannot consume {}", self.queue))?;
            self.session = Some((connection, channel, consumer));
        }
        let Some((_, _, consumer)) = self.session.as_mut() else {
            return Ok(());
        };
        loop {
            let delivery = match tokio::time::timeout(quiet, consumer.next()).await {
                Err(_) => return Ok(()),
                Ok(None) => {
                    self.session = None;
                    anyhow::bail!("results consumer ended (broker connection lost)");
                }
                Ok(Some(Err(e))) => {
                    self.session = None;
                    return Err(e).context("results consumer failed");
                }
                Ok(Some(Ok(d))) => d,
            };
            let event = Event::from_json(&delivery.data).map_err(|e| anyhow::anyhow!(e))?;
            // In memory, applying cannot fail: ack right away.
            let _ = delivery.ack(BasicAckOptions::default()).await;
            if self.reconstruction.apply(event.clone()) == vote_aggregator::results::Applied::New {
                seen(&event);
            }
        }
    }

    /// The exact comparison described in the module: waits up to `timeout` for the
    /// outbox to publish every event of a fresh snapshot, reads the queue dry, compares.
    ///
    /// # Errors
    /// When the servers cannot be read.
    pub async fn check(&mut self, timeout: Duration) -> anyhow::Result<ResultsCheck> {
        let (at, database) = statistics(&self.database_url).await?;
        let mut check = ResultsCheck::default();
        let started = tokio::time::Instant::now();
        let mut db = vote_aggregator::db::connect_one(&self.database_url).await?;
        loop {
            let left = unpublished(&mut db, &at).await?;
            if left == 0 {
                break;
            }
            if started.elapsed() >= timeout {
                check.incomplete = Some(format!(
                    "{left} results event(s) of committed votes still in the outbox after {timeout:?} (is a relay running?)"
                ));
                break;
            }
            // Meanwhile keep the queue short.
            if let Err(e) = self
                .read_until_quiet(Duration::from_millis(100), |_| {})
                .await
            {
                tracing::debug!("results reader: {e:#}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        // Everything `at` sees is confirmed into the queue: read it dry (retrying a
        // session the broker dropped).
        let mut tries = 0;
        while let Err(e) = self.read_until_quiet(Duration::from_secs(1), |_| {}).await {
            tries += 1;
            if tries >= 10 || started.elapsed() >= timeout * 2 {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let rebuilt = self.reconstruction.tallies_as_of(&at);
        let r = &self.reconstruction;
        check.events = r.events;
        check.repeats = r.repeats;
        check.in_snapshot = r.in_snapshot;
        check.candidates = database.len();
        check.difference = Difference::first(&rebuilt, &database);
        Ok(check)
    }

    /// Deletes the reader's queue (a one-off check leaves nothing behind).
    ///
    /// # Errors
    /// When RabbitMQ cannot be reached.
    pub async fn delete_queue(mut self) -> anyhow::Result<()> {
        self.session = None;
        let connection = connect(&self.amqp_url).await?;
        let channel = connection.create_channel().await?;
        channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        let _ = connection.close(200, "done".into()).await;
        Ok(())
    }
}

/// To one of the nodes when `amqp_url` lists several (see [`crate::nodes`]).
async fn connect(amqp_url: &str) -> anyhow::Result<Connection> {
    crate::nodes::connect(amqp_url).await
}

async fn declare_exchange(connection: &Connection) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            EXCHANGE.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// `vote_statistics` and the snapshot it was read in (one statement, REPEATABLE READ).
///
/// # Errors
/// When PostgreSQL cannot be read.
pub async fn statistics(database_url: &SecretString) -> anyhow::Result<(Snapshot, Tallies)> {
    let mut conn: AsyncPgConnection = vote_aggregator::db::connect_one(database_url).await?;
    let start: Start = conn
        .build_transaction()
        .repeatable_read()
        .read_only()
        .run::<_, diesel::result::Error, _>(async |conn| {
            diesel::sql_query(
                "SELECT pg_current_snapshot()::text AS snapshot, \
                 (SELECT coalesce(json_agg(json_build_array(election_id, candidate_id, votes)), '[]') \
                  FROM vote_statistics)::text AS stats",
            )
            .get_result(conn)
            .await
        })
        .await
        .context("cannot read vote_statistics")?;
    let snapshot: Snapshot = start
        .snapshot
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let rows: Vec<(String, String, i64)> = serde_json::from_str(&start.stats)?;
    let tallies = rows
        .into_iter()
        .filter(|(_, _, n)| *n != 0)
        .map(|(e, c, n)| ((e, c), n))
        .collect();
    Ok((snapshot, tallies))
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Outbox events that `at` sees (committed before it) and no relay has published yet.
async fn unpublished(db: &mut AsyncPgConnection, at: &Snapshot) -> anyhow::Result<i64> {
    let c: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM results_outbox WHERE pg_visible_in_snapshot(xid, $1::pg_snapshot)",
    )
    .bind::<Text, _>(at.to_string())
    .get_result(db)
    .await
    .context("cannot read results_outbox")?;
    Ok(c.n)
}
