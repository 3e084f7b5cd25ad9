//! The kit's AMQP clients (publisher, broker inspection) accept what the service
//! accepts: one URL, or the comma-separated URLs of a cluster's nodes. They try the
//! nodes in turn from a random one (so several clients spread over the nodes, and a
//! client that reconnects after its node died lands elsewhere) and keep the first that
//! answers.

use anyhow::Context as _;
use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret as _, SecretString};

/// The node URLs of `amqp_url` (see `vote_aggregator::config::node_urls`).
pub fn node_urls(amqp_url: &str) -> Vec<String> {
    vote_aggregator::config::node_urls(&SecretString::from(amqp_url.to_owned()))
        .iter()
        .map(|u| u.expose_secret().to_owned())
        .collect()
}

/// The node URLs of `amqp_url` in the order a client tries them: from a random one,
/// round the list (`amqp_url` itself when it lists none).
pub fn try_order(amqp_url: &str) -> Vec<String> {
    let mut nodes = node_urls(amqp_url);
    if nodes.is_empty() {
        nodes.push(amqp_url.to_owned());
    }
    let start = rand::random_range(0..nodes.len());
    nodes.rotate_left(start);
    nodes
}

/// A connection to the first node of [`try_order`] that answers.
///
/// # Errors
/// When no node is reachable (naming the last one tried, redacted).
pub async fn connect(amqp_url: &str) -> anyhow::Result<Connection> {
    let mut last = None;
    for node in try_order(amqp_url) {
        match Connection::connect(&node, ConnectionProperties::default()).await {
            Ok(connection) => return Ok(connection),
            Err(e) => last = Some((node, e)),
        }
    }
    let (node, e) = last.context("AMQP_URL names no node")?;
    Err(e).with_context(|| {
        format!(
            "cannot connect to RabbitMQ at {}",
            vote_aggregator::config::redact_url(&node)
        )
    })
}
