//! Whole transitions: everything one command to a trip means, decided in one place.
//!
//! [`Trip::start`] and [`Trip::decide`] return a [`Decision`]: the trip after the command,
//! the effects to carry out (offers, timers, searches, notifications), the journal record
//! to persist with it, and the [`PaymentPlan`] (which provider request the transition
//! needs and the ledger entry it writes). The live actors, recovery, the fuzz harness and
//! the seeded simulation all call these, so none of them decides a payment step or builds
//! a journal record by hand.
//!
//! Carrying a decision out is always the same: ask the provider for the plan's request
//! (if any), let [`PaymentPlan::after`] say what the answer means, then persist the trip,
//! the journal record and the ledger entry together, and only then tell anyone.

use std::fmt;

use crate::eta::EtaModel;
use crate::ids::{DriverId, RiderId, TripId};
use crate::ledger::{Entry, PaymentTerms, Step, TripMoney};
use crate::trip::{
    CancelledBy, DispatchConfig, Mover, Trip, TripCommand, TripEffect, TripError, TripState,
};

/// One transition of a trip, as the journal records it.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Transition {
    pub from: TripState,
    pub to: TripState,
    pub by: Mover,
    pub at_ms: u64,
    /// The trip's version after the transition.
    pub version: u64,
}

/// Who sends a command to a trip (its answer goes back the way its updates go).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Sender {
    Rider,
    Driver(DriverId),
    Admin,
    System,
}

/// The rules a decision is made under, besides the trip itself.
#[derive(Clone, Copy)]
pub struct TripRules<'a> {
    pub dispatch: &'a DispatchConfig,
    pub eta: &'a dyn EtaModel,
    pub payments: &'a PaymentTerms,
    /// What a rider's late cancel costs for this trip's product, at the rates now in force.
    pub cancellation_fee_cents: i64,
}

impl fmt::Debug for TripRules<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TripRules")
            .field("dispatch", self.dispatch)
            .field("payments", self.payments)
            .field("cancellation_fee_cents", &self.cancellation_fee_cents)
            .finish_non_exhaustive()
    }
}

/// The provider request a transition needs, and the ledger entry it writes. Every
/// request carries the idempotency key of its entry (`<trip id>:<step>`), so a retry or a
/// replay after a crash moves money once.
#[derive(Debug, Clone, PartialEq)]
pub enum PaymentPlan {
    /// No money moves.
    None,
    /// Hold the quoted fare on the rider's card (at assignment).
    Authorize { amount_cents: i64, entry: Entry },
    /// Charge the fare (at completion) and split it.
    Capture { amount_cents: i64, entry: Entry },
    /// Charge a rider's late cancel (the trip already shows the fee as its fare).
    CancelFee { amount_cents: i64, entry: Entry },
    /// Let the hold go. Best effort with the provider (an authorization it never releases
    /// expires by itself): the entry is written whatever it answers.
    Release { entry: Entry },
}

/// What the payment provider answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderAnswer {
    Approved,
    /// A definite no (a declined card).
    Declined(String),
    /// No answer: the provider failed, could not be reached or did not answer in time.
    Unavailable(String),
}

/// What a provider's answer means for the decision.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterPayment {
    /// Persist the decision as it is.
    Commit,
    /// Nothing changes: the sender is told to retry (an open offer stays open).
    Retry,
    /// The payment was refused for good: the decision is dropped, this command is
    /// applied instead, and the sender is refused (`conflict`) after it.
    Instead(TripCommand),
}

impl PaymentPlan {
    /// The provider request: (request name, idempotency key, amount).
    pub fn request(&self) -> Option<(&'static str, String, i64)> {
        let (name, entry, amount) = match self {
            PaymentPlan::None => return None,
            PaymentPlan::Authorize {
                amount_cents,
                entry,
            } => ("authorize", entry, *amount_cents),
            PaymentPlan::Capture {
                amount_cents,
                entry,
            } => ("capture", entry, *amount_cents),
            PaymentPlan::CancelFee {
                amount_cents,
                entry,
            } => ("capture", entry, *amount_cents),
            PaymentPlan::Release { entry } => ("release", entry, 0),
        };
        Some((
            name,
            provider_key(&entry.key.trip_id, entry.key.step),
            amount,
        ))
    }

