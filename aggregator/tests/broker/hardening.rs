//! Exactly-once hardening against the real servers: redeliveries that must never divert a
//! vote, dead letters the broker makes on its own, commits that fail while `SELECT 1`
//! works, a batch that offers one UUID twice, a reconnect storm, evidence that must not
//! expire, and a schema revert that would drop counted votes.

use super::*;

use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_migrations::MigrationHarness as _;
use lapin::options::BasicCancelOptions;
use vote_aggregator::broker;
use vote_aggregator::config::QueueType;

/// Waits until the replica serving `addr` reports ready.
async fn wait_ready(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    eventually("ready", WAIT, async || {
        Ok(http_get(addr, paths::READYZ).await?.0 == 200)
    })
    .await
}

/// Takes every message of `queue` `times` times without acking, closing the connection
/// after each take so the broker returns them (as a crashed or disconnected replica
/// would).
async fn take_without_ack(bed: &TestBed, expected: usize, times: usize) -> anyhow::Result<()> {
    for take in 0..times {
        let conn = lapin::Connection::connect(&bed.amqp_url, Default::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(expected as u16 * 2, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                bed.queue.as_str().into(),
                "taker".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for _ in 0..expected {
            tokio::time::timeout(WAIT, consumer.next())
                .await
                .with_context(|| format!("take {take}: fewer than {expected} deliveries"))?
                .context("consumer ended")??;
        }
        conn.close(320, "crashed".into()).await?;
    }
    Ok(())
}

async fn redelivered_votes_are_counted(queue_type: QueueType) -> anyhow::Result<()> {
    let bed = bed().await?;
    let mut config = bed.config("r1");
    config.queue_type = queue_type;
    broker::connect_first(&config).await?; // declares the topology
    let votes = votes::spread(10, &["e"], &["a", "b"]);
    let publisher = bed.publisher().await?;
    publisher.publish_votes(&votes).await?;
    // RabbitMQ 4.0's default quorum delivery limit is 20: 25 returns exceed it.
    take_without_ack(&bed, votes.len(), 25).await?;

    let replica = Replica::start(config).await?;
    wait_stored(&bed, 10).await?;
    let mut db = bed.db().await?;
    assert_eq!(db.tallies().await?, expected(&votes));
    let broker = bed.broker().await?;
    let unexplained = broker::unexplained_queue(&bed.queue);
    for queue in [bed.queue.clone(), bed.dead_letter_queue(), unexplained] {
        let (ready, _) = broker.queue_state(&queue).await?;
        assert_eq!(ready, 0, "{queue} must be empty");
    }
    assert!(
        replica.running.metrics().high_delivery_count.get() >= 10
            || queue_type == QueueType::Classic
    );
    replica.stop().await
}

#[tokio::test]
async fn a_quorum_vote_returned_25_times_is_still_counted_once() -> anyhow::Result<()> {
    redelivered_votes_are_counted(QueueType::Quorum).await
}

#[tokio::test]
async fn a_classic_vote_returned_25_times_is_still_counted_once() -> anyhow::Result<()> {
    redelivered_votes_are_counted(QueueType::Classic).await
}

#[tokio::test]
async fn a_queue_with_the_brokers_default_delivery_limit_stops_startup() -> anyhow::Result<()> {
    let bed = bed().await?;
    // The queue as an older release declared it: quorum, dead-letter exchange, no limit
    // argument (so the broker's default of 20 applies).
    let conn = lapin::Connection::connect(&bed.amqp_url, Default::default()).await?;
    let channel = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        broker::args::QUEUE_TYPE.into(),
        lapin::types::AMQPValue::LongString(
            vote_aggregator::config::QueueType::Quorum.as_str().into(),
        ),
    );
    args.insert(
        broker::args::DEAD_LETTER_EXCHANGE.into(),
        lapin::types::AMQPValue::LongString(broker::DEAD_LETTER_EXCHANGE.into()),
    );
    channel
        .queue_declare(
            bed.queue.as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            args,
        )
        .await?;
    conn.close(200, "declared".into()).await?;

    let err = Replica::start(bed.config("r1"))
        .await?
        .running
        .join()
        .await
        .expect_err("must refuse a queue that can divert votes");
    let msg = err.to_string();
    assert!(msg.contains(&format!("queue '{}'", bed.queue)), "{msg}");
    assert!(
        msg.contains("delivery limit") && msg.contains("delete"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    Ok(())
}

#[tokio::test]
async fn a_vote_the_broker_dead_letters_on_its_own_is_counted_in_a_metric() -> anyhow::Result<()> {
    let bed = bed().await?;
    bed.declare().await?;
    let publisher = bed.publisher().await?;
    // A valid vote with a 1 ms per-message TTL expires before any replica takes it: the
    // broker dead-letters it without a reason.
    let vote = votes::vote("e", "a");
    publisher
        .publish_raw(
            &vote.to_json(),
            vote_properties(&vote).with_expiration("1".into()),
        )
        .await?;
    let replica = Replica::start(bed.config("r1")).await?;
    let m = replica.running.metrics().clone();
    eventually("the unexplained dead letter is seen", WAIT, async || {
        Ok(m.dead_letters_unexplained.get() == 1)
    })
    .await?;
    let (status, page) = http_get(replica.running.metrics_addr(), paths::METRICS).await?;
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(&page, names::DEAD_LETTERS_UNEXPLAINED),
        Some(1.0),
        "{page}"
    );
    // The evidence sits in the unexplained queue, not in the reasoned DLQ.
    let broker = bed.broker().await?;
    assert_eq!(broker.queue_state(&bed.dead_letter_queue()).await?.0, 0);
    let letters = broker
        .drain(
            &broker::unexplained_queue(&bed.queue),
            Duration::from_millis(200),
        )
        .await?;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, None);
    replica.stop().await
}

#[tokio::test]
async fn readiness_turns_503_while_commits_fail_though_select_1_works() -> anyhow::Result<()> {
    let bed = bed().await?;
    let replica = Replica::start(bed.config("r1")).await?;
    let addr = replica.running.metrics_addr();
    wait_ready(addr).await?;

    // A read-only database: SELECT 1 answers, every INSERT fails.
    let db_name = bed.database_name();
    let mut admin = bed.db().await?;
    // Terminates the service's sessions on this database: $1 the database, $2 the
    // service's application_name.
    let kick = "SELECT count(pg_terminate_backend(pid))::bigint AS n FROM pg_stat_activity \
                WHERE datname = $1 AND application_name = $2";
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db_name}\" SET default_transaction_read_only = on"
        ))
        .await?;
    admin
        .scalar_with(kick, &[&db_name, db::APPLICATION_NAME])
        .await?;
    let publisher = bed.publisher().await?;
    let vote = votes::vote("e", "a");
    publisher.publish_votes(std::slice::from_ref(&vote)).await?;
    eventually("503 while commits fail", WAIT, async || {
        let (status, body) = http_get(addr, paths::READYZ).await?;
        Ok(status == 503 && body.contains("commits"))
    })
    .await?;
    assert_eq!(replica.counted(), 0);

    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db_name}\" RESET default_transaction_read_only"
        ))
        .await?;
    admin
        .scalar_with(kick, &[&db_name, db::APPLICATION_NAME])
        .await?;
    wait_stored(&bed, 1).await?;
    eventually("ready again", WAIT, async || {
        Ok(http_get(addr, paths::READYZ).await?.0 == 200)
    })
    .await?;
    replica.stop().await
}

