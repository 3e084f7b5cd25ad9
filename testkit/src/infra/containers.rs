//! Starting one server container with testcontainers' runner: what to run
//! ([`ContainerSpec`]), labels, port publishing, the readiness log line, and the host
//! address its port ends up on.
//!
//! Call everything here on the Docker runtime (see `engine`): the returned handle must be
//! used and finally dropped there.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use bollard::models::PortBinding;
use testcontainers::core::logs::LogFrame;
use testcontainers::core::wait::LogWaitStrategy;
use testcontainers::core::{IntoContainerPort as _, WaitFor};
use testcontainers::runners::AsyncRunner as _;
use testcontainers::{ContainerAsync, CopyTargetOptions, GenericImage, ImageExt as _};

use super::cleanup::{CREATED_ANY, own_labels};
use super::engine::{docker_host_ip, docker_is_local};
use super::images::split_image;
use super::{
    InfraOptions, LABEL_ROLE, LABEL_SCOPE, PASSWORD, POSTGRES_PORT, RABBITMQ_PORT, STARTUP_TIMEOUT,
    USER,
};

/// A server container. Shared as `Arc` so operations can run on the Docker runtime; the
/// last clone is dropped (or `rm`-ed) there too.
pub(super) type Container = ContainerAsync<GenericImage>;

const POSTGRES_READY_LINE: &str = "database system is ready to accept connections";
const RABBITMQ_READY_LINE: &str = "Server startup complete";
/// How many log lines a failed start reports.
const TAIL_LINES: usize = 30;

/// What to start and how to tell it is ready.
pub(super) struct ContainerSpec {
    pub role: &'static str,
    pub scope: &'static str,
    pub image: String,
    env: Vec<(&'static str, String)>,
    pub(super) cmd: Vec<String>,
    pub port: u16,
    ready_line: &'static str,
    /// How often `ready_line` must appear (PostgreSQL's init runs a temporary server that
    /// prints it once before the real one does).
    ready_count: usize,
    /// More container ports published on the host (see [`host_addr`]).
    extra_ports: Vec<u16>,
    /// Files copied into the container before it starts: (absolute path, contents),
    /// written mode `0644` and owned by root, so the server's own user can read them.
    files: Vec<(String, Vec<u8>)>,
    /// Replaces the image's entrypoint (then `cmd` is its arguments).
    pub(super) entrypoint: Option<&'static str>,
    /// Runs in the host's network namespace, the server listening on `127.0.0.1:<this>`
    /// (see [`ContainerSpec::on_host_network`]); `None`: its own network, `port` published.
    host_port: Option<u16>,
}

impl ContainerSpec {
    /// Runs the server in the host's network namespace on loopback port `port` (which the
    /// caller already told the server to listen on): clients connect straight to it, not
    /// through Docker's userland port proxy. Nothing is published.
    pub(super) fn on_host_network(mut self, port: u16) -> Self {
        self.host_port = Some(port);
        self
    }

    /// Sets environment variable `key` in the container.
    pub(super) fn with_env(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.env.push((key, value.into()));
        self
    }

    /// Publishes container port `port` too.
    pub(super) fn with_extra_port(mut self, port: u16) -> Self {
        self.extra_ports.push(port);
        self
    }

    /// Copies `contents` to `path` in the container before it starts.
    pub(super) fn with_file(
        mut self,
        path: impl Into<String>,
        contents: impl Into<Vec<u8>>,
    ) -> Self {
        self.files.push((path.into(), contents.into()));
        self
    }
}

pub(super) fn postgres_spec(
    opts: &InfraOptions,
    image: String,
    scope: &'static str,
) -> ContainerSpec {
    let mut settings = vec![format!("max_connections={}", opts.max_connections)];
    if !opts.fsync {
        settings.extend(
            [
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
            ]
            .map(str::to_owned),
        );
    }
    settings.extend(opts.postgres_settings.iter().cloned());
    let mut cmd = vec!["postgres".to_owned()];
    for setting in settings {
        cmd.push("-c".to_owned());
        cmd.push(setting);
    }
    ContainerSpec {
        role: "postgres",
        scope,
        image,
        env: vec![
            ("POSTGRES_USER", USER.to_owned()),
            ("POSTGRES_PASSWORD", PASSWORD.to_owned()),
            ("POSTGRES_DB", USER.to_owned()),
        ],
        cmd,
        port: POSTGRES_PORT,
        ready_line: POSTGRES_READY_LINE,
        ready_count: 2,
        extra_ports: Vec::new(),
        files: Vec::new(),
        entrypoint: None,
        host_port: None,
    }
}

pub(super) fn rabbitmq_spec(image: String, scope: &'static str) -> ContainerSpec {
    ContainerSpec {
        role: "rabbitmq",
        scope,
        image,
        env: vec![
            ("RABBITMQ_DEFAULT_USER", USER.to_owned()),
            ("RABBITMQ_DEFAULT_PASS", PASSWORD.to_owned()),
        ],
        cmd: Vec::new(),
        port: RABBITMQ_PORT,
        ready_line: RABBITMQ_READY_LINE,
        ready_count: 1,
        extra_ports: Vec::new(),
        files: Vec::new(),
        entrypoint: None,
        host_port: None,
    }
}

/// A started container and where its port is published.
pub(super) struct Started {
    pub container: Arc<Container>,
    pub host_addr: SocketAddr,
}

/// The last [`TAIL_LINES`] log lines of a container, for the error of a failed start.
#[derive(Clone, Default)]
struct LogTail(Arc<Mutex<VecDeque<String>>>);

impl LogTail {
    fn push(&self, frame: &LogFrame) {
        let Ok(mut lines) = self.0.lock() else { return };
        for line in String::from_utf8_lossy(frame.bytes()).lines() {
            if lines.len() == TAIL_LINES {
                lines.pop_front();
            }
            lines.push_back(line.to_owned());
        }
    }

