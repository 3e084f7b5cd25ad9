//! A replica fleet: several REAL `vote-aggregator` processes (the built binary, never
//! in-process tasks) run side by side against one database and queue, for the
//! integration tests, the chaos scenarios and the demo.
//!
//! This module owns the life of those processes and nothing else:
//! - spawning each replica with a clean environment (only `PATH` and `RUST_LOG` are
//!   inherited), its own `REPLICA_ID` and a fixed `METRICS_ADDR` port that it keeps across
//!   restarts, so a scraper or a dashboard never has to look the address up again;
//! - one log file per replica (`<log_dir>/<name>.log`, stdout and stderr, appended across
//!   restarts with a marker line per start), so a failing test can show what a replica said;
//! - real signals: SIGTERM ([`Fleet::stop`]), SIGKILL ([`Fleet::kill`]), SIGSTOP /
//!   SIGCONT ([`Fleet::pause`] / [`Fleet::resume`]), each checked against `/proc`, since
//!   the failure modes the service promises to survive are those of real processes
//!   (a frozen replica keeps its TCP connections open; a killed one does not commit);
//! - readiness (`/readyz` = 200) and scraping `/metrics` into a [`Scrape`].
//!
//! Signals other than SIGKILL are sent with the `kill` command (`kill -TERM <pid>`), which
//! keeps the workspace free of `unsafe` and of an extra dependency; SIGKILL goes through
//! Tokio's [`tokio::process::Child::start_kill`]. A pid is only ever signalled while its
//! child is not yet reaped, so it cannot have been reused by another process.
//!
//! Every child is spawned with `kill_on_drop`, and dropping a [`Fleet`] sends SIGKILL to
//! each replica still running, so a failing (panicking) test leaves no process behind.
//!
//! The binary is NOT built by `cargo test -p vote-testkit` (the kit only depends on the
//! aggregator's library): run `cargo build -p vote-aggregator` first, or point
//! `VOTE_AGGREGATOR_BIN` at a binary (see [`aggregator_binary`]). The chaos suite runs the
//! separate fault-injection build instead ([`fault_injection_binary`]).

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::inspect::http_get;

/// Environment variable naming the `vote-aggregator` binary to run (overrides the
/// lookup next to the current executable).
pub const BINARY_ENV: &str = "VOTE_AGGREGATOR_BIN";

/// Environment variable naming the fault-injection `vote-aggregator` binary.
pub const FAULT_BINARY_ENV: &str = "VOTE_AGGREGATOR_FAULT_BIN";

/// Folder of `target/<profile>/` that holds the fault-injection build.
pub const FAULT_BINARY_DIR: &str = "fault-injection";

/// The line the fleet writes into a replica's log before each start, followed by the
/// start's number.
pub const START_MARKER: &str = "--- vote-testkit fleet: start #";

/// How long [`Fleet::stop`] and [`Fleet::shutdown`] wait for a replica to exit after
/// SIGTERM (the service's own grace period defaults to 25 s).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Fleet::scrape`] waits for a `/metrics` answer (a paused replica accepts the
/// connection in the kernel but never answers).
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines of a replica's log quoted in errors.
const LOG_TAIL_LINES: usize = 20;

/// How long [`Fleet::pause`] / [`Fleet::resume`] wait for `/proc` to show the new state.
const SIGNAL_SETTLE: Duration = Duration::from_secs(5);

/// Where the ordinary `vote-aggregator` binary is: `VOTE_AGGREGATOR_BIN` when set,
/// otherwise `target/<profile>/vote-aggregator` found from the current executable (a test
/// binary lives in `target/<profile>/deps/`, an example in `target/<profile>/examples/`,
/// `vote-tools` in `target/<profile>/`).
///
/// # Errors
/// When the current executable cannot be located, or the binary does not exist (the
/// message says how to build it).
pub fn aggregator_binary() -> anyhow::Result<PathBuf> {
    binary(
        BINARY_ENV,
        "vote-aggregator",
        "cargo build -p vote-aggregator (same profile as this executable)",
    )
}

