//! `TripActor`: one per live trip. Runs the engine's trip machine and carries out its
//! effects in a fixed order: commit the new state first, then tell the driver(s) and
//! the rider, then arm timers, reserve offers and search. Because the commit comes
//! first, a restart from the snapshot never forgets something a client was told.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use dispatch_engine::trip::OfferEnd;
use dispatch_engine::{
    CancelledBy, DriverId, Entry, Point, Trip, TripCommand, TripEffect, TripMoney, TripState,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::cell::SearchFilter;
use crate::driver::{DriverMsg, TripLink};
use crate::error::ApiError;
use crate::payments::PaymentError;
use crate::registry::TripRecord;
use crate::rider::RiderMsg;
use crate::session::Responder;
use crate::system::System;
use crate::views::{OfferView, Receipt, TripDriver, TripView};
use dispatch_persistence::{Batch, StoredTrip, Transition};

/// Who sent a command, so its reply can travel with the update it causes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TripFrom {
    Rider,
    Driver(DriverId),
    Admin,
    System,
}

pub struct TripArgs {
    pub record: TripRecord,
    /// Restarted by the supervisor from `record` after a failure.
    pub restarted: bool,
}

pub enum TripMsg {
    Command {
        cmd: TripCommand,
        from: TripFrom,
        responder: Option<Responder>,
    },
    DriverLocation {
        driver_id: DriverId,
        position: Point,
        heading: Option<f64>,
    },
    Get(RpcReplyPort<TripRecord>),
    /// Test hook: fail inside a handler, as a bug would.
    InjectPanic,
}

impl TripMsg {
    /// The message's kind, a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            TripMsg::Command { cmd, .. } => cmd.kind(),
            TripMsg::DriverLocation { .. } => "driver_location",
            TripMsg::Get(_) => "get",
            TripMsg::InjectPanic => "inject_panic",
        }
    }
}

pub struct TripActor {
    pub system: System,
}

pub struct TripActorState {
    rec: TripRecord,
    last_location_push_ms: u64,
    first_offer_seen: bool,
    restarted: bool,
}

/// What a trip actor still has to do within one message: engine commands, and searches
/// (which run between commands, so their results are applied in order).
enum Step {
    Command(TripCommand, TripFrom, Option<Responder>),
    Search(Vec<DriverId>),
    /// A refusal owed once the steps before it have been carried out (and sent).
    Refuse(TripFrom, Responder, ApiError),
}

type Work = VecDeque<Step>;

impl TripActor {
    fn view(&self, s: &TripActorState) -> TripView {
        TripView::of(&s.rec.trip, s.rec.driver.clone())
    }

