//! The RabbitMQ permission patterns of `vote_aggregator::amqp_permissions`, set with
//! `rabbitmqctl` in the shared container on users made for one test.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use vote_aggregator::amqp_permissions::{self, Permissions};
use vote_aggregator::broker::{self, DEAD_LETTER_EXCHANGE};
use vote_testkit::infra::{self, SharedServer, exec_in_shared};
use vote_testkit::inspect::eventually;
use vote_testkit::publish::Publisher;
use vote_testkit::testbed::TestBed;
use vote_testkit::votes;

use crate::unique;

const WAIT: Duration = Duration::from_secs(60);

/// Waits until one replica consumes the bed's queue; returns the admin connection.
async fn consuming(bed: &TestBed) -> anyhow::Result<vote_testkit::inspect::Broker> {
    let admin = bed.broker().await?;
    eventually("the replica consumes", WAIT, async || {
        Ok(admin
            .queue_state(&bed.queue)
            .await
            .is_ok_and(|(_, consumers)| consumers == 1))
    })
    .await?;
    Ok(admin)
}

/// A RabbitMQ user made for one test, with its permissions on the default vhost.
struct AmqpUser {
    name: String,
    /// The bed's AMQP URL with this user's credentials.
    url: String,
}

impl AmqpUser {
    async fn create(bed: &TestBed, prefix: &str, p: &Permissions) -> anyhow::Result<AmqpUser> {
        let name = unique(prefix);
        let password = unique("pw");
        rabbitmqctl(&["add_user", &name, &password]).await?;
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            &name,
            &p.configure,
            &p.write,
            &p.read,
        ])
        .await?;
        let mut url = url::Url::parse(&bed.amqp_url)?;
        url.set_username(&name)
            .map_err(|()| anyhow::anyhow!("cannot set the URL's user"))?;
        url.set_password(Some(&password))
            .map_err(|()| anyhow::anyhow!("cannot set the URL's password"))?;
        Ok(AmqpUser {
            name,
            url: url.to_string(),
        })
    }

    async fn connect(&self) -> anyhow::Result<Connection> {
        Ok(Connection::connect(&self.url, ConnectionProperties::default()).await?)
    }

    async fn delete(self) -> anyhow::Result<()> {
        rabbitmqctl(&["delete_user", &self.name]).await.map(drop)
    }
}

async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = vec!["rabbitmqctl", "-q"];
    cmd.extend_from_slice(args);
    exec_in_shared(SharedServer::Rabbitmq, &cmd, None).await
}

/// Whether `result` is the broker's ACCESS_REFUSED (403), which closes the channel.
fn refused<T>(what: &str, result: Result<T, lapin::Error>) -> anyhow::Result<String> {
    match result {
        Ok(_) => anyhow::bail!("{what} was allowed"),
        Err(e) => {
            let text = e.to_string();
            anyhow::ensure!(
                text.contains("ACCESS_REFUSED"),
                "{what} failed, but not for lack of permission: {text}"
            );
            Ok(text)
        }
    }
}

async fn publish_confirmed(ch: &Channel, exchange: &str, key: &str) -> Result<(), lapin::Error> {
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        b"{}",
        BasicProperties::default(),
    )
    .await?
    .await?;
    // A refused publish closes the channel after the fact: ask once more to see it.
    ch.basic_qos(1, Default::default()).await
}

fn declare_opts() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

