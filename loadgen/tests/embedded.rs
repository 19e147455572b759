//! A small city against the real server, in-process: 200 drivers, 40 riders, 20 s.
//! Trips must complete and no protocol error may occur (`--max-error-rate 0`).
//!
//! The server is the `--embedded` one: this test compiles loadgen's own
//! `src/embedded.rs` (the server comes from the dev-dependency on dispatch-transport with
//! its `server` feature), so `cargo test --workspace` runs it without `--features`.

#[path = "../src/embedded.rs"]
mod embedded;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use dispatch_loadgen::Args;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_city_completes_trips_without_protocol_errors() {
    let server = embedded::EmbeddedServer::start(&[]).await.expect("server");
    // The demand map committed with loadgen (loadgen/data/README.md).
    let csv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/montreal_carshare_zones.csv");
    let mut argv: Vec<String> = [
        "loadgen",
        "--url",
        &server.url,
        "--drivers",
        "200",
        "--riders",
        "40",
        "--duration",
        "20s",
        "--drain",
        "5s",
        "--ping-interval-ms",
        "1000",
        "--request-rate",
        "4",
        "--time-scale",
        "30",
        "--seed",
        "7",
        "--max-error-rate",
        "0",
        "--quiet",
        "--steady-after",
        "5s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The server is this process: the capacity report samples it (its numbers include
    // loadgen's own work here, so only their presence and consistency are checked).
    argv.push("--server-pid".into());
    argv.push(std::process::id().to_string());
    argv.push("--demand-csv".into());
    argv.push(csv.display().to_string());
    let args = Args::parse_from(argv);
    let t = Instant::now();
    let out = dispatch_loadgen::run(args).await.expect("loadgen runs");
    let r = &out.report;
    eprintln!("loadgen took {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(r.clients.sessions_opened, 240, "{}", r.text());
    assert!(r.trips.completed > 0, "no trip completed:\n{}", r.text());
    assert_eq!(r.errors.unexpected, 0, "protocol errors:\n{}", r.text());
    assert!(r.anomalies.is_empty(), "protocol anomalies:\n{}", r.text());
    assert!(r.latency["request_to_offer"].count > 0, "{}", r.text());
    assert!(r.passed && out.exit_code == 0, "{}", r.text());
    let cap = r
        .cpu
        .server
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .unwrap_or_else(|| panic!("no capacity report:\n{}", r.text()));
    assert_eq!(cap.clients, 240, "{}", r.text());
    // 200 drivers at one ping a second, over a window of ~15 s.
    assert!(cap.pings > 1_000, "{}", r.text());
    assert!(cap.window_s > 5.0 && cap.window_s <= 20.0, "{}", r.text());
    let per_ping = cap.cpu_us_per_ping.expect("per ping");
    let p = cap.projection.as_ref().expect("projection");
    assert!(
        (p.cores - 250_000.0 * per_ping / 1e6).abs() < 1e-6,
        "{}",
        r.text()
    );
    assert!(
        r.text().contains("projection: 1,000,000 drivers"),
        "{}",
        r.text()
    );
    server.stop().await.expect("clean stop");
}
