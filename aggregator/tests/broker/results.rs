//! The results outbox against real servers: the events the relays publish add up to
//! `vote_statistics` exactly (the reference reader's check), several relays share the
//! work without repeats, and counting never waits for a relay.

use std::time::Duration;

use vote_testkit::inspect::eventually;
use vote_testkit::results::ResultsReader;
use vote_testkit::testbed::TestBed;
use vote_testkit::votes;

use super::{Replica, WAIT, bed, eventually_publisher, wait_stored};

/// Elections of this test only (the broker and its `votes.results` exchange are shared
/// by the tests of this binary): `<prefix>.e1`, `<prefix>.e2`, read with `<prefix>.*`.
/// Migrates the bed's database and starts a reader of this test's elections; returns it
/// with the two election ids.
async fn migrated_with_reader(bed: &TestBed) -> anyhow::Result<(ResultsReader, [String; 2])> {
    vote_aggregator::db::run_migrations(&secrecy::SecretString::from(bed.database_url.clone()))
        .await?;
    let prefix = bed.queue.replace('.', "-");
    let binding = format!("{prefix}.*");
    let reader = ResultsReader::start(&bed.database_url, &bed.amqp_url, &prefix, &binding).await?;
    let e = |n| format!("{prefix}.e{n}");
    Ok((reader, [e(1), e(2)]))
}

#[tokio::test]
async fn two_relays_publish_every_event_once_and_they_add_up_to_the_statistics()
-> anyhow::Result<()> {
    let bed = bed().await?;
    let (mut reader, [e1, e2]) = migrated_with_reader(&bed).await?;
    let mut replicas = Vec::new();
    for name in ["r1", "r2"] {
        let mut config = bed.config(name);
        config.batch_size = 20;
        config.prefetch_count = 40;
        config.results_relay_batch = 7;
        replicas.push(Replica::start(config).await?);
    }
    let votes = votes::spread(1_200, &[&e1, &e2], &["a", "b", "c"]);
    eventually_publisher(&bed)
        .await?
        .publish_votes(&votes)
        .await?;
    wait_stored(&bed, 1_200).await?;

    let check = reader.check(WAIT).await?;
    eprintln!("{check}");
    assert!(check.passed(), "{check}");
    assert_eq!(check.candidates, 6, "{check}");
    assert_eq!(check.repeats, 0, "no fault, no repeat: {check}");
    let published: u64 = replicas
        .iter()
        .map(|r| r.running.metrics().results_events_published.get())
        .sum();
    assert_eq!(
        published, check.events,
        "each event published by one relay: {check}"
    );
    assert!(
        replicas
            .iter()
            .all(|r| r.running.metrics().results_events_published.get() > 0),
        "both relays took part"
    );
    let mut db = bed.db().await?;
    assert_eq!(
        db.scalar("SELECT count(*) AS n FROM results_outbox")
            .await?,
        0
    );
    for r in replicas {
        r.stop().await?;
    }
    reader.delete_queue().await?;
    bed.finish().await
}

#[tokio::test]
async fn counting_goes_on_without_a_relay_and_the_outbox_is_published_later() -> anyhow::Result<()>
{
    let bed = bed().await?;
    let (mut reader, [e1, _]) = migrated_with_reader(&bed).await?;
    let mut config = bed.config("no-relay");
    config.batch_size = 25;
    config.prefetch_count = 50;
    config.results_relay = false;
    let counter = Replica::start(config).await?;
    let votes = votes::spread(500, &[&e1], &["a", "b"]);
    eventually_publisher(&bed)
        .await?
        .publish_votes(&votes)
        .await?;
    wait_stored(&bed, 500).await?;
    let mut db = bed.db().await?;
    let pending = db
        .scalar("SELECT count(*) AS n FROM results_outbox")
        .await?;
    assert!(pending > 0, "the events wait in the outbox");
    // Its gauges show them (refreshed every 2 s).
    let m = counter.running.metrics().clone();
    eventually("the pending gauge shows the outbox", WAIT, async || {
        Ok(m.results_outbox_pending.get() == pending
            && m.results_outbox_oldest_age_seconds.get() > 0.0)
    })
    .await?;

    // A replica that relays publishes them all.
    let relay = Replica::start(bed.config("relay")).await?;
    eventually("the outbox emptied", WAIT, async || {
        Ok(db
            .scalar("SELECT count(*) AS n FROM results_outbox")
            .await?
            == 0)
    })
    .await?;
    let check = reader.check(Duration::from_secs(30)).await?;
    assert!(check.passed(), "{check}");
    assert_eq!(check.events, pending as u64, "{check}");
    counter.stop().await?;
    relay.stop().await?;
    reader.delete_queue().await?;
    bed.finish().await
}
