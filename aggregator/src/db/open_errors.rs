//! Why the pool could not open a session, in the log: bb8 retries a failed connect until
//! its checkout timeout and then reports only "timed out", so without this a replica
//! that cannot open sessions (a certificate refused, a wrong password, with
//! `RUN_MIGRATIONS=false` nothing else connects) would never say why.
//!
//! Each distinct reason is logged once as a warning, and again at most every
//! [`REPEAT_AFTER`] while it persists, so a retry loop does not flood the log.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel_async::pooled_connection::PoolError;

/// A reason still failing is logged again after this long.
const REPEAT_AFTER: Duration = Duration::from_secs(30);

/// bb8's error sink for the service's pool.
#[derive(Debug, Clone, Default)]
pub(super) struct LogOpenErrors {
    /// The last reason logged and when.
    last: Arc<Mutex<Option<(String, Instant)>>>,
}

impl bb8::ErrorSink<PoolError> for LogOpenErrors {
    fn sink(&self, error: PoolError) {
        let reason = error.to_string();
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let repeat = match &*last {
            Some((previous, at)) => *previous != reason || at.elapsed() >= REPEAT_AFTER,
            None => true,
        };
        if repeat {
            tracing::warn!(error = %reason, "cannot open a PostgreSQL session; retrying");
            *last = Some((reason, Instant::now()));
        }
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<PoolError>> {
        Box::new(self.clone())
    }
}
