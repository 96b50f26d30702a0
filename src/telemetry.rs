//! Logging, set up once per process: JSON (one object per line, with the job's span fields) or
//! human-readable text, on stderr. `RUST_LOG` overrides `log.level`.
//!
//! A JSON line of a job whose request carried a `traceparent` also has `trace_id` and `span_id` at
//! its top level (besides inside `span`): log stores link a line to its trace on those top-level
//! names (Loki's derived fields, Elastic's `trace.id` mapping), and cannot reach into `span`.

use std::fmt;

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
    span::{Attributes, Id, Record},
};
use tracing_subscriber::{
    EnvFilter, Layer,
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::{self, Writer},
    },
    layer::{Context, SubscriberExt},
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::config::{ConfigError, LogFormat};

pub fn init(format: LogFormat, level: &str) -> Result<(), ConfigError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(&directives)
            .map_err(|e| ConfigError::key("RUST_LOG", format!("is not a valid filter: {e}")))?,
        _ => EnvFilter::try_new(level)
            .map_err(|e| ConfigError::key("log.level", format!("is not a valid filter: {e}")))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber; that is fine.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .event_format(json_lines())
            .finish()
            .with(TraceIdLayer)
            .try_init()
            .is_ok(),
        LogFormat::Text => builder.try_init().is_ok(),
    };
    Ok(())
}

/// One JSON object per line: the event's fields at the top level, the current span's in `span`,
/// and the trace context lifted from the span (with [`TraceIdLayer`] on the subscriber).
fn json_lines() -> WithTraceIds<format::Format<format::Json>> {
    WithTraceIds(
        format::Format::default()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false),
    )
}

/// A span's W3C trace context, taken from its `trace_id` and `span_id` fields (the job span's,
/// see `executor::handle`). Both are validated lowercase hex by `TraceContext::parse`.
#[derive(Clone, Debug, Default)]
struct TraceIds {
    trace_id: Option<String>,
    span_id: Option<String>,
}

impl Visit for TraceIds {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "trace_id" => self.trace_id = Some(value.to_owned()),
            "span_id" => self.span_id = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn fmt::Debug) {}
}

/// Keeps each span's [`TraceIds`] in its extensions for [`WithTraceIds`].
struct TraceIdLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for TraceIdLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut ids = TraceIds::default();
        attrs.record(&mut ids);
        if ids.trace_id.is_some()
            && let Some(span) = ctx.span(id)
        {
            span.extensions_mut().insert(ids);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        let mut ids = extensions.remove::<TraceIds>().unwrap_or_default();
        values.record(&mut ids);
        if ids.trace_id.is_some() {
            extensions.insert(ids);
        }
    }
}

/// The JSON line of the inner formatter, with the innermost span's trace context first.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let ids = ctx.event_scope().and_then(|mut scope| {
            scope.find_map(|span| span.extensions().get::<TraceIds>().cloned())
        });
        let Some(TraceIds {
            trace_id: Some(trace_id),
            span_id,
        }) = ids
        else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let Some(rest) = line.strip_prefix('{') else {
            return writer.write_str(&line);
        };
        let quoted = |s: &str| serde_json::to_string(s).map_err(|_| fmt::Error);
        write!(writer, "{{\"trace_id\":{},", quoted(&trace_id)?)?;
        if let Some(span_id) = span_id {
            write!(writer, "\"span_id\":{},", quoted(&span_id)?)?;
        }
        writer.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Everything the subscriber writes, for one test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_innermost_trace_context_at_the_top_level() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .event_format(json_lines())
            .with_writer(move || writer.clone())
            .finish()
            .with(TraceIdLayer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any span");
            let job = tracing::info_span!(
                "job",
                trace_id = "4bf92f3577b34da6a3ce929d0e0e4736",
                span_id = "00f067aa0ba902b7",
                request_id = "r-1"
            );
            let _job = job.enter();
            tracing::info!("inside the job");
            // A span without a trace context inherits its parent's.
            let inner = tracing::info_span!("lookup", page = 2);
            let _inner = inner.enter();
            tracing::info!(attempt = 1, "inside a child span");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        for line in &lines[1..] {
            assert_eq!(
                line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
                "{text}"
            );
            assert_eq!(line["span_id"], "00f067aa0ba902b7", "{text}");
        }
        assert_eq!(lines[1]["span"]["request_id"], "r-1");
        assert_eq!(lines[2]["attempt"], 1);
    }
}
