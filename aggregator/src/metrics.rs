//! Every metric the service exports, each declared ONCE in the `metrics!` table below:
//! its field, its full name (exported in [`names`] for the test kit and dashboards), its
//! type and its help text (the field's doc comment, which the scrape shows as `# HELP`).
//!
//! All names share the prefix `vote_aggregator_` and follow Prometheus naming (`_total`
//! for counters, base units such as `_seconds`). Each replica owns its own [`Registry`]
//! (no global state), so tests can run several replicas in one process and read each
//! one's figures apart.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::vote::RejectKind;

/// The prefix of every metric name.
pub const PREFIX: &str = "vote_aggregator_";

/// The label names of the labelled metrics, declared once for the service and its readers.
pub mod labels {
    /// Label of `vote_aggregator_up`: which dependency ([`super::DEP_POSTGRES`] or
    /// [`super::DEP_RABBITMQ`]).
    pub const DEPENDENCY: &str = "dependency";
    /// Label of `vote_aggregator_votes_duplicate_total`: the AMQP redelivered flag
    /// (`"true"` or `"false"`).
    pub const REDELIVERED: &str = "redelivered";
    /// Label of `vote_aggregator_votes_rejected_total`: why the delivery was rejected.
    pub const REASON: &str = "reason";
    /// Label of `vote_aggregator_broker_node`: a RabbitMQ node's `host:port` as
    /// `AMQP_URL` names it.
    pub const NODE: &str = "node";
}

/// The `dependency` label values of [`Metrics::up`].
pub const DEP_POSTGRES: &str = "postgres";
/// See [`DEP_POSTGRES`].
pub const DEP_RABBITMQ: &str = "rabbitmq";

/// One metric as declared: what a scrape shows in its `# HELP` and `# TYPE` lines.
#[derive(Debug, Clone, Copy)]
pub struct Declared {
    /// Full name (with [`PREFIX`]); for a histogram, the base of its series.
    pub name: &'static str,
    /// The field's doc comment, one line per doc line; see [`Declared::help`].
    pub doc: &'static str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
}

impl Declared {
    /// The help text as exported: the doc comment on one line.
    pub fn help(&self) -> String {
        one_line(self.doc)
    }
}

/// A doc comment as one line of help text.
fn one_line(doc: &str) -> String {
    doc.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The shape of a metric beyond its name and help: its labels, its buckets.
struct Shape {
    labels: &'static [&'static str],
    buckets: Option<Vec<f64>>,
}

impl Shape {
    const PLAIN: Shape = Shape {
        labels: &[],
        buckets: None,
    };

    fn label(label: &'static [&'static str]) -> Shape {
        Shape {
            labels: label,
            buckets: None,
        }
    }

    fn buckets(buckets: Vec<f64>) -> Shape {
        Shape {
            labels: &[],
            buckets: Some(buckets),
        }
    }
}

/// A metric type the table can declare.
trait Declare: Collector + Clone + Sized + 'static {
    /// The `# TYPE` of the metric.
    const KIND: &'static str;
    fn create(name: &str, help: String, shape: Shape) -> prometheus::Result<Self>;
}

impl Declare for IntCounter {
    const KIND: &'static str = "counter";
    fn create(name: &str, help: String, _: Shape) -> prometheus::Result<Self> {
        IntCounter::with_opts(Opts::new(name, help))
    }
}

impl Declare for IntCounterVec {
    const KIND: &'static str = "counter";
    fn create(name: &str, help: String, shape: Shape) -> prometheus::Result<Self> {
        IntCounterVec::new(Opts::new(name, help), shape.labels)
    }
}

impl Declare for IntGauge {
    const KIND: &'static str = "gauge";
    fn create(name: &str, help: String, _: Shape) -> prometheus::Result<Self> {
        IntGauge::with_opts(Opts::new(name, help))
    }
}

impl Declare for Gauge {
    const KIND: &'static str = "gauge";
    fn create(name: &str, help: String, _: Shape) -> prometheus::Result<Self> {
        Gauge::with_opts(Opts::new(name, help))
    }
}

impl Declare for IntGaugeVec {
    const KIND: &'static str = "gauge";
    fn create(name: &str, help: String, shape: Shape) -> prometheus::Result<Self> {
        IntGaugeVec::new(Opts::new(name, help), shape.labels)
    }
}

