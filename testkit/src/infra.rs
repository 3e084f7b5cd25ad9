//! Real PostgreSQL and RabbitMQ servers for tests, in Docker containers or already running.
//!
//! This module owns the brokers every integration, chaos and load test talks to, and the
//! lifecycle of their containers:
//!
//! - [`shared`] starts ONE PostgreSQL and ONE RabbitMQ container per test process, lazily
//!   and once, and hands out the same [`Infra`] to every test. Tests isolate themselves
//!   with [`Infra::fresh_database`] and [`fresh_queue_name`] rather than with containers.
//! - [`start_private`] starts a separate pair behind two [`FaultProxy`]s for tests that stop,
//!   restart or pause servers; the URLs it hands out stay valid across restarts.
//! - With `VOTES_TEST_DATABASE_URL` and `VOTES_TEST_AMQP_URL` set, [`shared`] uses those
//!   servers and starts no container.
//!
//! # Images
//! `VOTES_POSTGRES_IMAGE` (default `postgres:17`) and `VOTES_RABBITMQ_IMAGE` (default
//! `rabbitmq:4.0`). Without registry access, `make images` builds
//! `vote-aggregator/postgres:17-offline` and `vote-aggregator/rabbitmq:4.0-offline`, which
//! honour the official images' environment variables, ports and readiness log lines.
//!
//! # Why not testcontainers' runner
//! testcontainers 0.28 talks to Docker through bollard 0.21 with a fixed API version (1.53)
//! and never negotiates, so every call fails against an engine that only speaks an older API
//! (e.g. Debian 12's `docker.io` 20.10, API 1.41: "client version 1.53 is too new"). This
//! module therefore uses the bollard client that testcontainers re-exports and configures
//! (`DOCKER_HOST`, `~/.testcontainers.properties`), negotiates the API version once, and
//! implements the few container operations it needs itself.
//!
//! # Runtimes
//! `#[tokio::test]` builds a fresh runtime per test, and a hyper/bollard client keeps its
//! pooled connections as tasks on the runtime that opened them: a client kept in a static
//! would outlive the runtime of the test that created it. So every Docker operation runs on
//! one private, never-dropped runtime ("docker runtime"); tests only await its join handles.
//! The statics hold plain data (ids, ports, URLs), never runtime-bound handles.
//!
//! # Cleanup
//! Containers carry the labels `vote-aggregator.test=1`, `vote-aggregator.test.pid=<pid>` and
//! `vote-aggregator.test.host=<hostname>`. The shared pair lives in a static and is removed
//! by an `atexit` hook; a [`PrivateInfra`] removes its pair on drop (and at exit, if it
//! leaked). A process killed with SIGKILL runs neither, so the first Docker use in a process
//! removes labelled containers of this host whose pid is no longer alive.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _};
use std::ops::Deref;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use futures_util::StreamExt as _;
use testcontainers::bollard::Docker;
use testcontainers::bollard::errors::Error as BollardError;
use testcontainers::bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use testcontainers::bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RestartContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use url::Url;

use crate::proxy::FaultProxy;

/// User name and password of both servers (RabbitMQ's `guest` may only log in from
/// localhost, which a published container port is not).
const USER: &str = "votes";
const PASSWORD: &str = "votes";
const POSTGRES_PORT: u16 = 5432;
const RABBITMQ_PORT: u16 = 5672;
const POSTGRES_READY_LINE: &str = "database system is ready to accept connections";
const RABBITMQ_READY_LINE: &str = "Server startup complete";
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

const ENV_POSTGRES_IMAGE: &str = "VOTES_POSTGRES_IMAGE";
const ENV_RABBITMQ_IMAGE: &str = "VOTES_RABBITMQ_IMAGE";
const ENV_DATABASE_URL: &str = "VOTES_TEST_DATABASE_URL";
const ENV_AMQP_URL: &str = "VOTES_TEST_AMQP_URL";
const DEFAULT_POSTGRES_IMAGE: &str = "postgres:17";
const DEFAULT_RABBITMQ_IMAGE: &str = "rabbitmq:4.0";
const OFFLINE_POSTGRES_IMAGE: &str = "vote-aggregator/postgres:17-offline";
const OFFLINE_RABBITMQ_IMAGE: &str = "vote-aggregator/rabbitmq:4.0-offline";

// ---------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------

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
    /// PostgreSQL image; default from `VOTES_POSTGRES_IMAGE`, else `postgres:17`.
    pub postgres_image: String,
    /// RabbitMQ image; default from `VOTES_RABBITMQ_IMAGE`, else `rabbitmq:4.0`.
    pub rabbitmq_image: String,
}

