//! Real PostgreSQL and RabbitMQ servers for tests, in Docker containers or already running.
//!
//! This module owns the servers every integration, chaos and load test talks to, and the
//! lifecycle of their containers:
//!
//! - [`shared`] starts ONE PostgreSQL and ONE RabbitMQ container per test process, lazily
//!   and once, and hands out the same [`Infra`] to every test. Tests isolate themselves
//!   with [`Infra::fresh_database`] and [`fresh_queue_name`] rather than with containers.
//! - [`start_private`] starts a separate pair behind two [`FaultProxy`]s for tests that stop,
//!   restart, pause or kill servers; the URLs it hands out stay valid across restarts.
//! - With `VOTES_TEST_DATABASE_URL` and `VOTES_TEST_AMQP_URL` set, [`shared`] uses those
//!   servers and starts no container.
//! - [`start_tls_rabbitmq`] starts a RabbitMQ with a TLS listener serving a
//!   [`crate::tls::TestPki`]'s certificates, for the tests of `amqps://`.
//!
//! Containers are started and driven with testcontainers (`GenericImage`, `ContainerAsync`);
//! its runner works against this project's engines (Docker 20.10, API 1.41; see the
//! `testcontainers_runs_against_this_engine` test). What testcontainers lacks stays here:
//!
//! - a fixed address per server: Docker maps a new host port on every start, so each
//!   private server sits behind a [`FaultProxy`] that is re-pointed (`private`);
//! - readiness that really connects: a PostgreSQL login and an AMQP login, after the
//!   readiness log line and after every restart (`probes`);
//! - SIGKILL, container state, start time and log-since queries (`engine`);
//! - one never-dropped runtime for every Docker operation, since `#[tokio::test]` runtimes
//!   die and testcontainers' client and `Drop` are bound to a runtime (`engine`);
//! - removal of the shared pair at exit (statics are never dropped) and of containers left
//!   by killed test processes (`cleanup`);
//! - the image choice (`images`).
//!
//! - [`start_broker_cluster`] starts a three-node RabbitMQ cluster ([`BrokerCluster`]),
//!   each node behind a [`FaultProxy`], on a private network a test can cut a node from.
//! - [`start_tls_postgres`] starts a PostgreSQL with `ssl=on` from a
//!   [`crate::tls::TestPki`], paired with another server's RabbitMQ, for the TLS tests.
//!
//! Files: `images` (which image), `containers` (one container via testcontainers),
//! `exec` (commands inside the shared containers: `rabbitmqctl`, `psql`),
//! `shared` (the process-wide pair, external servers), `private` ([`PrivateInfra`]),
//! `tls_postgres` ([`TlsPostgres`]),
//! `probes` (readiness), `engine` (Docker runtime, bollard calls), `cleanup` (labels,
//! stale and exit removal), `tls_broker` ([`TlsRabbitMq`]), `broker_cluster`
//! ([`BrokerCluster`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use url::Url;

#[cfg(doc)]
use crate::proxy::FaultProxy;

mod broker_cluster;
mod cleanup;
mod containers;
mod engine;
mod exec;
mod host_network;
mod images;
mod private;
mod probes;
mod shared;
mod tls_broker;
mod tls_postgres;

pub use broker_cluster::{BrokerCluster, CLUSTER_NODES, QueueMembers, start_broker_cluster};
pub use cleanup::{keep_at_exit, own_labels};
pub use exec::{SharedServer, exec_in_shared};
pub use images::{postgres_image, rabbitmq_image};
pub use private::{PrivateInfra, start_private};
pub use shared::shared;
pub use tls_broker::{RABBITMQ_TLS_PORT, TlsBrokerOptions, TlsRabbitMq, start_tls_rabbitmq};
pub use tls_postgres::{CERT_USER, HBA, TlsPostgres, start_tls_postgres};

/// User name and password of both servers (RabbitMQ's `guest` may only log in from
/// localhost, which a published container port is not).
const USER: &str = "votes";
const PASSWORD: &str = "votes";
const POSTGRES_PORT: u16 = 5432;
const RABBITMQ_PORT: u16 = 5672;
/// Upper bound for a container to print its readiness line (RabbitMQ on a busy 2-core
/// machine needs 10–30 s).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);
/// Upper bound for a server to accept a real connection after its log line or a restart.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(90);
/// Upper bound for removing containers from `Drop` or at exit.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);

const LABEL_TEST: &str = "vote-aggregator.test";
const LABEL_PID: &str = "vote-aggregator.test.pid";
const LABEL_HOST: &str = "vote-aggregator.test.host";
const LABEL_ROLE: &str = "vote-aggregator.test.role";
const LABEL_SCOPE: &str = "vote-aggregator.test.scope";
const LABEL_KEEP: &str = "vote-aggregator.test.keep";

