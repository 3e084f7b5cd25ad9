//! Nemeses: the objects that inject faults into a [`Cluster`], one kind each, with
//! explicit verbs (`kill`/`restart`, `pause`/`resume`, `cut`/`heal`, ...).
//!
//! Every verb VERIFIES its effect before it reports success (the process is gone from
//! `/proc`, the container has a new start time, the proxy's connections dropped to 0, the
//! replica died by SIGABRT inside the commit-ack window, PostgreSQL died of SIGKILL and
//! ran crash recovery, ...). A [`Fault`] records what was
//! done, when (relative to the start of the scenario), and either the evidence that it
//! really happened or why it could not be verified; the report counts only verified
//! faults, and a scenario with an unverified fault fails.
//!
//! [`Nemeses::strike`] runs one complete fault of a given [`FaultKind`] (inject, verify,
//! hold, heal): the scenario's seeded schedule decides which and when.

pub mod broker;
pub mod broker_node;
pub mod commit_ack;
pub mod database;
pub mod db_kill;
pub mod kill;
pub mod partition;
pub mod pause;

use std::fmt;
use std::time::Duration;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

use crate::cluster::Cluster;

/// The kinds of fault the nemeses inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL one replica, restart it after a delay.
    Kill,
    /// SIGSTOP one replica past the broker's heartbeat timeout, then SIGCONT (a zombie).
    Pause,
    /// Stop RabbitMQ gracefully and start it again.
    BrokerRestart,
    /// SIGKILL the RabbitMQ container and start it again.
    BrokerKill,
    /// Stop PostgreSQL (fast shutdown) and start it again.
    DatabaseRestart,
    /// SIGKILL PostgreSQL right after a replica committed, start it again (crash recovery).
    DbKill,
    /// `pg_terminate_backend` every replica session, without a restart.
    BackendTerminate,
    /// Cut one replica's connections to the broker or the database, then restore them.
    Partition,
    /// Restart one replica armed to abort between a batch's COMMIT and its ack.
    CommitAck,
    /// SIGKILL the broker-cluster node that leads the votes queue, restart it.
    BrokerNodeKill,
    /// Cut one broker-cluster node from its peers (not from its clients), then heal.
    BrokerNodePartition,
    /// Restart the next broker-cluster node gracefully (one step of a rolling restart).
    BrokerNodeRestart,
    /// A replica killed exactly between the results relay's confirms and its delete.
    RelayConfirm,
}

impl FaultKind {
    /// Short name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::BrokerRestart => "broker-restart",
            FaultKind::BrokerKill => "broker-kill",
            FaultKind::DatabaseRestart => "db-restart",
            FaultKind::DbKill => "db-kill",
            FaultKind::BackendTerminate => "backend-terminate",
            FaultKind::Partition => "partition",
            FaultKind::CommitAck => "commit-ack",
            FaultKind::BrokerNodeKill => "broker-node-kill",
            FaultKind::BrokerNodePartition => "broker-node-partition",
            FaultKind::BrokerNodeRestart => "broker-node-restart",
            FaultKind::RelayConfirm => "relay-confirm",
        }
    }

    /// Whether it strikes a node of a broker cluster (the scenario must run one).
    pub fn needs_broker_cluster(self) -> bool {
        matches!(
            self,
            FaultKind::BrokerNodeKill
                | FaultKind::BrokerNodePartition
                | FaultKind::BrokerNodeRestart
        )
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fault as it happened.
#[derive(Debug, Clone)]
pub struct Fault {
    /// What kind.
    pub kind: FaultKind,
    /// Whom it hit (a replica name, `rabbitmq`, `postgres`, `r1→broker`, ...).
    pub target: String,
    /// When it was injected, since the scenario started.
    pub at: Duration,
    /// When it was healed (the system given back its resource), since the start.
    pub healed: Duration,
    /// The evidence that it happened, or why that could not be verified.
    pub outcome: Result<String, String>,
    /// Set when healing failed (e.g. a restarted replica never became ready): the
    /// system did not recover from this fault.
    pub heal_error: Option<String>,
}

impl Fault {
    /// Whether the fault verifiably happened.
    pub fn verified(&self) -> bool {
        self.outcome.is_ok()
    }
}

/// Time since the start of a scenario.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    t0: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Self {
        Clock { t0: Instant::now() }
    }

    /// Time since the start.
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }
}

/// A duration drawn uniformly from `[lo, hi]` seconds.
pub fn between(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(if hi > lo {
        rng.random_range(lo..=hi)
    } else {
        lo
    })
}

