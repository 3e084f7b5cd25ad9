//! The one confirmed-publish loop behind every publisher of the kit: a fixed list
//! ([`super::publish_messages`]) and a steady rate during faults ([`super::SteadyLoad`]).
//!
//! It takes messages from a list (all at once, or as many as a rate allows by now),
//! publishes them in windows on one connection in confirm mode, and waits for each
//! window's confirms (each bounded by [`CONFIRM_TIMEOUT`]). The ledger rules live here:
//! a message is reported ATTEMPTED before it is sent and CONFIRMED only on a plain ack;
//! anything else (nack, return, timeout, lost channel) is published again on a fresh
//! connection, in its original order, before any new message — the duplicate a retry may
//! create is the system's to absorb. Whatever is still unconfirmed when the run ends is
//! indeterminate.

use std::collections::{HashMap, VecDeque};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::bail;
use lapin::Confirmation;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Publisher, is_auth_error, message_parts};
use crate::workload::Message;

/// Longest wait for one confirm (or one connection attempt) before the connection is
/// presumed dead.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopped run keeps retrying its unconfirmed messages when the caller did
/// not say.
const DEFAULT_FLUSH: Duration = Duration::from_secs(30);

/// Where the loop reports what happened to each message (by index in the list).
pub(super) trait Sink {
    /// Message `i` is about to be sent: from now on it may reach the queue.
    fn attempted(&mut self, i: usize);
    /// The broker confirmed message `i`.
    fn confirmed(&mut self, i: usize);
    /// `n` publishes were not confirmed and will be sent again.
    fn retried(&mut self, n: u64);
    /// A connection was opened.
    fn connected(&mut self) {}
}

/// A stop signal and how long to keep retrying after it (set by whoever stops).
#[derive(Clone, Copy)]
pub(super) struct Stopping<'a> {
    pub(super) token: &'a CancellationToken,
    pub(super) flush: &'a OnceLock<Duration>,
}

/// How to run the loop.
pub(super) struct Plan<'a> {
    pub(super) amqp_url: &'a str,
    pub(super) queue: &'a str,
    pub(super) messages: &'a [Message],
    /// Messages per second (`None`: as fast as confirms allow). The schedule is by
    /// elapsed time, so retries do not slow it and a pause is caught up.
    pub(super) rate: Option<f64>,
    /// Most messages published before their confirms are awaited.
    pub(super) window: usize,
    /// Failed connection attempts and broken sessions tolerated before giving up
    /// (`None`: never give up, only a stop ends the run).
    pub(super) max_failures: Option<u32>,
    /// Pause after a failed connection attempt.
    pub(super) reconnect_pause: Duration,
    /// A message no queue took (returned) fails the run instead of being retried.
    pub(super) returned_is_fatal: bool,
    /// Set each vote's `cast_at` to the moment it is sent (for latency measurements).
    pub(super) stamp_cast_at: bool,
    /// `None`: the run ends once every message is confirmed. `Some`: it runs until the
    /// stop, then only retries what is unconfirmed, for at most the flush time.
    pub(super) stop: Option<Stopping<'a>>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Pumped {
    /// Messages taken from the list (the rest were never sent).
    pub(super) taken: usize,
    /// Messages taken but still unconfirmed at the end.
    pub(super) unconfirmed: usize,
}

/// What one window's confirms said.
struct WindowOutcome {
    confirmed: Vec<usize>,
    unconfirmed: Vec<usize>,
    returned: bool,
    broken: bool,
}

