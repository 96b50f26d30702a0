//! Logging, set up once per process: JSON (one object per line, with the job's span fields) or
//! human-readable text, on stderr. `RUST_LOG` overrides `log.level`.

use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, LogFormat};

pub fn init(format: LogFormat, level: &str) -> Result<(), ConfigError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(&directives)
            .map_err(|e| ConfigError(format!("`RUST_LOG` is not a valid filter: {e}")))?,
        _ => EnvFilter::try_new(level)
            .map_err(|e| ConfigError(format!("`log.level` is not a valid filter: {e}")))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber; that is fine.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(())
}
