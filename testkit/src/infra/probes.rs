//! Readiness probes that really connect: a PostgreSQL login + `SELECT 1`, an AMQP login.
//!
//! testcontainers' wait strategies only watch log lines, ports or health checks; a log line
//! says a server started, not that it accepts this user's logins through a proxy or after a
//! restart. Every start and restart in this module ends with one of these probes.

use std::time::{Duration, Instant};

use anyhow::bail;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};

/// Retries a real PostgreSQL connection + `SELECT 1` until it works.
pub(super) async fn wait_for_postgres(url: &str, timeout: Duration) -> anyhow::Result<()> {
    // Scoped: its blanket `load`/`execute` would shadow inherent methods elsewhere.
    use diesel_async::RunQueryDsl as _;
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut conn = AsyncPgConnection::establish(url).await?;
            diesel::sql_query("SELECT 1").execute(&mut conn).await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) if Instant::now() >= deadline => {
                return Err(err.context(format!(
                    "PostgreSQL did not accept connections within {timeout:?}"
                )));
            }
            Err(_) if Instant::now() >= deadline => {
                bail!("PostgreSQL did not answer within {timeout:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Retries a real AMQP connection until it works, then closes it.
pub(super) async fn wait_for_rabbitmq(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let conn =
                lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
            let _ = conn.close(200, "readiness probe".into()).await;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) if Instant::now() >= deadline => {
                return Err(err.context(format!(
                    "RabbitMQ did not accept AMQP connections within {timeout:?}"
                )));
            }
            Err(_) if Instant::now() >= deadline => {
                bail!("RabbitMQ did not answer within {timeout:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
