//! Where the `vote-aggregator` binary a fleet runs is: the ordinary build next to the
//! current executable (or `VOTE_AGGREGATOR_BIN`), or the chaos suite's separate
//! fault-injection build (or `VOTE_AGGREGATOR_FAULT_BIN`). Errors say how to build it.

use std::path::PathBuf;

use anyhow::{Context, bail};

/// Environment variable naming the `vote-aggregator` binary to run (overrides the
/// lookup next to the current executable).
pub const BINARY_ENV: &str = "VOTE_AGGREGATOR_BIN";

/// Environment variable naming the fault-injection `vote-aggregator` binary.
pub const FAULT_BINARY_ENV: &str = "VOTE_AGGREGATOR_FAULT_BIN";

/// Folder of `target/<profile>/` that holds the fault-injection build.
pub const FAULT_BINARY_DIR: &str = "fault-injection";

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
