//! RabbitMQ: connecting, declaring the topology of the contract, dead-lettering a
//! malformed delivery with its reason, and reading the queue depth.
//!
//! Recovery is deliberately NOT lapin's built-in auto-recovery: delivery tags belong to
//! one channel, so after a reconnect the unacked deliveries of the old channel can never
//! be acked. The consume loop ([`crate::consumer`]) instead drops the whole session
//! (connection, channels, the uncommitted batch) and builds a new one; the broker
//! redelivers everything that was not acked, and the UUID key makes that safe.
//!
//! Topology (declared by every replica at start with the same arguments every time):
//! - exchange `votes.dlx` (direct, durable);
//! - queue `<queue>` (durable, `x-queue-type` as configured, dead-letter exchange
//!   `votes.dlx`; quorum queues also get `x-dead-letter-strategy=at-least-once` with
//!   `x-overflow=reject-publish`, so dead-lettering itself cannot lose a message);
//! - queue `<queue>.dlq` (durable, same type) bound to `votes.dlx` with routing key
//!   `<queue>`.

use std::str::FromStr;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use secrecy::ExposeSecret;

use crate::config::{Config, QueueType, redact_url};
use crate::error::BrokerError;

/// The dead-letter exchange of the contract.
pub const DEAD_LETTER_EXCHANGE: &str = "votes.dlx";
/// Header carrying why a message was dead-lettered.
pub const REJECT_REASON_HEADER: &str = "x-reject-reason";
/// Header a publisher may set: publish time in milliseconds since the Unix epoch (more
/// precise than the AMQP `timestamp` property, which has whole seconds). Used for the
/// publish-to-commit latency metric.
pub const PUBLISHED_AT_HEADER: &str = "x-published-at-ms";

/// One live broker session: a connection with a channel for consuming and one (in
/// confirm mode) for dead-letter publishes.
pub struct Session {
    /// The connection (closed on drop by lapin).
    pub connection: Connection,
    /// Channel the consumer and its acks live on.
    pub consume: Channel,
    /// Confirm-mode channel for dead-letter publishes.
    pub publish: Channel,
}

/// The arguments the votes queue is declared with.
pub fn queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
    );
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    args
}

fn amqp_err(config: &Config, source: lapin::Error) -> BrokerError {
    let url = redact_url(config.amqp_url.expose_secret());
    if let lapin::ErrorKind::ProtocolError(e) = source.kind()
        && e.get_id() == 403
    {
        return BrokerError::AuthRefused { url };
    }
    BrokerError::Amqp { url, source }
}

/// Connects, opens both channels and declares the topology.
///
/// # Errors
/// [`BrokerError::QueueMismatch`] when the queue exists with other arguments (fatal),
/// [`BrokerError::AuthRefused`] on bad credentials (fatal), [`BrokerError::Amqp`] for
/// everything the caller should retry.
pub async fn connect(config: &Config) -> Result<Session, BrokerError> {
    let mut uri =
        AMQPUri::from_str(config.amqp_url.expose_secret()).map_err(|e| BrokerError::Amqp {
            url: redact_url(config.amqp_url.expose_secret()),
            source: lapin::Error::from(std::io::Error::other(e)),
        })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = config.amqp_heartbeat;
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(10_000);
    }
    let props = ConnectionProperties::default()
        .with_connection_name(format!("vote-aggregator/{}", config.replica_id).into());
    let connection = Connection::connect_uri(uri, props)
        .await
        .map_err(|e| amqp_err(config, e))?;
    let consume = connection
        .create_channel()
        .await
        .map_err(|e| amqp_err(config, e))?;
    declare_topology(&consume, config).await?;
    let publish = connection
        .create_channel()
        .await
        .map_err(|e| amqp_err(config, e))?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| amqp_err(config, e))?;
    Ok(Session {
        connection,
        consume,
        publish,
    })
}

