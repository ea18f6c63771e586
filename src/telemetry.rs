//! Logging setup.

use tracing_subscriber::EnvFilter;

/// Installs the log subscriber with `filter` (checked by the configuration, which also reads
/// `RUST_LOG`). Safe to call more than once: later calls do nothing.
pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi).try_init();
}
