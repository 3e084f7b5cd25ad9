//! A steady-rate publisher running in the background for as long as faults last (the
//! chaos scenarios' load): [`SteadyLoad::start`] publishes a message list at a fixed rate,
//! [`SteadyLoad::finish`] stops taking new messages, retries the unconfirmed ones for a
//! bounded flush time and returns what happened ([`Published`]).
//!
//! Unlike [`super::publish_messages`] it never gives up while the broker is away (a chaos
//! run restarts it repeatedly, each restart can take 10–30 s on a busy machine); only
//! refused credentials end it early. The ledger is written as it goes, by the same rules:
//! attempted before the send, confirmed on a plain ack, whatever is unconfirmed at the end
//! indeterminate.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::pump::{self, CONFIRM_TIMEOUT, Plan, Sink, Stopping};
use crate::ledger::Ledger;
use crate::workload::Message;

/// Most messages published before their confirms are awaited (small: at a steady rate a
/// window is what came due since the last one).
const WINDOW: usize = 200;
/// Pause between connection attempts while the broker is away.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// What a steady publisher did.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Every attempted and every confirmed message (what the checker holds the system to).
    pub ledger: Ledger,
    /// Bodies of the malformed messages that were confirmed.
    pub malformed_confirmed: HashSet<Vec<u8>>,
    /// Bodies of every malformed message published at least once (confirmed or not).
    pub malformed_sent: HashSet<Vec<u8>>,
    /// Messages taken from the list (the rest were never sent).
    pub attempted: usize,
    /// Messages still unconfirmed when the flush time ran out (attempted, not confirmed).
    pub unconfirmed: usize,
    /// Connections opened (1 when the broker never went away).
    pub connections: u64,
}

/// A publisher running in the background until [`SteadyLoad::finish`].
#[derive(Debug)]
pub struct SteadyLoad {
    stop: CancellationToken,
    /// How long to keep retrying after the stop; set by [`SteadyLoad::finish`] before it
    /// stops.
    flush: Arc<OnceLock<Duration>>,
    task: JoinHandle<anyhow::Result<Published>>,
}

impl SteadyLoad {
    /// Starts publishing `messages` to `queue` at `rate` messages per second; the ledger
    /// carries `seed`.
    pub fn start(
        amqp_url: &str,
        queue: &str,
        seed: u64,
        messages: Vec<Message>,
        rate: f64,
    ) -> SteadyLoad {
        let stop = CancellationToken::new();
        let flush = Arc::new(OnceLock::new());
        let (url, queue) = (amqp_url.to_owned(), queue.to_owned());
        let (token, limit) = (stop.clone(), flush.clone());
        let task = tokio::spawn(async move {
            let mut sink = LedgerSink {
                messages: &messages,
                out: Published {
                    ledger: Ledger::new(&queue, seed),
                    ..Published::default()
                },
            };
            let plan = Plan {
                amqp_url: &url,
                queue: &queue,
                messages: &messages,
                rate: Some(rate),
                window: WINDOW,
                max_failures: None,
                reconnect_pause: RECONNECT_PAUSE,
                returned_is_fatal: false,
                stamp_cast_at: false,
                stop: Some(Stopping {
                    token: &token,
                    flush: &limit,
                }),
            };
            let pumped = pump::pump(&plan, &mut sink)
                .await
                .context("RabbitMQ refused the publisher's credentials")?;
            let mut out = sink.out;
            out.attempted = pumped.taken;
            out.unconfirmed = pumped.unconfirmed;
            Ok(out)
        });
        SteadyLoad { stop, flush, task }
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

/// Writes the ledger and the malformed-body sets as the loop reports.
struct LedgerSink<'a> {
    messages: &'a [Message],
    out: Published,
}

impl Sink for LedgerSink<'_> {
    fn attempted(&mut self, i: usize) {
        let m = &self.messages[i];
        self.out.ledger.attempt(m);
        if let Message::Malformed(b) = m {
            self.out.malformed_sent.insert(b.clone());
        }
    }

    fn confirmed(&mut self, i: usize) {
        let m = &self.messages[i];
        self.out.ledger.record(m);
        if let Message::Malformed(b) = m {
            self.out.malformed_confirmed.insert(b.clone());
        }
    }

    fn retried(&mut self, n: u64) {
        self.out.ledger.retried += n;
    }

    fn connected(&mut self) {
        self.out.connections += 1;
    }
}