/// A fresh bed with the schema applied, its URL, and a pool of ONE batch session (the
/// batch-write tests call the database layer directly, without a replica).
pub(crate) async fn migrated_bed_with_one_session()
-> anyhow::Result<(TestBed, secrecy::SecretString, db::PgPool)> {
    let bed = bed().await?;
    let url = secrecy::SecretString::from(bed.database_url.clone());
    db::run_migrations(&url).await?;
    let pool = db::pool(&url, 1, &Default::default());
    Ok((bed, url, pool))
}

#[tokio::test]
async fn two_first_rows_of_one_uuid_never_add_two_to_a_tally() -> anyhow::Result<()> {
    let (_bed, url, pool) = migrated_bed_with_one_session().await?;
    let first = votes::vote("e", "a");
    let mut second = first.clone();
    second.candidate_id = "b".into();
    let mut columns = BatchColumns::default();
    // A caller that (wrongly) offers both rows of one UUID for insertion.
    columns.push(&first, true);
    columns.push(&second, true);
    let outcome = db::write_batch(&pool, &url, &columns, 0).await?;
    assert_eq!(outcome.counted, vec![0], "only the first row counts");
    assert_eq!(
        outcome.conflicting,
        vec![1],
        "the other payload is a conflict"
    );
    let report = db::verify(&url).await?;
    assert_eq!((report.votes, report.tallied), (1, 1), "{report:?}");
    assert!(report.drift.is_empty(), "{report:?}");
    Ok(())
}

