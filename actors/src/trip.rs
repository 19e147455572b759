//! `TripActor`: one per live trip. Creates a new trip, or resumes a stored one, and
//! carries out the engine's decisions ([`Trip::decide`]) in a fixed order: ask the
//! payment provider for what the decision's plan needs, commit the trip, its journal
//! record and its ledger entry together, then tell the driver(s) and the rider, then arm
//! timers, reserve offers and search. Because the commit comes first, a restart from the
//! store never forgets something a client was told.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use dispatch_engine::trip::OfferEnd;
use dispatch_engine::{
    AfterPayment, Candidate, CellId, Decision, DriverId, PaymentPlan, ProviderAnswer, Sender, Trip,
    TripCommand, TripEffect, TripState,
};
use dispatch_persistence::{Batch, StoredTrip};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::context::Context;
use crate::error::ApiError;
use crate::messages::{
    DriverMsg, Excluded, NewTrip, RiderMsg, SearchFilter, Ticket, TripArgs, TripLink, TripMsg,
};
use crate::records::TripRecord;
use crate::stages::{Stage, StageClock};
use crate::tracecontext::{Trace, TraceContext};
use crate::views::{OfferView, Receipt, TripDriver, TripView};

pub struct TripActor {
    pub ctx: Context,
}

pub struct TripActorState {
    rec: TripRecord,
    last_location_push_ms: u64,
    first_offer_seen: bool,
    restarted: bool,
    /// A new trip's first decision and request, made durable in `post_start`.
    start: Option<(Decision, NewTrip)>,
    /// The span of a traced request's dispatch: its searches and offers are its children.
    trace: Trace,
    /// Batched matching: what the trip's next search does (issue 17).
    round: Round,
    /// Batched matching: the drivers the trip's last window assigned, which its retries
    /// leave out (their offers are on their way).
    taken: Arc<HashSet<DriverId>>,
    /// A new trip's request → offer time by stage, until its first offer is reserved.
    stages: Option<Box<StageClock>>,
    /// Batched matching: the driver a cell handed this waiting trip as it freed up, and
    /// when the cell saw it free, until its offer is sent or refused.
    handed: Option<(DriverId, std::time::Instant)>,
    /// Batched matching: a safety poll ([`TripMsg::SearchAgain`]) is on its way.
    polling: bool,
    /// While a remote driver's command runs: the fence of its shard it carried.
    carried: Option<dispatch_persistence::Fence>,
    /// Sharded mode: the cell each driver the trip's last search found was indexed in
    /// (at most the search's `k`), so that a driver who refuses its offer for want of an
    /// actor or a session (a ghost: its node was killed) is taken out of that cell.
    found_in: Vec<(DriverId, CellId)>,
}

/// Where a trip is between batched-matching windows. Not stored: a restarted trip joins
/// the next window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// The next search joins a window: the first one, and after an offer a driver held
    /// ended (declined, expired). Finding nobody ends the trip, as in greedy mode.
    Window,
    /// A window left the trip without an offer it could hold (its driver went to another
    /// trip, or could not take the offer): its searches offer the next-best free drivers
    /// at once, greedily, so its offer does not wait for another window.
    Retry,
    /// Nobody was free for the retry: the trip waits among the waiting trips
    /// ([`crate::waiting`]) and is handed a driver who frees up near it at once, if it is
    /// the nearest waiting trip, and offers it at once (it waited through a whole window
    /// already, so it does not wait for another window's close); as a fallback it also
    /// searches again every window. Finding nobody does not end it (its dispatch
    /// deadline does).
    Wait,
}

/// Where a command's outcome goes.
enum Answer {
    None,
    /// A driver's or rider's command: answered through that sender's actor.
    Ticket(Ticket),
    /// An operator's command.
    Admin(RpcReplyPort<Result<(), ApiError>>),
}

/// What a trip actor still has to do within one message: engine commands, and searches
/// (which run between commands, so their results are applied in order).
enum Step {
    Command(TripCommand, Sender, Answer),
    /// A search (leaving out these drivers); in batch mode it may wait for a window, or
    /// end with no command when it is to look again later ([`Round::Wait`]).
    Search(Vec<DriverId>),
    /// A refusal owed once the steps before it have been carried out (and sent).
    Refuse(Sender, Answer, ApiError),
}

type Work = VecDeque<Step>;

impl TripActor {
    fn view(&self, s: &TripActorState) -> TripView {
        TripView::of(&s.rec.trip, s.rec.driver.clone())
    }

    /// The timers and searches a resumed trip in this state needs.
    fn resume(&self, myself: &ActorRef<TripMsg>, s: &TripActorState, work: &mut Work) {
        let t = &s.rec.trip;
        if t.state() != TripState::Dispatching {
            return;
        }
        let now = self.ctx.clock.now_ms();
        arm(myself, now, t.deadline_ms(), TripCommand::DeadlineReached);
        if let Some(o) = t.offer() {
            arm(
                myself,
                now,
                o.expires_at_ms,
                TripCommand::OfferTimeout { seq: o.seq },
            );
        }
        if t.is_searching() {
            work.push_back(Step::Search(t.excluded().cloned().collect()));
        }
    }

