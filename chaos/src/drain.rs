//! The end of a run under load, shared by the chaos scenarios and the deployment test:
//! wait until the system has drained (queue empty, stored counts still), then read the
//! dead-letter queue and match it against what the publisher sent.

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;
use vote_aggregator::broker::dead_letter_queue;
use vote_testkit::inspect::{Broker, Db};
use vote_testkit::publish::Published;
use vote_testkit::testbed::TestBed;

use crate::report::DeadLetters;

/// Where a run's servers are, as seen from the test process.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// PostgreSQL URL.
    pub database_url: String,
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// The votes queue.
    pub queue: String,
}

impl Endpoints {
    /// The endpoints of a test bed.
    pub fn of(bed: &TestBed) -> Endpoints {
        Endpoints {
            database_url: bed.database_url.clone(),
            amqp_url: bed.amqp_url.clone(),
            queue: bed.queue.clone(),
        }
    }

    /// The aggregator's dead-letter queue for [`Endpoints::queue`].
    pub fn dead_letter_queue(&self) -> String {
        dead_letter_queue(&self.queue)
    }
}

/// How long the queue must stay empty and the stored counts unchanged to call the system
/// drained: longer than the service's longest commit retry backoff (5 s).
pub const DRAIN_SETTLE: Duration = Duration::from_secs(6);

/// Waits until the queue is empty and the stored votes and conflicts stopped changing for
/// `settle`. Returns the moment the system drained (the later of the last change and
/// the queue becoming empty), or `None` after `timeout`.
///
/// # Errors
/// When the database or the broker cannot be reached.
pub async fn wait_drained(
    at: &Endpoints,
    settle: Duration,
    timeout: Duration,
) -> anyhow::Result<Option<Instant>> {
    let mut db = Db::connect(&at.database_url).await?;
    let broker = Broker::connect(&at.amqp_url).await?;
    let started = Instant::now();
    let mut last = None;
    let mut changed_at = Instant::now();
    let mut empty_since: Option<Instant> = None;
    loop {
        let (ready, _) = broker.queue_state(&at.queue).await?;
        let counts = (
            db.vote_count().await.unwrap_or(-1),
            db.conflict_count().await.unwrap_or(-1),
        );
        let now = Instant::now();
        if last != Some(counts) {
            last = Some(counts);
            changed_at = now;
        }
        empty_since = if ready == 0 {
            empty_since.or(Some(now))
        } else {
            None
        };
        if let Some(empty) = empty_since
            && now.duration_since(changed_at) >= settle
            && now.duration_since(empty) >= settle
        {
            return Ok(Some(changed_at.max(empty)));
        }
        if started.elapsed() >= timeout {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Takes every message from the dead-letter queue and matches it against what was
/// published.
///
/// # Errors
/// When the broker cannot be reached.
pub async fn read_dead_letters(
    at: &Endpoints,
    published: &Published,
) -> anyhow::Result<DeadLetters> {
    let broker = Broker::connect(&at.amqp_url).await?;
    let letters = broker
        .drain(&at.dead_letter_queue(), Duration::from_millis(500))
        .await?;
    let bodies: HashSet<&Vec<u8>> = letters.iter().map(|l| &l.body).collect();
    Ok(DeadLetters {
        total: letters.len(),
        distinct: bodies.len(),
        malformed_confirmed: published.malformed_confirmed.len(),
        missing: published
            .malformed_confirmed
            .iter()
            .filter(|b| !bodies.contains(b))
            .count(),
        foreign: bodies
            .iter()
            .filter(|b| !published.malformed_sent.contains(**b))
            .count(),
    })
}
