//! PostgreSQL: the connection pool, migrations and the batch write; in-doubt COMMIT
//! resolution (`in_doubt`), the votes this process stored recently (`recent`, so a batch
//! can tell their duplicates without asking), the `verify` check ([`verify()`]), TLS ([`tls`]: every
//! session is opened there) and the schema's state before consuming ([`schema`]: pending
//! migrations, the runtime role) in submodules.
//!
//! The batch write, the heart of exactly-once counting, lives in `batch` (its
//! statements in `batch_sql`, the judging of rows it did not insert in `judge`).

use std::time::Duration;

use diesel::sql_types::BigInt;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::FutureExt as _;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{SessionTimeouts, redact_url};
use crate::error::DbError;

mod batch;
mod batch_sql;
pub mod drift_check;
mod in_doubt;
mod judge;
mod open_errors;
pub mod outbox;
pub mod recent;
pub mod schema;
pub mod tls;
pub mod txn;
mod verify;

pub use self::batch::{
    BatchColumns, BatchOutcome, DistinctRows, WriteFailure, write_batch, write_batch_attempt,
};
pub use self::in_doubt::{InDoubt, Resolution, resolve_in_doubt};
pub use self::recent::{RecentlyStored, StoreIdentity};
pub use self::tls::{PgConnector, SslMode};
pub use self::verify::{TallyDrift, VerifyReport, verify};

/// The hasher of the maps and sets keyed by vote UUID on the hot path (a batch's rows,
/// the memory of recent votes): foldhash, a few times cheaper than the standard SipHash
/// for a 16-byte key (with the copies it replaced, filling a batch of 500 and remembering
/// it went from about 386 to 108 ns per vote: `examples/batch_memory_cost.rs`). It is seeded at random per map, which defeats prepared
/// collisions, though not an attacker who can observe our hash tables; and these maps
/// are bounded (a batch; `VOTES_REMEMBERED` votes), so even a flood of collisions
/// would only slow a replica, never change a count.
type UuidHasher = foldhash::fast::RandomState;

/// The schema, compiled into the binary from `migrations/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

/// Advisory lock key held while migrating ("votesmig" in ASCII), so replicas starting
/// together apply migrations one at a time.
const MIGRATION_LOCK_KEY: i64 = 0x766f_7465_736d_6967;

/// How long a pool checkout (including connecting) may take before it counts as a
/// connection failure.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of PostgreSQL connections.
pub type PgPool = Pool<AsyncPgConnection>;

/// `application_name` of the service's sessions (unless the URL sets one), so operators
/// (and the chaos suite's `pg_terminate_backend`) can tell the replicas' sessions apart.
pub const APPLICATION_NAME: &str = crate::SERVICE_NAME;

/// `application_name` of the results relay's session (see [`with_application_name`]).
pub const RELAY_APPLICATION_NAME: &str = "vote-aggregator-results-relay";

/// `url` with `application_name=name` unless it sets one (appended: every other pair is
/// kept byte for byte).
pub fn with_application_name(url: &SecretString, name: &str) -> SecretString {
    let raw = url.expose_secret();
    let has =
        url::Url::parse(raw).is_ok_and(|u| u.query_pairs().any(|(k, _)| k == "application_name"));
    if has {
        return url.clone();
    }
    let sep = if raw.contains('?') { '&' } else { '?' };
    SecretString::from(format!("{raw}{sep}application_name={name}"))
}

