//! CPU accounting of a drain: what the consumer processes (the replicas, or the load
//! runner while only the floor consumer runs in it), the RabbitMQ container(s) and the
//! PostgreSQL container spent per 1000 counted votes, and the machine's busy share, from
//! `/proc` and the containers' cgroups, and the consumer processes' context switches per
//! 1000 votes (how often their threads waited and were woken). The aggregator's and the
//! floor's drains are measured the same way, so their costs can be set side by side.

use std::collections::HashMap;
use std::time::Instant;

use vote_testkit::procinfo;

use super::Servers;

/// CPU seconds used so far by the consumer processes (the replicas, or this process for
/// the floor) and the two server containers.
struct CpuSample {
    /// (busy, total) clock ticks of the whole machine.
    machine: Option<(u64, u64)>,
    /// User + system CPU seconds of the consumer processes.
    consumers: f64,
    /// Context switches so far of each live thread of the consumer processes, by thread
    /// id; `None` when no consumer process could be read.
    consumer_threads: Option<HashMap<i32, u64>>,
    /// CPU seconds of the RabbitMQ container(s); `None` when a cgroup cannot be read.
    broker: Option<f64>,
    /// CPU seconds of the PostgreSQL container; `None` when its cgroup cannot be read.
    database: Option<f64>,
}

/// Per-1000-vote CPU costs over a drain.
#[derive(Default)]
pub(super) struct DrainCpu {
    /// Of the consumer processes (the replicas, or the floor's).
    pub consumers: f64,
    /// Context switches of the consumer processes' threads per 1000 votes (of the
    /// threads alive when the window closed: a thread that exited during it is not
    /// counted); `None` when they could not be read.
    pub consumer_switches: Option<f64>,
    /// Of the RabbitMQ container(s).
    pub broker: Option<f64>,
    /// Of the PostgreSQL container.
    pub database: Option<f64>,
    /// Share of the machine's CPU (all cores) that the consumers and the servers used.
    pub machine_share: Option<f64>,
    /// Share of the machine's CPU busy during the drain, whoever used it.
    pub machine_busy: Option<f64>,
    /// Votes/s these costs allow when the cores are the only limit.
    pub cpu_bound: Option<f64>,
}

impl CpuSample {
    /// Now, for the consumer processes `consumers`.
    fn take(servers: &Servers, consumers: &[u32]) -> Self {
        CpuSample {
            machine: procinfo::machine_ticks(),
            consumers: consumers
                .iter()
                .filter_map(|&pid| process_cpu_seconds(pid))
                .sum(),
            consumer_threads: consumer_threads(consumers),
            broker: servers
                .broker_container_ids()
                .into_iter()
                .map(container_cpu_seconds)
                .sum(),
            database: container_cpu_seconds(servers.pair.postgres_container_id()),
        }
    }

    /// The costs per 1000 of `votes` counted over the `secs` since `start`.
    fn costs_since(&self, start: &CpuSample, votes: u64, secs: f64) -> DrainCpu {
        let per_1000 = |now: f64, then: f64| (now - then) / (votes.max(1) as f64 / 1000.0);
        let consumers = per_1000(self.consumers, start.consumers);
        let consumer_switches = self
            .consumer_threads
            .as_ref()
            .zip(start.consumer_threads.as_ref())
            .map(|(now, then)| per_1000(switches_since(now, then) as f64, 0.0));
        let broker = self.broker.zip(start.broker).map(|(n, t)| per_1000(n, t));
        let database = self
            .database
            .zip(start.database)
            .map(|(n, t)| per_1000(n, t));
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        let total = broker.zip(database).map(|(b, d)| consumers + b + d);
        DrainCpu {
            consumers,
            consumer_switches,
            broker,
            database,
            machine_share: total.map(|t| t * votes as f64 / 1000.0 / (secs.max(0.001) * cores)),
            machine_busy: self.machine.zip(start.machine).and_then(|(n, t)| {
                let total = n.1.checked_sub(t.1)?;
                (total > 0).then(|| n.0.saturating_sub(t.0) as f64 / total as f64)
            }),
            cpu_bound: total.map(|t| cores * 1000.0 / t.max(1e-9)),
        }
    }
}

/// Context switches so far of every live thread of `consumers`, by thread id; `None`
/// when none of them could be read.
fn consumer_threads(consumers: &[u32]) -> Option<HashMap<i32, u64>> {
    let mut threads = HashMap::new();
    let mut read_any = false;
    for &pid in consumers {
        if let Some(counts) = procinfo::thread_context_switches(pid) {
            read_any = true;
            threads.extend(counts);
        }
    }
    read_any.then_some(threads)
}

/// Context switches between two readings, summed over the threads alive at the second:
/// each from its count at the first (0 for a thread born since).
fn switches_since(now: &HashMap<i32, u64>, then: &HashMap<i32, u64>) -> u64 {
    now.iter()
        .map(|(tid, n)| n.saturating_sub(then.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// The CPU window of one drain: opened at its first sign of progress, closed at its end.
pub(super) struct CpuWindow<'a> {
    servers: &'a Servers,
    consumers: Vec<u32>,
    opened: Option<(CpuSample, Instant)>,
}

impl<'a> CpuWindow<'a> {
    /// A window for the consumer processes `consumers`, not yet open.
    pub(super) fn new(servers: &'a Servers, consumers: Vec<u32>) -> Self {
        CpuWindow {
            servers,
            consumers,
            opened: None,
        }
    }

    /// Opens the window, unless it is open already.
    pub(super) fn open_once(&mut self) {
        if self.opened.is_none() {
            let sample = CpuSample::take(self.servers, &self.consumers);
            self.opened = Some((sample, Instant::now()));
        }
    }

    /// The costs per 1000 of the `votes` counted since the window opened (zero when it
    /// never opened).
    pub(super) fn close(self, votes: u64) -> DrainCpu {
        match &self.opened {
            Some((start, at)) => CpuSample::take(self.servers, &self.consumers).costs_since(
                start,
                votes,
                at.elapsed().as_secs_f64(),
            ),
            None => DrainCpu::default(),
        }
    }
}

/// CPU seconds used by a Docker container so far, from its cgroup (v1 `cpuacct` or v2
/// `cpu.stat`); `None` when neither can be read (e.g. a remote Docker host).
fn container_cpu_seconds(id: &str) -> Option<f64> {
    if let Ok(ns) =
        std::fs::read_to_string(format!("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage"))
    {
        return ns.trim().parse::<f64>().ok().map(|ns| ns / 1e9);
    }
    let stat = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat"
    ))
    .ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|us| us / 1e6)
}

/// User + system CPU seconds of a live process.
pub(super) fn process_cpu_seconds(pid: u32) -> Option<f64> {
    procinfo::stat(pid).map(|s| s.cpu_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_are_counted_per_thread_from_its_first_reading() {
        let then = HashMap::from([(1, 100), (2, 50), (3, 70)]);
        // Thread 2 went on, thread 3 exited, thread 4 was born.
        let now = HashMap::from([(1, 100), (2, 80), (4, 5)]);
        assert_eq!(switches_since(&now, &then), 30 + 5);
    }
}
