//! Batched matching in the live server (issue 17, `--matching batch`): trips hand their
//! search results to one batcher task; a window opens when the first trip waits and
//! closes `--match-window-ms` later, and the task then assigns the window's trips together
//! (`dispatch_engine::assign`: least total pickup time) and answers each with its driver,
//! or with none when nobody was left for it. A trip's candidates were found when it
//! joined, so those no longer free at the close are left out first ([`Free`]). Trips the
//! first solve leaves without a driver search again within the same solve ([`Lookup`],
//! leaving out every driver the window assigned) and are assigned together again, up to
//! [`LEFTOVER_ROUNDS`] times: the window hands out its remaining free drivers itself, one
//! solve at a time, rather than let its leftover trips race one another for them.
//!
//! Bounded: the queue holds at most [`QUEUE_MAX`] waiting trips (a trip that finds it full
//! is counted, `batch_queue`, and goes greedy); a trip waits at most the window plus
//! [`SOLVE_BOUND`] (past it, counted `batch_wait`, greedy); a window's solve is bounded by
//! the engine's group cap and work budget (counted `batch_group_cap`,
//! `batch_work_budget`), and its leftover rounds by [`LEFTOVER_ROUNDS`] and
//! [`LEFTOVER_BUDGET`] (counted `batch_leftover`). Batch sizes, solve times and the pickup
//! ETA of each assignment are histograms.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatch_engine::{BatchParams, Candidate, DriverId, EtaModel, Point, Product, assign};
use tokio::sync::{mpsc, oneshot};

use crate::messages::Excluded;
use crate::metrics::Metrics;
use crate::tracecontext::Trace;

/// The most trips waiting for one window.
pub const QUEUE_MAX: usize = 4_096;
/// How much longer than the window a trip waits for its answer.
pub const SOLVE_BOUND: Duration = Duration::from_millis(1_000);
/// The most times a window's leftover trips search again and are solved again.
pub const LEFTOVER_ROUNDS: usize = 4;
/// How long a window's leftover rounds may take in all (well within [`SOLVE_BOUND`]):
/// a round that would start later, or searches that take longer, are cut short.
pub const LEFTOVER_BUDGET: Duration = Duration::from_millis(300);

/// Whether a driver is still free to be offered a trip (read when the window closes: a
/// trip's candidates were found when it joined, up to a window earlier).
pub type Free = Arc<dyn Fn(&DriverId) -> bool + Send + Sync>;

/// A trip's options: its candidates with their pickup ETAs in whole seconds, estimated
/// once (the engine takes them as they are: `TripCommand::Ranked`).
pub type Options = Vec<(Candidate, u64)>;

/// What a window needs to search again for one of its trips.
#[derive(Debug, Clone)]
pub struct Query {
    pub pickup: Point,
    pub product: Product,
    /// The drivers the trip already tried (and, for a window's fresh search, those the
    /// window gave it or assigned: shared sets, not copies).
    pub exclude: Excluded,
    pub trace: Trace,
}

/// A fresh search for a trip the window's solve left without a driver: its nearest
/// available drivers of its product, leaving out `Query::exclude`, as [`Options`].
pub type Lookup = Arc<dyn Fn(Query) -> Pin<Box<dyn Future<Output = Options> + Send>> + Send + Sync>;

/// A search's candidates of `product` with their pickup ETAs to `pickup` (the engine's
/// ranking, estimated here once).
pub fn options(
    eta: &dyn EtaModel,
    pickup: Point,
    product: Product,
    found: Vec<Candidate>,
) -> Options {
    found
        .into_iter()
        .filter(|c| c.driver.product == product)
        .map(|c| {
            let e = eta.estimate(c.driver.position, pickup);
            (c, e.duration_s.round() as u64)
        })
        .collect()
}

/// How trips get their drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    /// Each trip offers its nearest candidates in turn, at once.
    Greedy,
    /// Each trip's first candidate comes from the window's assignment.
    Batch { window_ms: u64 },
}

