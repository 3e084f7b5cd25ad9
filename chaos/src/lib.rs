//! Fault scenarios ("nemeses") for vote-aggregator, in the style of Jepsen.
//!
//! This crate owns the chaos suite: the faults that break real deployments, injected on
//! a seeded schedule into REAL replica processes on a private PostgreSQL + RabbitMQ pair
//! while a publisher keeps voting, followed by the exactly-once checker of
//! `vote-testkit`. It exists to make "exactly once" believable: every scenario must end
//! with 0 lost confirmed votes, 0 double-counted, tally drift 0, every malformed message
//! dead-lettered, every fault verified, and every replica recovered by itself.
//!
//! Modules:
//! - [`cluster`]: the system under test (servers, per-replica fault proxies, fleet);
//! - [`nemesis`]: the fault injectors, one per kind, each verifying its effect;
//! - [`load`]: the seeded message stream the test kit's steady-rate publisher
//!   (`vote_testkit::publish::SteadyLoad`) sends;
//! - [`scenario`]: the named scenarios and the run (workload + schedule + checker);
//! - [`report`]: the Jepsen-style report and the verdict;
//! - [`drain`]: the end of a run (drained queue, dead letters), shared with
//! - [`deploy`]: the deployment test on the Docker Compose stack (kill, scale, rolling
//!   upgrade and rollback, server restarts) with the same publisher and checker.
//!
//! The replicas are a fault-injection build of `vote-aggregator` (the `commit-ack`
//! nemesis and the broken-build check use its hooks), built apart from every ordinary
//! binary by `make fault-build` into `target/<profile>/fault-injection/` (see
//! `vote_testkit::fleet::fault_injection_binary`). This crate depends on the service
//! WITHOUT the feature, so no workspace build ever contains the hooks; it names the hooks'
//! switches through the service's `fault` constants. `vote-tools chaos` is its command
//! line.

pub mod cluster;
pub mod deploy;
pub mod drain;
pub mod load;
pub mod nemesis;
pub mod report;
pub mod scenario;

pub use report::ChaosReport;
pub use scenario::{Scenario, ScenarioOptions, run};