/// Where the fault-injection `vote-aggregator` binary is (only the chaos suite runs it):
/// `VOTE_AGGREGATOR_FAULT_BIN` when set, otherwise
/// `target/<profile>/fault-injection/vote-aggregator`, which `make fault-build` makes. It
/// lives apart so that no ordinary build ever contains the hooks.
///
/// # Errors
/// As [`aggregator_binary`].
pub fn fault_injection_binary() -> anyhow::Result<PathBuf> {
    binary(
        FAULT_BINARY_ENV,
        &format!("{FAULT_BINARY_DIR}/vote-aggregator"),
        "make fault-build",
    )
}

/// `env` when set (it must name a file), else `relative` under `target/<profile>/`.
fn binary(env: &str, relative: &str, build_hint: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "{env}={} does not name a file: point it at a built vote-aggregator, \
                 or unset it and build one with `{build_hint}`",
                path.display()
            );
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("cannot locate the current executable")?;
    let mut dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    if matches!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("deps" | "examples")
    ) {
        dir = dir.parent().unwrap_or(dir);
    }
    let path = dir.join(relative);
    if !path.is_file() {
        bail!(
            "the vote-aggregator binary is not at {}: build it with `{build_hint}`, or set \
             {env} to its path",
            path.display()
        );
    }
    Ok(path)
}

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

    /// Options running `binary` (e.g. [`fault_injection_binary`]), 60 s ready timeout.
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

#[derive(Debug)]
struct Replica {
    spec: ReplicaSpec,
    addr: SocketAddr,
    log_path: PathBuf,
    /// `Some` from spawn until reaped.
    child: Option<Child>,
    /// `/proc/<pid>/stat` start time of the current child (tells a reused pid apart).
    start_ticks: Option<u64>,
    last_exit: Option<ExitStatus>,
    starts: u32,
}

impl Replica {
    /// The pid of the current child, unless it was reaped or is a zombie.
    fn live_pid(&self) -> Option<u32> {
        let pid = self.child.as_ref()?.id()?;
        match proc_stat(pid) {
            Some(stat) if stat.state != 'Z' => Some(pid),
            _ => None,
        }
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log_path, LOG_TAIL_LINES)
    }

    /// Reaps the child if it exited; true while it runs (paused counts as running).
    fn poll_running(&mut self) -> bool {
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

    fn not_running(&self) -> anyhow::Error {
        match self.last_exit {
            Some(status) => anyhow!(
                "replica {} is not running (last exit: {status})",
                self.spec.name
            ),
            None => anyhow!("replica {} is not running", self.spec.name),
        }
    }
}

/// A set of running `vote-aggregator` processes, addressed by index (the order of the
/// specs given to [`Fleet::start`]).
///
/// Methods taking an index panic when it is out of range (`i >= len()`), like slice
/// indexing.
#[derive(Debug)]
pub struct Fleet {
    opts: FleetOptions,
    replicas: Vec<Replica>,
}

impl Fleet {
    /// Spawns one process per spec and waits until every replica's `/readyz` answers 200.
    ///
    /// Each process runs `vote-aggregator run` with an environment cleared except `PATH`
    /// and `RUST_LOG` (inherited, default `info`), then `base_env`, then the spec's env,
    /// then `REPLICA_ID=<name>` and `METRICS_ADDR=127.0.0.1:<port>` (a free port picked
    /// now and kept across restarts). Stdout and stderr are appended to
    /// `<log_dir>/<name>.log`.
    ///
    /// # Errors
    /// When a spec is invalid (bad or duplicate name), the log directory or a log file
    /// cannot be created, a process cannot be spawned, or a replica is not ready within
    /// `ready_timeout` or exits first (the error quotes the last lines of its log). Every
    /// process already started is killed before the error is returned.
    pub async fn start(opts: FleetOptions, specs: Vec<ReplicaSpec>) -> anyhow::Result<Fleet> {
        let mut seen = HashSet::new();
        for spec in &specs {
            if spec.name.is_empty()
                || spec.name.len() > 100
                || !spec.name.chars().all(valid_name_char)
            {
                bail!(
                    "invalid replica name {:?}: use 1-100 characters of A-Z a-z 0-9 . _ : -",
                    spec.name
                );
            }
            if !seen.insert(spec.name.as_str()) {
                bail!("replica name {:?} is used twice", spec.name);
            }
        }
        if !opts.binary.is_file() {
            bail!(
                "the vote-aggregator binary is not at {}: build it with `cargo build -p vote-aggregator`",
                opts.binary.display()
            );
        }
        std::fs::create_dir_all(&opts.log_dir)
            .with_context(|| format!("cannot create log directory {}", opts.log_dir.display()))?;
        let ports = free_ports(specs.len())?;
        let replicas = specs
            .into_iter()
            .zip(ports)
            .map(|(spec, port)| Replica {
                log_path: opts.log_dir.join(format!("{}.log", spec.name)),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                spec,
                child: None,
                start_ticks: None,
                last_exit: None,
                starts: 0,
            })
            .collect();
        let mut fleet = Fleet { opts, replicas };
        for i in 0..fleet.len() {
            fleet.spawn(i)?;
        }
        let timeout = fleet.opts.ready_timeout;
        let results =
            futures_util::future::join_all((0..fleet.len()).map(|i| fleet.wait_ready(i, timeout)))
                .await;
        let errors: Vec<String> = results
            .into_iter()
            .filter_map(Result::err)
            .map(|e| format!("{e:#}"))
            .collect();
        if !errors.is_empty() {
            bail!("fleet did not start:\n{}", errors.join("\n\n"));
        }
        Ok(fleet)
    }

