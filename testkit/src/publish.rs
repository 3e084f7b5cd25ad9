//! Publishing votes the way the contract says publishers must: default exchange, routing
//! key = queue name, persistent delivery, `message_id` = vote UUID, publisher confirms.
//!
//! A publish counts only once the broker confirmed it; before it is sent it is recorded as
//! attempted (see [`crate::ledger`]), since an unconfirmed publish may still reach the
//! queue. `mandatory` is set, so a message that no queue would take (the queue does not
//! exist yet) comes back as an error instead of vanishing.

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
        let shown = vote_aggregator::config::redact_url(amqp_url);
        let connection = match Connection::connect(
            amqp_url,
            ConnectionProperties::default().with_connection_name("vote-testkit/publisher".into()),
        )
        .await
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
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            rate: None,
            connections: 1,
            progress: false,
        }
    }
}

/// Publishes `messages` with confirms and records in `ledger` each one attempted (marked
/// before it is sent) and each one confirmed. Publishes whose confirm does not arrive
/// (nack, lost channel) are retried on a fresh connection; a retried publish may reach the
/// queue twice, which is exactly the kind of duplicate the aggregator must absorb. The
/// attempts enter the ledger even when this fails, so whatever reached the queue is known.
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
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let connections = options.connections.max(1);
    let progress =
        crate::progress::Progress::new("publishing", messages.len() as u64, options.progress);
    let done = Arc::new(AtomicU64::new(0));
    let attempted: Arc<Vec<AtomicBool>> = Arc::new(
        (0..messages.len())
            .map(|_| AtomicBool::new(false))
            .collect(),
    );
    let mut tasks = Vec::with_capacity(connections);
    for c in 0..connections {
        let mine: Vec<usize> = (c..messages.len()).step_by(connections).collect();
        let rate = options.rate.map(|r| r / connections as f64);
        let done = done.clone();
        let attempted = attempted.clone();
        let progress = progress.clone();
        let (url, queue) = (amqp_url.to_string(), queue.to_string());
        let msgs: Vec<(usize, crate::workload::Message)> =
            mine.iter().map(|&i| (i, messages[i].clone())).collect();
        tasks.push(tokio::spawn(async move {
            let counters = Counters {
                done: &done,
                attempted: &attempted,
                progress: &progress,
            };
            publish_on_one_connection(&url, &queue, msgs, rate, &counters).await
        }));
    }
    let mut confirmed = Vec::with_capacity(messages.len());
    let mut retried = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok((ids, r))) => {
                confirmed.extend(ids);
                retried += r;
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(anyhow::anyhow!("publisher task failed: {e}"));
            }
        }
    }
    progress.finish(done.load(Ordering::Relaxed));
    for (i, m) in messages.iter().enumerate() {
        if attempted[i].load(Ordering::Relaxed) {
            ledger.attempt(m);
        }
    }
    confirmed.sort_unstable();
    for i in confirmed {
        ledger.record(&messages[i]);
    }
    ledger.retried += retried;
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
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

/// What the connections of one [`publish_messages`] share.
struct Counters<'a> {
    /// Messages confirmed so far (for the progress display).
    done: &'a std::sync::atomic::AtomicU64,
    /// By message index: set BEFORE its first publish is sent.
    attempted: &'a [std::sync::atomic::AtomicBool],
    progress: &'a crate::progress::Progress,
}

/// One connection's share: returns the indexes confirmed and how many publishes were
/// retried; marks each message in `counters.attempted` before it is sent.
async fn publish_on_one_connection(
    amqp_url: &str,
    queue: &str,
    messages: Vec<(usize, crate::workload::Message)>,
    rate: Option<f64>,
    counters: &Counters<'_>,
) -> anyhow::Result<(Vec<usize>, u64)> {
    use std::collections::VecDeque;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    let mut todo: VecDeque<(usize, crate::workload::Message)> = messages.into();
    let mut confirmed = Vec::with_capacity(todo.len());
    let mut retried = 0u64;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut failures = 0u32;
    while !todo.is_empty() {
        let publisher = match Publisher::connect(amqp_url, queue).await {
            Ok(p) => p,
            Err(e) if failures < 30 && !is_auth_error(&e) => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        // Publish a window, then collect its confirms; anything unconfirmed goes back to
        // the front of the queue for a retry on a fresh connection.
        'session: while !todo.is_empty() {
            let mut window = Vec::with_capacity(CONFIRM_WINDOW);
            while window.len() < CONFIRM_WINDOW {
                let Some((i, m)) = todo.pop_front() else {
                    break;
                };
                if let Some(rate) = rate {
                    let due = Duration::from_secs_f64(sent as f64 / rate);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                sent += 1;
                let (body, props) = message_parts(&m);
                counters.attempted[i].store(true, Ordering::Relaxed);
                let res = publisher.send(&body, props).await;
                match res {
                    Ok(confirm) => window.push((i, m, Some(confirm))),
                    Err(_) => {
                        window.push((i, m, None));
                        break;
                    }
                }
                // Small windows while rate-limited, so the ledger keeps up in time.
                if rate.is_some() && window.len() >= 50 {
                    break;
                }
            }
            let mut broken = false;
            let mut failed = Vec::new();
            for (i, m, confirm) in window {
                let outcome = match confirm {
                    Some(c) if !broken => c.await.map_err(anyhow::Error::from),
                    _ => Err(anyhow::anyhow!("channel lost")),
                };
                match outcome.and_then(|c| check(c, queue)) {
                    Ok(()) => {
                        confirmed.push(i);
                        let n = counters.done.fetch_add(1, Ordering::Relaxed) + 1;
                        counters.progress.set(n);
                    }
                    Err(e) if e.to_string().contains("no such queue") => return Err(e),
                    Err(_) => {
                        broken = true;
                        retried += 1;
                        failed.push((i, m));
                    }
                }
            }
            for unconfirmed in failed.into_iter().rev() {
                todo.push_front(unconfirmed);
            }
            if broken {
                failures += 1;
                if failures > 30 {
                    anyhow::bail!(
                        "publishes to '{queue}' keep failing; giving up after 30 retries"
                    );
                }
                break 'session;
            }
        }
        publisher.close().await;
    }
    Ok((confirmed, retried))
}

fn is_auth_error(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("ACCESS_REFUSED") || text.contains("403")
}
