//! Server faults under a running replica, on a PRIVATE container pair (this binary stops
//! and starts the servers, so it shares them with no other suite). Both servers sit
//! behind fault proxies with fixed ports, so the replica's URLs survive restarts.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vote_aggregator::http::paths;
use vote_testkit::infra::{self, InfraOptions};
use vote_testkit::inspect::{eventually, http_get};
use vote_testkit::testbed::TestBed;
use vote_testkit::votes;

mod memory;
mod retention;

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
        Ok(http_get(addr, paths::READYZ).await?.0 == 200)
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
        let (status, body) = http_get(addr, paths::READYZ).await?;
        Ok(status == 503 && body.contains(vote_aggregator::metrics::DEP_POSTGRES))
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
        Ok(http_get(addr, paths::READYZ).await?.0 == 200)
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

/// Starts an in-process replica and waits until it reports ready.
async fn start_ready(
    config: vote_aggregator::Config,
) -> anyhow::Result<(vote_aggregator::Running, CancellationToken)> {
    let stop = CancellationToken::new();
    let replica = vote_aggregator::spawn(config, stop.clone()).await?;
    let addr = replica.metrics_addr();
    eventually("replica ready", WAIT, async || {
        Ok(http_get(addr, paths::READYZ).await?.0 == 200)
    })
    .await?;
    Ok((replica, stop))
}

