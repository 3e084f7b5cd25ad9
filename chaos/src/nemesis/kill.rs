//! The `kill` nemesis: SIGKILL one replica (never the last one running), leave it down
//! for a moment, start it again.
//!
//! A killed replica cannot finish anything: a transaction in flight rolls back (or had
//! committed), and every delivery it had not acked goes back to the queue. Verified by:
//! the child is reaped with signal 9 and its pid is gone from `/proc`; the restart is
//! verified by `/readyz` 200 and the fault-injection marker in the new process's log.

use std::time::Duration;

use anyhow::{Context, bail};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;
use vote_testkit::signal::{self, Signal};

use super::{Clock, Fault, FaultKind, between, not_attempted, one_line, pick_replica};
use crate::cluster::Cluster;

/// SIGKILL + restart.
#[derive(Debug, Clone)]
pub struct KillNemesis {
    /// How long a killed replica stays down before its restart, in seconds (min, max).
    pub down_secs: (f64, f64),
}

impl Default for KillNemesis {
    fn default() -> Self {
        KillNemesis {
            down_secs: (0.2, 1.5),
        }
    }
}

impl KillNemesis {
    /// Sends SIGKILL to replica `i` and verifies it died of it and its pid is gone.
    ///
    /// # Errors
    /// When it was not running or did not die of SIGKILL.
    pub async fn kill(&self, cluster: &mut Cluster, i: usize) -> anyhow::Result<String> {
        let pid = cluster
            .fleet
            .pid(i)
            .with_context(|| format!("replica {} is not running", cluster.fleet.name(i)))?;
        // Reaps the child and checks /proc/<pid> is gone (or belongs to a new process).
        cluster.fleet.kill(i).await?;
        let status = cluster.fleet.exit_status(i);
        if !signal::died_of(status, Signal::KILL) {
            bail!("replica exited with {status:?}, not by SIGKILL");
        }
        if cluster.fleet.pid(i).is_some() {
            bail!("replica still has a live process after SIGKILL");
        }
        Ok(format!("pid {pid} died of SIGKILL, gone from /proc"))
    }

    /// Starts replica `i` again and waits until it is ready.
    ///
    /// # Errors
    /// When it does not become ready (the error quotes its log).
    pub async fn restart(&self, cluster: &mut Cluster, i: usize) -> anyhow::Result<Duration> {
        let started = Instant::now();
        cluster.fleet.start_replica(i).await?;
        cluster.ensure_fault_build(i).await?;
        Ok(started.elapsed())
    }

    /// Kills a random replica, waits, restarts it.
    pub async fn strike(
        &self,
        cluster: &mut Cluster,
        rng: &mut ChaCha8Rng,
        clock: &Clock,
    ) -> Fault {
        let Some(i) = pick_replica(cluster, rng) else {
            return not_attempted(FaultKind::Kill, clock, "fewer than 2 replicas running");
        };
        let down = between(rng, self.down_secs.0, self.down_secs.1);
        let at = clock.now();
        let outcome = self.kill(cluster, i).await.map_err(|e| one_line(&e));
        tokio::time::sleep(down).await;
        let healed = clock.now();
        let (outcome, heal_error) = match self.restart(cluster, i).await {
            Ok(ready) => (
                outcome.map(|e| {
                    format!(
                        "{e}; down {:.1}s, restarted and ready in {:.1}s",
                        down.as_secs_f64(),
                        ready.as_secs_f64()
                    )
                }),
                None,
            ),
            Err(e) => (outcome, Some(format!("restart failed: {}", one_line(&e)))),
        };
        Fault {
            kind: FaultKind::Kill,
            target: cluster.fleet.name(i).to_owned(),
            at,
            healed,
            outcome,
            heal_error,
        }
    }
}
