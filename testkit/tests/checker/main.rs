//! The checker is itself tested: an honest run passes with exact figures, and test
//! doubles of broken consumers (one that drops a batch, one that skips dedupe, one that
//! invents a vote) make it fail with the right numbers. A vote whose publish was
//! attempted but never confirmed may be counted or absent (indeterminate, reported), a
//! confirmed one missing is lost. Empty and never-draining runs fail with a reason.

use std::time::Duration;

use diesel::sql_types::{Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use vote_aggregator::db::{self, BatchColumns};
use vote_aggregator::http::paths;
use vote_aggregator::vote::{self, Vote};
use vote_testkit::checker::{self, CheckOptions};
use vote_testkit::infra;
use vote_testkit::ledger::Ledger;
use vote_testkit::publish::{PublishOptions, publish_messages};
use vote_testkit::testbed::TestBed;
use vote_testkit::workload::{Message, Workload, WorkloadSpec};

fn quick() -> CheckOptions {
    CheckOptions {
        drain_timeout: Duration::from_secs(60),
        settle: Duration::from_secs(2),
    }
}

/// Publishes a workload (main and late phases) and returns its ledger.
async fn publish(bed: &TestBed, spec: &WorkloadSpec) -> anyhow::Result<Ledger> {
    bed.declare().await?;
    let w = Workload::generate(spec);
    let mut ledger = Ledger::new(&bed.queue, spec.seed);
    let opts = PublishOptions::default();
    publish_messages(&bed.amqp_url, &bed.queue, &w.main, &opts, &mut ledger).await?;
    publish_messages(&bed.amqp_url, &bed.queue, &w.late, &opts, &mut ledger).await?;
    Ok(ledger)
}

#[tokio::test]
async fn an_honest_run_passes_with_exact_figures() -> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let spec = WorkloadSpec {
        votes: 2_000,
        duplicates: 0.2,
        conflict_share: 0.25,
        malformed: 0.01,
        seed: 7,
        ..WorkloadSpec::default()
    };
    let ledger = publish(&bed, &spec).await?;
    let (stop, replica) = replica(&bed, "honest").await?;
    let report = checker::check(&ledger, &bed.database_url, &bed.amqp_url, &quick()).await?;
    assert!(report.passed(), "{report}\n{:?}", report.violations());
    assert_eq!(report.published, 2_000);
    assert_eq!(report.counted, 2_000);
    assert_eq!(report.lost, 0);
    assert_eq!(report.double_counted, 0);
    assert_eq!(report.malformed, 20);
    assert_eq!(report.dead_lettered, 20);
    assert_eq!(report.conflicts_recorded, report.conflicts_expected);
    assert!(report.conflicts_expected > 50);
    assert!(
        report
            .to_string()
            .starts_with("published 2000 (confirmed) · duplicates sent ")
    );
    stop.cancel();
    replica.join().await?;
    Ok(())
}

/// A consumer that commits through the real batch write but drops one batch on the floor
/// (acks it without writing): the bug "ack before commit" turns into.
#[tokio::test]
async fn a_consumer_that_drops_a_batch_fails_with_the_lost_votes() -> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let spec = WorkloadSpec {
        votes: 500,
        seed: 11,
        ..WorkloadSpec::default()
    };
    let ledger = publish(&bed, &spec).await?;
    let config = bed.config("lossy");
    db::run_migrations(&config.database_url).await?;
    let pool = db::pool(&config.database_url, 1, &Default::default());
    let conn = lapin::Connection::connect(&bed.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(50, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            bed.queue.as_str().into(),
            "lossy".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut dropped = Vec::new();
    for batch_no in 0..10 {
        let mut columns = BatchColumns::default();
        let mut ids = Vec::new();
        let mut last = 0;
        while columns.len() < 50 {
            let d = consumer
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("ended"))??;
            let v = vote::decode(&d.data).map_err(|r| anyhow::anyhow!("{r}"))?;
            ids.push(v.vote_id);
            columns.push(&v, true);
            last = d.delivery_tag;
        }
        if batch_no == 3 {
            dropped = ids;
        } else {
            db::write_batch(&pool, &config.database_url, &columns, 0).await?;
        }
        ch.basic_ack(last, BasicAckOptions { multiple: true })
            .await?;
    }
    let report = checker::check(&ledger, &bed.database_url, &bed.amqp_url, &quick()).await?;
    assert!(!report.passed());
    assert_eq!(report.lost, 50, "{report}");
    assert_eq!(report.counted, 450);
    assert_eq!(report.double_counted, 0);
    assert_eq!(report.tally_drift, 0, "what was written is consistent");
    assert!(report.lost_ids.iter().all(|id| dropped.contains(id)));
    let text = report.violations().join("\n");
    assert!(text.contains("50 confirmed votes lost, e.g. "), "{text}");
    assert!(text.contains(&report.lost_ids[0].to_string()));
    Ok(())
}