    fn text(&self) -> String {
        self.0
            .lock()
            .map(|lines| lines.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

/// Creates, starts and waits for a container (its image must exist, see `images`).
pub(super) async fn start_container(spec: ContainerSpec) -> anyhow::Result<Started> {
    let (name, tag) = split_image(&spec.image);
    let container_name = format!(
        "vote-test-{}-{}-{:08x}",
        std::process::id(),
        spec.role,
        rand::random::<u32>()
    );
    let ready = WaitFor::log(
        LogWaitStrategy::stdout_or_stderr(spec.ready_line).with_times(spec.ready_count),
    );
    let tail = LogTail::default();
    let consumer = tail.clone();
    // Publish on loopback only when Docker runs here: the servers use a well-known
    // password. (testcontainers publishes on every interface.) With a remote engine the
    // port must be reachable from this host.
    let local = docker_is_local();
    let host_network = spec.host_port.is_some();
    // On the host network there is nothing to publish: the server binds loopback itself.
    let ports: Vec<u16> = match spec.host_port {
        Some(_) => Vec::new(),
        None => std::iter::once(spec.port)
            .chain(spec.extra_ports.iter().copied())
            .collect(),
    };
    let bindings: HashMap<String, Option<Vec<PortBinding>>> = ports
        .iter()
        .map(|port| {
            let binding = PortBinding {
                host_ip: Some("127.0.0.1".to_owned()),
                host_port: Some(String::new()),
            };
            (format!("{port}/tcp"), Some(vec![binding]))
        })
        .collect();
    let mut image = GenericImage::new(name, tag);
    if let Some(entrypoint) = spec.entrypoint {
        image = image.with_entrypoint(entrypoint);
    }
    for port in &ports {
        image = image.with_exposed_port(port.tcp());
    }
    let mut request = image
        .with_wait_for(ready)
        .with_container_name(&container_name)
        .with_labels(own_labels())
        .with_label(LABEL_ROLE, spec.role)
        .with_label(LABEL_SCOPE, spec.scope)
        .with_startup_timeout(STARTUP_TIMEOUT)
        // PostgreSQL's parallel queries use /dev/shm; Docker's 64 MiB default is tight.
        .with_shm_size(256 * 1024 * 1024)
        .with_log_consumer(move |frame: &LogFrame| consumer.push(frame))
        .with_host_config_modifier(move |host_config| {
            if host_network {
                host_config.network_mode = Some("host".to_owned());
                host_config.publish_all_ports = Some(false);
                host_config.port_bindings = None;
            } else if local {
                host_config.publish_all_ports = Some(false);
                host_config.port_bindings = Some(bindings.clone());
            }
        });
    for (key, value) in &spec.env {
        request = request.with_env_var(*key, value);
    }
    if !spec.cmd.is_empty() {
        request = request.with_cmd(&spec.cmd);
    }
    for (path, contents) in &spec.files {
        request = request.with_copy_to(
            CopyTargetOptions::new(path.as_str()).with_mode(0o644),
            contents.clone(),
        );
    }
    // Before the request: if it fails half-way, the container exists and only its labels
    // can find it.
    CREATED_ANY.store(true, std::sync::atomic::Ordering::SeqCst);
    // On failure testcontainers drops (and so removes) the half-started container.
    let container = request.start().await.map_err(|err| {
        anyhow!(
            "{} container `{}` did not become ready: {err}; last log lines:\n{}",
            spec.role,
            spec.image,
            tail.text()
        )
    })?;
    let container = Arc::new(container);
    let addr = match spec.host_port {
        Some(port) => Ok(SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            port,
        )),
        None => host_addr(&container, spec.port).await,
    };
    match addr {
        Ok(host_addr) => {
            tracing::info!(role = spec.role, image = %spec.image, container = %container_name, %host_addr, "container ready");
            Ok(Started {
                container,
                host_addr,
            })
        }
        Err(err) => {
            remove(container).await;
            Err(err)
        }
    }
}

/// The host address of the container's published `port` (a new one after each start).
pub(super) async fn host_addr(container: &Container, port: u16) -> anyhow::Result<SocketAddr> {
    // Right after a start the mapping can lag for a moment.
    for _ in 0..50 {
        if let Ok(host_port) = container.get_host_port_ipv4(port.tcp()).await {
            return Ok(SocketAddr::new(docker_host_ip()?, host_port));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let host_port = container
        .get_host_port_ipv4(port.tcp())
        .await
        .with_context(|| {
            format!(
                "container {} publishes no host port for {port}/tcp",
                container.id()
            )
        })?;
    Ok(SocketAddr::new(docker_host_ip()?, host_port))
}

/// Removes a container through its handle (`rm`), or by id while another clone of the
/// handle is still alive (its own drop then finds nothing to remove). Logs failures.
pub(super) async fn remove(container: Arc<Container>) {
    match Arc::try_unwrap(container) {
        Ok(container) => {
            let id = container.id().to_owned();
            if let Err(err) = container.rm().await {
                tracing::warn!(container = %id, error = %err, "could not remove container");
            }
        }
        Err(shared) => match super::engine::docker().await {
            Ok(docker) => {
                super::engine::remove_containers(&docker, &[shared.id().to_owned()]).await;
            }
            Err(err) => tracing::warn!(error = %format!("{err:#}"), "could not remove container"),
        },
    }
}