struct Waiting {
    query: Query,
    options: Options,
    reply: oneshot::Sender<Answer>,
}

/// A window's answer to one trip.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// The driver the window assigned this trip, if any, and its pickup ETA.
    pub driver: Option<(Candidate, u64)>,
    /// Every driver the window assigned (to any trip). Their offers are on their way, so
    /// a trip that retries at once leaves them out rather than race those offers. One set
    /// shared by every answer of a round.
    pub taken: Arc<HashSet<DriverId>>,
}

/// The handle trips submit to; the task ends when the last handle is dropped.
pub struct Batcher {
    tx: mpsc::Sender<Waiting>,
    window: Duration,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts the window task on the current tokio runtime.
    pub fn start(
        window_ms: u64,
        params: BatchParams,
        metrics: Arc<Metrics>,
        free: Free,
        lookup: Lookup,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        let window = Duration::from_millis(window_ms.max(1));
        let solver = Solver {
            params,
            metrics: metrics.clone(),
            free,
            lookup,
        };
        tokio::spawn(windows(rx, window, solver));
        Self {
            tx,
            window,
            metrics,
        }
    }

    /// The driver the next window assigns this trip (`options` are its search's, `query`
    /// how to search again), or `None`: nobody free was left for it, or the batcher was
    /// full or late (both counted). The caller then retries greedily at once (and waits
    /// for a later window only if nobody is free).
    pub async fn assign(&self, query: Query, options: Options) -> Answer {
        let (reply, rx) = oneshot::channel();
        let waiting = Waiting {
            query,
            options,
            reply,
        };
        if self.tx.try_send(waiting).is_err() {
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

/// What solves a window.
struct Solver {
    params: BatchParams,
    metrics: Arc<Metrics>,
    free: Free,
    lookup: Lookup,
}

async fn windows(mut rx: mpsc::Receiver<Waiting>, window: Duration, solver: Solver) {
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
        let before = batch.len();
        batch.retain(|w| !w.reply.is_closed());
        solver.gave_up(before - batch.len());
        if batch.is_empty() {
            continue;
        }
        solver.solve(batch).await;
    }
}

impl Solver {
    /// Assigns one window's trips and answers each: the first solve on the options they
    /// brought, then rounds in which the trips still without a driver search again
    /// (leaving out every driver assigned so far) and are solved together again. Trips
    /// are answered as soon as their round assigns them.
    async fn solve(&self, batch: Vec<Waiting>) {
        let m = &self.metrics;
        let started = Instant::now();
        m.batch_size.observe(batch.len() as f64);
        let mut queries = Vec::with_capacity(batch.len());
        let mut options = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for w in batch {
            queries.push(w.query);
            options.push(w.options);
            replies.push(Some(w.reply));
        }
        // Every driver a trip of this window was given as an option, to leave out of
        // its next search (each was assigned, not free, or too far).
        let mut seen: Vec<Arc<HashSet<DriverId>>> = options
            .iter()
            .map(|o| Arc::new(o.iter().map(|(c, _)| c.driver.driver_id.clone()).collect()))
            .collect();
        let mut taken: HashSet<DriverId> = HashSet::new();
        let mut pending: Vec<usize> = (0..options.len()).collect();
        let (mut sliced, mut fallback) = (false, false);
        for round in 0..=LEFTOVER_ROUNDS {
            // Only trips still waiting are solved (and shown by the gauge).
            self.still_waiting(&mut pending, &replies);
            if pending.is_empty() {
                break;
            }
            // Candidates that stopped being free (another trip's offer, a trip, offline)
            // are left out: assigned, they could only refuse the offer.
            let costs: Vec<Vec<(DriverId, u64)>> = pending
                .iter()
                .map(|&i| {
                    options[i].retain(|(c, _)| {
                        (self.free)(&c.driver.driver_id) && !taken.contains(&c.driver.driver_id)
                    });
                    let o = &options[i];
                    o.iter()
                        .map(|(c, e)| (c.driver.driver_id.clone(), *e))
                        .collect()
                })
                .collect();
            let out = assign(&costs, &self.params);
            sliced |= out.stats.groups_sliced > 0;
            fallback |= out.stats.greedy_fallback > 0;
            let mut left = Vec::new();
            let mut matched = Vec::new();
            for (&i, got) in pending.iter().zip(out.assigned) {
                let Some((driver, eta_s)) = got else {
                    left.push(i);
                    continue;
                };
                m.batch_assigned_eta.observe(eta_s as f64);
                if round > 0 {
                    m.batch_retries.with_label_values(&["same_window"]).inc();
                }
                let pick = options[i]
                    .iter()
                    .find(|(c, _)| c.driver.driver_id == driver)
                    .cloned();
                taken.insert(driver);
                matched.push((i, pick));
            }
            // Answered at once: their offers need not wait for the leftover rounds.
            let so_far = Arc::new(taken.clone());
            for (i, pick) in matched {
                // The trip may have given up since: nothing to do then.
                if let Some(reply) = replies[i].take() {
                    let _ = reply.send(Answer {
                        driver: pick,
                        taken: so_far.clone(),
                    });
                }
            }
            if left.is_empty() {
                break;
            }
            if round == LEFTOVER_ROUNDS || started.elapsed() >= LEFTOVER_BUDGET {
                m.bound_hit("batch_leftover");
                break;
            }
            self.still_waiting(&mut left, &replies);
            let deadline = tokio::time::Instant::from_std(started + LEFTOVER_BUDGET);
            let found = self
                .search_again(&left, &queries, &seen, &taken, deadline)
                .await;
            pending.clear();
            for (i, again) in found {
                Arc::make_mut(&mut seen[i])
                    .extend(again.iter().map(|(c, _)| c.driver.driver_id.clone()));
                options[i] = again;
                if !options[i].is_empty() {
                    pending.push(i);
                }
            }
            if pending.is_empty() {
                break;
            }
            pending.sort_unstable(); // arrival order, as the engine slices groups
        }
        m.batch_solve.observe(started.elapsed().as_secs_f64());
        m.batch_pending.set(0);
        if sliced {
            m.bound_hit("batch_group_cap");
        }
        if fallback {
            m.bound_hit("batch_work_budget");
        }
        // The rest: nobody free was left for them.
        let taken = Arc::new(taken);
        for reply in replies.into_iter().flatten() {
            let _ = reply.send(Answer {
                driver: None,
                taken: taken.clone(),
            });
        }
    }

    /// Keeps only the trips of `trips` still waiting for their answer: one that stopped
    /// (its `batch_wait` bound passed, its actor stopped) has moved on, and solving it
    /// again would hand a driver to nobody and search for it for nothing.
    /// `dispatch_batch_pending` shows how many are left.
    fn still_waiting(&self, trips: &mut Vec<usize>, replies: &[Option<oneshot::Sender<Answer>>]) {
        let before = trips.len();
        trips.retain(|&i| replies[i].as_ref().is_some_and(|r| !r.is_closed()));
        self.gave_up(before - trips.len());
        self.metrics.batch_pending.set(trips.len() as i64);
    }

    fn gave_up(&self, n: usize) {
        self.metrics.batch_gave_up.inc_by(n as u64);
    }

    /// The trips `left`'s fresh searches, all at once, each leaving out what it tried,
    /// the options it was given in this window and every driver assigned so far. A search
    /// still running at `deadline` is dropped (counted `batch_leftover`).
    async fn search_again(
        &self,
        left: &[usize],
        queries: &[Query],
        seen: &[Arc<HashSet<DriverId>>],
        taken: &HashSet<DriverId>,
        deadline: tokio::time::Instant,
    ) -> Vec<(usize, Options)> {
        let mut searches = tokio::task::JoinSet::new();
        // One copy of the assigned drivers per round, shared by every trip's search.
        let taken = Arc::new(taken.clone());
        for &i in left {
            let q = &queries[i];
            let search = (self.lookup)(Query {
                exclude: q.exclude.and(&seen[i]).and(&taken),
                ..q.clone()
            });
            searches.spawn(async move { (i, search.await) });
        }
        let mut found = Vec::with_capacity(left.len());
        loop {
            match tokio::time::timeout_at(deadline, searches.join_next()).await {
                Ok(Some(Ok(one))) => found.push(one),
                Ok(Some(Err(_))) => {} // a search that panicked: no options
                Ok(None) => break,
                Err(_) => {
                    self.metrics.bound_hit("batch_leftover");
                    break; // dropping the set aborts the rest
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use dispatch_engine::IndexedDriver;

    use super::*;

    fn here() -> Point {
        Point::new(45.5, -73.57).unwrap()
    }

    fn option(driver: &str, eta_s: u64) -> (Candidate, u64) {
        let driver = IndexedDriver {
            driver_id: DriverId::new(driver),
            position: here(),
            heading: None,
            product: Product::Economy,
            available: true,
        };
        let c = Candidate {
            driver,
            distance_m: 0.0,
        };
        (c, eta_s)
    }

    /// A trip that stops waiting while its window is solved (its `batch_wait` bound, its
    /// actor stopped) leaves the window: it is neither searched for again nor solved
    /// again, so the driver a leftover round finds goes to a trip still waiting.
    #[tokio::test]
    async fn a_trip_that_stopped_waiting_leaves_the_window() {
        let metrics = Arc::new(Metrics::new());
        // Three trips whose one option is drv_a (nearest to the first): the first solve
        // gives it to the first; the leftover round's searches find drv_b.
        let mut batch = Vec::new();
        let mut answers = Vec::new();
        for eta_s in [10, 20, 30] {
            let (reply, rx) = oneshot::channel();
            let query = Query {
                pickup: here(),
                product: Product::Economy,
                exclude: Excluded::default(),
                trace: None,
            };
            let options = vec![option("drv_a", eta_s)];
            batch.push(Waiting {
                query,
                options,
                reply,
            });
            answers.push(Some(rx));
        }
        // The second trip gives up while the first solve runs (when it asks who is free).
        let quits = Arc::new(Mutex::new(answers[1].take()));
        let free: Free = Arc::new(move |_: &DriverId| {
            quits.lock().unwrap().take();
            true
        });
        let searches = Arc::new(AtomicUsize::new(0));
        let pending_then = Arc::new(AtomicUsize::new(usize::MAX));
        let lookup: Lookup = {
            let (searches, pending_then, m) =
                (searches.clone(), pending_then.clone(), metrics.clone());
            Arc::new(move |q: Query| {
                assert!(q.exclude.contains(&DriverId::new("drv_a")));
                searches.fetch_add(1, Ordering::SeqCst);
                pending_then.store(m.batch_pending.get() as usize, Ordering::SeqCst);
                Box::pin(async { vec![option("drv_b", 5)] })
            })
        };
        let solver = Solver {
            params: BatchParams::default(),
            metrics: metrics.clone(),
            free,
            lookup,
        };
        solver.solve(batch).await;
        let driver = |mut rx: oneshot::Receiver<Answer>| {
            rx.try_recv()
                .unwrap()
                .driver
                .map(|(c, _)| c.driver.driver_id)
        };
        assert_eq!(
            driver(answers[0].take().unwrap()),
            Some(DriverId::new("drv_a"))
        );
        assert_eq!(
            searches.load(Ordering::SeqCst),
            1,
            "only the trip still waiting searched again"
        );
        assert_eq!(
            driver(answers[2].take().unwrap()),
            Some(DriverId::new("drv_b")),
            "the leftover driver went to the trip still waiting"
        );
        assert_eq!(metrics.batch_gave_up.get(), 1);
        assert_eq!(
            pending_then.load(Ordering::SeqCst),
            1,
            "the window held only the trip still waiting"
        );
        assert_eq!(
            metrics.batch_pending.get(),
            0,
            "nothing held after the solve"
        );
    }
}
