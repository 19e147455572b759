//! Logs and traces: the process's one `tracing` subscriber, and, when an OTLP endpoint is
//! configured, the export of ride traces to it over OTLP/HTTP (protobuf).
//!
//! What is exported: only spans of the target [`TARGET`] (a ride's steps, see
//! `dispatch_actors::tracecontext`), never the long-lived session spans or the per-message
//! actor spans, and never anything for a location ping. Sampling is parent-based with a
//! ratio for new traces (`--otlp-sample-ratio`), decided once at the rider's
//! `request_ride`; an unsampled request makes no further span.
//!
//! Export never blocks a hot path: a finished span is offered to a bounded queue
//! (`--otlp-queue-max`) with `try_send`; a span that finds it full is dropped and counted
//! in `dispatch_bound_hits_total{bound="otlp_span_queue"}`. One task takes batches off the
//! queue and exports them, each export bounded by `--otlp-export-timeout-ms` (the
//! exporter's own retries included). The SDK's `BatchSpanProcessor` is not used because
//! it counts its drops only privately. On shutdown the queue is flushed, bounded by the
//! same timeout.
//!
//! Without an endpoint (`--otlp-endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT`) none of
//! this exists: no layer, no queue, no task, and the actors make no span.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args as ClapArgs;
use dispatch_actors::messages::{DriverCommand, RiderCommand};
use dispatch_actors::session::Outbound;
pub use dispatch_actors::tracecontext::TARGET;
use dispatch_actors::tracecontext::{self, Trace, TraceContext};
use dispatch_engine::TripId;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use prometheus::IntCounter;
use tokio::sync::{mpsc, oneshot};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::server::LogFormat;

/// The flags of traces over OTLP (flattened into `dispatchd`'s `Args`).
#[derive(Debug, Clone, ClapArgs)]
pub struct TraceArgs {
    /// Base URL of an OTLP/HTTP receiver (a collector, Jaeger, Tempo), such as
    /// `http://otel-collector:4318`; spans are POSTed to `<url>/v1/traces` as protobuf.
    /// Unset: `OTEL_EXPORTER_OTLP_ENDPOINT`; both unset: no traces are exported, at no
    /// cost. Plain `http://` only (the exporter has no TLS: use a local collector).
    #[arg(long, env = "DISPATCH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans. Unset: `OTEL_SERVICE_NAME`, else `dispatchd`.
    #[arg(long, env = "DISPATCH_OTLP_SERVICE_NAME")]
    pub otlp_service_name: Option<String>,
    /// Share of ride requests traced (0 to 1), decided at the rider's `request_ride` and
    /// followed by every later step of that ride (parent-based). Location pings are never
    /// traced.
    #[arg(long, env = "DISPATCH_OTLP_SAMPLE_RATIO", default_value_t = 0.01)]
    pub otlp_sample_ratio: f64,
    /// Finished spans waiting for export at most; more are dropped and counted in
    /// `dispatch_bound_hits_total{bound="otlp_span_queue"}`.
    #[arg(long, env = "DISPATCH_OTLP_QUEUE_MAX", default_value_t = 2048)]
    pub otlp_queue_max: usize,
    /// How long one export (one batch, the exporter's retries included) and the flush at
    /// shutdown may take.
    #[arg(long, env = "DISPATCH_OTLP_EXPORT_TIMEOUT_MS", default_value_t = 5_000)]
    pub otlp_export_timeout_ms: u64,
}

/// The validated trace configuration: `endpoint` is `None` when traces are off.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// The full URL spans are POSTed to (`…/v1/traces`).
    pub endpoint: Option<String>,
    pub service_name: String,
    pub sample_ratio: f64,
    pub queue_max: usize,
    pub export_timeout: Duration,
    /// How long a finished span may wait for its batch to fill.
    pub batch_delay: Duration,
}

/// Spans in one export request at most.
const BATCH_MAX: usize = 512;
/// How long a finished span may wait for its batch to fill, unless the standard
/// `OTEL_BSP_SCHEDULE_DELAY` (milliseconds) says otherwise.
const BATCH_DELAY: Duration = Duration::from_millis(500);