const ENV_DATABASE_URL: &str = "VOTES_TEST_DATABASE_URL";
const ENV_AMQP_URL: &str = "VOTES_TEST_AMQP_URL";

/// How to start a container pair.
#[derive(Debug, Clone)]
pub struct InfraOptions {
    /// Run PostgreSQL with `fsync`, `synchronous_commit` and `full_page_writes` on (the
    /// server defaults). Off by default: fine for tests, wrong for throughput baselines.
    pub fsync: bool,
    /// PostgreSQL `max_connections` (default 300: several replicas with pools plus tests).
    pub max_connections: u32,
    /// More PostgreSQL settings, each `name=value` (passed as `-c name=value`, after the
    /// ones above, so they win), e.g. `wal_writer_delay=1000ms`.
    pub postgres_settings: Vec<String>,
    /// PostgreSQL image; `None` (the default): [`postgres_image`]'s choice.
    pub postgres_image: Option<String>,
    /// RabbitMQ image; `None` (the default): [`rabbitmq_image`]'s choice.
    pub rabbitmq_image: Option<String>,
    /// Run both servers in the host's network namespace on loopback ports chosen at start
    /// (see `host_network`), so clients reach them directly: no Docker port proxy and, for
    /// [`start_private`], no fault proxies (their accessors then panic). For benchmarks;
    /// off by default. Requires a local Docker engine.
    pub host_network: bool,
}

impl Default for InfraOptions {
    fn default() -> Self {
        InfraOptions {
            fsync: false,
            max_connections: 300,
            postgres_settings: Vec::new(),
            postgres_image: None,
            rabbitmq_image: None,
            host_network: false,
        }
    }
}

/// Where a PostgreSQL and a RabbitMQ server can be reached.
///
/// Obtained from [`shared`] (or through a [`PrivateInfra`]). Holds only addresses and
/// URLs, so it may be used from any runtime.
pub struct Infra {
    /// URL of the `postgres` maintenance database, as the `votes` superuser.
    admin_url: Url,
    amqp_url: String,
    postgres: SocketAddr,
    rabbitmq: SocketAddr,
}

impl std::fmt::Debug for Infra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Addresses only: external URLs may carry real passwords.
        f.debug_struct("Infra")
            .field("postgres", &self.postgres)
            .field("rabbitmq", &self.rabbitmq)
            .finish_non_exhaustive()
    }
}

impl Infra {
    /// URL of the maintenance database (`postgres`), as a superuser: use it to create
    /// databases, not to run the service. Example:
    /// `postgres://votes:votes@127.0.0.1:49153/postgres`.
    pub fn admin_database_url(&self) -> String {
        self.admin_url.to_string()
    }

    /// AMQP URL of the broker's default vhost, e.g. `amqp://votes:votes@127.0.0.1:49154/%2f`.
    pub fn amqp_url(&self) -> String {
        self.amqp_url.clone()
    }

    /// Creates an empty database `votes_test_<random>` and returns its URL. No migrations
    /// are run. The caller drops it with [`Infra::drop_database`] (a
    /// [`crate::testbed::TestBed`] does so itself); leftovers go away with the container.
    pub async fn fresh_database(&self) -> anyhow::Result<String> {
        self.create_database("").await
    }

    /// Creates a database `votes_test_<random>` as a copy of `template` (the URL or name
    /// of one made by [`Infra::fresh_database`], with no session connected to it), as
    /// `CREATE DATABASE … TEMPLATE` copies it: the same schema, rows and object ids.
    /// Returns its URL; drop it like a fresh one.
    ///
    /// # Errors
    /// When `template` is not a database `fresh_database` makes, or PostgreSQL refuses
    /// (a session still connected to the template).
    pub async fn copy_database(&self, template: &str) -> anyhow::Result<String> {
        let template = made_by_fresh_database(template)?;
        self.create_database(&format!(" TEMPLATE {template}")).await
    }

