//! The `commit-ack` nemesis: kill a replica EXACTLY between a batch's COMMIT and its ack,
//! the window exactly-once exists for.
//!
//! It restarts one replica with the aggregator's test-only hook
//! `VOTES_FAULT_CRASH_BEFORE_ACK=N` (compiled in with the `fault-injection` feature), which
//! aborts the process right after the N-th batch committed and before it is acked. The
//! broker then redelivers votes that ARE already counted; another replica (or this one,
//! restarted) must count none of them again. Verified by the exit (signal SIGABRT) and by
//! the hook's own line in the replica's log ("fault-injection: aborting after commit N").
//! Then the replica is started again without the hook.

use std::time::Duration;

use anyhow::bail;
use rand::Rng as _;
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;
use vote_testkit::signal::{self, Signal};

use super::{Clock, Fault, FaultKind, not_attempted, one_line, pick_replica};
use crate::cluster::Cluster;

use vote_aggregator::fault::{CRASH_BEFORE_ACK_ENV, CRASH_LINE as HOOK_LINE};

/// Arms the commit-ack hook on one replica.
#[derive(Debug, Clone)]
pub struct CommitAckNemesis {
    /// The hook fires at a batch drawn from `1..=max_batch`.
    pub max_batch: u64,
    /// How long the armed replica may take to reach its N-th commit.
    pub abort_timeout: Duration,
}

impl Default for CommitAckNemesis {
    fn default() -> Self {
        CommitAckNemesis {
            max_batch: 5,
            abort_timeout: Duration::from_secs(30),
        }
    }
}

impl CommitAckNemesis {
    /// Stops replica `i` (SIGTERM) and starts it again armed to abort after its `n`-th
    /// commit. It may well abort before it is even reported ready: not an error here.
    ///
    /// # Errors
    /// When the stop fails.
    pub async fn arm(&self, cluster: &mut Cluster, i: usize, n: u64) -> anyhow::Result<()> {
        cluster.fleet.stop(i).await?;
        cluster
            .fleet
            .set_replica_env(i, CRASH_BEFORE_ACK_ENV, Some(&n.to_string()));
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
    /// hook, after its `n`-th commit.
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
                    "armed replica still running {:?} later: it never reached commit {n} (no load?)",
                    self.abort_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = cluster.fleet.exit_status(i);
        if !signal::died_of(status, Signal::ABORT) {
            bail!("armed replica exited with {status:?}, not by SIGABRT");
        }
        let hook = format!("{HOOK_LINE} {n},");
        if !cluster.log_since_last_start(i).contains(&hook) {
            bail!("replica died of SIGABRT but its log lacks {hook:?}: not the commit-ack hook");
        }
        Ok(format!(
            "aborted by the hook after commit {n}, before its ack (SIGABRT, {:.1}s after start)",
            t.elapsed().as_secs_f64()
        ))
    }

    /// Starts replica `i` again without the hook (killing it first if it still runs).
    ///
    /// # Errors
    /// When it does not become ready.
    pub async fn disarm(&self, cluster: &mut Cluster, i: usize) -> anyhow::Result<()> {
        cluster.fleet.set_replica_env(i, CRASH_BEFORE_ACK_ENV, None);
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
            return not_attempted(FaultKind::CommitAck, clock, "fewer than 2 replicas running");
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
            kind: FaultKind::CommitAck,
            target: cluster.fleet.name(i).to_owned(),
            at,
            healed,
            outcome,
            heal_error,
        }
    }
}
