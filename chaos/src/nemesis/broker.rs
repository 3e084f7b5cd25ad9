//! The `broker` nemesis: restart the RabbitMQ container under load, either gracefully
//! (SIGTERM, then start) or hard (SIGKILL of the container, like a node crash, then start).
//!
//! Every replica loses its session and every unacked delivery; the queue (quorum,
//! durable) and its persistent messages survive. Replicas must reconnect by themselves
//! with backoff; the publisher keeps retrying what the broker did not confirm. Verified
//! by the container's state: not running after the stop, and running again with a NEW
//! Docker start time.

use anyhow::bail;
use tokio::time::Instant;

use super::{Clock, Fault, FaultKind, one_line};
use crate::cluster::Cluster;

/// Restarts RabbitMQ.
#[derive(Debug, Clone, Default)]
pub struct BrokerNemesis;

impl BrokerNemesis {
    /// Stops RabbitMQ (SIGTERM, or SIGKILL when `hard`), verifies it is down, starts it
    /// again and verifies it runs with a new start time and accepts AMQP connections.
    ///
    /// # Errors
    /// When a step fails or the container did not really go down and come back.
    pub async fn restart(&self, cluster: &Cluster, hard: bool) -> anyhow::Result<String> {
        let servers = &cluster.servers;
        let id = servers.rabbitmq_container_id().to_owned();
        let (before, running) = servers.container_started_at(&id).await?;
        if !running {
            bail!("RabbitMQ was not running before the fault");
        }
        let t = Instant::now();
        if hard {
            servers.kill_rabbitmq().await?;
        } else {
            servers.stop_rabbitmq().await?;
        }
        let (_, running) = servers.container_started_at(&id).await?;
        if running {
            bail!("RabbitMQ container still running after the stop");
        }
        let down_after = t.elapsed();
        servers.start_rabbitmq().await?;
        let (after, running) = servers.container_started_at(&id).await?;
        if !running || after == before {
            bail!(
                "RabbitMQ container did not come back with a new start (started {before} → {after}, running {running})"
            );
        }
        Ok(format!(
            "container {} ({}) after {:.1}s; started again, accepting AMQP {:.1}s after the fault (start time {} → {})",
            if hard {
                "killed (SIGKILL)"
            } else {
                "stopped (SIGTERM)"
            },
            short_id(&id),
            down_after.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            short_time(&before),
            short_time(&after),
        ))
    }

    /// One broker restart (graceful or `hard`).
    pub async fn strike(&self, cluster: &mut Cluster, hard: bool, clock: &Clock) -> Fault {
        let at = clock.now();
        let outcome = self.restart(cluster, hard).await.map_err(|e| one_line(&e));
        Fault {
            kind: if hard {
                FaultKind::BrokerKill
            } else {
                FaultKind::BrokerRestart
            },
            target: "rabbitmq".into(),
            at,
            healed: clock.now(),
            // A failed restart leaves the broker down: nothing can recover from that.
            heal_error: outcome
                .as_ref()
                .err()
                .map(|e| format!("broker not restarted: {e}")),
            outcome,
        }
    }
}

/// The first 12 characters of a container id.
pub(crate) fn short_id(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// `HH:MM:SS.mmm` of an RFC 3339 time (the whole string when it does not parse).
pub(crate) fn short_time(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_else(|_| rfc3339.to_owned())
}