    /// A new trip: durable (with the used quote gone) before the rider hears of it; the
    /// rider's request is answered with it, then the first search and the deadline run.
    ///
    /// A first write that fails is answered `unavailable`, and the actor fails: whether
    /// the trip is stored is not known (PostgreSQL can lose the connection during a
    /// `COMMIT` that lands), so the supervisor reads it back — resuming it if it is there,
    /// freeing the rider if not — rather than letting the rider ask again beside a trip
    /// that may exist.
    async fn begin(
        &self,
        myself: &ActorRef<TripMsg>,
        s: &mut TripActorState,
        decision: Decision,
        new: NewTrip,
        work: &mut Work,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &self.ctx;
        let stored = StoredTrip {
            trip: decision.trip.clone(),
            driver: None,
        };
        let shard = ctx.shard_of_trip(&decision.trip);
        let mut batch = Batch::in_shard(shard).decided(stored, decision.journal.clone(), None);
        if let Some(q) = &new.quote_id {
            // The used quote is the rider's: it goes in the rider's shard.
            let rider_shard = ctx.shard_of_rider(&new.rider_id);
            batch = batch.then_in(rider_shard).delete_quote(q.clone());
            // A trip started here for a rider of another node (docs/sharding.md §5): that
            // node's fence of the rider's shard, which it carried, is required, so the
            // quote's delete lands with the trip under both owners' leases or not at all.
            if let Some(f) = new.quote_fence.clone().filter(|f| f.shard == rider_shard) {
                batch = batch.requires(f.into());
            }
        }
        let committed = s.commit(&ctx.store, batch, Stage::FirstCommit).await;
        if let Err(e) = committed {
            ctx.metrics.bound_hit("store_write_failed");
            if let Some(ticket) = new.ticket {
                ctx.tell_rider(
                    &new.rider_id,
                    RiderMsg::Answer {
                        ticket,
                        outcome: Err(ApiError::unavailable(
                            "the request could not be stored; retry",
                        )),
                    },
                );
            }
            return Err(format!("trip {}: its first write failed: {e}", new.trip_id).into());
        }
        // Demand for surge pricing in the pickup's cell.
        ctx.record_request(new.pickup);
        let view = self.view(s);
        ctx.registry
            .trip_records
            .insert(new.trip_id.clone(), s.rec.clone());
        ctx.registry
            .trip_views
            .insert(new.trip_id.clone(), view.clone());
        if let Some(q) = &new.quote_id {
            ctx.registry.quotes.remove(q); // a quote buys one trip
        }
        // The request's answer is the trip's first update: sent before any other.
        let started = RiderMsg::TripStarted {
            view,
            ticket: new.ticket,
        };
        ctx.tell_rider(&new.rider_id, started);
        self.schedule(myself, s, &decision.effects, work).await;
        Ok(())
    }

    async fn run(
        &self,
        myself: &ActorRef<TripMsg>,
        s: &mut TripActorState,
        mut work: Work,
    ) -> Result<(), ActorProcessingErr> {
        while let Some(step) = work.pop_front() {
            let (cmd, from, answer) = match step {
                Step::Command(cmd, from, answer) => (cmd, from, answer),
                Step::Search(exclude) => {
                    let found = self.search(myself, s, exclude).await;
                    s.mark(Stage::Search);
                    match found {
                        Some(cmd) => (cmd, Sender::System, Answer::None),
                        None => continue,
                    }
                }
                Step::Refuse(from, answer, error) => {
                    self.answer(s, &from, answer, Err(error));
                    continue;
                }
            };
            let now = self.ctx.clock.now_ms();
            let t = &s.rec.trip;
            let decided = self
                .ctx
                .with_rules(t.product, |rules| t.decide(cmd, &s.rec.entries, now, rules));
            let decision = match decided {
                Ok(d) => d,
                Err(e) => {
                    self.answer(s, &from, answer, Err(e.into()));
                    continue;
                }
            };
            // An accept spans the driver's shard too (docs/sharding.md §3): with sharded
            // on it commits only under the fence this node holds for that shard; holding
            // none, it is refused (counted) before the provider is asked, and nothing
            // changes: the offer stays open until it is answered again or expires.
            let required = match self.accept_fence(&decision, s.carried.as_ref()) {
                Ok(f) => f,
                Err(e) => {
                    self.answer(s, &from, answer, Err(e));
                    continue;
                }
            };
            let paid = self.ctx.pay(&decision.payment).await;
            if self.ctx.config.crash_after_capture
                && matches!(decision.payment, PaymentPlan::Capture { .. })
                && paid == ProviderAnswer::Approved
            {
                tracing::error!(trip_id = %s.rec.trip.id, "DISPATCH_TEST_CRASH_AFTER=capture: aborting");
                std::process::abort();
            }
            match decision.payment.after(&paid) {
                AfterPayment::Commit => {
                    let d = (decision, required);
                    self.carry_out(myself, s, d, from, answer, &mut work)
                        .await?
                }
                AfterPayment::Retry => {
                    // Nothing changed: the sender may retry (an offer stays open).
                    tracing::warn!(trip_id = %s.rec.trip.id, answer = ?paid, "payment provider unavailable; command not applied");
                    let e = ApiError::unavailable("the payment provider is unavailable; retry");
                    self.answer(s, &from, answer, Err(e));
                }
                AfterPayment::Instead(cmd) => {
                    tracing::info!(trip_id = %s.rec.trip.id, answer = ?paid, "payment declined; cancelling the trip");
                    // The refusal follows the cancel, so the app sees why first.
                    let e = ApiError::conflict(
                        "the rider's payment was declined; the trip is cancelled",
                    );
                    work.push_front(Step::Refuse(from, answer, e));
                    work.push_front(Step::Command(cmd, Sender::System, Answer::None));
                }
            }
        }
        Ok(())
    }

