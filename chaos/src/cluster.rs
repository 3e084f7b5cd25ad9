//! The system under test of one scenario: a PRIVATE PostgreSQL + RabbitMQ pair, one fresh
//! database and queue on it, and a fleet of REAL `vote-aggregator` processes, each
//! reaching both servers through its OWN pair of fault proxies.
//!
//! This module owns how that system is wired, because the nemeses depend on it:
//! - the server pair is private ([`vote_testkit::infra::start_private`]) since broker and
//!   database restarts would disturb any other user of the servers;
//! - per-replica proxies ([`ReplicaLinks`]) sit in front of the pair's own proxies, so ONE
//!   replica can be partitioned from the broker or the database while the others, the
//!   publisher and the checker keep their connections (the pair's proxies keep a fixed
//!   address across server restarts, so the chain survives them);
//! - replicas run with a short AMQP heartbeat, so a frozen replica loses its broker session
//!   (and its unacked deliveries) within seconds;
//! - at start it checks that the replicas really are a fault-injection build (their log
//!   says so), because a scenario against a build without the hooks would prove nothing;
//! - with [`ClusterOptions::broker_cluster`] the broker is a three-node RabbitMQ cluster
//!   ([`BrokerCluster`]) instead of the pair's single node (which is then stopped, to
//!   spare the CPU): every replica, the publisher and the checker get all three nodes'
//!   URLs, and there are no per-replica broker proxies (a replica's way to the broker is
//!   a list of nodes; the broker-node nemeses cut nodes, not replicas).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use url::Url;
use vote_aggregator::config::QueueType;
use vote_aggregator::config::variables as var;
use vote_testkit::fleet::{self, Fleet, FleetOptions, ReplicaSpec};
use vote_testkit::infra::{self, BrokerCluster, InfraOptions, PrivateInfra};
use vote_testkit::proxy::FaultProxy;
use vote_testkit::testbed::TestBed;

/// The line a fault-injection build logs at start.
pub const FAULT_BUILD_MARKER: &str = vote_aggregator::fault::BUILD_MARKER;

/// The command that builds the replicas with the hooks.
pub const BUILD_HINT: &str = "make fault-build";

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of replicas (at least 2: a nemesis never takes every replica down at once).
    pub replicas: usize,
    /// Directory of the replicas' logs (kept when a scenario fails).
    pub log_dir: PathBuf,
    /// `AMQP_HEARTBEAT_SECONDS` of every replica: short, so the broker notices a frozen
    /// replica quickly.
    pub heartbeat_secs: u16,
    /// Extra environment of every replica (e.g. the deliberately broken
    /// `VOTES_FAULT_ACK_BEFORE_COMMIT=1`).
    pub extra_env: Vec<(String, String)>,
    /// How to start the server pair (e.g. PostgreSQL with `fsync` on, for the faults that
    /// crash it).
    pub infra: InfraOptions,
    /// Run against a three-node RabbitMQ cluster instead of the pair's single broker.
    pub broker_cluster: bool,
}

/// Which connection of a replica a partition cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Replica ↔ RabbitMQ.
    Broker,
    /// Replica ↔ PostgreSQL.
    Database,
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Broker => "broker",
            Link::Database => "database",
        })
    }
}

/// One replica's own proxies.
#[derive(Debug)]
pub struct ReplicaLinks {
    /// In front of RabbitMQ (the pair's proxy); none against a broker cluster.
    pub broker: Option<FaultProxy>,
    /// In front of PostgreSQL (the pair's proxy).
    pub database: FaultProxy,
}

/// Servers, data set and replicas of one scenario.
///
/// Fields drop in declaration order: replicas first (killed if still running), then
/// their proxies, then the servers.
#[derive(Debug)]
pub struct Cluster {
    /// The replicas.
    pub fleet: Fleet,
    /// Per-replica proxies, by replica index.
    pub links: Vec<ReplicaLinks>,
    /// Database URL and queue of this scenario (through the pair's proxies: never
    /// partitioned, so the publisher and checker use it; against a broker cluster its
    /// AMQP URL lists every node).
    pub bed: TestBed,
    /// The three-node RabbitMQ cluster, when the scenario runs against one. `None` also
    /// while a nemesis holds it (see `nemesis::broker_node`).
    pub brokers: Option<BrokerCluster>,
    /// The private server pair.
    pub servers: PrivateInfra,
}

