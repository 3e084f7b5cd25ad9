//! The supervisor of one replica: migrations, the database watch, the results relay
//! task, and the reconnect loop that runs broker session after broker session until
//! shutdown.
//!
//! It owns every retry-with-backoff decision of the service ([`retry_backoff`]) and the
//! rule that only what retrying cannot fix (a queue declared with other arguments,
//! refused credentials or permissions, a TLS handshake refused on a certificate, a host
//! name or a server without TLS, a migration that fails on its own or that the user may
//! not apply) stops the replica; an
//! unreachable server is retried, reported in the metrics and the logs, and never
//! returned as an error. When `AMQP_URL` lists several nodes, each retry goes to the
//! next node of this replica's shuffled order ([`broker::Rotation`]). What happens
//! inside one session is [`crate::consumer`]'s.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::consumer::{self, Ctx, SessionEnd};
use crate::error::{BrokerError, DbError, Error};
use crate::metrics::DEP_POSTGRES;
use crate::{broker, db};

/// A broker session that lasted at least this long counts as healthy: losing it resets
/// the reconnect backoff. Shorter sessions keep backing off.
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// The backoff used for every retry in the service: 100 ms doubling to 5 s, jittered,
/// never giving up (the caller decides when to stop).
pub(crate) fn retry_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Migrate, watch the database, then consume session after session until shutdown.
pub(crate) async fn serve(ctx: Ctx, shutdown: CancellationToken) -> Result<(), Error> {
    if ctx.config.run_migrations && !migrate_with_retry(&ctx, &shutdown).await? {
        return Ok(());
    }
    tokio::spawn(watch_database(ctx.clone(), shutdown.child_token()).in_current_span());
    // After migrating (the outbox exists); stopped after the consumer, so a graceful stop
    // finishes the relay round in hand rather than leaving repeats.
    let relay_stop = CancellationToken::new();
    let relay = crate::results::relay::spawn(&ctx.config, &ctx.metrics, relay_stop.clone());
    let served = consume(&ctx, &shutdown).await;
    relay_stop.cancel();
    let _ = tokio::time::timeout(crate::results::relay::CONFIRM_TIMEOUT * 2, relay).await;
    served
}

