//! Shared by the engine's benchmarks: which clock criterion reads.
//!
//! By default criterion measures wall-clock time. With `BENCH_CLOCK=cpu` it measures the
//! benchmark thread's CPU time instead (`CLOCK_THREAD_CPUTIME_ID`, Linux only), so time
//! spent waiting for a core on a shared, loaded machine is not counted; results go to
//! `<group>-cpu` so the two clocks never compare against each other's baselines.

use std::time::Duration;

pub mod fixtures;

use criterion::Criterion;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};

/// Whether `BENCH_CLOCK=cpu` asked for thread CPU time.
pub fn cpu_clock() -> bool {
    match std::env::var("BENCH_CLOCK").as_deref() {
        Ok("cpu") => true,
        Ok("wall") | Err(_) => false,
        Ok(other) => panic!("BENCH_CLOCK must be `wall` or `cpu`, not {other:?}"),
    }
}

/// The benchmark group's name for the clock in use.
pub fn group_name(name: &str) -> String {
    if cpu_clock() {
        format!("{name}-cpu")
    } else {
        name.to_owned()
    }
}

/// Criterion's settings for the engine's benchmarks, with `measurement` per benchmark.
pub fn config<M: Measurement>(c: Criterion<M>, measurement: Duration) -> Criterion<M> {
    c.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(measurement)
}

/// The benchmark's `main`: runs `targets` (configured by [`config`]) on the clock that
/// [`cpu_clock`] picks, then criterion's summary.
macro_rules! bench_main {
    (measurement = $measurement:expr; targets = $($target:path),+ $(,)?) => {
        criterion::criterion_group! {
            name = wall;
            config = common::config(
                criterion::Criterion::default().with_measurement(criterion::measurement::WallTime),
                $measurement,
            );
            targets = $($target),+
        }
        criterion::criterion_group! {
            name = cpu;
            config = common::config(
                criterion::Criterion::default().with_measurement(common::ThreadCpuTime),
                $measurement,
            );
            targets = $($target),+
        }

        fn main() {
            if common::cpu_clock() {
                cpu();
            } else {
                wall();
            }
            criterion::Criterion::default()
                .configure_from_args()
                .final_summary();
        }
    };
}
pub(crate) use bench_main;

/// The calling thread's CPU time, in the same units (and printed the same way) as
/// criterion's wall-clock time.
pub struct ThreadCpuTime;

static WALL: WallTime = WallTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_time()
    }
    fn end(&self, started: Duration) -> Duration {
        thread_cpu_time().saturating_sub(started)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, d: &Duration) -> f64 {
        d.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        WALL.formatter()
    }
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn thread_cpu_time() -> Duration {
    // `struct timespec` on 64-bit Linux: two 64-bit fields.
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `struct timespec`; the call writes only into it.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn thread_cpu_time() -> Duration {
    panic!("BENCH_CLOCK=cpu is only implemented on 64-bit Linux")
}
