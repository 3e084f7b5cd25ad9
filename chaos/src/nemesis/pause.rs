//! The `pause` nemesis: freeze one replica with SIGSTOP for longer than the broker's
//! heartbeat timeout, then SIGCONT it: the "zombie".
//!
//! While it is frozen its TCP connections stay open but silent; the broker misses its
//! heartbeats, closes the connection and hands its unacked deliveries to another replica.
//! When it wakes up it may finish a commit it had in flight (late, after another replica
//! counted the same votes: the UUID key makes that insert nothing) and its acks fail on
//! the dead channel. Verified by `/proc/<pid>/stat` showing state `T` after SIGSTOP and
//! not `T` after SIGCONT, and by the replica's own `broker_connection_failures_total`
//! rising after it wakes up: the broker had dropped its session (so its deliveries really
//! went elsewhere).

use std::time::Duration;

use anyhow::bail;
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

use super::{Clock, Fault, FaultKind, between, not_attempted, one_line, pick_replica};
use crate::cluster::Cluster;

/// The service's counter of lost broker sessions and failed connection attempts.
const BROKER_FAILURES: &str = vote_aggregator::metrics::names::BROKER_CONNECTION_FAILURES_TOTAL;

/// SIGSTOP + SIGCONT.
#[derive(Debug, Clone)]
pub struct PauseNemesis {
    /// How long a replica stays frozen, in seconds (min, max).
    pub hold_secs: (f64, f64),
    /// How long after SIGCONT the replica has to notice its session is gone.
    pub notice_timeout: Duration,
}

impl Default for PauseNemesis {
    fn default() -> Self {
        PauseNemesis::for_heartbeat(2)
    }
}

impl PauseNemesis {
    /// A pause long enough for the broker to give up on a replica whose heartbeat is
    /// `heartbeat_secs` (RabbitMQ closes the connection after about two missed
    /// heartbeats): at least three heartbeat periods, plus margin.
    pub fn for_heartbeat(heartbeat_secs: u16) -> Self {
        let hb = f64::from(heartbeat_secs.max(1));
        PauseNemesis {
            hold_secs: (3.0 * hb + 1.0, 3.0 * hb + 3.0),
            notice_timeout: Duration::from_secs(15),
        }
    }

    /// Freezes replica `i` (SIGSTOP) and verifies `/proc` shows it stopped.
    ///
    /// # Errors
    /// When it is not running or does not stop.
    pub fn pause(&self, cluster: &mut Cluster, i: usize) -> anyhow::Result<String> {
        cluster.fleet.pause(i)?;
        if !cluster.fleet.is_paused(i) {
            bail!("/proc does not show the replica stopped after SIGSTOP");
        }
        Ok(format!(
            "pid {} frozen (state T)",
            cluster.fleet.pid(i).unwrap_or_default()
        ))
    }

    /// Wakes replica `i` (SIGCONT) and verifies `/proc` shows it running again.
    ///
    /// # Errors
    /// When it is gone or stays stopped.
    pub fn resume(&self, cluster: &mut Cluster, i: usize) -> anyhow::Result<()> {
        cluster.fleet.resume(i)?;
        if cluster.fleet.is_paused(i) {
            bail!("/proc still shows the replica stopped after SIGCONT");
        }
        Ok(())
    }

    /// How many broker sessions replica `i`'s current process has lost (or failed to
    /// open) so far, from its own metrics; `None` when it does not answer.
    async fn sessions_lost(cluster: &Cluster, i: usize) -> Option<f64> {
        let scrape = cluster.fleet.scrape(i).await.ok()?;
        Some(scrape.get(BROKER_FAILURES).unwrap_or(0.0))
    }

    /// Freezes a random replica, holds, wakes it, and waits for it to notice that the
    /// broker dropped it and to be ready again.
    pub async fn strike(
        &self,
        cluster: &mut Cluster,
        rng: &mut ChaCha8Rng,
        clock: &Clock,
    ) -> Fault {
        let Some(i) = pick_replica(cluster, rng) else {
            return not_attempted(FaultKind::Pause, clock, "fewer than 2 replicas running");
        };
        let hold = between(rng, self.hold_secs.0, self.hold_secs.1);
        let lost_before = Self::sessions_lost(cluster, i).await.unwrap_or(0.0);
        let at = clock.now();
        let paused = self.pause(cluster, i);
        if paused.is_ok() {
            tokio::time::sleep(hold).await;
        }
        let resumed = self.resume(cluster, i);
        let healed = clock.now();
        let mut outcome = match (paused, resumed) {
            (Ok(evidence), Ok(())) => Ok(format!(
                "{evidence} for {:.1}s, then resumed",
                hold.as_secs_f64()
            )),
            (Err(e), _) | (Ok(_), Err(e)) => Err(one_line(&e)),
        };
        // The zombie must find out its session is gone (its deliveries were handed out).
        if let Ok(evidence) = &outcome {
            let deadline = Instant::now() + self.notice_timeout;
            loop {
                if Self::sessions_lost(cluster, i)
                    .await
                    .is_some_and(|n| n > lost_before)
                {
                    outcome = Ok(format!(
                        "{evidence}; the broker had dropped its session (deliveries requeued)"
                    ));
                    break;
                }
                if Instant::now() >= deadline {
                    outcome = Err(format!(
                        "{evidence}, but the replica never reported a lost broker session within \
                         {:?}: the pause did not outlast the heartbeat timeout",
                        self.notice_timeout
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let heal_error = cluster
            .fleet
            .wait_ready(i, Duration::from_secs(60))
            .await
            .err()
            .map(|e| format!("not ready after resume: {}", one_line(&e)));
        Fault {
            kind: FaultKind::Pause,
            target: cluster.fleet.name(i).to_owned(),
            at,
            healed,
            outcome,
            heal_error,
        }
    }
}
