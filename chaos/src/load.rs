//! The scenario workload: a seeded stream of votes (with exact duplicates, late duplicates,
//! conflicting copies and ~1 % malformed bodies) published at a STEADY rate for as long as
//! the faults last, with publisher confirms, retrying everything not confirmed.
//!
//! Why not [`vote_testkit::publish::publish_messages`]: that publishes a fixed list and
//! gives up after about 30 failed connection attempts, while a chaos run must keep
//! publishing through repeated broker restarts (each can take 10–30 s on a busy machine)
//! and stop at a moment the scenario chooses. This module keeps the same contract (default
//! exchange, routing key = queue, persistent, `mandatory`, `message_id` = vote id, confirms)
//! and the same ledger rules: every message is recorded in the [`Ledger`] as attempted
//! before it is sent, and as confirmed once the broker confirmed it; an unconfirmed one is
//! published again (the duplicate that may create is the system's to absorb), and whatever
//! is still unconfirmed when the flush time runs out stays indeterminate (it may or may
//! not be counted; the checker accepts both).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vote_testkit::ledger::Ledger;
use vote_testkit::workload::{Message, Workload, WorkloadSpec};

/// Most messages published before their confirms are awaited.
const WINDOW: usize = 200;
/// Longest wait for one window's confirms before the connection is presumed dead.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between connection attempts while the broker is away.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// The message stream of a scenario: `votes` originals and everything derived from them,
/// in publish order. Late duplicates are woven in `late_lag` messages after their
/// original (so they usually arrive after it committed, possibly on another replica).
pub fn message_stream(spec: &WorkloadSpec, late_lag: usize) -> Vec<Message> {
    let workload = Workload::generate(spec);
    let position: HashMap<uuid::Uuid, usize> = workload
        .main
        .iter()
        .enumerate()
        .filter_map(|(i, m)| match m {
            Message::Original(v) => Some((v.vote_id, i)),
            _ => None,
        })
        .collect();
    let mut keyed: Vec<(usize, usize, Message)> = workload
        .main
        .into_iter()
        .enumerate()
        .map(|(i, m)| (i, 0, m))
        .collect();
    for m in workload.late {
        let at = match &m {
            Message::Duplicate(v) => position.get(&v.vote_id).copied().unwrap_or(usize::MAX),
            _ => usize::MAX,
        };
        keyed.push((at.saturating_add(late_lag), 1, m));
    }
    keyed.sort_by_key(|(at, order, _)| (*at, *order));
    keyed.into_iter().map(|(_, _, m)| m).collect()
}

/// What the publisher did.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Every attempted and every confirmed message (what the checker holds the system to).
    pub ledger: Ledger,
    /// Bodies of the malformed messages that were confirmed.
    pub malformed_confirmed: HashSet<Vec<u8>>,
    /// Bodies of every malformed message published at least once (confirmed or not).
    pub malformed_sent: HashSet<Vec<u8>>,
    /// Messages taken from the stream (the rest were never sent).
    pub attempted: usize,
    /// Messages still unconfirmed when the flush time ran out (attempted, not confirmed).
    pub unconfirmed: usize,
    /// Connections opened (1 when the broker never went away).
    pub connections: u64,
}

/// A publisher running in the background until [`Load::finish`].
#[derive(Debug)]
pub struct Load {
    stop: CancellationToken,
    /// How long to keep retrying after the stop; set by [`Load::finish`] before it stops.
    flush: Arc<OnceLock<Duration>>,
    task: JoinHandle<anyhow::Result<Published>>,
}

impl Load {
    /// Starts publishing `messages` to `queue` at `rate` messages per second.
    pub fn start(
        amqp_url: &str,
        queue: &str,
        seed: u64,
        messages: Vec<Message>,
        rate: f64,
    ) -> Load {
        let stop = CancellationToken::new();
        let flush = Arc::new(OnceLock::new());
        let (url, queue) = (amqp_url.to_owned(), queue.to_owned());
        let (token, limit) = (stop.clone(), flush.clone());
        let task = tokio::spawn(async move {
            let mut out = Published {
                ledger: Ledger::new(&queue, seed),
                ..Published::default()
            };
            let stopping = Stopping {
                token: &token,
                flush: &limit,
            };
            run(&url, &queue, &messages, rate, &stopping, &mut out).await?;
            Ok(out)
        });
        Load { stop, flush, task }
    }

    /// Stops taking new messages, keeps retrying the unconfirmed ones for at most `flush`,
    /// and returns what was confirmed.
    ///
    /// # Errors
    /// When the publisher task failed (it only fails on refused credentials).
    pub async fn finish(self, flush: Duration) -> anyhow::Result<Published> {
        let _ = self.flush.set(flush);
        self.stop.cancel();
        // The task bounds its own flush; the margin only guards against a hang in the
        // client library.
        let bound = flush + CONFIRM_TIMEOUT + Duration::from_secs(5);
        match tokio::time::timeout(bound, self.task).await {
            Ok(joined) => joined.context("publisher task panicked")?,
            Err(_) => anyhow::bail!("the publisher did not finish within {bound:?}"),
        }
    }
}

