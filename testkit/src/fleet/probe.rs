//! Asking replicas over HTTP: readiness (`/readyz` = 200) and `/metrics` scrapes into a
//! [`Scrape`]. Every request is bounded: a paused replica accepts the connection in the
//! kernel but never answers.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::time::Instant;

use super::lifecycle::Fleet;
use crate::inspect::http_get;
use crate::prometheus::Scrape;
use vote_aggregator::http::paths;

/// How long [`Fleet::scrape`] waits for a `/metrics` answer (a paused replica accepts the
/// connection in the kernel but never answers).
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

impl Fleet {
    /// Waits until replica `i`'s `/readyz` answers 200 (polling every 100 ms).
    ///
    /// # Errors
    /// When the replica is not running, exits while waiting, or is not ready within
    /// `timeout`; the error names the last answer and quotes the last 20 lines of its log.
    pub async fn wait_ready(&self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let r = &self.replicas[i];
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            let Some(pid) = r.live_pid() else {
                bail!(
                    "replica {} exited before it was ready ({last}); last lines of {}:\n{}",
                    r.spec.name,
                    r.log_path.display(),
                    r.log_tail()
                );
            };
            match tokio::time::timeout(Duration::from_secs(2), http_get(r.addr, paths::READYZ))
                .await
            {
                Ok(Ok((200, _))) => return Ok(()),
                Ok(Ok((status, body))) => {
                    last = format!("/readyz answered {status}: {}", body.trim());
                }
                Ok(Err(e)) => last = format!("/readyz at {}: {e:#}", r.addr),
                Err(_) => last = format!("/readyz at {} did not answer within 2 s", r.addr),
            }
            if Instant::now() >= deadline {
                bail!(
                    "replica {} (pid {pid}) not ready within {timeout:?} ({last}); last lines of {}:\n{}",
                    r.spec.name,
                    r.log_path.display(),
                    r.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running replica is ready.
    ///
    /// # Errors
    /// The first replica's error from [`Fleet::wait_ready`].
    pub async fn wait_all_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let running: Vec<usize> = (0..self.len()).filter(|&i| self.pid(i).is_some()).collect();
        let results = futures_util::future::join_all(
            running.into_iter().map(|i| self.wait_ready(i, timeout)),
        )
        .await;
        results.into_iter().collect()
    }

    /// GETs replica `i`'s `/metrics` (bounded by [`SCRAPE_TIMEOUT`]) and parses it.
    ///
    /// # Errors
    /// When the replica is not running, does not answer in time (e.g. paused), answers
    /// other than 200, or the page does not parse.
    pub async fn scrape(&self, i: usize) -> anyhow::Result<Scrape> {
        self.scrape_within(i, SCRAPE_TIMEOUT).await
    }

    /// [`Fleet::scrape`] with another bound on the wait.
    ///
    /// # Errors
    /// As [`Fleet::scrape`].
    pub async fn scrape_within(&self, i: usize, timeout: Duration) -> anyhow::Result<Scrape> {
        let r = &self.replicas[i];
        if r.live_pid().is_none() {
            return Err(r.not_running());
        }
        let (status, body) = tokio::time::timeout(timeout, http_get(r.addr, paths::METRICS))
            .await
            .map_err(|_| {
                anyhow!(
                    "replica {}: /metrics at {} did not answer within {timeout:?}",
                    r.spec.name,
                    r.addr
                )
            })?
            .with_context(|| format!("replica {}: GET /metrics at {}", r.spec.name, r.addr))?;
        if status != 200 {
            bail!(
                "replica {}: /metrics answered {status}: {}",
                r.spec.name,
                body.trim()
            );
        }
        Scrape::parse(&body).with_context(|| format!("replica {}: /metrics", r.spec.name))
    }

    /// Scrapes every replica at once, in index order (a replica not running gives an
    /// error).
    pub async fn scrape_all(&self) -> Vec<anyhow::Result<Scrape>> {
        futures_util::future::join_all((0..self.len()).map(|i| self.scrape(i))).await
    }
}