    /// The nearest available candidates of the trip's product, leaving out `exclude`
    /// (sharded mode: the cells they were found in are kept, see `found_in`).
    async fn find(&self, s: &mut TripActorState, exclude: &Excluded) -> Vec<Candidate> {
        let t = &s.rec.trip;
        let filter = SearchFilter {
            product: Some(t.product),
            available_only: true,
            exclude: exclude.clone(),
        };
        let (found, stats) = self
            .ctx
            .search(t.pickup, self.ctx.config.search, filter, s.trace)
            .await;
        tracing::debug!(trip_id = %t.id, found = found.len(), cells = stats.cells_searched, examined = stats.drivers_examined, "searched");
        if self.ctx.config.sharded {
            let grid = self.ctx.config.grid;
            s.found_in = (found.iter())
                .map(|c| (c.driver.driver_id.clone(), grid.cell_of(c.driver.position)))
                .collect();
        }
        found
    }

    /// Whether any driver of the trip's product it has not tried is indexed within reach
    /// of its pickup, free or not (one more search, made only when a search found nobody
    /// free).
    async fn anyone_busy_near(&self, s: &TripActorState, exclude: &Excluded) -> bool {
        let t = &s.rec.trip;
        let filter = SearchFilter {
            product: Some(t.product),
            available_only: false,
            exclude: exclude.clone(),
        };
        let params = dispatch_engine::SearchParams {
            k: 1,
            ..self.ctx.config.search
        };
        let (found, _) = self.ctx.search(t.pickup, params, filter, s.trace).await;
        !found.is_empty()
    }

    /// A search's answer to the engine; `None` when there is none yet (batched matching:
    /// nobody was free, and the trip looks again for the next window).
    async fn search(
        &self,
        myself: &ActorRef<TripMsg>,
        s: &mut TripActorState,
        exclude: Vec<DriverId>,
    ) -> Option<TripCommand> {
        let exclude = Excluded::new(exclude);
        let crate::batch::Matching::Batch { window_ms } = self.ctx.config.matching else {
            let found = self.find(s, &exclude).await;
            return Some(TripCommand::Candidates(found));
        };
        match s.round {
            Round::Window => {}
            // A retry leaves out the drivers its window just assigned (their offers are on
            // their way); a trip that waited looks again at everyone it did not try.
            Round::Retry => {
                let exclude = exclude.and(&s.taken);
                let found = self.find(s, &exclude).await;
                return self.retry(myself, s, found, window_ms);
            }
            // A driver that only could not hold the trip's offer (it never saw it) is
            // not left out for good: free again, it may be offered the trip.
            Round::Wait => {
                let t = &s.rec.trip;
                let refused: HashSet<&DriverId> = t.refused().collect();
                let tried = t.excluded().filter(|d| !refused.contains(d)).cloned();
                let found = self.find(s, &Excluded::new(tried)).await;
                return self.retry(myself, s, found, window_ms);
            }
        }
        let found = self.find(s, &exclude).await;
        if found.is_empty() {
            // Nobody free within reach but drivers busy near it (holding offers, on
            // trips): it waits for one of them to free up, as a trip its window left
            // waits; otherwise a driver freed up would go to the waiting trips and this
            // one would end `no_driver_found` beside them.
            if self.anyone_busy_near(s, &exclude).await {
                return self.retry(myself, s, found, window_ms);
            }
            // Nobody within reach at all: the trip ends now, as in greedy mode.
            return Some(TripCommand::Candidates(found));
        }
        // Batched: the window's assignment picks this trip's driver among its candidates,
        // with the pickup ETAs the engine ranks by, estimated once here.
        let t = &s.rec.trip;
        let options =
            crate::batch::options(self.ctx.config.eta.as_ref(), t.pickup, t.product, found);
        let query = crate::batch::Query {
            pickup: t.pickup,
            product: t.product,
            exclude: exclude.clone(),
            trace: s.trace,
        };
        let answer = self.ctx.batcher(window_ms).assign(query, options).await;
        // Until an offer is held, whatever the window's answer comes to is a retry: a
        // driver that cannot take the offer sends the trip's next search to `retry`.
        s.round = Round::Retry;
        s.taken = answer.taken;
        match answer.driver {
            Some(assigned) => Some(TripCommand::Ranked(vec![assigned])),
            None => {
                // Nobody free was left for it in the window (or the batcher was full or
                // late): the next-best free ones, at once, if any freed up since.
                let exclude = exclude.and(&s.taken);
                let again = self.find(s, &exclude).await;
                self.retry(myself, s, again, window_ms)
            }
        }
    }

