//! The `partition` nemesis: cut ONE replica off from the broker or from the database
//! (its own fault proxy drops every connection and refuses new ones), hold, restore.
//!
//! Cut from the broker, the replica loses its session and its unacked deliveries go to
//! the others; cut from the database, its batch in hand cannot commit, so it holds the
//! deliveries unacked and retries, and `/readyz` turns 503. Verified by the proxy: it had
//! connections before the cut and 0 after; and by the replica itself: its
//! `vote_aggregator_up{dependency=...}` gauge drops to 0. Healed when `/readyz` is 200
//! again.

use std::time::Duration;

use anyhow::bail;
use rand::Rng as _;
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

use super::{Clock, Fault, FaultKind, between, not_attempted, one_line, pick_replica};
use crate::cluster::{Cluster, Link};
use vote_aggregator::metrics;
use vote_testkit::prometheus::up_series;

/// Cuts one replica's link.
#[derive(Debug, Clone)]
pub struct PartitionNemesis {
    /// How long a cut lasts, in seconds (min, max).
    pub hold_secs: (f64, f64),
    /// How long the replica may take to notice (its `up` gauge to drop to 0).
    pub notice_timeout: Duration,
}

impl Default for PartitionNemesis {
    fn default() -> Self {
        PartitionNemesis {
            hold_secs: (2.0, 4.0),
            notice_timeout: Duration::from_secs(10),
        }
    }
}

/// The `up` gauge of a dependency.
fn up_gauge(link: Link) -> String {
    up_series(match link {
        Link::Broker => metrics::DEP_RABBITMQ,
        Link::Database => metrics::DEP_POSTGRES,
    })
}

impl PartitionNemesis {
    /// Cuts replica `i`'s `link` and verifies that the connections dropped and that the
    /// replica noticed.
    ///
    /// # Errors
    /// When there was nothing to cut, connections survived, or the replica never noticed.
    pub async fn cut(&self, cluster: &Cluster, i: usize, link: Link) -> anyhow::Result<String> {
        let proxy = cluster.link(i, link)?;
        let before = proxy.connection_count();
        proxy.break_all();
        if before == 0 {
            bail!("the replica had no {link} connection to cut");
        }
        let deadline = Instant::now() + self.notice_timeout;
        while proxy.connection_count() > 0 {
            if Instant::now() >= deadline {
                bail!(
                    "{} {link} connection(s) still open {:?} after the cut",
                    proxy.connection_count(),
                    self.notice_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cut_at = Instant::now();
        loop {
            if let Ok(scrape) = cluster.fleet.scrape(i).await
                && scrape.get(&up_gauge(link)) == Some(0.0)
            {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{link} connections dropped ({before} → 0) but the replica's {} never went to 0",
                    up_gauge(link)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(format!(
            "{link} connections {before} → 0; replica reported {link} down after {:.1}s",
            cut_at.elapsed().as_secs_f64()
        ))
    }

    /// Restores replica `i`'s `link` and waits until the replica is ready again.
    ///
    /// # Errors
    /// When it does not become ready within a minute.
    pub async fn heal(&self, cluster: &Cluster, i: usize, link: Link) -> anyhow::Result<Duration> {
        cluster.link(i, link)?.restore();
        let t = Instant::now();
        cluster.fleet.wait_ready(i, Duration::from_secs(60)).await?;
        Ok(t.elapsed())
    }

    /// Cuts a random replica from the broker or the database, holds, restores.
    pub async fn strike(
        &self,
        cluster: &mut Cluster,
        rng: &mut ChaCha8Rng,
        clock: &Clock,
    ) -> Fault {
        let Some(i) = pick_replica(cluster, rng) else {
            return not_attempted(FaultKind::Partition, clock, "fewer than 2 replicas running");
        };
        let link = if rng.random_bool(0.5) {
            Link::Broker
        } else {
            Link::Database
        };
        let hold = between(rng, self.hold_secs.0, self.hold_secs.1);
        let at = clock.now();
        let cut = self.cut(cluster, i, link).await;
        let spent = clock.now() - at;
        tokio::time::sleep(hold.saturating_sub(spent)).await;
        let healed = clock.now();
        let healing = self.heal(cluster, i, link).await;
        let outcome = match cut {
            Ok(evidence) => Ok(match &healing {
                Ok(t) => format!(
                    "{evidence}; cut for {:.1}s, ready {:.1}s after restore",
                    (healed - at).as_secs_f64(),
                    t.as_secs_f64()
                ),
                Err(_) => evidence,
            }),
            Err(e) => Err(one_line(&e)),
        };
        Fault {
            kind: FaultKind::Partition,
            target: format!("{}→{link}", cluster.fleet.name(i)),
            at,
            healed,
            outcome,
            heal_error: healing
                .err()
                .map(|e| format!("not ready after restore: {}", one_line(&e))),
        }
    }
}
