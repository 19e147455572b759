//! Where one request → offer's time goes, by stage (issue 14's tail). A request carries a
//! [`StageClock`] from the session that decoded it, through the rider's actor and the
//! trip's start, its first durable write, its search, the offer's durable write and the
//! reservation at the driver; each stage's time is added to its slot, so the slots sum to
//! the request's time in the server up to the reservation. The session's queue and its
//! socket write, which follow in the driver's session, are timed there from the instant
//! carried in the offer ([`crate::views::OfferView::queued_at`]). Each stage is one
//! series of `dispatch_request_offer_stage_seconds`; every request's breakdown is logged
//! at debug level (target `dispatch_actors::stages`), and a slow one as a warning.

use std::time::{Duration, Instant};

use dispatch_persistence::CommitTiming;

/// Every `stage` label value of `dispatch_request_offer_stage_seconds`, in order.
pub const STAGES: [&str; 10] = [
    "rider_queue",
    "rider",
    "trip_spawn",
    "first_commit",
    "search",
    "decide",
    "offer_commit",
    "reserve",
    "session_queue",
    "socket_write",
];

/// Every `part` of `dispatch_request_offer_commit_seconds`: of the trip's two awaited
/// commits (`commit` = `first` or `offer`), the wait in the group commit's queue, the
/// group's write and fsync, and the wake (from the writer's answer until the trip's task
/// runs again: tokio's run queue and the machine's).
pub const COMMIT_PARTS: [&str; 4] = ["queue", "write", "fsync", "wake"];

/// A stage of request → offer; its index is its place in [`STAGES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// From the session's hand-off (after decoding) to the rider's actor taking it.
    RiderQueue,
    /// The rider actor's checks, until it asks for the trip's actor.
    Rider,
    /// The trip actor's spawn, until its `post_start` runs.
    TripSpawn,
    /// The trip's first durable write (group commit: queue, write, fsync, reply).
    FirstCommit,
    /// The search for candidates (cell calls); in batched matching, the window too.
    Search,
    /// The engine's decision after a search, until its commit starts.
    Decide,
    /// The durable write of the decision that makes the offer.
    OfferCommit,
    /// Telling the rider, then the driver actor's `ReserveOffer` call, until it answers.
    Reserve,
    /// The offer queued by the driver's actor until the session's writer takes it.
    SessionQueue,
    /// The session's write of the offer's frame to the socket.
    SocketWrite,
}

/// The stages timed by the trip's path (the session's two follow in the session).
const TRIP_STAGES: usize = 8;

/// The time a request spent in each stage so far.
#[derive(Debug, Clone, PartialEq)]
pub struct StageClock {
    started: Instant,
    last: Instant,
    spent: [Duration; TRIP_STAGES],
    /// The first commit's and the offer's commit's parts ([`COMMIT_PARTS`]).
    commits: [[Duration; 4]; 2],
}

impl StageClock {
    /// A clock for a request handed on at `started`.
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            last: started,
            spent: [Duration::ZERO; TRIP_STAGES],
            commits: [[Duration::ZERO; 4]; 2],
        }
    }

    /// The time since the last mark ends `stage` (added to what it had: a refused offer
    /// searches and commits again).
    pub fn mark(&mut self, stage: Stage) {
        let now = Instant::now();
        let i = stage as usize;
        if i < TRIP_STAGES {
            self.spent[i] += now.saturating_duration_since(self.last);
        }
        self.last = now;
    }

    /// The parts of the trip's first commit ([`Stage::FirstCommit`]) or of its offer's
    /// ([`Stage::OfferCommit`]), the wake measured now; call before marking the stage.
    pub fn commit(&mut self, stage: Stage, t: &CommitTiming) {
        let i = usize::from(stage == Stage::OfferCommit);
        let wake = Instant::now().saturating_duration_since(t.answered);
        for (sum, d) in self.commits[i]
            .iter_mut()
            .zip([t.queued, t.write, t.fsync, wake])
        {
            *sum += d;
        }
    }

    /// The parts of the first commit (`0`) and of the offer's (`1`), as [`COMMIT_PARTS`].
    pub fn commits(&self) -> &[[Duration; 4]; 2] {
        &self.commits
    }

    /// The time since the request was handed on.
    pub fn total(&self) -> Duration {
        self.last.saturating_duration_since(self.started)
    }

    /// Each trip stage's time, in [`STAGES`] order.
    pub fn spent(&self) -> impl Iterator<Item = (Stage, Duration)> + '_ {
        const ORDER: [Stage; TRIP_STAGES] = [
            Stage::RiderQueue,
            Stage::Rider,
            Stage::TripSpawn,
            Stage::FirstCommit,
            Stage::Search,
            Stage::Decide,
            Stage::OfferCommit,
            Stage::Reserve,
        ];
        ORDER.into_iter().zip(self.spent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_sum_to_the_total() {
        let mut c = StageClock::new(Instant::now());
        c.mark(Stage::RiderQueue);
        std::thread::sleep(Duration::from_millis(2));
        c.mark(Stage::Search);
        c.mark(Stage::Reserve);
        c.mark(Stage::Search);
        let sum: Duration = c.spent().map(|(_, d)| d).sum();
        assert_eq!(sum, c.total());
        assert!(
            c.spent().find(|(s, _)| *s == Stage::Search).unwrap().1 >= Duration::from_millis(2)
        );
        assert_eq!(STAGES.len(), Stage::SocketWrite as usize + 1);
    }
}
