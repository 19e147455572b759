//! Run with `cargo run --release -p dispatch-loadgen --bin loadgen -- --help` (being written).
fn main() {}
