//! Typed configuration of the service, read once at start-up from the environment.
//!
//! Every setting is an environment variable (a `.env` file in the working directory is
//! read first when present; real environment variables win). A bad value stops start-up
//! with ONE line naming the variable, the value and what is allowed. Secrets (the two
//! connection URLs, which carry passwords) are held in [`SecretString`] and only ever
//! shown through [`redact_url`].
//!
//! The variables, their defaults and meanings are declared once in [`variables`]
//! ([`VARIABLES`]); the README's table and `--help` are rendered from there.
//!
//! Keep one struct, one parser ([`Config::from_lookup`], pure: tested with a map), one
//! table: new settings go into all three here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::error::ConfigError;

mod amqp_nodes;
mod amqp_tls;
mod key_file;
mod redact;
pub mod variables;

pub use self::amqp_nodes::{NODE_SEPARATOR, node_address, node_urls};
pub use self::amqp_tls::{AmqpTls, ClientIdentity};
pub use self::key_file::exposure_warning;
use self::redact::hides_credentials;
pub use self::redact::redact_url;
pub use self::variables::VARIABLES;
use self::variables::*;

/// Name of the default queue, from the contract (docs/DESIGN.md).
pub const DEFAULT_QUEUE_NAME: &str = "votes.aggregation";

/// RabbitMQ queue type of the votes queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated Raft queue: the production default (survives a broker node loss).
    Quorum,
    /// Single-node queue: faster, allowed for development and benchmarks.
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

impl FromStr for QueueType {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim().to_ascii_lowercase().as_str() {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            _ => Err(()),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(()),
        }
    }
}

/// Everything the service needs to run. Build it with [`Config::from_env`] in the
/// binary, or fill it directly in tests (`Config::new` gives the defaults).
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL connection URL (secret: carries the password).
    pub database_url: SecretString,
    /// RabbitMQ connection URL, or the URLs of several nodes of one cluster separated by
    /// [`NODE_SEPARATOR`] (secret: carries the password); [`node_urls`] splits it.
    pub amqp_url: SecretString,
    /// Queue consumed; the dead-letter queue is `<queue_name>.dlq`.
    pub queue_name: String,
    /// Queue type declared (and expected of an existing queue).
    pub queue_type: QueueType,
    /// Votes per transaction.
    pub batch_size: usize,
    /// A partial batch is flushed after this long.
    pub batch_timeout: Duration,
    /// Broker prefetch (unacked deliveries in flight).
    pub prefetch_count: u16,
    /// Database pool size.
    pub db_pool_size: u32,
    /// Shards per tally counter.
    pub tally_shards: u16,
    /// Address of the HTTP endpoint (metrics, health).
    pub metrics_addr: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// Time allowed on SIGTERM to finish the batch in hand.
    pub shutdown_grace: Duration,
    /// Apply pending migrations before consuming.
    pub run_migrations: bool,
    /// Heartbeat asked of the broker when the URL does not set one (`None` = off).
    pub amqp_heartbeat: Option<u16>,
    /// Extra CAs and client certificate of `amqps://` connections.
    pub amqp_tls: AmqpTls,
    /// Name of this replica (consumer tag, connection name, logs).
    pub replica_id: String,
    /// Server-side limits every service session sets (see [`SessionTimeouts`]).
    pub db_timeouts: SessionTimeouts,
    /// Client-side limit of one batch attempt (checkout, statement and COMMIT); longer
    /// than the server-side statement timeout, so the server normally ends a stuck attempt
    /// first. When it fires, the attempt is cancelled on the server too.
    pub db_attempt_timeout: Duration,
    /// Time between the replica's tally checks (see `db::drift_check`); `None` = off.
    pub tally_check_interval: Option<Duration>,
    /// Run the results relay (see `results::relay`).
    pub results_relay: bool,
    /// Results events per relay round.
    pub results_relay_batch: usize,
}

/// Timeouts set on every PostgreSQL session of the service, so an abandoned or stuck
/// attempt can never keep locks (and a backend) on the server after the client gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimeouts {
    /// `statement_timeout`: longest a statement may run.
    pub statement: Duration,
    /// `lock_timeout`: longest a statement may wait for a lock (tally rows held by a
    /// stuck session elsewhere).
    pub lock: Duration,
    /// `idle_in_transaction_session_timeout`: a session left idle inside a transaction is
    /// terminated, releasing its locks.
    pub idle_in_transaction: Duration,
}