/// Broker session after broker session until shutdown.
async fn consume(ctx: &Ctx, shutdown: &CancellationToken) -> Result<(), Error> {
    let ctx = ctx.clone();
    let shutdown = shutdown.clone();
    let mut backoff = retry_backoff();
    let mut nodes = broker::Rotation::shuffled(&ctx.config);
    ctx.metrics.set_broker_node(labels(&nodes), None);
    // Numbers the broker sessions of this replica (the `session` field of their logs).
    let mut sessions: u64 = 0;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        // Hold no deliveries hostage while this replica cannot reach the database:
        // consume only once it answers (another replica may be able to).
        if !ctx.metrics.is_up(DEP_POSTGRES) {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
            }
        }
        sessions += 1;
        let span = tracing::info_span!("session", session = sessions);
        let wait = match session(&ctx, &shutdown, &mut backoff, &mut nodes)
            .instrument(span)
            .await?
        {
            Next::Stop => return Ok(()),
            Next::RetryIn(wait) => wait,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// What the supervisor does after a session attempt.
enum Next {
    /// Shutdown: return.
    Stop,
    /// Connect again after this long.
    RetryIn(Duration),
}

/// The `node` labels of every node of `nodes`.
fn labels(nodes: &broker::Rotation) -> impl Iterator<Item = &str> {
    nodes.nodes().iter().map(|n| n.label.as_str())
}

/// One broker session: connect to the current node of `nodes`, consume until the
/// session ends, and decide how long to wait before the next one (which goes to the next
/// node when this one failed).
async fn session(
    ctx: &Ctx,
    shutdown: &CancellationToken,
    backoff: &mut ExponentialBackoff,
    nodes: &mut broker::Rotation,
) -> Result<Next, Error> {
    let node = nodes.current().clone();
    let session = tokio::select! {
        _ = shutdown.cancelled() => return Ok(Next::Stop),
        s = broker::connect(&ctx.config, &node) => s,
    };
    match session {
        Ok(session) => {
            info!(amqp = %node.shown, "connected to RabbitMQ");
            ctx.metrics
                .set_broker_node(labels(nodes), Some(&node.label));
            let started = tokio::time::Instant::now();
            let end = consumer::run_session(ctx, session, shutdown).await;
            ctx.metrics.set_broker_node(labels(nodes), None);
            match end? {
                SessionEnd::Stopped => Ok(Next::Stop),
                SessionEnd::Lost(reason) => {
                    nodes.advance();
                    ctx.metrics.broker_connection_failures.inc();
                    let lasted = started.elapsed();
                    // Only a session that lived resets the backoff: one that dies right
                    // after connecting (consume refused, exclusive consumer elsewhere)
                    // must not turn into a reconnect storm.
                    if lasted >= STABLE_SESSION {
                        *backoff = retry_backoff();
                    }
                    let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                    warn!(%reason, amqp = %node.shown, next = %nodes.current().shown, lasted_ms = lasted.as_millis() as u64, retry_in_ms = wait.as_millis() as u64,
                          "RabbitMQ session lost; unacked deliveries will be redelivered; reconnecting");
                    Ok(Next::RetryIn(wait))
                }
            }
        }
        Err(
            e @ (BrokerError::QueueMismatch { .. }
            | BrokerError::AuthRefused { .. }
            | BrokerError::PermissionRefused { .. }
            | BrokerError::Tls { .. }),
        ) => Err(e.into()),
        Err(e) => {
            nodes.advance();
            ctx.metrics.broker_connection_failures.inc();
            let wait = backoff.next().unwrap_or(Duration::from_secs(5));
            warn!(error = %e, next = %nodes.current().shown, retry_in_ms = wait.as_millis() as u64, "cannot reach RabbitMQ; retrying");
            Ok(Next::RetryIn(wait))
        }
    }
}

/// Pings PostgreSQL every second to keep `up{dependency="postgres"}` (and so
/// `/readyz`) true to the facts even while no batch is committing.
async fn watch_database(ctx: Ctx, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ok = tokio::time::timeout(
            Duration::from_secs(3),
            db::ping(&ctx.pool, &ctx.config.database_url),
        )
        .await;
        let up = matches!(ok, Ok(Ok(())));
        if !up && ctx.metrics.is_up(DEP_POSTGRES) {
            ctx.metrics.database_connection_failures.inc();
            warn!("PostgreSQL stopped answering; /readyz reports 503 until it is back");
        } else if up && !ctx.metrics.is_up(DEP_POSTGRES) {
            info!("PostgreSQL reachable");
        }
        ctx.metrics.set_up(DEP_POSTGRES, up);
    }
}

/// Applies pending migrations, retrying with backoff while PostgreSQL is unreachable.
/// Returns `false` if shutdown came first.
async fn migrate_with_retry(ctx: &Ctx, shutdown: &CancellationToken) -> Result<bool, Error> {
    let mut backoff = retry_backoff();
    loop {
        let res = tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            r = migrate_unless_current(ctx) => r,
        };
        match res {
            Ok(applied) => {
                if !applied.is_empty() {
                    info!(migrations = ?applied, "migrations applied");
                }
                ctx.metrics.set_up(DEP_POSTGRES, true);
                return Ok(true);
            }
            Err(e) if e.is_transient() => {
                ctx.metrics.database_connection_failures.inc();
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot apply migrations yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Migrates only when an embedded migration is not applied yet: asking is a plain
/// `SELECT`, so a replica logged in with the runtime role (which may not change the
/// schema) starts cleanly on a current schema, and fails with one line when it is not.
async fn migrate_unless_current(ctx: &Ctx) -> Result<Vec<String>, DbError> {
    let url = &ctx.config.database_url;
    if db::schema::pending_migrations(url).await?.is_empty() {
        return Ok(Vec::new());
    }
    db::run_migrations(url).await
}
