//! The `broker-node` nemesis: faults of ONE node of a three-node RabbitMQ cluster while
//! the other two keep the votes queue (a quorum queue with a member on every node).
//!
//! - kill: SIGKILL the node that LEADS the votes queue (the broker is asked which), hold
//!   it down, start it again;
//! - partition: disconnect a node from the cluster's network (its clients' port stays)
//!   until its peers see it gone and it paused itself, hold, reconnect;
//! - restart: stop the next node in turn gracefully and start it again, as one step of a
//!   rolling upgrade (successive strikes walk the nodes round).
//!
//! Each is VERIFIED: the container exited (kill, restart) and the two other nodes report
//! the node not running (all three); for a kill, the queue's leader moved to another
//! node; for a partition, the cut node paused itself (`pause_minority`). Each heals
//! fully before it returns: the node runs, every node sees all three running, and the
//! queue has all three members online with a leader (so the next fault never strikes a
//! cluster that is still short of a node).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;
use vote_testkit::infra::BrokerCluster;

use super::{Clock, Fault, FaultKind, between, not_attempted, one_line};

/// How long the others may take to see a node gone, and a cut node to pause itself (a
/// partition is noticed after about `net_ticktime`, 10 s on the test cluster).
const SEEN_GONE_TIMEOUT: Duration = Duration::from_secs(45);

/// How long a node may take to rejoin and the queue to get its members back.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Faults of one broker node (see the module docs).
#[derive(Debug, Default)]
pub struct BrokerNodeNemesis {
    /// The node the next rolling-restart step restarts.
    next_restart: AtomicUsize,
}

impl Clone for BrokerNodeNemesis {
    fn clone(&self) -> Self {
        BrokerNodeNemesis {
            next_restart: AtomicUsize::new(self.next_restart.load(Ordering::SeqCst)),
        }
    }
}

impl BrokerNodeNemesis {
    /// One fault of `kind` (a broker-node kind) on the cluster's brokers. The broker
    /// cluster is taken out of `cluster` while it runs, so replica faults may run at the
    /// same time (see [`super::Nemeses::strike_together`]).
    pub async fn strike(
        &self,
        kind: FaultKind,
        brokers: Option<&BrokerCluster>,
        queue: &str,
        rng: &mut ChaCha8Rng,
        clock: &Clock,
    ) -> Fault {
        let Some(brokers) = brokers else {
            return not_attempted(kind, clock, "the scenario runs no broker cluster");
        };
        let at = clock.now();
        let hold = between(rng, 2.0, 4.0);
        let result = match kind {
            FaultKind::BrokerNodeKill => self.kill_leader(brokers, queue, hold).await,
            FaultKind::BrokerNodePartition => {
                let i = rand::Rng::random_range(rng, 0..brokers.len());
                self.partition(brokers, queue, i, hold).await
            }
            _ => {
                let i = self.next_restart.fetch_add(1, Ordering::SeqCst) % brokers.len();
                self.restart(brokers, queue, i).await
            }
        };
        let (target, outcome, heal_error) = match result {
            Ok(Struck { target, evidence }) => (target, Ok(evidence), None),
            Err(Failed { target, error }) => {
                let e = one_line(&error);
                (
                    target,
                    Err(e.clone()),
                    Some(format!("broker node not recovered: {e}")),
                )
            }
        };
        Fault {
            kind,
            target,
            at,
            healed: clock.now(),
            outcome,
            heal_error,
        }
    }

    /// Kills the queue leader's node, verifies the leader moved, restarts it.
    async fn kill_leader(
        &self,
        brokers: &BrokerCluster,
        queue: &str,
        hold: Duration,
    ) -> Result<Struck, Failed> {
        let leader = brokers
            .queue_leader(queue)
            .await
            .map_err(|e| Failed::on("-", e))?;
        let name = brokers.node_name(leader);
        let t = Instant::now();
        let evidence = async {
            brokers.kill_node(leader).await?;
            if brokers.state(leader).await?.running {
                bail!("the container still runs after SIGKILL");
            }
            let seen = seen_gone(brokers, leader).await?;
            let moved = new_leader(brokers, queue, leader).await?;
            tokio::time::sleep(hold).await;
            brokers.start_node(leader).await?;
            healed(brokers, queue).await?;
            Ok(format!(
                "leader {name} SIGKILLed; the others saw it gone after {:.1}s; the leader moved to {moved}; restarted after a {:.1}s hold, rejoined with 3/3 members online {:.1}s after the kill",
                seen.as_secs_f64(),
                hold.as_secs_f64(),
                t.elapsed().as_secs_f64(),
            ))
        }
        .await;
        struck(&name, evidence)
    }

