//! `replay`: a real city day pushed through the engine in-process on a simulated clock,
//! greedy against batched matching (issue 17). `replay --help` lists the flags; the same
//! as `loadgen replay`.

fn main() {
    std::process::exit(dispatch_loadgen::replay::main_entry(std::env::args()));
}