    /// The timers and searches a trip in this state needs (a new or a restarted trip).
    fn resume(&self, myself: &ActorRef<TripMsg>, s: &TripActorState, work: &mut Work) {
        let t = &s.rec.trip;
        if t.state() != TripState::Dispatching {
            return;
        }
        let now = self.system.clock.now_ms();
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

    async fn run(
        &self,
        myself: &ActorRef<TripMsg>,
        s: &mut TripActorState,
        mut work: Work,
    ) -> Result<(), ActorProcessingErr> {
        while let Some(step) = work.pop_front() {
            let (cmd, from, responder) = match step {
                Step::Command(cmd, from, responder) => (cmd, from, responder),
                Step::Search(exclude) => (self.search(s, exclude).await, TripFrom::System, None),
                Step::Refuse(from, r, error) => {
                    self.fail(s, &from, r, error);
                    continue;
                }
            };
            let now = self.system.clock.now_ms();
            let cfg = self.system.config.dispatch;
            // Applied to a copy: the payment may still say no.
            let mut next = s.rec.trip.clone();
            match next.apply(cmd, now, &cfg, self.system.config.eta.as_ref()) {
                Err(e) => {
                    if let Some(r) = responder {
                        self.fail(s, &from, r, e.into());
                    }
                }
                Ok(fx) => match self.pay(s, &mut next, &fx, now).await {
                    Ok(entry) => {
                        s.rec.trip = next;
                        self.carry_out(myself, s, fx, from, responder, entry, &mut work)
                            .await?
                    }
                    Err(PaymentError::Declined(why)) => {
                        // Only an authorization can be declined: the assignment does not
                        // happen, and the trip is cancelled instead.
                        tracing::info!(trip_id = %s.rec.trip.id, reason = %why, "payment declined; cancelling the trip");
                        // The refusal follows the cancel, so the app sees why first.
                        if let Some(r) = responder {
                            work.push_front(Step::Refuse(
                                from,
                                r,
                                ApiError::conflict(
                                    "the rider's payment was declined; the trip is cancelled",
                                ),
                            ));
                        }
                        work.push_front(Step::Command(
                            TripCommand::Cancel {
                                by: CancelledBy::System,
                                reason: Some(format!("payment declined: {why}")),
                            },
                            TripFrom::System,
                            None,
                        ));
                    }
                    Err(PaymentError::Unavailable(why)) => {
                        // Nothing changed: the sender may retry (an offer stays open).
                        tracing::warn!(trip_id = %s.rec.trip.id, error = %why, "payment provider unavailable; command not applied");
                        if let Some(r) = responder {
                            self.fail(
                                s,
                                &from,
                                r,
                                ApiError::unavailable("the payment provider is unavailable; retry"),
                            );
                        }
                    }
                },
            }
        }
        Ok(())
    }

    /// Asks the payment provider for what a transition needs (a hold at assignment, a
    /// capture at completion, a fee or a release at a cancel) and returns the ledger entry
    /// to commit with it. `next` is the trip after the command; `s` still holds it before.
    async fn pay(
        &self,
        s: &TripActorState,
        next: &mut Trip,
        fx: &[TripEffect],
        now: u64,
    ) -> Result<Option<Entry>, PaymentError> {
        let prev = &s.rec.trip;
        let money = TripMoney::of(&s.rec.entries, &prev.rider_id);
        let sys = &self.system;
        let key = |step: &str| format!("{}:{step}", prev.id);
        let currency = prev.quote.currency.clone();
        let assigned = fx
            .iter()
            .any(|e| matches!(e, TripEffect::DriverAssigned { .. }));
        if assigned && money.authorized_at_ms.is_none() && !money.settled {
            let amount = prev.quote.fare_cents;
            self.ask(
                "authorize",
                sys.provider.authorize(key("authorize"), amount),
            )
            .await?;
            return Ok(money
                .authorize(&prev.id, &prev.rider_id, amount, &currency, now)
                .ok());
        }
        if next.state() == prev.state() || money.authorized_at_ms.is_none() || money.settled {
            return Ok(None);
        }
        match next.state() {
            TripState::Completed => {
                let Some(driver) = next.driver_id().cloned() else {
                    return Ok(None);
                };
                let fare = next.fare_cents().unwrap_or(prev.quote.fare_cents);
                self.ask("capture", sys.provider.capture(key("capture"), fare))
                    .await?;
                if sys.config.crash_after_capture {
                    tracing::error!(trip_id = %prev.id, "DISPATCH_TEST_CRASH_AFTER=capture: aborting");
                    std::process::abort();
                }
                Ok(money
                    .capture(
                        &sys.config.payments,
                        &prev.id,
                        &prev.rider_id,
                        &driver,
                        fare,
                        &currency,
                        now,
                    )
                    .ok())
            }
            TripState::Cancelled => {
                let fee = sys.rates().card(prev.product).cancellation_fee_cents;
                let arrived_at =
                    (prev.state() == TripState::DriverArrived).then(|| prev.updated_at_ms());
                let fee_due = next.cancelled_by() == Some(CancelledBy::Rider)
                    && fee > 0
                    && money.authorized_at_ms.is_some_and(|at| {
                        sys.config
                            .payments
                            .rider_cancel_costs_fee(at, arrived_at, now)
                    });
                match (fee_due, prev.driver_id()) {
                    (true, Some(driver)) => {
                        self.ask("capture", sys.provider.capture(key("cancel_fee"), fee))
                            .await?;
                        let e = money
                            .cancel_fee(&prev.id, &prev.rider_id, driver, fee, &currency, now)
                            .ok();
                        if e.is_some() {
                            let _ = next.charge_cancellation_fee(fee);
                        }
                        Ok(e)
                    }
                    _ => Ok(self.release(&money, prev, &currency, now).await),
                }
            }
            TripState::NoDriverFound => Ok(self.release(&money, prev, &currency, now).await),
            _ => Ok(None),
        }
    }

    /// The hold goes back. Best effort with the provider (an authorization it never
    /// releases expires by itself); the ledger entry is written either way.
    async fn release(
        &self,
        money: &TripMoney,
        t: &Trip,
        currency: &str,
        now: u64,
    ) -> Option<Entry> {
        let e = money.release(&t.id, &t.rider_id, currency, now)?;
        let _ = self
            .ask(
                "release",
                self.system.provider.release(format!("{}:release", t.id)),
            )
            .await;
        Some(e)
    }

    /// One provider request, counted when it fails.
    async fn ask(
        &self,
        request: &'static str,
        call: crate::payments::PayFuture<'_>,
    ) -> Result<(), PaymentError> {
        let r = call.await;
        if let Err(e) = &r {
            let outcome = match e {
                PaymentError::Declined(_) => "declined",
                PaymentError::Unavailable(_) => "unavailable",
            };
            self.system
                .metrics
                .payment_failures
                .with_label_values(&[request, outcome])
                .inc();
        }
        r
    }

    async fn search(&self, s: &TripActorState, exclude: Vec<DriverId>) -> TripCommand {
        let t = &s.rec.trip;
        let filter = SearchFilter {
            product: Some(t.product),
            available_only: true,
            exclude: Arc::new(exclude),
        };
        let (found, stats) = self
            .system
            .search(t.pickup, self.system.config.search, filter)
            .await;
        tracing::debug!(trip_id = %t.id, found = found.len(), cells = stats.cells_searched, examined = stats.drivers_examined, "searched");
        TripCommand::Candidates(found)
    }

    // The command's effects, who sent it and its ledger entry: all of one transition.
    #[allow(clippy::too_many_arguments)]
    async fn carry_out(
        &self,
        myself: &ActorRef<TripMsg>,
        s: &mut TripActorState,
        fx: Vec<TripEffect>,
        from: TripFrom,
        responder: Option<Responder>,
        entry: Option<Entry>,
        work: &mut Work,
    ) -> Result<(), ActorProcessingErr> {
        let mut responder = responder;
        let reg = &self.system.registry;
        let m = &self.system.metrics;
        let trip_id = s.rec.trip.id.clone();

        // 1. Bookkeeping, then commit, before anyone is told anything.
        let mut transitioned = None;
        let mut journal = None;
        let mut assigned = None;
        let mut released = None;
        for e in &fx {
            match e {
                TripEffect::Transitioned {
                    from,
                    to,
                    by,
                    at_ms,
                } => {
                    journal = Some(Transition {
                        from: *from,
                        to: *to,
                        by: by.clone(),
                        at_ms: *at_ms,
                        version: s.rec.trip.version(),
                    });
                    debug_assert!(transitioned.is_none(), "one transition per command");
                    transitioned = Some(*to);
                }
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
        if s.rec.trip.driver_id().is_none() {
            s.rec.driver = None;
        }
        let view = self.view(s);
        let stored = StoredTrip {
            trip: s.rec.trip.clone(),
            driver: s.rec.driver.clone(),
        };
        let mut batch = Batch::new().trip(stored, journal);
        if let Some(e) = &entry {
            batch = batch.ledger(e.clone());
        }
        if let Err(e) = self.system.store.commit(batch).await {
            // Nobody has been told; the actor fails and restarts from what is on disk.
            m.bound_hit("store_write_failed");
            if let Some(r) = responder {
                r.fail(ApiError::unavailable(
                    "the change could not be stored; retry",
                ));
            }
            return Err(format!("trip {trip_id}: store write failed: {e}").into());
        }
        if let Some(e) = entry {
            self.system.entry_written(&e);
            s.rec.entries.push(e);
        }
        reg.trip_records.insert(trip_id.clone(), s.rec.clone());
        reg.trip_views.insert(trip_id.clone(), view.clone());
        let mut take_for = |who: &TripFrom| if &from == who { responder.take() } else { None };

        // 2. Offers that ended.
        for e in &fx {
            if let TripEffect::OfferEnded { driver_id, why, .. } = e {
                m.offers
                    .with_label_values(&[match why {
                        OfferEnd::Declined => "declined",
                        OfferEnd::Expired => "expired",
                        OfferEnd::Withdrawn => "withdrawn",
                    }])
                    .inc();
                let r = take_for(&TripFrom::Driver(driver_id.clone()));
                if let Some(d) = reg.driver(driver_id) {
                    let _ = d.cast(DriverMsg::OfferEnded {
                        trip_id: trip_id.clone(),
                        notify: *why != OfferEnd::Declined,
                        responder: r,
                    });
                }
            }
        }
        if assigned.is_some() {
            m.offers.with_label_values(&["accepted"]).inc();
            let now = self.system.clock.now_ms();
            let waited = now.saturating_sub(s.rec.trip.created_at_ms);
            m.request_to_accept.observe(waited as f64 / 1000.0);
            if let Some(eta) = view.pickup_eta_s {
                m.pickup_eta.observe(eta as f64);
            }
        }

        // 3. The transition, to the rider and to the driver(s).
        if let Some(to) = transitioned {
            m.trip_transitions.with_label_values(&[to.as_str()]).inc();
            tracing::info!(trip_id = %trip_id, state = to.as_str(), version = view.version, "trip transition");
            if let Some(r) = reg.rider(&s.rec.trip.rider_id) {
                let receipt = (to == TripState::Completed).then(|| self.receipt(s));
                let _ = r.cast(RiderMsg::Trip {
                    view: view.clone(),
                    receipt,
                    responder: take_for(&TripFrom::Rider),
                });
            }
            if let Some(d) = &released {
                self.tell_driver(
                    d,
                    &view,
                    TripLink::Released,
                    take_for(&TripFrom::Driver(d.clone())),
                );
            }
            if let Some(d) = &assigned {
                self.tell_driver(
                    d,
                    &view,
                    TripLink::Assigned,
                    take_for(&TripFrom::Driver(d.clone())),
                );
            } else if let Some(d) = s.rec.trip.driver_id().cloned()
                && Some(&d) != released.as_ref()
            {
                self.tell_driver(
                    &d,
                    &view,
                    TripLink::Update,
                    take_for(&TripFrom::Driver(d.clone())),
                );
            }
        }

        // 4. Timers, offers, searches.
        let now = self.system.clock.now_ms();
        for e in fx.iter() {
            match e {
                TripEffect::ArmDeadline { at_ms } => {
                    arm(myself, now, *at_ms, TripCommand::DeadlineReached)
                }
                TripEffect::SendOffer(offer) => {
                    let ov = OfferView::of(&s.rec.trip, offer);
                    let held = match reg.driver(&offer.driver_id) {
                        Some(d) => matches!(
                            d.call(
                                |r| DriverMsg::ReserveOffer(ov, r),
                                Some(self.system.call_timeout())
                            )
                            .await,
                            Ok(ractor::rpc::CallResult::Success(true))
                        ),
                        None => false,
                    };
                    if held {
                        m.offers.with_label_values(&["sent"]).inc();
                        if !s.first_offer_seen {
                            s.first_offer_seen = true;
                            let waited = now.saturating_sub(s.rec.trip.created_at_ms);
                            m.request_to_offer.observe(waited as f64 / 1000.0);
                        }
                        arm(
                            myself,
                            now,
                            offer.expires_at_ms,
                            TripCommand::OfferTimeout { seq: offer.seq },
                        );
                    } else {
                        m.offers.with_label_values(&["refused"]).inc();
                        work.push_back(Step::Command(
                            TripCommand::OfferRefused { seq: offer.seq },
                            TripFrom::System,
                            None,
                        ));
                    }
                }
                TripEffect::Search { exclude } => {
                    work.push_back(Step::Search(exclude.clone()));
                }
                _ => {}
            }
        }

        // 5. A reply no update carried (an admin's command, a decline that ended nothing).
        if let Some(r) = responder {
            r.ack();
        }

        // 6. A final trip answers what is already queued, then stops.
        if fx.iter().any(|e| matches!(e, TripEffect::Finished)) {
            m.trips_final
                .with_label_values(&[s.rec.trip.state().as_str()])
                .inc();
            reg.trips.remove(&trip_id);
            // Finished trips live in the store only; reads go there.
            reg.trip_records.remove(&trip_id);
            reg.trip_views.remove(&trip_id);
            let _ = myself.drain();
        }
        Ok(())
    }

    /// A refused command's answer goes the way its updates go (through the driver's or
    /// rider's actor), so it never overtakes an update that explains it.
    fn fail(&self, s: &TripActorState, from: &TripFrom, r: Responder, error: ApiError) {
        let reg = &self.system.registry;
        let undelivered = match from {
            TripFrom::Driver(d) => match reg.driver(d) {
                Some(a) => match a.cast(DriverMsg::Failed(r, error)) {
                    Ok(()) => None,
                    Err(ractor::MessagingErr::SendErr(DriverMsg::Failed(r, error))) => {
                        Some((r, error))
                    }
                    Err(_) => None,
                },
                None => Some((r, error)),
            },
            TripFrom::Rider => match reg.rider(&s.rec.trip.rider_id) {
                Some(a) => match a.cast(RiderMsg::Failed(r, error)) {
                    Ok(()) => None,
                    Err(ractor::MessagingErr::SendErr(RiderMsg::Failed(r, error))) => {
                        Some((r, error))
                    }
                    Err(_) => None,
                },
                None => Some((r, error)),
            },
            _ => Some((r, error)),
        };
        if let Some((r, error)) = undelivered {
            r.fail(error);
        }
    }

    fn receipt(&self, s: &TripActorState) -> Receipt {
        let t = &s.rec.trip;
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

    fn tell_driver(
        &self,
        driver_id: &DriverId,
        view: &TripView,
        link: TripLink,
        responder: Option<Responder>,
    ) {
        match self.system.registry.driver(driver_id) {
            Some(d) => {
                let _ = d.cast(DriverMsg::Trip {
                    view: view.clone(),
                    link,
                    responder,
                });
            }
            None => {
                if let Some(r) = responder {
                    r.ack();
                }
            }
        }
    }
}

/// Arms a timer that sends `cmd` to the trip at `at_ms` (now, if that has passed).
fn arm(myself: &ActorRef<TripMsg>, now: u64, at_ms: u64, cmd: TripCommand) {
    let after = Duration::from_millis(at_ms.saturating_sub(now));
    myself.send_after(after, move || TripMsg::Command {
        cmd,
        from: TripFrom::System,
        responder: None,
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
        if args.restarted {
            tracing::warn!(trip_id = %args.record.trip.id, state = args.record.trip.state().as_str(), "trip actor restarted");
        }
        let first_offer_seen = args.restarted || args.record.trip.offer().is_some();
        Ok(TripActorState {
            rec: args.record,
            last_location_push_ms: 0,
            first_offer_seen,
            restarted: args.restarted,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<TripMsg>,
        s: &mut TripActorState,
    ) -> Result<(), ActorProcessingErr> {
        if s.restarted {
            // Whatever was lost with the failed actor, the rider and driver see the
            // committed state again (each ignores a version it already has).
            let view = self.view(s);
            if let Some(r) = self.system.registry.rider(&s.rec.trip.rider_id) {
                let _ = r.cast(RiderMsg::Trip {
                    view: view.clone(),
                    receipt: None,
                    responder: None,
                });
            }
            if let Some(d) = s.rec.trip.driver_id().cloned() {
                self.tell_driver(&d, &view, TripLink::Assigned, None);
            }
        }
        let span =
            tracing::info_span!("trip", trip_id = %s.rec.trip.id, rider_id = %s.rec.trip.rider_id);
        let mut work = Work::new();
        self.resume(&myself, s, &mut work);
        self.run(&myself, s, work).instrument(span).await
    }

    async fn handle(
        &self,
        myself: ActorRef<TripMsg>,
        msg: TripMsg,
        s: &mut TripActorState,
    ) -> Result<(), ActorProcessingErr> {
        let span =
            tracing::info_span!("trip", trip_id = %s.rec.trip.id, rider_id = %s.rec.trip.rider_id);
        // Inside the span, so a slow-handler warning carries the entity's ids.
        let handling = self.system.metrics.handling("trip", msg.kind());
        async move {
            let _handling = handling;
            self.handle_msg(myself, msg, s).await
        }
        .instrument(span)
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
                responder,
            } => {
                self.run(
                    &myself,
                    s,
                    Work::from([Step::Command(cmd, from, responder)]),
                )
                .await?;
            }
            TripMsg::DriverLocation {
                driver_id,
                position,
                heading,
            } => {
                if s.rec.trip.driver_id() != Some(&driver_id) {
                    return Ok(());
                }
                if let Some(d) = s.rec.driver.as_mut() {
                    d.location = Some(position);
                }
                let eta =
                    s.rec
                        .trip
                        .driver_moved(&driver_id, position, self.system.config.eta.as_ref());
                let now = self.system.clock.now_ms();
                let active = matches!(
                    s.rec.trip.state(),
                    TripState::DriverAssigned | TripState::DriverArrived | TripState::InProgress
                );
                if active
                    && now.saturating_sub(s.last_location_push_ms)
                        >= self.system.config.driver_location_interval_ms
                {
                    s.last_location_push_ms = now;
                    if let Some(r) = self.system.registry.rider(&s.rec.trip.rider_id) {
                        let _ = r.cast(RiderMsg::DriverLocation {
                            trip_id: s.rec.trip.id.clone(),
                            position,
                            heading,
                            pickup_eta_s: eta,
                        });
                    }
                }
            }
            TripMsg::Get(reply) => {
                let _ = reply.send(s.rec.clone());
            }
            TripMsg::InjectPanic => panic!("injected fault in trip {}", s.rec.trip.id),
        }
        Ok(())
    }
}
