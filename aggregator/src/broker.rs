//! RabbitMQ: connecting, declaring the topology of the contract, dead-lettering a
//! malformed delivery with its reason, and reading the queue depth.
//!
//! Recovery is deliberately NOT lapin's built-in auto-recovery: delivery tags belong to
//! one channel, so after a reconnect the unacked deliveries of the old channel can never
//! be acked. The consume loop (`consumer`) instead drops the whole session
//! (connection, channels, the uncommitted batch) and builds a new one; the broker
//! redelivers everything that was not acked, and the UUID key makes that safe.
//!
//! Topology (declared by every replica at start with the same arguments every time):
//! - exchange `votes.dlx` (direct, durable);
//! - queue `<queue>` (durable, `x-queue-type` as configured, dead-letter exchange
//!   `votes.dlx` with routing key `<queue>.dlq.unexplained`; quorum queues also get
//!   `x-delivery-limit=-1`, `x-dead-letter-strategy=at-least-once` and
//!   `x-overflow=reject-publish`);
//! - queue `<queue>.dlq` (durable, same type) bound to `votes.dlx` with routing key
//!   `<queue>`: the aggregator's own dead letters, each with its `x-reject-reason`;
//! - queue `<queue>.dlq.unexplained` (durable, same type) bound to `votes.dlx` with its own
//!   name as routing key: whatever the BROKER dead-letters from the votes queue (a
//!   per-message TTL, a delivery limit imposed by a policy, a reject). Those messages carry
//!   no reason, may be valid votes, and are never expected: each replica exports the
//!   queue's depth and operators alert on it (a vote moved back to `<queue>` is counted
//!   once: the UUID key makes that safe).
//!
//! Why `x-delivery-limit=-1`: RabbitMQ 4.0 gives quorum queues a default delivery limit
//! of 20, and a return on channel close (a crashed, killed or disconnected replica, a
//! graceful stop with prefetched deliveries) counts towards it; a valid vote returned 21
//! times would be dead-lettered uncounted. -1 disables the limit (the broker honours it:
//! a message returned 25 times stays in the queue). A POLICY with a positive
//! `delivery-limit` still overrides the argument (seen on 4.0.5), which AMQP cannot
//! detect; the consumer therefore warns about deliveries with a high `x-delivery-count`,
//! and the unexplained queue catches what the broker diverts anyway.

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

use crate::config::{Config, QueueType};
use crate::error::BrokerError;

mod nodes;
mod tls;

pub use self::nodes::{Node, Rotation};

/// The dead-letter exchange of the contract.
pub const DEAD_LETTER_EXCHANGE: &str = "votes.dlx";
/// Header carrying why a message was dead-lettered.
pub const REJECT_REASON_HEADER: &str = "x-reject-reason";
/// Header quorum queues set on a redelivery: how often the message was delivered before.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// Header naming the queue a dead-lettered message came from.
pub const ORIGINAL_QUEUE_HEADER: &str = "x-original-queue";
/// Header naming the replica (`REPLICA_ID`) that dead-lettered a message.
pub const REJECTED_BY_HEADER: &str = "x-rejected-by";
/// Suffix of the aggregator's own dead-letter queue: `<queue>.dlq`.
pub const DEAD_LETTER_QUEUE_SUFFIX: &str = ".dlq";

/// The aggregator's dead-letter queue for the votes queue `queue`: `<queue>.dlq`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}{DEAD_LETTER_QUEUE_SUFFIX}")
}
/// Name of the RabbitMQ operator policy that bounds `<queue>.dlq` (age and length),
/// shipped in `deploy/rabbitmq/30-dead-letter-retention.conf`; the replicas never set
/// it, the deployment and its tests check it.
pub const DEAD_LETTER_RETENTION_POLICY: &str = "dead-letter-retention";

/// Suffix of the queue of what the broker dead-letters: `<queue>.dlq.unexplained`.
pub const UNEXPLAINED_QUEUE_SUFFIX: &str = ".dlq.unexplained";

