//! One replica of a fleet as a process: spawning it with a clean environment and its log
//! as stdout/stderr, knowing whether it still runs (reaping it when it exited), and the
//! free ports the fleet gives replicas.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};

use anyhow::{Context, anyhow};
use tokio::process::{Child, Command};
use vote_aggregator::config::variables as var;

use super::logs::{self, LOG_TAIL_LINES, START_MARKER};
use super::spec::{FleetOptions, ReplicaSpec};
use crate::procinfo;

/// One replica: its spec, fixed address, log, and current process (if any).
#[derive(Debug)]
pub(super) struct Replica {
    pub(super) spec: ReplicaSpec,
    pub(super) addr: SocketAddr,
    pub(super) log_path: PathBuf,
    /// `Some` from spawn until reaped.
    pub(super) child: Option<Child>,
    /// `/proc/<pid>/stat` start time of the current child (tells a reused pid apart).
    pub(super) start_ticks: Option<u64>,
    pub(super) last_exit: Option<ExitStatus>,
    pub(super) starts: u32,
}

impl Replica {
    /// The pid of the current child, unless it was reaped or is a zombie.
    pub(super) fn live_pid(&self) -> Option<u32> {
        let pid = self.child.as_ref()?.id()?;
        procinfo::stat(pid).filter(|s| !s.is_zombie()).map(|_| pid)
    }

    pub(super) fn log_tail(&self) -> String {
        logs::log_tail(&self.log_path, LOG_TAIL_LINES)
    }

    /// Reaps the child if it exited; true while it runs (paused counts as running).
    pub(super) fn poll_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                self.last_exit = Some(status);
                self.child = None;
                self.start_ticks = None;
                false
            }
            Err(_) => false,
        }
    }

    pub(super) fn not_running(&self) -> anyhow::Error {
        match self.last_exit {
            Some(status) => anyhow!(
                "replica {} is not running (last exit: {status})",
                self.spec.name
            ),
            None => anyhow!("replica {} is not running", self.spec.name),
        }
    }

    /// Spawns this replica's process (no readiness wait).
    pub(super) fn spawn(&mut self, opts: &FleetOptions) -> anyhow::Result<()> {
        let r = self;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&r.log_path)
            .with_context(|| format!("cannot open log file {}", r.log_path.display()))?;
        r.starts += 1;
        writeln!(
            log,
            "{START_MARKER}{} of replica {} on {} at {} ---",
            r.starts,
            r.spec.name,
            r.addr,
            chrono::Utc::now().to_rfc3339()
        )
        .with_context(|| format!("cannot write log file {}", r.log_path.display()))?;
        let stderr = log
            .try_clone()
            .with_context(|| format!("cannot share log file {}", r.log_path.display()))?;
        let mut cmd = Command::new(&opts.binary);
        cmd.arg("run").env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        cmd.env(
            var::RUST_LOG,
            std::env::var_os(var::RUST_LOG).unwrap_or_else(|| "info".into()),
        )
        .envs(opts.base_env.iter().map(|(k, v)| (k, v)))
        .envs(r.spec.env.iter().map(|(k, v)| (k, v)))
        .env(var::REPLICA_ID, &r.spec.name)
        .env(var::METRICS_ADDR, r.addr.to_string())
        .current_dir(&opts.log_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| {
            format!(
                "cannot spawn {} for replica {}",
                opts.binary.display(),
                r.spec.name
            )
        })?;
        r.start_ticks = child.id().and_then(procinfo::stat).map(|s| s.start_ticks);
        r.child = Some(child);
        Ok(())
    }
}

/// `n` distinct free local ports (all listeners held until every port is picked).
pub(super) fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot find a free local port")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(8).expect("ports");
        assert_eq!(ports.iter().collect::<HashSet<_>>().len(), 8);
    }
}
