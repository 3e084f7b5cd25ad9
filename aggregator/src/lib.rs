//! vote-aggregator: counts votes from a RabbitMQ queue into PostgreSQL exactly once.
//!
//! The library holds all logic; the `vote-aggregator` binary only parses, wires and
//! calls [`run`]. Tests start the service in-process with [`spawn`] (the HTTP endpoint
//! may use port 0) and stop it through the [`CancellationToken`].
//!
//! Where each concern lives:
//! - [`config`]: the typed configuration and its pure parser; [`config::variables`]
//!   declares every environment variable once (the README table and `--help` come
//!   from it); URL redaction;
//! - [`vote`]: the message contract, decoding and validation;
//! - [`broker`]: RabbitMQ connection (TLS of `amqps://` in its `tls` submodule),
//!   topology, dead-lettering, and the contract's header, queue-argument and
//!   queue-suffix names; [`amqp_permissions`]: the least RabbitMQ permissions of the
//!   aggregator's and a publisher's user;
//! - [`db`]: PostgreSQL pool, migrations, the batch write; in-doubt COMMIT resolution,
//!   `verify` (and `drift_check`, its periodic run into a gauge) and the schema's state
//!   (pending migrations, the runtime role) in its submodules;
//! - `supervisor` (private): migrations with retry, the database watch, the
//!   reconnect/backoff loop over broker sessions, the service-wide retry backoff;
//! - `consumer` (private): one broker session: set-up, the consume loop, acks in
//!   delivery order, teardown; its `pipeline` (batches and commits in flight), `batch`,
//!   `commit` (the commit task, retries, in-doubt) and `monitor` (queue depth);
//! - [`results`]: the results stream's contract (events, snapshots, a consumer's
//!   reconstruction) and the relay task that publishes the outbox;
//! - [`metrics`] (every metric declared once, names in [`metrics::names`]) and
//!   [`http`]: observability; [`http_client`]: the one-shot GET the `healthcheck`
//!   subcommand and the test kit's probes use;
//! - [`error`](mod@error): error types and the error policy;
//! - [`telemetry`]: log set-up for the binaries. Every log line of a replica carries
//!   the `replica` span (`replica = REPLICA_ID`), and those of a broker session the
//!   `session` span (`session = n`, the n-th connection attempt), commit tasks included;
//! - [`fault`]: test-only fault hooks (compiled in only with the `fault-injection`
//!   feature).
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod amqp_permissions;
pub mod broker;
pub mod config;
mod consumer;
pub mod db;
pub mod error;
pub mod fault;
pub mod http;
pub mod http_client;
#[cfg(test)]
mod k8s_manifests;
pub mod metrics;
pub mod results;
mod supervisor;
pub mod telemetry;
pub mod vote;

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};

/// The service's name: its binary, its PostgreSQL `application_name`, the prefix of its
/// AMQP connection names and consumer tags.
pub const SERVICE_NAME: &str = "vote-aggregator";

pub use crate::config::Config;
pub use crate::error::Error;
pub use crate::metrics::Metrics;

use crate::consumer::Ctx;
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
    // Every log line of this replica, its tasks included, carries `replica`: tests run
    // several replicas in one process.
    let span = tracing::info_span!("replica", replica = %config.replica_id);
    let metrics = Metrics::new();
    let listener = http::bind(config.metrics_addr).await?;
    let metrics_addr = listener.local_addr().map_err(|e| Error::Bind {
        addr: config.metrics_addr,
        reason: e.to_string(),
    })?;
    let http_stop = CancellationToken::new();
    tokio::spawn(
        http::serve(listener, metrics.clone(), http_stop.clone()).instrument(span.clone()),
    );
    span.in_scope(|| {
        info!(%metrics_addr, "vote-aggregator starting");
        db::tls::log_protection(&config.database_url);
        let amqp_key = config.amqp_tls.client.as_ref().map(|c| c.key_file.as_str());
        if let Some(w) = amqp_key
            .and_then(|k| config::exposure_warning(config::variables::AMQP_CLIENT_KEY_FILE, k))
        {
            warn!("{w}");
        }
    });

    span.in_scope(|| db::drift_check::spawn(&config, &metrics, http_stop.clone()));
    let ctx = Ctx {
        pool: db::pool(
            &config.database_url,
            config.db_pool_size,
            &config.db_timeouts,
        ),
        recent: Arc::new(
            db::RecentlyStored::new(db::recent::VOTES_REMEMBERED)
                .waiting_at_most(db::recent::wait_limit(&config.db_timeouts)),
        ),
        config: Arc::new(config),
        metrics: metrics.clone(),
    };
    let task = tokio::spawn(
        async move {
            let grace = ctx.config.shutdown_grace;
            let work = supervisor::serve(ctx.clone(), shutdown.clone());
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
        }
        .instrument(span),
    );
    Ok(Running {
        metrics_addr,
        metrics,
        task,
    })
}

/// The text of the repository's README.md between two marker lines (for the tests that
/// keep its generated tables identical to their one source).
#[cfg(test)]
pub(crate) fn readme_between(begin: &str, end: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md next to the workspace");
    let from = readme.find(begin).expect("begin marker in README.md") + begin.len();
    let to = readme.find(end).expect("end marker in README.md");
    readme[from..to].trim_matches('\n').to_owned()
}
