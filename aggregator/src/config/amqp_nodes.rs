//! `AMQP_URL` as a list: the URLs of the nodes of one RabbitMQ cluster, separated by
//! [`NODE_SEPARATOR`] (one URL is a list of one, and behaves as it always did).
//!
//! Invariants checked at start-up, each mistake one line naming `AMQP_URL` (or
//! `AMQP_URL_FILE`) with every URL redacted:
//! - every node URL is a valid `amqp://` or `amqps://` URL with a host (a password
//!   holding the separator must write it `%2C`, or the URL splits inside it and the
//!   piece fails this check);
//! - all nodes share one scheme: the TLS settings (`AMQP_CA_FILE`, client certificate)
//!   apply to every node, and a list that mixes plain and TLS nodes is a mistake;
//! - no node is listed twice (it would get twice the share of reconnects).

use secrecy::{ExposeSecret, SecretString};

use super::Env;
use super::variables::{AMQP_URL, AMQP_URL_FILE};
use super::{check_url, redact_url};
use crate::error::ConfigError;

/// What separates node URLs in `AMQP_URL`.
pub const NODE_SEPARATOR: char = ',';

/// The node URLs of an `AMQP_URL` value, in the order written (blank pieces skipped).
pub fn node_urls(raw: &SecretString) -> Vec<SecretString> {
    raw.expose_secret()
        .split(NODE_SEPARATOR)
        .map(str::trim)
        .filter(|piece| !piece.is_empty())
        .map(|piece| SecretString::from(piece.to_string()))
        .collect()
}

/// `AMQP_URL` or `AMQP_URL_FILE`, checked node by node (see the module docs).
///
/// # Errors
/// [`ConfigError`] naming `AMQP_URL` when it is missing, set twice, or a node URL breaks
/// an invariant.
/// A node URL's `host:port` (port 5672, or 5671 for `amqps://`, when the URL names none):
/// what tells two nodes apart, and the `node` label of the broker metric. `None` when the
/// URL does not parse.
pub fn node_address(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    let port = u
        .port()
        .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
    Some(format!("{}:{port}", u.host_str()?))
}

pub(super) fn from_env(env: &Env<'_>) -> Result<SecretString, ConfigError> {
    let raw = env.secret_raw(AMQP_URL, AMQP_URL_FILE)?;
    let nodes = node_urls(&raw);
    if nodes.is_empty() {
        return Err(ConfigError::Missing {
            key: AMQP_URL.into(),
        });
    }
    for node in &nodes {
        check_url(AMQP_URL, node.expose_secret(), &["amqp", "amqps"])?;
    }
    let scheme = |n: &SecretString| {
        url::Url::parse(n.expose_secret())
            .map(|u| u.scheme().to_owned())
            .ok()
    };
    if let Some(other) = nodes.iter().find(|n| scheme(n) != scheme(&nodes[0])) {
        return Err(ConfigError::Conflict {
            key: AMQP_URL.into(),
            problem: format!(
                "mixes schemes: {} and {}",
                redact_url(nodes[0].expose_secret()),
                redact_url(other.expose_secret())
            ),
            fix: "use amqp:// for every node or amqps:// for every node (the TLS settings apply to all of them)".into(),
        });
    }
    for (i, node) in nodes.iter().enumerate() {
        let address = node_address(node.expose_secret());
        if nodes[..i]
            .iter()
            .any(|earlier| node_address(earlier.expose_secret()) == address)
        {
            return Err(ConfigError::invalid(
                AMQP_URL,
                &redact_url(node.expose_secret()),
                "each node once (this host:port is listed twice)",
            ));
        }
    }
    Ok(raw)
}
