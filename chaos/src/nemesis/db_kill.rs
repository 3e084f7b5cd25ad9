//! The `db-kill` nemesis: SIGKILL the PostgreSQL server right after a replica committed
//! (and so acked) a batch, then start it again and let it run crash recovery.
//!
//! This is the durability fault. A clean stop (the `database` nemesis) writes everything
//! out before it exits; a SIGKILL of the postmaster takes every backend and the WAL
//! buffers in shared memory with it, so only what was written to the WAL files before the
//! kill survives. A replica acks a batch only after its COMMIT returned, and with
//! `synchronous_commit` on (the server default, which the scenarios that use this fault
//! start PostgreSQL with) COMMIT returns only once its WAL is flushed: every acked vote
//! must survive. A build that commits with `synchronous_commit=off` is acked before its
//! WAL is written and loses acked votes here, which the chaos suite proves it catches.
//!
//! The kill is timed to hurt: the nemesis polls the replicas' `/metrics` and sends SIGKILL
//! the moment one's `batches_committed_total` rises (its ack follows at once), while
//! commits are still in flight on the others.
//!
//! Verified by: the container exited with code 137 (SIGKILL); after the start, a new
//! container start time and a new postmaster pid, PostgreSQL's own crash-recovery line in
//! the container log since the kill, and a real connection accepted.

use std::time::Duration;

use anyhow::bail;
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;
use vote_testkit::infra::ContainerState;

use super::broker::{short_id, short_time};
use super::{Clock, Fault, FaultKind, between, one_line};
use crate::cluster::Cluster;

/// What PostgreSQL logs when it starts after a crash (not after a clean shutdown).
pub const CRASH_RECOVERY_LINE: &str = "automatic recovery in progress";
/// Docker's exit code of a container whose main process died of SIGKILL (128 + 9).
const SIGKILL_EXIT_CODE: i64 = 128 + 9;

/// SIGKILLs PostgreSQL right after a commit, then starts it again.
#[derive(Debug, Clone)]
pub struct DbKillNemesis {
    /// How long to wait for a replica to commit a batch (there is no load otherwise).
    pub commit_timeout: Duration,
    /// Pause between two rounds of scrapes while waiting for a commit.
    pub poll: Duration,
    /// How long PostgreSQL stays down before it is started again, in seconds (min, max).
    pub down_secs: (f64, f64),
}

impl Default for DbKillNemesis {
    fn default() -> Self {
        DbKillNemesis {
            commit_timeout: Duration::from_secs(15),
            poll: Duration::from_millis(2),
            down_secs: (0.2, 1.0),
        }
    }
}

/// What the kill did, for the evidence line.
struct Killed {
    /// State before the kill.
    before: ContainerState,
    /// Replica whose commit triggered the kill, and its batch counter before → after.
    trigger: (String, u64, u64),
    /// From seeing the commit until Docker's kill returned (the signal delivered; Docker
    /// answers a SIGKILL once the container is gone).
    to_signal: Duration,
    /// UNIX second of the kill (the log is read from there).
    at_unix: i64,
}

