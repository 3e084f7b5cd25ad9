//! A server pair owned by one test, behind fault proxies, that the test may stop, start,
//! pause, kill and restart. (With `InfraOptions::host_network` the pair listens on fixed
//! loopback ports instead and has no proxies: for benchmarks.)
//!
//! Lifecycle operations go through testcontainers' `ContainerAsync` (`stop_with_timeout`,
//! `start`, `pause`, `unpause`, `rm`, `get_host_port_ipv4`). Docker maps a new host port on
//! every start, so each server sits behind a [`FaultProxy`] on a fixed local address that
//! is re-pointed after each start: the URLs a test got stay valid. Signals, state and
//! log-since queries are `engine` calls (testcontainers has none).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use super::containers::{Container, host_addr, remove};
use super::engine::{self, block_on_docker, on_docker};
use super::probes::{wait_for_postgres, wait_for_rabbitmq};
use super::shared::{container_infra, start_pair};
use super::{CONNECT_TIMEOUT, ContainerState, Infra, InfraOptions, init_test_logging};
use crate::proxy::FaultProxy;

/// Seconds `docker stop` waits after the image's STOPSIGNAL (SIGINT for PostgreSQL: fast
/// shutdown; SIGTERM for RabbitMQ) before it sends SIGKILL.
const STOP_TIMEOUT_SECS: i32 = 30;

