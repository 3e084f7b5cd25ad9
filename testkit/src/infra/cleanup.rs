//! Removing containers nobody holds a handle to any more: those of dead test processes,
//! and this process's own at exit.
//!
//! testcontainers removes a container when its `ContainerAsync` is dropped, but a static
//! (the shared pair) is never dropped, and a process killed with SIGKILL drops nothing.
//! Its `watchdog` feature only catches SIGINT/SIGTERM/SIGQUIT, and it has no reaper for
//! containers of dead processes (the Ryuk sidecar of other testcontainers ports is not
//! part of the Rust crate). So every container carries the labels
//! `vote-aggregator.test=1`, `vote-aggregator.test.pid=<pid>` and
//! `vote-aggregator.test.host=<hostname>`; an `atexit` hook removes this process's, and the
//! first Docker use in a process removes this host's whose pid is no longer alive, unless
//! they were started to be kept (`vote-aggregator.test.keep=1`). Other engineers'
//! containers (another host label, or a live pid) are never touched.

use std::sync::atomic::{AtomicBool, Ordering};

use bollard::Docker;

use super::engine::{block_on_docker, docker, list_labelled, remove_containers};
use super::{LABEL_HOST, LABEL_KEEP, LABEL_PID, LABEL_TEST};

/// Set before the first container is created: only then is there anything to remove at exit.
pub(super) static CREATED_ANY: AtomicBool = AtomicBool::new(false);
static KEEP_AT_EXIT: AtomicBool = AtomicBool::new(false);

/// Leaves this process's containers running when it exits (for `vote-tools demo
/// --keep`). Call it before the first container starts: those started after it carry
/// the label `vote-aggregator.test.keep=1`, which the stale-container sweep of later test
/// processes respects; `make clean-containers` still removes them.
pub fn keep_at_exit() {
    KEEP_AT_EXIT.store(true, Ordering::SeqCst);
}

/// The labels that mark a container as this process's (on this host). Every container the
/// kit starts carries them; so may a test's own testcontainers container, to be cleaned up
/// the same way.
pub fn own_labels() -> Vec<(String, String)> {
    let mut labels = vec![
        (LABEL_TEST.to_owned(), "1".to_owned()),
        (LABEL_PID.to_owned(), std::process::id().to_string()),
        (LABEL_HOST.to_owned(), hostname()),
    ];
    if KEEP_AT_EXIT.load(Ordering::SeqCst) {
        labels.push((LABEL_KEEP.to_owned(), "1".to_owned()));
    }
    labels
}

/// [`own_labels`] as `key=value` label filters.
fn own_label_filters() -> Vec<String> {
    own_labels()
        .into_iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect()
}

/// Removes this host's labelled containers whose test process no longer exists.
pub(super) async fn reap_stale(docker: &Docker) -> anyhow::Result<()> {
    let me = std::process::id();
    let host = hostname();
    let stale: Vec<String> = list_labelled(docker, vec![format!("{LABEL_TEST}=1")])
        .await?
        .into_iter()
        .filter_map(|(id, labels)| {
            let pid: u32 = labels.get(LABEL_PID)?.parse().ok()?;
            let same_host = labels.get(LABEL_HOST) == Some(&host);
            let kept = labels.contains_key(LABEL_KEEP);
            (same_host && !kept && pid != me && !pid_alive(pid)).then_some(id)
        })
        .collect();
    if !stale.is_empty() {
        tracing::info!(
            count = stale.len(),
            "removing stale test containers of dead processes"
        );
        remove_containers(docker, &stale).await;
    }
    Ok(())
}

/// The host name, to tell this machine's test containers from those of other machines (or
/// other PID namespaces) sharing the engine.
fn hostname() -> String {
    let uname = rustix::system::uname();
    Some(uname.nodename().to_string_lossy().into_owned())
        .filter(|name| !name.trim().is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Whether a process with this pid exists (conservatively `true` when unsure).
#[cfg(unix)]
fn pid_alive(pid: u32) -> bool {
    // `pid > 1` rules out the special meanings of 0 and -1 (process group, every process)
    // and init.
    let Some(pid) = i32::try_from(pid)
        .ok()
        .filter(|&pid| pid > 1)
        .and_then(rustix::process::Pid::from_raw)
    else {
        return true;
    };
    // Signal 0: delivers nothing, only checks the pid exists (EPERM: it does, not ours).
    !matches!(
        rustix::process::test_kill_process(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

#[cfg(not(unix))]
fn pid_alive(_pid: u32) -> bool {
    true
}

/// Removes every container of this process, found by label (so a container whose create
/// request was cancelled before its id came back is found too).
async fn remove_own(docker: &Docker) -> anyhow::Result<()> {
    let ids: Vec<String> = list_labelled(docker, own_label_filters())
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    remove_containers(docker, &ids).await;
    Ok(())
}

/// The `docker` CLI fallback of [`remove_own`], for when the Docker runtime cannot help.
fn remove_own_with_cli() {
    let mut list = std::process::Command::new("docker");
    list.args(["ps", "-aq"]);
    for filter in own_label_filters() {
        list.arg("--filter").arg(format!("label={filter}"));
    }
    let Ok(output) = list.stderr(std::process::Stdio::null()).output() else {
        return;
    };
    let listed = String::from_utf8_lossy(&output.stdout);
    let ids: Vec<&str> = listed.split_whitespace().collect();
    if ids.is_empty() {
        return;
    }
    let _ = std::process::Command::new("docker")
        .args(["rm", "-fv"])
        .args(&ids)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Registers [`remove_at_exit`] with the C runtime, once. `atexit` stays an `unsafe` libc
/// call: neither std nor rustix offers a safe exit hook, and statics are never dropped.
#[cfg(unix)]
#[allow(unsafe_code)]
pub(super) fn register_atexit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `remove_at_exit` is an `extern "C" fn()` taking no arguments, as `atexit`
        // requires; it never unwinds (it catches panics) and only uses process-global state
        // that stays valid until the process ends.
        let rc = unsafe { libc::atexit(remove_at_exit) };
        if rc != 0 {
            tracing::warn!("atexit registration failed: test containers will leak");
        }
    });
}

#[cfg(not(unix))]
pub(super) fn register_atexit() {}

/// Removes every container this process started and did not remove yet (the shared pair,
/// leaked private pairs): through the Docker runtime (same client and configuration that
/// created them), else with the `docker` CLI.
extern "C" fn remove_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        if !CREATED_ANY.load(Ordering::SeqCst) || KEEP_AT_EXIT.load(Ordering::SeqCst) {
            return;
        }
        let removed = block_on_docker(async {
            match docker().await {
                Ok(docker) => remove_own(&docker).await.is_ok(),
                Err(_) => false,
            }
        });
        if !removed {
            remove_own_with_cli();
        }
    });
}