impl DbKillNemesis {
    /// Waits until a running replica's `batches_committed_total` rises and returns it
    /// with the counter before and after.
    ///
    /// # Errors
    /// When no replica committed a batch within [`DbKillNemesis::commit_timeout`].
    async fn await_commit(&self, cluster: &mut Cluster) -> anyhow::Result<(String, u64, u64)> {
        let live: Vec<usize> = (0..cluster.replicas())
            .filter(|&i| cluster.fleet.is_running(i) && !cluster.fleet.is_paused(i))
            .collect();
        let fleet = &cluster.fleet;
        let scrape_all = async || {
            futures_util::future::join_all(live.iter().map(async |&i| {
                fleet
                    .scrape_within(i, Duration::from_secs(1))
                    .await
                    .ok()
                    .map(|s| s.batches_committed())
            }))
            .await
        };
        let baseline = scrape_all().await;
        let started = Instant::now();
        loop {
            let now = scrape_all().await;
            for (k, (b, n)) in baseline.iter().zip(&now).enumerate() {
                if let (Some(b), Some(n)) = (b, n)
                    && n > b
                {
                    return Ok((fleet.name(live[k]).to_owned(), *b, *n));
                }
            }
            if started.elapsed() >= self.commit_timeout {
                bail!(
                    "no replica committed a batch within {:?} (no load?): PostgreSQL not killed",
                    self.commit_timeout
                );
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Waits for a commit, SIGKILLs PostgreSQL at once and verifies it died of it.
    async fn kill(&self, cluster: &mut Cluster) -> anyhow::Result<Killed> {
        let id = cluster.servers.postgres_container_id().to_owned();
        let before = cluster.servers.container_state(&id).await?;
        if !before.running {
            bail!("PostgreSQL was not running before the fault");
        }
        let trigger = self.await_commit(cluster).await?;
        let seen = std::time::Instant::now();
        let at_unix = chrono::Utc::now().timestamp();
        let delivered = cluster.servers.kill_postgres().await?;
        let to_signal = delivered.saturating_duration_since(seen);
        let dead = cluster.servers.container_state(&id).await?;
        if dead.running {
            bail!("PostgreSQL container still running after SIGKILL");
        }
        if dead.exit_code != SIGKILL_EXIT_CODE {
            bail!(
                "PostgreSQL container exited with code {}, not {SIGKILL_EXIT_CODE} (SIGKILL)",
                dead.exit_code
            );
        }
        Ok(Killed {
            before,
            trigger,
            to_signal,
            at_unix,
        })
    }

    /// Starts PostgreSQL again (waiting until it accepts connections) and verifies it is a
    /// new server process that ran crash recovery.
    ///
    /// # Errors
    /// When it does not start, or did not really restart from a crash.
    async fn restart(&self, cluster: &Cluster, killed: &Killed) -> anyhow::Result<String> {
        let id = cluster.servers.postgres_container_id().to_owned();
        let t = Instant::now();
        cluster.servers.start_postgres().await?;
        let ready_after = t.elapsed();
        let after = cluster.servers.container_state(&id).await?;
        let before = &killed.before;
        if !after.running || after.started_at == before.started_at || after.pid == before.pid {
            bail!(
                "PostgreSQL did not come back as a new process (pid {} → {}, start {} → {}, running {})",
                before.pid,
                after.pid,
                before.started_at,
                after.started_at,
                after.running
            );
        }
        let log = cluster
            .servers
            .container_log_since(&id, killed.at_unix)
            .await?;
        if !log.contains(CRASH_RECOVERY_LINE) {
            bail!(
                "PostgreSQL restarted without crash recovery (its log lacks {CRASH_RECOVERY_LINE:?})"
            );
        }
        Ok(format!(
            "container {} started again, crash recovery, accepting connections {:.1}s later (postmaster pid {} → {}, start time {} → {})",
            short_id(&id),
            ready_after.as_secs_f64(),
            before.pid,
            after.pid,
            short_time(&before.started_at),
            short_time(&after.started_at),
        ))
    }

    /// One kill: wait for a commit, SIGKILL, stay down a moment, start, verify.
    pub async fn strike(
        &self,
        cluster: &mut Cluster,
        rng: &mut ChaCha8Rng,
        clock: &Clock,
    ) -> Fault {
        let down = between(rng, self.down_secs.0, self.down_secs.1);
        let at = clock.now();
        let killed = self.kill(cluster).await;
        let id = cluster.servers.postgres_container_id().to_owned();
        let (outcome, heal_error) = match killed {
            Ok(killed) => {
                tokio::time::sleep(down).await;
                match self.restart(cluster, &killed).await {
                    Ok(restarted) => {
                        let (replica, from, to) = &killed.trigger;
                        (
                            Ok(format!(
                                "SIGKILL right after {replica} committed (batches {from} → {to}), done {:.0} ms later, exited 137; down {:.1}s; {restarted}",
                                killed.to_signal.as_secs_f64() * 1000.0,
                                down.as_secs_f64()
                            )),
                            None,
                        )
                    }
                    Err(e) => {
                        let why = one_line(&e);
                        let running = cluster
                            .servers
                            .container_state(&id)
                            .await
                            .is_ok_and(|s| s.running);
                        // Verification failed on a running server: healed, not verified.
                        let heal = (!running).then(|| format!("database not restarted: {why}"));
                        (Err(why), heal)
                    }
                }
            }
            Err(e) => {
                let running = cluster
                    .servers
                    .container_state(&id)
                    .await
                    .is_ok_and(|s| s.running);
                // Not killed (no commit seen), or killed but not as expected: then still
                // bring it back.
                let heal = if running {
                    None
                } else {
                    cluster
                        .servers
                        .start_postgres()
                        .await
                        .err()
                        .map(|s| format!("database not restarted: {}", one_line(&s)))
                };
                (Err(one_line(&e)), heal)
            }
        };
        Fault {
            kind: FaultKind::DbKill,
            target: "postgres".into(),
            at,
            healed: clock.now(),
            outcome,
            heal_error,
        }
    }
}
