//! Error types of the library.
//!
//! Policy:
//! - Library code returns these `thiserror` enums; only the binaries (the service's and
//!   `vote-tools`) and the test code use `anyhow`.
//! - Every message is ONE line that says what is wrong and, where the operator can act,
//!   what to do. The binary prints it as is.
//! - No message ever contains a credential: URLs pass through [`crate::config::redact_url`].
//! - Transient faults (a broker or database that went away) are NOT errors of `run`: the
//!   service retries them with backoff and reports them in metrics and logs. `run` fails
//!   only on what retrying cannot fix (bad configuration, a queue declared with other
//!   arguments, a port already in use, a grace period that ran out).

use std::net::SocketAddr;

/// A configuration variable is missing or invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is absent.
    #[error("{key} is not set: set {key} or {key}_FILE")]
    Missing { key: String },
    /// Both `KEY` and `KEY_FILE` are set.
    #[error("both {key} and {key}_FILE are set: set only one")]
    BothSet { key: String },
    /// A value does not parse or is out of range.
    #[error("invalid {key}=\"{value}\": expected {allowed}")]
    Invalid {
        key: String,
        value: String,
        allowed: String,
    },
    /// A `*_FILE` variable names a file that cannot be read.
    #[error("cannot read {key}=\"{path}\": {reason}")]
    File {
        key: String,
        path: String,
        reason: String,
    },
    /// A parameter inside a URL (e.g. `sslmode` in `DATABASE_URL`) is invalid or names a
    /// file that cannot be used. `detail` names the parameter and its value (never a
    /// secret).
    #[error("invalid {key}: {detail}; {fix}")]
    UrlParameter {
        key: String,
        detail: String,
        fix: String,
    },
    /// The `.env` file exists but cannot be parsed.
    #[error("cannot read .env: {0}")]
    DotEnv(String),
    /// A variable that needs another one, or contradicts it (a TLS file for a plain URL).
    #[error("{key} {problem}: {fix}")]
    Conflict {
        key: String,
        problem: String,
        fix: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(key: &str, value: &str, allowed: &str) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            value: value.into(),
            allowed: allowed.into(),
        }
    }
}

/// Database failures.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had from the pool (server down, wrong credentials, ...).
    #[error(
        "cannot connect to PostgreSQL at {url}: {reason} (check DATABASE_URL and that the server is up)"
    )]
    Connect { url: String, reason: String },
    /// The session failed for a reason the TLS settings decide (certificate not trusted
    /// or not for this host, no TLS on the server, client certificate missing or refused).
    #[error("cannot connect to PostgreSQL at {url} with sslmode={mode}: {reason}; {fix}")]
    ConnectTls {
        url: String,
        mode: &'static str,
        reason: String,
        fix: String,
    },
    /// A statement failed.
    #[error("PostgreSQL query failed: {0}")]
    Query(#[from] diesel::result::Error),
    /// Applying migrations failed.
    #[error("migrations failed: {0}")]
    Migration(String),
    /// The user may not change the schema (a runtime role): migrations belong to the
    /// schema's owner.
    #[error(
        "PostgreSQL user {user} may not apply migrations ({reason}): run `vote-aggregator migrate` with the schema owner's DATABASE_URL, and start replicas that log in with a runtime role with RUN_MIGRATIONS=false"
    )]
    MigrationNotPermitted { user: String, reason: String },
    /// A batch attempt took longer than `DB_ATTEMPT_TIMEOUT_MS`; it was cancelled on the
    /// server and is retried.
    #[error(
        "PostgreSQL did not finish a batch within {ms} ms (DB_ATTEMPT_TIMEOUT_MS); cancelled it on the server and retrying (look for locks held by other sessions)"
    )]
    Timeout { ms: u64 },
    /// An earlier attempt's COMMIT is still running on the server; its outcome decides
    /// whether the batch must be written again.
    #[error(
        "the previous attempt's COMMIT (transaction {xid}) is still in progress on PostgreSQL; asking again"
    )]
    CommitInProgress { xid: i64 },
    /// PostgreSQL's answer to a batch statement does not fit the batch (a broken
    /// invariant, e.g. a stored vote removed): nothing is committed and the batch is
    /// retried, never acked on that answer.
    #[error(
        "PostgreSQL's answer to a batch does not match it ({what}); rolled back and retrying, nothing acked (check for triggers, rules or grants on votes changed by hand)"
    )]
    BatchAnswer { what: String },
}

impl DbError {
    /// Whether retrying the same work later may succeed (connection-level faults and
    /// concurrency aborts), as opposed to a bug or a schema problem.
    pub fn is_transient(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as K, Error as E};
        match self {
            DbError::Connect { .. }
            | DbError::ConnectTls { .. }
            | DbError::Timeout { .. }
            | DbError::CommitInProgress { .. } => true,
            DbError::Query(E::DatabaseError(kind, info)) => {
                matches!(
                    kind,
                    K::SerializationFailure | K::ClosedConnection | K::UnableToSendCommand
                ) || {
                    let m = info.message();
                    // deadlock, admin termination, and the session's own statement_timeout
                    // / lock_timeout (a lock held elsewhere: waiting may fix it).
                    m.contains("deadlock")
                        || m.contains("terminating connection")
                        || m.contains("canceling statement due to")
                }
            }
            DbError::Query(E::BrokenTransactionManager) => true,
            DbError::Query(_) => false,
            DbError::Migration(_)
            | DbError::MigrationNotPermitted { .. }
            | DbError::BatchAnswer { .. } => false,
        }
    }
}

/// Broker failures.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The connection or a channel failed (retried with backoff by the service).
    #[error("RabbitMQ at {url}: {source}")]
    Amqp {
        url: String,
        #[source]
        source: lapin::Error,
    },
    /// The queue exists with arguments other than the ones this replica declares.
    /// Retrying cannot fix this, so start-up stops.
    #[error("queue '{queue}' already exists with other arguments ({detail}); fix: {fix}")]
    QueueMismatch {
        queue: String,
        detail: String,
        fix: String,
    },
    /// The broker refused the credentials.
    #[error("RabbitMQ at {url} refused the credentials: check the user and password in AMQP_URL")]
    AuthRefused { url: String },
    /// The user logged in but lacks a permission the topology needs.
    #[error(
        "RabbitMQ at {url} refused {detail}: grant the AMQP_URL user the permissions listed under \"RabbitMQ permissions\" in the README"
    )]
    PermissionRefused { url: String, detail: String },
    /// The TLS handshake failed on something retrying cannot fix (the broker's certificate
    /// or host name, a missing client certificate, a server without TLS).
    #[error("RabbitMQ at {url}: TLS failed: {reason}; fix: {fix}")]
    Tls {
        url: String,
        reason: String,
        fix: String,
    },
}

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A database failure that retrying cannot fix.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A broker failure that retrying cannot fix.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The HTTP endpoint could not bind.
    #[error("cannot listen on METRICS_ADDR={addr}: {reason}; choose a free port")]
    Bind { addr: SocketAddr, reason: String },
    /// Shutdown did not finish in time; unacked deliveries go back to the queue.
    #[error(
        "shutdown grace period of {seconds}s ran out with a batch not yet committed; its messages stay unacked and the broker redelivers them (raise SHUTDOWN_GRACE_SECONDS if this repeats)"
    )]
    ShutdownTimeout { seconds: u64 },
    /// The service task panicked (a bug: please report it with the logs).
    #[error("internal error: the service task stopped unexpectedly: {0}")]
    Panicked(String),
}