    /// Number of replicas (running or not).
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// True for a fleet of no replicas.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// The options the fleet runs with.
    pub fn options(&self) -> &FleetOptions {
        &self.opts
    }

    /// Name of replica `i` (its `REPLICA_ID`).
    pub fn name(&self, i: usize) -> &str {
        &self.replicas[i].spec.name
    }

    /// The spec replica `i` was started with.
    pub fn spec(&self, i: usize) -> &ReplicaSpec {
        &self.replicas[i].spec
    }

    /// Sets (`Some`) or removes (`None`) one variable of replica `i`'s own environment; it
    /// takes effect at the replica's next start (e.g. a fault-injection switch for one
    /// run of one replica).
    pub fn set_replica_env(&mut self, i: usize, key: &str, value: Option<&str>) {
        let env = &mut self.replicas[i].spec.env;
        env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            env.push((key.to_owned(), value.to_owned()));
        }
    }

    /// Index of the replica called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.replicas.iter().position(|r| r.spec.name == name)
    }

    /// Pid of replica `i`; `None` when it is not running (stopped, killed, or exited by
    /// itself, even if not reaped yet). A paused replica has a pid.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.replicas[i].live_pid()
    }

    /// Address of replica `i`'s HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); the
    /// same for the fleet's whole life.
    pub fn metrics_addr(&self, i: usize) -> SocketAddr {
        self.replicas[i].addr
    }

    /// Path of replica `i`'s log (stdout + stderr of every start).
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.replicas[i].log_path.clone()
    }

    /// The last `lines` lines of replica `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        log_tail(&self.replicas[i].log_path, lines)
    }

    /// How many times replica `i` was spawned (1 after [`Fleet::start`]).
    pub fn starts(&self, i: usize) -> u32 {
        self.replicas[i].starts
    }

    /// How replica `i` last exited (after it was reaped by [`Fleet::is_running`],
    /// [`Fleet::stop`], [`Fleet::kill`] or [`Fleet::restart`]); `None` while its first
    /// process runs.
    pub fn exit_status(&self, i: usize) -> Option<ExitStatus> {
        self.replicas[i].last_exit
    }

    /// True while replica `i`'s process exists (a paused replica is running). Reaps the
    /// process if it exited, recording its [`Fleet::exit_status`].
    pub fn is_running(&mut self, i: usize) -> bool {
        self.replicas[i].poll_running()
    }

    /// True while replica `i` is stopped by a signal (state `T` in `/proc/<pid>/stat`).
    pub fn is_paused(&self, i: usize) -> bool {
        self.replicas[i]
            .live_pid()
            .and_then(proc_stat)
            .is_some_and(|s| s.state == 'T')
    }

    /// Sends SIGTERM to replica `i` and waits up to [`STOP_TIMEOUT`] for it to exit. A
    /// paused replica is also sent SIGCONT so it can handle the SIGTERM.
    ///
    /// # Errors
    /// When the replica is not running, the signal cannot be sent, or it does not exit in
    /// time (it is then left running; use [`Fleet::kill`]).
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<ExitStatus> {
        self.stop_within(i, STOP_TIMEOUT).await
    }

    /// [`Fleet::stop`] with another bound on the wait.
    ///
    /// # Errors
    /// As [`Fleet::stop`].
    pub async fn stop_within(&mut self, i: usize, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let r = &mut self.replicas[i];
        if !r.poll_running() {
            return Err(r.not_running());
        }
        let pid = r.live_pid().ok_or_else(|| r.not_running())?;
        send_signal(pid, "TERM")?;
        if proc_stat(pid).is_some_and(|s| s.state == 'T') {
            send_signal(pid, "CONT")?;
        }
        let child = r
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("replica vanished"))?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => {
                r.child = None;
                r.start_ticks = None;
                r.last_exit = Some(status);
                Ok(status)
            }
            Ok(Err(e)) => Err(e).with_context(|| format!("waiting for replica {}", r.spec.name)),
            Err(_) => bail!(
                "replica {} (pid {pid}) did not exit within {timeout:?} of SIGTERM and is still running; \
                 last lines of {}:\n{}",
                r.spec.name,
                r.log_path.display(),
                r.log_tail()
            ),
        }
    }

    /// Sends SIGKILL to replica `i`, waits until it is reaped and checks that its pid is
    /// gone from `/proc` (or now belongs to another process).
    ///
    /// # Errors
    /// When the replica is not running, the kill fails, it is not reaped within
    /// [`STOP_TIMEOUT`], or the pid is still its own afterwards.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let r = &mut self.replicas[i];
        if !r.poll_running() {
            return Err(r.not_running());
        }
        let name = r.spec.name.clone();
        let child = r
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("replica {name} is not running"))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("replica {} has no pid", r.spec.name))?;
        child
            .start_kill()
            .with_context(|| format!("SIGKILL to replica {} (pid {pid})", r.spec.name))?;
        let status = tokio::time::timeout(STOP_TIMEOUT, child.wait())
            .await
            .map_err(|_| {
                anyhow!(
                    "replica {} (pid {pid}) not reaped within {STOP_TIMEOUT:?} of SIGKILL",
                    r.spec.name
                )
            })?
            .with_context(|| format!("waiting for replica {}", r.spec.name))?;
        let ticks = r.start_ticks.take();
        r.child = None;
        r.last_exit = Some(status);
        match proc_stat(pid) {
            None => Ok(()),
            Some(stat) if ticks.is_some() && Some(stat.start_ticks) != ticks => Ok(()),
            Some(stat) => bail!(
                "replica {} was killed and reaped but pid {pid} is still present (state {})",
                r.spec.name,
                stat.state
            ),
        }
    }

    /// Sends SIGSTOP to replica `i` (it freezes with its connections open) and waits until
    /// `/proc/<pid>/stat` shows state `T`. Blocks the thread for at most a few
    /// milliseconds in practice.
    ///
    /// # Errors
    /// When the replica is not running, the signal cannot be sent, or the state does not
    /// become `T` within 5 s.
    pub fn pause(&mut self, i: usize) -> anyhow::Result<()> {
        let r = &mut self.replicas[i];
        if !r.poll_running() {
            return Err(r.not_running());
        }
        let pid = r.live_pid().ok_or_else(|| r.not_running())?;
        send_signal(pid, "STOP")?;
        wait_state(pid, |s| s == 'T').with_context(|| {
            format!(
                "replica {} (pid {pid}) did not stop on SIGSTOP",
                r.spec.name
            )
        })
    }

    /// Sends SIGCONT to replica `i` and waits until `/proc/<pid>/stat` no longer shows
    /// state `T`.
    ///
    /// # Errors
    /// When the replica is not running, the signal cannot be sent, or it stays stopped
    /// for 5 s.
    pub fn resume(&mut self, i: usize) -> anyhow::Result<()> {
        let r = &mut self.replicas[i];
        if !r.poll_running() {
            return Err(r.not_running());
        }
        let pid = r.live_pid().ok_or_else(|| r.not_running())?;
        send_signal(pid, "CONT")?;
        wait_state(pid, |s| s != 'T').with_context(|| {
            format!(
                "replica {} (pid {pid}) did not continue on SIGCONT",
                r.spec.name
            )
        })
    }

    /// Starts replica `i` again with the same spec and port and waits until it is ready.
    /// A replica still running is stopped first (SIGTERM, as [`Fleet::stop`]).
    ///
    /// # Errors
    /// When the stop fails, the process cannot be spawned, or it is not ready within
    /// `ready_timeout` (the error quotes its log; the process is left as it is).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if self.is_running(i) {
            self.stop(i).await?;
        }
        self.start_replica(i).await
    }

    /// Starts replica `i` (same spec and port as before) and waits until it is ready.
    ///
    /// # Errors
    /// When it is already running, the process cannot be spawned, or it is not ready
    /// within `ready_timeout` (the error quotes its log; the process is left as it is).
    pub async fn start_replica(&mut self, i: usize) -> anyhow::Result<()> {
        if self.is_running(i) {
            bail!(
                "replica {} is already running (pid {:?})",
                self.name(i),
                self.pid(i)
            );
        }
        self.spawn(i)?;
        self.wait_ready(i, self.opts.ready_timeout).await
    }

    /// Waits until replica `i`'s `/readyz` answers 200 (polling every 100 ms).
    ///
    /// # Errors
    /// When the replica is not running, exits while waiting, or is not ready within
    /// `timeout`; the error names the last answer and quotes the last 20 lines of its log.
    pub async fn wait_ready(&self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let r = &self.replicas[i];
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            let Some(pid) = r.live_pid() else {
                bail!(
                    "replica {} exited before it was ready ({last}); last lines of {}:\n{}",
                    r.spec.name,
                    r.log_path.display(),
                    r.log_tail()
                );
            };
            match tokio::time::timeout(Duration::from_secs(2), http_get(r.addr, "/readyz")).await {
                Ok(Ok((200, _))) => return Ok(()),
                Ok(Ok((status, body))) => {
                    last = format!("/readyz answered {status}: {}", body.trim());
                }
                Ok(Err(e)) => last = format!("/readyz at {}: {e:#}", r.addr),
                Err(_) => last = format!("/readyz at {} did not answer within 2 s", r.addr),
            }
            if Instant::now() >= deadline {
                bail!(
                    "replica {} (pid {pid}) not ready within {timeout:?} ({last}); last lines of {}:\n{}",
                    r.spec.name,
                    r.log_path.display(),
                    r.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running replica is ready.
    ///
    /// # Errors
    /// The first replica's error from [`Fleet::wait_ready`].
    pub async fn wait_all_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let running: Vec<usize> = (0..self.len()).filter(|&i| self.pid(i).is_some()).collect();
        let results = futures_util::future::join_all(
            running.into_iter().map(|i| self.wait_ready(i, timeout)),
        )
        .await;
        results.into_iter().collect()
    }

    /// GETs replica `i`'s `/metrics` (bounded by [`SCRAPE_TIMEOUT`]) and parses it.
    ///
    /// # Errors
    /// When the replica is not running, does not answer in time (e.g. paused), answers
    /// other than 200, or the page does not parse.
    pub async fn scrape(&self, i: usize) -> anyhow::Result<Scrape> {
        self.scrape_within(i, SCRAPE_TIMEOUT).await
    }

    /// [`Fleet::scrape`] with another bound on the wait.
    ///
    /// # Errors
    /// As [`Fleet::scrape`].
    pub async fn scrape_within(&self, i: usize, timeout: Duration) -> anyhow::Result<Scrape> {
        let r = &self.replicas[i];
        if r.live_pid().is_none() {
            return Err(r.not_running());
        }
        let (status, body) = tokio::time::timeout(timeout, http_get(r.addr, "/metrics"))
            .await
            .map_err(|_| {
                anyhow!(
                    "replica {}: /metrics at {} did not answer within {timeout:?}",
                    r.spec.name,
                    r.addr
                )
            })?
            .with_context(|| format!("replica {}: GET /metrics at {}", r.spec.name, r.addr))?;
        if status != 200 {
            bail!(
                "replica {}: /metrics answered {status}: {}",
                r.spec.name,
                body.trim()
            );
        }
        Scrape::parse(&body).with_context(|| format!("replica {}: /metrics", r.spec.name))
    }

    /// Scrapes every replica at once, in index order (a replica not running gives an
    /// error).
    pub async fn scrape_all(&self) -> Vec<anyhow::Result<Scrape>> {
        futures_util::future::join_all((0..self.len()).map(|i| self.scrape(i))).await
    }

    /// Sends SIGTERM to every running replica (and SIGCONT to the paused ones), waits for
    /// all of them (each bounded by [`STOP_TIMEOUT`]) and returns their exit statuses in
    /// index order (`None` for a replica that was not running).
    ///
    /// # Errors
    /// When a signal cannot be sent or a replica does not exit in time; every replica
    /// still running is then killed (SIGKILL) before the error is returned.
    pub async fn shutdown(mut self) -> anyhow::Result<Vec<Option<ExitStatus>>> {
        let mut errors = Vec::new();
        for r in &mut self.replicas {
            if !r.poll_running() {
                continue;
            }
            let Some(pid) = r.live_pid() else { continue };
            let paused = proc_stat(pid).is_some_and(|s| s.state == 'T');
            let sent = send_signal(pid, "TERM").and_then(|()| {
                if paused {
                    send_signal(pid, "CONT")
                } else {
                    Ok(())
                }
            });
            if let Err(e) = sent {
                errors.push(format!("replica {}: {e:#}", r.spec.name));
            }
        }
        let waits = self.replicas.iter_mut().map(|r| async move {
            let child = r.child.as_mut()?;
            Some(tokio::time::timeout(STOP_TIMEOUT, child.wait()).await)
        });
        let results = futures_util::future::join_all(waits).await;
        let mut statuses = Vec::with_capacity(results.len());
        for (r, result) in self.replicas.iter_mut().zip(results) {
            match result {
                None => statuses.push(None),
                Some(Ok(Ok(status))) => {
                    r.child = None;
                    r.start_ticks = None;
                    r.last_exit = Some(status);
                    statuses.push(Some(status));
                }
                Some(Ok(Err(e))) => {
                    errors.push(format!("replica {}: waiting for exit: {e}", r.spec.name));
                    statuses.push(None);
                }
                Some(Err(_)) => {
                    errors.push(format!(
                        "replica {} did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed); last lines of {}:\n{}",
                        r.spec.name,
                        r.log_path.display(),
                        r.log_tail()
                    ));
                    statuses.push(None);
                }
            }
        }
        if errors.is_empty() {
            return Ok(statuses);
        }
        for r in &mut self.replicas {
            if let Some(child) = r.child.as_mut() {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(STOP_TIMEOUT, child.wait()).await;
                r.child = None;
            }
        }
        bail!("fleet shutdown failed:\n{}", errors.join("\n"))
    }

    /// Lets go of the replicas WITHOUT stopping them (e.g. `vote-tools demo --keep`):
    /// they keep running after the fleet is gone and after this process exits. Returns
    /// the pids of the replicas that were running, in index order. Nothing reaps them
    /// any more: stop them with `kill <pid>`.
    pub fn detach(mut self) -> Vec<Option<u32>> {
        let mut pids = Vec::with_capacity(self.len());
        for r in &mut self.replicas {
            let pid = r.live_pid();
            pids.push(pid);
            if let Some(child) = r.child.take() {
                // Forgetting the handle skips its kill-on-drop; the process lives on.
                std::mem::forget(child);
            }
        }
        pids
    }

    /// Spawns replica `i`'s process (no readiness wait).
    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let opts = &self.opts;
        let r = &mut self.replicas[i];
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
            "RUST_LOG",
            std::env::var_os("RUST_LOG").unwrap_or_else(|| "info".into()),
        )
        .envs(opts.base_env.iter().map(|(k, v)| (k, v)))
        .envs(r.spec.env.iter().map(|(k, v)| (k, v)))
        .env("REPLICA_ID", &r.spec.name)
        .env("METRICS_ADDR", r.addr.to_string())
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
        r.start_ticks = child.id().and_then(proc_stat).map(|s| s.start_ticks);
        r.child = Some(child);
        Ok(())
    }
}