    /// The ledger entry to write with the transition.
    pub fn entry(&self) -> Option<&Entry> {
        match self {
            PaymentPlan::None => None,
            PaymentPlan::Authorize { entry, .. }
            | PaymentPlan::Capture { entry, .. }
            | PaymentPlan::CancelFee { entry, .. }
            | PaymentPlan::Release { entry } => Some(entry),
        }
    }

    /// What the provider's answer means: a release is written whatever it says; a
    /// declined authorization cancels the trip; anything else that is not an approval
    /// changes nothing.
    pub fn after(&self, answer: &ProviderAnswer) -> AfterPayment {
        match (self, answer) {
            (_, ProviderAnswer::Approved)
            | (PaymentPlan::None | PaymentPlan::Release { .. }, _) => AfterPayment::Commit,
            (PaymentPlan::Authorize { .. }, ProviderAnswer::Declined(why)) => {
                AfterPayment::Instead(TripCommand::Cancel {
                    by: CancelledBy::System,
                    reason: Some(format!("payment declined: {why}")),
                })
            }
            _ => AfterPayment::Retry,
        }
    }
}

/// The idempotency key of a provider request: `<trip id>:<step>`.
pub fn provider_key(trip: &TripId, step: Step) -> String {
    format!("{trip}:{step}")
}

/// Everything one command means.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The trip after the command (with a late cancel's fee already shown as its fare).
    pub trip: Trip,
    /// What to carry out once the decision is durable, in order.
    pub effects: Vec<TripEffect>,
    /// The journal record to persist with the trip, when its state moved (or it began).
    pub journal: Option<Transition>,
    pub payment: PaymentPlan,
}

impl Decision {
    /// Whether the trip reached a final state.
    pub fn finished(&self) -> bool {
        self.effects
            .iter()
            .any(|e| matches!(e, TripEffect::Finished))
    }
}

impl Trip {
    /// Decides `cmd` at `now_ms` for this trip, whose ledger entries so far are
    /// `entries`. The trip itself is not changed: the caller persists the decision's trip
    /// once the payment plan allows it. On error nothing is to be done.
    pub fn decide(
        &self,
        cmd: TripCommand,
        entries: &[Entry],
        now_ms: u64,
        rules: &TripRules<'_>,
    ) -> Result<Decision, TripError> {
        let mut next = self.clone();
        let effects = next.apply(cmd, now_ms, rules.dispatch, rules.eta)?;
        let journal = effects.iter().find_map(|e| match e {
            TripEffect::Transitioned {
                from,
                to,
                by,
                at_ms,
            } => Some(Transition {
                from: *from,
                to: *to,
                by: by.clone(),
                at_ms: *at_ms,
                version: next.version(),
            }),
            _ => None,
        });
        let payment = self.payment_plan(&mut next, &effects, entries, now_ms, rules);
        Ok(Decision {
            trip: next,
            effects,
            journal,
            payment,
        })
    }

