//! `loadgen`: a simulated city of drivers and riders against dispatchd, every person a
//! real WebSocket client, with a latency report (see loadgen/README.md).
//!
//! Run with a server already up (`cargo run --release --bin dispatchd`):
//!
//! ```sh
//! cargo run --release -p dispatch-loadgen -- --url ws://127.0.0.1:8080 \
//!     --drivers 2000 --riders 300 --request-rate 20 --duration 60s --time-scale 10 \
//!     --demand-csv loadgen/data/montreal_carshare_zones.csv --json report.json --html report.html
//! ```
//!
//! or as a one-command demo with an in-process server:
//!
//! ```sh
//! cargo run --release -p dispatch-loadgen --features embedded -- --embedded \
//!     --drivers 200 --riders 40 --request-rate 3 --duration 20s --time-scale 30
//! ```
//!
//! `loadgen replay --help`: a real city day replayed in-process, greedy against batched
//! matching (the same as the `replay` binary).
//!
//! Bigger cities: `--workers 2 --source-ips 127.0.0.2-127.0.0.9`. `--help` lists every
//! flag. Exit code: 0 when every check passed, 1 when one failed (`--max-p99-ms`,
//! `--max-error-rate`, or a client that could not connect), 2 when it could not run.

fn main() {
    // `loadgen replay …`: the replayed city day, in-process (issue 17; also `replay`).
    if std::env::args().nth(1).as_deref() == Some("replay") {
        std::process::exit(dispatch_loadgen::replay::main_entry(
            std::env::args().skip(1),
        ));
    }
    std::process::exit(dispatch_loadgen::main_entry());
}
