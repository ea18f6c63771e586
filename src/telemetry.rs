//! Logging setup: text for people, or one JSON object a line for log shippers. Audit events
//! (deletes, restores, purges, collections — who did what) go to the target `berth::audit`.

use tracing_subscriber::EnvFilter;

/// The target of audit events: `RUST_LOG`-style filters can keep or drop them on their own
/// (`berth::audit=info`).
pub const AUDIT: &str = "berth::audit";

/// Installs the log subscriber with `filter` (checked by the configuration, which also reads
/// `RUST_LOG`), as JSON lines when `json`. Safe to call more than once: later calls do nothing.
pub fn init(filter: &str, json: bool) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if json {
        builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init()
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        builder.with_target(false).with_ansi(ansi).try_init()
    };
}