    /// Which payment step the move from `self` to `next` needs: a hold at assignment, a
    /// capture at completion, a fee or a release at a cancel, a release when nobody was
    /// found.
    fn payment_plan(
        &self,
        next: &mut Trip,
        fx: &[TripEffect],
        entries: &[Entry],
        now: u64,
        rules: &TripRules<'_>,
    ) -> PaymentPlan {
        let money = TripMoney::of(entries, &self.rider_id);
        let currency = &self.quote.currency;
        let assigned = fx
            .iter()
            .any(|e| matches!(e, TripEffect::DriverAssigned { .. }));
        if assigned && money.authorized_at_ms.is_none() && !money.settled {
            let amount = self.quote.fare_cents;
            return match money.authorize(&self.id, &self.rider_id, amount, currency, now) {
                Ok(entry) => PaymentPlan::Authorize {
                    amount_cents: amount,
                    entry,
                },
                Err(_) => PaymentPlan::None,
            };
        }
        if next.state() == self.state() || money.authorized_at_ms.is_none() || money.settled {
            return PaymentPlan::None;
        }
        let release = || {
            money
                .release(&self.id, &self.rider_id, currency, now)
                .map_or(PaymentPlan::None, |entry| PaymentPlan::Release { entry })
        };
        match next.state() {
            TripState::Completed => {
                let Some(driver) = next.driver_id().cloned() else {
                    return PaymentPlan::None;
                };
                let fare = next.fare_cents().unwrap_or(self.quote.fare_cents);
                money
                    .capture(
                        rules.payments,
                        &self.id,
                        &self.rider_id,
                        &driver,
                        fare,
                        currency,
                        now,
                    )
                    .map_or(PaymentPlan::None, |entry| PaymentPlan::Capture {
                        amount_cents: fare,
                        entry,
                    })
            }
            TripState::Cancelled => {
                let fee = rules.cancellation_fee_cents;
                let arrived_at =
                    (self.state() == TripState::DriverArrived).then(|| self.updated_at_ms());
                let fee_due = next.cancelled_by() == Some(CancelledBy::Rider)
                    && fee > 0
                    && money.authorized_at_ms.is_some_and(|at| {
                        rules.payments.rider_cancel_costs_fee(at, arrived_at, now)
                    });
                match (fee_due, self.driver_id()) {
                    (true, Some(driver)) => {
                        match money.cancel_fee(&self.id, &self.rider_id, driver, fee, currency, now)
                        {
                            Ok(entry) => {
                                let _ = next.charge_cancellation_fee(fee);
                                PaymentPlan::CancelFee {
                                    amount_cents: fee,
                                    entry,
                                }
                            }
                            Err(_) => release(),
                        }
                    }
                    _ => release(),
                }
            }
            TripState::NoDriverFound => release(),
            _ => PaymentPlan::None,
        }
    }
}