/// The URL the service's sessions connect with: the operator's URL plus
/// `application_name` (unless set) and, through the startup `options` parameter (no extra
/// round trip), the settings every session pins:
/// - `synchronous_commit=on`: a COMMIT returns only once its WAL is flushed, so an ack
///   after COMMIT never covers a vote a server crash could still lose (a database or
///   role default of `off` is overridden);
/// - with `timeouts` (the service's pool): `statement_timeout`, `lock_timeout` and
///   `idle_in_transaction_session_timeout`, so a session the client gave up on cannot
///   keep its locks on the server. Migrations and `verify` pass `None`: they may wait
///   for the migration lock or scan for longer.
///
/// Operator `options` in the URL are kept; these settings are appended after them and so
/// win.
pub fn session_url(url: &str, timeouts: Option<&SessionTimeouts>) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return url.to_string();
    };
    // Every other query pair is kept byte for byte: libpq-style parsers percent-decode
    // but do not read '+' as a space, so re-encoding them could change a value.
    let query = u.query().unwrap_or_default().to_string();
    let mut kept: Vec<String> = Vec::new();
    let mut options = Vec::new();
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        match piece.split_once('=') {
            Some(("options", value)) => {
                options.push(
                    percent_encoding::percent_decode_str(value)
                        .decode_utf8_lossy()
                        .into_owned(),
                );
            }
            _ => kept.push(piece.to_string()),
        }
    }
    if !kept.iter().any(|p| p.starts_with("application_name=")) {
        kept.push(format!("application_name={APPLICATION_NAME}"));
    }
    options.push(format!("-c synchronous_commit={}", synchronous_commit()));
    if let Some(t) = timeouts {
        options.push(format!(
            "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
            t.statement.as_millis(),
            t.lock.as_millis(),
            t.idle_in_transaction.as_millis()
        ));
    }
    let options = options.join(" ");
    let encoded =
        percent_encoding::utf8_percent_encode(&options, percent_encoding::NON_ALPHANUMERIC);
    kept.push(format!("options={encoded}"));
    u.set_query(Some(&kept.join("&")));
    u.to_string()
}

/// `on`, except in the deliberately broken fault-injection build that proves the chaos
/// suite catches a server crash losing acked commits.
fn synchronous_commit() -> &'static str {
    #[cfg(feature = "fault-injection")]
    if crate::fault::synchronous_commit_off() {
        return "off";
    }
    "on"
}

/// Builds the pool without connecting: the service starts (and reports `/readyz` 503)
/// even while PostgreSQL is down, and connects when it comes back. Every session sets
/// `timeouts` (see [`session_url`]) and is opened by [`PgConnector`] (TLS as the URL's
/// `sslmode` says). A URL whose TLS settings do not load (which `Config::from_lookup`
/// refuses at start-up) makes every checkout fail with that one line. Why a session
/// could not be opened is logged (`open_errors`).
pub fn pool(url: &SecretString, size: u32, timeouts: &SessionTimeouts) -> PgPool {
    let target = session_url(url.expose_secret(), Some(timeouts));
    let connector = PgConnector::from_url(&target)
        .map(|c| c.shown_as(url.expose_secret()))
        .map_err(|e| e.to_string());
    let mut config = ManagerConfig::default();
    config.custom_setup = Box::new(move |_url| {
        let connector = connector.clone();
        async move {
            match connector {
                Ok(c) => c
                    .connect()
                    .await
                    .map_err(|e| diesel::result::ConnectionError::BadConnection(e.to_string())),
                Err(line) => Err(diesel::result::ConnectionError::BadConnection(line)),
            }
        }
        .boxed()
    });
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(target, config);
    Pool::builder()
        .max_size(size)
        .connection_timeout(CHECKOUT_TIMEOUT)
        .test_on_check_out(false)
        .error_sink(Box::new(open_errors::LogOpenErrors::default()))
        .build_unchecked(manager)
}

/// Opens one session outside the pool (migrations, `verify`) with the settings
/// [`session_url`] pins (no timeouts).
///
/// # Errors
/// TLS settings that do not load (which the configuration check refuses earlier) as
/// [`DbError::Connect`]; connection failures as [`PgConnector::connect`] reports them.
pub async fn connect_one(url: &SecretString) -> Result<AsyncPgConnection, DbError> {
    let target = session_url(url.expose_secret(), None);
    let connector = PgConnector::from_url(&target).map_err(|e| DbError::Connect {
        url: redact_url(url.expose_secret()),
        reason: e.to_string(),
    })?;
    connector.shown_as(url.expose_secret()).connect().await
}