/// A random replica that is running, chosen only when at least one OTHER replica runs
/// too (a nemesis never takes every replica down at once).
pub fn pick_replica(cluster: &mut Cluster, rng: &mut ChaCha8Rng) -> Option<usize> {
    let running: Vec<usize> = (0..cluster.replicas())
        .filter(|&i| cluster.fleet.is_running(i) && !cluster.fleet.is_paused(i))
        .collect();
    if running.len() < 2 {
        return None;
    }
    Some(running[rng.random_range(0..running.len())])
}

/// Every nemesis, configured for one scenario.
#[derive(Debug, Clone, Default)]
pub struct Nemeses {
    /// `kill`.
    pub kill: kill::KillNemesis,
    /// `pause`.
    pub pause: pause::PauseNemesis,
    /// `broker`.
    pub broker: broker::BrokerNemesis,
    /// `database`.
    pub database: database::DatabaseNemesis,
    /// `db-kill`.
    pub db_kill: db_kill::DbKillNemesis,
    /// `partition`.
    pub partition: partition::PartitionNemesis,
    /// `commit-ack`.
    pub commit_ack: commit_ack::CommitAckNemesis,
    /// `broker-node-*`.
    pub broker_node: broker_node::BrokerNodeNemesis,
    /// See [`commit_ack`] (the relay's window).
    pub relay_confirm: commit_ack::CommitAckNemesis,
}

impl Nemeses {
    /// Nemeses for replicas whose AMQP heartbeat is `heartbeat_secs`.
    pub fn new(heartbeat_secs: u16) -> Self {
        Nemeses {
            pause: pause::PauseNemesis::for_heartbeat(heartbeat_secs),
            relay_confirm: commit_ack::CommitAckNemesis::relay_confirm(),
            ..Nemeses::default()
        }
    }

    /// Runs one complete fault of `kind` (inject, verify, hold, heal) and records it.
    pub async fn strike(
        &self,
        kind: FaultKind,
        cluster: &mut Cluster,
        rng: &mut ChaCha8Rng,
        clock: &Clock,
    ) -> Fault {
        match kind {
            FaultKind::Kill => self.kill.strike(cluster, rng, clock).await,
            FaultKind::Pause => self.pause.strike(cluster, rng, clock).await,
            FaultKind::BrokerRestart => self.broker.strike(cluster, false, clock).await,
            FaultKind::BrokerKill => self.broker.strike(cluster, true, clock).await,
            FaultKind::DatabaseRestart => self.database.strike_restart(cluster, clock).await,
            FaultKind::DbKill => self.db_kill.strike(cluster, rng, clock).await,
            FaultKind::BackendTerminate => self.database.strike_terminate(cluster, clock).await,
            FaultKind::Partition => self.partition.strike(cluster, rng, clock).await,
            FaultKind::CommitAck => self.commit_ack.strike(cluster, rng, clock).await,
            FaultKind::BrokerNodeKill
            | FaultKind::BrokerNodePartition
            | FaultKind::BrokerNodeRestart => {
                let brokers = cluster.brokers.take();
                let queue = cluster.bed.queue.clone();
                let fault = self
                    .broker_node
                    .strike(kind, brokers.as_ref(), &queue, rng, clock)
                    .await;
                cluster.brokers = brokers;
                fault
            }
            FaultKind::RelayConfirm => self.relay_confirm.strike(cluster, rng, clock).await,
        }
    }

    /// Runs a broker-node fault (`broker_kind`) and a replica fault (`replica_kind`) at the
    /// same time: the broker cluster is taken out of `cluster` for the broker-node
    /// nemesis, so the replica nemesis has the rest. The broker fault draws from its own
    /// random stream, seeded from `rng`, so the plan stays replayable.
    pub async fn strike_together(
        &self,
        broker_kind: FaultKind,
        replica_kind: FaultKind,
        cluster: &mut Cluster,
        rng: &mut ChaCha8Rng,
        clock: &Clock,
    ) -> Vec<Fault> {
        use rand::SeedableRng as _;
        let brokers = cluster.brokers.take();
        let queue = cluster.bed.queue.clone();
        let mut broker_rng = ChaCha8Rng::seed_from_u64(rng.random());
        let (broker_fault, replica_fault) = tokio::join!(
            self.broker_node.strike(
                broker_kind,
                brokers.as_ref(),
                &queue,
                &mut broker_rng,
                clock
            ),
            async {
                // Strike the replica while the broker fault is under way.
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.strike(replica_kind, cluster, rng, clock).await
            }
        );
        cluster.brokers = brokers;
        vec![broker_fault, replica_fault]
    }
}

/// A fault that could not even be attempted (no eligible target).
pub(crate) fn not_attempted(kind: FaultKind, clock: &Clock, why: &str) -> Fault {
    let now = clock.now();
    Fault {
        kind,
        target: "-".into(),
        at: now,
        healed: now,
        outcome: Err(why.to_owned()),
        heal_error: None,
    }
}

/// `{e:#}` of an error, on one line.
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " | ")
}
