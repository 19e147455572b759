//! Traces over OTLP, on the real binary: a receiver on loopback decodes what `dispatchd`
//! POSTs to `/v1/traces` (real OTLP/HTTP protobuf, decoded with `opentelemetry-proto`'s
//! messages), and one ride over real WebSockets must arrive as one trace from the rider's
//! `request_ride` through the rider, trip and cell actors to the offer written to the
//! driver and the driver's accept, each span's parent present in it; location pings make
//! no span. A receiver that is down, or that never answers, must not stop rides, and the
//! spans that find the export queue full are counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use dispatch_tests::{Dispatchd, PICKUP, SLOW, eventually, north_of, now_ms, ride_to};
use dispatch_transport::wire::TripState;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use serde_json::{Value, json};

/// One received span: ids in hex, as backends show them.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    attributes: HashMap<String, String>,
    service_name: Option<String>,
}

/// An OTLP/HTTP receiver on loopback: every span of every request it decoded.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    bad_requests: Arc<Mutex<Vec<String>>>,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

async fn export(
    State(r): State<Receiver>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> (StatusCode, Vec<u8>) {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let req = match ExportTraceServiceRequest::decode(body) {
        Ok(req) if ct == "application/x-protobuf" => req,
        other => {
            let e = format!("content-type {ct:?}: {:?}", other.err());
            r.bad_requests.lock().unwrap().push(e);
            return (StatusCode::BAD_REQUEST, Vec::new());
        }
    };
    let mut got = r.spans.lock().unwrap();
    for rs in req.resource_spans {
        let service_name = rs.resource.as_ref().and_then(|res| {
            res.attributes
                .iter()
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
        });
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.push(Span {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    attributes: s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(&kv.value)))
                        .collect(),
                    service_name: service_name.clone(),
                });
            }
        }
    }
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Receiver {
    /// Serves on a free loopback port; its base URL (`--otlp-endpoint`).
    async fn start(&self) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/v1/traces", post(export))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        url
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

/// A ride's steps, each with the step its span must be the child of (`None`: the root).
const RIDE: &[(&str, Option<&str>)] = &[
    ("ws.request_ride", None),
    ("rider.request_ride", Some("ws.request_ride")),
    ("trip.dispatch", Some("rider.request_ride")),
    ("cell.query", Some("trip.dispatch")),
    ("driver.reserve_offer", Some("trip.dispatch")),
    ("ws.offer_write", Some("driver.reserve_offer")),
    ("ws.offer_answer", Some("ws.offer_write")),
    ("driver.command", Some("ws.offer_answer")),
    ("trip.command", Some("driver.command")),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ride_is_one_trace_from_request_ride_to_the_accept_and_pings_make_no_span() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let d = Dispatchd::builder("traces")
        .flags(&[
            "--otlp-endpoint",
            &url,
            "--otlp-sample-ratio",
            "1",
            "--log-format",
            "json",
        ])
        // The standard variable names the service; debug lines of the actors are logged
        // inside the ride's spans.
        .env("OTEL_SERVICE_NAME", "dispatchd-under-test")
        // No export on a timer within the test: every span arrives through the flush at
        // SIGTERM (or a full batch), so the flush is what is tested.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .env("DISPATCH_LOG", "info,dispatch_actors=debug")
        .start()
        .await;
    // The driver pings on its way online, and again once assigned.
    let mut ride = ride_to(&d, TripState::DriverAssigned).await;
    for i in 0..3 {
        let at = north_of(PICKUP, 150.0 - 50.0 * i as f64);
        ride.d
            .ok(json!({"type": "location", "lat": at.0, "lng": at.1, "ts": now_ms()}))
            .await;
    }
    // SIGTERM flushes what is still queued before the process ends.
    let log = d.stop_clean().await;

    let spans = receiver.spans();
    assert!(
        receiver.bad_requests.lock().unwrap().is_empty(),
        "{:?}",
        receiver.bad_requests
    );
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "ws.request_ride")
        .collect();
    assert_eq!(roots.len(), 1, "one request, one root span: {spans:#?}");
    let trace = roots[0].trace_id.clone();
    for s in &spans {
        // One ride, one trace: nothing else is traced (no ping, no session span).
        assert_eq!(s.trace_id, trace, "a span outside the ride's trace: {s:#?}");
        assert!(
            RIDE.iter().any(|(n, _)| *n == s.name),
            "a span that is no step of a ride: {s:#?}"
        );
        assert_eq!(
            s.service_name.as_deref(),
            Some("dispatchd-under-test"),
            "{s:#?}"
        );
    }
    for (name, parent) in RIDE {
        let of_step: Vec<&&Span> = by_id.values().filter(|s| s.name == *name).collect();
        assert!(!of_step.is_empty(), "no {name} span in {spans:#?}");
        for s in of_step {
            match parent {
                None => assert!(s.parent_span_id.is_empty(), "{name} is the root: {s:#?}"),
                Some(p) => {
                    let up = by_id.get(s.parent_span_id.as_str()).unwrap_or_else(|| {
                        panic!(
                            "{name}'s parent {} was not received: {spans:#?}",
                            s.parent_span_id
                        )
                    });
                    assert_eq!(up.name, *p, "{name}'s parent: {s:#?}");
                }
            }
        }
    }
    // The steps after the offer are the driver's accept of this trip.
    for name in ["ws.offer_answer", "driver.command", "trip.command"] {
        let s = spans.iter().find(|s| s.name == name).unwrap();
        assert_eq!(
            s.attributes.get("command").map(String::as_str),
            Some("accept"),
            "{s:#?}"
        );
    }
    let answer = spans.iter().find(|s| s.name == "ws.offer_answer").unwrap();
    assert_eq!(
        answer.attributes.get("trip_id"),
        Some(&ride.trip.trip_id),
        "{answer:#?}"
    );

    // Log lines inside the ride's spans carry its trace id.
    let carries_trace = |l: &Value| {
        l["spans"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["trace_id"] == trace.as_str()))
    };
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        lines.iter().any(carries_trace),
        "no log line carries the trace id {trace}:\n{log}"
    );
}

