//! Server faults under a running replica, on a PRIVATE container pair (this binary stops
//! and starts the servers, so it shares them with no other suite). Both servers sit
//! behind fault proxies with fixed ports, so the replica's URLs survive restarts.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vote_harness::infra::{self, InfraOptions};
use vote_harness::inspect::{eventually, http_get};
use vote_harness::testbed::TestBed;
use vote_harness::votes;

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn database_stopped_mid_stream_nothing_acked_then_exact_recovery() -> anyhow::Result<()> {
    let servers = infra::start_private(InfraOptions::default()).await?;
    let bed = TestBed::new(&servers).await?;
    let mut config = bed.config("r1");
    config.batch_size = 50;
    config.prefetch_count = 100;
    let stop = CancellationToken::new();
    let replica = vote_aggregator::spawn(config, stop.clone()).await?;
    let addr = replica.metrics_addr();
    let metrics = replica.metrics().clone();
    eventually("replica ready", WAIT, async || {
        Ok(http_get(addr, "/readyz").await?.0 == 200)
    })
    .await?;

    let publisher = bed.publisher().await?;
    let before = votes::spread(500, &["e"], &["a", "b", "c"]);
    publisher.publish_votes(&before).await?;
    let mut db = bed.db().await?;
    eventually("first votes stored", WAIT, async || {
        Ok(db.vote_count().await? == 500)
    })
    .await?;
    drop(db);

    servers.stop_postgres().await?;
    let during = votes::spread(400, &["e"], &["a", "b", "c"]);
    publisher.publish_votes(&during).await?;
    eventually("readyz 503 while PostgreSQL is down", WAIT, async || {
        let (status, body) = http_get(addr, "/readyz").await?;
        Ok(status == 503 && body.contains("postgres"))
    })
    .await?;
    // The replica takes deliveries up to its prefetch but acks none of them.
    eventually("deliveries in hand", WAIT, async || {
        Ok(metrics.votes_received.get() > 500)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let broker = bed.broker().await?;
    let (ready, _) = broker.queue_state(&bed.queue).await?;
    let in_hand = metrics.votes_received.get() - 500;
    assert_eq!(
        u64::from(ready) + in_hand,
        400,
        "every vote published during the outage is either still queued or held unacked"
    );
    assert_eq!(
        metrics.votes_counted.get(),
        500,
        "nothing counted while down"
    );
    assert!(metrics.commit_retries.get() > 0 || metrics.database_connection_failures.get() > 0);

    servers.start_postgres().await?;
    let mut db = bed.db().await?;
    eventually("all votes stored after recovery", WAIT, async || {
        Ok(db.vote_count().await? == 900)
    })
    .await?;
    eventually("readyz 200 again", WAIT, async || {
        Ok(http_get(addr, "/readyz").await?.0 == 200)
    })
    .await?;
    let mut all = before.clone();
    all.extend(during);
    let mut want = std::collections::BTreeMap::new();
    for v in &all {
        *want
            .entry((v.election_id.clone(), v.candidate_id.clone()))
            .or_insert(0i64) += 1;
    }
    assert_eq!(db.tallies().await?, want);
    assert_eq!(db.counted_per_candidate().await?, want);
    let (ready, _) = broker.queue_state(&bed.queue).await?;
    assert_eq!(ready, 0);
    stop.cancel();
    replica.join().await?;
    Ok(())
}

#[tokio::test]
async fn broker_connection_cut_reconnects_and_loses_nothing() -> anyhow::Result<()> {
    let servers = infra::start_private(InfraOptions::default()).await?;
    let bed = TestBed::new(&servers).await?;
    bed.declare().await?;
    let votes = votes::spread(5_000, &["e"], &["a", "b"]);
    bed.publisher().await?.publish_votes(&votes).await?;

    // Small batches so the queue takes a while to drain, and the cut lands mid-stream.
    let mut config = bed.config("r1");
    config.batch_size = 10;
    config.prefetch_count = 20;
    let stop = CancellationToken::new();
    let replica = vote_aggregator::spawn(config, stop.clone()).await?;
    let metrics = replica.metrics().clone();
    eventually("counting started", WAIT, async || {
        Ok(metrics.votes_counted.get() > 0)
    })
    .await?;
    servers.rabbitmq_proxy().break_all();
    let counted_at_cut = metrics.votes_counted.get();
    tokio::time::sleep(Duration::from_secs(2)).await;
    servers.rabbitmq_proxy().restore();

    let mut db = bed.db().await?;
    eventually("all votes stored after reconnect", WAIT, async || {
        Ok(db.vote_count().await? == 5_000)
    })
    .await?;
    assert!(counted_at_cut < 5_000, "the cut landed mid-stream");
    assert!(metrics.broker_connection_failures.get() >= 1);
    assert_eq!(db.tallies().await?.values().sum::<i64>(), 5_000);
    assert_eq!(
        db.counted_per_candidate().await?.values().sum::<i64>(),
        5_000
    );
    stop.cancel();
    replica.join().await?;
    Ok(())
}