impl Default for InfraOptions {
    fn default() -> Self {
        InfraOptions {
            fsync: false,
            max_connections: 300,
            postgres_settings: Vec::new(),
            postgres_image: image_from_env(ENV_POSTGRES_IMAGE, DEFAULT_POSTGRES_IMAGE),
            rabbitmq_image: image_from_env(ENV_RABBITMQ_IMAGE, DEFAULT_RABBITMQ_IMAGE),
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
    /// are run. Databases are not dropped: they go away with the container.
    pub async fn fresh_database(&self) -> anyhow::Result<String> {
        use diesel_async::RunQueryDsl as _;
        let name = format!("votes_test_{:016x}", rand::random::<u64>());
        let mut conn = AsyncPgConnection::establish(self.admin_url.as_str())
            .await
            .with_context(|| format!("connecting to PostgreSQL at {}", self.postgres))?;
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("CREATE DATABASE {name} on {}", self.postgres))?;
        let mut url = self.admin_url.clone();
        url.set_path(&format!("/{name}"));
        Ok(url.to_string())
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

/// The process-wide PostgreSQL + RabbitMQ pair, started on first use.
///
/// Uses `VOTES_TEST_DATABASE_URL` + `VOTES_TEST_AMQP_URL` when both are set; otherwise
/// starts one container of each (see [`InfraOptions::default`]) and removes them when the
/// process exits. A failure is remembered: every later call fails at once with the same
/// message instead of trying again.
pub async fn shared() -> anyhow::Result<&'static Infra> {
    static SHARED: tokio::sync::OnceCell<Result<Infra, String>> =
        tokio::sync::OnceCell::const_new();
    init_test_logging();
    let result = SHARED
        .get_or_init(|| async {
            start_shared()
                .await
                .map_err(|err| format!("test infrastructure unavailable: {err:#}"))
        })
        .await;
    result.as_ref().map_err(|msg| anyhow!("{msg}"))
}

/// Starts a separate PostgreSQL + RabbitMQ pair for a test that stops, restarts or pauses
/// servers. Requires Docker (external servers cannot be restarted).
///
/// Both servers sit behind a [`FaultProxy`] on a fixed local port, so the URLs stay the
/// same across restarts. The proxies run on the calling Tokio runtime: keep the
/// `PrivateInfra` inside that runtime's lifetime.
pub async fn start_private(opts: InfraOptions) -> anyhow::Result<PrivateInfra> {
    init_test_logging();
    let (postgres, rabbitmq) = on_docker(start_pair(opts, "private")).await?;
    let mut private = PrivateInfra {
        infra: None,
        postgres: Managed::new(postgres.id.clone(), POSTGRES_PORT),
        rabbitmq: Managed::new(rabbitmq.id.clone(), RABBITMQ_PORT),
        postgres_proxy: None,
        rabbitmq_proxy: None,
    };
    // From here on, `private`'s Drop removes both containers if anything fails.
    let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let pg_proxy = FaultProxy::start(loopback, postgres.host_addr).await?;
    let mq_proxy = FaultProxy::start(loopback, rabbitmq.host_addr).await?;
    let infra = container_infra(pg_proxy.local_addr(), mq_proxy.local_addr())?;
    private.postgres_proxy = Some(pg_proxy);
    private.rabbitmq_proxy = Some(mq_proxy);
    wait_for_postgres(&infra.admin_database_url(), CONNECT_TIMEOUT).await?;
    wait_for_rabbitmq(&infra.amqp_url(), CONNECT_TIMEOUT).await?;
    tracing::info!(postgres = %infra.postgres, rabbitmq = %infra.rabbitmq, "private test infrastructure ready");
    private.infra = Some(infra);
    Ok(private)
}

/// A PostgreSQL + RabbitMQ pair owned by one test, behind fault proxies.
///
/// Derefs to [`Infra`]: its URLs and addresses point at the proxies and stay valid across
/// [`PrivateInfra::stop_postgres`] / [`PrivateInfra::start_postgres`] and friends. The
/// containers are removed on drop (blocking for at most a few seconds).
pub struct PrivateInfra {
    /// `None` only while `start_private` is still building it.
    infra: Option<Infra>,
    postgres: Managed,
    rabbitmq: Managed,
    postgres_proxy: Option<FaultProxy>,
    rabbitmq_proxy: Option<FaultProxy>,
}

impl std::fmt::Debug for PrivateInfra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateInfra")
            .field("infra", &self.infra)
            .field("postgres_container", &self.postgres.id)
            .field("rabbitmq_container", &self.rabbitmq.id)
            .finish()
    }
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

/// One container of a private pair and the container port its proxy forwards to.
struct Managed {
    id: String,
    port: u16,
}

impl Managed {
    fn new(id: String, port: u16) -> Self {
        Managed { id, port }
    }
}

impl Deref for PrivateInfra {
    type Target = Infra;

    fn deref(&self) -> &Infra {
        // Always `Some` once `start_private` returned; the only other state is internal.
        self.infra
            .as_ref()
            .unwrap_or_else(|| unreachable!("PrivateInfra used before it was built"))
    }
}

impl PrivateInfra {
    /// The proxy in front of PostgreSQL (to cut connections without stopping the server).
    pub fn postgres_proxy(&self) -> &FaultProxy {
        proxy(&self.postgres_proxy)
    }

    /// The proxy in front of RabbitMQ (to cut connections without stopping the server).
    pub fn rabbitmq_proxy(&self) -> &FaultProxy {
        proxy(&self.rabbitmq_proxy)
    }

    /// Docker id of the PostgreSQL container.
    pub fn postgres_container_id(&self) -> &str {
        &self.postgres.id
    }

    /// Docker id of the RabbitMQ container.
    pub fn rabbitmq_container_id(&self) -> &str {
        &self.rabbitmq.id
    }

    /// Stops PostgreSQL with a fast shutdown (SIGINT: clients are disconnected, open
    /// transactions roll back) and waits until the container has exited.
    pub async fn stop_postgres(&self) -> anyhow::Result<()> {
        let id = self.postgres.id.clone();
        on_docker(async move {
            stop_gracefully(&docker().await?, &id, "SIGINT")
                .await
                .map(drop)
        })
        .await
    }

