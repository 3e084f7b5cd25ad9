//! Log set-up shared by the binaries: `tracing` with an `RUST_LOG` filter (default given
//! by the binary: `info` for the service, `warn` for `vote-tools`) and the format
//! chosen by `LOG_FORMAT` (`text` or `json`), to stderr.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::config::variables::RUST_LOG;

/// Installs the global subscriber. Calling it twice is harmless (the second call is a
/// no-op), so tests and binaries can both call it.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_env(RUST_LOG).unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only on a terminal: `docker logs` and log shippers get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