/// Why a command for a trip that no live trip actor holds is refused: the trip ended,
/// never existed, or is being restarted. The one rule for every sender (a driver's
/// session, a rider's, the admin console), so that what a sender learns is the same
/// everywhere: a driver never offered the trip learns nothing about it beyond that, and a
/// rider nothing about another rider's trip.
pub fn refuse_without_trip(
    trip: Option<&Trip>,
    from: &Sender,
    rider: Option<&RiderId>,
    cmd: &TripCommand,
) -> TripError {
    let Some(t) = trip else {
        return TripError::NotFound("trip");
    };
    let ended = match from {
        Sender::Driver(d) if t.driver_id() == Some(d) => {
            TripError::Conflict("the trip has already ended")
        }
        Sender::Driver(d) => {
            // A driver once offered the trip learns its offer is gone; any other gets what
            // a live trip answers it, so an ended trip's state does not show through.
            let was_offered = t.excluded().any(|x| x == d);
            match cmd {
                TripCommand::Accept { .. } | TripCommand::Decline { .. } if was_offered => {
                    TripError::Conflict("the offer has expired or gone to another driver")
                }
                TripCommand::Accept { .. } | TripCommand::Decline { .. } => {
                    TripError::Forbidden("this trip was not offered to this driver")
                }
                _ => TripError::Forbidden("the driver is not on this trip"),
            }
        }
        Sender::Rider if rider != Some(&t.rider_id) => {
            TripError::Forbidden("the trip belongs to another rider")
        }
        Sender::Rider | Sender::Admin | Sender::System => {
            TripError::Conflict("the trip has already ended")
        }
    };
    match ended {
        // Live, but its actor is being restarted by its supervisor: whoever may act on
        // it is told to retry; whoever may not is refused as always.
        TripError::Conflict(_) if !t.state().is_final() => {
            TripError::Unavailable("the trip is restarting; retry")
        }
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eta::StraightLineEta;
    use crate::index::IndexedDriver;
    use crate::search::Candidate;
    use crate::trip::QuoteTerms;
    use crate::{Point, Product};

    /// One trip's world: the rules it is decided under and its ledger entries so far.
    struct World {
        cfg: DispatchConfig,
        eta: StraightLineEta,
        terms: PaymentTerms,
        fee: i64,
        entries: Vec<Entry>,
    }

    impl World {
        fn new(fee: i64) -> World {
            World {
                cfg: DispatchConfig::default(),
                eta: StraightLineEta::default(),
                terms: PaymentTerms::default(),
                fee,
                entries: Vec::new(),
            }
        }

        fn decide(&self, t: &Trip, cmd: TripCommand, now: u64) -> Decision {
            let rules = TripRules {
                dispatch: &self.cfg,
                eta: &self.eta,
                payments: &self.terms,
                cancellation_fee_cents: self.fee,
            };
            t.decide(cmd, &self.entries, now, &rules).unwrap()
        }

        /// Applies a decision as a caller would: the trip, and its entry if any.
        fn commit(&mut self, d: Decision) -> Trip {
            if let Some(e) = d.payment.entry() {
                self.entries.push(e.clone());
            }
            d.trip
        }

        fn step(&mut self, t: &Trip, cmd: TripCommand, now: u64) -> Trip {
            let d = self.decide(t, cmd, now);
            self.commit(d)
        }

        /// A new trip at time 0, offered to `drv_1`.
        fn offered(&mut self) -> Trip {
            let t = self.commit(start(0));
            self.step(&t, TripCommand::Candidates(vec![candidate("drv_1")]), 0)
        }

        /// The same, accepted by `drv_1` at time 0.
        fn assigned(&mut self) -> Trip {
            let t = self.offered();
            self.step(&t, accept("drv_1"), 0)
        }
    }

    fn start(now: u64) -> Decision {
        Trip::start(
            TripId::new("trp_1"),
            RiderId::new("rdr_1"),
            Product::Economy,
            Point::new(45.5, -73.6).unwrap(),
            Point::new(45.52, -73.58).unwrap(),
            QuoteTerms {
                fare_cents: 1_500,
                currency: "USD".into(),
                surge: 1.0,
                distance_m: 3_000,
                duration_s: 600,
            },
            now,
            &DispatchConfig::default(),
        )
    }

    fn candidate(id: &str) -> Candidate {
        Candidate {
            driver: IndexedDriver {
                driver_id: DriverId::new(id),
                position: Point::new(45.501, -73.6).unwrap(),
                heading: None,
                product: Product::Economy,
                available: true,
            },
            distance_m: 100.0,
        }
    }

    fn accept(d: &str) -> TripCommand {
        TripCommand::Accept {
            driver_id: DriverId::new(d),
        }
    }

    fn cancel(by: CancelledBy) -> TripCommand {
        TripCommand::Cancel { by, reason: None }
    }

    #[test]
    fn a_ride_plans_a_hold_at_assignment_and_a_capture_at_completion() {
        let mut w = World::new(500);
        let d = start(1_000);
        assert_eq!(
            d.journal.as_ref().map(|j| (j.version, j.by.clone())),
            Some((1, Mover::Rider))
        );
        let t = w.commit(d);
        let d = w.decide(&t, TripCommand::Candidates(vec![candidate("drv_1")]), 1_100);
        assert_eq!(
            (d.journal.clone(), d.payment.clone()),
            (None, PaymentPlan::None)
        );
        let t = w.commit(d);
        let d = w.decide(&t, accept("drv_1"), 1_200);
        assert_eq!(
            d.payment.request(),
            Some(("authorize", "trp_1:authorize".into(), 1_500))
        );
        assert_eq!(
            d.journal.as_ref().map(|j| (j.to, j.version)),
            Some((TripState::DriverAssigned, 2))
        );
        // A decline of the hold cancels the trip instead; an outage changes nothing.
        assert!(matches!(
            d.payment.after(&ProviderAnswer::Declined("card".into())),
            AfterPayment::Instead(TripCommand::Cancel {
                by: CancelledBy::System,
                ..
            })
        ));
        assert_eq!(
            d.payment.after(&ProviderAnswer::Unavailable("down".into())),
            AfterPayment::Retry
        );
        let mut t = w.commit(d);
        let drv = DriverId::new("drv_1");
        for cmd in [
            TripCommand::Arrived {
                driver_id: drv.clone(),
            },
            TripCommand::Start {
                driver_id: drv.clone(),
            },
        ] {
            let d = w.decide(&t, cmd, 1_300);
            assert_eq!(d.payment, PaymentPlan::None);
            t = w.commit(d);
        }
        let d = w.decide(&t, TripCommand::Complete { driver_id: drv }, 1_400);
        assert_eq!(
            d.payment.request(),
            Some(("capture", "trp_1:capture".into(), 1_500))
        );
        assert!(d.finished());
    }

    #[test]
    fn a_late_rider_cancel_charges_the_fee_and_an_early_one_releases() {
        let mut w = World::new(500);
        let t = w.assigned();
        let early = w.decide(&t, cancel(CancelledBy::Rider), 1_000);
        assert!(matches!(early.payment, PaymentPlan::Release { .. }));
        // Released whatever the provider says.
        assert_eq!(
            early
                .payment
                .after(&ProviderAnswer::Unavailable("x".into())),
            AfterPayment::Commit
        );
        let late = w.decide(&t, cancel(CancelledBy::Rider), w.terms.cancel_grace_ms + 1);
        assert_eq!(
            late.payment.request(),
            Some(("capture", "trp_1:cancel_fee".into(), 500))
        );
        assert_eq!(late.trip.fare_cents(), Some(500));
        assert_eq!(t.fare_cents(), None, "deciding changes nothing");
    }

    #[test]
    fn commands_for_an_ended_trip_are_refused_by_one_rule() {
        let mut w = World::new(0);
        let t = w.offered();
        assert!(matches!(
            refuse_without_trip(Some(&t), &Sender::Admin, None, &accept("drv_1")),
            TripError::Unavailable(_)
        ));
        // Another rider's live trip is theirs whatever its actor is doing.
        let (mine, theirs) = (RiderId::new("rdr_1"), RiderId::new("rdr_2"));
        let by_rider = cancel(CancelledBy::Rider);
        assert!(matches!(
            refuse_without_trip(Some(&t), &Sender::Rider, Some(&theirs), &by_rider),
            TripError::Forbidden(_)
        ));
        let ended = w.decide(&t, cancel(CancelledBy::Admin), 0).trip;
        let offered = Sender::Driver(DriverId::new("drv_1"));
        let stranger = Sender::Driver(DriverId::new("drv_9"));
        assert!(matches!(
            refuse_without_trip(Some(&ended), &offered, None, &accept("drv_1")),
            TripError::Conflict(_)
        ));
        assert!(matches!(
            refuse_without_trip(Some(&ended), &stranger, None, &accept("drv_9")),
            TripError::Forbidden(_)
        ));
        assert!(matches!(
            refuse_without_trip(Some(&ended), &Sender::Rider, Some(&mine), &by_rider),
            TripError::Conflict(_)
        ));
        assert!(matches!(
            refuse_without_trip(Some(&ended), &Sender::Rider, Some(&theirs), &by_rider),
            TripError::Forbidden(_)
        ));
        assert_eq!(
            refuse_without_trip(None, &Sender::Admin, None, &by_rider),
            TripError::NotFound("trip")
        );
    }
}
