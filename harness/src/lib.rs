//! Test infrastructure for vote-aggregator.
//!
//! This crate owns everything the integration, chaos and load tests need besides the
//! service itself, so that every suite starts real servers and checks results the same way.
//!
//! Modules:
//! - [`infra`]: real PostgreSQL and RabbitMQ servers — one shared pair per test process,
//!   private pairs that can be stopped, restarted and paused, or servers that already run
//!   (`VOTES_TEST_DATABASE_URL`, `VOTES_TEST_AMQP_URL`); fresh databases and queue names.
//! - [`proxy`]: [`proxy::FaultProxy`], a TCP proxy that can cut every connection on demand
//!   and keeps a fixed address while the server behind it moves.
//!
//! - [`publish`]: a confirmed publisher that follows the contract.
//! - [`votes`]: making votes (UUIDv7 ids, deterministic spreads, conflicting copies).
//! - [`inspect`]: reading back the outcome from PostgreSQL and RabbitMQ, polling helpers.
//! - [`testbed`]: a fresh database + queue per test, with its config and handles.
//!
//! The replica fleet, exactly-once checker and load runner will live in further modules.

pub mod infra;
pub mod inspect;
pub mod proxy;
pub mod publish;
pub mod testbed;
pub mod votes;