    /// A window left the trip without an offer it could hold: the nearest free drivers
    /// (a fresh search, leaving out those already tried and those the window assigned)
    /// are offered at once, so the first offer does not wait for another window. With
    /// nobody free the trip does not end: it waits ([`Round::Wait`]) and looks again
    /// every quarter window, and offers the first driver who freed up at once (a trip
    /// that waited through a window does not wait for another window's close too).
    fn retry(
        &self,
        myself: &ActorRef<TripMsg>,
        s: &mut TripActorState,
        mut found: Vec<Candidate>,
        window_ms: u64,
    ) -> Option<TripCommand> {
        let m = &self.ctx.metrics;
        // Only drivers free by their own actor's record: one the index still shows free
        // but that holds another offer would refuse, and be left out of this trip's
        // searches for good.
        found.retain(|c| self.ctx.driver_free(&c.driver.driver_id));
        let waited = s.round == Round::Wait;
        if found.is_empty() {
            if !waited {
                m.batch_retries.with_label_values(&["next_window"]).inc();
                s.round = Round::Wait;
            }
            if !s.polling {
                s.polling = true;
                self.wait_window(myself, window_ms);
            }
            self.wait_for_driver(s);
            return None;
        }
        if waited {
            // Its safety poll found a driver the hand-off did not bring (see `wait_window`).
            m.batch_retries.with_label_values(&["waited_greedy"]).inc();
            let t = &s.rec.trip;
            let eta = self.ctx.config.eta.as_ref();
            let options = crate::batch::options(eta, t.pickup, t.product, found);
            return Some(TripCommand::Freed(options));
        }
        m.batch_retries.with_label_values(&["greedy"]).inc();
        Some(TripCommand::Candidates(found))
    }

    /// The trip waits among the waiting trips for a driver to free up near it (again,
    /// with what it now leaves out): a cell that sees one become available hands it to
    /// the nearest waiting trip ([`TripMsg::DriverFreed`]).
    fn wait_for_driver(&self, s: &TripActorState) {
        let t = &s.rec.trip;
        let refused: HashSet<&DriverId> = t.refused().collect();
        let exclude = t.excluded().filter(|d| !refused.contains(d)).cloned();
        let waiter = crate::waiting::Waiter {
            pickup: t.pickup,
            product: t.product,
            exclude: Arc::new(exclude.collect()),
        };
        let m = &self.ctx.metrics;
        if !self.ctx.waiting.wait(&t.id, waiter) {
            m.bound_hit("batch_waiting");
        }
        m.batch_waiting.set(self.ctx.waiting.len() as i64);
    }

    /// The trip no longer waits for a freed driver (its offer is out, or it ended).
    fn stop_waiting(&self, s: &TripActorState) {
        self.ctx.waiting.leave(&s.rec.trip.id);
        let m = &self.ctx.metrics;
        m.batch_waiting.set(self.ctx.waiting.len() as i64);
    }

    /// The slow safety poll of a waiting trip: it searches again a window from now, and
    /// every window after, to find a driver the hand-off did not bring it (it stays
    /// `searching`, and handles its other messages: a rider's cancel, its dispatch
    /// deadline). The hand-off can miss one: a driver freed between the trip's search
    /// and its joining the waiting trips; one handed to it that was taken before its
    /// offer arrived while no other frees up; a full waiting list (`batch_waiting`); a
    /// driver whose availability reached its cell before its record (the trip's search
    /// reads the index; the hand-off, the cell's upsert).
    fn wait_window(&self, myself: &ActorRef<TripMsg>, window_ms: u64) {
        let after = Duration::from_millis(window_ms.max(1));
        myself.send_after(after, || TripMsg::SearchAgain);
    }

    /// The fence an accept in `d` must commit under (sharded mode, the driver's shard),
    /// or `unavailable` when this node holds none for it.
    fn accept_fence(
        &self,
        d: &Decision,
        carried: Option<&dispatch_persistence::Fence>,
    ) -> Result<Option<dispatch_persistence::Fence>, ApiError> {
        for e in &d.effects {
            if let TripEffect::DriverAssigned { driver_id } = e {
                return self.ctx.accept_fence(driver_id, carried).map_err(|()| {
                    ApiError::unavailable("the driver's shard is not held here now; retry")
                });
            }
        }
        Ok(None)
    }