/// A consumer that inserts each vote once (primary key) but adds EVERY delivery to the
/// tally, duplicates included: the bug dedupe exists to prevent.
#[tokio::test]
async fn a_consumer_that_skips_dedupe_fails_with_the_double_counted_votes() -> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let spec = WorkloadSpec {
        votes: 300,
        duplicates: 0.2,
        conflict_share: 0.0,
        late_share: 0.0,
        seed: 5,
        ..WorkloadSpec::default()
    };
    let ledger = publish(&bed, &spec).await?;
    assert!(ledger.duplicates_sent > 30);
    db::run_migrations(&secrecy::SecretString::from(bed.database_url.clone())).await?;
    let mut pg = AsyncPgConnection::establish(&bed.database_url).await?;
    let conn = lapin::Connection::connect(&bed.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            bed.queue.as_str().into(),
            "naive".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let total = ledger.votes.len() as u64 + ledger.duplicates_sent;
    for _ in 0..total {
        let d = consumer
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("ended"))??;
        let v = vote::decode(&d.data).map_err(|r| anyhow::anyhow!("{r}"))?;
        diesel::sql_query(
            "INSERT INTO votes (vote_id, election_id, candidate_id, cast_at) \
             VALUES ($1, $2, $3, now()) ON CONFLICT DO NOTHING",
        )
        .bind::<SqlUuid, _>(v.vote_id)
        .bind::<Text, _>(&v.election_id)
        .bind::<Text, _>(&v.candidate_id)
        .execute(&mut pg)
        .await?;
        diesel::sql_query(
            "INSERT INTO tally_shards (election_id, candidate_id, shard, votes) VALUES ($1, $2, 0, 1) \
             ON CONFLICT (election_id, candidate_id, shard) DO UPDATE SET votes = tally_shards.votes + 1",
        )
        .bind::<Text, _>(&v.election_id)
        .bind::<Text, _>(&v.candidate_id)
        .execute(&mut pg)
        .await?;
        d.ack(BasicAckOptions::default()).await?;
    }
    let report = checker::check(&ledger, &bed.database_url, &bed.amqp_url, &quick()).await?;
    assert!(!report.passed());
    assert_eq!(report.lost, 0);
    assert_eq!(report.counted, 300);
    assert_eq!(
        report.double_counted, ledger.duplicates_sent as i64,
        "{report}"
    );
    assert_eq!(report.tally_drift, ledger.duplicates_sent as i64);
    let text = report.violations().join("\n");
    assert!(
        text.contains(&format!("{} votes double-counted", ledger.duplicates_sent)),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn an_empty_run_or_a_queue_that_never_drains_is_a_failure_with_a_reason() -> anyhow::Result<()>
{
    let bed = TestBed::new(infra::shared().await?).await?;
    let empty = Ledger::new(&bed.queue, 0);
    let report = checker::check(&empty, &bed.database_url, &bed.amqp_url, &quick()).await?;
    assert!(!report.passed());
    assert!(report.violations()[0].contains("nothing was published"));

    // Published, but no replica runs: the queue never drains.
    let ledger = publish(
        &bed,
        &WorkloadSpec {
            votes: 20,
            ..WorkloadSpec::default()
        },
    )
    .await?;
    db::run_migrations(&secrecy::SecretString::from(bed.database_url.clone())).await?;
    let report = checker::check(
        &ledger,
        &bed.database_url,
        &bed.amqp_url,
        &CheckOptions {
            drain_timeout: Duration::from_secs(2),
            settle: Duration::from_secs(1),
        },
    )
    .await?;
    assert!(!report.passed());
    let v = report.violations();
    assert!(
        v[0].contains("did not drain") && v[0].contains("20 messages still ready"),
        "{v:?}"
    );
    assert_eq!(report.lost, 20);
    Ok(())
}

/// Starts an in-process replica on `bed` and waits until it is ready (migrated and
/// consuming).
async fn replica(
    bed: &TestBed,
    name: &str,
) -> anyhow::Result<(CancellationToken, vote_aggregator::Running)> {
    let stop = CancellationToken::new();
    let replica = vote_aggregator::spawn(bed.config(name), stop.clone()).await?;
    let addr = replica.metrics_addr();
    vote_testkit::inspect::eventually("replica ready", Duration::from_secs(60), async || {
        Ok(vote_testkit::inspect::http_get(addr, paths::READYZ)
            .await?
            .0
            == 200)
    })
    .await?;
    Ok((stop, replica))
}

/// A vote of election-0 that no workload contains.
fn fresh_vote(candidate: &str) -> Vote {
    Vote {
        vote_id: uuid::Uuid::now_v7(),
        election_id: "election-0".into(),
        candidate_id: candidate.into(),
        precinct_id: None,
        cast_at: chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6),
    }
}

