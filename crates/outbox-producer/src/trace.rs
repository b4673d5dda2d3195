//! W3C trace context (`traceparent`, `tracestate`) from an OpenTelemetry
//! context, as event headers: the tailer passes them through unchanged, so
//! the trace goes on from the producer's transaction to the subscriber.
//! Behind the cargo feature `trace-context`.

use crate::NewEvent;
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;

impl NewEvent<'_> {
    /// Adds the current OpenTelemetry span's trace context: one call in a
    /// handler that runs inside a span. Nothing is added outside a valid
    /// span, or when the headers would grow past their limit.
    pub fn with_trace_context(self) -> Self {
        self.with_trace_context_of(&Context::current())
    }

    /// As [`NewEvent::with_trace_context`], from `context`.
    pub fn with_trace_context_of(mut self, context: &Context) -> Self {
        let span = context.span();
        let span = span.span_context();
        if !span.is_valid() {
            return self;
        }
        let parent = format!(
            "00-{}-{}-{:02x}",
            span.trace_id(),
            span.span_id(),
            span.trace_flags().to_u8()
        );
        self.add_header("traceparent".into(), parent);
        let state = span.trace_state().header();
        if !state.is_empty() {
            self.add_header("tracestate".into(), state);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    #[test]
    fn the_current_span_becomes_traceparent_and_tracestate() {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).unwrap(),
        );
        let context = Context::new().with_remote_span_context(span);
        let payload = serde_json::json!({});
        let event =
            NewEvent::new("chat", "1", "message.created", &payload).with_trace_context_of(&context);
        let headers: Vec<_> = event.headers().collect();
        assert_eq!(
            headers,
            [
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                ),
                ("tracestate", "vendor=x"),
            ]
        );
        // Outside a span: nothing.
        let none = NewEvent::new("chat", "1", "message.created", &payload)
            .with_trace_context_of(&Context::new());
        assert_eq!(none.headers().count(), 0);
    }
}