    /// Commits one decision (under `required`, an accept's fence on the driver's shard),
    /// then tells everyone, then arms what it asks for.
    async fn carry_out(
        &self,
        myself: &ActorRef<TripMsg>,
        s: &mut TripActorState,
        (d, required): (Decision, Option<dispatch_persistence::Fence>),
        from: Sender,
        answer: Answer,
        work: &mut Work,
    ) -> Result<(), ActorProcessingErr> {
        let reg = &self.ctx.registry;
        let m = &self.ctx.metrics;
        let trip_id = s.rec.trip.id.clone();

        // 1. Commit, before anyone is told anything.
        let mut assigned = None;
        let mut released = None;
        for e in &d.effects {
            match e {
                TripEffect::DriverAssigned { driver_id } => {
                    s.rec.driver = reg.driver_records.get(driver_id).map(|d| TripDriver {
                        name: d.profile.name.clone(),
                        vehicle: d.profile.vehicle.clone(),
                        location: d.position,
                    });
                    assigned = Some(driver_id.clone());
                }
                TripEffect::DriverReleased { driver_id } => released = Some(driver_id.clone()),
                _ => {}
            }
        }
        if d.trip.driver_id().is_none() {
            s.rec.driver = None;
        }
        let stored = StoredTrip {
            trip: d.trip.clone(),
            driver: s.rec.driver.clone(),
        };
        let entry = d.payment.entry().cloned();
        let mut batch = Batch::in_shard(self.ctx.shard_of_trip(&d.trip)).decided(
            stored,
            d.journal.clone(),
            entry.clone(),
        );
        if let Some(f) = required {
            batch = batch.requires(f);
        }
        s.mark(Stage::Decide);
        let committed = s.commit(&self.ctx.store, batch, Stage::OfferCommit).await;
        if let Err(e) = committed {
            // Nobody has been told; the actor fails and restarts from what is on disk.
            m.bound_hit("store_write_failed");
            let e2 = ApiError::unavailable("the change could not be stored; retry");
            self.answer(s, &from, answer, Err(e2));
            return Err(format!("trip {trip_id}: store write failed: {e}").into());
        }
        let finished = d.finished();
        s.rec.trip = d.trip;
        if let Some(e) = entry {
            self.ctx.entry_written(&e);
            s.rec.entries.push(e);
        }
        let view = self.view(s);
        reg.trip_records.insert(trip_id.clone(), s.rec.clone());
        reg.trip_views.insert(trip_id.clone(), view.clone());
        let (mut ticket, admin) = match answer {
            Answer::Ticket(t) => (Some(t), None),
            Answer::Admin(p) => (None, Some(p)),
            Answer::None => (None, None),
        };
        let mut ticket_for = |who: &Sender| if &from == who { ticket.take() } else { None };

        // 2. Offers that ended.
        for e in &d.effects {
            if let TripEffect::OfferEnded { driver_id, why, .. } = e {
                m.offers
                    .with_label_values(&[match why {
                        OfferEnd::Declined => "declined",
                        OfferEnd::Expired => "expired",
                        OfferEnd::Withdrawn => "withdrawn",
                    }])
                    .inc();
                let answers = ticket_for(&Sender::Driver(driver_id.clone()));
                self.ctx.tell_driver(
                    driver_id,
                    DriverMsg::OfferEnded {
                        trip_id: trip_id.clone(),
                        notify: *why != OfferEnd::Declined,
                        answers,
                    },
                );
            }
        }
        if assigned.is_some() {
            m.offers.with_label_values(&["accepted"]).inc();
            let now = self.ctx.clock.now_ms();
            let waited = now.saturating_sub(s.rec.trip.created_at_ms);
            m.request_to_accept.observe(waited as f64 / 1000.0);
            if let Some(eta) = view.pickup_eta_s {
                m.pickup_eta.observe(eta as f64);
            }
        }

        // 3. The transition, to the rider and to the driver(s).
        if let Some(j) = &d.journal {
            let to = j.to;
            m.trip_transitions.with_label_values(&[to.as_str()]).inc();
            tracing::info!(trip_id = %trip_id, state = to.as_str(), version = view.version, "trip transition");
            let receipt = (to == TripState::Completed).then(|| receipt(&s.rec.trip));
            let answers = ticket_for(&Sender::Rider);
            self.ctx.tell_rider(
                &s.rec.trip.rider_id,
                RiderMsg::Trip {
                    view: view.clone(),
                    receipt,
                    answers,
                },
            );
            if let Some(d) = &released {
                let t = ticket_for(&Sender::Driver(d.clone()));
                self.tell_driver(d, &view, TripLink::Released, t);
            }
            if let Some(d) = &assigned {
                let t = ticket_for(&Sender::Driver(d.clone()));
                self.tell_driver(d, &view, TripLink::Assigned, t);
            } else if let Some(d) = s.rec.trip.driver_id().cloned()
                && Some(&d) != released.as_ref()
            {
                let t = ticket_for(&Sender::Driver(d.clone()));
                self.tell_driver(&d, &view, TripLink::Update, t);
            }
        }

        // 4. Timers, offers, searches.
        self.schedule(myself, s, &d.effects, work).await;

        // 5. A reply no update carried (an admin's command, a decline that ended nothing).
        if let Some(t) = ticket {
            self.answer(s, &from, Answer::Ticket(t), Ok(()));
        }
        if let Some(p) = admin {
            let _ = p.send(Ok(()));
        }

        // 6. A final trip answers what is already queued, then stops.
        if finished {
            m.trips_final
                .with_label_values(&[s.rec.trip.state().as_str()])
                .inc();
            reg.trips.remove(&trip_id);
            if s.round == Round::Wait {
                self.stop_waiting(s);
            }
            reg.forget_finished(&trip_id);
            let _ = myself.drain();
        }
        Ok(())
    }

