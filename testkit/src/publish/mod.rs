//! Publishing votes the way the contract says publishers must: default exchange, routing
//! key = queue name, persistent delivery, `message_id` = vote UUID, publisher confirms.
//!
//! A publish counts only once the broker confirmed it; before it is sent it is recorded as
//! attempted (see [`crate::ledger`]), since an unconfirmed publish may still reach the
//! queue. `mandatory` is set, so a message that no queue would take (the queue does not
//! exist yet) comes back as an error instead of vanishing.
//!
//! Two ways to publish a workload, on one loop (the private `pump` module): [`publish_messages`], a fixed
//! list as fast as confirms allow (or at a rate) that gives up when the broker stays
//! away ([`publish_workload`] sends a workload's main and late parts with it), and [`SteadyLoad`], a steady rate in the background for as long as faults last,
//! that never gives up and stops when told. [`Publisher`] is the single connection both
//! use, also handy on its own for a few votes.

mod pump;
mod steady;

pub use pump::CONFIRM_TIMEOUT;
pub use steady::{Published, SteadyLoad};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use vote_aggregator::broker::PUBLISHED_AT_HEADER;
use vote_aggregator::vote::Vote;

/// Most publishes awaiting their confirm at once (a fixed list as fast as it goes).
const CONFIRM_WINDOW: usize = 500;

/// Failed connection attempts or broken sessions a fixed-list publish tolerates, one
/// [`RECONNECT_PAUSE`] apart (about 30 s of broker absence).
const MAX_FAILURES: u32 = 30;

/// Pause after a failed connection attempt of a fixed-list publish.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

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
    /// Connects (to one of the nodes when `amqp_url` lists several, see
    /// [`crate::nodes`]) and puts a channel in confirm mode.
    ///
    /// # Errors
    /// When no node is reachable, or one refuses the credentials.
    pub async fn connect(amqp_url: &str, queue: &str) -> anyhow::Result<Self> {
        let mut last = None;
        for node in crate::nodes::try_order(amqp_url) {
            match Self::connect_node(&node, queue).await {
                Ok(publisher) => return Ok(publisher),
                Err(e) if is_auth_error(&e) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("AMQP_URL names no node")))
    }

    /// [`Publisher::connect`] to one node.
    async fn connect_node(amqp_url: &str, queue: &str) -> anyhow::Result<Self> {
        let shown = vote_aggregator::config::redact_url(amqp_url);
        let connecting = Connection::connect(
            amqp_url,
            ConnectionProperties::default().with_connection_name("vote-testkit/publisher".into()),
        );
        let connection = match tokio::time::timeout(CONFIRM_TIMEOUT, connecting)
            .await
            .with_context(|| format!("connecting to RabbitMQ at {shown} timed out"))?
        {
            Ok(c) => c,
            Err(e) => {
                if let lapin::ErrorKind::ProtocolError(p) = e.kind()
                    && p.get_id() == 403
                {
                    bail!(
                        "RabbitMQ at {shown} refused the publisher's credentials (ACCESS_REFUSED): check the user and password in AMQP_URL"
                    );
                }
                return Err(e).with_context(|| {
                    format!("cannot connect to RabbitMQ at {shown}: is it running and is AMQP_URL right?")
                });
            }
        };
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

    /// Sends one message the contract's way (default exchange, routing key = queue,
    /// mandatory) and returns the pending confirm.
    ///
    /// # Errors
    /// When the channel fails.
    pub async fn send(
        &self,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<lapin::PublisherConfirm, lapin::Error> {
        self.channel
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
            .await
    }

    /// Publishes one raw body and waits for its confirm.
    ///
    /// # Errors
    /// When the publish is nacked, returned (no such queue) or the channel fails.
    pub async fn publish_raw(&self, body: &[u8], props: BasicProperties) -> anyhow::Result<()> {
        let confirm = self.send(body, props).await?.await?;
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
                pending.push(self.send(&vote.to_json(), vote_properties(vote)).await?);
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

    /// Closes the connection, waiting at most `bound` (a broken connection may hang).
    async fn close_within(self, bound: Duration) {
        let _ = tokio::time::timeout(bound, self.close()).await;
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

/// How to publish a list of workload messages.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Messages per second over all connections (`None`: as fast as confirms allow).
    pub rate: Option<f64>,
    /// Connections publishing concurrently; messages are dealt round-robin, so a vote
    /// and its immediate duplicate leave on different connections and race.
    pub connections: usize,
    /// Show a progress bar (on a terminal) or print progress lines (elsewhere).
    pub progress: bool,
    /// Set each vote's `cast_at` to the moment it is sent, so `recorded_at - cast_at`
    /// is its publish-to-commit latency.
    pub stamp_cast_at: bool,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            rate: None,
            connections: 1,
            progress: false,
            stamp_cast_at: false,
        }
    }
}

/// Publishes `messages` with confirms and records in `ledger` each one attempted (marked
/// before it is sent) and each one confirmed. Publishes whose confirm does not arrive
/// (nack, timeout, lost channel) are retried on a fresh connection; a retried publish may
/// reach the queue twice, which is exactly the kind of duplicate the aggregator must
/// absorb. The attempts and confirms enter the ledger even when this fails, so whatever
/// reached the queue is known.
///
/// # Errors
/// When the broker stays unreachable (after about 30 s of retries), refuses the
/// credentials, or the queue does not exist.
pub async fn publish_messages(
    amqp_url: &str,
    queue: &str,
    messages: &[crate::workload::Message],
    options: &PublishOptions,
    ledger: &mut crate::ledger::Ledger,
) -> anyhow::Result<()> {
    let connections = options.connections.max(1);
    let flags = || -> Arc<Vec<AtomicBool>> {
        Arc::new(
            (0..messages.len())
                .map(|_| AtomicBool::new(false))
                .collect(),
        )
    };
    let shared = Shared {
        attempted: flags(),
        confirmed: flags(),
        done: Arc::new(AtomicU64::new(0)),
        retried: Arc::new(AtomicU64::new(0)),
        progress: crate::progress::Progress::new(
            "publishing",
            messages.len() as u64,
            options.progress,
        ),
    };
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        // Dealt round-robin: a vote and its immediate duplicate leave on different
        // connections and race.
        let ids: Vec<usize> = (c..messages.len()).step_by(connections).collect();
        let mine: Vec<crate::workload::Message> =
            ids.iter().map(|&i| messages[i].clone()).collect();
        let mut sink = ShareSink {
            ids,
            shared: shared.clone(),
        };
        let rate = options.rate.map(|r| r / connections as f64);
        let stamp_cast_at = options.stamp_cast_at;
        let (url, queue) = (amqp_url.to_owned(), queue.to_owned());
        tasks.push(tokio::spawn(async move {
            let plan = pump::Plan {
                amqp_url: &url,
                queue: &queue,
                messages: &mine,
                rate,
                window: CONFIRM_WINDOW,
                max_failures: Some(MAX_FAILURES),
                reconnect_pause: RECONNECT_PAUSE,
                returned_is_fatal: true,
                stamp_cast_at,
                stop: None,
            };
            pump::pump(&plan, &mut sink).await.map(|_| ())
        }));
    }
    let mut first_error = None;
    for task in tasks {
        let result = match task.await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("publisher task failed: {e}")),
        };
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    shared.progress.finish(shared.done.load(Ordering::Relaxed));
    for (i, m) in messages.iter().enumerate() {
        if shared.attempted[i].load(Ordering::Relaxed) {
            ledger.attempt(m);
        }
    }
    for (i, m) in messages.iter().enumerate() {
        if shared.confirmed[i].load(Ordering::Relaxed) {
            ledger.record(m);
        }
    }
    ledger.retried += shared.retried.load(Ordering::Relaxed);
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Publishes a whole [`crate::workload::Workload`] the way runs do: `main` first, then
/// `before_late` (a pause, or waiting for the originals to be committed) and `late`, all
/// with [`publish_messages`] into the same `ledger`. `before_late` runs only when there
/// are late messages; it sees the ledger as `main` left it.
///
/// # Errors
/// As [`publish_messages`], or what `before_late` returns.
pub async fn publish_workload(
    amqp_url: &str,
    queue: &str,
    workload: &crate::workload::Workload,
    options: &PublishOptions,
    ledger: &mut crate::ledger::Ledger,
    before_late: impl AsyncFnOnce(&crate::ledger::Ledger) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    publish_messages(amqp_url, queue, &workload.main, options, ledger).await?;
    if workload.late.is_empty() {
        return Ok(());
    }
    before_late(ledger).await?;
    publish_messages(amqp_url, queue, &workload.late, options, ledger).await
}

