//! The aggregator against real RabbitMQ and PostgreSQL (one container pair for this
//! binary, a fresh database and queue per test). Replicas run in-process here; the
//! `process` suite runs the real binary.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use vote_aggregator::db::{self, BatchColumns};
use vote_aggregator::http::paths;
use vote_aggregator::metrics::{DEP_POSTGRES, labels, names};
use vote_aggregator::vote::{self, Vote};
use vote_aggregator::{Config, Running};
use vote_testkit::infra;
use vote_testkit::inspect::{PerCandidate, eventually, http_get, metric_value};
use vote_testkit::prometheus::up_series;
use vote_testkit::publish::vote_properties;
use vote_testkit::testbed::TestBed;
use vote_testkit::votes;

mod hardening;
mod monitoring;
mod nodes;
mod recent;
mod results;

const WAIT: Duration = Duration::from_secs(60);

async fn bed() -> anyhow::Result<TestBed> {
    TestBed::new(infra::shared().await?).await
}

/// A running in-process replica and its stop switch.
struct Replica {
    running: Running,
    stop: CancellationToken,
}

impl Replica {
    async fn start(config: Config) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let running = vote_aggregator::spawn(config, stop.clone()).await?;
        Ok(Replica { running, stop })
    }

    fn counted(&self) -> u64 {
        self.running.metrics().votes_counted.get()
    }

    fn received(&self) -> u64 {
        self.running.metrics().votes_received.get()
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.running.join().await?;
        Ok(())
    }
}

fn expected(votes: &[Vote]) -> PerCandidate {
    let mut m = BTreeMap::new();
    for v in votes {
        *m.entry((v.election_id.clone(), v.candidate_id.clone()))
            .or_insert(0) += 1;
    }
    m
}

/// Waits until the queue is empty with no unacked deliveries left and `total` votes are
/// stored.
async fn wait_stored(bed: &TestBed, total: i64) -> anyhow::Result<()> {
    let mut db = bed.db().await?;
    eventually(&format!("{total} votes stored"), WAIT, async || {
        Ok(db.vote_count().await.unwrap_or(0) >= total)
    })
    .await
}

#[tokio::test]
async fn happy_path_counts_every_vote_and_statistics_are_exact() -> anyhow::Result<()> {
    let bed = bed().await?;
    let mut config = bed.config("r1");
    config.batch_size = 100;
    config.prefetch_count = 200;
    let replica = Replica::start(config).await?;
    let votes = votes::spread(
        2_000,
        &["e-2026", "e-local"],
        &["alice", "bob", "carol", "dave"],
    );
    // Skew: extra votes for alice in e-2026 so percentages are not all equal.
    let mut all = votes;
    all.extend((0..300).map(|_| votes::vote("e-2026", "alice")));
    let publisher = eventually_publisher(&bed).await?;
    publisher.publish_votes(&all).await?;
    wait_stored(&bed, all.len() as i64).await?;

    let mut db = bed.db().await?;
    let want = expected(&all);
    assert_eq!(db.counted_per_candidate().await?, want);
    assert_eq!(db.tallies().await?, want, "tally = count per candidate");
    let stats = db.statistics().await?;
    assert_eq!(stats.len(), 8);
    for s in &stats {
        let key = (s.election_id.clone(), s.candidate_id.clone());
        assert_eq!(s.votes, want[&key]);
        let election_total: i64 = want
            .iter()
            .filter(|((e, _), _)| *e == s.election_id)
            .map(|(_, n)| n)
            .sum();
        let pct = 100.0 * s.votes as f64 / election_total as f64;
        assert!(
            (s.percentage.unwrap_or(-1.0) - pct).abs() < 0.006,
            "{s:?} vs {pct}"
        );
    }
    let report = db::verify(&secrecy::SecretString::from(bed.database_url.clone())).await?;
    assert!(report.drift.is_empty());
    assert_eq!(report.votes, all.len() as i64);
    assert_eq!(replica.counted(), all.len() as u64);
    replica.stop().await
}