impl TraceArgs {
    pub fn validate(self) -> Result<TraceConfig, String> {
        let endpoint = self
            .otlp_endpoint
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .filter(|e| !e.trim().is_empty());
        let endpoint = match endpoint {
            None => None,
            Some(e) => Some(traces_url(&e)?),
        };
        let service_name = self
            .otlp_service_name
            .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok())
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| "dispatchd".to_owned());
        if !(self.otlp_sample_ratio.is_finite() && (0.0..=1.0).contains(&self.otlp_sample_ratio)) {
            return Err("--otlp-sample-ratio must be from 0 to 1".into());
        }
        if !(1..=1_000_000).contains(&self.otlp_queue_max) {
            return Err("--otlp-queue-max must be from 1 to 1000000".into());
        }
        if !(100..=120_000).contains(&self.otlp_export_timeout_ms) {
            return Err("--otlp-export-timeout-ms must be from 100 to 120000".into());
        }
        let batch_delay = match std::env::var("OTEL_BSP_SCHEDULE_DELAY") {
            Err(_) => BATCH_DELAY,
            Ok(ms) => match ms.trim().parse::<u64>() {
                Ok(ms) if (1..=3_600_000).contains(&ms) => Duration::from_millis(ms),
                _ => {
                    return Err(format!(
                        "OTEL_BSP_SCHEDULE_DELAY {ms:?} must be milliseconds from 1 to 3600000"
                    ));
                }
            },
        };
        Ok(TraceConfig {
            batch_delay,
            endpoint,
            service_name,
            sample_ratio: self.otlp_sample_ratio,
            queue_max: self.otlp_queue_max,
            export_timeout: Duration::from_millis(self.otlp_export_timeout_ms),
        })
    }
}

/// `http://host[:port][/path]` → `…/v1/traces`, as the OTLP specification builds the
/// per-signal URL from `OTEL_EXPORTER_OTLP_ENDPOINT`.
fn traces_url(base: &str) -> Result<String, String> {
    let bad = |why: &str| format!("--otlp-endpoint {base:?}: {why}");
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| bad("must start with http:// (the OTLP exporter has no TLS)"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains(['@', '?', '#', ' ']) {
        return Err(bad("must be http://host[:port][/path]"));
    }
    let url = format!("{}/v1/traces", base.trim_end_matches('/'));
    url.parse::<axum::http::Uri>()
        .map_err(|e| bad(&e.to_string()))?;
    Ok(url)
}

/// The count of spans dropped at a full queue: the server's bound counter, set by
/// [`count_drops_in`] once the metrics exist.
static DROPPED: Mutex<Option<IntCounter>> = Mutex::new(None);

/// Counts dropped spans in `counter` from now on.
pub fn count_drops_in(counter: IntCounter) {
    *DROPPED.lock().unwrap_or_else(|e| e.into_inner()) = Some(counter);
}

fn dropped() {
    if let Some(c) = DROPPED.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        c.inc();
    }
}

enum Control {
    Flush(oneshot::Sender<()>),
}

/// A span processor that never blocks: a bounded queue in front of one export task.
#[derive(Debug)]
struct Bounded {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::Sender<Control>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Control")
    }
}

