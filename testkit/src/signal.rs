//! Sending a signal to a process, the one way the kit, the tests and the chaos suite do
//! it: `kill(2)` through `rustix` (safe, no subprocess, no `unsafe` in the workspace).
//!
//! [`Signal`] is re-exported so callers can also compare an exit signal with it
//! (`ExitStatusExt::signal() == Some(Signal::KILL.as_raw())`) without `libc`.

use anyhow::Context;
pub use rustix::process::Signal;

/// Sends `signal` to process `pid`.
///
/// A caller must only signal a pid it owns and has not reaped yet (a child still
/// running), so the pid cannot belong to another process.
///
/// # Errors
/// When the pid is not a valid process id, or `kill(2)` fails (no such process, no
/// permission).
pub fn send(pid: u32, signal: Signal) -> anyhow::Result<()> {
    let raw = i32::try_from(pid).ok();
    let target = raw
        .and_then(rustix::process::Pid::from_raw)
        .with_context(|| format!("cannot send {signal:?}: {pid} is not a process id"))?;
    rustix::process::kill_process(target, signal)
        .with_context(|| format!("cannot send {signal:?} to pid {pid}"))
}

/// True when an exit status says the process died of `signal`.
pub fn died_of(status: Option<std::process::ExitStatus>, signal: Signal) -> bool {
    use std::os::unix::process::ExitStatusExt as _;
    status.and_then(|s| s.signal()) == Some(signal.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_dies_of_the_signal_sent() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        send(child.id(), Signal::TERM).expect("signal");
        let status = child.wait().expect("reap");
        assert!(died_of(Some(status), Signal::TERM), "{status}");
        assert!(!died_of(Some(status), Signal::KILL));
        assert!(send(0, Signal::TERM).is_err(), "pid 0 is not a process");
    }
}