#[tokio::test]
async fn the_aggregator_user_counts_and_a_publisher_user_can_only_publish() -> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let aggregator =
        AmqpUser::create(&bed, "agg", &amqp_permissions::aggregator(&bed.queue)).await?;
    let publisher = AmqpUser::create(&bed, "pub", &amqp_permissions::publisher()).await?;

    // A replica with the aggregator's user declares the topology and consumes.
    let mut config = bed.config("amqp-least-privilege");
    config.amqp_url = SecretString::from(aggregator.url.clone());
    let shutdown = CancellationToken::new();
    let replica = vote_aggregator::spawn(config, shutdown.clone()).await?;
    let admin = consuming(&bed).await?;

    // The publisher's user publishes votes and a malformed message, with confirms.
    let sent = votes::spread(200, &["e"], &["a", "b"]);
    let out = Publisher::connect(&publisher.url, &bed.queue).await?;
    out.publish_votes(&sent).await?;
    out.publish_raw(
        b"not json",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await?;
    let mut db = bed.db().await?;
    eventually("200 votes counted", WAIT, async || {
        Ok(db.vote_count().await? == 200)
    })
    .await?;
    eventually("the malformed message dead-lettered", WAIT, async || {
        Ok(admin.queue_state(&bed.dead_letter_queue()).await?.0 == 1)
    })
    .await?;
    let metrics = replica.metrics();
    assert_eq!(
        metrics.broker_connection_failures.get(),
        0,
        "no session or channel was lost to a refusal"
    );
    // Its results relay declares and publishes to votes.results with the same user.
    eventually("the results outbox published", WAIT, async || {
        Ok(db
            .scalar("SELECT count(*) AS n FROM results_outbox")
            .await?
            == 0
            && metrics.results_events_published.get() > 0)
    })
    .await?;
    assert_eq!(metrics.results_publish_failures.get(), 0);

    // The aggregator's user: the depth monitor's passive declares work; what it does not
    // need is refused.
    let conn = aggregator.connect().await?;
    let unexplained = broker::unexplained_queue(&bed.queue);
    broker::queue_counts(&conn.create_channel().await?, &unexplained).await?;
    let ch = conn.create_channel().await?;
    refused(
        "the aggregator reading its dead-letter queue",
        ch.basic_get(
            bed.dead_letter_queue().as_str().into(),
            BasicGetOptions::default(),
        )
        .await,
    )?;
    let ch = conn.create_channel().await?;
    refused(
        "the aggregator declaring another queue",
        ch.queue_declare("not.ours".into(), declare_opts(), FieldTable::default())
            .await,
    )?;

    // The publisher's user: publishing is all it may do.
    let conn = publisher.connect().await?;
    let queue = bed.queue.as_str();
    // The contract lets a publisher check the queue exists (a passive declare).
    let passive = broker::queue_counts(&conn.create_channel().await?, queue).await;
    assert!(
        passive.is_ok(),
        "the publisher's passive declare of the votes queue must be allowed: {passive:?}"
    );
    let mut refusals = Vec::new();
    let ch = conn.create_channel().await?;
    refusals.push(refused(
        "consume",
        ch.basic_consume(
            queue.into(),
            "thief".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await,
    )?);
    let ch = conn.create_channel().await?;
    refusals.push(refused(
        "basic.get",
        ch.basic_get(queue.into(), BasicGetOptions::default()).await,
    )?);
    let ch = conn.create_channel().await?;
    refusals.push(refused(
        "purge",
        ch.queue_purge(queue.into(), QueuePurgeOptions::default())
            .await,
    )?);
    let ch = conn.create_channel().await?;
    refusals.push(refused(
        "delete the votes queue",
        ch.queue_delete(queue.into(), QueueDeleteOptions::default())
            .await,
    )?);
    let ch = conn.create_channel().await?;
    refusals.push(refused(
        "declare a queue",
        ch.queue_declare("pub.own".into(), declare_opts(), FieldTable::default())
            .await,
    )?);
    let ch = conn.create_channel().await?;
    refusals.push(refused(
        "declare an exchange",
        ch.exchange_declare(
            "pub.exchange".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
    )?);
    let ch = conn.create_channel().await?;
    refusals.push(refused(
        "bind the votes queue",
        ch.queue_bind(
            queue.into(),
            DEAD_LETTER_EXCHANGE.into(),
            "x".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await,
    )?);
    let ch = conn.create_channel().await?;
    refusals.push(refused(
        "publish to the dead-letter exchange",
        publish_confirmed(&ch, DEAD_LETTER_EXCHANGE, queue).await,
    )?);
    for r in &refusals {
        eprintln!("refused: {r}");
    }
    // Nothing the refusals tried changed the queue: the votes are all counted, the
    // dead letter is still there.
    assert_eq!(admin.queue_state(&bed.dead_letter_queue()).await?.0, 1);

    shutdown.cancel();
    replica.join().await?;
    aggregator.delete().await?;
    publisher.delete().await?;
    bed.finish().await
}

#[tokio::test]
async fn a_replica_whose_user_lacks_a_permission_stops_with_one_line() -> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    // A publisher's permissions: it may not declare the topology.
    let user = AmqpUser::create(&bed, "tight", &amqp_permissions::publisher()).await?;
    let mut config = bed.config("amqp-too-tight");
    config.amqp_url = SecretString::from(user.url.clone());
    let stopped =
        tokio::time::timeout(WAIT, vote_aggregator::run(config, CancellationToken::new())).await?;
    let line = match stopped {
        Ok(()) => anyhow::bail!("the replica ran without the permissions it needs"),
        Err(e) => e.to_string(),
    };
    eprintln!("{line}");
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.contains(&format!(
            "refused user '{}' configure access to exchange 'votes.dlx' in vhost '/': grant",
            user.name
        )),
        "{line}"
    );
    assert!(
        line.contains("RabbitMQ permissions") && line.contains("***"),
        "{line}"
    );
    user.delete().await?;
    bed.finish().await
}

#[tokio::test]
async fn counting_goes_on_while_the_broker_refuses_results() -> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    // The aggregator's permissions without `votes.results`: votes are fine, results not.
    let full = amqp_permissions::aggregator(&bed.queue);
    let without = |pattern: &str| pattern.replace(r"|votes\.results)$", ")$");
    let p = Permissions {
        configure: without(&full.configure),
        write: without(&full.write),
        read: full.read.clone(),
    };
    assert!(
        !p.configure.contains("results") && !p.write.contains("results"),
        "{p:?}"
    );
    let user = AmqpUser::create(&bed, "noresults", &p).await?;
    let mut config = bed.config("results-refused");
    config.amqp_url = SecretString::from(user.url.clone());
    config.batch_size = 20;
    let shutdown = CancellationToken::new();
    let replica = vote_aggregator::spawn(config, shutdown.clone()).await?;
    consuming(&bed).await?;
    let sent = votes::spread(300, &["e"], &["a", "b"]);
    Publisher::connect(&bed.amqp_url, &bed.queue)
        .await?
        .publish_votes(&sent)
        .await?;
    let mut db = bed.db().await?;
    eventually("300 votes counted", WAIT, async || {
        Ok(db.vote_count().await? == 300)
    })
    .await?;
    let metrics = replica.metrics().clone();
    eventually(
        "the refusals counted and the outbox shown",
        WAIT,
        async || {
            Ok(metrics.results_publish_failures.get() > 0
                && metrics.results_outbox_pending.get() > 0)
        },
    )
    .await?;
    let pending = db
        .scalar("SELECT count(*) AS n FROM results_outbox")
        .await?;
    assert!(pending > 0, "the events wait in the outbox");
    assert_eq!(metrics.results_events_published.get(), 0);
    assert_eq!(
        metrics.broker_connection_failures.get(),
        0,
        "the votes session was never touched"
    );
    shutdown.cancel();
    replica.join().await?;
    user.delete().await?;
    bed.finish().await
}