    /// Cuts node `i` from the cluster network, verifies its peers see it gone and it
    /// paused itself, heals.
    async fn partition(
        &self,
        brokers: &BrokerCluster,
        queue: &str,
        i: usize,
        hold: Duration,
    ) -> Result<Struck, Failed> {
        let name = brokers.node_name(i);
        let t = Instant::now();
        let evidence = async {
            brokers.isolate_node(i).await?;
            // Both sides must see the partition before it heals: the others see the node
            // gone, and the node itself pauses (a partition healed before that may leave
            // the cluster split for good). Both times are from the cut.
            let seen = async {
                seen_gone(brokers, i).await?;
                let gone = t.elapsed();
                brokers.wait_paused(i, SEEN_GONE_TIMEOUT).await?;
                anyhow::Ok((gone, t.elapsed()))
            }
            .await;
            if seen.is_ok() {
                tokio::time::sleep(hold).await;
            }
            // Reconnect and heal fully even when the partition was not seen as expected:
            // the next fault must never strike a split cluster.
            let reconnected = brokers.reconnect_node(i).await;
            let rejoined = match reconnected {
                Ok(()) => healed(brokers, queue).await,
                Err(e) => Err(e),
            };
            let (gone, paused) = seen?;
            rejoined?;
            Ok(format!(
                "{name} cut from the cluster network (its AMQP port kept); the others saw it gone {:.1}s after the cut, it paused itself by {:.1}s; reconnected, all 3 running with 3/3 members online {:.1}s after the cut",
                gone.as_secs_f64(),
                paused.as_secs_f64(),
                t.elapsed().as_secs_f64(),
            ))
        }
        .await;
        struck(&name, evidence)
    }

    /// Stops node `i` gracefully, verifies it is down, starts it, waits until it rejoined.
    async fn restart(
        &self,
        brokers: &BrokerCluster,
        queue: &str,
        i: usize,
    ) -> Result<Struck, Failed> {
        let name = brokers.node_name(i);
        let t = Instant::now();
        let evidence = async {
            let before = brokers.state(i).await?.started_at;
            brokers.stop_node(i).await?;
            if brokers.state(i).await?.running {
                bail!("the container still runs after docker stop");
            }
            let seen = seen_gone(brokers, i).await?;
            brokers.start_node(i).await?;
            let after = brokers.state(i).await?.started_at;
            if after == before {
                bail!("the container did not start again (start time {after})");
            }
            healed(brokers, queue).await?;
            Ok(format!(
                "{name} stopped gracefully (the others saw it gone after {:.1}s) and started again; rejoined with 3/3 members online {:.1}s after the stop",
                seen.as_secs_f64(),
                t.elapsed().as_secs_f64(),
            ))
        }
        .await;
        struck(&name, evidence)
    }
}

/// A verified fault: whom it hit and the evidence.
struct Struck {
    target: String,
    evidence: String,
}

/// A fault that could not be verified or healed.
struct Failed {
    target: String,
    error: anyhow::Error,
}

/// The outcome of a fault on the node called `name`.
fn struck(name: &str, evidence: anyhow::Result<String>) -> Result<Struck, Failed> {
    evidence
        .map(|evidence| Struck {
            target: name.to_owned(),
            evidence,
        })
        .map_err(|e| Failed::on(name, e))
}

impl Failed {
    fn on(target: &str, error: anyhow::Error) -> Self {
        Failed {
            target: target.to_owned(),
            error,
        }
    }
}

/// Waits until both other nodes report node `i` not running; returns how long that took.
async fn seen_gone(brokers: &BrokerCluster, i: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let name = brokers.node_name(i);
    let others: Vec<usize> = (0..brokers.len()).filter(|&n| n != i).collect();
    loop {
        let mut all_see_it = true;
        for &n in &others {
            let running = brokers.running_nodes(n).await?;
            all_see_it &= !running.contains(&name);
        }
        if all_see_it {
            return Ok(t.elapsed());
        }
        if t.elapsed() > SEEN_GONE_TIMEOUT {
            bail!("after {SEEN_GONE_TIMEOUT:?} the other nodes still see {name} running");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `queue` is led by a node other than `old` (asked of the other nodes).
async fn new_leader(brokers: &BrokerCluster, queue: &str, old: usize) -> anyhow::Result<String> {
    let t = Instant::now();
    loop {
        for n in (0..brokers.len()).filter(|&n| n != old) {
            if let Ok(q) = brokers.queue_members(n, queue).await
                && let Some(leader) = q.leader
                && leader != brokers.node_name(old)
            {
                return Ok(leader);
            }
        }
        if t.elapsed() > SEEN_GONE_TIMEOUT {
            bail!(
                "the queue's leader did not move off {}",
                brokers.node_name(old)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until every node sees all nodes running and the queue has all members online.
async fn healed(brokers: &BrokerCluster, queue: &str) -> anyhow::Result<()> {
    brokers
        .wait_formed(REJOIN_TIMEOUT)
        .await
        .context("the node did not rejoin")?;
    brokers
        .wait_queue_members(queue, REJOIN_TIMEOUT)
        .await
        .context("the queue did not get its members back")
}