    /// Starts PostgreSQL again after [`PrivateInfra::stop_postgres`], re-points the proxy at
    /// the (possibly new) host port and waits until it accepts connections.
    pub async fn start_postgres(&self) -> anyhow::Result<()> {
        self.start_again(&self.postgres, self.postgres_proxy())
            .await?;
        wait_for_postgres(&self.admin_database_url(), CONNECT_TIMEOUT).await
    }

    /// Stops and starts PostgreSQL (see [`PrivateInfra::stop_postgres`]).
    pub async fn restart_postgres(&self) -> anyhow::Result<()> {
        self.stop_postgres().await?;
        self.start_postgres().await
    }

    /// Freezes PostgreSQL (`docker pause`): connections stay open but nothing answers.
    pub async fn pause_postgres(&self) -> anyhow::Result<()> {
        let id = self.postgres.id.clone();
        on_docker(async move {
            docker()
                .await?
                .pause_container(&id)
                .await
                .with_context(|| format!("pausing PostgreSQL container {id}"))
        })
        .await
    }

    /// Resumes PostgreSQL after [`PrivateInfra::pause_postgres`].
    pub async fn unpause_postgres(&self) -> anyhow::Result<()> {
        let id = self.postgres.id.clone();
        on_docker(async move {
            docker()
                .await?
                .unpause_container(&id)
                .await
                .with_context(|| format!("unpausing PostgreSQL container {id}"))
        })
        .await
    }

    /// Stops RabbitMQ (SIGTERM, graceful) and waits until the container has exited.
    pub async fn stop_rabbitmq(&self) -> anyhow::Result<()> {
        let id = self.rabbitmq.id.clone();
        on_docker(async move {
            stop_gracefully(&docker().await?, &id, "SIGTERM")
                .await
                .map(drop)
        })
        .await
    }

    /// Starts RabbitMQ again after [`PrivateInfra::stop_rabbitmq`], re-points the proxy
    /// and waits until it accepts AMQP connections.
    pub async fn start_rabbitmq(&self) -> anyhow::Result<()> {
        self.start_again(&self.rabbitmq, self.rabbitmq_proxy())
            .await?;
        wait_for_rabbitmq(&self.amqp_url(), CONNECT_TIMEOUT).await
    }

    /// Kills RabbitMQ abruptly (SIGKILL: no clean shutdown, like a crashed node) and waits
    /// until the container has exited. Start it again with [`PrivateInfra::start_rabbitmq`].
    pub async fn kill_rabbitmq(&self) -> anyhow::Result<()> {
        let id = self.rabbitmq.id.clone();
        on_docker(async move {
            stop_gracefully(&docker().await?, &id, "SIGKILL")
                .await
                .map(drop)
        })
        .await
    }

    /// Kills PostgreSQL abruptly (SIGKILL to the container's main process, the postmaster:
    /// every backend dies with it and whatever sat in its shared memory, WAL buffers
    /// included, is gone, like a crashed server) and waits
    /// until the container has exited. [`PrivateInfra::start_postgres`] then starts it
    /// again, and it runs crash recovery from its WAL. Returns the moment Docker's kill
    /// returned (the signal delivered).
    ///
    /// # Errors
    /// When Docker refuses or the container does not exit.
    pub async fn kill_postgres(&self) -> anyhow::Result<Instant> {
        let id = self.postgres.id.clone();
        on_docker(async move { stop_gracefully(&docker().await?, &id, "SIGKILL").await }).await
    }

    /// When Docker last started the container `id` (one of this pair's, see
    /// [`PrivateInfra::postgres_container_id`]), as Docker reports it (RFC 3339), and
    /// whether it runs now. A restart shows as a new start time.
    ///
    /// # Errors
    /// When Docker cannot inspect the container.
    pub async fn container_started_at(&self, id: &str) -> anyhow::Result<(String, bool)> {
        let state = self.container_state(id).await?;
        Ok((state.started_at, state.running))
    }

    /// What Docker reports about the container `id` (one of this pair's).
    ///
    /// # Errors
    /// When Docker cannot inspect the container.
    pub async fn container_state(&self, id: &str) -> anyhow::Result<ContainerState> {
        let id = id.to_owned();
        on_docker(async move {
            let state = docker()
                .await?
                .inspect_container(&id, None)
                .await
                .with_context(|| format!("inspecting container {id}"))?
                .state
                .with_context(|| format!("container {id} has no state"))?;
            Ok(ContainerState {
                started_at: state.started_at.unwrap_or_default(),
                running: state.running.unwrap_or(false),
                pid: state.pid.unwrap_or(0),
                exit_code: state.exit_code.unwrap_or(0),
            })
        })
        .await
    }

    /// The log (stdout and stderr) the container `id` wrote since `since` (a UNIX time in
    /// seconds; Docker's resolution), across restarts.
    ///
    /// # Errors
    /// When Docker cannot read the log.
    pub async fn container_log_since(&self, id: &str, since: i64) -> anyhow::Result<String> {
        let id = id.to_owned();
        let since = i32::try_from(since).context("log start time out of range")?;
        on_docker(async move {
            let options = LogsOptionsBuilder::new()
                .stdout(true)
                .stderr(true)
                .since(since)
                .build();
            let docker = docker().await?;
            let mut logs = docker.logs(&id, Some(options));
            let mut text = String::new();
            while let Some(frame) = logs.next().await {
                let frame = frame.with_context(|| format!("reading the log of {id}"))?;
                text.push_str(&String::from_utf8_lossy(&frame.into_bytes()));
            }
            Ok(text)
        })
        .await
    }

