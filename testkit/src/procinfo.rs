//! Everything the kit and the tools read from `/proc`, in one place, through the `procfs`
//! crate (it parses `stat` fields correctly even when a command name holds spaces or
//! parentheses, and knows the machine's clock-tick rate instead of assuming 100 Hz).
//! The kernel release comes from uname(2) (`rustix`), not `/proc`.
//!
//! Each reader returns `None` when the process (or the file) is gone: callers probe
//! processes that may just have exited, so absence is an answer, not an error.

use procfs::process::Process;
use procfs::{Current as _, CurrentSI as _};

/// State letter of a process as `/proc/<pid>/stat` shows it: `R` running, `S` sleeping,
/// `T` stopped by a signal, `Z` zombie, …
pub type StateLetter = char;

/// What `/proc/<pid>/stat` says about one process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStat {
    /// State letter (see [`StateLetter`]).
    pub state: StateLetter,
    /// Start time in clock ticks after boot: tells a reused pid apart from the process
    /// that had it before.
    pub start_ticks: u64,
    /// User + system CPU time, in seconds.
    pub cpu_seconds: f64,
}

impl ProcStat {
    /// True when the process is stopped by a signal (SIGSTOP): state `T`.
    pub fn is_stopped(&self) -> bool {
        self.state == 'T'
    }

    /// True when the process exited but was not reaped yet: state `Z`.
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z'
    }
}

/// `/proc/<pid>/stat` of `pid`; `None` when there is no such process.
pub fn stat(pid: u32) -> Option<ProcStat> {
    let stat = Process::new(i32::try_from(pid).ok()?).ok()?.stat().ok()?;
    let ticks = procfs::ticks_per_second().max(1) as f64;
    Some(ProcStat {
        state: stat.state,
        start_ticks: stat.starttime,
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
    })
}

/// State letter of `pid`; `None` when there is no such process.
pub fn state(pid: u32) -> Option<StateLetter> {
    stat(pid).map(|s| s.state)
}

/// Peak resident set size (`VmHWM` of `/proc/<pid>/status`) of `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    Process::new(i32::try_from(pid).ok()?)
        .ok()?
        .status()
        .ok()?
        .vmhwm
}

/// Context switches so far, voluntary and involuntary, of each thread of `pid` alive now,
/// by thread id (`/proc/<pid>/task/*/status`; a thread that already exited is not
/// there); `None` when there is no such process.
pub fn thread_context_switches(pid: u32) -> Option<Vec<(i32, u64)>> {
    let process = Process::new(i32::try_from(pid).ok()?).ok()?;
    let threads = process
        .tasks()
        .ok()?
        .flatten()
        .filter_map(|task| {
            let s = task.status().ok()?;
            let switches =
                s.voluntary_ctxt_switches.unwrap_or(0) + s.nonvoluntary_ctxt_switches.unwrap_or(0);
            Some((task.tid, switches))
        })
        .collect();
    Some(threads)
}

/// (busy, total) CPU clock ticks of the whole machine since boot, from the `cpu` line
/// of `/proc/stat`; idle and iowait count as not busy.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let cpu = procfs::KernelStats::current().ok()?.total;
    let idle = cpu.idle + cpu.iowait.unwrap_or(0);
    let total = cpu.user
        + cpu.nice
        + cpu.system
        + idle
        + cpu.irq.unwrap_or(0)
        + cpu.softirq.unwrap_or(0)
        + cpu.steal.unwrap_or(0);
    Some((total - idle, total))
}

/// Total usable memory (`MemTotal` of `/proc/meminfo`), in bytes.
pub fn memory_total_bytes() -> Option<u64> {
    procfs::Meminfo::current().ok().map(|m| m.mem_total)
}

/// The kernel release string (uname(2)'s `release`, e.g. `6.8.0-45-generic`), kept as
/// text: `procfs` parses it into numbers and drops the suffix. `None` when empty.
pub fn kernel_release() -> Option<String> {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().trim().to_owned();
    (!release.is_empty()).then_some(release)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_this_process_and_machine() {
        let pid = std::process::id();
        let s = stat(pid).expect("own stat");
        let threads = thread_context_switches(pid).expect("own threads");
        assert!(
            threads.iter().any(|&(tid, _)| tid == pid as i32),
            "the main thread is listed: {threads:?}"
        );
        assert!(matches!(s.state, 'R' | 'S'), "{}", s.state);
        assert!(s.start_ticks > 0);
        assert!(s.cpu_seconds >= 0.0);
        assert!(!s.is_stopped() && !s.is_zombie());
        assert!(peak_rss_kib(pid).is_some_and(|k| k > 0));
        let (busy, total) = machine_ticks().expect("/proc/stat");
        assert!(busy > 0 && total >= busy);
        assert!(memory_total_bytes().is_some_and(|b| b > 0));
        assert!(kernel_release().is_some_and(|r| !r.is_empty()));
        assert_eq!(stat(u32::MAX), None, "no such pid");
    }
}
