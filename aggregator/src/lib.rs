//! vote-aggregator: counts votes from a RabbitMQ queue into PostgreSQL exactly once.
//!
//! The library holds all logic; the `vote-aggregator` binary only parses, wires and
//! calls [`run`]. Tests start the service in-process with [`spawn`] (the HTTP endpoint
//! may use port 0) and stop it through the [`CancellationToken`].
//!
//! Modules:
//! - [`config`]: the typed configuration (every variable and default);
//! - [`vote`]: the message contract, decoding and validation;
//! - [`broker`]: RabbitMQ connection, topology, dead-lettering;
//! - [`db`]: PostgreSQL pool, migrations, the batch write, `verify`;
//! - [`consumer`] (private): the consume → batch → commit → ack loop;
//! - [`metrics`] and [`http`]: observability;
//! - [`error`]: error types and the error policy;
//! - [`telemetry`]: log set-up for the binaries.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod broker;
pub mod config;
mod consumer;
pub mod db;
pub mod error;
pub mod fault;
pub mod http;
pub mod metrics;
pub mod telemetry;
pub mod vote;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use crate::config::Config;
pub use crate::error::Error;
pub use crate::metrics::Metrics;

use crate::consumer::{Ctx, SessionEnd};
use crate::error::BrokerError;
use crate::metrics::{DEP_POSTGRES, DEP_RABBITMQ};

/// A running replica started by [`spawn`].
pub struct Running {
    metrics_addr: SocketAddr,
    metrics: Metrics,
    task: JoinHandle<Result<(), Error>>,
}

impl Running {
    /// Where `/metrics`, `/healthz` and `/readyz` are served (the real port when the
    /// configuration asked for port 0).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// This replica's metrics, for in-process tests.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Waits for the replica to stop (after the shutdown token fired, or on a fatal
    /// error).
    ///
    /// # Errors
    /// The fatal [`Error`] that stopped it.
    pub async fn join(self) -> Result<(), Error> {
        match self.task.await {
            Ok(res) => res,
            Err(e) => {
                error!(error = %e, "replica task panicked");
                Err(Error::Panicked(e.to_string()))
            }
        }
    }
}

/// Runs the service until `shutdown` fires (then finishes the batch in hand within the
/// grace period) or a fatal error occurs.
///
/// # Errors
/// See [`Error`]: only what retrying cannot fix.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    spawn(config, shutdown).await?.join().await
}

/// Starts the service in the background: binds the HTTP endpoint, then connects,
/// migrates (unless disabled) and consumes, retrying unreachable servers with backoff.
///
/// # Errors
/// [`Error::Bind`] when the HTTP endpoint cannot listen.
pub async fn spawn(config: Config, shutdown: CancellationToken) -> Result<Running, Error> {
    let metrics = Metrics::new();
    let listener = http::bind(config.metrics_addr).await?;
    let metrics_addr = listener.local_addr().map_err(|e| Error::Bind {
        addr: config.metrics_addr,
        reason: e.to_string(),
    })?;
    let http_stop = CancellationToken::new();
    tokio::spawn(http::serve(listener, metrics.clone(), http_stop.clone()));
    info!(replica = %config.replica_id, %metrics_addr, "vote-aggregator starting");

    let ctx = Ctx {
        pool: db::pool(
            &config.database_url,
            config.db_pool_size,
            &config.db_timeouts,
        ),
        config: Arc::new(config),
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(async move {
        let grace = ctx.config.shutdown_grace;
        let work = serve(ctx.clone(), shutdown.clone());
        tokio::pin!(work);
        let res = tokio::select! {
            res = &mut work => res,
            _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                Err(Error::ShutdownTimeout { seconds: grace.as_secs() })
            }
        };
        // The endpoint outlives the consumer so probes see the shutdown happen.
        http_stop.cancel();
        ctx.metrics.set_up(DEP_RABBITMQ, false);
        ctx.metrics.set_up(DEP_POSTGRES, false);
        res
    });
    Ok(Running {
        metrics_addr,
        metrics,
        task,
    })
}

/// A broker session that lasted at least this long counts as healthy: losing it resets
/// the reconnect backoff. Shorter sessions keep backing off.
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Migrate, watch the database, then consume session after session until shutdown.
async fn serve(ctx: Ctx, shutdown: CancellationToken) -> Result<(), Error> {
    if ctx.config.run_migrations && !migrate_with_retry(&ctx, &shutdown).await? {
        return Ok(());
    }
    tokio::spawn(watch_database(ctx.clone(), shutdown.child_token()));

    let mut backoff = consumer::retry_backoff();
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
        let session = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            s = broker::connect(&ctx.config) => s,
        };
        match session {
            Ok(session) => {
                info!(amqp = %config::redact_url(ctx.config.amqp_url.expose_secret()), "connected to RabbitMQ");
                let started = tokio::time::Instant::now();
                match consumer::run_session(&ctx, session, &shutdown).await? {
                    SessionEnd::Stopped => return Ok(()),
                    SessionEnd::Lost(reason) => {
                        ctx.metrics.broker_connection_failures.inc();
                        let lasted = started.elapsed();
                        // Only a session that lived resets the backoff: one that dies right
                        // after connecting (consume refused, exclusive consumer elsewhere)
                        // must not turn into a reconnect storm.
                        if lasted >= STABLE_SESSION {
                            backoff = consumer::retry_backoff();
                        }
                        let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                        warn!(%reason, lasted_ms = lasted.as_millis() as u64, retry_in_ms = wait.as_millis() as u64,
                              "RabbitMQ session lost; unacked deliveries will be redelivered; reconnecting");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
            Err(e @ (BrokerError::QueueMismatch { .. } | BrokerError::AuthRefused { .. })) => {
                return Err(e.into());
            }
            Err(e) => {
                ctx.metrics.broker_connection_failures.inc();
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot reach RabbitMQ; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
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

/// Applies migrations, retrying with backoff while PostgreSQL is unreachable. Returns
/// `false` if shutdown came first.
async fn migrate_with_retry(ctx: &Ctx, shutdown: &CancellationToken) -> Result<bool, Error> {
    let mut backoff = consumer::retry_backoff();
    loop {
        let res = tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            r = db::run_migrations(&ctx.config.database_url) => r,
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
