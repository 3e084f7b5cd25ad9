//! Scenarios: a workload + a seeded fault schedule + the checker, on a private cluster.
//!
//! This module owns the shape of a run, the same for every scenario:
//! 1. start a [`Cluster`](crate::cluster::Cluster) (private servers, replicas behind their own proxies) in a
//!    folder named after the scenario and seed;
//! 2. publish a seeded stream at a steady rate (duplicates, conflicts, ~1 % malformed,
//!    quorum queue, confirms, retries) for as long as the faults last;
//! 3. strike faults on the scenario's seeded schedule until the duration is used up (a
//!    fault in progress is finished and healed);
//! 4. stop the publisher (it flushes its unconfirmed messages), assert that every replica
//!    recovers by itself (`/readyz` 200), run the exactly-once checker (drain timeout),
//!    read the dead-letter queue;
//! 5. report; keep logs, ledger and report when the run failed.
//!
//! The seed drives the workload and every random choice of the schedule (which fault,
//! which replica, how long), so `--seed` replays the same plan. Timing of the system
//! itself is of course not replayed.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use vote_testkit::workload::WorkloadSpec;

use crate::nemesis::FaultKind;

use vote_aggregator::fault::{
    ACK_BEFORE_COMMIT_ENV, OUTBOX_DELETE_BEFORE_CONFIRM_ENV, SYNCHRONOUS_COMMIT_OFF_ENV,
};

mod run;
pub use run::run;

/// A deliberately broken aggregator (a fault-injection build with one of its switches
/// on): a scenario run against it must FAIL, which proves the suite catches that bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Broken {
    /// Acks each batch when its transaction starts, before COMMIT: a replica crash loses
    /// votes (caught by `kill-restart` and `commit-ack`).
    AckBeforeCommit,
    /// Commits with `synchronous_commit=off`: a database crash right after an ack loses
    /// votes (caught by `db-kill`).
    SynchronousCommitOff,
    /// Its results relay deletes events before publishing them: a replica crash loses
    /// results events (caught by the results check of `relay-confirm`).
    OutboxDeleteBeforeConfirm,
}

impl Broken {
    /// Every kind.
    pub const ALL: [Broken; 3] = [
        Broken::AckBeforeCommit,
        Broken::SynchronousCommitOff,
        Broken::OutboxDeleteBeforeConfirm,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Broken::AckBeforeCommit => "ack-before-commit",
            Broken::SynchronousCommitOff => "synchronous-commit-off",
            Broken::OutboxDeleteBeforeConfirm => "outbox-delete-before-confirm",
        }
    }

    /// The replica environment variable that switches it on (to `1`).
    pub fn env(self) -> &'static str {
        match self {
            Broken::AckBeforeCommit => ACK_BEFORE_COMMIT_ENV,
            Broken::SynchronousCommitOff => SYNCHRONOUS_COMMIT_OFF_ENV,
            Broken::OutboxDeleteBeforeConfirm => OUTBOX_DELETE_BEFORE_CONFIRM_ENV,
        }
    }
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Broken {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        by_name(&Broken::ALL, Broken::name, s, "broken build", "")
    }
}

/// A named scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// A SIGKILL every 2–5 s across the replicas, each restarted after a moment.
    KillRestart,
    /// Replicas frozen past the heartbeat timeout, then resumed (zombies commit late).
    ZombiePause,
    /// RabbitMQ restarted under load, gracefully and hard (SIGKILL).
    BrokerRestart,
    /// PostgreSQL restarted under load.
    DbRestart,
    /// PostgreSQL SIGKILLed right after acks (fsync and synchronous commit on), then
    /// recovered from its WAL.
    DbKill,
    /// Every replica session terminated with `pg_terminate_backend`, repeatedly.
    BackendTerminate,
    /// One replica at a time cut off from the broker or the database.
    Partition,
    /// A replica killed exactly between COMMIT and ack (fault-injection hook).
    CommitAck,
    /// A replica killed exactly between the results relay's confirms and its delete
    /// (fault-injection hook): repeated events, deduped by the results consumer.
    RelayConfirm,
    /// All of the above, interleaved.
    Mixed,
    /// Three-node broker cluster: the node leading the votes queue SIGKILLed, restarted.
    BrokerNodeKill,
    /// Three-node broker cluster: one node cut from its peers (not its clients), healed.
    BrokerNodePartition,
    /// Three-node broker cluster: nodes restarted gracefully one at a time, each rejoined
    /// with the queue's members back before the next.
    BrokerRollingRestart,
    /// Three-node broker cluster: every broker-node fault, each with a replica kill or
    /// pause at the same time.
    ClusterMixed,
}

impl Scenario {
    /// The broker-cluster scenarios, in the order `cluster` runs them (`make
    /// chaos-cluster`): they start three RabbitMQ nodes each, so `all` leaves them out.
    pub const CLUSTER: [Scenario; 4] = [
        Scenario::BrokerNodeKill,
        Scenario::BrokerNodePartition,
        Scenario::BrokerRollingRestart,
        Scenario::ClusterMixed,
    ];