impl SpanProcessor for Bounded {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.spans.try_send(span) {
            dropped();
        }
    }

    /// Asks for a flush without waiting for it: [`Telemetry::shutdown`] waits, bounded.
    fn force_flush(&self) -> OTelSdkResult {
        let (tx, _rx) = oneshot::channel();
        self.control
            .try_send(Control::Flush(tx))
            .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task: batches of up to `batch_max` spans (at most [`BATCH_MAX`], at most
/// the queue's size), sent when full, after `delay`, or on a flush; each export
/// bounded by `timeout`. Spans held: the queue, plus one batch being filled or sent.
async fn export_loop<E: SpanExporter>(
    exporter: E,
    mut spans: mpsc::Receiver<SpanData>,
    mut control: mpsc::Receiver<Control>,
    timeout: Duration,
    batch_max: usize,
    delay: Duration,
) {
    let mut batch = Vec::with_capacity(batch_max);
    let mut failures = Failures::default();
    let mut tick = tokio::time::interval(delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let flush = tokio::select! {
            s = spans.recv() => match s {
                Some(s) => {
                    batch.push(s);
                    if batch.len() < batch_max {
                        continue;
                    }
                    None
                }
                None => break,
            },
            c = control.recv() => match c {
                Some(Control::Flush(done)) => {
                    while batch.len() < batch_max && let Ok(s) = spans.try_recv() {
                        batch.push(s);
                    }
                    Some(done)
                }
                None => break,
            },
            _ = tick.tick() => None,
        };
        // A flush exports everything queued when it was asked, batch by batch.
        loop {
            if !batch.is_empty() {
                let sent = std::mem::replace(&mut batch, Vec::with_capacity(batch_max));
                let n = sent.len();
                match tokio::time::timeout(timeout, exporter.export(sent)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failures.failed(n, &e.to_string()),
                    Err(_) => failures.failed(n, "timed out"),
                }
            }
            if flush.is_none() {
                break;
            }
            while batch.len() < batch_max
                && let Ok(s) = spans.try_recv()
            {
                batch.push(s);
            }
            if batch.is_empty() {
                break;
            }
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

/// Failed exports, logged at most once a minute (a receiver that is down must not flood
/// the logs), with how many spans were lost since the last line.
#[derive(Default)]
struct Failures {
    lost: usize,
    last_log: Option<tokio::time::Instant>,
}

impl Failures {
    fn failed(&mut self, spans: usize, error: &str) {
        self.lost += spans;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            tracing::warn!(
                spans_lost = self.lost,
                error,
                "could not export traces over OTLP"
            );
            self.lost = 0;
            self.last_log = Some(tokio::time::Instant::now());
        }
    }
}

/// The running exporter: flush it with [`Telemetry::shutdown`] before the runtime stops.
pub struct Telemetry {
    provider: SdkTracerProvider,
    control: mpsc::Sender<Control>,
    timeout: Duration,
    task: tokio::task::JoinHandle<()>,
}

impl Telemetry {
    /// Exports what is queued (bounded by the export timeout), then stops the exporter.
    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Control::Flush(tx)).await.is_ok()
            && tokio::time::timeout(self.timeout, rx).await.is_err()
        {
            tracing::warn!("traces not all exported at shutdown: the OTLP receiver is slow");
        }
        let _ = self.provider.shutdown();
        self.task.abort();
    }
}

/// Installs the process's subscriber: logs in `format`, through `filter` (the binary's
/// `DISPATCH_LOG`), and, if `traces.endpoint` is set, the OTLP export of ride spans, which
/// `filter` does not apply to. Must run inside the tokio runtime (the export task is
/// spawned on it).
pub fn init(
    filter: EnvFilter,
    format: LogFormat,
    traces: &TraceConfig,
) -> anyhow::Result<Option<Telemetry>> {
    // Colours only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let Some(url) = &traces.endpoint else {
        // Traces off: the subscriber is logs alone, exactly as without this module.
        match format {
            LogFormat::Text => tracing_subscriber::fmt()
                .with_ansi(ansi)
                .with_env_filter(filter)
                .init(),
            LogFormat::Json => tracing_subscriber::fmt()
                .json()
                .with_env_filter(filter)
                .init(),
        }
        return Ok(None);
    };
    // A ride's spans pass the log filter, so the log lines inside them carry `trace_id`.
    let filter = filter.add_directive(format!("{TARGET}=info").parse()?);
    let (tracer, telemetry) = exporter(url, traces)?;
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(ansi).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().boxed(),
    };
    // The exporter sees the ride's spans only (a per-layer filter): the per-message actor
    // spans, one per location ping among them, never reach it.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target(TARGET, tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    let telemetry = Some(telemetry);
    if telemetry.is_some() {
        dispatch_actors::tracecontext::enable();
        tracing::info!(
            endpoint = traces.endpoint.as_deref().unwrap_or(""),
            service_name = %traces.service_name,
            sample_ratio = traces.sample_ratio,
            "exporting ride traces over OTLP"
        );
    }
    Ok(telemetry)
}