/// Queue arguments the replicas declare (names fixed by RabbitMQ).
pub mod args {
    /// `quorum` or `classic`.
    pub const QUEUE_TYPE: &str = "x-queue-type";
    /// Where the broker dead-letters messages of the votes queue.
    pub const DEAD_LETTER_EXCHANGE: &str = "x-dead-letter-exchange";
    /// The routing key those dead letters carry.
    pub const DEAD_LETTER_ROUTING_KEY: &str = "x-dead-letter-routing-key";
    /// Deliveries before a quorum queue dead-letters a message (-1: no limit).
    pub const DELIVERY_LIMIT: &str = "x-delivery-limit";
    /// `at-least-once` dead-lettering of quorum queues.
    pub const DEAD_LETTER_STRATEGY: &str = "x-dead-letter-strategy";
    /// What a full queue does (`reject-publish`, required by `at-least-once`).
    pub const OVERFLOW: &str = "x-overflow";
}

/// Prefix of this service's AMQP connection names and consumer tags (followed by
/// `/<REPLICA_ID>`).
pub const CLIENT_NAME: &str = crate::SERVICE_NAME;

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
    /// The node this session is connected to.
    pub node: Node,
}

/// Name of the queue that receives what the broker dead-letters from `queue_name`
/// (no `x-reject-reason`; also the routing key it is bound with).
pub fn unexplained_queue(queue_name: &str) -> String {
    format!("{queue_name}{UNEXPLAINED_QUEUE_SUFFIX}")
}

/// The arguments the votes queue `queue_name` is declared with.
pub fn queue_arguments(queue_name: &str, queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        args::QUEUE_TYPE.into(),
        AMQPValue::LongString(queue_type.as_str().into()),
    );
    args.insert(
        args::DEAD_LETTER_EXCHANGE.into(),
        AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
    );
    args.insert(
        args::DEAD_LETTER_ROUTING_KEY.into(),
        AMQPValue::LongString(unexplained_queue(queue_name).into()),
    );
    if queue_type == QueueType::Quorum {
        args.insert(args::DELIVERY_LIMIT.into(), AMQPValue::LongInt(-1));
        args.insert(
            args::DEAD_LETTER_STRATEGY.into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            args::OVERFLOW.into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    args
}

/// `source` as a [`BrokerError`] of the node shown (redacted) as `url`.
fn amqp_err(url: &str, source: lapin::Error) -> BrokerError {
    let url = url.to_string();
    if let lapin::ErrorKind::ProtocolError(e) = source.kind()
        && e.get_id() == 403
    {
        // ACCESS_REFUSED after login: "<configure|write|read> access to <queue|exchange>
        // '<name>' in vhost '<vhost>' refused for user '<user>'".
        let message = e.get_message().as_str();
        if let Some(at) = message.find(" access to ") {
            let start = message[..at].rfind(' ').map_or(0, |i| i + 1);
            let (what, user) = message[start..]
                .split_once(" refused for user ")
                .unwrap_or((&message[start..], "of AMQP_URL"));
            return BrokerError::PermissionRefused {
                url,
                detail: format!("user {user} {what}"),
            };
        }
        return BrokerError::AuthRefused { url };
    }
    BrokerError::Amqp { url, source }
}

/// An error of opening the connection: a TLS handshake that retrying cannot fix becomes
/// [`BrokerError::Tls`] (only here: later errors of a session are never handshakes).
fn connect_err(config: &Config, node: &Node, source: lapin::Error) -> BrokerError {
    match tls::failure(&source, &config.amqp_tls) {
        Some(tls::Failure { reason, fix }) => BrokerError::Tls {
            url: node.shown.clone(),
            reason,
            fix,
        },
        None => amqp_err(&node.shown, source),
    }
}

/// Connects to `node` (over TLS for `amqps://`, see `tls`), opens both channels and
/// declares the topology.
///
/// # Errors
/// [`BrokerError::QueueMismatch`] when the queue exists with other arguments (fatal),
/// [`BrokerError::AuthRefused`] on bad credentials and [`BrokerError::PermissionRefused`]
/// when the user lacks a permission the topology needs (both fatal), [`BrokerError::Tls`]
/// when the TLS handshake fails on a certificate, a host name or a server without TLS
/// (fatal),
/// [`BrokerError::Amqp`] for everything the caller should retry.
pub async fn connect(config: &Config, node: &Node) -> Result<Session, BrokerError> {
    let connection = open_connection(config, node, "").await?;
    let consume = connection
        .create_channel()
        .await
        .map_err(|e| amqp_err(&node.shown, e))?;
    declare_topology(&consume, config, &node.shown).await?;
    let publish = open_publish_channel(&connection, &node.shown).await?;
    Ok(Session {
        connection,
        consume,
        publish,
        node: node.clone(),
    })
}

/// [`connect`] to the first node `config.amqp_url` lists (for tools and tests that
/// declare the topology once; replicas walk the nodes, see [`Rotation`]).
///
/// # Errors
/// As [`connect`].
pub async fn connect_first(config: &Config) -> Result<Session, BrokerError> {
    connect(config, Rotation::in_order(config).current()).await
}

/// Connection-name suffix of the results relay's own connection.
pub const RESULTS_CONNECTION_SUFFIX: &str = "/results";

/// The results relay's own connection to `node` (so a results outage never touches the
/// votes session) and a confirm-mode channel, with the durable topic exchange
/// [`crate::results::EXCHANGE`] declared.
///
/// # Errors
/// As [`connect`]: refused credentials or permissions and TLS failures are
/// [`BrokerError::AuthRefused`], [`BrokerError::PermissionRefused`], [`BrokerError::Tls`].
pub async fn connect_results(
    config: &Config,
    node: &Node,
) -> Result<(Connection, Channel), BrokerError> {
    let connection = open_connection(config, node, RESULTS_CONNECTION_SUFFIX).await?;
    let channel = open_publish_channel(&connection, &node.shown).await?;
    declare_exchange(
        &channel,
        &node.shown,
        crate::results::EXCHANGE,
        ExchangeKind::Topic,
    )
    .await?;
    Ok((connection, channel))
}

/// Declares a durable exchange (the same arguments every time) on the node shown as `url`.
async fn declare_exchange(
    channel: &Channel,
    url: &str,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_err(url, e))
}