    /// Every single-broker scenario, in the order `all` runs them.
    pub const ALL: [Scenario; 10] = [
        Scenario::KillRestart,
        Scenario::ZombiePause,
        Scenario::BrokerRestart,
        Scenario::DbRestart,
        Scenario::DbKill,
        Scenario::BackendTerminate,
        Scenario::Partition,
        Scenario::CommitAck,
        Scenario::RelayConfirm,
        Scenario::Mixed,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::KillRestart => "kill-restart",
            Scenario::ZombiePause => "zombie-pause",
            Scenario::BrokerRestart => "broker-restart",
            Scenario::DbRestart => "db-restart",
            Scenario::DbKill => "db-kill",
            Scenario::BackendTerminate => "backend-terminate",
            Scenario::Partition => "partition",
            Scenario::CommitAck => "commit-ack",
            Scenario::RelayConfirm => "relay-confirm",
            Scenario::Mixed => "mixed",
            Scenario::BrokerNodeKill => "broker-node-kill",
            Scenario::BrokerNodePartition => "broker-node-partition",
            Scenario::BrokerRollingRestart => "broker-rolling-restart",
            Scenario::ClusterMixed => "cluster-mixed",
        }
    }

    /// Whether it runs against a three-node broker cluster.
    pub fn uses_broker_cluster(self) -> bool {
        self.faults().iter().any(|k| k.needs_broker_cluster())
    }

    /// Replica faults struck at the same time as each of its broker-node faults (one,
    /// drawn at random, per broker fault).
    pub fn companions(self) -> &'static [FaultKind] {
        match self {
            Scenario::ClusterMixed => &[FaultKind::Kill, FaultKind::Pause],
            _ => &[],
        }
    }

    /// Its index among every scenario (the single-broker ones first), for its own
    /// random stream.
    pub fn index(self) -> usize {
        Scenario::ALL
            .iter()
            .chain(Scenario::CLUSTER.iter())
            .position(|s| *s == self)
            .unwrap_or(0)
    }

    /// The kinds of fault it injects. The schedule deals them from a seeded shuffle
    /// bag: every kind once per round, in random order, so a long enough run sees all.
    pub fn faults(self) -> &'static [FaultKind] {
        match self {
            Scenario::KillRestart => &[FaultKind::Kill],
            Scenario::ZombiePause => &[FaultKind::Pause],
            Scenario::BrokerRestart => &[FaultKind::BrokerRestart, FaultKind::BrokerKill],
            Scenario::DbRestart => &[FaultKind::DatabaseRestart],
            Scenario::DbKill => &[FaultKind::DbKill],
            Scenario::BackendTerminate => &[FaultKind::BackendTerminate],
            Scenario::Partition => &[FaultKind::Partition],
            Scenario::CommitAck => &[FaultKind::CommitAck],
            Scenario::RelayConfirm => &[FaultKind::RelayConfirm],
            Scenario::Mixed => &[
                FaultKind::Kill,
                FaultKind::Pause,
                FaultKind::BrokerRestart,
                FaultKind::BrokerKill,
                FaultKind::DatabaseRestart,
                FaultKind::DbKill,
                FaultKind::BackendTerminate,
                FaultKind::Partition,
                FaultKind::CommitAck,
                FaultKind::RelayConfirm,
            ],
            Scenario::BrokerNodeKill => &[FaultKind::BrokerNodeKill],
            Scenario::BrokerNodePartition => &[FaultKind::BrokerNodePartition],
            Scenario::BrokerRollingRestart => &[FaultKind::BrokerNodeRestart],
            Scenario::ClusterMixed => &[
                FaultKind::BrokerNodeKill,
                FaultKind::BrokerNodePartition,
                FaultKind::BrokerNodeRestart,
            ],
        }
    }

    /// Seconds between the starts of two faults (min, max); a fault that takes longer
    /// is followed by the next one after a short breather.
    pub fn cadence_secs(self) -> (f64, f64) {
        match self {
            Scenario::KillRestart => (2.0, 5.0),
            Scenario::ZombiePause => (8.0, 11.0),
            Scenario::BrokerRestart | Scenario::DbRestart | Scenario::DbKill => (4.0, 8.0),
            Scenario::BackendTerminate => (1.0, 3.0),
            Scenario::Partition => (4.0, 7.0),
            Scenario::CommitAck | Scenario::RelayConfirm => (3.0, 6.0),
            Scenario::Mixed => (2.0, 5.0),
            // A broker-node fault lasts until the node rejoined (20-40 s): the next one
            // follows after a short pause.
            Scenario::BrokerNodeKill
            | Scenario::BrokerNodePartition
            | Scenario::BrokerRollingRestart
            | Scenario::ClusterMixed => (1.0, 3.0),
        }
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let every: Vec<Scenario> = Scenario::ALL
            .iter()
            .chain(Scenario::CLUSTER.iter())
            .copied()
            .collect();
        by_name(&every, Scenario::name, s, "scenario", ", all or cluster")
    }
}

