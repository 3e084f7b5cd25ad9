//! Fault scenarios ("nemeses") for vote-aggregator, in the style of Jepsen.
//!
//! This crate owns the chaos suite: the faults that break real deployments, injected on
//! a seeded schedule into REAL replica processes on a private PostgreSQL + RabbitMQ pair
//! while a publisher keeps voting, followed by the exactly-once checker of
//! `vote-harness`. It exists to make "exactly once" believable: every scenario must end
//! with 0 lost confirmed votes, 0 double-counted, tally drift 0, every malformed message
//! dead-lettered, every fault verified, and every replica recovered by itself.
//!
//! Modules:
//! - [`cluster`]: the system under test (servers, per-replica fault proxies, fleet);
//! - [`nemesis`]: the fault injectors, one per kind, each verifying its effect;
//! - [`load`]: the steady-rate confirmed publisher and its seeded message stream;
//! - [`scenario`]: the named scenarios and the run (workload + schedule + checker);
//! - [`report`]: the Jepsen-style report and the verdict.
//!
//! The replicas must be a fault-injection build of `vote-aggregator` (the `commit-ack`
//! nemesis and the broken-build check use its hooks): `cargo build --workspace --features
//! vote-aggregator/fault-injection`, which `make chaos` does. Since this crate depends on
//! the service with that feature, any `cargo build --workspace` / `cargo test
//! --workspace` builds the binary with it too.

pub mod cluster;
pub mod load;
pub mod nemesis;
pub mod report;
pub mod scenario;

pub use report::ChaosReport;
pub use scenario::{Scenario, ScenarioOptions, run};