/// Runs the loop until every message is confirmed (no stop) or until the stop and its
/// flush (with a stop).
///
/// # Errors
/// When the broker refuses the credentials, a message is returned and
/// `returned_is_fatal`, or failures exceed `max_failures`. Everything attempted or
/// confirmed before was already reported to `sink`.
pub(super) async fn pump(plan: &Plan<'_>, sink: &mut impl Sink) -> anyhow::Result<Pumped> {
    let messages = plan.messages;
    let started = Instant::now();
    let mut next = 0usize;
    let mut retry: VecDeque<usize> = VecDeque::new();
    let mut session: Option<Publisher> = None;
    let mut stopped_at: Option<Instant> = None;
    let mut failures = 0u32;
    // With `stamp_cast_at`: each message as first sent, so that a retry sends the same
    // payload (a new `cast_at` would make it a conflicting copy of its own vote).
    let mut stamped: HashMap<usize, Message> = HashMap::new();
    let mut fail = |what: &str| -> anyhow::Result<()> {
        failures += 1;
        match plan.max_failures {
            Some(max) if failures > max => bail!(
                "publishes to '{}' keep failing ({what}); giving up after {max} retries",
                plan.queue
            ),
            _ => Ok(()),
        }
    };
    loop {
        if let Some(stop) = plan.stop {
            if stopped_at.is_none() && stop.token.is_cancelled() {
                stopped_at = Some(Instant::now());
            }
            if let Some(at) = stopped_at {
                let limit = stop.flush.get().copied().unwrap_or(DEFAULT_FLUSH);
                if retry.is_empty() || at.elapsed() >= limit {
                    break;
                }
            }
        } else if next == messages.len() && retry.is_empty() {
            break;
        }
        let Some(publisher) = session.as_ref() else {
            match Publisher::connect(plan.amqp_url, plan.queue).await {
                Ok(p) => {
                    sink.connected();
                    session = Some(p);
                }
                Err(e) if is_auth_error(&e) => return Err(e),
                Err(e) => {
                    fail(&format!("{e:#}"))?;
                    tokio::time::sleep(plan.reconnect_pause).await;
                }
            }
            continue;
        };
        let mut window: Vec<usize> = retry.drain(..retry.len().min(plan.window)).collect();
        if stopped_at.is_none() {
            let due = match plan.rate {
                Some(rate) => {
                    ((started.elapsed().as_secs_f64() * rate) as usize).min(messages.len())
                }
                None => messages.len(),
            };
            while next < due && window.len() < plan.window {
                window.push(next);
                next += 1;
            }
        }
        if window.is_empty() {
            let due_in = plan.rate.map_or(Duration::from_millis(50), |rate| {
                Duration::from_secs_f64(1.0 / rate)
                    .clamp(Duration::from_millis(2), Duration::from_millis(50))
            });
            match plan.stop {
                Some(stop) if stopped_at.is_none() => tokio::select! {
                    () = stop.token.cancelled() => {}
                    () = tokio::time::sleep(due_in) => {}
                },
                _ => tokio::time::sleep(due_in).await,
            }
            continue;
        }
        let outcome = publish_window(publisher, plan, &window, &mut stamped, sink).await;
        for &i in &outcome.confirmed {
            stamped.remove(&i);
            sink.confirmed(i);
        }
        if outcome.returned && plan.returned_is_fatal {
            bail!(
                "publish to '{}' was returned: no such queue (start the aggregator first, it declares the queue)",
                plan.queue
            );
        }
        if !outcome.unconfirmed.is_empty() {
            sink.retried(outcome.unconfirmed.len() as u64);
            for i in outcome.unconfirmed.into_iter().rev() {
                retry.push_front(i);
            }
        }
        if outcome.broken {
            if let Some(publisher) = session.take() {
                publisher.close_within(Duration::from_secs(1)).await;
            }
            fail("confirms did not arrive")?;
        }
    }
    if let Some(publisher) = session.take() {
        publisher.close_within(Duration::from_secs(2)).await;
    }
    Ok(Pumped {
        taken: next,
        unconfirmed: retry.len(),
    })
}

/// Sends one window (reporting each message as attempted just before its send) and
/// awaits its confirms. After the first failure the connection counts as broken: the
/// rest of the window is neither sent nor awaited, only marked unconfirmed.
async fn publish_window(
    publisher: &Publisher,
    plan: &Plan<'_>,
    window: &[usize],
    stamped: &mut HashMap<usize, Message>,
    sink: &mut impl Sink,
) -> WindowOutcome {
    let mut broken = false;
    let mut pending = Vec::with_capacity(window.len());
    for &i in window {
        if broken {
            pending.push((i, None));
            continue;
        }
        let (body, props) = if plan.stamp_cast_at {
            message_parts(stamped.entry(i).or_insert_with(|| stamp(&plan.messages[i])))
        } else {
            message_parts(&plan.messages[i])
        };
        sink.attempted(i);
        match publisher.send(&body, props).await {
            Ok(confirm) => pending.push((i, Some(confirm))),
            Err(_) => {
                broken = true;
                pending.push((i, None));
            }
        }
    }
    let mut outcome = WindowOutcome {
        confirmed: Vec::with_capacity(pending.len()),
        unconfirmed: Vec::new(),
        returned: false,
        broken,
    };
    for (i, confirm) in pending {
        let answer = match confirm {
            Some(c) if !outcome.broken => tokio::time::timeout(CONFIRM_TIMEOUT, c).await.ok(),
            _ => None,
        };
        match answer {
            Some(Ok(Confirmation::Ack(None))) => outcome.confirmed.push(i),
            other => {
                outcome.returned |= matches!(other, Some(Ok(Confirmation::Ack(Some(_)))));
                outcome.broken = true;
                outcome.unconfirmed.push(i);
            }
        }
    }
    outcome
}

/// `message` with its vote's `cast_at` set to now (to the microsecond, as stored).
fn stamp(message: &Message) -> Message {
    let now = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6);
    let restamp = |v: &vote_aggregator::vote::Vote| vote_aggregator::vote::Vote {
        cast_at: now,
        ..v.clone()
    };
    match message {
        Message::Original(v) => Message::Original(restamp(v)),
        Message::Duplicate(v) => Message::Duplicate(restamp(v)),
        Message::Conflict(v) => Message::Conflict(restamp(v)),
        Message::Malformed(b) => Message::Malformed(b.clone()),
    }
}