/// Publishes one results event as a persistent message (`message_id` = event id) on the
/// node shown as `url`, and returns its confirm, to be awaited by the caller (publish
/// many, then await all).
///
/// # Errors
/// [`BrokerError`] when the channel refuses the publish.
pub async fn publish_result(
    channel: &Channel,
    url: &str,
    event: &crate::results::Event,
) -> Result<lapin::PublisherConfirm, BrokerError> {
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(event.event_id.to_string().into())
        .with_content_type(crate::results::CONTENT_TYPE.into())
        .with_type(crate::results::MESSAGE_TYPE.into())
        .with_app_id(CLIENT_NAME.into());
    channel
        .basic_publish(
            crate::results::EXCHANGE.into(),
            event.election_id.as_str().into(),
            BasicPublishOptions::default(),
            &event.to_json(),
            props,
        )
        .await
        .map_err(|e| amqp_err(url, e))
}

/// Whether a publisher confirm says the broker took the message (an unroutable one,
/// with no queue bound, counts: nobody was listening for it).
///
/// # Errors
/// [`BrokerError`] when the broker nacked it or the channel failed.
pub async fn confirmed(confirm: lapin::PublisherConfirm, url: &str) -> Result<(), BrokerError> {
    match confirm.await.map_err(|e| amqp_err(url, e))? {
        Confirmation::Ack(_) => Ok(()),
        Confirmation::Nack(_) | Confirmation::NotRequested => Err(BrokerError::Amqp {
            url: url.to_string(),
            source: lapin::Error::from(std::io::Error::other("the broker nacked a results event")),
        }),
    }
}

/// Opens a connection to `node` named `<CLIENT_NAME>/<REPLICA_ID><suffix>`.
async fn open_connection(
    config: &Config,
    node: &Node,
    suffix: &str,
) -> Result<Connection, BrokerError> {
    let mut uri = AMQPUri::from_str(node.url.expose_secret()).map_err(|e| BrokerError::Amqp {
        url: node.shown.clone(),
        source: lapin::Error::from(std::io::Error::other(e)),
    })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = config.amqp_heartbeat;
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(10_000);
    }
    let props = ConnectionProperties::default()
        .with_connection_name(format!("{CLIENT_NAME}/{}{suffix}", config.replica_id).into());
    let runtime = lapin::runtime::default_runtime().map_err(|e| amqp_err(&node.shown, e))?;
    Connection::connect_uri_with_config(uri, props, tls::client_config(&config.amqp_tls), runtime)
        .await
        .map_err(|e| connect_err(config, node, e))
}

