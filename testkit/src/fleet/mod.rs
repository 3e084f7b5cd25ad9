//! A replica fleet: several REAL `vote-aggregator` processes (the built binary, never
//! in-process tasks) run side by side against one database and queue, for the
//! integration tests, the chaos scenarios and the demo.
//!
//! This module owns the life of those processes and nothing else:
//! - spawning each replica with a clean environment (only `PATH` and `RUST_LOG` are
//!   inherited), its own `REPLICA_ID` and a fixed `METRICS_ADDR` port that it keeps across
//!   restarts, so a scraper or a dashboard never has to look the address up again;
//! - one log file per replica (`<log_dir>/<name>.log`, stdout and stderr, appended across
//!   restarts with a marker line per start), so a failing test can show what a replica said;
//! - real signals: SIGTERM ([`Fleet::stop`]), SIGKILL ([`Fleet::kill`]), SIGSTOP /
//!   SIGCONT ([`Fleet::pause`] / [`Fleet::resume`]), each checked against `/proc`, since
//!   the failure modes the service promises to survive are those of real processes
//!   (a frozen replica keeps its TCP connections open; a killed one does not commit);
//! - readiness (`/readyz` = 200) and scraping `/metrics` into a [`Scrape`].
//!
//! Signals other than SIGKILL are sent with [`crate::signal::send`]; SIGKILL goes through
//! Tokio's [`tokio::process::Child::start_kill`]. A pid is only ever signalled while its
//! child is not yet reaped, so it cannot have been reused by another process. Process
//! states are read with [`crate::procinfo`].
//!
//! Every child is spawned with `kill_on_drop`, and dropping a [`Fleet`] sends SIGKILL to
//! each replica still running, so a failing (panicking) test leaves no process behind.
//!
//! The binary is NOT built by `cargo test -p vote-testkit` (the kit only depends on the
//! aggregator's library): run `cargo build -p vote-aggregator` first, or point
//! `VOTE_AGGREGATOR_BIN` at a binary (see [`aggregator_binary`]). The chaos suite runs the
//! separate fault-injection build instead ([`fault_injection_binary`]).
//!
//! The parts: [`binary`] finds the binary to run, [`spec`] says what to run
//! ([`ReplicaSpec`], [`FleetOptions`]), `replica` spawns and reaps one process,
//! [`lifecycle`] is the [`Fleet`] and its signals, [`probe`] asks replicas over HTTP
//! (readiness, `/metrics` scrapes, parsed by [`crate::prometheus`]), and [`logs`] reads
//! their log files.

pub mod binary;
pub mod lifecycle;
pub mod logs;
pub mod probe;
mod replica;
pub mod spec;

pub use binary::{
    BINARY_ENV, FAULT_BINARY_DIR, FAULT_BINARY_ENV, aggregator_binary, fault_injection_binary,
};
pub use lifecycle::{Fleet, STOP_TIMEOUT};
pub use logs::{START_MARKER, log_tail};
pub use probe::SCRAPE_TIMEOUT;
pub use spec::{FleetOptions, ReplicaSpec};

pub use crate::prometheus::{Sample, Scrape};