    /// Restarts RabbitMQ (`docker restart`) and waits until it accepts AMQP connections.
    /// Durable queues and persistent messages survive.
    pub async fn restart_rabbitmq(&self) -> anyhow::Result<()> {
        let id = self.rabbitmq.id.clone();
        on_docker(async move {
            let options = RestartContainerOptionsBuilder::new().t(30).build();
            docker()
                .await?
                .restart_container(&id, Some(options))
                .await
                .with_context(|| format!("restarting RabbitMQ container {id}"))
        })
        .await?;
        self.repoint(&self.rabbitmq, self.rabbitmq_proxy()).await?;
        wait_for_rabbitmq(&self.amqp_url(), CONNECT_TIMEOUT).await
    }

    /// `docker start` + re-point the proxy.
    async fn start_again(&self, managed: &Managed, proxy: &FaultProxy) -> anyhow::Result<()> {
        let id = managed.id.clone();
        on_docker(async move {
            docker()
                .await?
                .start_container(&id, None)
                .await
                .with_context(|| format!("starting container {id} again"))
        })
        .await?;
        self.repoint(managed, proxy).await
    }

    /// Reads the container's current host port (Docker may map a new one after a restart)
    /// and points the proxy at it.
    async fn repoint(&self, managed: &Managed, proxy: &FaultProxy) -> anyhow::Result<()> {
        let (id, port) = (managed.id.clone(), managed.port);
        let addr = on_docker(async move { host_addr(&docker().await?, &id, port).await }).await?;
        proxy.set_upstream(addr);
        Ok(())
    }
}

impl Drop for PrivateInfra {
    fn drop(&mut self) {
        // Stop forwarding first so clients see the servers vanish at once.
        self.postgres_proxy.take();
        self.rabbitmq_proxy.take();
        remove_blocking(vec![self.postgres.id.clone(), self.rabbitmq.id.clone()]);
    }
}

fn proxy(slot: &Option<FaultProxy>) -> &FaultProxy {
    slot.as_ref()
        .unwrap_or_else(|| unreachable!("PrivateInfra used before it was built"))
}

// ---------------------------------------------------------------------------------------
// Shared pair
// ---------------------------------------------------------------------------------------

async fn start_shared() -> anyhow::Result<Infra> {
    let database_url = non_empty_env(ENV_DATABASE_URL);
    let amqp_url = non_empty_env(ENV_AMQP_URL);
    match (database_url, amqp_url) {
        (Some(database_url), Some(amqp_url)) => {
            let infra = external_infra(&database_url, &amqp_url)?;
            wait_for_postgres(&infra.admin_database_url(), Duration::from_secs(10)).await?;
            wait_for_rabbitmq(&infra.amqp_url(), Duration::from_secs(10)).await?;
            tracing::info!(postgres = %infra.postgres, rabbitmq = %infra.rabbitmq, "using external test servers");
            Ok(infra)
        }
        (Some(_), None) | (None, Some(_)) => bail!(
            "set both {ENV_DATABASE_URL} and {ENV_AMQP_URL} to use running servers, or neither \
             to start containers"
        ),
        (None, None) => {
            let opts = InfraOptions::default();
            let infra = on_docker(async move {
                let (postgres, rabbitmq) = start_pair(opts, "shared").await?;
                let infra = container_infra(postgres.host_addr, rabbitmq.host_addr)?;
                wait_for_postgres(&infra.admin_database_url(), CONNECT_TIMEOUT).await?;
                wait_for_rabbitmq(&infra.amqp_url(), CONNECT_TIMEOUT).await?;
                Ok(infra)
            })
            .await?;
            tracing::info!(postgres = %infra.postgres, rabbitmq = %infra.rabbitmq, "shared test infrastructure ready");
            Ok(infra)
        }
    }
}

/// Starts PostgreSQL and RabbitMQ in parallel; if one fails, removes the other.
async fn start_pair(opts: InfraOptions, scope: &'static str) -> anyhow::Result<(Started, Started)> {
    let docker = docker().await?;
    // Images first, so a missing one fails before any container is started.
    tokio::try_join!(
        ensure_image(&docker, &opts.postgres_image),
        ensure_image(&docker, &opts.rabbitmq_image),
    )?;
    // `join!`, not `try_join!`: cancelling a start while its create request is in flight
    // would leave a container whose id we never learn (the exit hook still finds it by
    // label, but a failed start should not leave half a pair running until then).
    let (postgres, rabbitmq) = tokio::join!(
        start_container(&docker, postgres_spec(&opts, scope)),
        start_container(&docker, rabbitmq_spec(&opts, scope)),
    );
    match (postgres, rabbitmq) {
        (Ok(postgres), Ok(rabbitmq)) => Ok((postgres, rabbitmq)),
        (Ok(one), Err(err)) | (Err(err), Ok(one)) => {
            remove_containers(&docker, std::slice::from_ref(&one.id)).await;
            Err(err)
        }
        (Err(err), Err(_)) => Err(err),
    }
}

/// An [`Infra`] for containers (or proxies) reachable at the given addresses.
fn container_infra(postgres: SocketAddr, rabbitmq: SocketAddr) -> anyhow::Result<Infra> {
    let admin_url = Url::parse(&format!("postgres://{USER}:{PASSWORD}@{postgres}/postgres"))
        .context("building the PostgreSQL admin URL")?;
    Ok(Infra {
        admin_url,
        amqp_url: format!("amqp://{USER}:{PASSWORD}@{rabbitmq}/%2f"),
        postgres,
        rabbitmq,
    })
}

/// An [`Infra`] for servers given by URL.
fn external_infra(database_url: &str, amqp_url: &str) -> anyhow::Result<Infra> {
    let admin_url = Url::parse(database_url)
        .with_context(|| format!("{ENV_DATABASE_URL} is not a valid URL"))?;
    let amqp =
        Url::parse(amqp_url).with_context(|| format!("{ENV_AMQP_URL} is not a valid URL"))?;
    let default_amqp_port = if amqp.scheme() == "amqps" {
        5671
    } else {
        RABBITMQ_PORT
    };
    Ok(Infra {
        postgres: resolve(&admin_url, POSTGRES_PORT, ENV_DATABASE_URL)?,
        rabbitmq: resolve(&amqp, default_amqp_port, ENV_AMQP_URL)?,
        admin_url,
        amqp_url: amqp_url.to_owned(),
    })
}

fn resolve(url: &Url, default_port: u16, var: &str) -> anyhow::Result<SocketAddr> {
    let host = url
        .host_str()
        .with_context(|| format!("{var} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = url.port().unwrap_or(default_port);
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("{var}: cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{var}: {host} has no address"))
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

fn image_from_env(name: &str, default: &str) -> String {
    non_empty_env(name).unwrap_or_else(|| default.to_owned())
}

// ---------------------------------------------------------------------------------------
// Readiness probes
// ---------------------------------------------------------------------------------------

/// Retries a real PostgreSQL connection + `SELECT 1` until it works.
async fn wait_for_postgres(url: &str, timeout: Duration) -> anyhow::Result<()> {
    // Scoped: its blanket `load`/`execute` would shadow inherent methods elsewhere.
    use diesel_async::RunQueryDsl as _;
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut conn = AsyncPgConnection::establish(url).await?;
            diesel::sql_query("SELECT 1").execute(&mut conn).await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) if Instant::now() >= deadline => {
                return Err(err.context(format!(
                    "PostgreSQL did not accept connections within {timeout:?}"
                )));
            }
            Err(_) if Instant::now() >= deadline => {
                bail!("PostgreSQL did not answer within {timeout:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Retries a real AMQP connection until it works, then closes it.
async fn wait_for_rabbitmq(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let conn =
                lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
            let _ = conn.close(200, "readiness probe".into()).await;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) if Instant::now() >= deadline => {
                return Err(err.context(format!(
                    "RabbitMQ did not accept AMQP connections within {timeout:?}"
                )));
            }
            Err(_) if Instant::now() >= deadline => {
                bail!("RabbitMQ did not answer within {timeout:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Docker
// ---------------------------------------------------------------------------------------

/// The never-dropped runtime every Docker operation runs on (see the module docs).
fn docker_runtime() -> anyhow::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("vote-testkit-docker")
                .enable_all()
                .build()
                .map_err(|err| format!("cannot start the Docker runtime: {err}"))
        })
        .as_ref()
        .map_err(|msg| anyhow!("{msg}"))
}

/// Runs `fut` on the Docker runtime and waits for it from any runtime.
async fn on_docker<T, F>(fut: F) -> anyhow::Result<T>
where
    F: Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    docker_runtime()?
        .spawn(fut)
        .await
        .map_err(|err| anyhow!("Docker task failed: {err}"))?
}

/// The process's Docker client: connected, version-negotiated, stale containers reaped.
/// Call only on the Docker runtime. A failure is remembered.
async fn docker() -> anyhow::Result<Docker> {
    static DOCKER: tokio::sync::OnceCell<Result<Docker, String>> =
        tokio::sync::OnceCell::const_new();
    DOCKER
        .get_or_init(|| async { connect_docker().await.map_err(|err| format!("{err:#}")) })
        .await
        .clone()
        .map_err(|msg| anyhow!("{msg}"))
}

async fn connect_docker() -> anyhow::Result<Docker> {
    let docker = testcontainers::core::client::docker_client_instance()
        .await
        .map_err(|err| anyhow!(no_docker_message(&err.to_string())))?;
    match tokio::time::timeout(Duration::from_secs(10), docker.ping()).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => bail!(no_docker_message(&err.to_string())),
        Err(_) => bail!(no_docker_message("no answer within 10 s")),
    }
    // The engine may be older than bollard's default API version (1.53).
    let docker = docker
        .negotiate_version()
        .await
        .context("negotiating the Docker API version")?;
    register_atexit();
    if let Err(err) = reap_stale(&docker).await {
        tracing::warn!(error = %format!("{err:#}"), "could not remove stale test containers");
    }
    Ok(docker)
}

fn no_docker_message(err: &str) -> String {
    let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "the default socket".to_owned());
    format!(
        "Docker is not reachable ({host}): {err}.\n\
         The tests need PostgreSQL and RabbitMQ. Either start Docker (and make sure this user \
         may use it), or point the tests at running servers by setting both\n  \
         {ENV_DATABASE_URL}=postgres://votes:votes@127.0.0.1:5432/postgres\n  \
         {ENV_AMQP_URL}=amqp://votes:votes@127.0.0.1:5672/%2f"
    )
}

fn missing_image_message(image: &str, err: &str) -> String {
    format!(
        "image `{image}` is not available locally and could not be pulled: {err}.\n\
         Without access to a registry, build the offline images with `make images`; \
         `make test` then picks them up (it sets {ENV_POSTGRES_IMAGE}={OFFLINE_POSTGRES_IMAGE} \
         and {ENV_RABBITMQ_IMAGE}={OFFLINE_RABBITMQ_IMAGE}). Or set {ENV_DATABASE_URL} and \
         {ENV_AMQP_URL} to use running servers."
    )
}

/// What to start and how to tell it is ready.
struct ContainerSpec {
    role: &'static str,
    scope: &'static str,
    image: String,
    env: Vec<String>,
    cmd: Option<Vec<String>>,
    port: u16,
    ready_line: &'static str,
    /// How often `ready_line` must appear (PostgreSQL's init runs a temporary server that
    /// prints it once before the real one does).
    ready_count: usize,
}

fn postgres_spec(opts: &InfraOptions, scope: &'static str) -> ContainerSpec {
    let mut cmd = vec![
        "postgres".to_owned(),
        "-c".to_owned(),
        format!("max_connections={}", opts.max_connections),
    ];
    if !opts.fsync {
        for setting in [
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
        ] {
            cmd.push("-c".to_owned());
            cmd.push(setting.to_owned());
        }
    }
    for setting in &opts.postgres_settings {
        cmd.push("-c".to_owned());
        cmd.push(setting.clone());
    }
    ContainerSpec {
        role: "postgres",
        scope,
        image: opts.postgres_image.clone(),
        env: vec![
            format!("POSTGRES_USER={USER}"),
            format!("POSTGRES_PASSWORD={PASSWORD}"),
            format!("POSTGRES_DB={USER}"),
        ],
        cmd: Some(cmd),
        port: POSTGRES_PORT,
        ready_line: POSTGRES_READY_LINE,
        ready_count: 2,
    }
}

fn rabbitmq_spec(opts: &InfraOptions, scope: &'static str) -> ContainerSpec {
    ContainerSpec {
        role: "rabbitmq",
        scope,
        image: opts.rabbitmq_image.clone(),
        env: vec![
            format!("RABBITMQ_DEFAULT_USER={USER}"),
            format!("RABBITMQ_DEFAULT_PASS={PASSWORD}"),
        ],
        cmd: None,
        port: RABBITMQ_PORT,
        ready_line: RABBITMQ_READY_LINE,
        ready_count: 1,
    }
}

/// A started container and where its port is published.
struct Started {
    id: String,
    host_addr: SocketAddr,
}

/// Creates, starts and waits for a container (whose image must exist, see [`ensure_image`]).
async fn start_container(docker: &Docker, spec: ContainerSpec) -> anyhow::Result<Started> {
    let pid = std::process::id();
    let labels = HashMap::from([
        (LABEL_TEST.to_owned(), "1".to_owned()),
        (LABEL_PID.to_owned(), pid.to_string()),
        (LABEL_HOST.to_owned(), hostname()),
        (LABEL_ROLE.to_owned(), spec.role.to_owned()),
        (LABEL_SCOPE.to_owned(), spec.scope.to_owned()),
    ]);
    let port_key = format!("{}/tcp", spec.port);
    // Publish on loopback only when Docker runs here: the servers use a well-known
    // password. With a remote engine the port must be reachable from this host.
    let bind_ip = if docker_is_local() {
        "127.0.0.1"
    } else {
        "0.0.0.0"
    };
    let host_config = HostConfig {
        port_bindings: Some(HashMap::from([(
            port_key.clone(),
            Some(vec![PortBinding {
                host_ip: Some(bind_ip.to_owned()),
                host_port: Some(String::new()),
            }]),
        )])),
        // PostgreSQL's parallel queries use /dev/shm; Docker's 64 MiB default is tight.
        shm_size: Some(256 * 1024 * 1024),
        ..Default::default()
    };
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        env: Some(spec.env.clone()),
        cmd: spec.cmd.clone(),
        labels: Some(labels),
        exposed_ports: Some(vec![port_key]),
        host_config: Some(host_config),
        ..Default::default()
    };
    let name = format!(
        "vote-test-{pid}-{}-{:08x}",
        spec.role,
        rand::random::<u32>()
    );
    // Before the request: if this future is cancelled mid-request, the container exists
    // and only its labels can find it.
    CREATED_ANY.store(true, Ordering::SeqCst);
    let created = docker
        .create_container(
            Some(CreateContainerOptionsBuilder::new().name(&name).build()),
            body,
        )
        .await
        .with_context(|| format!("creating the {} container from `{}`", spec.role, spec.image))?;
    let id = created.id;
    let started = async {
        docker
            .start_container(&id, None)
            .await
            .with_context(|| format!("starting the {} container {name}", spec.role))?;
        wait_for_log(docker, &id, &spec).await?;
        host_addr(docker, &id, spec.port).await
    }
    .await;
    match started {
        Ok(host_addr) => {
            tracing::info!(role = spec.role, image = %spec.image, container = %name, %host_addr, "container ready");
            Ok(Started { id, host_addr })
        }
        Err(err) => {
            remove_containers(docker, std::slice::from_ref(&id)).await;
            Err(err)
        }
    }
}

