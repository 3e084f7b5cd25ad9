//! Where the `vote-aggregator` binary a fleet runs is: the ordinary build next to the
//! current executable (or `VOTE_AGGREGATOR_BIN`), or the chaos suite's separate
//! fault-injection build (or `VOTE_AGGREGATOR_FAULT_BIN`). Errors say how to build it.

use std::path::{Path, PathBuf};

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
/// Cargo does not rebuild it (only `make fault-build` does), so a binary found by the
/// lookup is refused when a source of the service is newer than it: a chaos run must
/// never test yesterday's code. (A binary named by the variable is taken as it is.)
///
/// # Errors
/// As [`aggregator_binary`], and when the binary is older than the service's sources.
pub fn fault_injection_binary() -> anyhow::Result<PathBuf> {
    const HINT: &str = "make fault-build";
    let explicit = std::env::var_os(FAULT_BINARY_ENV).is_some_and(|v| !v.is_empty());
    let path = binary(
        FAULT_BINARY_ENV,
        &format!("{FAULT_BINARY_DIR}/vote-aggregator"),
        HINT,
    )?;
    if !explicit && let Some(newer) = newer_service_source(&path) {
        bail!(
            "the fault-injection build at {} is older than {}: rebuild it with `{HINT}`",
            path.display(),
            newer.display()
        );
    }
    Ok(path)
}

/// The service's sources as this kit was compiled next to them: the crate folder
/// (its `src/` and manifest) and the workspace's `Cargo.lock`.
const SERVICE_SOURCES: [&str; 3] = [
    concat!(env!("CARGO_MANIFEST_DIR"), "/../aggregator/src"),
    concat!(env!("CARGO_MANIFEST_DIR"), "/../aggregator/Cargo.toml"),
    concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"),
];

/// A source of the service modified after `binary` was written, if any (none when the
/// sources are not on this machine).
fn newer_service_source(binary: &Path) -> Option<PathBuf> {
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let mut pending: Vec<PathBuf> = SERVICE_SOURCES.iter().map(PathBuf::from).collect();
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        } else if meta.modified().is_ok_and(|m| m > built) {
            return Some(path);
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_older_than_the_service_sources_is_stale_and_a_newer_one_is_not() {
        let dir = std::env::temp_dir().join(format!("fault-binary-age-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let old = dir.join("old");
        std::fs::write(&old, b"x").expect("write");
        let epoch = std::fs::File::options()
            .write(true)
            .open(&old)
            .expect("open");
        epoch
            .set_modified(std::time::SystemTime::UNIX_EPOCH)
            .expect("set mtime");
        assert!(
            newer_service_source(&old).is_some(),
            "every source is newer than 1970"
        );
        let new = dir.join("new");
        std::fs::write(&new, b"x").expect("write");
        let future = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
        let f = std::fs::File::options()
            .write(true)
            .open(&new)
            .expect("open");
        f.set_modified(future).expect("set mtime");
        assert_eq!(newer_service_source(&new), None);
        std::fs::remove_dir_all(&dir).ok();
    }
}
