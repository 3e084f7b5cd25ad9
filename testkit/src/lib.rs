//! The test kit of vote-aggregator.
//!
//! This crate owns everything the integration, chaos and load tests need besides the
//! service itself, so that every suite starts real servers and checks results the same way.
//! It uses only the service's public API; the chaos suite (`vote-chaos`) and the tools
//! binary (`vote-tools`) build on it.
//!
//! Modules:
//! - [`infra`]: real PostgreSQL and RabbitMQ servers — one shared pair per test process,
//!   private pairs that can be stopped, restarted and paused, or servers that already run
//!   (`VOTES_TEST_DATABASE_URL`, `VOTES_TEST_AMQP_URL`); fresh databases and queue names.
//! - [`proxy`]: [`proxy::FaultProxy`], a TCP proxy that can cut every connection on demand
//!   and keeps a fixed address while the server behind it moves.
//! - [`testbed`]: a fresh database + queue per test, with its config and handles.
//! - [`votes`] and [`workload`]: making votes; seeded workloads with duplicates, late
//!   duplicates, conflicting copies and malformed bodies.
//! - [`publish`]: the confirmed publisher that follows the contract and retries what was
//!   not confirmed, for a fixed list or at a steady rate during faults; [`ledger`]: what
//!   was confirmed; [`progress`]: progress reporting.
//! - [`fleet`]: real `vote-aggregator` processes, with signals (stop, kill, pause, resume)
//!   and metric scrapes; [`prometheus`]: the one parser of `/metrics` pages;
//!   [`procinfo`]: the one reader of `/proc`; [`signal`]: the one way to signal a process.
//! - [`checker`]: the exactly-once checker (the four invariants of docs/DESIGN.md).
//! - [`tls`]: a throwaway CA with server and client certificates for TLS tests.
//! - [`nodes`]: the nodes of a comma-separated `AMQP_URL`, tried in turn by the kit's
//!   clients.
//! - [`inspect`]: reading back the outcome from PostgreSQL and RabbitMQ, polling helpers.

pub mod checker;
pub mod fleet;
pub mod infra;
pub mod inspect;
pub mod ledger;
pub mod nodes;
pub mod procinfo;
pub mod progress;
pub mod prometheus;
pub mod proxy;
pub mod publish;
pub mod results;
pub mod signal;
pub mod testbed;
pub mod tls;
pub mod votes;
pub mod workload;