impl Cluster {
    /// Starts the server pair, a fresh database and queue, the proxies and the replicas,
    /// and waits until every replica is ready and has shown it is a fault-injection build.
    ///
    /// # Errors
    /// When Docker or a server is unavailable, a replica does not become ready, or the
    /// replica binary was built without the `fault-injection` feature.
    pub async fn start(opts: &ClusterOptions) -> anyhow::Result<Cluster> {
        if opts.replicas < 2 {
            bail!(
                "chaos needs at least 2 replicas (got {}): a nemesis never takes every replica down",
                opts.replicas
            );
        }
        let (servers, brokers) = if opts.broker_cluster {
            let (servers, brokers) = tokio::join!(
                infra::start_private(opts.infra.clone()),
                infra::start_broker_cluster()
            );
            let servers = servers.context("starting the private PostgreSQL + RabbitMQ pair")?;
            let brokers = brokers.context("starting the three-node RabbitMQ cluster")?;
            // Unused: every client talks to the cluster.
            servers.stop_rabbitmq().await?;
            (servers, Some(brokers))
        } else {
            let servers = infra::start_private(opts.infra.clone())
                .await
                .context("starting the private PostgreSQL + RabbitMQ pair")?;
            (servers, None)
        };
        let mut bed = TestBed::new(&servers).await?;
        if let Some(brokers) = &brokers {
            bed.amqp_url = brokers.amqp_url_list();
        }
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let mut links = Vec::with_capacity(opts.replicas);
        let mut specs = Vec::with_capacity(opts.replicas);
        for i in 0..opts.replicas {
            let broker = match brokers {
                Some(_) => None,
                None => Some(FaultProxy::start(loopback, servers.rabbitmq_host_port()).await?),
            };
            let amqp_url = match &broker {
                Some(proxy) => with_port(&bed.amqp_url, proxy.local_addr())?,
                None => bed.amqp_url.clone(),
            };
            let database = FaultProxy::start(loopback, servers.postgres_host_port()).await?;
            let batch = ["100", "250", "500"][i % 3];
            let spec = ReplicaSpec::new(format!("r{i}"))
                .with_env(
                    var::DATABASE_URL,
                    with_port(&bed.database_url, database.local_addr())?,
                )
                .with_env(var::AMQP_URL, amqp_url)
                .with_env(var::BATCH_SIZE, batch);
            specs.push(spec);
            links.push(ReplicaLinks { broker, database });
        }
        let mut base_env: Vec<(String, String)> = [
            (var::QUEUE_NAME, bed.queue.as_str()),
            (var::QUEUE_TYPE, QueueType::Quorum.as_str()),
            (var::RUST_LOG, "info"),
            (var::SHUTDOWN_GRACE_SECONDS, "10"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        base_env.push((
            var::AMQP_HEARTBEAT_SECONDS.to_owned(),
            opts.heartbeat_secs.to_string(),
        ));
        base_env.extend(opts.extra_env.iter().cloned());
        let binary = fleet::fault_injection_binary()?;
        let fleet_options = FleetOptions::with_binary(binary, &opts.log_dir, base_env);
        let fleet = Fleet::start(fleet_options, specs).await?;
        let cluster = Cluster {
            fleet,
            links,
            bed,
            brokers,
            servers,
        };
        for i in 0..cluster.fleet.len() {
            cluster.ensure_fault_build(i).await?;
        }
        Ok(cluster)
    }

    /// Number of replicas.
    pub fn replicas(&self) -> usize {
        self.fleet.len()
    }

    /// The proxy of replica `i`'s `link`.
    ///
    /// # Errors
    /// For the broker link against a broker cluster (replicas have no broker proxy).
    pub fn link(&self, i: usize, link: Link) -> anyhow::Result<&FaultProxy> {
        match link {
            Link::Broker => self.links[i]
                .broker
                .as_ref()
                .context("against a broker cluster, replicas have no broker proxy to cut"),
            Link::Database => Ok(&self.links[i].database),
        }
    }

    /// The log of replica `i` since its latest start (the fleet appends every start to one
    /// file, behind a marker line).
    pub fn log_since_last_start(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.fleet.log_path(i)).unwrap_or_default();
        match text.rfind(vote_testkit::fleet::START_MARKER) {
            Some(at) => text[at..].to_owned(),
            None => text,
        }
    }

    /// Checks that replica `i`'s current process logged [`FAULT_BUILD_MARKER`] (polling
    /// briefly: the line is written right after start).
    ///
    /// # Errors
    /// When it did not: the replicas were built without the hooks.
    pub async fn ensure_fault_build(&self, i: usize) -> anyhow::Result<()> {
        for _ in 0..50 {
            if self.log_since_last_start(i).contains(FAULT_BUILD_MARKER) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "replica {} ({}) is not a fault-injection build (its log lacks {FAULT_BUILD_MARKER:?}); \
             build it with `{BUILD_HINT}` (or run `make chaos`)",
            self.fleet.name(i),
            self.fleet.options().binary.display()
        )
    }

    /// Stops every replica (SIGTERM, so each finishes its batch in hand).
    ///
    /// # Errors
    /// When a replica does not exit in time (it is killed).
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let Cluster {
            fleet,
            links,
            bed,
            brokers,
            servers,
        } = self;
        let stopped = fleet.shutdown().await.map(|_| ());
        // The database lives only as long as the private pair, which is removed next:
        // dropping it first would be wasted work (and a bed dropped later would start a
        // background DROP DATABASE against containers that are gone).
        bed.keep();
        drop(links);
        drop(brokers);
        drop(servers);
        stopped
    }
}

/// `url` with its host and port replaced by `addr` (a proxy's).
fn with_port(url: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let mut parsed = Url::parse(url).context("parsing a server URL")?;
    parsed
        .set_ip_host(addr.ip())
        .map_err(|()| anyhow::anyhow!("cannot set the host of a server URL"))?;
    parsed
        .set_port(Some(addr.port()))
        .map_err(|()| anyhow::anyhow!("cannot set the port of a server URL"))?;
    Ok(parsed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_pointed_at_a_proxy() {
        let addr: SocketAddr = "127.0.0.1:4242".parse().expect("addr");
        assert_eq!(
            with_port("postgres://votes:votes@127.0.0.1:5432/votes_test_1", addr).expect("url"),
            "postgres://votes:votes@127.0.0.1:4242/votes_test_1"
        );
        assert_eq!(
            with_port("amqp://votes:votes@127.0.0.1:5672/%2f", addr).expect("url"),
            "amqp://votes:votes@127.0.0.1:4242/%2f"
        );
    }
}