impl Declare for Histogram {
    const KIND: &'static str = "histogram";
    fn create(name: &str, help: String, shape: Shape) -> prometheus::Result<Self> {
        let mut opts = HistogramOpts::new(name, help);
        if let Some(buckets) = shape.buckets {
            opts = opts.buckets(buckets);
        }
        Histogram::with_opts(opts)
    }
}

/// Creates a metric and registers it.
///
/// # Panics
/// Never in practice: creation fails only on an invalid name and registration only on a
/// duplicate one, which the single table rules out (a unit test registers them all).
fn register<M: Declare>(registry: &Registry, name: &str, doc: &'static str, shape: Shape) -> M {
    let help = one_line(doc);
    let metric = M::create(name, help, shape).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

/// Declares the metrics: the [`Metrics`] struct (one field each), the [`names`]
/// constants, the [`DECLARED`] table and the registration, all from one entry per metric:
///
/// ```text
/// /// Help text (the doc comment).
/// field: Type = CONST_NAME "full_metric_name" [, shape];
/// ```
macro_rules! metrics {
    ($(
        $(#[doc = $doc:literal])+
        $field:ident : $ty:ident = $const:ident $name:literal $(, $shape:expr)? ;
    )*) => {
        /// The metrics of one replica.
        #[derive(Clone)]
        pub struct Metrics {
            registry: Registry,
            $( $(#[doc = $doc])+ pub $field: $ty, )*
        }

        /// The full name of every metric, as a scrape shows it.
        pub mod names {
            $( $(#[doc = $doc])+ pub const $const: &str = $name; )*
        }

        /// Every metric: name, help and type.
        pub const DECLARED: &[Declared] = &[
            $( Declared {
                name: names::$const,
                doc: concat!($($doc, "\n"),+),
                kind: <$ty as Declare>::KIND,
            }, )*
        ];

        /// Each constant of [`names`] with its identifier, for the naming test.
        #[cfg(test)]
        const CONSTANTS: &[(&str, &str)] = &[ $( (stringify!($const), names::$const), )* ];

        /// Marks the start of the README's metrics table (see [`markdown_table`]).
pub const README_BEGIN: &str = "<!-- metrics-table:begin -->";
/// See [`README_BEGIN`].
pub const README_END: &str = "<!-- metrics-table:end -->";

/// The README's metrics table, rendered from [`DECLARED`]: every metric's name without
/// [`PREFIX`], its type and its help. A unit test keeps the README's copy identical;
/// `vote-aggregator metrics-table` prints it.
pub fn markdown_table() -> String {
    let mut out = String::from("| metric | type | meaning |\n| --- | --- | --- |\n");
    for m in DECLARED {
        let short = m.name.strip_prefix(PREFIX).unwrap_or(m.name);
        out.push_str(&format!("| `{short}` | {} | {} |\n", m.kind, m.help()));
    }
    out
}

impl Metrics {
            fn register_all(registry: Registry) -> Self {
                Metrics {
                    $( $field: register::<$ty>(
                        &registry,
                        names::$const,
                        concat!($($doc, "\n"),+),
                        metrics!(@shape $($shape)?),
                    ), )*
                    registry,
                }
            }
        }
    };
    (@shape) => { Shape::PLAIN };
    (@shape $shape:expr) => { $shape };
}

/// Bucket bounds of the latency histograms, in seconds.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ]
}

metrics! {
    /// Deliveries taken from the queue (valid or not, first delivery or redelivery).
    votes_received: IntCounter = VOTES_RECEIVED_TOTAL "vote_aggregator_votes_received_total";
    /// Votes inserted for the first time and added to a tally.
    votes_counted: IntCounter = VOTES_COUNTED_TOTAL "vote_aggregator_votes_counted_total";
    /// Votes not counted because the same vote (same UUID, same payload) was already
    /// counted; label `redelivered` is the AMQP redelivered flag ("true" after a crash or
    /// lost ack, "false" for a duplicate publish).
    votes_duplicate: IntCounterVec = VOTES_DUPLICATE_TOTAL "vote_aggregator_votes_duplicate_total",
        Shape::label(&[labels::REDELIVERED]);
    /// Of `votes_duplicate_total`, the copies of votes this replica had itself stored
    /// recently, recognised from memory without reading `votes`. The rest of the
    /// duplicates are judged by the database, except copies within one batch (dropped
    /// before the write, counted in `votes_duplicate_total` only).
    votes_duplicate_from_memory: IntCounter = VOTES_DUPLICATE_FROM_MEMORY_TOTAL "vote_aggregator_votes_duplicate_from_memory_total";
    /// Votes not counted because their UUID was already counted with another payload;
    /// each is recorded in `vote_conflicts`.
    votes_conflicting: IntCounter = VOTES_CONFLICTING_TOTAL "vote_aggregator_votes_conflicting_total";
    /// Malformed deliveries sent to the dead-letter queue, by `reason`.
    votes_rejected: IntCounterVec = VOTES_REJECTED_TOTAL "vote_aggregator_votes_rejected_total",
        Shape::label(&[labels::REASON]);
    /// Votes per committed batch.
    batch_size: Histogram = BATCH_SIZE "vote_aggregator_batch_size",
        Shape::buckets(vec![1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0]);
    /// Time to run and commit one batch transaction (successful attempts only).
    commit_duration_seconds: Histogram = COMMIT_DURATION_SECONDS "vote_aggregator_commit_duration_seconds",
        Shape::buckets(latency_buckets());
    /// Time from the publisher's timestamp to the commit that counted the vote.
    publish_to_commit_seconds: Histogram = PUBLISH_TO_COMMIT_SECONDS "vote_aggregator_publish_to_commit_seconds",
        Shape::buckets(latency_buckets());
    /// Batches committed.
    batches_committed: IntCounter = BATCHES_COMMITTED_TOTAL "vote_aggregator_batches_committed_total";
    /// Batch transactions that failed and were retried.
    commit_retries: IntCounter = COMMIT_RETRIES_TOTAL "vote_aggregator_commit_retries_total";
    /// Failed attempts to reach PostgreSQL (connect, pool checkout, lost connection).
    database_connection_failures: IntCounter = DATABASE_CONNECTION_FAILURES_TOTAL
        "vote_aggregator_database_connection_failures_total";
    /// Failed attempts to reach RabbitMQ, and connections or channels lost.
    broker_connection_failures: IntCounter = BROKER_CONNECTION_FAILURES_TOTAL
        "vote_aggregator_broker_connection_failures_total";
    /// Acks that could not be sent (channel gone); the broker redelivers those votes.
    ack_failures: IntCounter = ACK_FAILURES_TOTAL "vote_aggregator_ack_failures_total";
    /// 1 while the replica is connected to the dependency (label `dependency`: `postgres`
    /// or `rabbitmq`), else 0.
    up: IntGaugeVec = UP "vote_aggregator_up", Shape::label(&[labels::DEPENDENCY]);
    /// 1 for the RabbitMQ node (label `node`: its `host:port` in `AMQP_URL`) this
    /// replica's session is connected to; 0 for every other listed node, and for all of
    /// them while the replica is not connected.
    broker_node: IntGaugeVec = BROKER_NODE "vote_aggregator_broker_node", Shape::label(&[labels::NODE]);
    /// Messages ready in the queue, as last seen by this replica.
    queue_depth: IntGauge = QUEUE_DEPTH "vote_aggregator_queue_depth";
    /// Messages in the unexplained dead-letter queue (dead-lettered by the broker, not by
    /// a replica; may hold valid votes that were never counted), as last seen by this
    /// replica; alert on > 0.
    dead_letters_unexplained: IntGauge = DEAD_LETTERS_UNEXPLAINED "vote_aggregator_dead_letters_unexplained";
    /// 1 while the latest batch commit attempt failed (the replica is not ready even if
    /// PostgreSQL answers `SELECT 1`), else 0.
    commits_failing: IntGauge = COMMITS_FAILING "vote_aggregator_commits_failing";
    /// Deliveries the broker had already delivered at least 10 times (`x-delivery-count`).
    high_delivery_count: IntCounter = HIGH_DELIVERY_COUNT_TOTAL "vote_aggregator_high_delivery_count_total";
    /// (election, candidate) pairs whose tally differed from their counted votes at this
    /// replica's latest tally check (`TALLY_CHECK_INTERVAL_SECONDS`; -1 until the first,
    /// and while checks are off); alert on > 0.
    tally_drift: IntGauge = TALLY_DRIFT "vote_aggregator_tally_drift";
    /// Tally checks that could not read the database (the gauge keeps its last value).
    tally_check_failures: IntCounter = TALLY_CHECK_FAILURES_TOTAL "vote_aggregator_tally_check_failures_total";
    /// Results events in the outbox not yet confirmed by RabbitMQ (all replicas'), as last
    /// seen by this replica; grows while results cannot be published.
    results_outbox_pending: IntGauge = RESULTS_OUTBOX_PENDING "vote_aggregator_results_outbox_pending";
    /// Age in seconds of the oldest results event not yet published (0 when none), as
    /// last seen by this replica; alert when it keeps growing.
    results_outbox_oldest_age_seconds: Gauge = RESULTS_OUTBOX_OLDEST_AGE_SECONDS
        "vote_aggregator_results_outbox_oldest_age_seconds";
    /// Results events this replica's relay published with a broker confirm (and then
    /// deleted from the outbox).
    results_events_published: IntCounter = RESULTS_EVENTS_PUBLISHED_TOTAL
        "vote_aggregator_results_events_published_total";
    /// Interrupted relay sessions of this replica because RabbitMQ could not be reached,
    /// refused or did not confirm a results publish (the events stay in the outbox).
    results_publish_failures: IntCounter = RESULTS_PUBLISH_FAILURES_TOTAL
        "vote_aggregator_results_publish_failures_total";
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Never in practice: creation fails only on an invalid name and registration only on
    /// a duplicate one, which the single table rules out (a unit test registers them all).
    pub fn new() -> Self {
        let m = Metrics::register_all(Registry::new());
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

    /// Marks `connected` (a `host:port` label) as the broker node of this replica's
    /// session, or none when `None`; every other node of `nodes` reads 0.
    pub fn set_broker_node<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a str>,
        connected: Option<&str>,
    ) {
        for node in nodes {
            self.broker_node
                .with_label_values(&[node])
                .set(i64::from(Some(node) == connected));
        }
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
            text.contains(&format!("{} 3", names::VOTES_COUNTED_TOTAL)),
            "{text}"
        );
        assert!(text.contains(&format!(r#"{}{{dependency="postgres"}} 1"#, names::UP)));
        assert!(text.contains(&format!(r#"{}{{dependency="rabbitmq"}} 0"#, names::UP)));
        assert!(text.contains(&format!(
            r#"{}{{reason="too_large"}} 0"#,
            names::VOTES_REJECTED_TOTAL
        )));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            assert!(line.starts_with(&format!("# TYPE {PREFIX}")), "{line}");
        }
    }

    /// Every exported name is in a scrape, with its declared help and type; and every
    /// metric in a scrape is declared.
    #[test]
    fn every_declared_name_is_scraped_with_its_help_and_type() {
        let m = Metrics::new();
        // A replica labels its broker nodes as it starts (the supervisor does).
        m.set_broker_node(["mq:5672"], None);
        let text = m.render();
        for d in DECLARED {
            let help = format!("# HELP {} {}\n", d.name, d.help());
            assert!(text.contains(&help), "missing {help:?} in\n{text}");
            let kind = format!("# TYPE {} {}\n", d.name, d.kind);
            assert!(text.contains(&kind), "missing {kind:?} in\n{text}");
            assert!(!d.help().is_empty() && !d.help().contains('\n'));
        }
        let scraped = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(scraped, DECLARED.len(), "{text}");
    }

    /// A constant is its metric's name without the prefix, upper-cased: names::X is
    /// always `vote_aggregator_x`.
    #[test]
    fn constant_names_follow_metric_names() {
        assert_eq!(CONSTANTS.len(), DECLARED.len());
        for &(ident, name) in CONSTANTS {
            assert_eq!(format!("{PREFIX}{}", ident.to_ascii_lowercase()), name);
        }
        for d in DECLARED {
            let rest = d.name.strip_prefix(PREFIX).unwrap_or_default();
            assert!(!rest.is_empty(), "{} lacks the prefix", d.name);
            let total = rest.ends_with("_total");
            assert_eq!(
                total,
                d.kind == "counter",
                "{}: counters end in _total",
                d.name
            );
        }
    }

    #[test]
    fn the_readme_holds_exactly_the_rendered_metrics_table() {
        let inside = crate::readme_between(README_BEGIN, README_END);
        assert_eq!(
            inside,
            markdown_table().trim_end(),
            "README.md's metrics table differs from metrics::DECLARED: paste the output of \
             `vote-aggregator metrics-table` between the markers"
        );
    }
}
