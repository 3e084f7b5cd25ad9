//! The RabbitMQ nodes one replica may connect to, and which one it tries next.
//!
//! `AMQP_URL` may list several nodes of one cluster. Each replica shuffles the list once
//! at start (so replicas spread over the nodes) and then walks it round: the first
//! session goes to the first node of its order, and every failed connect or lost session
//! moves to the next one (the supervisor's backoff still paces the attempts). With one
//! URL this is the single node every time: nothing changes.
//!
//! Invariant: a node is only ever shown redacted ([`Node::shown`]) or as `host:port`
//! ([`Node::label`], the `node` label of `vote_aggregator_broker_node`).

use rand::seq::SliceRandom as _;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{Config, node_urls, redact_url};

/// One node URL with the two ways it may be shown.
#[derive(Debug, Clone)]
pub struct Node {
    /// The URL as configured (secret: carries the password).
    pub url: SecretString,
    /// The URL redacted, for logs and errors.
    pub shown: String,
    /// `host:port` (port 5672 or 5671 when the URL names none), for the metric label.
    pub label: String,
}

impl Node {
    fn new(url: SecretString) -> Self {
        let raw = url.expose_secret();
        let label = crate::config::node_address(raw).unwrap_or_else(|| "unknown".to_string());
        Node {
            shown: redact_url(raw),
            label,
            url,
        }
    }
}

/// The nodes in this replica's order, and the one to try next.
#[derive(Debug, Clone)]
pub struct Rotation {
    nodes: Vec<Node>,
    next: usize,
}

impl Rotation {
    /// The nodes of `config.amqp_url` in a random order.
    pub fn shuffled(config: &Config) -> Self {
        let mut rotation = Self::in_order(config);
        rotation.nodes.shuffle(&mut rand::rng());
        rotation
    }

    /// The nodes of `config.amqp_url` in the order written.
    pub fn in_order(config: &Config) -> Self {
        let mut nodes: Vec<Node> = node_urls(&config.amqp_url)
            .into_iter()
            .map(Node::new)
            .collect();
        if nodes.is_empty() {
            // Only a hand-built Config can get here (the parser refuses an empty list);
            // the connect attempt then reports the URL as it is.
            nodes.push(Node::new(config.amqp_url.clone()));
        }
        Rotation { nodes, next: 0 }
    }

    /// The node to connect to now.
    pub fn current(&self) -> &Node {
        &self.nodes[self.next % self.nodes.len()]
    }

    /// Moves on to the next node (after a failed connect or a lost session).
    pub fn advance(&mut self) {
        self.next = (self.next + 1) % self.nodes.len();
    }

    /// Every node, in this replica's order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(amqp: &str) -> Config {
        Config::new("postgres://u:p@db/votes", amqp)
    }

    #[test]
    fn one_url_is_the_only_node_every_time() {
        let mut r = Rotation::shuffled(&config("amqp://u:secret@mq:5672/%2f"));
        for _ in 0..3 {
            assert_eq!(r.current().label, "mq:5672");
            assert_eq!(r.current().shown, "amqp://u:***@mq:5672/%2f");
            r.advance();
        }
    }

    #[test]
    fn a_list_is_walked_round_and_every_node_is_shown_redacted() {
        let c = config("amqp://u:pw1@a:5672/%2f, amqp://u:pw2@b/%2f,amqps://u:pw3@c:5671/%2f");
        let mut r = Rotation::in_order(&c);
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(r.current().label.clone());
            assert!(!r.current().shown.contains("pw"), "{}", r.current().shown);
            r.advance();
        }
        assert_eq!(seen, ["a:5672", "b:5672", "c:5671", "a:5672"]);
    }

    #[test]
    fn shuffling_spreads_replicas_over_the_nodes() {
        let c = config("amqp://a/%2f,amqp://b/%2f,amqp://c/%2f");
        let firsts: std::collections::HashSet<String> = (0..200)
            .map(|_| Rotation::shuffled(&c).current().label.clone())
            .collect();
        assert_eq!(firsts.len(), 3, "first nodes seen: {firsts:?}");
        let r = Rotation::shuffled(&c);
        let mut all: Vec<&str> = r.nodes().iter().map(|n| n.label.as_str()).collect();
        all.sort_unstable();
        assert_eq!(all, ["a:5672", "b:5672", "c:5672"]);
    }
}
