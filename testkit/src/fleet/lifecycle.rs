//! The [`Fleet`]: starting its replicas, and every change of their life with real
//! signals — stop (SIGTERM), kill (SIGKILL), pause / resume (SIGSTOP / SIGCONT, verified
//! in `/proc`), restart, shutdown, detach — plus the read-only accessors.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use super::logs;
use super::replica::{Replica, free_ports};
use super::spec::{self, FleetOptions, ReplicaSpec};
use crate::procinfo;
use crate::signal::{self, Signal};

/// How long [`Fleet::stop`] and [`Fleet::shutdown`] wait for a replica to exit after
/// SIGTERM (the service's own grace period defaults to 25 s).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Fleet::pause`] / [`Fleet::resume`] wait for `/proc` to show the new state.
const SIGNAL_SETTLE: Duration = Duration::from_secs(5);

/// A set of running `vote-aggregator` processes, addressed by index (the order of the
/// specs given to [`Fleet::start`]).
///
/// Methods taking an index panic when it is out of range (`i >= len()`), like slice
/// indexing.
#[derive(Debug)]
pub struct Fleet {
    pub(super) opts: FleetOptions,
    pub(super) replicas: Vec<Replica>,
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
                || !spec.name.chars().all(spec::valid_name_char)
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
            let Fleet { opts, replicas } = &mut fleet;
            replicas[i].spawn(opts)?;
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
        logs::log_tail(&self.replicas[i].log_path, lines)
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
            .and_then(procinfo::stat)
            .is_some_and(|s| s.is_stopped())
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
        signal::send(pid, Signal::TERM)?;
        if procinfo::stat(pid).is_some_and(|s| s.is_stopped()) {
            signal::send(pid, Signal::CONT)?;
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
        match procinfo::stat(pid) {
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
        signal::send(pid, Signal::STOP)?;
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
        signal::send(pid, Signal::CONT)?;
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
        self.replicas[i].spawn(&self.opts)?;
        self.wait_ready(i, self.opts.ready_timeout).await
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
            let paused = procinfo::stat(pid).is_some_and(|s| s.is_stopped());
            let sent = signal::send(pid, Signal::TERM).and_then(|()| {
                if paused {
                    signal::send(pid, Signal::CONT)
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

/// Polls `/proc/<pid>/stat` until `ok(state)`, for up to [`SIGNAL_SETTLE`].
fn wait_state(pid: u32, ok: impl Fn(char) -> bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + SIGNAL_SETTLE;
    loop {
        let state = procinfo::state(pid).with_context(|| format!("pid {pid} is gone"))?;
        if ok(state) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("state is still '{state}' after {SIGNAL_SETTLE:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