/// The stop signal and the flush bound that comes with it.
struct Stopping<'a> {
    token: &'a CancellationToken,
    flush: &'a OnceLock<Duration>,
}

async fn connect(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let connecting = Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name("vote-chaos/publisher".into()),
    );
    let connection = tokio::time::timeout(CONFIRM_TIMEOUT, connecting)
        .await
        .context("connecting to RabbitMQ timed out")??;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

async fn run(
    url: &str,
    queue: &str,
    messages: &[Message],
    rate: f64,
    stop: &Stopping<'_>,
    out: &mut Published,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut next = 0usize;
    let mut retry: VecDeque<usize> = VecDeque::new();
    let mut session: Option<(Connection, Channel)> = None;
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stopped_at.is_none() && stop.token.is_cancelled() {
            stopped_at = Some(Instant::now());
        }
        if let Some(at) = stopped_at {
            let limit = stop.flush.get().copied().unwrap_or(Duration::from_secs(30));
            if retry.is_empty() || at.elapsed() >= limit {
                break;
            }
        }
        let Some((_, channel)) = session.as_ref() else {
            match connect(url).await {
                Ok(s) => {
                    out.connections += 1;
                    session = Some(s);
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    if text.contains("ACCESS_REFUSED") || text.contains("403") {
                        return Err(e.context("RabbitMQ refused the publisher's credentials"));
                    }
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
            }
            continue;
        };
        let mut window: Vec<usize> = retry.drain(..retry.len().min(WINDOW)).collect();
        if stopped_at.is_none() {
            let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(messages.len());
            while next < due && window.len() < WINDOW {
                window.push(next);
                next += 1;
            }
        }
        if window.is_empty() {
            let due_in = Duration::from_secs_f64(1.0 / rate)
                .clamp(Duration::from_millis(2), Duration::from_millis(50));
            tokio::select! {
                () = stop.token.cancelled(), if stopped_at.is_none() => {}
                () = tokio::time::sleep(due_in) => {}
            }
            continue;
        }
        out.attempted = next;
        let mut pending = Vec::with_capacity(window.len());
        let mut broken = false;
        for &i in &window {
            if broken {
                pending.push((i, None));
                continue;
            }
            let (body, props) = vote_testkit::publish::message_parts(&messages[i]);
            // Recorded before the send: from here on it may reach the queue.
            out.ledger.attempt(&messages[i]);
            if let Message::Malformed(b) = &messages[i] {
                out.malformed_sent.insert(b.clone());
            }
            let published = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    props,
                )
                .await;
            match published {
                Ok(confirm) => pending.push((i, Some(confirm))),
                Err(_) => {
                    broken = true;
                    pending.push((i, None));
                }
            }
        }
        let mut failed = Vec::new();
        for (i, confirm) in pending {
            let confirmed = match confirm {
                Some(c) if !broken => matches!(
                    tokio::time::timeout(CONFIRM_TIMEOUT, c).await,
                    Ok(Ok(Confirmation::Ack(None)))
                ),
                _ => false,
            };
            if confirmed {
                let m = &messages[i];
                out.ledger.record(m);
                if let Message::Malformed(b) = m {
                    out.malformed_confirmed.insert(b.clone());
                }
            } else {
                broken = true;
                failed.push(i);
            }
        }
        if !failed.is_empty() {
            out.ledger.retried += failed.len() as u64;
            for i in failed.into_iter().rev() {
                retry.push_front(i);
            }
        }
        if broken && let Some((connection, _)) = session.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                connection.close(200, "reconnecting".into()),
            )
            .await;
        }
    }
    out.attempted = next;
    out.unconfirmed = retry.len();
    if let Some((connection, _)) = session.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "done".into()))
            .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_duplicates_follow_their_original_and_nothing_is_lost() {
        let spec = WorkloadSpec {
            votes: 2_000,
            duplicates: 0.2,
            late_share: 0.5,
            malformed: 0.01,
            seed: 7,
            ..WorkloadSpec::default()
        };
        let workload = Workload::generate(&spec);
        let stream = message_stream(&spec, 100);
        assert_eq!(stream.len(), workload.main.len() + workload.late.len());
        let mut first_seen = HashMap::new();
        for (i, m) in stream.iter().enumerate() {
            match m {
                Message::Original(v) => {
                    first_seen.insert(v.vote_id, i);
                }
                Message::Duplicate(v) => {
                    assert!(
                        first_seen.contains_key(&v.vote_id),
                        "duplicate before original"
                    );
                }
                _ => {}
            }
        }
        assert_eq!(stream, message_stream(&spec, 100), "seeded");
    }
}