/// The body and properties a workload message is published with: votes as the contract
/// says ([`vote_properties`]), malformed bodies as they are, persistent.
pub fn message_parts(m: &crate::workload::Message) -> (Vec<u8>, BasicProperties) {
    use crate::workload::Message;
    match m {
        Message::Original(v) | Message::Duplicate(v) | Message::Conflict(v) => {
            (v.to_json(), vote_properties(v))
        }
        Message::Malformed(body) => (
            body.clone(),
            BasicProperties::default().with_delivery_mode(2),
        ),
    }
}

/// What the connections of one [`publish_messages`] share, by message index.
#[derive(Clone)]
struct Shared {
    /// Set BEFORE a message's first publish is sent.
    attempted: Arc<Vec<AtomicBool>>,
    /// Set once the broker confirmed a message.
    confirmed: Arc<Vec<AtomicBool>>,
    /// Messages confirmed so far (for the progress display).
    done: Arc<AtomicU64>,
    /// Publishes retried.
    retried: Arc<AtomicU64>,
    progress: crate::progress::Progress,
}

/// One connection's view of [`Shared`]: its share's indexes in the whole list.
struct ShareSink {
    ids: Vec<usize>,
    shared: Shared,
}

impl pump::Sink for ShareSink {
    fn attempted(&mut self, i: usize) {
        self.shared.attempted[self.ids[i]].store(true, Ordering::Relaxed);
    }

    fn confirmed(&mut self, i: usize) {
        self.shared.confirmed[self.ids[i]].store(true, Ordering::Relaxed);
        let n = self.shared.done.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.progress.set(n);
    }

    fn retried(&mut self, n: u64) {
        self.shared.retried.fetch_add(n, Ordering::Relaxed);
    }
}

pub(crate) fn is_auth_error(e: &anyhow::Error) -> bool {
    // `connect` turns the broker's 403 into a message naming ACCESS_REFUSED. Never look
    // for "403" in the text: a URL's port (127.0.0.1:40327) contains it, and a transient
    // error on such a port must be retried, not taken for refused credentials.
    format!("{e:#}").contains("ACCESS_REFUSED")
}

#[cfg(test)]
mod auth_error_tests {
    use super::is_auth_error;

    #[test]
    fn only_access_refused_is_an_auth_error_not_a_port_containing_403() {
        let aborted = anyhow::anyhow!("IO error: connection aborted")
            .context("cannot connect to RabbitMQ at amqp://p:***@127.0.0.1:40327/%2f");
        assert!(!is_auth_error(&aborted));
        let refused = anyhow::anyhow!(
            "RabbitMQ at amqp://p:***@127.0.0.1:5672/%2f refused the publisher's credentials (ACCESS_REFUSED)"
        );
        assert!(is_auth_error(&refused));
    }
}
