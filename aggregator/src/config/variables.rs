//! Every configuration variable, declared ONCE: its name (a constant the parser and the
//! rest of the service use), its default and its meaning. The README's configuration
//! table and `vote-aggregator --help` are rendered from [`VARIABLES`] (a unit test keeps
//! the README's copy identical; `vote-aggregator config-table` prints it).

/// One environment variable of the service.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    /// Its name.
    pub name: &'static str,
    /// The variable naming a file that holds the value instead (for secrets), if any.
    pub file_variant: Option<&'static str>,
    /// What applies when it is not set.
    pub default: DefaultValue,
    /// What it does and which values are allowed (Markdown: `code` in backticks).
    pub meaning: &'static str,
}

/// The default of a [`Variable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// No default: start-up fails without it.
    Required,
    /// This literal value.
    Value(&'static str),
    /// Derived from something else (described in words).
    Derived(&'static str),
}

/// Declares the variable-name constants and [`VARIABLES`] from one entry per variable:
/// `NAME [/ NAME_FILE] = default, "meaning";`.
macro_rules! variables {
    ($( $name:ident $(/ $file:ident)? = $default:expr, $meaning:literal; )*) => {
        $(
            #[doc = $meaning]
            pub const $name: &str = stringify!($name);
            $(
                #[doc = concat!("A file holding the value of `", stringify!($name), "`.")]
                pub const $file: &str = stringify!($file);
            )?
        )*

        /// Every variable, in the order the README and `--help` list them.
        pub const VARIABLES: &[Variable] = &[
            $( Variable {
                name: $name,
                file_variant: variables!(@file $($file)?),
                default: $default,
                meaning: $meaning,
            }, )*
        ];
    };
    (@file) => { None };
    (@file $file:ident) => { Some($file) };
}

use DefaultValue::{Derived, Required, Value};

variables! {
    DATABASE_URL / DATABASE_URL_FILE = Required,
        "PostgreSQL URL, or a file holding it (not both); TLS from its `sslmode`, `sslrootcert`, `sslcert`, `sslkey` parameters (default `sslmode=prefer`: the server is not authenticated; see TLS to PostgreSQL)";
    AMQP_URL / AMQP_URL_FILE = Required,
        "RabbitMQ URL such as `amqp://user:pass@host:5672/%2f`, or a file holding it (not both); for a cluster, every node's URL separated by commas, all `amqp://` or all `amqps://` (each replica tries them in its own random order and moves to the next when one fails; see Broker cluster)";
    QUEUE_NAME = Value(super::DEFAULT_QUEUE_NAME),
        "queue consumed (1–200 printable characters, not starting with `amq.`); dead letters go to `<QUEUE_NAME>.dlq`";
    QUEUE_TYPE = Value("quorum"),
        "`quorum` or `classic`; must match an existing queue";
    BATCH_SIZE = Value("500"),
        "votes per transaction (1–10000)";
    BATCH_TIMEOUT_MS = Value("50"),
        "a partial batch is committed after this many milliseconds (1–60000)";
    PREFETCH_COUNT = Derived("2 × `BATCH_SIZE`"),
        "unacked deliveries in flight (`BATCH_SIZE`–65535): the next batch fills while one commits";
    DB_POOL_SIZE = Value("4"),
        "PostgreSQL connections of the batch pool (1–100); the results relay has one more of its own (`RESULTS_RELAY=true`)";
    TALLY_SHARDS = Value("16"),
        "rows each candidate's counter is spread over, for less contention between replicas (1–1024)";
    METRICS_ADDR = Value("0.0.0.0:8001"),
        "listen address of `/metrics`, `/healthz`, `/readyz` (port 0 = any free port)";
    LOG_FORMAT = Value("text"),
        "`text` or `json`";
    RUST_LOG = Value("info"),
        "log filter, e.g. `vote_aggregator=debug,info`";
    SHUTDOWN_GRACE_SECONDS = Value("25"),
        "time allowed on SIGTERM to finish the batch in hand (1–3600; a dead-letter publish stalled by a broker alarm can use it up: the process then exits 1 and the batch is redelivered)";
    RUN_MIGRATIONS = Value("true"),
        "`run` applies pending migrations first (`true` or `false`)";
    TALLY_CHECK_INTERVAL_SECONDS = Value("900"),
        "seconds between this replica's tally checks (the `verify` check, a scan of `votes`) whose result is the `vote_aggregator_tally_drift` gauge (0–86400; 0 = off)";
    AMQP_HEARTBEAT_SECONDS = Value("10"),
        "heartbeat asked of the broker when the URL sets none (0–600; 0 = off)";
    AMQP_CA_FILE = Derived("the system's CAs"),
        "PEM file of the CA certificates an `amqps://` broker's certificate must chain to, trusted besides the system's (the service image has none); the host name in `AMQP_URL` must be in the certificate. Only with `amqps://`";
    AMQP_CLIENT_CERT_FILE = Derived("none"),
        "PEM client certificate (leaf first, then intermediates) presented to an `amqps://` broker; needs `AMQP_CLIENT_KEY_FILE`";
    AMQP_CLIENT_KEY_FILE = Derived("none"),
        "unencrypted PEM private key of `AMQP_CLIENT_CERT_FILE` (PKCS#8, PKCS#1 or SEC1); needs `AMQP_CLIENT_CERT_FILE`";
    REPLICA_ID = Derived("host name + pid"),
        "names the replica in consumer tags, connection names and logs (1–100 characters of `A-Z a-z 0-9 . _ : -`)";
    DB_STATEMENT_TIMEOUT_MS = Value("10000"),
        "`statement_timeout` of every service session (100–3600000)";
    DB_LOCK_TIMEOUT_MS = Value("5000"),
        "`lock_timeout` of every service session (100–3600000, ≤ the statement timeout)";
    DB_IDLE_IN_TRANSACTION_TIMEOUT_MS = Value("10000"),
        "`idle_in_transaction_session_timeout` of every service session (100–3600000)";
    RESULTS_RELAY = Value("true"),
        "publish committed results events from the outbox to the `votes.results` exchange (`true` or `false`; with `false` other replicas relay, and the outbox grows if none does; see docs/RESULTS.md)";
    RESULTS_RELAY_BATCH_SIZE = Value("200"),
        "results events the relay claims, publishes and deletes per round (1–10000)";
    DB_ATTEMPT_TIMEOUT_MS = Value("30000"),
        "client-side limit of one batch attempt (100–3600000, > the statement timeout); the attempt is then cancelled on the server and retried";
}

/// The configuration table of the README, in Markdown (one line per variable).
pub fn markdown_table() -> String {
    let mut out = String::from("| variable | default | meaning |\n| --- | --- | --- |\n");
    for v in VARIABLES {
        let name = match v.file_variant {
            Some(file) => format!("`{}` / `{file}`", v.name),
            None => format!("`{}`", v.name),
        };
        let default = match v.default {
            Required => "required".to_string(),
            Value(value) => format!("`{value}`"),
            Derived(words) => words.to_string(),
        };
        out.push_str(&format!("| {name} | {default} | {} |\n", v.meaning));
    }
    out
}

/// The list `--help` ends with: every variable, its default and meaning, as plain text.
pub fn help_text() -> String {
    let plain = |s: &str| s.replace('`', "");
    let mut out = String::from(
        "Environment variables (a .env file in the working directory is read too; real variables win):\n",
    );
    for v in VARIABLES {
        let name = match v.file_variant {
            Some(file) => format!("{} or {file}", v.name),
            None => v.name.to_string(),
        };
        let default = match v.default {
            Required => "required".to_string(),
            Value(value) => format!("default {value}"),
            Derived(words) => format!("default {}", plain(words)),
        };
        out.push_str(&format!(
            "  {name} ({default})\n      {}\n",
            plain(v.meaning)
        ));
    }
    out
}

/// The markers around the rendered table in README.md.
pub const README_BEGIN: &str = "<!-- config-table:begin -->";
/// See [`README_BEGIN`].
pub const README_END: &str = "<!-- config-table:end -->";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_holds_exactly_the_rendered_table() {
        let inside = crate::readme_between(README_BEGIN, README_END);
        assert_eq!(
            inside,
            markdown_table().trim_end(),
            "README.md's configuration table differs from config::variables::VARIABLES: \
             paste the output of `vote-aggregator config-table` between the markers"
        );
    }

    #[test]
    fn names_are_unique_and_file_variants_follow_their_variable() {
        let mut seen = std::collections::HashSet::new();
        for v in VARIABLES {
            assert!(seen.insert(v.name), "{} twice", v.name);
            if let Some(file) = v.file_variant {
                assert_eq!(file, format!("{}_FILE", v.name));
            }
        }
    }

    #[test]
    fn help_lists_every_variable() {
        let help = help_text();
        for v in VARIABLES {
            assert!(help.contains(v.name), "{}", v.name);
        }
        assert!(!help.contains('`'));
    }
}