/// Declares the topology of the contract (see the module docs) on `channel`, connected
/// to the node shown as `url`.
async fn declare_topology(
    channel: &Channel,
    config: &Config,
    url: &str,
) -> Result<(), BrokerError> {
    let durable = QueueDeclareOptions::durable();
    declare_exchange(channel, url, DEAD_LETTER_EXCHANGE, ExchangeKind::Direct).await?;
    // The votes queue first, so a type mismatch names the queue operators know.
    channel
        .queue_declare(
            config.queue_name.as_str().into(),
            durable,
            queue_arguments(&config.queue_name, config.queue_type),
        )
        .await
        .map_err(|e| mismatch_or(url, &config.queue_name, e))?;
    let unexplained = unexplained_queue(&config.queue_name);
    for (queue, routing_key) in [
        (config.dead_letter_queue(), config.queue_name.clone()),
        (unexplained.clone(), unexplained.clone()),
    ] {
        let mut args = FieldTable::default();
        args.insert(
            args::QUEUE_TYPE.into(),
            AMQPValue::LongString(config.queue_type.as_str().into()),
        );
        channel
            .queue_declare(queue.as_str().into(), durable, args)
            .await
            .map_err(|e| mismatch_or(url, &queue, e))?;
        channel
            .queue_bind(
                queue.as_str().into(),
                DEAD_LETTER_EXCHANGE.into(),
                routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_err(url, e))?;
    }
    Ok(())
}

/// A PRECONDITION_FAILED on declare means "exists with other arguments".
fn mismatch_or(url: &str, queue: &str, e: lapin::Error) -> BrokerError {
    if let lapin::ErrorKind::ProtocolError(p) = e.kind()
        && p.get_id() == 406
    {
        let detail = p.get_message().to_string();
        let fix = if detail.contains(args::DELIVERY_LIMIT)
            || detail.contains(args::DEAD_LETTER_ROUTING_KEY)
        {
            "it was declared by a release with other dead-letter settings (older releases left quorum queues the broker's delivery limit, which can dead-letter valid votes uncounted): stop the publishers, let the replicas that declared it drain it, delete it, then start this release"
        } else {
            "set QUEUE_TYPE to the existing queue's type, or drain and delete the queue so it is declared again with the aggregator's arguments"
        };
        return BrokerError::QueueMismatch {
            queue: queue.to_string(),
            detail,
            fix: fix.to_string(),
        };
    }
    amqp_err(url, e)
}

/// What a passive declare tells about a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready (not counting deliveries unacked by a consumer).
    pub messages: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// The [`QueueCounts`] of `queue` by passive declare: never creates or changes it. The
/// bare AMQP error is returned (a missing queue closes `channel` with 404), so callers
/// without a [`Config`] can use it too; [`message_count`] maps it for the service.
///
/// # Errors
/// When the queue does not exist or the channel fails.
pub async fn queue_counts(channel: &Channel, queue: &str) -> Result<QueueCounts, lapin::Error> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(QueueCounts {
        messages: q.message_count(),
        consumers: q.consumer_count(),
    })
}

/// Messages ready in `queue` (passive declare: never creates or changes it), on a
/// channel of the node `node`.
///
/// # Errors
/// [`BrokerError`] when the channel fails.
pub async fn message_count(
    channel: &Channel,
    node: &Node,
    queue: &str,
) -> Result<u32, BrokerError> {
    queue_counts(channel, queue)
        .await
        .map(|c| c.messages)
        .map_err(|e| amqp_err(&node.shown, e))
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
        ORIGINAL_QUEUE_HEADER.into(),
        AMQPValue::LongString(config.queue_name.as_str().into()),
    );
    headers.insert(
        REJECTED_BY_HEADER.into(),
        AMQPValue::LongString(config.replica_id.as_str().into()),
    );
    let props = dead_letter_properties(original, headers);
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
        .map_err(|e| amqp_err(&session.node.shown, e))?
        .await
        .map_err(|e| amqp_err(&session.node.shown, e))?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) | Confirmation::Nack(_) | Confirmation::NotRequested => {
            Err(BrokerError::Amqp {
                url: session.node.shown.clone(),
                source: lapin::Error::from(std::io::Error::other(
                    "dead-letter publish was not confirmed (unroutable or nacked)",
                )),
            })
        }
    }
}