    /// Arms the timers, reserves the offers and queues the searches a decision asks for.
    async fn schedule(
        &self,
        myself: &ActorRef<TripMsg>,
        s: &mut TripActorState,
        effects: &[TripEffect],
        work: &mut Work,
    ) {
        let m = &self.ctx.metrics;
        let now = self.ctx.clock.now_ms();
        for e in effects {
            match e {
                TripEffect::ArmDeadline { at_ms } => {
                    arm(myself, now, *at_ms, TripCommand::DeadlineReached)
                }
                TripEffect::SendOffer(offer) => {
                    let first = !s.first_offer_seen;
                    let ov = OfferView {
                        trace: s.trace,
                        queued_at: first.then(std::time::Instant::now),
                        ..OfferView::of(&s.rec.trip, offer)
                    };
                    let held = match self.ctx.registry.driver(&offer.driver_id) {
                        // A driver of a shard on another node is asked through its
                        // router; no answer within `actor_call_timeout_ms` = declined.
                        _ if let Some((node, link)) = self
                            .ctx
                            .remote_of(self.ctx.shard_of_driver(&offer.driver_id)) =>
                        {
                            let (tx, rx) = ractor::concurrency::oneshot();
                            let msg = DriverMsg::ReserveOffer(ov, tx.into());
                            link.driver(&node, offer.driver_id.clone(), msg)
                                && matches!(
                                    tokio::time::timeout(self.ctx.call_timeout(), rx).await,
                                    Ok(Ok(true))
                                )
                        }
                        Some(d) => matches!(
                            d.call(
                                |r| DriverMsg::ReserveOffer(ov, r),
                                Some(self.ctx.call_timeout())
                            )
                            .await,
                            Ok(ractor::rpc::CallResult::Success(true))
                        ),
                        None => false,
                    };
                    s.mark(Stage::Reserve);
                    // The driver a cell handed this trip: settled, sent or refused.
                    if s.handed
                        .as_ref()
                        .is_some_and(|(d, _)| *d == offer.driver_id)
                        && let Some((d, freed_at)) = s.handed.take()
                    {
                        if held {
                            m.batch_freed_to_offer
                                .observe(freed_at.elapsed().as_secs_f64());
                        }
                        self.ctx.waiting.settled(&d);
                    }
                    if held {
                        m.offers.with_label_values(&["sent"]).inc();
                        if s.round == Round::Wait {
                            self.stop_waiting(s);
                        }
                        s.round = Round::Window;
                        if !s.first_offer_seen {
                            s.first_offer_seen = true;
                            let waited = now.saturating_sub(s.rec.trip.created_at_ms);
                            m.request_to_offer.observe(waited as f64 / 1000.0);
                            if let Some(clock) = s.stages.take() {
                                m.offer_reserved(&clock, s.rec.trip.id.as_str());
                            }
                        }
                        arm(
                            myself,
                            now,
                            offer.expires_at_ms,
                            TripCommand::OfferTimeout { seq: offer.seq },
                        );
                    } else {
                        m.offers.with_label_values(&["refused"]).inc();
                        self.unindex_ghost(s, &offer.driver_id);
                        work.push_back(Step::Command(
                            TripCommand::OfferRefused { seq: offer.seq },
                            Sender::System,
                            Answer::None,
                        ));
                    }
                }
                TripEffect::Search { exclude } => {
                    work.push_back(Step::Search(exclude.clone()));
                }
                _ => {}
            }
        }
    }

    /// Sharded mode: a driver the trip's search found in a cell refused its offer. Unless
    /// it is a driver of this node with a session (whose own actor keeps its place in the
    /// index), it is taken out of that cell: a driver whose node was killed left its
    /// entry there (no `end_shard` took it out), and its shard's new owner has no actor
    /// for it, or one with no session, which refuses every offer; it may have been
    /// indexed elsewhere from a stale stored position, so its own actor cannot find the
    /// entry. Without this every trip near it would offer it again (a waiting trip every
    /// poll). A live driver taken out so (it refused, holding another offer) is indexed
    /// again by its next ping or status change. Counted (`bound="offer_refused_unindexed"`).
    fn unindex_ghost(&self, s: &mut TripActorState, driver: &DriverId) {
        let Some(i) = s.found_in.iter().position(|(d, _)| d == driver) else {
            return;
        };
        let (_, cell) = s.found_in.swap_remove(i);
        let live_here = self
            .ctx
            .remote_of(self.ctx.shard_of_driver(driver))
            .is_none()
            && (self.ctx.registry.driver_records.get(driver)).is_some_and(|r| r.session.is_some());
        if live_here {
            return;
        }
        self.ctx.unindex_driver(driver, cell);
        self.ctx.metrics.bound_hit("offer_refused_unindexed");
        tracing::info!(trip_id = %s.rec.trip.id, driver_id = %driver, cell = %cell, "a driver who refused its offer with no actor or session here is taken out of the cell it was found in");
    }

    /// A command's outcome goes the way its updates go (through the driver's or rider's
    /// actor), so it never overtakes an update that explains it.
    fn answer(
        &self,
        s: &TripActorState,
        from: &Sender,
        answer: Answer,
        outcome: Result<(), ApiError>,
    ) {
        match answer {
            Answer::None => {}
            Answer::Admin(p) => {
                let _ = p.send(outcome);
            }
            Answer::Ticket(ticket) => match from {
                Sender::Driver(d) => {
                    self.ctx
                        .tell_driver(d, DriverMsg::Answer { ticket, outcome });
                }
                Sender::Rider => {
                    let msg = RiderMsg::Answer { ticket, outcome };
                    self.ctx.tell_rider(&s.rec.trip.rider_id, msg);
                }
                Sender::Admin | Sender::System => {}
            },
        }
    }