#[tokio::test]
async fn rows_stored_before_are_read_back_and_only_another_payload_is_a_conflict()
-> anyhow::Result<()> {
    let (bed, url, pool) = migrated_bed_with_one_session().await?;
    let mut stored: Vec<_> = (0..3).map(|_| votes::vote("e", "a")).collect();
    stored[0].precinct_id = None;
    let mut first = BatchColumns::default();
    for v in &stored {
        first.push(v, true);
    }
    db::write_batch(&pool, &url, &first, 0).await?;

    // No memory of recent votes here: every row not inserted is judged by the database.
    let exact = stored[0].clone();
    // The database keeps microseconds (the vote's are whole ones): the same stored vote.
    let mut finer = stored[1].clone();
    finer.cast_at += chrono::Duration::nanoseconds(400);
    let mut other = stored[2].clone();
    other.candidate_id = "b".into();
    let fresh = votes::vote("e", "c");
    let mut second = BatchColumns::default();
    for v in [&exact, &finer, &fresh, &other] {
        second.push(v, true);
    }
    let outcome = db::write_batch(&pool, &url, &second, 0).await?;
    assert_eq!(outcome.counted, vec![2], "only the fresh vote counts");
    assert_eq!(
        outcome.conflicting,
        vec![3],
        "only another candidate conflicts"
    );
    assert_eq!(outcome.known_duplicates, 0, "no memory was given");
    let mut admin = bed.db().await?;
    assert_eq!(admin.conflict_count().await?, 1);
    assert_eq!(admin.conflicting_ids().await?, vec![other.vote_id]);
    let report = db::verify(&url).await?;
    assert_eq!((report.votes, report.tallied), (4, 4), "{report:?}");
    Ok(())
}

#[tokio::test]
async fn a_stored_vote_that_cannot_be_read_here_is_judged_by_the_database() -> anyhow::Result<()> {
    let (bed, url, pool) = migrated_bed_with_one_session().await?;
    let copy = votes::vote("e", "a");
    // Stored by another writer, with a cast_at that no timestamp here can hold.
    let mut admin = bed.db().await?;
    admin
        .batch_execute(&format!(
            "INSERT INTO votes (vote_id, election_id, candidate_id, cast_at) \
             VALUES ('{}', 'e', 'a', 'infinity')",
            copy.vote_id
        ))
        .await?;
    let mut columns = BatchColumns::default();
    columns.push(&copy, true);
    let outcome = db::write_batch(&pool, &url, &columns, 0).await?;
    assert!(outcome.counted.is_empty());
    assert_eq!(
        outcome.conflicting,
        vec![0],
        "another cast_at is a conflict"
    );
    assert_eq!(admin.conflicting_ids().await?, vec![copy.vote_id]);
    Ok(())
}