type PooledConn<'a> = bb8::PooledConnection<'a, AsyncDieselConnectionManager<AsyncPgConnection>>;

async fn checkout<'a>(pool: &'a PgPool, url: &SecretString) -> Result<PooledConn<'a>, DbError> {
    pool.get().await.map_err(|e| DbError::Connect {
        url: redact_url(url.expose_secret()),
        reason: e.to_string(),
    })
}

/// Applies pending migrations under a session advisory lock. Returns the versions
/// applied (empty when the schema was current).
///
/// # Errors
/// [`DbError::Connect`] when PostgreSQL cannot be reached,
/// [`DbError::MigrationNotPermitted`] when the user may not change the schema (a runtime
/// role), [`DbError::Migration`] when a migration fails (the failed migration's
/// transaction is rolled back).
pub async fn run_migrations(url: &SecretString) -> Result<Vec<String>, DbError> {
    let conn = connect_one(url).await?;
    // diesel_migrations is synchronous; the wrapper drives the async connection from a
    // blocking thread (on this runtime, which keeps driving the session's socket).
    tokio::task::spawn_blocking(move || {
        let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
        let lock =
            diesel::sql_query("SELECT pg_advisory_lock($1)").bind::<BigInt, _>(MIGRATION_LOCK_KEY);
        diesel::RunQueryDsl::execute(lock, &mut conn)?;
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map(|versions| versions.iter().map(ToString::to_string).collect())
            .map_err(|e| DbError::Migration(e.to_string()));
        // Closing the session releases the lock anyway; unlock explicitly to be prompt.
        let unlock = diesel::sql_query("SELECT pg_advisory_unlock($1)")
            .bind::<BigInt, _>(MIGRATION_LOCK_KEY);
        let _ = diesel::RunQueryDsl::execute(unlock, &mut conn);
        applied
    })
    .await
    .map_err(|e| DbError::Migration(format!("migration task failed: {e}")))?
    .map_err(|e| schema::classify_migration_error(url.expose_secret(), e))
}

/// Cheap liveness query through the pool.
///
/// # Errors
/// [`DbError`] when no connection can be had or the query fails.
pub async fn ping(pool: &PgPool, url: &SecretString) -> Result<(), DbError> {
    let mut conn = checkout(pool, url).await?;
    diesel::sql_query("SELECT 1").execute(&mut conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_url_pins_settings_after_the_operators_options() {
        let url = session_url(
            "postgres://u:p@db/votes?options=-c%20work_mem%3D8MB&sslmode=disable&password=a+b",
            Some(&SessionTimeouts::default()),
        );
        assert!(url.contains("sslmode=disable"), "{url}");
        assert!(
            url.contains("password=a+b"),
            "other pairs are kept as written: {url}"
        );
        assert!(url.contains("application_name=vote-aggregator"), "{url}");
        let options = url::Url::parse(&url)
            .expect("url")
            .query_pairs()
            .find(|(k, _)| k == "options")
            .map(|(_, v)| v.into_owned())
            .expect("options");
        assert_eq!(
            options,
            "-c work_mem=8MB -c synchronous_commit=on -c statement_timeout=10000 \
             -c lock_timeout=5000 -c idle_in_transaction_session_timeout=10000"
        );
        let relay =
            with_application_name(&SecretString::from("postgres://db/v?sslmode=disable"), "r");
        assert_eq!(
            relay.expose_secret(),
            "postgres://db/v?sslmode=disable&application_name=r"
        );
        let bare = session_url("postgres://db/votes?application_name=mine", None);
        assert!(bare.contains("application_name=mine") && !bare.contains("statement_timeout"));
    }
}