/// The topology is declared by the replica; publishing before it runs would be refused.
async fn eventually_publisher(bed: &TestBed) -> anyhow::Result<vote_testkit::publish::Publisher> {
    bed.declare().await?;
    bed.publisher().await
}

#[tokio::test]
async fn the_same_vote_twice_in_one_batch_or_in_two_is_counted_once() -> anyhow::Result<()> {
    let bed = bed().await?;
    let mut config = bed.config("r1");
    config.batch_size = 50;
    config.prefetch_count = 100;
    config.batch_timeout = Duration::from_millis(200);
    let publisher = eventually_publisher(&bed).await?;

    // Same batch: originals and their copies published back to back, before the replica
    // starts, so they land in the same batches.
    let first = votes::spread(20, &["e"], &["a", "b"]);
    let mut doubled = first.clone();
    doubled.extend(first.iter().cloned());
    publisher.publish_votes(&doubled).await?;
    let replica = Replica::start(config).await?;
    wait_stored(&bed, 20).await?;
    eventually("40 deliveries received", WAIT, async || {
        Ok(replica.received() >= 40)
    })
    .await?;

    // Different batches: the same votes again, long after they committed.
    publisher.publish_votes(&first).await?;
    let m = replica.running.metrics().clone();
    eventually("the late copies judged duplicates", WAIT, async || {
        Ok(m.votes_duplicate.with_label_values(&["false"]).get() >= 40)
    })
    .await?;

    let mut db = bed.db().await?;
    assert_eq!(db.vote_count().await?, 20);
    assert_eq!(db.tallies().await?, expected(&first));
    assert_eq!(
        db.conflict_count().await?,
        0,
        "identical copies are not conflicts"
    );
    assert_eq!(m.votes_counted.get(), 20);
    replica.stop().await
}