#[tokio::test]
async fn an_exclusive_consumer_elsewhere_does_not_cause_a_reconnect_storm() -> anyhow::Result<()> {
    let bed = bed().await?;
    // Classic: RabbitMQ 4.0.5 lets a second consumer onto a quorum queue that has an
    // exclusive one (seen here), a classic queue refuses it with 403.
    let mut config = bed.config("r1");
    config.queue_type = QueueType::Classic;
    broker::connect_first(&config).await?;
    let conn = lapin::Connection::connect(&bed.amqp_url, Default::default()).await?;
    let channel = conn.create_channel().await?;
    let _hog = channel
        .basic_consume(
            bed.queue.as_str().into(),
            "hog".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let replica = Replica::start(config).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let attempts = replica.running.metrics().broker_connection_failures.get();
    assert!(
        (1..10).contains(&attempts),
        "{attempts} lost sessions in 5 s: expected backoff across short sessions"
    );
    channel
        .basic_cancel("hog".into(), BasicCancelOptions::default())
        .await?;
    conn.close(200, "done".into()).await?;
    replica.stop().await
}

#[tokio::test]
async fn a_dead_letter_copy_does_not_expire() -> anyhow::Result<()> {
    let bed = bed().await?;
    let replica = Replica::start(bed.config("r1")).await?;
    let publisher = eventually_publisher(&bed).await?;
    // Malformed, with a 3 s TTL: taken at once, its dead-letter copy must outlive that.
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_expiration("3000".into());
    publisher.publish_raw(b"{not json", props).await?;
    let m = replica.running.metrics().clone();
    eventually("dead-lettered", WAIT, async || {
        Ok(m.votes_rejected
            .with_label_values(&[vote_aggregator::vote::RejectKind::MalformedJson.as_str()])
            .get()
            == 1)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let letters = bed
        .broker()
        .await?
        .drain(&bed.dead_letter_queue(), Duration::from_millis(200))
        .await?;
    assert_eq!(letters.len(), 1, "the evidence expired");
    assert!(letters[0].reason.is_some());
    replica.stop().await
}

#[tokio::test]
async fn reverting_the_schema_refuses_while_votes_are_counted() -> anyhow::Result<()> {
    let (bed, url, pool) = migrated_bed_with_one_session().await?;
    let mut columns = BatchColumns::default();
    columns.push(&votes::vote("e", "a"), true);
    db::write_batch(&pool, &url, &columns, 0).await?;

    let raw = bed.database_url.clone();
    let reverted = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut conn =
            <AsyncConnectionWrapper<AsyncPgConnection> as diesel::Connection>::establish(&raw)?;
        // Every migration, newest first: the grants revert, the first one refuses.
        conn.revert_all_migrations(db::MIGRATIONS)
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{e}"))
    })
    .await?;
    let err = reverted.expect_err("the revert must refuse").to_string();
    assert!(err.contains("refusing to revert"), "{err}");
    let mut db = bed.db().await?;
    assert_eq!(db.vote_count().await?, 1, "the counted vote survived");
    Ok(())
}

/// Backends of the service's sessions on `db_name`.
async fn service_backends(
    db: &mut vote_testkit::inspect::Db,
    db_name: &str,
) -> anyhow::Result<i64> {
    db.scalar_with(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = $2",
        &[db_name, db::APPLICATION_NAME],
    )
    .await
}

#[tokio::test]
async fn a_lock_held_elsewhere_never_leaks_backends_and_counting_resumes() -> anyhow::Result<()> {
    let bed = bed().await?;
    let mut config = bed.config("r1");
    config.batch_size = 10;
    config.db_pool_size = 2;
    config.db_timeouts.statement = Duration::from_millis(1500);
    config.db_timeouts.lock = Duration::from_millis(1000);
    config.db_timeouts.idle_in_transaction = Duration::from_millis(1500);
    config.db_attempt_timeout = Duration::from_millis(3000);
    let replica = Replica::start(config).await?;
    let addr = replica.running.metrics_addr();
    wait_ready(addr).await?;

    let db_name = bed.database_name();
    // An operator's session holds every tally row (as a stuck job or a psql left open
    // would) for longer than the service's own 30 s default attempt timeout.
    let mut holder = bed.db().await?;
    holder
        .batch_execute("BEGIN; LOCK TABLE tally_shards IN EXCLUSIVE MODE")
        .await?;
    let publisher = bed.publisher().await?;
    let batch = votes::spread(50, &["e"], &["a", "b"]);
    publisher.publish_votes(&batch).await?;
    let mut watcher = bed.db().await?;
    let mut most = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(35);
    while tokio::time::Instant::now() < until {
        most = most.max(service_backends(&mut watcher, &db_name).await?);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        most <= 2,
        "{most} backends with DB_POOL_SIZE=2: abandoned attempts leak"
    );
    assert_eq!(
        replica.counted(),
        0,
        "nothing can commit while the lock is held"
    );
    assert!(replica.running.metrics().commit_retries.get() > 0);

    holder.batch_execute("COMMIT").await?;
    wait_stored(&bed, 50).await?;
    assert_eq!(bed.db().await?.tallies().await?, expected(&batch));
    replica.stop().await
}

/// How another transaction that holds a batch's UUID, not yet committed, ends.
#[derive(Debug, Clone, Copy)]
enum Holder {
    CommitsTheSamePayload,
    CommitsAnotherPayload,
    RollsBack,
}

#[tokio::test]
async fn a_uuid_held_by_an_open_transaction_is_judged_once_that_transaction_ends()
-> anyhow::Result<()> {
    let (bed, url, pool) = migrated_bed_with_one_session().await?;
    let mut watcher = bed.db().await?;
    for holder in [
        Holder::CommitsTheSamePayload,
        Holder::CommitsAnotherPayload,
        Holder::RollsBack,
    ] {
        let vote = votes::vote("held", "a");
        let candidate = match holder {
            Holder::CommitsAnotherPayload => "b",
            _ => "a",
        };
        // Another writer (another replica's batch) has inserted the UUID, not committed.
        let mut other = bed.db().await?;
        other.batch_execute("BEGIN").await?;
        other
            .batch_execute(&format!(
                "INSERT INTO votes (vote_id, election_id, candidate_id, precinct_id, cast_at) \
                 VALUES ('{}', 'held', '{candidate}', 'p-1', '{}')",
                vote.vote_id,
                vote.cast_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            ))
            .await?;
        let mut columns = BatchColumns::default();
        columns.push(&vote, true);
        let (p, u) = (pool.clone(), url.clone());
        let write = tokio::spawn(async move { db::write_batch(&p, &u, &columns, 0).await });
        eventually(
            "the batch waits for the other transaction",
            Duration::from_secs(10),
            async || {
                Ok(watcher
                    .scalar(
                        "SELECT count(*)::bigint AS n FROM pg_stat_activity \
                         WHERE wait_event_type = 'Lock' AND datname = current_database()",
                    )
                    .await?
                    >= 1)
            },
        )
        .await?;
        match holder {
            Holder::RollsBack => other.batch_execute("ROLLBACK").await?,
            _ => other.batch_execute("COMMIT").await?,
        }
        let outcome = write.await??;
        let expected = match holder {
            // Stored by the other transaction: a duplicate, neither counted nor a conflict.
            Holder::CommitsTheSamePayload => (vec![], vec![]),
            Holder::CommitsAnotherPayload => (vec![], vec![0]),
            // The other transaction is gone: this batch stores and counts the vote.
            Holder::RollsBack => (vec![0], vec![]),
        };
        assert_eq!(
            (outcome.counted, outcome.conflicting),
            expected,
            "{holder:?}"
        );
    }
    // Three stored votes: the two the other writer committed by hand (it bypassed the
    // batch write, so they have no tally) and the one the batch counted, tallied once.
    let report = db::verify(&url).await?;
    assert_eq!((report.votes, report.tallied), (3, 1), "{report:?}");
    Ok(())
}

#[tokio::test]
async fn an_in_doubt_commit_is_resolved_by_asking_the_server() -> anyhow::Result<()> {
    use vote_aggregator::db::{BatchOutcome, InDoubt, Resolution};
    let (bed, url, pool) = migrated_bed_with_one_session().await?;
    let mut db = bed.db().await?;
    // Plays a batch transaction that counted `vote`, returning its id.
    async fn insert(db: &mut vote_testkit::inspect::Db, vote: &Vote) -> anyhow::Result<i64> {
        db.batch_execute("BEGIN").await?;
        let xid = db
            .scalar("SELECT pg_current_xact_id()::text::bigint AS n")
            .await?;
        db.batch_execute(&format!(
            "INSERT INTO votes (vote_id, election_id, candidate_id, cast_at) \
             VALUES ('{}', 'e', 'a', now())",
            vote.vote_id
        ))
        .await?;
        Ok(xid)
    }
    let doubt_of = |vote: &Vote, xid: i64| {
        let mut columns = BatchColumns::default();
        columns.push(vote, true);
        let outcome = BatchOutcome {
            counted: vec![0],
            ..BatchOutcome::default()
        };
        (columns, InDoubt { xid, outcome })
    };

    let (kept, dropped) = (votes::vote("e", "a"), votes::vote("e", "a"));
    let xid = insert(&mut db, &kept).await?;
    let (columns, doubt) = doubt_of(&kept, xid);
    assert_eq!(
        db::resolve_in_doubt(&pool, &url, &columns, &doubt).await?,
        Resolution::StillRunning
    );
    db.batch_execute("COMMIT").await?;
    assert_eq!(
        db::resolve_in_doubt(&pool, &url, &columns, &doubt).await?,
        Resolution::Committed
    );
    // The same id "committed", but not with this batch's votes: an id handed out again
    // after a crash. The batch must be written again.
    let (other, reused) = doubt_of(&dropped, xid);
    assert_eq!(
        db::resolve_in_doubt(&pool, &url, &other, &reused).await?,
        Resolution::NotCommitted
    );

    let xid = insert(&mut db, &dropped).await?;
    db.batch_execute("ROLLBACK").await?;
    let (columns, doubt) = doubt_of(&dropped, xid);
    assert_eq!(
        db::resolve_in_doubt(&pool, &url, &columns, &doubt).await?,
        Resolution::NotCommitted
    );
    // An id the server has not handed out yet (lost with a crash).
    let (columns, doubt) = doubt_of(&dropped, xid + 1_000_000);
    assert_eq!(
        db::resolve_in_doubt(&pool, &url, &columns, &doubt).await?,
        Resolution::NotCommitted
    );
    Ok(())
}

#[tokio::test]
async fn a_transaction_abandoned_before_commit_never_rides_along_with_the_next_batch()
-> anyhow::Result<()> {
    use diesel_async::RunQueryDsl as _;
    use vote_aggregator::db::txn;
    // One session: if the abandoned one were lent out again, the next batch would run
    // inside its open transaction, and that batch's COMMIT would store its row too.
    let (bed, url, pool) = migrated_bed_with_one_session().await?;
    let abandoned = votes::vote("e", "a");
    {
        let mut conn = pool.get().await?;
        txn::mark_open(&mut conn);
        let insert = diesel::sql_query(format!(
            "INSERT INTO votes (vote_id, election_id, candidate_id, cast_at) \
             VALUES ('{}', 'e', 'a', now())",
            abandoned.vote_id
        ))
        .execute(&mut &*conn);
        txn::begin_with(&conn, insert).await?;
        // Dropped here, as a timed-out attempt is: no COMMIT, no ROLLBACK.
    }
    let next = votes::vote("e", "b");
    let mut columns = BatchColumns::default();
    columns.push(&next, true);
    let outcome = db::write_batch(&pool, &url, &columns, 0).await?;
    assert_eq!(outcome.counted, vec![0], "the next batch counts its vote");
    assert_eq!(
        bed.db().await?.vote_ids().await?,
        vec![next.vote_id],
        "only the next batch's vote is stored: the abandoned transaction's row did not ride along"
    );
    Ok(())
}
