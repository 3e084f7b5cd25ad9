//! What a fleet runs: one [`ReplicaSpec`] per replica (name and own environment) and the
//! [`FleetOptions`] shared by all (binary, log directory, base environment, readiness
//! bound), with the rule for valid replica names.

use std::path::PathBuf;
use std::time::Duration;

use super::binary::aggregator_binary;

/// One replica to run: its name and the environment it adds to the fleet's base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// Replica name: `REPLICA_ID` and the log file's stem. 1–100 characters of
    /// `A-Z a-z 0-9 . _ : -`, unique in the fleet.
    pub name: String,
    /// Variables set on top of [`FleetOptions::base_env`] (e.g. `BATCH_SIZE`).
    pub env: Vec<(String, String)>,
}

impl ReplicaSpec {
    /// A replica with no environment of its own.
    pub fn new(name: impl Into<String>) -> Self {
        ReplicaSpec {
            name: name.into(),
            env: Vec::new(),
        }
    }

    /// Adds one variable to this replica's environment.
    #[must_use]
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// `n` replicas named `<prefix>-0` … `<prefix>-<n-1>`, without own environment.
    pub fn numbered(prefix: &str, n: usize) -> Vec<Self> {
        (0..n)
            .map(|i| ReplicaSpec::new(format!("{prefix}-{i}")))
            .collect()
    }
}

/// How a fleet runs its replicas.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// The `vote-aggregator` binary.
    pub binary: PathBuf,
    /// Directory of the per-replica logs (created if missing); also the replicas' working
    /// directory, so no stray `.env` file is picked up.
    pub log_dir: PathBuf,
    /// Environment of every replica (`DATABASE_URL`, `AMQP_URL`, `QUEUE_NAME`, …).
    /// `REPLICA_ID` and `METRICS_ADDR` here are overridden by the fleet.
    pub base_env: Vec<(String, String)>,
    /// How long a start or restart may take until `/readyz` answers 200.
    pub ready_timeout: Duration,
}

impl FleetOptions {
    /// Options with the binary from [`aggregator_binary`] and a 60 s ready timeout.
    ///
    /// # Errors
    /// When the binary cannot be found (see [`aggregator_binary`]).
    pub fn new(
        log_dir: impl Into<PathBuf>,
        base_env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        Ok(Self::with_binary(aggregator_binary()?, log_dir, base_env))
    }

    /// Options running `binary` (e.g. [`super::fault_injection_binary`]), 60 s ready timeout.
    pub fn with_binary(
        binary: PathBuf,
        log_dir: impl Into<PathBuf>,
        base_env: Vec<(String, String)>,
    ) -> Self {
        FleetOptions {
            binary,
            log_dir: log_dir.into(),
            base_env,
            ready_timeout: Duration::from_secs(60),
        }
    }
}

/// A replica name's characters: `A-Z a-z 0-9 . _ : -`.
pub(super) fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}
