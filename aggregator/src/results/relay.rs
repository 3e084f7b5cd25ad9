//! The results relay of one replica: publishes committed outbox events to
//! [`super::EXCHANGE`] and deletes them once the broker confirmed them, in the
//! transaction that claimed them ([`crate::db::outbox`]).
//!
//! It runs as its own task under the replica's shutdown token, on its own broker
//! connection and its own one-session PostgreSQL pool (`application_name`
//! `vote-aggregator-results-relay`), with its own backoff: counting
//! never waits for it, and a results outage (broker refusing, exchange gone) only lets
//! the outbox grow, which the `results_outbox_*` gauges show. One round:
//!
//! 1. claim up to `RESULTS_RELAY_BATCH_SIZE` events (`FOR UPDATE SKIP LOCKED`: relays of
//!    other replicas take other rows);
//! 2. publish each (persistent, `message_id` = event id), then await every confirm
//!    (publishes and confirms together bounded by [`CONFIRM_TIMEOUT`], inside the relay
//!    sessions' idle-in-transaction timeout, which is at least 15 s whatever the batches
//!    use);
//! 3. delete them and COMMIT. A failure before that COMMIT rolls the claim back and the
//!    events are published again later: repeats, never losses.
//!
//! With `RESULTS_RELAY=false` the task only keeps the gauges current (another replica,
//! or a later start, relays).

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::config::Config;
use crate::db::{self, PgPool};
use crate::error::{BrokerError, DbError};
use crate::metrics::Metrics;
use crate::supervisor::retry_backoff;

/// Longest wait for the broker to take one round: its publishes (which block while the
/// broker has a memory or disk alarm) and their confirms.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Lower bound of the relay sessions' `idle_in_transaction_session_timeout`: the
/// confirm wait plus a margin.
const RELAY_IDLE_IN_TRANSACTION: Duration = Duration::from_secs(15);
/// Pause after a round that did not fill its batch (or found nothing): events gather for
/// the next round, so a relay commits a few times a second under load instead of once
/// per batch commit (every relay COMMIT is a WAL flush the batch commits share the disk
/// with), and events follow their commit within about this long.
const ROUND_PAUSE: Duration = Duration::from_millis(200);
/// How often the pending gauges are refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(2);

/// Why a relay session ended.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("{0}")]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Db(#[from] DbError),
    #[error(
        "RabbitMQ did not confirm {events} results event(s) within {CONFIRM_TIMEOUT:?}; they stay in the outbox"
    )]
    ConfirmTimeout { events: usize },
}

/// Starts the relay task; it ends when `stop` fires (after the round in hand).
pub(crate) fn spawn(config: &Config, metrics: &Metrics, stop: CancellationToken) -> JoinHandle<()> {
    // Its own session, told apart from the batch sessions by its application_name: it
    // keeps its claim's transaction open while it waits for confirms (at most
    // CONFIRM_TIMEOUT), holding only outbox rows no one waits for (SKIP LOCKED).
    let mut config = config.clone();
    config.database_url =
        db::with_application_name(&config.database_url, db::RELAY_APPLICATION_NAME);
    // The claim stays open while confirms are awaited: the relay's own sessions must
    // outlive that wait whatever DB_IDLE_IN_TRANSACTION_TIMEOUT_MS the batches use, or
    // every round would be ended before its DELETE (endless repeats).
    let mut timeouts = config.db_timeouts;
    timeouts.idle_in_transaction = timeouts.idle_in_transaction.max(RELAY_IDLE_IN_TRANSACTION);
    let pool = db::pool(&config.database_url, 1, &timeouts);
    // The gauges get their own session, so a round stuck on a blocked broker (a memory
    // or disk alarm) cannot freeze the figures the outbox alert reads.
    let gauge_pool = db::pool(&config.database_url, 1, &timeouts);
    let metrics = metrics.clone();
    tokio::spawn(
        async move {
            // The gauges run beside the relay, so they stay current while it cannot
            // publish (the case they exist for).
            if config.results_relay {
                tokio::join!(
                    relay(&config, &metrics, &pool, &stop),
                    gauges(&config, &metrics, &gauge_pool, &stop)
                );
            } else {
                info!("results relay off (RESULTS_RELAY=false): outbox events are left to other replicas");
                gauges(&config, &metrics, &gauge_pool, &stop).await;
            }
        }
        .instrument(tracing::info_span!("results_relay")),
    )
}