impl Drop for Fleet {
    /// Sends SIGKILL to every replica still running, so a failing test leaves no process.
    fn drop(&mut self) {
        for r in &mut self.replicas {
            if let Some(child) = r.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

/// One sample of a Prometheus text page.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (for histograms including `_bucket`, `_sum`, `_count`).
    pub name: String,
    /// Labels in page order.
    pub labels: Labels,
    /// Value.
    pub value: f64,
}

impl Sample {
    fn has_labels(&self, labels: &[(String, String)]) -> bool {
        self.labels.len() == labels.len() && labels.iter().all(|l| self.labels.contains(l))
    }
}

/// A parsed Prometheus text page (`/metrics` of one replica).
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    samples: Vec<Sample>,
}

impl Scrape {
    /// Parses a Prometheus text-format page (comments and blank lines are skipped, an
    /// optional timestamp after the value is ignored).
    ///
    /// # Errors
    /// On a line that is not a sample, naming it.
    pub fn parse(text: &str) -> anyhow::Result<Scrape> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).with_context(|| format!("bad metrics line: {l:?}")))
            .collect::<anyhow::Result<_>>()?;
        Ok(Scrape { samples })
    }

    /// Every sample, in page order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The value of one sample, named as on the page with its labels if any, e.g.
    /// `vote_aggregator_up{dependency="postgres"}`; label order does not matter. `None`
    /// when absent (or when `name_with_labels` does not parse).
    pub fn get(&self, name_with_labels: &str) -> Option<f64> {
        let (name, labels, rest) = parse_key(name_with_labels.trim()).ok()?;
        if !rest.trim().is_empty() {
            return None;
        }
        self.samples
            .iter()
            .find(|s| s.name == name && s.has_labels(&labels))
            .map(|s| s.value)
    }

    /// Sum of every sample called `name`, whatever its labels (0 when absent).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// `vote_aggregator_votes_counted_total` (0 when absent).
    pub fn counted(&self) -> u64 {
        whole(self.sum("vote_aggregator_votes_counted_total"))
    }

    /// `vote_aggregator_batches_committed_total` (0 when absent): a batch is acked right
    /// after it counts here.
    pub fn batches_committed(&self) -> u64 {
        whole(self.sum("vote_aggregator_batches_committed_total"))
    }

    /// `vote_aggregator_votes_received_total` (0 when absent).
    pub fn received(&self) -> u64 {
        whole(self.sum("vote_aggregator_votes_received_total"))
    }

    /// `vote_aggregator_votes_duplicate_total`, summed over `redelivered="true"` and
    /// `"false"` (0 when absent).
    pub fn duplicates(&self) -> u64 {
        whole(self.sum("vote_aggregator_votes_duplicate_total"))
    }

    /// `vote_aggregator_votes_conflicting_total` (0 when absent).
    pub fn conflicting(&self) -> u64 {
        whole(self.sum("vote_aggregator_votes_conflicting_total"))
    }

    /// `vote_aggregator_votes_rejected_total`, summed over every `reason` (0 when absent).
    pub fn rejected(&self) -> u64 {
        whole(self.sum("vote_aggregator_votes_rejected_total"))
    }
}