/// Starts a separate PostgreSQL + RabbitMQ pair for a test that stops, restarts or pauses
/// servers. Requires Docker (external servers cannot be restarted).
///
/// Both servers sit behind a [`FaultProxy`] on a fixed local port, so the URLs stay the
/// same across restarts. The proxies run on the calling Tokio runtime: keep the
/// `PrivateInfra` inside that runtime's lifetime.
pub async fn start_private(opts: InfraOptions) -> anyhow::Result<PrivateInfra> {
    init_test_logging();
    let host_network = opts.host_network;
    let pair = on_docker(start_pair(opts, "private")).await?;
    let mut private = PrivateInfra {
        infra: None,
        postgres: Managed::new(
            pair.postgres.container,
            pair.postgres_image,
            super::POSTGRES_PORT,
        ),
        rabbitmq: Managed::new(
            pair.rabbitmq.container,
            pair.rabbitmq_image,
            super::RABBITMQ_PORT,
        ),
        postgres_proxy: None,
        rabbitmq_proxy: None,
    };
    // From here on, `private`'s Drop removes both containers if anything fails.
    let infra = if host_network {
        // Fixed loopback ports across restarts: nothing to re-point, no proxy in between.
        container_infra(pair.postgres.host_addr, pair.rabbitmq.host_addr)?
    } else {
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let pg_proxy = FaultProxy::start(loopback, pair.postgres.host_addr).await?;
        let mq_proxy = FaultProxy::start(loopback, pair.rabbitmq.host_addr).await?;
        let infra = container_infra(pg_proxy.local_addr(), mq_proxy.local_addr())?;
        private.postgres_proxy = Some(pg_proxy);
        private.rabbitmq_proxy = Some(mq_proxy);
        infra
    };
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

/// One container of a private pair, its image and the container port its proxy forwards to.
struct Managed {
    /// `None` only once `Drop` took it (to drop it on the Docker runtime).
    container: Option<Arc<Container>>,
    id: String,
    image: String,
    port: u16,
}

impl Managed {
    fn new(container: Arc<Container>, image: String, port: u16) -> Self {
        Managed {
            id: container.id().to_owned(),
            container: Some(container),
            image,
            port,
        }
    }

    /// A handle to move into a Docker-runtime task.
    fn handle(&self) -> Arc<Container> {
        self.container
            .clone()
            .unwrap_or_else(|| unreachable!("PrivateInfra used after drop"))
    }
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

    /// Runs `cmd` (an argv) inside the RabbitMQ container and returns its output.
    ///
    /// # Errors
    /// When Docker fails or the command exits non-zero.
    pub async fn exec_in_rabbitmq(&self, cmd: &[&str]) -> anyhow::Result<String> {
        let id = self.rabbitmq.id.clone();
        let cmd: Vec<String> = cmd.iter().map(|s| (*s).to_owned()).collect();
        on_docker(async move { super::exec::exec_in_container(&id, cmd, None).await }).await
    }

    /// The PostgreSQL image this pair runs.
    pub fn postgres_image(&self) -> &str {
        &self.postgres.image
    }

    /// The RabbitMQ image this pair runs.
    pub fn rabbitmq_image(&self) -> &str {
        &self.rabbitmq.image
    }

    /// Stops PostgreSQL with a fast shutdown (the image's STOPSIGNAL, SIGINT: clients are
    /// disconnected, open transactions roll back) and waits until the container has exited.
    pub async fn stop_postgres(&self) -> anyhow::Result<()> {
        stop(&self.postgres, "PostgreSQL").await
    }

    /// Starts PostgreSQL again after [`PrivateInfra::stop_postgres`], re-points the proxy at
    /// the (possibly new) host port and waits until it accepts connections.
    pub async fn start_postgres(&self) -> anyhow::Result<()> {
        start_again(&self.postgres, self.postgres_proxy.as_ref(), "PostgreSQL").await?;
        wait_for_postgres(&self.admin_database_url(), CONNECT_TIMEOUT).await
    }

    /// Stops and starts PostgreSQL (see [`PrivateInfra::stop_postgres`]).
    pub async fn restart_postgres(&self) -> anyhow::Result<()> {
        self.stop_postgres().await?;
        self.start_postgres().await
    }

    /// Freezes PostgreSQL (`docker pause`): connections stay open but nothing answers.
    pub async fn pause_postgres(&self) -> anyhow::Result<()> {
        let container = self.postgres.handle();
        on_docker(async move {
            container
                .pause()
                .await
                .with_context(|| format!("pausing PostgreSQL container {}", container.id()))
        })
        .await
    }

    /// Resumes PostgreSQL after [`PrivateInfra::pause_postgres`].
    pub async fn unpause_postgres(&self) -> anyhow::Result<()> {
        let container = self.postgres.handle();
        on_docker(async move {
            container
                .unpause()
                .await
                .with_context(|| format!("unpausing PostgreSQL container {}", container.id()))
        })
        .await
    }

    /// Stops RabbitMQ (the image's STOPSIGNAL, SIGTERM: graceful) and waits until the
    /// container has exited.
    pub async fn stop_rabbitmq(&self) -> anyhow::Result<()> {
        stop(&self.rabbitmq, "RabbitMQ").await
    }

    /// Starts RabbitMQ again after [`PrivateInfra::stop_rabbitmq`], re-points the proxy
    /// and waits until it accepts AMQP connections.
    pub async fn start_rabbitmq(&self) -> anyhow::Result<()> {
        start_again(&self.rabbitmq, self.rabbitmq_proxy.as_ref(), "RabbitMQ").await?;
        wait_for_rabbitmq(&self.amqp_url(), CONNECT_TIMEOUT).await
    }

    /// Stops and starts RabbitMQ and waits until it accepts AMQP connections. Durable
    /// queues and persistent messages survive.
    pub async fn restart_rabbitmq(&self) -> anyhow::Result<()> {
        self.stop_rabbitmq().await?;
        self.start_rabbitmq().await
    }

    /// Kills RabbitMQ abruptly (SIGKILL: no clean shutdown, like a crashed node) and waits
    /// until the container has exited. Start it again with [`PrivateInfra::start_rabbitmq`].
    pub async fn kill_rabbitmq(&self) -> anyhow::Result<()> {
        let id = self.rabbitmq.id.clone();
        on_docker(async move { engine::kill(&id, "SIGKILL").await.map(drop) }).await
    }

    /// Kills PostgreSQL abruptly (SIGKILL to the container's main process, the postmaster:
    /// every backend dies with it and whatever sat in its shared memory, WAL buffers
    /// included, is gone, like a crashed server) and waits until the container has exited.
    /// [`PrivateInfra::start_postgres`] then starts it again, and it runs crash recovery
    /// from its WAL. Returns the moment Docker's kill returned (the signal delivered).
    ///
    /// # Errors
    /// When Docker refuses or the container does not exit.
    pub async fn kill_postgres(&self) -> anyhow::Result<Instant> {
        let id = self.postgres.id.clone();
        on_docker(async move { engine::kill(&id, "SIGKILL").await }).await
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
        on_docker(async move { engine::container_state(&id).await }).await
    }

    /// The log (stdout and stderr) the container `id` wrote since `since` (a UNIX time in
    /// seconds; Docker's resolution), across restarts.
    ///
    /// # Errors
    /// When Docker cannot read the log.
    pub async fn container_log_since(&self, id: &str, since: i64) -> anyhow::Result<String> {
        let id = id.to_owned();
        let since = i32::try_from(since).context("log start time out of range")?;
        on_docker(async move { engine::log_since(&id, since).await }).await
    }
}

/// `docker stop` with [`STOP_TIMEOUT_SECS`]; returns once the container has exited.
async fn stop(managed: &Managed, what: &'static str) -> anyhow::Result<()> {
    let container = managed.handle();
    on_docker(async move {
        container
            .stop_with_timeout(Some(STOP_TIMEOUT_SECS))
            .await
            .with_context(|| format!("stopping {what} container {}", container.id()))
    })
    .await
}

/// `docker start`, then points the proxy (if any: on the host network the port stays)
/// at the container's new host port.
async fn start_again(
    managed: &Managed,
    proxy: Option<&FaultProxy>,
    what: &'static str,
) -> anyhow::Result<()> {
    let container = managed.handle();
    let port = managed.port;
    let repoint = proxy.is_some();
    let addr = on_docker(async move {
        container
            .start()
            .await
            .with_context(|| format!("starting {what} container {} again", container.id()))?;
        if repoint {
            host_addr(&container, port).await.map(Some)
        } else {
            Ok(None)
        }
    })
    .await?;
    if let (Some(proxy), Some(addr)) = (proxy, addr) {
        proxy.set_upstream(addr);
    }
    Ok(())
}

impl Drop for PrivateInfra {
    fn drop(&mut self) {
        // Stop forwarding first so clients see the servers vanish at once.
        self.postgres_proxy.take();
        self.rabbitmq_proxy.take();
        // Moved into the job: the last handle must be dropped on the Docker runtime.
        let containers: Vec<Arc<Container>> = [
            self.postgres.container.take(),
            self.rabbitmq.container.take(),
        ]
        .into_iter()
        .flatten()
        .collect();
        block_on_docker(async move {
            for container in containers {
                remove(container).await;
            }
            true
        });
    }
}

fn proxy(slot: &Option<FaultProxy>) -> &FaultProxy {
    slot.as_ref().unwrap_or_else(|| {
        unreachable!(
            "this PrivateInfra has no fault proxies: it runs on the host network \
             (InfraOptions::host_network)"
        )
    })
}