/// The real service counts every published vote, and a consumer double writes one vote
/// that nobody published, through the real batch write (tally and rows agree, nothing is
/// lost or double-counted): the run must FAIL, naming the phantom.
#[tokio::test]
async fn a_consumer_that_invents_a_vote_fails_naming_the_phantom() -> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let spec = WorkloadSpec {
        votes: 200,
        seed: 13,
        ..WorkloadSpec::default()
    };
    let ledger = publish(&bed, &spec).await?;
    let config = bed.config("inventive");
    db::run_migrations(&config.database_url).await?;
    let phantom = fresh_vote("candidate-0");
    let mut columns = BatchColumns::default();
    columns.push(&phantom, true);
    let pool = db::pool(&config.database_url, 1, &Default::default());
    let written = db::write_batch(&pool, &config.database_url, &columns, 0).await?;
    assert_eq!(written.counted.len(), 1, "the phantom is counted");
    let (stop, running) = replica(&bed, "honest").await?;
    let report = checker::check(&ledger, &bed.database_url, &bed.amqp_url, &quick()).await?;
    stop.cancel();
    running.join().await?;
    assert!(!report.passed(), "a phantom vote passed: {report}");
    assert_eq!(report.unexpected, 1, "{report}");
    assert_eq!(report.unexpected_ids, vec![phantom.vote_id]);
    assert_eq!(report.counted, 200);
    assert_eq!(report.lost, 0);
    assert_eq!(report.double_counted, 0);
    assert_eq!(report.tally_drift, 0, "the phantom is consistently counted");
    let text = report.violations().join("\n");
    assert!(
        text.contains("1 counted vote(s) never published (phantoms), e.g. ")
            && text.contains(&phantom.vote_id.to_string()),
        "{text}"
    );
    assert!(report.to_string().contains("unexpected 1"), "{report}");
    Ok(())
}

/// Two votes are attempted but never confirmed: one reaches the queue (published without
/// waiting for its confirm), the other never does. Both are acceptable outcomes and the
/// report says which is which. A CONFIRMED vote that is missing, though, is lost.
#[tokio::test]
async fn unconfirmed_votes_are_indeterminate_and_a_missing_confirmed_vote_is_lost()
-> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let spec = WorkloadSpec {
        votes: 100,
        seed: 17,
        ..WorkloadSpec::default()
    };
    let mut ledger = publish(&bed, &spec).await?;
    let arrives = Message::Original(fresh_vote("candidate-1"));
    let never_sent = Message::Original(fresh_vote("candidate-2"));
    ledger.attempt(&arrives);
    ledger.attempt(&never_sent);
    let publisher = bed.publisher().await?;
    let (body, props) = vote_testkit::publish::message_parts(&arrives);
    // Sent, its confirm never awaited: the ledger only knows it was attempted.
    let _unawaited = publisher.send(&body, props).await?;
    let (stop, running) = replica(&bed, "honest").await?;
    let report = checker::check(&ledger, &bed.database_url, &bed.amqp_url, &quick()).await?;
    assert!(report.passed(), "{report}\n{:?}", report.violations());
    assert_eq!(report.published, 100);
    assert_eq!(report.counted, 100);
    assert_eq!(report.attempted, 102, "{report}");
    assert_eq!(report.indeterminate, 2, "{report}");
    assert_eq!(report.indeterminate_counted, 1, "{report}");
    assert_eq!(report.indeterminate_absent, 1, "{report}");
    assert_eq!(report.unexpected, 0, "an attempted vote is no phantom");
    assert!(
        report
            .to_string()
            .contains("indeterminate 2 (counted 1, absent 1)"),
        "{report}"
    );
    publisher.close().await;
    stop.cancel();
    running.join().await?;

    // The same absence is a loss once the broker had CONFIRMED that vote (as if it
    // confirmed the publish and then lost the message).
    ledger.record(&never_sent);
    let report = checker::check(&ledger, &bed.database_url, &bed.amqp_url, &quick()).await?;
    assert!(!report.passed(), "{report}");
    assert_eq!(report.lost, 1, "{report}");
    let Message::Original(gone) = &never_sent else {
        unreachable!("an original")
    };
    assert_eq!(report.lost_ids, vec![gone.vote_id]);
    assert_eq!(report.counted, 100);
    assert_eq!(report.tally_drift, 0);
    assert_eq!(report.indeterminate, 1, "{report}");
    assert_eq!(report.indeterminate_counted, 1, "{report}");
    let text = report.violations().join("\n");
    assert!(text.contains("1 confirmed votes lost, e.g. "), "{text}");
    Ok(())
}
