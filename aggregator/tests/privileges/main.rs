//! Least privilege against real servers: the PostgreSQL runtime role (made by
//! `scripts/roles.sql`, granted by the migration) counts votes with the real binary and
//! is refused everything else; the RabbitMQ permission patterns of
//! `vote_aggregator::amqp_permissions` let the aggregator work and a publisher only
//! publish.
//!
//! Roles and users are cluster-wide while the shared servers serve parallel tests, so
//! every test makes its own, with a random name, and drops it at the end. The tests run
//! commands inside the shared containers (`psql`, `rabbitmqctl`), so they need the test
//! containers, not external servers.

mod postgres;
mod rabbitmq;

/// A random lower-case suffix for cluster-wide names.
fn unique(prefix: &str) -> String {
    format!("{prefix}_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}