    fn tell_driver(
        &self,
        driver_id: &DriverId,
        view: &TripView,
        link: TripLink,
        answers: Option<Ticket>,
    ) {
        let msg = DriverMsg::Trip {
            view: Box::new(view.clone()),
            link,
            answers,
        };
        self.ctx.tell_driver(driver_id, msg);
    }
}

impl TripActorState {
    /// Ends a stage of a new trip's request → offer (nothing once its first offer is
    /// reserved, or for a resumed trip).
    fn mark(&mut self, stage: Stage) {
        if let Some(c) = self.stages.as_mut() {
            c.mark(stage);
        }
    }

    /// Commits `batch`, the time it took ending `stage` (a commit's stage).
    async fn commit(
        &mut self,
        store: &dispatch_persistence::Store,
        batch: Batch,
        stage: Stage,
    ) -> Result<(), dispatch_persistence::StoreError> {
        let (committed, timing) = store.commit_timed(batch).await;
        if let Some(c) = self.stages.as_mut() {
            if let Some(t) = &timing {
                c.commit(stage, t);
            }
            c.mark(stage);
        }
        committed
    }
}

/// The end-of-trip summary the rider gets with `completed`.
pub(crate) fn receipt(t: &Trip) -> Receipt {
    let duration_s = match (t.started_at_ms(), t.completed_at_ms()) {
        (Some(a), Some(b)) => b.saturating_sub(a) / 1000,
        _ => 0,
    };
    Receipt {
        trip_id: t.id.clone(),
        fare_cents: t.fare_cents().unwrap_or(t.quote.fare_cents),
        currency: t.quote.currency.clone(),
        distance_m: t.quote.distance_m,
        duration_s,
        surge: t.quote.surge,
    }
}

/// Arms a timer that sends `cmd` to the trip at `at_ms` (now, if that has passed).
fn arm(myself: &ActorRef<TripMsg>, now: u64, at_ms: u64, cmd: TripCommand) {
    let after = Duration::from_millis(at_ms.saturating_sub(now));
    myself.send_after(after, move || TripMsg::Command {
        cmd,
        from: Sender::System,
        ticket: None,
        trace: None,
        fence: None,
    });
}

