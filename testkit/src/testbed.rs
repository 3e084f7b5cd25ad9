//! A test bed: one fresh database and one fresh queue name on a server pair, with the
//! handles a test needs (service config, publisher, database and broker views).
//!
//! Every test makes its own bed, so tests in one binary share the containers but never
//! each other's data. A bed drops its database when it is dropped (in the background) or
//! [`TestBed::finish`]ed (awaited), so a long test process does not pile up databases;
//! [`TestBed::keep`] leaves it in place for a person to look at.
//!
//! Beds start from an EMPTY database, not a clone of a migrated template: the service
//! migrates on start, and tests rely on seeing that happen.

use std::time::Duration;

use vote_aggregator::Config;
use vote_aggregator::broker::dead_letter_queue;
use vote_aggregator::config::QueueType;
use vote_aggregator::config::variables as var;

use crate::infra::{Infra, fresh_queue_name};
use crate::inspect::{Broker, Db};
use crate::publish::Publisher;

/// A fresh database and queue on a server pair. Owns the database: dropping the bed drops it.
#[derive(Debug)]
pub struct TestBed {
    /// URL of this bed's own database (empty until the aggregator migrates it).
    pub database_url: String,
    /// URL of the broker.
    pub amqp_url: String,
    /// This bed's queue; its dead-letter queue is `<queue>.dlq`.
    pub queue: String,
    /// Drops the database when the bed goes.
    database: DatabaseGuard,
}

/// Drops its database (in the background) unless [`TestBed::finish`] already did or
/// [`TestBed::keep`] turned it off.
#[derive(Debug)]
struct DatabaseGuard {
    admin_url: String,
    url: String,
    armed: bool,
}

impl Drop for DatabaseGuard {
    fn drop(&mut self) {
        if self.armed {
            crate::infra::drop_database_detached(
                std::mem::take(&mut self.admin_url),
                std::mem::take(&mut self.url),
            );
        }
    }
}

impl TestBed {
    /// Creates a fresh database and picks a fresh queue name.
    ///
    /// # Errors
    /// When the database cannot be created.
    pub async fn new(infra: &Infra) -> anyhow::Result<Self> {
        let database_url = infra.fresh_database().await?;
        Ok(TestBed {
            database: DatabaseGuard {
                admin_url: infra.admin_database_url(),
                url: database_url.clone(),
                armed: true,
            },
            database_url,
            amqp_url: infra.amqp_url(),
            queue: fresh_queue_name(),
        })
    }

    /// Drops this bed's database now (disconnecting whoever still uses it) and waits for
    /// it. Dropping the bed does the same in the background.
    ///
    /// # Errors
    /// When PostgreSQL cannot be reached or refuses.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        self.database.armed = false;
        crate::infra::drop_database(&self.database.admin_url, &self.database.url).await
    }

    /// Keeps this bed's database: consumes the bed WITHOUT dropping the database, now or
    /// later (for `--keep` runs whose database a person inspects after the process
    /// exits). Removing it is then up to the caller; removing the servers removes it too.
    pub fn keep(mut self) {
        self.database.armed = false;
    }

    /// A service configuration for this bed: its queue (quorum), HTTP on a free local
    /// port, short grace period, migrations on start.
    pub fn config(&self, replica: &str) -> Config {
        let mut c = Config::new(self.database_url.clone(), self.amqp_url.clone());
        c.queue_name = self.queue.clone();
        c.queue_type = QueueType::Quorum;
        c.metrics_addr = "127.0.0.1:0".parse().unwrap_or(c.metrics_addr);
        c.replica_id = replica.to_string();
        c.shutdown_grace = Duration::from_secs(10);
        c
    }

    /// The environment variables that configure a `vote-aggregator` process for this
    /// bed (for tests that run the real binary).
    pub fn env(&self, replica: &str) -> Vec<(String, String)> {
        [
            (var::DATABASE_URL, self.database_url.as_str()),
            (var::AMQP_URL, self.amqp_url.as_str()),
            (var::QUEUE_NAME, self.queue.as_str()),
            (var::QUEUE_TYPE, QueueType::Quorum.as_str()),
            (var::METRICS_ADDR, "127.0.0.1:0"),
            (var::REPLICA_ID, replica),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The environment shared by every replica of a [`crate::fleet::Fleet`] on this bed
    /// (the fleet sets each replica's `REPLICA_ID` and `METRICS_ADDR` itself).
    pub fn replica_base_env(&self) -> Vec<(String, String)> {
        self.env("unused")
            .into_iter()
            .filter(|(k, _)| k != var::REPLICA_ID && k != var::METRICS_ADDR)
            .collect()
    }

    /// Name of this bed's database (the last path segment of its URL).
    pub fn database_name(&self) -> String {
        self.database_url
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// The dead-letter queue's name.
    pub fn dead_letter_queue(&self) -> String {
        dead_letter_queue(&self.queue)
    }

    /// Declares the topology (as a replica would at start), so votes can be published
    /// before any replica runs.
    ///
    /// # Errors
    /// When the broker fails or the queue exists with other arguments.
    pub async fn declare(&self) -> anyhow::Result<()> {
        let session = vote_aggregator::broker::connect_first(&self.config("declarer")).await?;
        let _ = session.connection.close(200, "declared".into()).await;
        Ok(())
    }

    /// A confirmed publisher to this bed's queue.
    ///
    /// # Errors
    /// When the broker is unreachable.
    pub async fn publisher(&self) -> anyhow::Result<Publisher> {
        Publisher::connect(&self.amqp_url, &self.queue).await
    }

    /// A connection to this bed's database.
    ///
    /// # Errors
    /// When the database is unreachable.
    pub async fn db(&self) -> anyhow::Result<Db> {
        Db::connect(&self.database_url).await
    }

    /// A broker view.
    ///
    /// # Errors
    /// When the broker is unreachable.
    pub async fn broker(&self) -> anyhow::Result<Broker> {
        Broker::connect(&self.amqp_url).await
    }
}