#[tokio::test]
async fn a_batch_committed_but_never_acked_is_redelivered_and_not_counted_again()
-> anyhow::Result<()> {
    let bed = bed().await?;
    let votes = votes::spread(30, &["e"], &["a", "b", "c"]);
    let publisher = eventually_publisher(&bed).await?;
    publisher.publish_votes(&votes).await?;

    // Play a replica that dies between COMMIT and ack: consume, commit through the
    // library's own batch write, then close the channel without acking.
    let config = bed.config("crashy");
    vote_aggregator::db::run_migrations(&config.database_url).await?;
    let pool = db::pool(&config.database_url, 1, &Default::default());
    let conn = lapin::Connection::connect(&bed.amqp_url, Default::default()).await?;
    let channel = conn.create_channel().await?;
    channel.basic_qos(100, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            bed.queue.as_str().into(),
            "crashy".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut columns = BatchColumns::default();
    while columns.len() < votes.len() {
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .context("no delivery")?
            .context("consumer ended")??;
        let v = vote::decode(&delivery.data).map_err(|r| anyhow::anyhow!("{r}"))?;
        columns.push(&v, true);
    }
    let outcome = db::write_batch(&pool, &config.database_url, &columns, 0).await?;
    assert_eq!(outcome.counted.len(), 30, "first commit counts them all");
    channel.close(200, "gone before ack".into()).await?;
    conn.close(200, "gone".into()).await?;

    // A real replica now receives all 30 again, flagged redelivered, and counts none.
    let replica = Replica::start(config).await?;
    let m = replica.running.metrics().clone();
    eventually("30 redeliveries judged duplicates", WAIT, async || {
        Ok(m.votes_duplicate.with_label_values(&["true"]).get() >= 30)
    })
    .await?;
    assert_eq!(m.votes_counted.get(), 0);
    let mut db = bed.db().await?;
    assert_eq!(db.vote_count().await?, 30);
    assert_eq!(db.tallies().await?, expected(&votes));
    let (ready, _) = bed.broker().await?.queue_state(&bed.queue).await?;
    assert_eq!(ready, 0);
    replica.stop().await
}

#[tokio::test]
async fn the_same_uuid_with_another_candidate_is_counted_once_and_recorded_as_a_conflict()
-> anyhow::Result<()> {
    let bed = bed().await?;
    let replica = Replica::start(bed.config("r1")).await?;
    let publisher = eventually_publisher(&bed).await?;
    let original = votes::vote("e", "alice");
    publisher
        .publish_votes(std::slice::from_ref(&original))
        .await?;
    wait_stored(&bed, 1).await?;
    // Later, a different payload under the same UUID; and in one batch, a fresh vote
    // followed by a conflicting copy of itself.
    let fresh = votes::vote("e", "carol");
    publisher
        .publish_votes(&[
            votes::conflicting(&original, "bob"),
            fresh.clone(),
            votes::conflicting(&fresh, "dave"),
        ])
        .await?;
    let m = replica.running.metrics().clone();
    eventually("two conflicts judged", WAIT, async || {
        Ok(m.votes_conflicting.get() >= 2)
    })
    .await?;
    let mut db = bed.db().await?;
    assert_eq!(db.vote_count().await?, 2);
    let tallies = db.tallies().await?;
    assert_eq!(tallies.get(&("e".into(), "alice".into())), Some(&1));
    assert_eq!(tallies.get(&("e".into(), "carol".into())), Some(&1));
    assert_eq!(tallies.get(&("e".into(), "bob".into())), None);
    assert_eq!(tallies.get(&("e".into(), "dave".into())), None);
    let mut conflicting = db.conflicting_ids().await?;
    conflicting.sort();
    let mut want = vec![original.vote_id, fresh.vote_id];
    want.sort();
    assert_eq!(conflicting, want);
    assert_eq!(db.conflict_count().await?, 2);
    // The same conflicting copy delivered again is not recorded twice.
    publisher
        .publish_votes(&[votes::conflicting(&original, "bob")])
        .await?;
    eventually("third conflict judged", WAIT, async || {
        Ok(m.votes_conflicting.get() >= 3)
    })
    .await?;
    assert_eq!(db.conflict_count().await?, 2);
    replica.stop().await
}

#[tokio::test]
async fn malformed_messages_go_to_the_dead_letter_queue_with_their_reason() -> anyhow::Result<()> {
    let bed = bed().await?;
    let mut config = bed.config("r1");
    config.batch_size = 10;
    config.prefetch_count = 20;
    let replica = Replica::start(config).await?;
    let publisher = eventually_publisher(&bed).await?;
    let good = votes::vote("e", "alice");
    let template = String::from_utf8(good.to_json())?;
    let fresh_id = || uuid::Uuid::now_v7().to_string();
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"{this is not json".to_vec(), "malformed_json"),
        (vec![0xff, 0xfe, 0xfd], "not_utf8"),
        (vec![b'x'; 5000], "too_large"),
        (
            template
                .replace(&good.vote_id.to_string(), "not-a-uuid")
                .into_bytes(),
            "invalid_field",
        ),
        (
            template
                .replace(&good.vote_id.to_string(), &fresh_id())
                .replace("\"candidate_id\":\"alice\",", "")
                .into_bytes(),
            "missing_field",
        ),
        (
            template
                .replace(&good.vote_id.to_string(), &fresh_id())
                .replace("alice", "bad candidate!")
                .into_bytes(),
            "invalid_field",
        ),
    ];
    // Neighbours before and after each bad message.
    let mut neighbours = Vec::new();
    for (body, _) in &bad {
        let before = votes::vote("e", "alice");
        let after = votes::vote("e", "bob");
        publisher
            .publish_votes(std::slice::from_ref(&before))
            .await?;
        publisher
            .publish_raw(body, BasicProperties::default().with_delivery_mode(2))
            .await?;
        publisher
            .publish_votes(std::slice::from_ref(&after))
            .await?;
        neighbours.push(before);
        neighbours.push(after);
    }
    wait_stored(&bed, neighbours.len() as i64).await?;

    let dead = bed
        .broker()
        .await?
        .drain(&bed.dead_letter_queue(), Duration::from_secs(2))
        .await?;
    assert_eq!(
        dead.len(),
        bad.len(),
        "every bad message dead-lettered once"
    );
    for (body, kind) in &bad {
        let d = dead
            .iter()
            .find(|d| &d.body == body)
            .with_context(|| format!("{kind} message missing from the DLQ"))?;
        let reason = d.reason.clone().unwrap_or_default();
        assert!(
            reason.starts_with(kind),
            "reason {reason:?} should start with {kind}"
        );
    }
    let mut db = bed.db().await?;
    assert_eq!(db.vote_count().await?, neighbours.len() as i64);
    assert_eq!(db.tallies().await?, expected(&neighbours));
    let m = replica.running.metrics();
    let rejected: u64 = vote::RejectKind::ALL
        .iter()
        .map(|k| m.votes_rejected.with_label_values(&[k.as_str()]).get())
        .sum();
    assert_eq!(rejected, bad.len() as u64);
    let (ready, _) = bed.broker().await?.queue_state(&bed.queue).await?;
    assert_eq!(ready, 0, "nothing requeued");
    replica.stop().await
}