/// The properties of a dead-letter copy: the original's, with `headers`, persistent, and
/// WITHOUT `expiration` (evidence must not expire) or `user_id` (the broker refuses a
/// publish whose `user_id` is not the publishing connection's user, which would close the
/// publish channel).
pub fn dead_letter_properties(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    let copy = |v: &Option<ShortString>| v.clone();
    if let Some(v) = copy(original.content_type()) {
        props = props.with_content_type(v);
    }
    if let Some(v) = copy(original.content_encoding()) {
        props = props.with_content_encoding(v);
    }
    if let Some(v) = copy(original.correlation_id()) {
        props = props.with_correlation_id(v);
    }
    if let Some(v) = copy(original.reply_to()) {
        props = props.with_reply_to(v);
    }
    if let Some(v) = copy(original.message_id()) {
        props = props.with_message_id(v);
    }
    if let Some(v) = copy(original.kind()) {
        props = props.with_type(v);
    }
    if let Some(v) = copy(original.app_id()) {
        props = props.with_app_id(v);
    }
    if let Some(v) = *original.priority() {
        props = props.with_priority(v);
    }
    if let Some(v) = *original.timestamp() {
        props = props.with_timestamp(v);
    }
    props
}

/// How often the broker delivered this message before ([`DELIVERY_COUNT_HEADER`], set
/// by quorum queues on redeliveries).
pub fn delivery_count(props: &BasicProperties) -> Option<i64> {
    match props
        .headers()
        .as_ref()?
        .inner()
        .get(DELIVERY_COUNT_HEADER)?
    {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Opens the confirm-mode channel for dead-letter publishes (again, after the broker
/// closed it) on `connection`, to the node shown (redacted) as `url`.
///
/// # Errors
/// [`BrokerError`] when the connection cannot open it.
pub async fn open_publish_channel(
    connection: &Connection,
    url: &str,
) -> Result<Channel, BrokerError> {
    let publish = connection
        .create_channel()
        .await
        .map_err(|e| amqp_err(url, e))?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| amqp_err(url, e))?;
    Ok(publish)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_copy_keeps_the_evidence_but_not_expiration_or_user_id() {
        let original = BasicProperties::default()
            .with_expiration("1000".into())
            .with_user_id("publisher".into())
            .with_message_id("m-1".into())
            .with_content_type("application/json".into())
            .with_timestamp(1_700_000_000)
            .with_priority(3);
        let mut headers = FieldTable::default();
        headers.insert(
            REJECT_REASON_HEADER.into(),
            AMQPValue::LongString("why".into()),
        );
        let copy = dead_letter_properties(&original, headers);
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.user_id(), &None);
        assert_eq!(copy.message_id(), original.message_id());
        assert_eq!(copy.content_type(), original.content_type());
        assert_eq!(copy.timestamp(), original.timestamp());
        assert_eq!(copy.priority(), original.priority());
        assert_eq!(copy.delivery_mode(), &Some(2));
        assert!(
            copy.headers()
                .as_ref()
                .is_some_and(|h| h.inner().contains_key(REJECT_REASON_HEADER))
        );
    }

    #[test]
    fn quorum_votes_queues_have_no_delivery_limit_and_an_unexplained_route() {
        let args = queue_arguments("votes.aggregation", QueueType::Quorum);
        let inner = args.inner();
        assert_eq!(
            inner.get(args::DELIVERY_LIMIT),
            Some(&AMQPValue::LongInt(-1))
        );
        assert_eq!(
            inner.get(args::DEAD_LETTER_ROUTING_KEY),
            Some(&AMQPValue::LongString(
                "votes.aggregation.dlq.unexplained".into()
            ))
        );
        let classic = queue_arguments("q", QueueType::Classic);
        assert!(!classic.inner().contains_key(args::DELIVERY_LIMIT));
    }
}
