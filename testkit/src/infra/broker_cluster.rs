//! A three-node RabbitMQ cluster owned by one test, for the broker-cluster chaos
//! scenarios: the same image as every other broker, nodes joining by name.
//!
//! How it is wired, and why:
//! - each node is a container with host name `<prefix>-<n>` and node name
//!   `rabbit@<prefix>-<n>`, one shared Erlang cookie, and a `conf.d` snippet listing the
//!   three nodes for classic config peer discovery (`cluster_formation.*`), so they form
//!   one cluster as they boot;
//! - TWO networks per node: Docker's default bridge, where its AMQP port is published
//!   on loopback (the clients' side), and a private network of this cluster, where the
//!   host names resolve and Erlang distribution runs. Disconnecting a node from the
//!   private network cuts it off from its peers while its published port stays (a
//!   partition as a cluster sees it, not a dead node). Containers are therefore made with
//!   bollard (create, connect the private network, start), since testcontainers starts a
//!   container on one network and returns only once it is ready: too late to add one;
//! - each node sits behind a [`FaultProxy`] with a fixed local address, re-pointed after
//!   every start (Docker maps a new host port then): the URLs handed out stay valid;
//! - `cluster_partition_handling = pause_minority`: a node that loses its peers pauses
//!   (closes its client connections, accepts none) until it sees a majority again, then
//!   rejoins by itself; with the default `ignore` a healed partition may stay split;
//! - light on a 2-core machine: one Erlang scheduler per node (`+S 1:1`), and
//!   `net_ticktime` 10 s, so a partition is noticed in about 10 s instead of about 60.
//!
//! What the broker says (running nodes, a queue's leader and members) is asked with
//! `rabbitmqctl` inside a node (`docker exec`). Containers and the network carry the
//! kit's labels (stale ones are removed like every other test container) and are removed
//! on drop.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, NetworkConnectRequest, NetworkCreateRequest,
    NetworkDisconnectRequest, PortBinding,
};
use bollard::query_parameters::{CreateContainerOptionsBuilder, StopContainerOptionsBuilder};
use tokio::time::Instant;

use super::cleanup::{CREATED_ANY, own_labels};
use super::engine::{self, block_on_docker, docker, on_docker, remove_containers};
use super::exec::exec_in_container;
use super::images::{Server, image};
use super::probes::wait_for_rabbitmq;
use super::{
    CONNECT_TIMEOUT, ContainerState, LABEL_ROLE, LABEL_SCOPE, PASSWORD, RABBITMQ_PORT, USER,
    init_test_logging,
};
use crate::proxy::FaultProxy;

/// Nodes in a [`BrokerCluster`].
pub const CLUSTER_NODES: usize = 3;

/// Seconds `docker stop` waits for a node's graceful shutdown before SIGKILL.
const STOP_TIMEOUT_SECS: i32 = 30;

/// How long one `rabbitmq-diagnostics` check inside a node may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// What `check_running` says of a reachable node whose broker is stopped (paused or
/// booting); an unreachable node or a stopped container says something else.
const NOT_BOOTED: &str = "has not fully booted yet";

/// How long the cluster may take to form, or a node to boot and rejoin.
const FORM_TIMEOUT: Duration = Duration::from_secs(150);

/// Erlang flags of every node: one scheduler, a short partition detection.
const ERL_ARGS: &str = "+S 1:1 -kernel net_ticktime 10";

/// One node: its container, host name and proxy.
struct Node {
    id: String,
    host: String,
    proxy: FaultProxy,
}

/// A queue as the cluster reports it (`rabbitmqctl list_queues`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueMembers {
    /// The node of the queue's leader (`rabbit@host`), if it has one.
    pub leader: Option<String>,
    /// The nodes holding a replica.
    pub members: Vec<String>,
    /// The members that are up.
    pub online: Vec<String>,
}

/// A three-node RabbitMQ cluster (see the module docs). Removed on drop.
pub struct BrokerCluster {
    nodes: Vec<Node>,
    network: String,
    conf_dir: PathBuf,
}