    /// `CREATE DATABASE votes_test_<random><options>`; returns its URL.
    async fn create_database(&self, options: &str) -> anyhow::Result<String> {
        use diesel_async::RunQueryDsl as _;
        let name = format!("votes_test_{:016x}", rand::random::<u64>());
        let mut conn = self.admin_connection().await?;
        diesel::sql_query(format!("CREATE DATABASE {name}{options}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("CREATE DATABASE {name}{options} on {}", self.postgres))?;
        let mut url = self.admin_url.clone();
        url.set_path(&format!("/{name}"));
        Ok(url.to_string())
    }

    /// Drops a database made by [`Infra::fresh_database`], given its URL or name,
    /// disconnecting whoever still uses it (`WITH (FORCE)`). Dropping one that is gone
    /// already succeeds.
    ///
    /// # Errors
    /// When the name is not one `fresh_database` makes, or PostgreSQL refuses.
    pub async fn drop_database(&self, url_or_name: &str) -> anyhow::Result<()> {
        drop_database(self.admin_url.as_str(), url_or_name).await
    }

    async fn admin_connection(&self) -> anyhow::Result<AsyncPgConnection> {
        AsyncPgConnection::establish(self.admin_url.as_str())
            .await
            .with_context(|| format!("connecting to PostgreSQL at {}", self.postgres))
    }

    /// The host address PostgreSQL is reachable at (for a [`PrivateInfra`]: its proxy).
    pub fn postgres_host_port(&self) -> SocketAddr {
        self.postgres
    }

    /// The host address RabbitMQ's AMQP port is reachable at (for a [`PrivateInfra`]: its
    /// proxy).
    pub fn rabbitmq_host_port(&self) -> SocketAddr {
        self.rabbitmq
    }
}

/// A fresh, unused queue name: `votes.test.<12 random hex digits>`.
pub fn fresh_queue_name() -> String {
    format!(
        "votes.test.{:012x}",
        rand::random::<u64>() & 0xffff_ffff_ffff
    )
}

/// Installs a `tracing` subscriber that writes to the test output, but only when
/// `TEST_LOG=1`. The filter comes from `RUST_LOG` (default `info`). Idempotent: later
/// calls, and calls after another subscriber was installed, do nothing.
pub fn init_test_logging() {
    if std::env::var("TEST_LOG").as_deref() != Ok("1") {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A container's state as Docker reports it (see [`PrivateInfra::container_state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    /// When Docker last started it (RFC 3339): a restart shows as a new value.
    pub started_at: String,
    /// Whether it runs now.
    pub running: bool,
    /// Host pid of its main process (0 when it is not running).
    pub pid: i64,
    /// Exit code of its last run (128 + signal when a signal ended it: 137 = SIGKILL).
    pub exit_code: i64,
}

/// The database name in `url_or_name` (its last path segment), if it is one
/// [`Infra::fresh_database`] makes: only such names go into SQL, unquoted.
///
/// # Errors
/// When it is any other name.
fn made_by_fresh_database(url_or_name: &str) -> anyhow::Result<&str> {
    let name = url_or_name.rsplit('/').next().unwrap_or_default();
    let well_formed = name
        .strip_prefix("votes_test_")
        .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit()));
    anyhow::ensure!(
        well_formed,
        "`{name}` is not a database made by fresh_database"
    );
    Ok(name)
}

/// [`Infra::drop_database`] without an [`Infra`]: `admin_url` is its admin URL.
pub(crate) async fn drop_database(admin_url: &str, url_or_name: &str) -> anyhow::Result<()> {
    use diesel_async::RunQueryDsl as _;
    let name = made_by_fresh_database(url_or_name).context("refusing to drop it")?;
    let mut conn = AsyncPgConnection::establish(admin_url)
        .await
        .with_context(|| format!("connecting to PostgreSQL to drop {name}"))?;
    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .with_context(|| format!("DROP DATABASE {name}"))?;
    Ok(())
}

/// Drops a database in the background (on the kit's never-dropped runtime), for `Drop`
/// impls: never blocks the caller. Failures are logged; a database left behind goes away
/// with its container.
pub(crate) fn drop_database_detached(admin_url: String, url_or_name: String) {
    let Ok(runtime) = engine::docker_runtime() else {
        return;
    };
    runtime.spawn(async move {
        let dropped =
            tokio::time::timeout(REMOVE_TIMEOUT, drop_database(&admin_url, &url_or_name)).await;
        if !matches!(dropped, Ok(Ok(()))) {
            tracing::debug!(database = %url_or_name, "could not drop a test database");
        }
    });
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_are_fresh_and_well_formed() {
        let (a, b) = (fresh_queue_name(), fresh_queue_name());
        assert_ne!(a, b);
        let suffix = a.strip_prefix("votes.test.").expect("prefix");
        assert_eq!(suffix.len(), 12);
        assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn external_urls_resolve() {
        let infra = shared::external_infra(
            "postgres://votes:votes@127.0.0.1:6543/postgres",
            "amqp://votes:votes@localhost/%2f",
        )
        .expect("valid URLs");
        assert_eq!(infra.postgres_host_port().port(), 6543);
        assert_eq!(infra.rabbitmq_host_port().port(), 5672);
        assert_eq!(
            infra.admin_database_url(),
            "postgres://votes:votes@127.0.0.1:6543/postgres"
        );
    }
}