/// A receiver that refuses connections, and one that accepts them and never answers:
/// rides go on; with a queue of one span, the spans that find it full are dropped and
/// counted; SIGTERM still ends the process (the flush is bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_down_or_stuck_does_not_stop_rides() {
    // Nothing listens on a port just released.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    // Accepts, reads nothing, answers nothing, keeps every connection open.
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stuck_url = format!("http://{}", stuck.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = stuck.accept().await {
            held.push(c);
        }
    });
    for (name, url) in [("traces-down", down), ("traces-stuck", stuck_url)] {
        let d = Dispatchd::builder(name)
            .flags(&[
                "--otlp-endpoint",
                &url,
                "--otlp-sample-ratio",
                "1",
                "--otlp-queue-max",
                "1",
                "--otlp-export-timeout-ms",
                "5000",
            ])
            .start()
            .await;
        // The export fails (or hangs) from the first span on; the ride goes on meanwhile.
        ride_to(&d, TripState::Completed).await;
        if name == "traces-stuck" {
            // The first export hangs: of the spans ended meanwhile, one waits in the
            // queue and the others are dropped, and counted.
            let series = r#"dispatch_bound_hits_total{bound="otlp_span_queue"}"#;
            eventually("dropped spans counted", || async {
                (d.metric_value(series).await > 0.0).then_some(())
            })
            .await;
        }
        let mut d = d;
        d.sigterm();
        let st = d.exited_within(SLOW).await;
        assert_eq!(st.code(), Some(0), "{name}: {st}\n{}", d.log_text());
        assert!(
            d.log_text().contains("could not export traces over OTLP") || name == "traces-stuck",
            "{name}: the failed export is logged\n{}",
            d.log_text()
        );
    }
}

/// A bad trace setting stops the start with a message that names it, as every flag's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_trace_settings_are_refused_at_start() {
    // (flags, an environment variable, what the error names)
    type Case = (
        &'static [&'static str],
        Option<(&'static str, &'static str)>,
        &'static str,
    );
    let cases: [Case; 6] = [
        (
            &["--otlp-endpoint", "https://collector:4318"],
            None,
            "--otlp-endpoint",
        ),
        (
            &["--otlp-endpoint", "collector:4318"],
            None,
            "--otlp-endpoint",
        ),
        (
            &[],
            Some(("OTEL_EXPORTER_OTLP_ENDPOINT", "grpc://c:4317")),
            "--otlp-endpoint",
        ),
        (&["--otlp-sample-ratio", "1.5"], None, "--otlp-sample-ratio"),
        (&["--otlp-queue-max", "0"], None, "--otlp-queue-max"),
        (
            &["--otlp-endpoint", "http://c:4318"],
            Some(("OTEL_BSP_SCHEDULE_DELAY", "soon")),
            "OTEL_BSP_SCHEDULE_DELAY",
        ),
    ];
    for (flags, env, named) in cases {
        let mut b = Dispatchd::builder("bad-trace-flag")
            .flags(flags)
            .stderr_apart();
        if let Some((k, v)) = env {
            b = b.env(k, v);
        }
        let mut d = b.spawn();
        let status = d.exits_unready().await;
        assert_eq!(status.code(), Some(2), "{flags:?} {env:?}");
        let err = d.stderr_text();
        assert!(err.contains(named), "{flags:?} {env:?}: {err}");
    }
}
