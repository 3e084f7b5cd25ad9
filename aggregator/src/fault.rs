//! Test-only fault hooks, compiled in only with the `fault-injection` feature (never in
//! an ordinary or release build: `make fault-build` builds the one binary that has them,
//! apart from every other). The names of their switches are public constants in every
//! build, so the chaos suite refers to them without the feature; a constant nothing in the
//! binary uses leaves no trace in it. They let the chaos suite land a fault at an exact point of the
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
//! - `VOTES_FAULT_CRASH_BEFORE_OUTBOX_DELETE=N`: abort in the window between the results
//!   relay's N-th confirmed round and the delete of its events: they are published again
//!   (repeats a consumer must drop). (In the broken build below the order is delete then
//!   publish, and the same window lies between the two.)
//! - `VOTES_FAULT_OUTBOX_DELETE_BEFORE_CONFIRM=1`: a deliberately BROKEN relay that
//!   deletes (and commits) its claimed events before publishing them, so a crash in
//!   between loses results events. The chaos suite's results check must fail against it.

/// Abort between the N-th batch's COMMIT and its ack.
pub const CRASH_BEFORE_ACK_ENV: &str = "VOTES_FAULT_CRASH_BEFORE_ACK";
/// `1`: the deliberately broken replica that acks before COMMIT.
pub const ACK_BEFORE_COMMIT_ENV: &str = "VOTES_FAULT_ACK_BEFORE_COMMIT";
/// `1`: the deliberately broken replica whose sessions set `synchronous_commit=off`.
pub const SYNCHRONOUS_COMMIT_OFF_ENV: &str = "VOTES_FAULT_SYNCHRONOUS_COMMIT_OFF";
/// Abort between the results relay's N-th confirmed round and its delete.
pub const CRASH_BEFORE_OUTBOX_DELETE_ENV: &str = "VOTES_FAULT_CRASH_BEFORE_OUTBOX_DELETE";
/// `1`: the deliberately broken relay that deletes events before publishing them.
pub const OUTBOX_DELETE_BEFORE_CONFIRM_ENV: &str = "VOTES_FAULT_OUTBOX_DELETE_BEFORE_CONFIRM";
/// What the relay hook prints to stderr before it aborts, followed by the round number.
pub const RELAY_CRASH_LINE: &str = "fault-injection: aborting after relay confirm";
/// Prefix shared by every switch above.
pub const ENV_PREFIX: &str = "VOTES_FAULT_";
/// What a fault-injection build logs at start (a warning).
pub const BUILD_MARKER: &str =
    "this is a TEST build with fault injection compiled in; never deploy it";
/// What the crash hook prints to stderr before it aborts, followed by the batch number.
pub const CRASH_LINE: &str = "fault-injection: aborting after commit";

#[cfg(feature = "fault-injection")]
pub(crate) use hooks::*;

#[cfg(feature = "fault-injection")]
mod hooks {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::{
        ACK_BEFORE_COMMIT_ENV, CRASH_BEFORE_ACK_ENV, CRASH_BEFORE_OUTBOX_DELETE_ENV, CRASH_LINE,
        OUTBOX_DELETE_BEFORE_CONFIRM_ENV, RELAY_CRASH_LINE, SYNCHRONOUS_COMMIT_OFF_ENV,
    };

    static COMMITS: AtomicU64 = AtomicU64::new(0);
    static RELAY_ROUNDS: AtomicU64 = AtomicU64::new(0);

    /// Counts one more pass through a window and aborts the process (no cleanup, like
    /// SIGKILL) on the pass `env` names, printing `line`, the pass and `before`.
    fn window(
        passes: &AtomicU64,
        crash_at: &OnceLock<Option<u64>>,
        env: &str,
        line: &str,
        before: &str,
    ) {
        let n = passes.fetch_add(1, Ordering::SeqCst) + 1;
        if *crash_at.get_or_init(|| env_u64(env)) == Some(n) {
            eprintln!("{line} {n}, {before}");
            std::process::abort();
        }
    }

    /// Called between a relay round's two steps (confirm and delete).
    pub(crate) fn in_relay_confirm_delete_window() {
        static CRASH_AT: OnceLock<Option<u64>> = OnceLock::new();
        let env = CRASH_BEFORE_OUTBOX_DELETE_ENV;
        window(
            &RELAY_ROUNDS,
            &CRASH_AT,
            env,
            RELAY_CRASH_LINE,
            "before its delete",
        );
    }

    /// Whether this replica is the deliberately broken "delete before confirm" one.
    pub(crate) fn outbox_delete_before_confirm() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| env_u64(OUTBOX_DELETE_BEFORE_CONFIRM_ENV) == Some(1))
    }

    fn env_u64(key: &str) -> Option<u64> {
        std::env::var(key).ok().and_then(|v| v.trim().parse().ok())
    }

    /// Called between a batch's two protocol steps (COMMIT and ack).
    pub(crate) fn in_commit_ack_window() {
        static CRASH_AT: OnceLock<Option<u64>> = OnceLock::new();
        window(
            &COMMITS,
            &CRASH_AT,
            CRASH_BEFORE_ACK_ENV,
            CRASH_LINE,
            "before its ack",
        );
    }

    /// Whether this replica is the deliberately broken "ack before commit" one.
    pub(crate) fn ack_before_commit() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| env_u64(ACK_BEFORE_COMMIT_ENV) == Some(1))
    }

    /// Whether this replica is the deliberately broken "synchronous_commit=off" one.
    pub(crate) fn synchronous_commit_off() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| env_u64(SYNCHRONOUS_COMMIT_OFF_ENV) == Some(1))
    }
}
