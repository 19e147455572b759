//! The trace context of one ride request, carried inside the actor messages from the
//! rider's `request_ride` to the offer written to the driver and the driver's accept.
//!
//! A ride's spans are `tracing` spans of the target [`TARGET`]: only those reach the
//! OTLP exporter (the transport's `telemetry` filters on it), so the long-lived session
//! spans and the per-message actor spans stay out of traces. Each actor that takes a
//! traced message opens its span as a child of the [`TraceContext`] the message carries
//! ([`traced_span!`]), and what it sends on carries its own span's context in turn: the
//! context travels as plain serializable data, never through thread-locals, so it would
//! cross nodes with the message.
//!
//! Only a sampled trace is carried: an unsampled request (and every message when tracing
//! is off, or a location ping at any time) carries `None`, and no span is made for it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of the spans exported over OTLP.
pub const TARGET: &str = "dispatch_trace";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the making of root spans on (the transport does, once its OTLP exporter is set
/// up). Off, a request costs one atomic load and no span.
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

/// Whether traces are exported at all.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A sampled span's identity: the parent of the next step's span. Serialized as a W3C
/// `traceparent` (`00-<trace id>-<span id>-01`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
}

/// What a message carries: `None` when it is not part of a sampled trace.
pub type Trace = Option<TraceContext>;

impl TraceContext {
    /// The context of `span`, if it is part of a sampled trace.
    pub fn of(span: &tracing::Span) -> Trace {
        if span.is_none() || !enabled() {
            return None;
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        (sc.is_valid() && sc.is_sampled()).then(|| TraceContext {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        })
    }

    /// The trace id as OTLP backends show it (32 hex digits), for log lines.
    pub fn trace_id(&self) -> impl fmt::Display + use<> {
        TraceIdHex(self.trace_id)
    }

    /// The OpenTelemetry context whose (remote) span is this one.
    pub fn otel_context(&self) -> opentelemetry::Context {
        let sc = SpanContext::new(
            TraceId::from(self.trace_id),
            SpanId::from(self.span_id),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        opentelemetry::Context::new().with_remote_span_context(sc)
    }
}

struct TraceIdHex(u128);

impl fmt::Display for TraceIdHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl From<TraceContext> for String {
    fn from(c: TraceContext) -> String {
        format!("00-{:032x}-{:016x}-01", c.trace_id, c.span_id)
    }
}

impl TryFrom<String> for TraceContext {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("not a sampled W3C traceparent: {s:?}");
        let mut parts = s.split('-');
        let (Some("00"), Some(t), Some(sp), Some("01"), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let hex = |x: &str, n: usize| x.len() == n && x.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(t, 32) || !hex(sp, 16) {
            return Err(bad());
        }
        let trace_id = u128::from_str_radix(t, 16).map_err(|_| bad())?;
        let span_id = u64::from_str_radix(sp, 16).map_err(|_| bad())?;
        if trace_id == 0 || span_id == 0 {
            return Err(bad());
        }
        Ok(TraceContext { trace_id, span_id })
    }
}

/// Makes `span` a child of `parent` (its OpenTelemetry parent; its `tracing` parent stays
/// the span around it, so log lines keep the actor's fields).
pub fn with_parent(span: tracing::Span, parent: TraceContext) -> tracing::Span {
    let _ = span.set_parent(parent.otel_context());
    span
}

/// A root span (no parent: a new trace), made only when tracing is on, with its
/// `trace_id` field recorded once the sampler has decided. Returns the span and its
/// context (`None`: not sampled, nothing further is traced).
pub fn root(make: impl FnOnce() -> tracing::Span) -> (tracing::Span, Trace) {
    if !enabled() {
        return (tracing::Span::none(), None);
    }
    let span = make();
    let cx = TraceContext::of(&span);
    if let Some(c) = cx {
        span.record("trace_id", tracing::field::display(c.trace_id()));
    }
    (span, cx)
}

/// The span of one step of a traced ride: a child of the message's trace context, of the
/// target [`TARGET`], carrying the `trace_id` (for log lines); `Span::none()`, which costs
/// nothing, when the message carries no trace.
///
/// `traced_span!(msg_trace, "rider.request_ride", rider_id = %id)`
#[macro_export]
macro_rules! traced_span {
    ($parent:expr, $name:literal $(, $($fields:tt)*)?) => {
        match $parent {
            None => ::tracing::Span::none(),
            Some(p) => $crate::tracecontext::with_parent(
                ::tracing::info_span!(
                    target: "dispatch_trace",
                    $name,
                    trace_id = %p.trace_id()
                    $(, $($fields)*)?
                ),
                p,
            ),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_travels_as_a_traceparent_and_bad_ones_are_refused() {
        let c = TraceContext {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(
            s,
            "\"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\""
        );
        assert_eq!(serde_json::from_str::<TraceContext>(&s).unwrap(), c);
        assert_eq!(c.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(
                serde_json::from_str::<TraceContext>(&format!("{bad:?}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn without_tracing_nothing_is_made_or_carried() {
        let (span, cx) = root(|| tracing::info_span!(target: "dispatch_trace", "x"));
        assert!(span.is_none() && cx.is_none());
        let none: Trace = None;
        assert!(traced_span!(none, "y").is_none());
    }
}
