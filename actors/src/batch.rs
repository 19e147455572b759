//! Batched matching in the live server (issue 17, `--matching batch`): trips hand their
//! search results to one batcher task; a window opens when the first trip waits and
//! closes `--match-window-ms` later, and the task then assigns the window's trips together (`dispatch_engine::assign`: least total pickup time) and
//! answers each with its driver, or with none when the others took its drivers. A trip's
//! candidates were found when it joined, so those no longer free at the close are left
//! out first ([`Free`]).
//!
//! Bounded: the queue holds at most [`QUEUE_MAX`] waiting trips (a trip that finds it full
//! is counted, `batch_queue`, and goes greedy); a trip waits at most the window plus
//! [`SOLVE_BOUND`] (past it, counted `batch_wait`, greedy); a window's solve is bounded by
//! the engine's group cap and work budget (counted `batch_group_cap`,
//! `batch_work_budget`). Batch sizes, solve times and the pickup ETA of each assignment
//! are histograms.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatch_engine::{BatchParams, DriverId, assign};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

/// The most trips waiting for one window.
pub const QUEUE_MAX: usize = 4_096;
/// How much longer than the window a trip waits for its answer.
pub const SOLVE_BOUND: Duration = Duration::from_millis(1_000);

/// Whether a driver is still free to be offered a trip (read when the window closes: a
/// trip's candidates were found when it joined, up to a window earlier).
pub type Free = Arc<dyn Fn(&DriverId) -> bool + Send + Sync>;

/// How trips get their drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    /// Each trip offers its nearest candidates in turn, at once.
    Greedy,
    /// Each trip's first candidate comes from the window's assignment.
    Batch { window_ms: u64 },
}

struct Waiting {
    /// The trip's candidates and their pickup ETAs, seconds.
    options: Vec<(DriverId, u64)>,
    reply: oneshot::Sender<Answer>,
}

/// A window's answer to one trip.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// The driver the window assigned this trip, if any.
    pub driver: Option<DriverId>,
    /// Every driver the window assigned (to any trip). Their offers are on their way, so
    /// a trip that retries at once leaves them out rather than race those offers.
    pub taken: Arc<Vec<DriverId>>,
}

/// The handle trips submit to; the task ends when the last handle is dropped.
pub struct Batcher {
    tx: mpsc::Sender<Waiting>,
    window: Duration,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts the window task on the current tokio runtime.
    pub fn start(window_ms: u64, params: BatchParams, metrics: Arc<Metrics>, free: Free) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        let window = Duration::from_millis(window_ms.max(1));
        tokio::spawn(windows(rx, window, params, metrics.clone(), free));
        Self {
            tx,
            window,
            metrics,
        }
    }

    /// The driver the next window assigns this trip, or `None`: none of its options was
    /// left for it, or the batcher was full or late (both counted). The caller then
    /// retries greedily at once (and waits for a later window only if nobody is free).
    pub async fn assign(&self, options: Vec<(DriverId, u64)>) -> Answer {
        let (reply, rx) = oneshot::channel();
        if self.tx.try_send(Waiting { options, reply }).is_err() {
            self.metrics.bound_hit("batch_queue");
            return Answer::default();
        }
        match tokio::time::timeout(self.window + SOLVE_BOUND, rx).await {
            Ok(Ok(answer)) => answer,
            _ => {
                self.metrics.bound_hit("batch_wait");
                Answer::default()
            }
        }
    }
}

async fn windows(
    mut rx: mpsc::Receiver<Waiting>,
    window: Duration,
    params: BatchParams,
    metrics: Arc<Metrics>,
    free: Free,
) {
    loop {
        // A window opens with the first trip that waits and closes `window` later; with
        // nobody waiting, nothing runs.
        let Some(first) = rx.recv().await else {
            return;
        };
        tokio::time::sleep(window).await;
        let mut batch = vec![first];
        while batch.len() < QUEUE_MAX
            && let Ok(w) = rx.try_recv()
        {
            batch.push(w);
        }
        // A trip that stopped waiting (it timed out, or its actor stopped) is left out.
        batch.retain(|w| !w.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        // Candidates that stopped being free while the window ran (another trip's offer,
        // a trip, offline) are left out: assigned, they could only refuse the offer.
        let options: Vec<Vec<(DriverId, u64)>> = batch
            .iter_mut()
            .map(|w| {
                let mut o = std::mem::take(&mut w.options);
                o.retain(|(d, _)| free(d));
                o
            })
            .collect();
        let started = Instant::now();
        let out = assign(&options, &params);
        metrics.batch_solve.observe(started.elapsed().as_secs_f64());
        metrics.batch_size.observe(batch.len() as f64);
        if out.stats.groups_sliced > 0 {
            metrics.bound_hit("batch_group_cap");
        }
        if out.stats.greedy_fallback > 0 {
            metrics.bound_hit("batch_work_budget");
        }
        let taken: Arc<Vec<DriverId>> = Arc::new(
            out.assigned
                .iter()
                .flatten()
                .map(|(d, _)| d.clone())
                .collect(),
        );
        for (w, got) in batch.into_iter().zip(out.assigned) {
            if let Some((_, eta_s)) = &got {
                metrics.batch_assigned_eta.observe(*eta_s as f64);
            }
            // The trip may have given up since: nothing to do then.
            let _ = w.reply.send(Answer {
                driver: got.map(|(d, _)| d),
                taken: taken.clone(),
            });
        }
    }
}
