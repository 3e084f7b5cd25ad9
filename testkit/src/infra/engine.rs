//! The Docker side that testcontainers does not cover: the private "docker runtime" every
//! Docker operation runs on, and the few engine calls testcontainers has no API for.
//!
//! # The docker runtime
//! `#[tokio::test]` builds a fresh runtime per test, and the hyper client inside bollard
//! (and so inside every testcontainers `ContainerAsync`, which shares one lazily created
//! client per process) keeps its pooled connections and log followers as tasks on the
//! runtime that opened them. A container started by one test and used by the next would
//! talk through connections whose runtime is gone. And `ContainerAsync`'s `Drop` needs a
//! current runtime (`Handle::current()`), which exit hooks and plain `Drop`s do not have.
//! So every Docker operation, testcontainers' included, runs on one private, never-dropped
//! multi-thread runtime; tests only await its join handles, and the last clone of every
//! container handle is dropped there.
//!
//! # What stays on bollard (the client testcontainers re-exports and configures)
//! - signals: `ContainerAsync` can stop (image STOPSIGNAL, then SIGKILL after a timeout)
//!   but not send one signal; a SIGKILL sent from inside the container with `exec` does
//!   nothing, since the kernel ignores it for the namespace's init process;
//! - state queries: start time, pid and exit code (`ContainerAsync` only has
//!   `is_running`/`exit_code`);
//! - a log read with `since`, stdout and stderr interleaved (`ContainerAsync::stdout` and
//!   `stderr` read from the container's creation, as separate streams);
//! - image presence, listing by label and removal by id (for containers whose handle is
//!   gone: leaked pairs, dead processes, the exit hook).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::StreamExt as _;
use url::Url;

use super::{ContainerState, ENV_AMQP_URL, ENV_DATABASE_URL, REMOVE_TIMEOUT, cleanup};

/// The never-dropped runtime every Docker operation runs on (see the module docs).
pub(super) fn docker_runtime() -> anyhow::Result<&'static tokio::runtime::Runtime> {
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
pub(super) async fn on_docker<T, F>(fut: F) -> anyhow::Result<T>
where
    F: Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    docker_runtime()?
        .spawn(fut)
        .await
        .map_err(|err| anyhow!("Docker task failed: {err}"))?
}

/// Runs `job` on the Docker runtime from synchronous code (`Drop`, exit) and waits for it
/// at most [`REMOVE_TIMEOUT`]. Returns the job's verdict, or `false` on timeout.
pub(super) fn block_on_docker<F>(job: F) -> bool
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

/// The process's bollard client: connected, version-negotiated, exit hook registered,
/// stale containers reaped. Call only on the Docker runtime, and before the first
/// testcontainers start (so a missing engine fails with [`no_docker_message`]). A failure
/// is remembered.
pub(super) async fn docker() -> anyhow::Result<Docker> {
    static DOCKER: tokio::sync::OnceCell<Result<Docker, String>> =
        tokio::sync::OnceCell::const_new();
    DOCKER
        .get_or_init(|| async { connect_docker().await.map_err(|err| format!("{err:#}")) })
        .await
        .clone()
        .map_err(|msg| anyhow!("{msg}"))
}

async fn connect_docker() -> anyhow::Result<Docker> {
    // Same configuration as the containers' client (`DOCKER_HOST`,
    // `~/.testcontainers.properties`).
    let docker = testcontainers::core::client::docker_client_instance()
        .await
        .map_err(|err| anyhow!(no_docker_message(&err.to_string())))?;
    match tokio::time::timeout(Duration::from_secs(10), docker.ping()).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => bail!(no_docker_message(&err.to_string())),
        Err(_) => bail!(no_docker_message("no answer within 10 s")),
    }
    // bollard 0.21.1 joins each absolute request path onto its `/v1.53` base, which drops
    // the version prefix, so the engine answers every request at its own API version
    // (that is why testcontainers works against API 1.41). Negotiating keeps this client
    // right should that change.
    let docker = docker
        .negotiate_version()
        .await
        .context("negotiating the Docker API version")?;
    cleanup::register_atexit();
    if let Err(err) = cleanup::reap_stale(&docker).await {
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

/// Sends `signal` to the container's main process, waits until the container exited, and
/// falls back to a forced stop after 30 s. Returns the moment Docker's kill returned.
pub(super) async fn kill(id: &str, signal: &str) -> anyhow::Result<Instant> {
    let docker = docker().await?;
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
        if !state(&docker, id).await?.running {
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

/// What Docker reports about the container `id`.
pub(super) async fn container_state(id: &str) -> anyhow::Result<ContainerState> {
    state(&docker().await?, id).await
}

async fn state(docker: &Docker, id: &str) -> anyhow::Result<ContainerState> {
    let state = docker
        .inspect_container(id, None)
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
}

/// The log (stdout and stderr, interleaved) the container wrote since `since` (UNIX
/// seconds), across restarts.
pub(super) async fn log_since(id: &str, since: i32) -> anyhow::Result<String> {
    let options = LogsOptionsBuilder::new()
        .stdout(true)
        .stderr(true)
        .since(since)
        .build();
    let docker = docker().await?;
    let mut logs = docker.logs(id, Some(options));
    let mut text = String::new();
    while let Some(frame) = logs.next().await {
        let frame = frame.with_context(|| format!("reading the log of {id}"))?;
        text.push_str(&String::from_utf8_lossy(&frame.into_bytes()));
    }
    Ok(text)
}

/// Whether `image` exists locally.
pub(super) async fn image_exists(image: &str) -> anyhow::Result<bool> {
    match docker().await?.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(err) => Err(err).with_context(|| format!("inspecting image `{image}`")),
    }
}

/// Ids of every container (running or not) carrying all of `labels` (`key=value`).
pub(super) async fn list_labelled(
    docker: &Docker,
    labels: Vec<String>,
) -> anyhow::Result<Vec<(String, HashMap<String, String>)>> {
    let filters = HashMap::from([("label", labels)]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    Ok(docker
        .list_containers(Some(options))
        .await
        .context("listing test containers")?
        .into_iter()
        .filter_map(|container| Some((container.id?, container.labels.unwrap_or_default())))
        .collect())
}

/// Force-removes containers (and their anonymous volumes); logs failures.
pub(super) async fn remove_containers(docker: &Docker, ids: &[String]) {
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

/// Whether the engine runs on this host (unix socket or a loopback TCP address).
pub(super) fn docker_is_local() -> bool {
    docker_host_ip().map(|ip| ip.is_loopback()).unwrap_or(true)
}

/// The IP published container ports are reachable at: the engine's host for a
/// `tcp://`/`http(s)://` `DOCKER_HOST`, else loopback.
pub(super) fn docker_host_ip() -> anyhow::Result<IpAddr> {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let Some(host) = super::non_empty_env("DOCKER_HOST") else {
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

/// The socket address of `url`'s host and port (`default_port` when it has none); `var`
/// names the setting in errors.
pub(super) fn resolve(url: &Url, default_port: u16, var: &str) -> anyhow::Result<SocketAddr> {
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