#[tokio::test]
async fn two_replicas_with_duplicate_publishes_keep_all_four_invariants() -> anyhow::Result<()> {
    let bed = bed().await?;
    let mut c1 = bed.config("r1");
    c1.batch_size = 50;
    c1.prefetch_count = 100;
    let mut c2 = bed.config("r2");
    c2.batch_size = 137;
    c2.prefetch_count = 274;
    let (r1, r2) = (Replica::start(c1).await?, Replica::start(c2).await?);
    let publisher = eventually_publisher(&bed).await?;
    let second = bed.publisher().await?;
    let originals = votes::spread(3_000, &["e1", "e2"], &["a", "b", "c"]);
    // Duplicates from a second connection, concurrently, so both replicas race on them;
    // conflicting copies of 30 votes; 10 malformed bodies.
    let dups: Vec<Vote> = originals.iter().step_by(5).cloned().collect();
    let conflicts: Vec<Vote> = originals
        .iter()
        .skip(1)
        .step_by(100)
        .map(|v| votes::conflicting(v, "z"))
        .collect();
    let (a, b) = tokio::join!(
        publisher.publish_votes(&originals),
        second.publish_votes(&dups)
    );
    a?;
    b?;
    // The conflicting copies go out only once every original is stored: the first payload
    // STORED for a UUID is the counted one, and a confirmed original can still sit in the
    // other replica's uncommitted batch while a later copy is committed.
    wait_stored(&bed, originals.len() as i64).await?;
    second.publish_votes(&conflicts).await?;
    for i in 0..10 {
        publisher
            .publish_raw(
                format!("garbage {i}").as_bytes(),
                BasicProperties::default(),
            )
            .await?;
    }
    let broker = bed.broker().await?;
    eventually("queue drained", WAIT, async || {
        let m1 = r1.running.metrics();
        let m2 = r2.running.metrics();
        let judged = m1.votes_counted.get()
            + m2.votes_counted.get()
            + m1.votes_conflicting.get()
            + m2.votes_conflicting.get()
            + m1.votes_duplicate.with_label_values(&["false"]).get()
            + m2.votes_duplicate.with_label_values(&["false"]).get()
            + m1.votes_duplicate.with_label_values(&["true"]).get()
            + m2.votes_duplicate.with_label_values(&["true"]).get();
        Ok(judged >= (originals.len() + dups.len() + conflicts.len()) as u64)
    })
    .await?;

    let mut db = bed.db().await?;
    // 1. tally = count, per candidate; 2. every confirmed vote exactly once.
    assert_eq!(db.tallies().await?, expected(&originals));
    assert_eq!(db.counted_per_candidate().await?, expected(&originals));
    let mut stored = db.vote_ids().await?;
    stored.sort();
    let mut want: Vec<_> = originals.iter().map(|v| v.vote_id).collect();
    want.sort();
    assert_eq!(stored, want);
    // 3. every malformed message dead-lettered.
    let dead = broker
        .drain(&bed.dead_letter_queue(), Duration::from_secs(1))
        .await?;
    assert_eq!(dead.len(), 10);
    // 4. each conflicting copy recorded.
    assert_eq!(db.conflict_count().await?, conflicts.len() as i64);
    // Both replicas did part of the work.
    assert!(r1.counted() > 0 && r2.counted() > 0);
    assert_eq!(r1.counted() + r2.counted(), originals.len() as u64);
    r1.stop().await?;
    r2.stop().await
}

