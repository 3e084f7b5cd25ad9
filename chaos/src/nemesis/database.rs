//! The `database` nemesis: restart the PostgreSQL container under load, or terminate
//! every replica session with `pg_terminate_backend` while the server stays up.
//!
//! Either way a batch in flight fails (or had committed just before); the replica must
//! hold its deliveries unacked, retry with backoff, and report `/readyz` 503 meanwhile.
//! A commit whose outcome the client never learnt is retried; the UUID key makes the
//! retry insert nothing. Verified by the container's new start time (restart), and by
//! the number of backends terminated (> 0; the service sets
//! `application_name=vote-aggregator` on its batch sessions and
//! `vote-aggregator-results-relay` on its results relay's, so they can be told apart
//! from the checker's and this nemesis's own).

use std::time::Duration;

use anyhow::{Context, bail};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl as _;
use tokio::time::Instant;
use vote_aggregator::db::{APPLICATION_NAME, RELAY_APPLICATION_NAME};
use vote_testkit::inspect::Db;

use super::broker::{short_id, short_time};
use super::{Clock, Fault, FaultKind, one_line};
use crate::cluster::Cluster;

/// Terminates every replica backend of the current database; returns how many. `$1` is
/// the service's `application_name` ([`APPLICATION_NAME`]), `$2` its results relay's
/// ([`RELAY_APPLICATION_NAME`]).
const TERMINATE_SQL: &str = "SELECT count(*)::bigint AS n FROM ( \
     SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity \
     WHERE application_name IN ($1, $2) AND datname = current_database() \
       AND pid <> pg_backend_pid()) t WHERE ok";

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Restarts PostgreSQL or kills its replica sessions.
#[derive(Debug, Clone)]
pub struct DatabaseNemesis {
    /// How long to keep trying when no replica session exists yet (they reconnect
    /// lazily after a previous termination).
    pub terminate_patience: Duration,
}

impl Default for DatabaseNemesis {
    fn default() -> Self {
        DatabaseNemesis {
            terminate_patience: Duration::from_secs(5),
        }
    }
}

impl DatabaseNemesis {
    /// Stops PostgreSQL (fast shutdown: sessions are cut, open transactions roll back),
    /// verifies it is down, starts it and verifies a new start time.
    ///
    /// # Errors
    /// When a step fails or the container did not really go down and come back.
    pub async fn restart(&self, cluster: &Cluster) -> anyhow::Result<String> {
        let servers = &cluster.servers;
        let id = servers.postgres_container_id().to_owned();
        let (before, running) = servers.container_started_at(&id).await?;
        if !running {
            bail!("PostgreSQL was not running before the fault");
        }
        let t = Instant::now();
        servers.stop_postgres().await?;
        let (_, running) = servers.container_started_at(&id).await?;
        if running {
            bail!("PostgreSQL container still running after the stop");
        }
        let down_after = t.elapsed();
        servers.start_postgres().await?;
        let (after, running) = servers.container_started_at(&id).await?;
        if !running || after == before {
            bail!(
                "PostgreSQL container did not come back with a new start (started {before} → {after}, running {running})"
            );
        }
        Ok(format!(
            "container {} stopped after {:.1}s; started again, accepting connections {:.1}s after the fault (start time {} → {})",
            short_id(&id),
            down_after.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            short_time(&before),
            short_time(&after),
        ))
    }

    /// Terminates every replica session of the scenario's database and returns how many
    /// it terminated (retrying for a few seconds while there are none).
    ///
    /// # Errors
    /// When the database cannot be reached or no replica session appeared in time.
    pub async fn terminate_backends(&self, cluster: &Cluster) -> anyhow::Result<i64> {
        let mut db = Db::connect(&cluster.bed.database_url).await?;
        let deadline = Instant::now() + self.terminate_patience;
        loop {
            let row: Count = diesel::sql_query(TERMINATE_SQL)
                .bind::<Text, _>(APPLICATION_NAME)
                .bind::<Text, _>(RELAY_APPLICATION_NAME)
                .get_result(db.connection())
                .await
                .context("pg_terminate_backend")?;
            if row.n > 0 {
                return Ok(row.n);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no backend with application_name '{APPLICATION_NAME}' to terminate within {:?}",
                    self.terminate_patience
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One PostgreSQL restart.
    pub async fn strike_restart(&self, cluster: &mut Cluster, clock: &Clock) -> Fault {
        let at = clock.now();
        let outcome = self.restart(cluster).await.map_err(|e| one_line(&e));
        Fault {
            kind: FaultKind::DatabaseRestart,
            target: "postgres".into(),
            at,
            healed: clock.now(),
            heal_error: outcome
                .as_ref()
                .err()
                .map(|e| format!("database not restarted: {e}")),
            outcome,
        }
    }

    /// One round of `pg_terminate_backend`.
    pub async fn strike_terminate(&self, cluster: &mut Cluster, clock: &Clock) -> Fault {
        let at = clock.now();
        let outcome = self
            .terminate_backends(cluster)
            .await
            .map(|n| format!("{n} replica backend(s) terminated"))
            .map_err(|e| one_line(&e));
        Fault {
            kind: FaultKind::BackendTerminate,
            target: "postgres sessions".into(),
            at,
            healed: clock.now(),
            outcome,
            heal_error: None,
        }
    }
}
