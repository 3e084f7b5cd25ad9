//! Test-only fault hooks, compiled in only with the `fault-injection` feature (never in
//! release images). They let the chaos suite land a fault at an exact point of the
//! protocol, deterministically, and prove that the suite catches the bugs it exists for.
//! Without their environment variables they do nothing.
//!
//! - `VOTES_FAULT_CRASH_BEFORE_ACK=N`: abort the process (no cleanup, like SIGKILL) in
//!   the window between the N-th batch's COMMIT and its ack: the window exactly-once
//!   exists for. (In the broken build below the order is ack then commit, and the same
//!   window lies between the two.)
//! - `VOTES_FAULT_ACK_BEFORE_COMMIT=1`: a deliberately BROKEN replica that acks each
//!   batch when its transaction starts instead of after COMMIT, so a crash mid-commit
//!   loses votes. The chaos suite must fail against it.
//! - `VOTES_FAULT_SYNCHRONOUS_COMMIT_OFF=1`: a deliberately BROKEN replica whose sessions
//!   set `synchronous_commit=off`, so a COMMIT returns (and the batch is acked) before its
//!   WAL is flushed and a PostgreSQL crash right after loses acked votes. The chaos
//!   suite's database-kill nemesis must catch it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

static COMMITS: AtomicU64 = AtomicU64::new(0);

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.trim().parse().ok())
}

/// Called between a batch's two protocol steps (COMMIT and ack).
pub(crate) fn in_commit_ack_window() {
    static CRASH_AT: OnceLock<Option<u64>> = OnceLock::new();
    let n = COMMITS.fetch_add(1, Ordering::SeqCst) + 1;
    if *CRASH_AT.get_or_init(|| env_u64("VOTES_FAULT_CRASH_BEFORE_ACK")) == Some(n) {
        eprintln!("fault-injection: aborting after commit {n}, before its ack");
        std::process::abort();
    }
}

/// Whether this replica is the deliberately broken "ack before commit" one.
pub(crate) fn ack_before_commit() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| env_u64("VOTES_FAULT_ACK_BEFORE_COMMIT") == Some(1))
}

/// Whether this replica is the deliberately broken "synchronous_commit=off" one.
pub(crate) fn synchronous_commit_off() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| env_u64("VOTES_FAULT_SYNCHRONOUS_COMMIT_OFF") == Some(1))
}
