//! What the stack's Prometheus sees: that it scrapes every running replica (`up == 1`,
//! found by DNS discovery) and RabbitMQ, and that every replica counted votes (the load
//! spreads over all of them). Asked through Prometheus's HTTP query API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;
use vote_aggregator::config::DEFAULT_METRICS_ADDR;
use vote_aggregator::http_client;
use vote_aggregator::metrics::names::VOTES_COUNTED_TOTAL;

use super::stack::Replica;

/// The scrape jobs of `deploy/prometheus/prometheus.yml`.
const AGGREGATOR_JOB: &str = "vote-aggregator";
const RABBITMQ_JOB: &str = "rabbitmq";

/// The instant vector of `query`: each series' `instance` label and value.
///
/// # Errors
/// When Prometheus cannot be reached or answers something else than a vector.
pub async fn query(prometheus: SocketAddr, query: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let encoded: String = url::form_urlencoded::byte_serialize(query.as_bytes()).collect();
    let path = format!("/api/v1/query?query={encoded}");
    let (status, body) = http_client::get(prometheus, &path)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if status != 200 {
        bail!("Prometheus answered {status} to {query}: {body}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("Prometheus answered {body}"))?;
    let result = json["data"]["result"]
        .as_array()
        .with_context(|| format!("no result vector in {body}"))?;
    let mut out = BTreeMap::new();
    for series in result {
        let instance = series["metric"]["instance"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let value = series["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no value in {series}"))?;
        out.insert(instance, value);
    }
    Ok(out)
}

/// What Prometheus showed at the end.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Running replicas Prometheus scrapes with `up == 1`.
    pub up: usize,
    /// Running replicas whose votes-counted counter is above 0.
    pub counted: usize,
    /// Running replicas.
    pub replicas: usize,
    /// Whether RabbitMQ's own metrics are scraped (`up == 1`).
    pub rabbitmq_up: bool,
}

/// Waits (bounded) until Prometheus scrapes every replica in `running` with `up == 1`,
/// sees each one's votes-counted counter above 0, and scrapes RabbitMQ.
///
/// # Errors
/// After `timeout`, naming the replicas that were missing, down or idle.
pub async fn wait_all_seen(
    prometheus: SocketAddr,
    running: &[Replica],
    timeout: Duration,
) -> anyhow::Result<Seen> {
    let started = Instant::now();
    loop {
        let (seen, missing) = look(prometheus, running).await?;
        if missing.is_empty() {
            return Ok(seen);
        }
        if started.elapsed() >= timeout {
            bail!("after {timeout:?}: {}", missing.join("; "));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn look(prometheus: SocketAddr, running: &[Replica]) -> anyhow::Result<(Seen, Vec<String>)> {
    let up = query(prometheus, &format!("up{{job=\"{AGGREGATOR_JOB}\"}}")).await?;
    let counted = query(
        prometheus,
        &format!("{VOTES_COUNTED_TOTAL}{{job=\"{AGGREGATOR_JOB}\"}}"),
    )
    .await?;
    let rabbitmq = query(prometheus, &format!("up{{job=\"{RABBITMQ_JOB}\"}}")).await?;
    let mut seen = Seen {
        replicas: running.len(),
        rabbitmq_up: rabbitmq.values().any(|v| *v == 1.0),
        ..Seen::default()
    };
    let mut missing = Vec::new();
    for r in running {
        // The replicas listen on the default address: the port discovery scrapes.
        let instance = format!("{}:{}", r.ip, DEFAULT_METRICS_ADDR.port());
        match up.get(&instance) {
            Some(v) if *v == 1.0 => seen.up += 1,
            Some(v) => missing.push(format!("{} ({instance}) has up {v}", r.name)),
            None => missing.push(format!("{} ({instance}) not scraped", r.name)),
        }
        match counted.get(&instance) {
            Some(v) if *v > 0.0 => seen.counted += 1,
            _ => missing.push(format!("{} ({instance}) counted no votes", r.name)),
        }
    }
    if !seen.rabbitmq_up {
        missing.push("RabbitMQ's metrics are not scraped".to_owned());
    }
    Ok((seen, missing))
}