/// Relay sessions, one after the other, with backoff between failed ones.
async fn relay(config: &Config, metrics: &Metrics, pool: &PgPool, stop: &CancellationToken) {
    let mut backoff = retry_backoff();
    // Its own shuffled order of the broker's nodes: after a failed session, the next.
    let mut nodes = crate::broker::Rotation::shuffled(config);
    loop {
        let ended = session(config, nodes.current(), metrics, pool, stop, &mut backoff).await;
        let Err(error) = ended else { return };
        nodes.advance();
        if matches!(
            error,
            RelayError::Broker(_) | RelayError::ConfirmTimeout { .. }
        ) {
            metrics.results_publish_failures.inc();
        }
        let wait = backoff.next().unwrap_or(Duration::from_secs(5));
        warn!(%error, retry_in_ms = wait.as_millis() as u64,
              "results relay interrupted; events stay in the outbox; retrying (counting goes on)");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One broker connection: rounds until `stop` (Ok) or a failure (Err).
async fn session(
    config: &Config,
    node: &crate::broker::Node,
    metrics: &Metrics,
    pool: &PgPool,
    stop: &CancellationToken,
    backoff: &mut backon::ExponentialBackoff,
) -> Result<(), RelayError> {
    let (connection, channel) = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        c = crate::broker::connect_results(config, node) => c?,
    };
    let result = loop {
        if stop.is_cancelled() {
            break Ok(());
        }
        match round(config, &node.shown, metrics, pool, &channel).await {
            Ok(published) => {
                if published > 0 {
                    *backoff = retry_backoff();
                }
                // A full batch means a backlog: the next round starts at once.
                if published < config.results_relay_batch {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(ROUND_PAUSE) => {}
                    }
                }
            }
            Err(e) => break Err(e),
        }
    };
    let _ = connection.close(200, "results relay done".into()).await;
    result
}

/// One claim-publish-confirm-delete round; returns how many events it published.
async fn round(
    config: &Config,
    broker_url: &str,
    metrics: &Metrics,
    pool: &PgPool,
    channel: &lapin::Channel,
) -> Result<usize, RelayError> {
    let url = &config.database_url;
    let claim = db::outbox::claim(pool, url, config.results_relay_batch).await?;
    let n = claim.events.len();
    if n == 0 {
        claim.release().await;
        return Ok(0);
    }
    #[cfg(feature = "fault-injection")]
    if crate::fault::outbox_delete_before_confirm() {
        // The deliberately broken order: the events are gone before the broker has them.
        let events = claim.events.clone();
        claim.delete_and_commit().await?;
        crate::fault::in_relay_confirm_delete_window();
        publish_all(broker_url, channel, &events).await?;
        metrics.results_events_published.inc_by(n as u64);
        return Ok(n);
    }
    if let Err(e) = publish_all(broker_url, channel, &claim.events).await {
        claim.release().await;
        return Err(e);
    }
    #[cfg(feature = "fault-injection")]
    crate::fault::in_relay_confirm_delete_window();
    claim.delete_and_commit().await?;
    metrics.results_events_published.inc_by(n as u64);
    debug!(events = n, "results events published");
    Ok(n)
}

/// Publishes `events` to the node shown as `broker_url` and waits for every confirm.
async fn publish_all(
    broker_url: &str,
    channel: &lapin::Channel,
    events: &[super::Event],
) -> Result<(), RelayError> {
    // One bound for publishes and confirms: a blocked connection (broker alarm) stops
    // the publishes themselves, not only the confirms.
    let all = async {
        let mut confirms = Vec::with_capacity(events.len());
        for event in events {
            confirms.push(crate::broker::publish_result(channel, broker_url, event).await?);
        }
        for confirm in confirms {
            crate::broker::confirmed(confirm, broker_url).await?;
        }
        Ok::<(), BrokerError>(())
    };
    tokio::time::timeout(CONFIRM_TIMEOUT, all)
        .await
        .map_err(|_| RelayError::ConfirmTimeout {
            events: events.len(),
        })??;
    Ok(())
}

/// Keeps the pending gauges current until `stop`.
async fn gauges(config: &Config, metrics: &Metrics, pool: &PgPool, stop: &CancellationToken) {
    let mut tick = tokio::time::interval(GAUGE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => refresh_gauges(config, metrics, pool).await,
        }
    }
}

/// Sets the pending gauges (they keep their last value when the database cannot say).
async fn refresh_gauges(config: &Config, metrics: &Metrics, pool: &PgPool) {
    match db::outbox::pending(pool, &config.database_url).await {
        Ok(p) => {
            metrics.results_outbox_pending.set(p.events);
            metrics
                .results_outbox_oldest_age_seconds
                .set(p.oldest_age_seconds);
        }
        Err(e) => debug!(error = %e, "results outbox gauges not refreshed"),
    }
}