/// Sets or clears a memory alarm on the RabbitMQ node: while it is set, the broker stops
/// reading from every connection that publishes (so a dead-letter confirm never comes).
fn memory_alarm(container: &str, on: bool) -> anyhow::Result<()> {
    let call = if on { "set_alarm" } else { "clear_alarm" };
    let expr = if on {
        "rabbit_alarm:set_alarm({{resource_limit, memory, node()}, []})."
    } else {
        "rabbit_alarm:clear_alarm({resource_limit, memory, node()})."
    };
    let out = std::process::Command::new("docker")
        .args(["exec", container, "rabbitmqctl", "eval", expr])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl {call} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn a_stalled_dead_letter_confirm_never_holds_a_transaction_open() -> anyhow::Result<()> {
    let servers = infra::start_private(InfraOptions::default()).await?;
    let bed = TestBed::new(&servers).await?;
    bed.declare().await?;
    let publisher = bed.publisher().await?;
    let first = votes::spread(15, &["e"], &["a", "b"]);
    let rest = votes::spread(200, &["e"], &["a", "b"]);
    publisher.publish_votes(&first).await?;
    publisher
        .publish_raw(
            b"{poison",
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await?;
    publisher.publish_votes(&rest).await?;
    publisher.close().await;

    // One tally shard: both replicas need the same tally rows.
    let mut config = bed.config("r1");
    config.batch_size = 10;
    config.prefetch_count = 40;
    config.tally_shards = 1;
    memory_alarm(servers.rabbitmq_container_id(), true)?;
    let stop = CancellationToken::new();
    let stalled = vote_aggregator::spawn(config.clone(), stop.clone()).await?;
    let stalled_metrics = stalled.metrics().clone();
    eventually("r1 took the poison message", WAIT, async || {
        Ok(stalled_metrics
            .votes_rejected
            .with_label_values(&[vote_aggregator::vote::RejectKind::MalformedJson.as_str()])
            .get()
            == 1)
    })
    .await?;

    config.replica_id = "r2".into();
    let other = vote_aggregator::spawn(config, stop.clone()).await?;
    let other_metrics = other.metrics().clone();
    let mut db = bed.db().await?;
    let db_name = bed.database_name();
    // The batch sessions (the results relay's own session deliberately keeps its claim
    // open while it waits for confirms, at most 5 s, holding only outbox rows nobody
    // waits for; it has an application_name of its own).
    let idle_sql = format!(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = '{db_name}' \
         AND application_name = '{}' \
         AND state LIKE 'idle in transaction%' AND state_change < now() - interval '1 second'",
        vote_aggregator::db::APPLICATION_NAME
    );
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < until {
        assert_eq!(
            db.scalar(&idle_sql).await?,
            0,
            "a backend sat idle in transaction > 1 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        other_metrics.votes_counted.get() >= 100,
        "the other replica must keep committing: {} counted",
        other_metrics.votes_counted.get()
    );

    memory_alarm(servers.rabbitmq_container_id(), false)?;
    eventually(
        "every vote stored once the alarm clears",
        WAIT,
        async || Ok(db.vote_count().await? == 215),
    )
    .await?;
    assert_eq!(db.tallies().await?.values().sum::<i64>(), 215);
    let letters = bed
        .broker()
        .await?
        .drain(&bed.dead_letter_queue(), Duration::from_millis(500))
        .await?;
    assert_eq!(letters.len(), 1);

    // The broker closes a replica's dead-letter channel (its exchange is gone: 404). The
    // message is rejected instead, and once the exchange is back the next malformed
    // message is dead-lettered with its reason again: a closed channel does not stop
    // dead-lettering for good.
    let admin = lapin::Connection::connect(&bed.amqp_url, Default::default()).await?;
    admin
        .create_channel()
        .await?
        .exchange_delete(
            vote_aggregator::broker::DEAD_LETTER_EXCHANGE.into(),
            Default::default(),
        )
        .await?;
    let publisher = bed.publisher().await?;
    let poison = lapin::BasicProperties::default().with_delivery_mode(2);
    publisher
        .publish_raw(b"{lost poison", poison.clone())
        .await?;
    let rejected = || {
        stalled_metrics
            .votes_rejected
            .with_label_values(&[vote_aggregator::vote::RejectKind::MalformedJson.as_str()])
            .get()
            + other_metrics
                .votes_rejected
                .with_label_values(&[vote_aggregator::vote::RejectKind::MalformedJson.as_str()])
                .get()
    };
    eventually("the second poison message taken", WAIT, async || {
        Ok(rejected() == 2)
    })
    .await?;
    bed.declare().await?; // the exchange and its bindings again
    publisher.publish_raw(b"{third poison", poison).await?;
    eventually("the third poison message taken", WAIT, async || {
        Ok(rejected() == 3)
    })
    .await?;
    let letters = bed
        .broker()
        .await?
        .drain(&bed.dead_letter_queue(), Duration::from_secs(2))
        .await?;
    assert_eq!(
        letters.len(),
        1,
        "dead-lettered again after the channel was closed"
    );
    assert_eq!(letters[0].body, b"{third poison".to_vec());
    assert!(letters[0].reason.is_some());
    admin.close(200, "done".into()).await?;
    stop.cancel();
    stalled.join().await?;
    other.join().await?;
    Ok(())
}

#[tokio::test]
async fn a_commit_whose_answer_is_lost_counts_its_votes_as_counted() -> anyhow::Result<()> {
    let servers = infra::start_private(InfraOptions::default()).await?;
    let bed = TestBed::new(&servers).await?;
    let mut config = bed.config("r1");
    config.batch_size = 100;
    let (replica, stop) = start_ready(config).await?;
    let metrics = replica.metrics().clone();
    // Test-only: make the next COMMIT take 3 s on the server (a deferred trigger sleeps
    // once per transaction), so the connection can be cut while COMMIT runs.
    let mut db = bed.db().await?;
    db.batch_execute(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF current_setting('test.slept', true) IS NULL THEN \
             PERFORM set_config('test.slept', '1', true); PERFORM pg_sleep(3); \
           END IF; RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON votes \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    )
    .await?;
    let batch = votes::spread(20, &["e"], &["a", "b"]);
    bed.publisher().await?.publish_votes(&batch).await?;
    eventually("COMMIT under way", WAIT, async || {
        Ok(db
            .scalar_with(
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE application_name = $1 AND wait_event = 'PgSleep'",
                &[vote_aggregator::db::APPLICATION_NAME],
            )
            .await?
            == 1)
    })
    .await?;
    // The client loses the connection mid-COMMIT; the server goes on and commits.
    servers.postgres_proxy().break_all();
    tokio::time::sleep(Duration::from_millis(300)).await;
    servers.postgres_proxy().restore();

    let mut db = bed.db().await?; // the test's own session went through the proxy too
    eventually("20 votes stored and reported", WAIT, async || {
        Ok(db.vote_count().await? == 20 && metrics.batches_committed.get() >= 1)
    })
    .await?;
    assert!(
        metrics.commit_retries.get() >= 1,
        "the COMMIT's answer was lost"
    );
    assert_eq!(metrics.votes_counted.get(), 20, "counted by this replica");
    let duplicates: u64 = ["true", "false"]
        .iter()
        .map(|f| metrics.votes_duplicate.with_label_values(&[*f]).get())
        .sum();
    assert_eq!(duplicates, 0, "its own commit is not a duplicate");
    stop.cancel();
    replica.join().await?;
    Ok(())
}

#[tokio::test]
async fn a_session_lost_while_postgres_is_down_ends_at_once() -> anyhow::Result<()> {
    let servers = infra::start_private(InfraOptions::default()).await?;
    let bed = TestBed::new(&servers).await?;
    let mut config = bed.config("r1");
    config.batch_size = 50;
    let (replica, stop) = start_ready(config).await?;
    let metrics = replica.metrics().clone();
    servers.stop_postgres().await?;
    let batch = votes::spread(100, &["e"], &["a", "b"]);
    bed.publisher().await?.publish_votes(&batch).await?;
    eventually("deliveries in hand, commits retrying", WAIT, async || {
        Ok(metrics.votes_received.get() == 100 && metrics.commit_retries.get() > 0)
    })
    .await?;

    // The broker connection goes: the session must end now (its deliveries are back in
    // the queue), not when PostgreSQL returns.
    servers.rabbitmq_proxy().break_all();
    eventually("session ended", Duration::from_secs(15), async || {
        Ok(!metrics.is_up(vote_aggregator::metrics::DEP_RABBITMQ))
    })
    .await?;
    servers.rabbitmq_proxy().restore();
    let broker = bed.broker().await?;
    eventually("every delivery back in the queue", WAIT, async || {
        Ok(broker.queue_state(&bed.queue).await? == (100, 0))
    })
    .await?;

    servers.start_postgres().await?;
    let mut db = bed.db().await?;
    eventually(
        "all 100 counted once PostgreSQL is back",
        WAIT,
        async || Ok(db.vote_count().await? == 100),
    )
    .await?;
    assert_eq!(db.tallies().await?.values().sum::<i64>(), 100);
    stop.cancel();
    replica.join().await?;
    Ok(())
}
