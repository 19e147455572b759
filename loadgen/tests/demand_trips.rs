//! `--demand-trips` (issue 17 part 4): three minutes of the real Manhattan day (08:00 to
//! 08:03, 86 trips) replayed at ×30 against the real server over real WebSockets. Every
//! trip of the slice must be requested once, from its own pickup to its own drop-off, as
//! the server stored them (read back from `--ack-log`'s `request_ride` replies), and the
//! file is read here on its own (not through loadgen's reader) to say what the slice is.

#[path = "../src/embedded.rs"]
mod embedded;

use std::path::PathBuf;

use clap::Parser;
use dispatch_loadgen::Args;

/// `(pickup, dropoff)` rounded to 1e-6 degrees, as text, for a multiset comparison.
type Points = (String, String);

fn point(lat: f64, lng: f64) -> String {
    format!("{lat:.6},{lng:.6}")
}

/// The file's trips of 08:00:00–08:02:59, read directly.
fn slice_of_the_file(path: &PathBuf) -> Vec<Points> {
    let text = std::fs::read_to_string(path).expect("trips file");
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let minute = &f[0][11..16];
        if ["08:00", "08:01", "08:02"].contains(&minute) {
            let n = |i: usize| f[i].parse::<f64>().expect("number");
            out.push((point(n(4), n(5)), point(n(6), n(7))));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_of_the_day_is_requested_trip_by_trip_at_its_own_points() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data");
    let file = data.join("nyc_taxi_2011-02-01_manhattan.csv");
    let want = slice_of_the_file(&file);
    assert_eq!(want.len(), 86, "the slice of the committed file");
    let server = embedded::EmbeddedServer::start(&[]).await.expect("server");
    let work = tempfile::tempdir().expect("tempdir");
    let acks = work.path().join("acks.jsonl");
    let argv: Vec<String> = [
        "loadgen",
        "--url",
        &server.url,
        "--demand-trips",
        file.to_str().unwrap(),
        "--demand-from",
        "08:00",
        "--demand-hours",
        "0.05",
        "--time-scale",
        "30",
        "--drivers",
        "60",
        // More riders than trips: none is skipped for want of an idle rider.
        "--riders",
        "120",
        "--cancel-prob",
        "0",
        "--drain",
        "2s",
        "--seed",
        "3",
        "--quiet",
        "--max-error-rate",
        "0",
        "--ack-log",
        acks.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = dispatch_loadgen::run(Args::parse_from(argv))
        .await
        .expect("loadgen runs");
    let r = &out.report;
    assert_eq!(r.trips.arrivals_skipped_all_riders_busy, 0, "{}", r.text());
    assert_eq!(r.trips.requested, want.len() as u64, "{}", r.text());
    assert_eq!(r.errors.unexpected, 0, "{}", r.text());
    assert!(r.latency["request_to_offer"].count > 0, "{}", r.text());
    // The window is the slice ÷ K: 180 s / 30.
    assert!((r.config.duration_s - 6.0).abs() < 1e-9, "{}", r.text());
    let mut got: Vec<Points> = std::fs::read_to_string(&acks)
        .expect("ack log")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .filter(|v| v["kind"] == "trip_update" && v["role"] == "rider" && !v["req"].is_null())
        .map(|v| {
            let p = |k: &str| point(v[k]["lat"].as_f64().unwrap(), v[k]["lng"].as_f64().unwrap());
            (p("pickup"), p("dropoff"))
        })
        .collect();
    got.sort();
    assert_eq!(got, want, "the trips the server created are the slice's");
    server.stop().await.expect("server stops");
}
