//! Every metric the service exports, declared in one place.
//!
//! All names share the prefix `vote_aggregator_` and follow Prometheus naming (`_total`
//! for counters, base units such as `_seconds`). Each replica owns its own [`Registry`]
//! (no global state), so tests can run several replicas in one process and read each
//! one's figures apart.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::vote::RejectKind;

const PREFIX: &str = "vote_aggregator";

/// The `dependency` label values of [`Metrics::up`].
pub const DEP_POSTGRES: &str = "postgres";
/// See [`DEP_POSTGRES`].
pub const DEP_RABBITMQ: &str = "rabbitmq";

/// The metrics of one replica.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Deliveries taken from the queue (valid or not, first delivery or redelivery).
    pub votes_received: IntCounter,
    /// Votes inserted for the first time and added to a tally.
    pub votes_counted: IntCounter,
    /// Votes not counted because the same vote (same UUID, same payload) was already
    /// counted; label `redelivered` is the AMQP redelivered flag ("true" after a crash or
    /// lost ack, "false" for a duplicate publish).
    pub votes_duplicate: IntCounterVec,
    /// Votes not counted because their UUID was already counted with another payload;
    /// each is recorded in `vote_conflicts`.
    pub votes_conflicting: IntCounter,
    /// Deliveries dead-lettered as malformed, by `reason`.
    pub votes_rejected: IntCounterVec,
    /// Votes per committed batch.
    pub batch_size: Histogram,
    /// Time to run and commit one batch transaction (successful attempts only).
    pub commit_duration_seconds: Histogram,
    /// From the publisher's timestamp to the commit that counted the vote.
    pub publish_to_commit_seconds: Histogram,
    /// Batches committed.
    pub batches_committed: IntCounter,
    /// Batch transactions that failed and were retried.
    pub commit_retries: IntCounter,
    /// Failed attempts to reach PostgreSQL (connect, pool checkout, lost connection).
    pub database_connection_failures: IntCounter,
    /// Failed attempts to reach RabbitMQ, and connections or channels lost.
    pub broker_connection_failures: IntCounter,
    /// Acks that could not be sent (channel gone); the broker redelivers those votes.
    pub ack_failures: IntCounter,
    /// 1 while the replica is connected to the dependency, else 0.
    pub up: IntGaugeVec,
    /// Messages ready in the queue, as last seen by this replica.
    pub queue_depth: IntGauge,
    /// Messages in the unexplained dead-letter queue (dead-lettered by the broker, not by
    /// a replica; may hold valid votes), as last seen by this replica.
    pub dead_letters_unexplained: IntGauge,
    /// 1 while the latest batch commit attempt failed (the replica is not ready even if
    /// PostgreSQL answers `SELECT 1`), else 0.
    pub commits_failing: IntGauge,
    /// Deliveries whose `x-delivery-count` was at least 10.
    pub high_delivery_count: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Never in practice: registration only fails on duplicate names, which this single
    /// declaration rules out (a unit test registers them all).
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(Opts::new(format!("{PREFIX}_{name}"), help))
                .expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(format!("{PREFIX}_{name}"), help), &[label])
                .expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(
                HistogramOpts::new(format!("{PREFIX}_{name}"), help).buckets(buckets),
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(Opts::new(format!("{PREFIX}_{name}"), help))
                .expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ];
        let m = Metrics {
            votes_received: counter(
                "votes_received_total",
                "Deliveries taken from the queue, valid or not.",
            ),
            votes_counted: counter(
                "votes_counted_total",
                "Votes inserted for the first time and added to a tally.",
            ),
            votes_duplicate: counter_vec(
                "votes_duplicate_total",
                "Votes already counted with the same payload, by AMQP redelivered flag.",
                "redelivered",
            ),
            votes_conflicting: counter(
                "votes_conflicting_total",
                "Votes whose UUID was already counted with another payload.",
            ),
            votes_rejected: counter_vec(
                "votes_rejected_total",
                "Malformed deliveries sent to the dead-letter queue, by reason.",
                "reason",
            ),
            batch_size: histogram(
                "batch_size",
                "Votes per committed batch.",
                vec![
                    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                ],
            ),
            commit_duration_seconds: histogram(
                "commit_duration_seconds",
                "Time to run and commit one batch transaction.",
                latency_buckets.clone(),
            ),
            publish_to_commit_seconds: histogram(
                "publish_to_commit_seconds",
                "Time from the publisher's timestamp to the commit that counted the vote.",
                latency_buckets,
            ),
            batches_committed: counter("batches_committed_total", "Batches committed."),
            commit_retries: counter(
                "commit_retries_total",
                "Batch transactions that failed and were retried.",
            ),
            database_connection_failures: counter(
                "database_connection_failures_total",
                "Failed attempts to reach PostgreSQL.",
            ),
            broker_connection_failures: counter(
                "broker_connection_failures_total",
                "Failed attempts to reach RabbitMQ, and connections lost.",
            ),
            ack_failures: counter(
                "ack_failures_total",
                "Acks that could not be sent; the broker redelivers those votes.",
            ),
            up: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        format!("{PREFIX}_up"),
                        "1 while connected to the dependency, else 0.",
                    ),
                    &["dependency"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            queue_depth: gauge(
                "queue_depth",
                "Messages ready in the queue, as last seen by this replica.",
            ),
            dead_letters_unexplained: gauge(
                "dead_letters_unexplained",
                "Messages the broker dead-lettered without a reason (may be uncounted valid votes); alert on > 0.",
            ),
            commits_failing: gauge(
                "commits_failing",
                "1 while the latest batch commit attempt failed, else 0.",
            ),
            high_delivery_count: counter(
                "high_delivery_count_total",
                "Deliveries the broker had already delivered at least 10 times (x-delivery-count).",
            ),
            registry,
        };
        // Pre-create label values so dashboards see zeros rather than absent series.
        for kind in RejectKind::ALL {
            m.votes_rejected.with_label_values(&[kind.as_str()]);
        }
        for flag in ["true", "false"] {
            m.votes_duplicate.with_label_values(&[flag]);
        }
        for dep in [DEP_POSTGRES, DEP_RABBITMQ] {
            m.up.with_label_values(&[dep]).set(0);
        }
        m
    }

    /// Marks a dependency up or down.
    pub fn set_up(&self, dependency: &str, up: bool) {
        self.up.with_label_values(&[dependency]).set(i64::from(up));
    }

    /// Whether a dependency is currently up.
    pub fn is_up(&self, dependency: &str) -> bool {
        self.up.with_label_values(&[dependency]).get() == 1
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_renders_with_the_prefix() {
        let m = Metrics::new();
        m.votes_counted.inc_by(3);
        m.set_up(DEP_POSTGRES, true);
        let text = m.render();
        assert!(
            text.contains("vote_aggregator_votes_counted_total 3"),
            "{text}"
        );
        assert!(text.contains(r#"vote_aggregator_up{dependency="postgres"} 1"#));
        assert!(text.contains(r#"vote_aggregator_up{dependency="rabbitmq"} 0"#));
        assert!(text.contains(r#"vote_aggregator_votes_rejected_total{reason="too_large"} 0"#));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            assert!(line.starts_with("# TYPE vote_aggregator_"), "{line}");
        }
    }
}