impl Default for SessionTimeouts {
    fn default() -> Self {
        SessionTimeouts {
            statement: Duration::from_secs(10),
            lock: Duration::from_secs(5),
            idle_in_transaction: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// A configuration with every default and the two given URLs.
    pub fn new(database_url: impl Into<String>, amqp_url: impl Into<String>) -> Self {
        Config {
            database_url: SecretString::from(database_url.into()),
            amqp_url: SecretString::from(amqp_url.into()),
            queue_name: DEFAULT_QUEUE_NAME.to_string(),
            queue_type: QueueType::Quorum,
            batch_size: 500,
            batch_timeout: Duration::from_millis(50),
            prefetch_count: 1000,
            db_pool_size: 4,
            tally_shards: 16,
            metrics_addr: DEFAULT_METRICS_ADDR,
            log_format: LogFormat::Text,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            run_migrations: true,
            amqp_heartbeat: Some(10),
            amqp_tls: AmqpTls::default(),
            replica_id: default_replica_id(),
            db_timeouts: SessionTimeouts::default(),
            db_attempt_timeout: Duration::from_secs(30),
            tally_check_interval: Some(Duration::from_secs(900)),
            results_relay: true,
            results_relay_batch: 200,
        }
    }

    /// Name of the dead-letter queue that goes with [`Config::queue_name`].
    pub fn dead_letter_queue(&self) -> String {
        crate::broker::dead_letter_queue(&self.queue_name)
    }

    /// Reads the configuration from the process environment (after loading `.env` when
    /// present).
    ///
    /// # Errors
    /// [`ConfigError`] naming the first variable that is missing or invalid.
    pub fn from_env() -> Result<Self, ConfigError> {
        load_dotenv()?;
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads only `METRICS_ADDR` (for `healthcheck`, which needs no server URL): the
    /// configured address, or the default.
    ///
    /// # Errors
    /// [`ConfigError`] when it is not an IP:port.
    pub fn metrics_addr_from_env() -> Result<SocketAddr, ConfigError> {
        load_dotenv()?;
        let lookup = |key: &str| std::env::var(key).ok();
        Ok(metrics_addr(&Env(&lookup))?.unwrap_or(DEFAULT_METRICS_ADDR))
    }

    /// Reads only `DATABASE_URL` / `DATABASE_URL_FILE` (for `migrate` and `verify`,
    /// which need no broker).
    ///
    /// # Errors
    /// [`ConfigError`] when it is missing, set twice or not a PostgreSQL URL.
    pub fn database_url_from_env() -> Result<SecretString, ConfigError> {
        load_dotenv()?;
        let lookup = |key: &str| std::env::var(key).ok();
        Env(&lookup).database_url()
    }

    /// Reads the configuration through `lookup` (the environment in production, a map
    /// in tests).
    ///
    /// # Errors
    /// [`ConfigError`] naming the first variable that is missing or invalid.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let database_url = env.database_url()?;
        let amqp_url = amqp_nodes::from_env(&env)?;
        let mut config = Config::new(
            database_url.expose_secret().to_string(),
            amqp_url.expose_secret().to_string(),
        );

        if let Some(name) = env.get(QUEUE_NAME) {
            if name.is_empty()
                || name.len() > 200
                || name.starts_with("amq.")
                || name.chars().any(char::is_control)
            {
                return Err(ConfigError::invalid(
                    QUEUE_NAME,
                    &name,
                    "1-200 printable characters, not starting with 'amq.'",
                ));
            }
            config.queue_name = name;
        }
        if let Some(v) = env.get(QUEUE_TYPE) {
            config.queue_type = v
                .parse()
                .map_err(|()| ConfigError::invalid(QUEUE_TYPE, &v, "'quorum' or 'classic'"))?;
        }
        if let Some(n) = env.int(BATCH_SIZE, 1, 10_000)? {
            config.batch_size = n as usize;
        }
        if let Some(ms) = env.int(BATCH_TIMEOUT_MS, 1, 60_000)? {
            config.batch_timeout = Duration::from_millis(ms);
        }
        let default_prefetch = (config.batch_size * 2).min(u16::MAX as usize) as u64;
        let prefetch = env
            .int(PREFETCH_COUNT, 1, u16::MAX as u64)?
            .unwrap_or(default_prefetch);
        if (prefetch as usize) < config.batch_size {
            return Err(ConfigError::invalid(
                PREFETCH_COUNT,
                &prefetch.to_string(),
                &format!(
                    "at least {BATCH_SIZE} ({}), or a batch could never fill; about 2 x {BATCH_SIZE} keeps the next batch filling while one commits",
                    config.batch_size
                ),
            ));
        }
        config.prefetch_count = prefetch as u16;
        if let Some(n) = env.int(DB_POOL_SIZE, 1, 100)? {
            config.db_pool_size = n as u32;
        }
        if let Some(n) = env.int(TALLY_SHARDS, 1, 1024)? {
            config.tally_shards = n as u16;
        }
        if let Some(addr) = metrics_addr(&env)? {
            config.metrics_addr = addr;
        }
        if let Some(v) = env.get(LOG_FORMAT) {
            config.log_format = v
                .parse()
                .map_err(|()| ConfigError::invalid(LOG_FORMAT, &v, "'text' or 'json'"))?;
        }
        if let Some(s) = env.int(SHUTDOWN_GRACE_SECONDS, 1, 3600)? {
            config.shutdown_grace = Duration::from_secs(s);
        }
        if let Some(v) = env.get(RUN_MIGRATIONS) {
            config.run_migrations = parse_bool(&v)
                .ok_or_else(|| ConfigError::invalid(RUN_MIGRATIONS, &v, "true or false"))?;
        }
        if let Some(s) = env.int(TALLY_CHECK_INTERVAL_SECONDS, 0, 86_400)? {
            config.tally_check_interval = (s > 0).then(|| Duration::from_secs(s));
        }
        if let Some(v) = env.get(RESULTS_RELAY) {
            config.results_relay = parse_bool(&v)
                .ok_or_else(|| ConfigError::invalid(RESULTS_RELAY, &v, "true or false"))?;
        }
        if let Some(n) = env.int(RESULTS_RELAY_BATCH_SIZE, 1, 10_000)? {
            config.results_relay_batch = n as usize;
        }
        if let Some(s) = env.int(AMQP_HEARTBEAT_SECONDS, 0, 600)? {
            config.amqp_heartbeat = (s > 0).then_some(s as u16);
        }
        // Every node shares the first one's scheme (checked by `amqp_nodes`).
        let first_node = node_urls(&amqp_url)
            .into_iter()
            .next()
            .unwrap_or_else(|| amqp_url.clone());
        config.amqp_tls = amqp_tls::from_env(&env, first_node.expose_secret())?;
        if let Some(id) = env.get(REPLICA_ID) {
            if id.is_empty() || id.len() > 100 || !id.chars().all(valid_id_char) {
                return Err(ConfigError::invalid(
                    REPLICA_ID,
                    &id,
                    "1-100 characters of A-Z a-z 0-9 . _ : -",
                ));
            }
            config.replica_id = id;
        }
        let ms = |key: &str, default: Duration| -> Result<Duration, ConfigError> {
            Ok(env
                .int(key, 100, 3_600_000)?
                .map_or(default, Duration::from_millis))
        };
        let t = config.db_timeouts;
        config.db_timeouts = SessionTimeouts {
            statement: ms(DB_STATEMENT_TIMEOUT_MS, t.statement)?,
            lock: ms(DB_LOCK_TIMEOUT_MS, t.lock)?,
            idle_in_transaction: ms(DB_IDLE_IN_TRANSACTION_TIMEOUT_MS, t.idle_in_transaction)?,
        };
        config.db_attempt_timeout = ms(DB_ATTEMPT_TIMEOUT_MS, config.db_attempt_timeout)?;
        if config.db_timeouts.lock > config.db_timeouts.statement {
            return Err(ConfigError::invalid(
                DB_LOCK_TIMEOUT_MS,
                &config.db_timeouts.lock.as_millis().to_string(),
                &format!(
                    "at most {DB_STATEMENT_TIMEOUT_MS}, or the statement timeout ends a lock wait first"
                ),
            ));
        }
        if config.db_attempt_timeout <= config.db_timeouts.statement {
            return Err(ConfigError::invalid(
                DB_ATTEMPT_TIMEOUT_MS,
                &config.db_attempt_timeout.as_millis().to_string(),
                &format!(
                    "more than {DB_STATEMENT_TIMEOUT_MS} ({}), so the server ends a stuck statement before the client gives up",
                    config.db_timeouts.statement.as_millis()
                ),
            ));
        }
        Ok(config)
    }
}

/// Time allowed on SIGTERM unless `SHUTDOWN_GRACE_SECONDS` says otherwise; whatever stops
/// a replica (a container runtime's stop timeout) must wait longer.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// Where the HTTP endpoint listens unless `METRICS_ADDR` says otherwise.
pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8001);

/// `METRICS_ADDR` when set.
fn metrics_addr(env: &Env<'_>) -> Result<Option<SocketAddr>, ConfigError> {
    env.get(METRICS_ADDR)
        .map(|v| {
            v.parse().map_err(|_| {
                ConfigError::invalid(METRICS_ADDR, &v, "an IP:port such as 0.0.0.0:8001")
            })
        })
        .transpose()
}

/// Reads `RUST_LOG`-independent settings needed before the full config (log format),
/// so even a config error is printed in the chosen format.
pub fn log_format_from_env() -> LogFormat {
    std::env::var(LOG_FORMAT)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LogFormat::Text)
}