impl Actor for TripActor {
    type Msg = TripMsg;
    type State = TripActorState;
    type Arguments = TripArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<TripMsg>,
        args: TripArgs,
    ) -> Result<TripActorState, ActorProcessingErr> {
        let (rec, restarted, start) = match args {
            TripArgs::New(new) => {
                let now = self.ctx.clock.now_ms();
                let d = Trip::start(
                    new.trip_id.clone(),
                    new.rider_id.clone(),
                    new.product,
                    new.pickup,
                    new.dropoff,
                    new.terms.clone(),
                    now,
                    &self.ctx.config.dispatch,
                );
                let rec = TripRecord {
                    trip: d.trip.clone(),
                    driver: None,
                    entries: Vec::new(),
                };
                (rec, false, Some((d, new)))
            }
            TripArgs::Resume { record, restarted } => {
                if restarted {
                    tracing::warn!(trip_id = %record.trip.id, state = record.trip.state().as_str(), "trip actor restarted");
                }
                (record, restarted, None)
            }
        };
        let first_offer_seen = restarted || rec.trip.offer().is_some();
        Ok(TripActorState {
            rec,
            last_location_push_ms: 0,
            first_offer_seen,
            restarted,
            start,
            trace: None,
            round: Round::Window,
            taken: Arc::default(),
            stages: None,
            handed: None,
            polling: false,
            carried: None,
            found_in: Vec::new(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<TripMsg>,
        s: &mut TripActorState,
    ) -> Result<(), ActorProcessingErr> {
        let span =
            tracing::info_span!("trip", trip_id = %s.rec.trip.id, rider_id = %s.rec.trip.rider_id);
        let mut work = Work::new();
        let dispatch = match &s.start {
            Some((_, new)) => span.in_scope(
                || crate::traced_span!(new.trace, "trip.dispatch", trip_id = %s.rec.trip.id),
            ),
            None => tracing::Span::none(),
        };
        s.trace = TraceContext::of(&dispatch);
        if let Some((d, mut new)) = s.start.take() {
            s.stages = new.stages.take();
            s.mark(Stage::TripSpawn);
            self.begin(&myself, s, d, new, &mut work)
                .instrument(dispatch.clone())
                .instrument(span.clone())
                .await?;
        } else {
            if s.restarted {
                // Whatever was lost with the failed actor, the rider and driver see the
                // committed state again (each ignores a version it already has).
                let view = self.view(s);
                let msg = RiderMsg::Trip {
                    view: view.clone(),
                    receipt: None,
                    answers: None,
                };
                self.ctx.tell_rider(&s.rec.trip.rider_id, msg);
                if let Some(d) = s.rec.trip.driver_id().cloned() {
                    self.tell_driver(&d, &view, TripLink::Assigned, None);
                }
            }
            self.resume(&myself, s, &mut work);
        }
        self.run(&myself, s, work)
            .instrument(dispatch)
            .instrument(span)
            .await
    }

    async fn handle(
        &self,
        myself: ActorRef<TripMsg>,
        msg: TripMsg,
        s: &mut TripActorState,
    ) -> Result<(), ActorProcessingErr> {
        let span =
            tracing::info_span!("trip", trip_id = %s.rec.trip.id, rider_id = %s.rec.trip.rider_id);
        let kind = msg.kind();
        self.ctx
            .metrics
            .handle_in("trip", kind, span, || self.handle_msg(myself, msg, s))
            .await
    }
}

impl TripActor {
    /// One message: what `Actor::handle` does, timed and counted by the caller.
    async fn handle_msg(
        &self,
        myself: ActorRef<TripMsg>,
        msg: TripMsg,
        s: &mut TripActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TripMsg::Command {
                cmd,
                from,
                ticket,
                trace,
                fence,
            } => {
                let span = crate::traced_span!(trace, "trip.command", command = cmd.kind(), trip_id = %s.rec.trip.id);
                let answer = ticket.map_or(Answer::None, Answer::Ticket);
                // A remote driver's fence holds for its own command only.
                s.carried = fence.filter(|_| matches!(from, Sender::Driver(_)));
                let work = Work::from([Step::Command(cmd, from, answer)]);
                let r = self.run(&myself, s, work).instrument(span).await;
                s.carried = None;
                r?;
            }
            TripMsg::Admin { cmd, reply } => {
                let work = Work::from([Step::Command(cmd, Sender::Admin, Answer::Admin(reply))]);
                self.run(&myself, s, work).await?;
            }
            TripMsg::DriverLocation {
                driver_id,
                position,
                heading,
            } => self.driver_moved(s, driver_id, position, heading),
            TripMsg::Get(reply) => {
                let _ = reply.send(s.rec.clone());
            }
            TripMsg::SearchAgain => {
                s.polling = false;
                let t = &s.rec.trip;
                // Only a trip still waiting for that search (not cancelled, not past its
                // deadline, not restarted into another round since).
                if s.round == Round::Wait && t.state() == TripState::Dispatching && t.is_searching()
                {
                    let work = Work::from([Step::Search(t.excluded().cloned().collect())]);
                    self.run(&myself, s, work).await?;
                }
            }
            TripMsg::DriverFreed(h) => self.driver_freed(&myself, s, h).await?,
            TripMsg::InjectPanic => panic!("injected fault in trip {}", s.rec.trip.id),
        }
        Ok(())
    }

    /// A cell handed this waiting trip a driver that freed up near it: it offers it at
    /// once (a driver that only could not hold an earlier offer of this trip included).
    /// A trip that no longer waits, or may not offer it, passes it on to the next
    /// waiting trip.
    async fn driver_freed(
        &self,
        myself: &ActorRef<TripMsg>,
        s: &mut TripActorState,
        h: crate::waiting::Handed,
    ) -> Result<(), ActorProcessingErr> {
        let t = &s.rec.trip;
        let waits = s.round == Round::Wait && t.state() == TripState::Dispatching;
        if !waits || !t.may_offer_freed(&h.candidate) || t.offer().is_some() {
            self.ctx.waiting.settled(&h.candidate.driver.driver_id);
            self.ctx.driver_freed(&h.candidate.driver);
            if waits {
                self.wait_for_driver(s);
            }
            return Ok(());
        }
        self.stop_waiting(s);
        let m = &self.ctx.metrics;
        m.batch_retries.with_label_values(&["freed"]).inc();
        s.handed = Some((h.candidate.driver.driver_id.clone(), h.freed_at));
        let cmd = TripCommand::Freed(vec![(h.candidate, h.eta_s)]);
        let work = Work::from([Step::Command(cmd, Sender::System, Answer::None)]);
        self.run(myself, s, work).await?;
        // Whatever came of it (an offer sent or refused), the driver is settled.
        if let Some((d, _)) = s.handed.take() {
            self.ctx.waiting.settled(&d);
        }
        Ok(())
    }

    /// The assigned driver moved: a fresher pickup ETA, and its position to the rider (at
    /// most every `driver_location_interval_ms`).
    fn driver_moved(
        &self,
        s: &mut TripActorState,
        driver_id: DriverId,
        position: dispatch_engine::Point,
        heading: Option<f64>,
    ) {
        if s.rec.trip.driver_id() != Some(&driver_id) {
            return;
        }
        if let Some(d) = s.rec.driver.as_mut() {
            d.location = Some(position);
        }
        let eta = s
            .rec
            .trip
            .driver_moved(&driver_id, position, self.ctx.config.eta.as_ref());
        let now = self.ctx.clock.now_ms();
        let active = matches!(
            s.rec.trip.state(),
            TripState::DriverAssigned | TripState::DriverArrived | TripState::InProgress
        );
        if active
            && now.saturating_sub(s.last_location_push_ms)
                >= self.ctx.config.driver_location_interval_ms
        {
            s.last_location_push_ms = now;
            let msg = RiderMsg::DriverLocation {
                trip_id: s.rec.trip.id.clone(),
                position,
                heading,
                pickup_eta_s: eta,
            };
            self.ctx.tell_rider(&s.rec.trip.rider_id, msg);
        }
    }
}
