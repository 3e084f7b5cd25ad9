//! Replica logs: one file per replica (`<log_dir>/<name>.log`, stdout and stderr of every
//! start, each start opened by a [`START_MARKER`] line), and reading their tails for
//! error messages.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The line the fleet writes into a replica's log before each start, followed by the
/// start's number.
pub const START_MARKER: &str = "--- vote-testkit fleet: start #";

/// Lines of a replica's log quoted in errors.
pub(super) const LOG_TAIL_LINES: usize = 20;

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