fn exporter(url: &str, traces: &TraceConfig) -> anyhow::Result<(SdkTracer, Telemetry)> {
    let resource = Resource::builder()
        .with_service_name(traces.service_name.clone())
        .build();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(traces.export_timeout)
        .build()?;
    exporter.set_resource(&resource);
    let (spans_tx, spans_rx) = mpsc::channel(traces.queue_max);
    let (control_tx, control_rx) = mpsc::channel(4);
    let task = tokio::spawn(export_loop(
        exporter,
        spans_rx,
        control_rx,
        traces.export_timeout,
        BATCH_MAX.min(traces.queue_max),
        traces.batch_delay,
    ));
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Bounded {
            spans: spans_tx,
            control: control_tx.clone(),
        })
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            traces.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("dispatchd");
    Ok((
        tracer,
        Telemetry {
            provider,
            control: control_tx,
            timeout: traces.export_timeout,
            task,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_a_plain_http_base_url() {
        assert_eq!(
            traces_url("http://collector:4318").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4318/otlp/").unwrap(),
            "http://127.0.0.1:4318/otlp/v1/traces"
        );
        for bad in [
            "https://collector:4318",
            "collector:4318",
            "http://",
            "http://u@h:1",
            "http://h:1 x",
        ] {
            assert!(traces_url(bad).is_err(), "{bad}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The session's steps of a ride's trace.
// ---------------------------------------------------------------------------------------

/// A rider's frame: a `request_ride` starts a trace (when tracing is on and the sampler
/// keeps it); the span and the context the rider's actor continues. Nothing else is traced.
pub fn rider_frame(cmd: &RiderCommand) -> (tracing::Span, Trace) {
    if !matches!(cmd, RiderCommand::RequestRide(_)) {
        return (tracing::Span::none(), None);
    }
    tracecontext::root(
        || tracing::info_span!(target: TARGET, "ws.request_ride", trace_id = tracing::field::Empty),
    )
}

/// What a driver's session remembers of the last traced offer it wrote, so that the
/// driver's answer to it continues the offer's trace (shared by the session's reader and
/// writer; touched only for traced offers and for accepts and declines). Nothing at all
/// when tracing is off.
#[derive(Debug, Clone, Default)]
pub struct OfferTrace(Option<Arc<Mutex<LastOffer>>>);

/// The trip and the write span of the last traced offer a session wrote.
type LastOffer = Option<(TripId, TraceContext)>;

impl OfferTrace {
    /// A session's: empty when tracing is off.
    pub fn new() -> OfferTrace {
        OfferTrace(tracecontext::enabled().then(Arc::default))
    }

    /// The span of writing `m` to the app: a traced offer's, else none.
    pub fn writing(&self, m: &Outbound) -> tracing::Span {
        let Outbound::Offer(offer) = m else {
            return tracing::Span::none();
        };
        let span =
            dispatch_actors::traced_span!(offer.trace, "ws.offer_write", trip_id = %offer.trip_id);
        if let (Some(slot), Some(cx)) = (&self.0, TraceContext::of(&span)) {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((offer.trip_id.clone(), cx));
        }
        span
    }

    /// A driver's frame: an accept or a decline of the last traced offer continues its
    /// trace; anything else (a location ping above all) is not traced and costs nothing.
    pub fn answer(&self, cmd: &DriverCommand) -> (tracing::Span, Trace) {
        let (DriverCommand::Accept(trip) | DriverCommand::Decline(trip)) = cmd else {
            return (tracing::Span::none(), None);
        };
        let Some(slot) = &self.0 else {
            return (tracing::Span::none(), None);
        };
        // Taken by the answer to that offer only: a frame naming another trip leaves it.
        let parent = {
            let mut last = slot.lock().unwrap_or_else(|e| e.into_inner());
            match last.take() {
                Some((t, cx)) if t == *trip => Some(cx),
                other => {
                    *last = other;
                    None
                }
            }
        };
        let span = dispatch_actors::traced_span!(parent, "ws.offer_answer", command = cmd.kind(), trip_id = %trip);
        let cx = TraceContext::of(&span);
        (span, cx)
    }
}