/// The member of `all` called `s`, or an error listing every name (and `also`).
fn by_name<T: Copy>(
    all: &[T],
    name: fn(T) -> &'static str,
    s: &str,
    what: &str,
    also: &str,
) -> anyhow::Result<T> {
    all.iter()
        .copied()
        .find(|x| name(*x) == s)
        .with_context(|| {
            let names: Vec<&str> = all.iter().map(|x| name(*x)).collect();
            format!(
                "unknown {what} {s:?}: use one of {}{also}",
                names.join(", ")
            )
        })
}

/// How to run a scenario.
#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    /// How long faults are injected (the workload runs as long).
    pub duration: Duration,
    /// Seed of the workload and the schedule.
    pub seed: u64,
    /// Replicas (at least 2).
    pub replicas: usize,
    /// Messages published per second.
    pub rate: f64,
    /// How long the checker waits for the queue to drain after the faults.
    pub drain_timeout: Duration,
    /// Parent of the per-run folder `<scenario>-<seed>`.
    pub out_dir: PathBuf,
    /// Keep the run's folder even when it passed.
    pub keep: bool,
    /// Run a deliberately broken aggregator: the run should FAIL.
    pub broken: Option<Broken>,
    /// More PostgreSQL settings (`name=value`) for the scenario's server.
    pub postgres_settings: Vec<String>,
    /// `AMQP_HEARTBEAT_SECONDS` of the replicas.
    pub heartbeat_secs: u16,
    /// Print each fault as it happens (to stderr).
    pub progress: bool,
}

impl ScenarioOptions {
    /// Defaults for a run of `duration` with `seed`: 3 replicas, 500 msg/s, 120 s drain
    /// timeout, 2 s heartbeat, folder under [`default_out_dir`].
    pub fn new(duration: Duration, seed: u64) -> Self {
        ScenarioOptions {
            duration,
            seed,
            replicas: 3,
            rate: 500.0,
            drain_timeout: Duration::from_secs(120),
            out_dir: default_out_dir(),
            keep: false,
            broken: None,
            postgres_settings: Vec::new(),
            heartbeat_secs: 2,
            progress: false,
        }
    }
}

/// `<target dir>/chaos`, found from the current executable (`target/<profile>/…` or
/// `target/<profile>/deps/…`); `./target/chaos` when that fails.
pub fn default_out_dir() -> PathBuf {
    let fallback = PathBuf::from("target").join("chaos");
    let Ok(exe) = std::env::current_exe() else {
        return fallback;
    };
    let mut dir = exe.parent();
    if dir
        .and_then(|d| d.file_name())
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir = dir.and_then(|d| d.parent());
    }
    // `dir` is target/<profile>; its parent is the target directory.
    dir.and_then(|d| d.parent())
        .map(|t| t.join("chaos"))
        .unwrap_or(fallback)
}

/// The workload of a run: enough votes for `rate` × (duration + margin) messages.
pub(crate) fn workload_spec(opts: &ScenarioOptions) -> WorkloadSpec {
    crate::load::steady_workload(opts.rate * (opts.duration.as_secs_f64() + 20.0), opts.seed)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        for s in Scenario::ALL.into_iter().chain(Scenario::CLUSTER) {
            assert_eq!(s.name().parse::<Scenario>().expect("known"), s);
            assert!(!s.faults().is_empty());
        }
        let e = "nope".parse::<Scenario>().expect_err("unknown");
        assert!(e.to_string().contains("kill-restart"), "{e}");
        assert!(e.to_string().contains("cluster-mixed"), "{e}");
    }

    #[test]
    fn cluster_scenarios_and_only_they_need_a_broker_cluster() {
        for s in Scenario::ALL {
            assert!(!s.uses_broker_cluster(), "{s}");
        }
        for s in Scenario::CLUSTER {
            assert!(s.uses_broker_cluster(), "{s}");
        }
        let kinds: HashSet<FaultKind> = Scenario::ClusterMixed
            .faults()
            .iter()
            .chain(Scenario::ClusterMixed.companions())
            .copied()
            .collect();
        for s in Scenario::CLUSTER {
            for k in s.faults() {
                assert!(kinds.contains(k), "{k} missing from cluster-mixed");
            }
        }
        assert!(kinds.contains(&FaultKind::Kill) && kinds.contains(&FaultKind::Pause));
    }

    #[test]
    fn broken_builds_round_trip_by_name() {
        for b in Broken::ALL {
            assert_eq!(b.name().parse::<Broken>().expect("known"), b);
            assert!(b.env().starts_with(vote_aggregator::fault::ENV_PREFIX));
        }
        let e = "nope".parse::<Broken>().expect_err("unknown");
        assert!(e.to_string().contains("synchronous-commit-off"), "{e}");
    }

    #[test]
    fn mixed_uses_every_kind_of_fault() {
        let kinds: HashSet<FaultKind> = Scenario::Mixed.faults().iter().copied().collect();
        for s in Scenario::ALL {
            for k in s.faults() {
                assert!(kinds.contains(k), "{k} missing from mixed");
            }
        }
    }
}
