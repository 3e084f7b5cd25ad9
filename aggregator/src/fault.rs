//! Test-only fault hooks, compiled in only with the `fault-injection` feature (never in
//! release images). They let the chaos suite land a fault at an exact point of the
//! protocol, deterministically.
//!
//! - `VOTES_FAULT_CRASH_BEFORE_ACK=N`: abort the process (like SIGKILL: no cleanup)
//!   right after the N-th batch COMMIT and before its ack — the window exactly-once
//!   exists for.

use std::sync::atomic::{AtomicU64, Ordering};

static ACKS: AtomicU64 = AtomicU64::new(0);

/// Called after a batch committed, just before its ack is sent.
pub(crate) fn before_ack() {
    let n = ACKS.fetch_add(1, Ordering::SeqCst) + 1;
    let crash_at = std::env::var("VOTES_FAULT_CRASH_BEFORE_ACK")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if crash_at == Some(n) {
        eprintln!("fault-injection: aborting after commit {n}, before its ack");
        std::process::abort();
    }
}