/// Loads `.env` from the working directory into the environment (real variables win).
/// A missing file is normal; a malformed one is the operator's mistake to hear about.
fn load_dotenv() -> Result<(), ConfigError> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(e) => Err(ConfigError::DotEnv(e.to_string())),
    }
}

struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    /// A set, non-blank variable, trimmed.
    fn get(&self, key: &str) -> Option<String> {
        (self.0)(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn int(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        match raw.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ConfigError::invalid(
                key,
                &raw,
                &format!("a whole number from {min} to {max}"),
            )),
        }
    }

    /// `DATABASE_URL` or `DATABASE_URL_FILE`, with its TLS settings checked (and the
    /// files they name read) now, so a bad one stops start-up.
    fn database_url(&self) -> Result<SecretString, ConfigError> {
        let url = self.secret_url(DATABASE_URL, DATABASE_URL_FILE, &["postgres", "postgresql"])?;
        crate::db::PgConnector::from_url(url.expose_secret())?;
        Ok(url)
    }

    /// `KEY` or `KEY_FILE` (exactly one), parsed as a URL with one of `schemes`.
    fn secret_url(
        &self,
        key: &str,
        file_key: &str,
        schemes: &[&str],
    ) -> Result<SecretString, ConfigError> {
        let raw = self.secret_raw(key, file_key)?;
        check_url(key, raw.expose_secret(), schemes)?;
        Ok(raw)
    }

    /// The value of `KEY`, or the trimmed content of the file `KEY_FILE` names (exactly
    /// one of them set).
    fn secret_raw(&self, key: &str, file_key: &str) -> Result<SecretString, ConfigError> {
        match (self.get(key), self.get(file_key)) {
            (Some(_), Some(_)) => Err(ConfigError::BothSet { key: key.into() }),
            (None, None) => Err(ConfigError::Missing { key: key.into() }),
            (Some(v), None) => Ok(SecretString::from(v)),
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                let content = std::fs::read_to_string(&path).map_err(|e| ConfigError::File {
                    key: file_key.to_string(),
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                Ok(SecretString::from(content.trim().to_string()))
            }
        }
    }
}

/// Checks that `raw` (the value of `key`) is a URL with one of `schemes` and a host, whose
/// user info a WHATWG parser reads as such.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `key` and showing the URL redacted.
fn check_url(key: &str, raw: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    match url::Url::parse(raw) {
        Ok(u) if hides_credentials(raw, &u) => Err(ConfigError::invalid(
            key,
            "<hidden>",
            "user name and password percent-encoded: '/', '?', '#' and '@' in them must be written %2F, %3F, %23, %40",
        )),
        Ok(u) if schemes.contains(&u.scheme()) && u.host_str().is_some() => Ok(()),
        _ => Err(ConfigError::invalid(
            key,
            &redact_url(raw),
            &format!("a URL of scheme {} with a host", schemes.join(" or ")),
        )),
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn valid_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && h.chars().all(valid_id_char))
        .unwrap_or_else(|| "replica".to_string());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests;