#[tokio::test]
async fn an_existing_queue_with_other_arguments_stops_startup_with_a_clear_error()
-> anyhow::Result<()> {
    let bed = bed().await?;
    let mut classic = bed.config("r1");
    classic.queue_type = vote_aggregator::config::QueueType::Classic;
    vote_aggregator::broker::connect_first(&classic).await?;
    let quorum = bed.config("r2");
    let err = Replica::start(quorum)
        .await?
        .running
        .join()
        .await
        .expect_err("must refuse");
    let msg = err.to_string();
    assert!(msg.contains(&format!("queue '{}'", bed.queue)), "{msg}");
    assert!(
        msg.contains("inequivalent arg"),
        "names the mismatch: {msg}"
    );
    assert!(msg.contains("QUEUE_TYPE"), "{msg}");
    assert!(!msg.contains('\n'));
    Ok(())
}

#[tokio::test]
async fn metrics_and_health_endpoints_report_the_replica() -> anyhow::Result<()> {
    let bed = bed().await?;
    let replica = Replica::start(bed.config("r1")).await?;
    let addr = replica.running.metrics_addr();
    eventually("readyz 200", WAIT, async || {
        Ok(http_get(addr, paths::READYZ).await?.0 == 200)
    })
    .await?;
    assert_eq!(http_get(addr, paths::HEALTHZ).await?.0, 200);
    let publisher = bed.publisher().await?;
    publisher
        .publish_votes(&votes::spread(5, &["e"], &["a"]))
        .await?;
    publisher
        .publish_raw(b"nope", vote_properties(&votes::vote("e", "a")))
        .await?;
    wait_stored(&bed, 5).await?;
    eventually("metrics show the work", WAIT, async || {
        let (_, page) = http_get(addr, paths::METRICS).await?;
        Ok(metric_value(&page, names::VOTES_COUNTED_TOTAL) == Some(5.0)
            && metric_value(
                &page,
                &format!(
                    r#"{}{{{}="{}"}}"#,
                    names::VOTES_REJECTED_TOTAL,
                    labels::REASON,
                    vote::RejectKind::MalformedJson.as_str()
                ),
            ) == Some(1.0))
    })
    .await?;
    let (_, page) = http_get(addr, paths::METRICS).await?;
    for name in [
        names::VOTES_RECEIVED_TOTAL.to_string(),
        format!("{}_count", names::BATCH_SIZE),
        format!("{}_count", names::COMMIT_DURATION_SECONDS),
        format!("{}_count", names::PUBLISH_TO_COMMIT_SECONDS),
        names::DATABASE_CONNECTION_FAILURES_TOTAL.to_string(),
        names::BROKER_CONNECTION_FAILURES_TOTAL.to_string(),
        up_series(DEP_POSTGRES),
        names::QUEUE_DEPTH.to_string(),
    ] {
        assert!(metric_value(&page, &name).is_some(), "{name} missing");
    }
    let published = format!("{}_count", names::PUBLISH_TO_COMMIT_SECONDS);
    assert!(metric_value(&page, &published) >= Some(5.0));
    assert_eq!(http_get(addr, "/nope").await?.0, 404);
    replica.stop().await
}
