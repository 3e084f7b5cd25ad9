//! The periodic tally check of one replica: the `verify` check (invariant 1 of
//! docs/DESIGN.md) run every `TALLY_CHECK_INTERVAL_SECONDS`, its result exported as the
//! `vote_aggregator_tally_drift` gauge so Prometheus can alert on drift.
//!
//! It scans `votes` in one REPEATABLE READ snapshot on a connection of its own (never the
//! batch pool), so it costs one sequential scan per interval and replica and never holds
//! a lock a batch waits for.

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, warn};

use crate::config::Config;
use crate::metrics::Metrics;

/// The gauge's value until a check has run (and for good when checks are off).
pub const NOT_CHECKED: i64 = -1;

/// Sets the gauge to [`NOT_CHECKED`] and spawns the check loop when
/// `config.tally_check_interval` is set; it runs until `stop`. The first check runs one
/// interval after start, so a starting fleet does not scan `votes` all at once.
pub fn spawn(config: &Config, metrics: &Metrics, stop: CancellationToken) {
    metrics.tally_drift.set(NOT_CHECKED);
    let Some(interval) = config.tally_check_interval else {
        return;
    };
    let url = config.database_url.clone();
    let metrics = metrics.clone();
    tokio::spawn(
        async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => check_once(&url, &metrics).await,
                }
            }
        }
        .in_current_span(),
    );
}

/// One check: the drift gauge set from its result, or, when the database cannot be
/// read, a warning and a failure counted (the gauge keeps the last result).
async fn check_once(url: &secrecy::SecretString, metrics: &Metrics) {
    match super::verify(url).await {
        Ok(report) => {
            let drifting = i64::try_from(report.drift.len()).unwrap_or(i64::MAX);
            metrics.tally_drift.set(drifting);
            if drifting > 0 {
                error!(
                    candidates = drifting,
                    "tally drift: some tallies differ from their counted votes; run \
                     `vote-aggregator verify` for the list"
                );
            }
        }
        Err(e) => {
            metrics.tally_check_failures.inc();
            warn!("tally check skipped: {e}");
        }
    }
}