impl std::fmt::Debug for BrokerCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerCluster")
            .field("network", &self.network)
            .field(
                "nodes",
                &self
                    .nodes
                    .iter()
                    .map(|n| (n.host.as_str(), n.proxy.local_addr()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Starts a [`BrokerCluster`] and returns once every node accepts an AMQP login and
/// reports all [`CLUSTER_NODES`] nodes running. The proxies run on the calling runtime.
///
/// # Errors
/// When Docker or the image is missing, or the cluster does not form in time.
pub async fn start_broker_cluster() -> anyhow::Result<BrokerCluster> {
    init_test_logging();
    let prefix = format!("vtc{:08x}", rand::random::<u32>());
    let hosts: Vec<String> = (1..=CLUSTER_NODES)
        .map(|n| format!("{prefix}-{n}"))
        .collect();
    let conf_dir = std::env::temp_dir().join(format!("vote-test-{}-{prefix}", std::process::id()));
    std::fs::create_dir_all(&conf_dir)
        .with_context(|| format!("creating {}", conf_dir.display()))?;
    let conf = conf_dir.join("50-cluster.conf");
    std::fs::write(&conf, cluster_conf(&hosts))
        .with_context(|| format!("writing {}", conf.display()))?;
    set_mode(&conf_dir, 0o755)?;
    set_mode(&conf, 0o644)?;
    let network = format!("vote-test-{}-{prefix}", std::process::id());
    let cookie = format!("{:032x}", rand::random::<u128>());
    let created = {
        let (network, hosts, conf) = (network.clone(), hosts.clone(), conf.clone());
        on_docker(async move { create_nodes(&network, &hosts, &conf, &cookie).await }).await
    };
    let ids = match created {
        Ok(ids) => ids,
        Err(e) => {
            let network = network.clone();
            block_on_docker(async move {
                remove_network(&network).await;
                true
            });
            let _ = std::fs::remove_dir_all(&conf_dir);
            return Err(e);
        }
    };
    let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let mut cluster = BrokerCluster {
        nodes: Vec::with_capacity(CLUSTER_NODES),
        network,
        conf_dir,
    };
    // From here on, the cluster's Drop removes what exists.
    let mut unplaced = Vec::new();
    for (id, host) in ids.into_iter().zip(hosts) {
        let proxy = FaultProxy::start(loopback, loopback).await?;
        cluster.nodes.push(Node { id, host, proxy });
        unplaced.push(cluster.nodes.len() - 1);
    }
    for i in unplaced {
        cluster.point_proxy(i).await?;
    }
    cluster.wait_formed(FORM_TIMEOUT).await?;
    tracing::info!(cluster = ?cluster, "RabbitMQ cluster ready");
    Ok(cluster)
}

/// The `conf.d` snippet of every node.
fn cluster_conf(hosts: &[String]) -> String {
    let mut conf = String::from(
        "cluster_formation.peer_discovery_backend = classic_config\n\
         cluster_partition_handling = pause_minority\n",
    );
    for (n, host) in hosts.iter().enumerate() {
        conf.push_str(&format!(
            "cluster_formation.classic_config.nodes.{} = rabbit@{host}\n",
            n + 1
        ));
    }
    conf
}

fn set_mode(path: &std::path::Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Creates the private network and the nodes (each: created on the default bridge with
/// its AMQP port published on loopback, connected to the private network under its host
/// name, started). Returns the container ids in node order.
async fn create_nodes(
    network: &str,
    hosts: &[String],
    conf: &std::path::Path,
    cookie: &str,
) -> anyhow::Result<Vec<String>> {
    let docker = docker().await?;
    let image = image(None, Server::Rabbitmq).await?;
    let mut labels: HashMap<String, String> = own_labels().into_iter().collect();
    labels.insert(LABEL_ROLE.to_owned(), "rabbitmq".to_owned());
    labels.insert(LABEL_SCOPE.to_owned(), "cluster".to_owned());
    CREATED_ANY.store(true, std::sync::atomic::Ordering::SeqCst);
    docker
        .create_network(NetworkCreateRequest {
            name: network.to_owned(),
            driver: Some("bridge".to_owned()),
            labels: Some(labels.clone()),
            ..NetworkCreateRequest::default()
        })
        .await
        .with_context(|| format!("creating Docker network {network}"))?;
    let port = format!("{RABBITMQ_PORT}/tcp");
    let mut ids = Vec::with_capacity(hosts.len());
    for host in hosts {
        let body = ContainerCreateBody {
            hostname: Some(host.clone()),
            image: Some(image.clone()),
            env: Some(vec![
                format!("RABBITMQ_NODENAME=rabbit@{host}"),
                format!("RABBITMQ_ERLANG_COOKIE={cookie}"),
                format!("RABBITMQ_DEFAULT_USER={USER}"),
                format!("RABBITMQ_DEFAULT_PASS={PASSWORD}"),
                format!("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS={ERL_ARGS}"),
            ]),
            labels: Some(labels.clone()),
            exposed_ports: Some(vec![port.clone()]),
            host_config: Some(HostConfig {
                binds: Some(vec![format!(
                    "{}:/etc/rabbitmq/conf.d/50-cluster.conf:ro",
                    conf.display()
                )]),
                port_bindings: Some(HashMap::from([(
                    port.clone(),
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".to_owned()),
                        host_port: Some(String::new()),
                    }]),
                )])),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let name = format!("vote-test-{}-{host}", std::process::id());
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let id = docker
            .create_container(Some(options), body)
            .await
            .with_context(|| format!("creating RabbitMQ node container {name}"))?
            .id;
        ids.push(id.clone());
        let attached = async {
            connect(network, &id, host).await?;
            docker
                .start_container(&id, None)
                .await
                .with_context(|| format!("starting RabbitMQ node container {name}"))
        };
        if let Err(e) = attached.await {
            remove_containers(&docker, &ids).await;
            return Err(e);
        }
    }
    Ok(ids)
}

/// Connects container `id` to `network` under the alias `host`.
async fn connect(network: &str, id: &str, host: &str) -> anyhow::Result<()> {
    docker()
        .await?
        .connect_network(
            network,
            NetworkConnectRequest {
                container: id.to_owned(),
                endpoint_config: Some(EndpointSettings {
                    aliases: Some(vec![host.to_owned()]),
                    ..EndpointSettings::default()
                }),
            },
        )
        .await
        .with_context(|| format!("connecting {host} to network {network}"))
}

async fn remove_network(network: &str) {
    if let Ok(docker) = docker().await
        && let Err(e) = docker.remove_network(network).await
    {
        tracing::warn!(network, error = %e, "could not remove Docker network");
    }
}

/// The loopback address Docker published the node's AMQP port on (a new one after each
/// start).
async fn published_addr(id: &str) -> anyhow::Result<SocketAddr> {
    let port = format!("{RABBITMQ_PORT}/tcp");
    let docker = docker().await?;
    for _ in 0..50 {
        let inspect = docker
            .inspect_container(id, None)
            .await
            .with_context(|| format!("inspecting container {id}"))?;
        let host_port = inspect
            .network_settings
            .and_then(|s| s.ports)
            .and_then(|ports| ports.get(&port).cloned().flatten())
            .and_then(|bindings| bindings.into_iter().find_map(|b| b.host_port))
            .and_then(|p| p.parse::<u16>().ok());
        if let Some(host_port) = host_port {
            return Ok(SocketAddr::new(engine::docker_host_ip()?, host_port));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("container {id} publishes no host port for {port}")
}

impl BrokerCluster {
    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it has no node (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The Erlang node name of node `i`, `rabbit@<host>` (as `rabbitmqctl` shows it).
    pub fn node_name(&self, i: usize) -> String {
        format!("rabbit@{}", self.nodes[i].host)
    }

    /// The index of the node called `name` (`rabbit@<host>`).
    pub fn node_index(&self, name: &str) -> Option<usize> {
        (0..self.len()).find(|&i| self.node_name(i) == name)
    }

    /// The container id of node `i`.
    pub fn container_id(&self, i: usize) -> &str {
        &self.nodes[i].id
    }

    /// The proxy in front of node `i`.
    pub fn proxy(&self, i: usize) -> &FaultProxy {
        &self.nodes[i].proxy
    }

    /// AMQP URL of node `i` (default vhost), through its proxy: valid across restarts.
    pub fn amqp_url(&self, i: usize) -> String {
        let addr = self.nodes[i].proxy.local_addr();
        format!("amqp://{USER}:{PASSWORD}@{}:{}/%2f", addr.ip(), addr.port())
    }

    /// Every node's URL, comma-separated: the `AMQP_URL` of a client of the cluster.
    pub fn amqp_url_list(&self) -> String {
        (0..self.len())
            .map(|i| self.amqp_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Points node `i`'s proxy at its current published port.
    async fn point_proxy(&self, i: usize) -> anyhow::Result<()> {
        let id = self.nodes[i].id.clone();
        let addr = on_docker(async move { published_addr(&id).await }).await?;
        self.nodes[i].proxy.set_upstream(addr);
        Ok(())
    }

    /// Runs `rabbitmqctl`-style `cmd` inside node `i` and returns its output.
    ///
    /// # Errors
    /// When Docker fails or the command exits non-zero.
    pub async fn exec(&self, i: usize, cmd: &[&str]) -> anyhow::Result<String> {
        let id = self.nodes[i].id.clone();
        let cmd: Vec<String> = cmd.iter().map(|s| (*s).to_owned()).collect();
        on_docker(async move { exec_in_container(&id, cmd, None).await }).await
    }

    /// The nodes node `i` sees running (`rabbitmqctl cluster_status`), as node names.
    ///
    /// # Errors
    /// When the command fails (node `i` down) or its output does not parse.
    pub async fn running_nodes(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let out = self
            .exec(
                i,
                &["rabbitmqctl", "-q", "cluster_status", "--formatter", "json"],
            )
            .await?;
        let status: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("cluster_status is not JSON: {out}"))?;
        Ok(strings(&status["running_nodes"]))
    }

    /// `queue` (default vhost) as node `i` reports it: leader, members, members online.
    ///
    /// # Errors
    /// When the command fails, or the queue is not there.
    pub async fn queue_members(&self, i: usize, queue: &str) -> anyhow::Result<QueueMembers> {
        let out = self
            .exec(
                i,
                &[
                    "rabbitmqctl",
                    "-q",
                    "list_queues",
                    "--formatter",
                    "json",
                    "name",
                    "leader",
                    "members",
                    "online",
                ],
            )
            .await?;
        let rows: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("list_queues is not JSON: {out}"))?;
        let row = rows
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == queue))
            .with_context(|| format!("queue {queue} not listed by {}", self.node_name(i)))?;
        Ok(QueueMembers {
            leader: row["leader"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            members: strings(&row["members"]),
            online: strings(&row["online"]),
        })
    }

    /// The index of the node leading `queue`, asked of the first node that answers.
    ///
    /// # Errors
    /// When no node answers or the leader is not a node of this cluster.
    pub async fn queue_leader(&self, queue: &str) -> anyhow::Result<usize> {
        let mut last = None;
        for i in 0..self.len() {
            match self.queue_members(i, queue).await {
                Ok(q) => {
                    let leader = q.leader.context("the queue has no leader")?;
                    return self
                        .node_index(&leader)
                        .with_context(|| format!("leader {leader} is not a node of the cluster"));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no node")))
    }

    /// Waits until every node is running, sees all nodes running, and accepts an AMQP
    /// login through its proxy.
    ///
    /// # Errors
    /// When that does not happen within `timeout` (the last thing missing is named).
    pub async fn wait_formed(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.len() {
            loop {
                let seen = self.running_nodes(i).await;
                match seen {
                    Ok(nodes) if nodes.len() == self.len() => break,
                    _ if Instant::now() >= deadline => bail!(
                        "the RabbitMQ cluster did not form within {timeout:?}: {} sees {seen:?}",
                        self.node_name(i)
                    ),
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            wait_for_rabbitmq(&self.amqp_url(i), left.max(CONNECT_TIMEOUT))
                .await
                .with_context(|| format!("{} accepts no AMQP login", self.node_name(i)))?;
        }
        Ok(())
    }

    /// Whether node `i` runs the broker (`rabbitmq-diagnostics check_running`): false
    /// while it is paused as a minority (its Erlang node up, the broker stopped) or booting.
    ///
    /// # Errors
    /// When the command fails for another reason (Docker, the container or the Erlang
    /// node not running) or takes longer than 20 s.
    pub async fn broker_running(&self, i: usize) -> anyhow::Result<bool> {
        let check = self.exec(i, &["rabbitmq-diagnostics", "-q", "check_running"]);
        let answer = tokio::time::timeout(CHECK_TIMEOUT, check)
            .await
            .with_context(|| {
                format!(
                    "check_running on {} took over {CHECK_TIMEOUT:?}",
                    self.node_name(i)
                )
            })?;
        match answer {
            Ok(_) => Ok(true),
            // The one answer of a reachable node whose broker is stopped: "RabbitMQ on
            // node … is not running or has not fully booted yet".
            Err(e) if format!("{e:#}").contains(NOT_BOOTED) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until node `i`, cut from its peers, has seen them gone and paused itself
    /// (`pause_minority`). Its peers may see it gone a few
    /// seconds before it sees them gone (each side times out the other on its own): a
    /// partition healed in between is never seen by the minority, which then never
    /// pauses, and the cluster can stay split for good.
    ///
    /// # Errors
    /// When it still runs the broker after `timeout`, or cannot be asked.
    pub async fn wait_paused(&self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        while self.broker_running(i).await? {
            if started.elapsed() >= timeout {
                bail!(
                    "{} still runs the broker {timeout:?} after being cut from its peers",
                    self.node_name(i)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    /// Waits until `queue` has all [`CLUSTER_NODES`] members online (asked of any node
    /// that answers).
    ///
    /// # Errors
    /// When it does not within `timeout` (the last answer is named).
    pub async fn wait_queue_members(&self, queue: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            for i in 0..self.len() {
                match self.queue_members(i, queue).await {
                    Ok(q) if q.online.len() == self.len() && q.leader.is_some() => return Ok(()),
                    Ok(q) => last = format!("{q:?}"),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            if Instant::now() >= deadline {
                bail!("queue {queue} did not get all its members back within {timeout:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// SIGKILLs node `i` (a crashed node) and waits until its container has exited.
    ///
    /// # Errors
    /// When Docker refuses or the container does not exit.
    pub async fn kill_node(&self, i: usize) -> anyhow::Result<()> {
        let id = self.nodes[i].id.clone();
        on_docker(async move { engine::kill(&id, "SIGKILL").await.map(drop) }).await
    }

    /// Stops node `i` gracefully (`docker stop`: SIGTERM, then SIGKILL after 30 s).
    ///
    /// # Errors
    /// When Docker refuses.
    pub async fn stop_node(&self, i: usize) -> anyhow::Result<()> {
        let id = self.nodes[i].id.clone();
        on_docker(async move {
            docker()
                .await?
                .stop_container(
                    &id,
                    Some(
                        StopContainerOptionsBuilder::new()
                            .t(STOP_TIMEOUT_SECS)
                            .build(),
                    ),
                )
                .await
                .with_context(|| format!("stopping RabbitMQ node {id}"))
        })
        .await
    }

    /// Starts node `i` again, re-points its proxy and waits until it accepts an AMQP
    /// login (it rejoins the cluster as it boots).
    ///
    /// # Errors
    /// When Docker refuses or the node does not come up within the formation timeout.
    pub async fn start_node(&self, i: usize) -> anyhow::Result<()> {
        let id = self.nodes[i].id.clone();
        on_docker(async move {
            docker()
                .await?
                .start_container(&id, None)
                .await
                .with_context(|| format!("starting RabbitMQ node {id}"))
        })
        .await?;
        self.point_proxy(i).await?;
        wait_for_rabbitmq(&self.amqp_url(i), FORM_TIMEOUT)
            .await
            .with_context(|| format!("{} after its restart", self.node_name(i)))
    }

    /// Disconnects node `i` from the cluster's private network: its peers become
    /// unreachable, its published port stays. Before reconnecting, wait until both sides
    /// saw the partition ([`BrokerCluster::wait_paused`]).
    ///
    /// # Errors
    /// When Docker refuses.
    pub async fn isolate_node(&self, i: usize) -> anyhow::Result<()> {
        let (network, id) = (self.network.clone(), self.nodes[i].id.clone());
        on_docker(async move {
            docker()
                .await?
                .disconnect_network(
                    &network,
                    NetworkDisconnectRequest {
                        container: id.clone(),
                        force: Some(true),
                    },
                )
                .await
                .with_context(|| format!("disconnecting {id} from {network}"))
        })
        .await
    }

    /// Connects node `i` to the private network again (under its host name).
    ///
    /// # Errors
    /// When Docker refuses.
    pub async fn reconnect_node(&self, i: usize) -> anyhow::Result<()> {
        let (network, id, host) = (
            self.network.clone(),
            self.nodes[i].id.clone(),
            self.nodes[i].host.clone(),
        );
        on_docker(async move { connect(&network, &id, &host).await }).await
    }

    /// What Docker reports about node `i`'s container.
    ///
    /// # Errors
    /// When Docker cannot inspect it.
    pub async fn state(&self, i: usize) -> anyhow::Result<ContainerState> {
        let id = self.nodes[i].id.clone();
        on_docker(async move { engine::container_state(&id).await }).await
    }
}

/// The strings of a JSON array (empty for anything else).
fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for BrokerCluster {
    fn drop(&mut self) {
        let ids: Vec<String> = self.nodes.iter().map(|n| n.id.clone()).collect();
        let network = self.network.clone();
        block_on_docker(async move {
            if let Ok(docker) = docker().await {
                remove_containers(&docker, &ids).await;
            }
            remove_network(&network).await;
            true
        });
        let _ = std::fs::remove_dir_all(&self.conf_dir);
    }
}