/// Makes sure `image` exists locally, pulling it if it does not.
async fn ensure_image(docker: &Docker, image: &str) -> anyhow::Result<()> {
    match docker.inspect_image(image).await {
        Ok(_) => return Ok(()),
        Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(err) => return Err(err).with_context(|| format!("inspecting image `{image}`")),
    }
    let (name, tag) = split_image(image);
    tracing::info!(image, "image not found locally, pulling it");
    let options = CreateImageOptionsBuilder::new()
        .from_image(name)
        .tag(tag)
        .build();
    let mut pull = docker.create_image(Some(options), None, None);
    while let Some(progress) = pull.next().await {
        if let Err(err) = progress {
            bail!(missing_image_message(image, &err.to_string()));
        }
    }
    // Some engines end the stream without an error item even though nothing was pulled.
    docker
        .inspect_image(image)
        .await
        .map(|_| ())
        .map_err(|err| anyhow!(missing_image_message(image, &err.to_string())))
}

/// Splits `name:tag` at the last ':' (a ':' followed by a '/' belongs to a registry port).
fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

/// Follows the container's logs until `spec.ready_line` appeared `spec.ready_count` times.
async fn wait_for_log(docker: &Docker, id: &str, spec: &ContainerSpec) -> anyhow::Result<()> {
    let options = LogsOptionsBuilder::new()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .build();
    let mut logs = docker.logs(id, Some(options));
    let mut seen = String::new();
    let follow = async {
        while let Some(frame) = logs.next().await {
            let frame = frame.with_context(|| format!("reading the {} logs", spec.role))?;
            seen.push_str(&String::from_utf8_lossy(&frame.into_bytes()));
            if seen.matches(spec.ready_line).count() >= spec.ready_count {
                return Ok(());
            }
        }
        Err(anyhow!("the container exited before it was ready"))
    };
    let result = tokio::time::timeout(STARTUP_TIMEOUT, follow)
        .await
        .unwrap_or_else(|_| {
            Err(anyhow!(
                "it did not print {:?} {} time(s) within {STARTUP_TIMEOUT:?}",
                spec.ready_line,
                spec.ready_count
            ))
        });
    result.with_context(|| {
        let tail: Vec<&str> = seen.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "{} container `{}` did not become ready; last log lines:\n{}",
            spec.role,
            spec.image,
            tail.join("\n")
        )
    })
}

