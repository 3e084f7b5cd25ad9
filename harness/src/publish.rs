//! Publishing votes the way the contract says publishers must: default exchange, routing
//! key = queue name, persistent delivery, `message_id` = vote UUID, publisher confirms.
//!
//! A publish counts only once the broker confirmed it. `mandatory` is set, so a message
//! that no queue would take (the queue does not exist yet) comes back as an error
//! instead of vanishing.

use anyhow::{Context, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use vote_aggregator::broker::PUBLISHED_AT_HEADER;
use vote_aggregator::vote::Vote;

/// Most publishes awaiting their confirm at once.
const CONFIRM_WINDOW: usize = 500;

/// A confirmed publisher to one queue.
pub struct Publisher {
    connection: Connection,
    channel: Channel,
    queue: String,
}

/// Properties of a vote message: persistent, JSON, `message_id` = vote id, and the
/// publish time in [`PUBLISHED_AT_HEADER`] (for the latency metric).
pub fn vote_properties(vote: &Vote) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        PUBLISHED_AT_HEADER.into(),
        AMQPValue::LongLongInt(chrono::Utc::now().timestamp_millis()),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(vote.vote_id.to_string().into())
        .with_headers(headers)
}

impl Publisher {
    /// Connects and puts a channel in confirm mode.
    ///
    /// # Errors
    /// When the broker is unreachable or refuses the credentials.
    pub async fn connect(amqp_url: &str, queue: &str) -> anyhow::Result<Self> {
        let connection = Connection::connect(
            amqp_url,
            ConnectionProperties::default().with_connection_name("vote-harness/publisher".into()),
        )
        .await
        .with_context(|| {
            format!(
                "cannot connect to RabbitMQ at {}",
                vote_aggregator::config::redact_url(amqp_url)
            )
        })?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher {
            connection,
            channel,
            queue: queue.to_string(),
        })
    }

    /// Publishes one raw body and waits for its confirm.
    ///
    /// # Errors
    /// When the publish is nacked, returned (no such queue) or the channel fails.
    pub async fn publish_raw(&self, body: &[u8], props: BasicProperties) -> anyhow::Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await?
            .await?;
        check(confirm, &self.queue)
    }

    /// Publishes votes in order, keeping up to a window of confirms in flight, and
    /// returns once every one is confirmed.
    ///
    /// # Errors
    /// On the first publish that is not confirmed.
    pub async fn publish_votes(&self, votes: &[Vote]) -> anyhow::Result<()> {
        for chunk in votes.chunks(CONFIRM_WINDOW) {
            let mut pending = Vec::with_capacity(chunk.len());
            for vote in chunk {
                pending.push(
                    self.channel
                        .basic_publish(
                            "".into(),
                            self.queue.as_str().into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            &vote.to_json(),
                            vote_properties(vote),
                        )
                        .await?,
                );
            }
            for confirm in pending {
                check(confirm.await?, &self.queue)?;
            }
        }
        Ok(())
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

fn check(confirm: Confirmation, queue: &str) -> anyhow::Result<()> {
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => {
            bail!(
                "publish to '{queue}' was returned: no such queue (start the aggregator first, it declares the queue)"
            )
        }
        Confirmation::Nack(_) => bail!("publish to '{queue}' was nacked by the broker"),
        Confirmation::NotRequested => bail!("publisher confirms are not enabled"),
    }
}
