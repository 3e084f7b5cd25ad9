//! The dead-letter retention policy the repository ships
//! (`deploy/rabbitmq/30-dead-letter-retention.conf`): it targets exactly the aggregator's
//! own dead-letter queue, RabbitMQ enforces its length limit by dropping the OLDEST dead
//! letters and its TTL by deleting them, and neither the votes queue nor the queue of
//! what the broker diverts (possibly valid votes) is touched.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use lapin::BasicProperties;
use vote_aggregator::broker::UNEXPLAINED_QUEUE_SUFFIX;
use vote_aggregator::config::DEFAULT_QUEUE_NAME;
use vote_testkit::infra::{self, InfraOptions};
use vote_testkit::inspect::eventually;
use vote_testkit::testbed::TestBed;
use vote_testkit::votes;

use super::{WAIT, start_ready};

const MALFORMED: &str = vote_aggregator::vote::RejectKind::MalformedJson.as_str();

const POLICY: &str = vote_aggregator::broker::DEAD_LETTER_RETENTION_POLICY;

fn shipped_setting(conf: &str, key: &str) -> anyhow::Result<String> {
    let prefix = format!("default_policies.operator.{POLICY}.{key} = ");
    conf.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(str::to_string)
        .with_context(|| format!("{key} missing from the shipped retention policy"))
}

/// `^<queue escaped>\.dlq$`, the shape of the shipped pattern for any queue name.
fn dead_letter_queue_pattern(queue: &str) -> String {
    format!(
        "^{}\\.dlq$",
        vote_aggregator::amqp_permissions::escape(queue)
    )
}

fn rabbitmqctl(container: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("docker")
        .args(["exec", container, "rabbitmqctl"])
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn set_policy(container: &str, pattern: &str, definition: &str) -> anyhow::Result<()> {
    rabbitmqctl(
        container,
        &[
            "set_operator_policy",
            "--apply-to",
            "queues",
            POLICY,
            pattern,
            definition,
        ],
    )
    .map(drop)
}

#[tokio::test]
async fn dead_letters_are_capped_and_expire_while_votes_and_diverted_messages_stay()
-> anyhow::Result<()> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/rabbitmq/30-dead-letter-retention.conf");
    let conf = std::fs::read_to_string(&file)?;
    assert_eq!(
        shipped_setting(&conf, "queue_pattern")?,
        dead_letter_queue_pattern(DEFAULT_QUEUE_NAME),
        "the shipped policy must match the default dead-letter queue exactly"
    );
    shipped_setting(&conf, "message_ttl")?;
    shipped_setting(&conf, "max_length")?.parse::<u64>()?;

    let servers = infra::start_private(InfraOptions::default()).await?;
    let container = servers.rabbitmq_container_id();
    let bed = TestBed::new(&servers).await?;
    bed.declare().await?;
    let dlq = bed.dead_letter_queue();
    let unexplained = format!("{}{UNEXPLAINED_QUEUE_SUFFIX}", bed.queue);
    // The shipped policy for this test's queue, first with a length limit of 3 only.
    let pattern = dead_letter_queue_pattern(&bed.queue);
    set_policy(container, &pattern, r#"{"max-length":3}"#)?;

    let mut config = bed.config("r1");
    config.batch_size = 5;
    let (replica, stop) = start_ready(config).await?;
    let publisher = bed.publisher().await?;
    let good = votes::spread(10, &["e"], &["a", "b"]);
    publisher.publish_votes(&good).await?;
    let persistent = BasicProperties::default().with_delivery_mode(2);
    for i in 0..5 {
        publisher
            .publish_raw(format!("{{garbage {i}").as_bytes(), persistent.clone())
            .await?;
    }
    let broker = bed.broker().await?;
    let metrics = replica.metrics().clone();
    eventually("5 malformed messages rejected", WAIT, async || {
        Ok(metrics.votes_rejected.with_label_values(&[MALFORMED]).get() == 5)
    })
    .await?;
    let kept = broker.drain(&dlq, Duration::from_secs(1)).await?;
    let bodies: Vec<String> = kept
        .iter()
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect();
    assert_eq!(
        bodies,
        ["{garbage 2", "{garbage 3", "{garbage 4"],
        "the newest 3 dead letters are kept, the oldest dropped"
    );

    // Now a TTL short enough to watch: a dead letter disappears on its own.
    set_policy(
        container,
        &pattern,
        r#"{"max-length":3,"message-ttl":1000}"#,
    )?;
    publisher
        .publish_raw(b"{garbage late", persistent.clone())
        .await?;
    eventually("the late dead letter arrived", WAIT, async || {
        Ok(metrics.votes_rejected.with_label_values(&[MALFORMED]).get() == 6)
    })
    .await?;
    eventually("the late dead letter expired", WAIT, async || {
        Ok(broker.queue_state(&dlq).await?.0 == 0)
    })
    .await?;

    let listed = rabbitmqctl(
        container,
        &[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "operator_policy",
        ],
    )?;
    let policy_of = |queue: &str| {
        listed
            .lines()
            .find_map(|l| l.split_once('\t').filter(|(name, _)| *name == queue))
            .map(|(_, policy)| policy.trim().to_string())
    };
    assert_eq!(policy_of(&dlq).as_deref(), Some(POLICY), "{listed}");
    for untouched in [bed.queue.as_str(), unexplained.as_str()] {
        assert_eq!(
            policy_of(untouched).as_deref(),
            Some(""),
            "{untouched}: {listed}"
        );
    }
    let mut db = bed.db().await?;
    assert_eq!(db.vote_count().await?, 10, "every valid vote counted");
    publisher.close().await;
    stop.cancel();
    replica.join().await?;
    Ok(())
}
