//! The progress bar: connected clients, pings/s, requests/s, trips completed, errors.
//! Hidden with `--quiet` or when stderr is not a terminal.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::sim::Tick;
use crate::stats::CountersSnap;

pub struct Progress {
    bar: ProgressBar,
    last: Mutex<Option<(Instant, CountersSnap, f64, f64)>>,
}

impl Progress {
    /// A bar over `total` seconds of run (duration plus drain).
    pub fn new(quiet: bool, total: Duration) -> Progress {
        let bar = ProgressBar::new(total.as_secs().max(1));
        if quiet || !std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:24} {pos}/{len}s {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress {
            bar,
            last: Mutex::new(None),
        }
    }

    pub fn tick(&self, t: &Tick) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap();
        let (pings, reqs) = match *last {
            Some((at, prev, p, r)) => {
                let dt = now.duration_since(at).as_secs_f64();
                if dt < 0.9 {
                    // Keep the rates over about a second.
                    self.render(t, p, r);
                    return;
                }
                (
                    (t.counters.pings_sent.saturating_sub(prev.pings_sent)) as f64 / dt,
                    (t.counters.requests_sent.saturating_sub(prev.requests_sent)) as f64 / dt,
                )
            }
            None => (0.0, 0.0),
        };
        *last = Some((now, t.counters, pings, reqs));
        self.render(t, pings, reqs);
    }

    fn render(&self, t: &Tick, pings: f64, reqs: f64) {
        self.bar.set_position(t.run_s as u64);
        let c = &t.counters;
        self.bar.set_message(format!(
            "{} | clients {}/{} | pings/s {:.0} | req/s {:.1} | trips done {} | errors {}",
            t.phase,
            t.connected,
            t.clients,
            pings,
            reqs,
            c.trips_completed,
            c.unexpected_errors + c.connect_failures
        ));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