fn whole(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

/// Label pairs of a sample, in page order.
type Labels = Vec<(String, String)>;

/// Parses `name{labels}` at the start of `s`; returns the rest.
fn parse_key(s: &str) -> anyhow::Result<(String, Labels, &str)> {
    let end = s
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(s.len());
    let name = &s[..end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        bail!("bad metric name {name:?}");
    }
    let mut rest = &s[end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            while chars
                .next_if(|(_, c)| c.is_whitespace() || *c == ',')
                .is_some()
            {}
            let Some(&(start, c)) = chars.peek() else {
                bail!("unclosed label set");
            };
            if c == '}' {
                rest = &inner[start + 1..];
                break;
            }
            let mut key = String::new();
            while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=') {
                key.push(c);
            }
            let key = key.trim().to_string();
            if key.is_empty() || chars.next().is_none() || chars.next().map(|(_, c)| c) != Some('"')
            {
                bail!("bad label near {:?}", &inner[start..]);
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    None => bail!("unterminated label value"),
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("unterminated label value"),
                    },
                    Some((_, c)) => value.push(c),
                }
            }
            labels.push((key, value));
        }
    }
    Ok((name.to_string(), labels, rest))
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let (name, labels, rest) = parse_key(line)?;
    let mut fields = rest.split_whitespace();
    let raw = fields.next().context("no value")?;
    let value = raw
        .parse::<f64>()
        .with_context(|| format!("bad value {raw:?}"))?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .with_context(|| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        bail!("trailing fields");
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// The last `lines` lines of a log file (from its last 64 KiB); a note when it cannot be
/// read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    const WINDOW: u64 = 64 * 1024;
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
        let mut raw = Vec::new();
        file.read_to_end(&mut raw)?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// `n` distinct free local ports (all listeners held until every port is picked).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot find a free local port")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Sends `SIG<signal>` to `pid` with the `kill` command.
fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `kill -{signal} {pid}`"))?;
    if !out.status.success() {
        bail!(
            "`kill -{signal} {pid}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct ProcStat {
    state: char,
    start_ticks: u64,
}

/// State and start time of `pid` from `/proc/<pid>/stat`; `None` when there is no such
/// process.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        // Field 22 of stat = index 19 after the comm.
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// Polls `/proc/<pid>/stat` until `ok(state)`, for up to [`SIGNAL_SETTLE`].
fn wait_state(pid: u32, ok: impl Fn(char) -> bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + SIGNAL_SETTLE;
    loop {
        let state = proc_stat(pid)
            .map(|s| s.state)
            .with_context(|| format!("pid {pid} is gone"))?;
        if ok(state) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("state is still '{state}' after {SIGNAL_SETTLE:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP vote_aggregator_votes_counted_total Votes inserted.
# TYPE vote_aggregator_votes_counted_total counter
vote_aggregator_votes_counted_total 1234
vote_aggregator_votes_received_total 1300
vote_aggregator_votes_duplicate_total{redelivered="false"} 3
vote_aggregator_votes_duplicate_total{redelivered="true"} 60
vote_aggregator_votes_conflicting_total 2
vote_aggregator_votes_rejected_total{reason="malformed_json"} 1
vote_aggregator_votes_rejected_total{reason="too_large"} 4
vote_aggregator_up{dependency="postgres"} 1
vote_aggregator_up{dependency="rabbitmq"} 0
vote_aggregator_batch_size_bucket{le="+Inf"} 7
weird{a="x\"y\\z",b="1"} 2.5 1700000000000

"#;

    #[test]
    fn scrape_reads_counters_sums_and_labelled_values() {
        let s = Scrape::parse(PAGE).expect("valid page");
        assert_eq!(s.counted(), 1234);
        assert_eq!(s.received(), 1300);
        assert_eq!(s.duplicates(), 63);
        assert_eq!(s.conflicting(), 2);
        assert_eq!(s.rejected(), 5);
        assert_eq!(
            s.get(r#"vote_aggregator_up{dependency="postgres"}"#),
            Some(1.0)
        );
        assert_eq!(
            s.get(r#"vote_aggregator_up{dependency="rabbitmq"}"#),
            Some(0.0)
        );
        assert_eq!(s.get("vote_aggregator_up"), None, "labels must match");
        assert_eq!(
            s.get(r#"vote_aggregator_batch_size_bucket{le="+Inf"}"#),
            Some(7.0)
        );
        assert_eq!(s.get(r#"weird{b="1", a="x\"y\\z"}"#), Some(2.5));
        assert_eq!(s.get("absent_total"), None);
        assert_eq!(s.get("not a {key"), None);
    }

    #[test]
    fn absent_counters_read_as_zero_and_bad_lines_are_named() {
        let s = Scrape::parse("vote_aggregator_votes_counted_total 0\n").expect("valid");
        assert_eq!((s.duplicates(), s.rejected()), (0, 0));
        let e = Scrape::parse("ok 1\nbroken{x=\"1\" 2\n").expect_err("invalid");
        assert!(format!("{e:#}").contains("broken"), "{e:#}");
        assert!(Scrape::parse("x notanumber\n").is_err());
    }

    #[test]
    fn proc_stat_reads_this_process() {
        let stat = proc_stat(std::process::id()).expect("own stat");
        assert!(matches!(stat.state, 'R' | 'S'), "{}", stat.state);
        assert!(stat.start_ticks > 0);
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(8).expect("ports");
        assert_eq!(ports.iter().collect::<HashSet<_>>().len(), 8);
    }
}