/// The host address of the container's published `port`.
async fn host_addr(docker: &Docker, id: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let key = format!("{port}/tcp");
    // Right after a start the mapping can lag for a moment.
    for _ in 0..50 {
        let inspect = docker
            .inspect_container(id, None)
            .await
            .with_context(|| format!("inspecting container {id}"))?;
        let host_port = inspect
            .network_settings
            .and_then(|settings| settings.ports)
            .and_then(|mut ports| ports.remove(&key).flatten())
            .and_then(|bindings| {
                bindings
                    .into_iter()
                    .find_map(|binding| binding.host_port?.parse::<u16>().ok())
            });
        if let Some(host_port) = host_port {
            return Ok(SocketAddr::new(docker_host_ip()?, host_port));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("container {id} publishes no host port for {key}")
}

/// Sends `signal`, waits until the container exited, and falls back to SIGKILL after 30 s.
/// Returns the moment Docker's kill request returned. (A signal-less `docker stop` would use the
/// image's STOPSIGNAL, which may differ between the official and the offline images; the
/// engine's stop `signal` needs API 1.42.)
async fn stop_gracefully(docker: &Docker, id: &str, signal: &str) -> anyhow::Result<Instant> {
    docker
        .kill_container(
            id,
            Some(KillContainerOptionsBuilder::new().signal(signal).build()),
        )
        .await
        .with_context(|| format!("sending {signal} to container {id}"))?;
    let delivered = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let inspect = docker
            .inspect_container(id, None)
            .await
            .with_context(|| format!("inspecting container {id}"))?;
        if !inspect
            .state
            .and_then(|state| state.running)
            .unwrap_or(false)
        {
            return Ok(delivered);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(
        container = id,
        signal,
        "container did not stop in 30 s; killing it"
    );
    docker
        .stop_container(id, Some(StopContainerOptionsBuilder::new().t(0).build()))
        .await
        .with_context(|| format!("stopping container {id}"))?;
    Ok(delivered)
}

/// Whether the engine runs on this host (unix socket or a loopback TCP address).
fn docker_is_local() -> bool {
    docker_host_ip().map(|ip| ip.is_loopback()).unwrap_or(true)
}

/// The IP published container ports are reachable at: the engine's host for a
/// `tcp://`/`http(s)://` `DOCKER_HOST`, else loopback.
fn docker_host_ip() -> anyhow::Result<IpAddr> {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let Some(host) = non_empty_env("DOCKER_HOST") else {
        return Ok(loopback);
    };
    let Ok(url) = Url::parse(&host) else {
        return Ok(loopback);
    };
    if !matches!(url.scheme(), "tcp" | "http" | "https") {
        return Ok(loopback);
    }
    Ok(resolve(&url, 2375, "DOCKER_HOST")?.ip())
}

/// Force-removes containers (and their anonymous volumes); logs failures.
async fn remove_containers(docker: &Docker, ids: &[String]) {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    for id in ids {
        match docker.remove_container(id, Some(options.clone())).await {
            Ok(())
            | Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(err) => tracing::warn!(container = %id, error = %err, "could not remove container"),
        }
    }
}

/// Runs `job` on the Docker runtime from synchronous code (`Drop`, exit) and waits for it
/// at most [`REMOVE_TIMEOUT`]. Returns the job's verdict, or `false` on timeout.
fn block_on_docker<F>(job: F) -> bool
where
    F: Future<Output = bool> + Send + 'static,
{
    let Ok(runtime) = docker_runtime() else {
        return false;
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = done_tx.send(job.await);
    });
    done_rx.recv_timeout(REMOVE_TIMEOUT).unwrap_or(false)
}

/// Removes the given containers from synchronous code (see [`block_on_docker`]).
fn remove_blocking(ids: Vec<String>) -> bool {
    block_on_docker(async move {
        let Ok(docker) = docker().await else {
            return false;
        };
        remove_containers(&docker, &ids).await;
        true
    })
}

/// Removes this host's labelled containers whose test process no longer exists.
async fn reap_stale(docker: &Docker) -> anyhow::Result<()> {
    let filters = HashMap::from([("label", vec![format!("{LABEL_TEST}=1")])]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let containers = docker
        .list_containers(Some(options))
        .await
        .context("listing test containers")?;
    let me = std::process::id();
    let host = hostname();
    let stale: Vec<String> = containers
        .into_iter()
        .filter_map(|container| {
            let labels = container.labels.unwrap_or_default();
            let pid: u32 = labels.get(LABEL_PID)?.parse().ok()?;
            let same_host = labels.get(LABEL_HOST) == Some(&host);
            (same_host && pid != me && !pid_alive(pid)).then_some(container.id?)
        })
        .collect();
    if !stale.is_empty() {
        tracing::info!(
            count = stale.len(),
            "removing stale test containers of dead processes"
        );
        remove_containers(docker, &stale).await;
    }
    Ok(())
}

/// The host name, to tell this machine's test containers from those of other machines (or
/// other PID namespaces) sharing the engine.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Whether a process with this pid exists (conservatively `true` when unsure).
#[cfg(unix)]
#[allow(unsafe_code)]
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 1 {
        return true;
    }
    // SAFETY: `kill` with signal 0 delivers nothing; it only checks that the pid exists and
    // may be signalled. It takes plain integers and touches no memory of ours. `pid > 1`
    // rules out the special meanings of 0 and -1 (process group, every process).
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(not(unix))]
fn pid_alive(_pid: u32) -> bool {
    true
}

// ---------------------------------------------------------------------------------------
// Removal at process exit
// ---------------------------------------------------------------------------------------

/// Set before the first container is created: only then is there anything to remove at exit.
static CREATED_ANY: AtomicBool = AtomicBool::new(false);
static KEEP_AT_EXIT: AtomicBool = AtomicBool::new(false);

/// Leaves this process's containers running when it exits (for `vote-tools demo
/// --keep`). They are still removed by the next test process's stale-container sweep,
/// or by `make clean-containers`.
pub fn keep_at_exit() {
    KEEP_AT_EXIT.store(true, Ordering::SeqCst);
}

/// Label filters that select exactly the containers of this process on this host.
fn own_label_filters() -> Vec<String> {
    vec![
        format!("{LABEL_TEST}=1"),
        format!("{LABEL_PID}={}", std::process::id()),
        format!("{LABEL_HOST}={}", hostname()),
    ]
}

/// Removes every container of this process, found by label (so a container whose create
/// request was cancelled before its id came back is found too).
async fn remove_own(docker: &Docker) -> anyhow::Result<()> {
    let filters = HashMap::from([("label", own_label_filters())]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let ids: Vec<String> = docker
        .list_containers(Some(options))
        .await
        .context("listing this process's test containers")?
        .into_iter()
        .filter_map(|container| container.id)
        .collect();
    remove_containers(docker, &ids).await;
    Ok(())
}

/// The `docker` CLI fallback of [`remove_own`], for when the Docker runtime cannot help.
fn remove_own_with_cli() {
    let mut list = std::process::Command::new("docker");
    list.args(["ps", "-aq"]);
    for filter in own_label_filters() {
        list.arg("--filter").arg(format!("label={filter}"));
    }
    let Ok(output) = list.stderr(std::process::Stdio::null()).output() else {
        return;
    };
    let listed = String::from_utf8_lossy(&output.stdout);
    let ids: Vec<&str> = listed.split_whitespace().collect();
    if ids.is_empty() {
        return;
    }
    let _ = std::process::Command::new("docker")
        .args(["rm", "-fv"])
        .args(&ids)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Registers [`remove_at_exit`] with the C runtime, once.
#[cfg(unix)]
#[allow(unsafe_code)]
fn register_atexit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `remove_at_exit` is an `extern "C" fn()` taking no arguments, as `atexit`
        // requires; it never unwinds (it catches panics) and only uses process-global state
        // that stays valid until the process ends.
        let rc = unsafe { libc::atexit(remove_at_exit) };
        if rc != 0 {
            tracing::warn!("atexit registration failed: test containers will leak");
        }
    });
}

#[cfg(not(unix))]
fn register_atexit() {}

/// Removes every container this process started and did not remove yet (the shared pair,
/// leaked private pairs): through the Docker runtime (same client and configuration that
/// created them), else with the `docker` CLI.
extern "C" fn remove_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        if !CREATED_ANY.load(Ordering::SeqCst) || KEEP_AT_EXIT.load(Ordering::SeqCst) {
            return;
        }
        let removed = block_on_docker(async {
            match docker().await {
                Ok(docker) => remove_own(&docker).await.is_ok(),
                Err(_) => false,
            }
        });
        if !removed {
            remove_own_with_cli();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_split_at_the_last_colon() {
        assert_eq!(split_image("postgres:17"), ("postgres", "17"));
        assert_eq!(
            split_image("vote-aggregator/rabbitmq:4.0-offline"),
            ("vote-aggregator/rabbitmq", "4.0-offline")
        );
        assert_eq!(
            split_image("registry:5000/postgres"),
            ("registry:5000/postgres", "latest")
        );
        assert_eq!(
            split_image("registry:5000/postgres:17"),
            ("registry:5000/postgres", "17")
        );
    }

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
        let infra = external_infra(
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
