//! The hook nemeses: kill a replica EXACTLY inside a window of the protocol, with the
//! aggregator's test-only hooks (compiled in with the `fault-injection` feature).
//!
//! - `commit-ack`: between a batch's COMMIT and its ack, the window exactly-once exists
//!   for (`VOTES_FAULT_CRASH_BEFORE_ACK=N`: abort right after the N-th batch committed).
//!   The broker then redelivers votes that ARE already counted; another replica (or this
//!   one, restarted) must count none of them again.
//! - `relay-confirm`: between the results relay's publisher confirms and the delete of
//!   those events from the outbox (`VOTES_FAULT_CRASH_BEFORE_OUTBOX_DELETE=N`: abort
//!   after the N-th confirmed round). The events are published again by another relay:
//!   repeats the results consumer must drop, with nothing missing.
//!
//! It restarts one replica with the hook armed, and verifies the kill by the exit
//! (signal SIGABRT) and by the hook's own line in the replica's log. Then the replica is
//! started again without the hook.

use std::time::Duration;

use anyhow::bail;
use rand::Rng as _;
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;
use vote_testkit::signal::{self, Signal};

use super::{Clock, Fault, FaultKind, not_attempted, one_line, pick_replica};
use crate::cluster::Cluster;

use vote_aggregator::fault::{
    CRASH_BEFORE_ACK_ENV, CRASH_BEFORE_OUTBOX_DELETE_ENV, CRASH_LINE, RELAY_CRASH_LINE,
};

/// Which protocol window a hook nemesis kills in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Between a batch's COMMIT and its ack.
    CommitAck,
    /// Between the results relay's confirms and its delete.
    RelayConfirm,
}

impl Window {
    fn kind(self) -> FaultKind {
        match self {
            Window::CommitAck => FaultKind::CommitAck,
            Window::RelayConfirm => FaultKind::RelayConfirm,
        }
    }

    fn env(self) -> &'static str {
        match self {
            Window::CommitAck => CRASH_BEFORE_ACK_ENV,
            Window::RelayConfirm => CRASH_BEFORE_OUTBOX_DELETE_ENV,
        }
    }

    fn hook_line(self) -> &'static str {
        match self {
            Window::CommitAck => CRASH_LINE,
            Window::RelayConfirm => RELAY_CRASH_LINE,
        }
    }

    fn what(self, n: u64) -> String {
        match self {
            Window::CommitAck => format!("after commit {n}, before its ack"),
            Window::RelayConfirm => format!("after relay round {n}'s confirms, before its delete"),
        }
    }
}

/// Arms a hook on one replica.
#[derive(Debug, Clone)]
pub struct CommitAckNemesis {
    /// Where the hook kills.
    pub window: Window,
    /// The hook fires at a batch (or relay round) drawn from `1..=max_batch`.
    pub max_batch: u64,
    /// How long the armed replica may take to reach its N-th commit.
    pub abort_timeout: Duration,
}

impl Default for CommitAckNemesis {
    fn default() -> Self {
        CommitAckNemesis {
            window: Window::CommitAck,
            max_batch: 5,
            abort_timeout: Duration::from_secs(30),
        }
    }
}

impl CommitAckNemesis {
    /// The `relay-confirm` nemesis.
    pub fn relay_confirm() -> Self {
        CommitAckNemesis {
            window: Window::RelayConfirm,
            ..CommitAckNemesis::default()
        }
    }

    /// Stops replica `i` (SIGTERM) and starts it again armed to abort after its `n`-th
    /// commit. It may well abort before it is even reported ready: not an error here.
    ///
    /// # Errors
    /// When the stop fails.
    pub async fn arm(&self, cluster: &mut Cluster, i: usize, n: u64) -> anyhow::Result<()> {
        cluster.fleet.stop(i).await?;
        cluster
            .fleet
            .set_replica_env(i, self.window.env(), Some(&n.to_string()));
        if let Err(e) = cluster.fleet.start_replica(i).await
            && !self.exiting(cluster, i).await
        {
            return Err(e);
        }
        Ok(())
    }

    /// Whether replica `i` has exited or is exiting. A process that aborts from a worker
    /// thread shows its main thread as a zombie (no live pid) while the rest of it is
    /// still dumping core and cannot be reaped yet: wait (bounded) until it can.
    async fn exiting(&self, cluster: &mut Cluster, i: usize) -> bool {
        let t = Instant::now();
        while cluster.fleet.is_running(i) {
            if cluster.fleet.pid(i).is_some() || t.elapsed() >= self.abort_timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Waits until the armed replica `i` died, and verifies it died by SIGABRT from the
    /// hook, after its `n`-th commit (or relay round).
    ///
    /// # Errors
    /// When it is still running after the timeout, or died another way.
    pub async fn await_abort(
        &self,
        cluster: &mut Cluster,
        i: usize,
        n: u64,
    ) -> anyhow::Result<String> {
        let t = Instant::now();
        while cluster.fleet.is_running(i) {
            if t.elapsed() >= self.abort_timeout {
                bail!(
                    "armed replica still running {:?} later: it never reached round {n} of its hook (no load?)",
                    self.abort_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = cluster.fleet.exit_status(i);
        if !signal::died_of(status, Signal::ABORT) {
            bail!("armed replica exited with {status:?}, not by SIGABRT");
        }
        let hook = format!("{} {n},", self.window.hook_line());
        if !cluster.log_since_last_start(i).contains(&hook) {
            bail!(
                "replica died of SIGABRT but its log lacks {hook:?}: not the {} hook",
                self.window.kind()
            );
        }
        Ok(format!(
            "aborted by the hook {} (SIGABRT, {:.1}s after start)",
            self.window.what(n),
            t.elapsed().as_secs_f64()
        ))
    }

    /// Starts replica `i` again without the hook (killing it first if it still runs).
    ///
    /// # Errors
    /// When it does not become ready.
    pub async fn disarm(&self, cluster: &mut Cluster, i: usize) -> anyhow::Result<()> {
        cluster.fleet.set_replica_env(i, self.window.env(), None);
        if cluster.fleet.is_running(i) {
            cluster.fleet.kill(i).await?;
        }
        cluster.fleet.start_replica(i).await?;
        cluster.ensure_fault_build(i).await
    }

    /// Arms a random replica at a random small batch number, waits for the abort,
    /// restarts it clean.
    pub async fn strike(
        &self,
        cluster: &mut Cluster,
        rng: &mut ChaCha8Rng,
        clock: &Clock,
    ) -> Fault {
        let Some(i) = pick_replica(cluster, rng) else {
            return not_attempted(self.window.kind(), clock, "fewer than 2 replicas running");
        };
        let n = rng.random_range(1..=self.max_batch.max(1));
        let at = clock.now();
        let outcome = match self.arm(cluster, i, n).await {
            Ok(()) => self.await_abort(cluster, i, n).await,
            Err(e) => Err(e),
        }
        .map_err(|e| one_line(&e));
        let healed = clock.now();
        let heal_error = self
            .disarm(cluster, i)
            .await
            .err()
            .map(|e| format!("restart without the hook failed: {}", one_line(&e)));
        Fault {
            kind: self.window.kind(),
            target: cluster.fleet.name(i).to_owned(),
            at,
            healed,
            outcome,
            heal_error,
        }
    }
}
