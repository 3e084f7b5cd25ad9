//! The monitoring files against a running replica: every `vote_aggregator_*` name the
//! alert rules (deploy/prometheus/alerts.yml) and the Grafana dashboard
//! (deploy/grafana/dashboards/) use must appear in a real scrape, so a renamed metric
//! breaks this test instead of silently blanking a panel or an alert.
//!
//! The files use no RabbitMQ (`rabbitmq_*`) metric on purpose: queue depth and dead
//! letters come from the replicas' own gauges, so no broker scrape is needed. The test
//! fails if one is added, as a reminder to check it against a real broker's scrape.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use vote_aggregator::metrics::PREFIX;
use vote_testkit::prometheus::Scrape;

use super::*;

/// The files whose metric names must exist, relative to the repository root.
const MONITORING_FILES: &[&str] = &[
    "deploy/prometheus/alerts.yml",
    "deploy/grafana/dashboards/vote-aggregator.json",
];

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Every word of `text` that starts with `prefix` and goes on with `[a-z0-9_]` (the
/// bare prefix, as in a comment's `vote_aggregator_*`, is not a name).
fn names_with_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let boundary = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if boundary && len > prefix.len() {
            found.insert(tail[..len].to_string());
        }
        rest = &tail[len..];
    }
    found
}

#[test]
fn names_with_prefix_finds_whole_words_only() {
    let text = r#"rate(vote_aggregator_a_total[5m]) / x_vote_aggregator_b "vote_aggregator_c_bucket" vote_aggregator_*"#;
    let found: Vec<_> = names_with_prefix(text, PREFIX).into_iter().collect();
    assert_eq!(
        found,
        ["vote_aggregator_a_total", "vote_aggregator_c_bucket"]
    );
}

#[tokio::test]
async fn monitoring_files_use_only_exported_metrics() -> anyhow::Result<()> {
    let mut used = BTreeSet::new();
    for file in MONITORING_FILES {
        let path = repository_root().join(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("{path:?}"))?;
        let rabbitmq = names_with_prefix(&text, "rabbitmq_");
        assert!(
            rabbitmq.is_empty(),
            "{file} uses RabbitMQ metrics {rabbitmq:?}: check them against a broker scrape (:15692) here"
        );
        let names = names_with_prefix(&text, PREFIX);
        assert!(!names.is_empty(), "{file}: no {PREFIX}* name found");
        used.extend(names);
    }
    // The files name these, so the extraction cannot silently find nothing relevant.
    for expected in [
        names::QUEUE_DEPTH,
        names::DEAD_LETTERS_UNEXPLAINED,
        names::UP,
    ] {
        assert!(used.contains(expected), "{expected} not found in the files");
    }

    let bed = bed().await?;
    let replica = Replica::start(bed.config("r1")).await?;
    let addr = replica.running.metrics_addr();
    // Some of every kind of work (counted, a duplicate publish, a malformed delivery), so
    // the scrape is that of a replica in service, histograms included.
    let publisher = eventually_publisher(&bed).await?;
    let sent = votes::spread(5, &["e"], &["a", "b"]);
    publisher.publish_votes(&sent).await?;
    publisher.publish_votes(&sent[..1]).await?;
    publisher
        .publish_raw(b"nope", vote_properties(&votes::vote("e", "a")))
        .await?;
    wait_stored(&bed, 5).await?;
    eventually("duplicate and rejection scraped", WAIT, async || {
        let (_, page) = http_get(addr, paths::METRICS).await?;
        let scrape = Scrape::parse(&page)?;
        Ok(scrape.duplicates() == 1 && scrape.rejected() == 1)
    })
    .await?;

    let (_, page) = http_get(addr, paths::METRICS).await?;
    // Histograms show as `_bucket`, `_sum` and `_count` samples, which is how PromQL
    // names them, so a histogram's bare name in a file counts as missing.
    let exported: BTreeSet<String> = Scrape::parse(&page)?
        .samples()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "used by the monitoring files but not exported by a replica: {missing:?}"
    );
    replica.stop().await
}

/// The periodic tally check exports drift: 0 once a check ran on a consistent database, the number of
/// drifting (election, candidate) pairs once a tally is corrupted behind its back.
#[tokio::test]
async fn tally_check_exports_drift() -> anyhow::Result<()> {
    let bed = bed().await?;
    let mut config = bed.config("r1");
    config.tally_check_interval = Some(Duration::from_secs(1));
    let replica = Replica::start(config).await?;
    let addr = replica.running.metrics_addr();
    let publisher = eventually_publisher(&bed).await?;
    publisher
        .publish_votes(&votes::spread(20, &["e"], &["a", "b"]))
        .await?;
    wait_stored(&bed, 20).await?;
    let drift = async || -> anyhow::Result<Option<f64>> {
        let (_, page) = http_get(addr, paths::METRICS).await?;
        Ok(metric_value(&page, names::TALLY_DRIFT))
    };
    // -1 until the first check: 0 proves a check ran and found the database consistent.
    eventually("a check finds no drift", WAIT, async || {
        Ok(drift().await? == Some(0.0))
    })
    .await?;

    let mut db = bed.db().await?;
    db.execute(
        "UPDATE tally_shards SET votes = votes + 1 \
         WHERE ctid = (SELECT ctid FROM tally_shards WHERE candidate_id = 'a' LIMIT 1)",
    )
    .await?;
    eventually("drift of one candidate exported", WAIT, async || {
        Ok(drift().await? == Some(1.0))
    })
    .await?;
    replica.stop().await
}