async fn declare_topology(channel: &Channel, config: &Config) -> Result<(), BrokerError> {
    let durable = QueueDeclareOptions::durable();
    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_err(config, e))?;
    // The votes queue first, so a type mismatch names the queue operators know.
    channel
        .queue_declare(
            config.queue_name.as_str().into(),
            durable,
            queue_arguments(config.queue_type),
        )
        .await
        .map_err(|e| mismatch_or(config, &config.queue_name, e))?;
    let dlq = config.dead_letter_queue();
    let mut dlq_args = FieldTable::default();
    dlq_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(config.queue_type.as_str().into()),
    );
    channel
        .queue_declare(dlq.as_str().into(), durable, dlq_args)
        .await
        .map_err(|e| mismatch_or(config, &dlq, e))?;
    channel
        .queue_bind(
            dlq.as_str().into(),
            DEAD_LETTER_EXCHANGE.into(),
            config.queue_name.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_err(config, e))?;
    Ok(())
}

/// A PRECONDITION_FAILED on declare means "exists with other arguments".
fn mismatch_or(config: &Config, queue: &str, e: lapin::Error) -> BrokerError {
    if let lapin::ErrorKind::ProtocolError(p) = e.kind()
        && p.get_id() == 406
    {
        return BrokerError::QueueMismatch {
            queue: queue.to_string(),
            detail: p.get_message().to_string(),
        };
    }
    amqp_err(config, e)
}

/// Messages ready in the queue (passive declare: never creates or changes it).
///
/// # Errors
/// [`BrokerError`] when the channel fails.
pub async fn queue_depth(channel: &Channel, config: &Config) -> Result<u32, BrokerError> {
    let q = channel
        .queue_declare(
            config.queue_name.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_err(config, e))?;
    Ok(q.message_count())
}

/// Publishes a malformed delivery to the dead-letter queue with its body intact, its
/// original properties, and the reason in [`REJECT_REASON_HEADER`]; waits for the
/// broker's confirm. The caller acks the original only after this returns `Ok`.
///
/// # Errors
/// [`BrokerError`] when the publish fails or is not confirmed; the caller then rejects
/// the original without requeue, so the broker dead-letters it (without our reason)
/// rather than redelivering it forever.
pub async fn dead_letter(
    session: &Session,
    config: &Config,
    body: &[u8],
    original: &BasicProperties,
    reason: &str,
) -> Result<(), BrokerError> {
    let mut headers = original.headers().clone().unwrap_or_default();
    headers.insert(
        REJECT_REASON_HEADER.into(),
        AMQPValue::LongString(LongString::from(reason.as_bytes().to_vec())),
    );
    headers.insert(
        "x-original-queue".into(),
        AMQPValue::LongString(config.queue_name.as_str().into()),
    );
    headers.insert(
        "x-rejected-by".into(),
        AMQPValue::LongString(config.replica_id.as_str().into()),
    );
    let props = original.clone().with_headers(headers).with_delivery_mode(2);
    let confirm = session
        .publish
        .basic_publish(
            ShortString::from(DEAD_LETTER_EXCHANGE),
            ShortString::from(config.queue_name.as_str()),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            props,
        )
        .await
        .map_err(|e| amqp_err(config, e))?
        .await
        .map_err(|e| amqp_err(config, e))?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) | Confirmation::Nack(_) | Confirmation::NotRequested => {
            Err(BrokerError::Amqp {
                url: redact_url(config.amqp_url.expose_secret()),
                source: lapin::Error::from(std::io::Error::other(
                    "dead-letter publish was not confirmed (unroutable or nacked)",
                )),
            })
        }
    }
}

/// The publish time a publisher stamped on a delivery, in milliseconds since the Unix
/// epoch: the [`PUBLISHED_AT_HEADER`] header when present, else the AMQP `timestamp`
/// property (whole seconds).
pub fn published_at_ms(props: &BasicProperties) -> Option<i64> {
    if let Some(headers) = props.headers()
        && let Some(v) = headers.inner().get(PUBLISHED_AT_HEADER)
    {
        let ms = match v {
            AMQPValue::LongLongInt(n) => Some(*n),
            AMQPValue::LongInt(n) => Some(i64::from(*n)),
            AMQPValue::LongUInt(n) => Some(i64::from(*n)),
            AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
                .ok()
                .and_then(|s| s.parse().ok()),
            _ => None,
        };
        if ms.is_some() {
            return ms;
        }
    }
    props
        .timestamp()
        .and_then(|s| i64::try_from(s).ok())
        .map(|s| s * 1000)
}
