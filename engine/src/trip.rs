//! The trip state machine of PROTOCOL.md, who may make each move, and the offer cascade.
//!
//! ```text
//! dispatching ──accept──▶ driver_assigned ──arrived──▶ driver_arrived ──start──▶ in_progress ──complete──▶ completed
//!      │  ▲                      │                           │
//!      │  └──── driver cancel ───┴───────────────────────────┘
//!      ├── no candidate left / dispatch deadline ──▶ no_driver_found
//!      └── rider, admin or system cancel ──▶ cancelled
//! ```
//!
//! [`Trip::start`] makes a trip and [`Trip::apply`] takes a command and `now_ms` and returns the effects the caller must
//! carry out (search, send an offer, arm a timer, persist and notify a transition), or a
//! [`TripError`] that changed nothing. Offers go to one driver at a time, best pickup ETA
//! first; a decline, a timeout or a refusal moves to the next candidate; when the list
//! runs out a new search excludes everyone already tried; an empty search or the
//! dispatch deadline ends the trip `no_driver_found`.

use std::collections::{BTreeSet, VecDeque};

use crate::eta::EtaModel;
use crate::fare::Product;
use crate::geo::Point;
use crate::ids::{DriverId, RiderId, TripId};
use crate::search::Candidate;
use crate::transition::{Decision, PaymentPlan, Transition};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum TripState {
    Dispatching,
    DriverAssigned,
    DriverArrived,
    InProgress,
    Completed,
    Cancelled,
    NoDriverFound,
}

impl TripState {
    pub const ALL: [TripState; 7] = [
        TripState::Dispatching,
        TripState::DriverAssigned,
        TripState::DriverArrived,
        TripState::InProgress,
        TripState::Completed,
        TripState::Cancelled,
        TripState::NoDriverFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TripState::Dispatching => "dispatching",
            TripState::DriverAssigned => "driver_assigned",
            TripState::DriverArrived => "driver_arrived",
            TripState::InProgress => "in_progress",
            TripState::Completed => "completed",
            TripState::Cancelled => "cancelled",
            TripState::NoDriverFound => "no_driver_found",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            TripState::Completed | TripState::Cancelled | TripState::NoDriverFound
        )
    }

    /// Whether PROTOCOL.md's trip diagram has an arrow `self → to`.
    pub fn can_move_to(self, to: TripState) -> bool {
        use TripState::*;
        matches!(
            (self, to),
            (Dispatching, DriverAssigned)
                | (DriverAssigned, DriverArrived)
                | (DriverArrived, InProgress)
                | (InProgress, Completed)
                | (DriverAssigned | DriverArrived, Dispatching)
                | (Dispatching, NoDriverFound)
                | (
                    Dispatching | DriverAssigned | DriverArrived | InProgress,
                    Cancelled
                )
        )
    }
}

/// Who ended a trip by cancelling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum CancelledBy {
    Rider,
    Driver,
    Admin,
    System,
}

impl CancelledBy {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelledBy::Rider => "rider",
            CancelledBy::Driver => "driver",
            CancelledBy::Admin => "admin",
            CancelledBy::System => "system",
        }
    }
}

/// Who made a transition happen (the trip's history records it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Mover {
    Rider,
    Driver(DriverId),
    Admin,
    System,
}

/// The timing rules of dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchConfig {
    /// How long one driver has to answer an offer.
    pub offer_timeout_ms: u64,
    /// How long a trip may stay in `dispatching` (from entering it) before `no_driver_found`.
    pub dispatch_deadline_ms: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            offer_timeout_ms: 15_000,
            dispatch_deadline_ms: 120_000,
        }
    }
}

/// The price the rider agreed to, fixed when the trip is requested.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct QuoteTerms {
    pub fare_cents: i64,
    pub currency: String,
    pub surge: f64,
    pub distance_m: u64,
    pub duration_s: u64,
}

/// One open offer to one driver.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Offer {
    pub driver_id: DriverId,
    /// Rises with every offer of this trip, so a stale timer is recognised.
    pub seq: u64,
    pub expires_at_ms: u64,
    pub pickup_distance_m: u64,
    pub pickup_eta_s: u64,
}

/// Why an offer stopped being open without an acceptance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferEnd {
    Declined,
    Expired,
    /// The trip was cancelled or hit its deadline while the offer was open.
    Withdrawn,
}

#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum TripCommand {
    /// The result of a [`TripEffect::Search`], nearest first.
    Candidates(Vec<Candidate>),
    /// The result of a search whose candidates' pickup ETAs (whole seconds) the caller
    /// already estimated with the trip's own ETA model (batched matching estimates them
    /// to solve its window): taken as [`TripCommand::Candidates`] would take them, without
    /// estimating them again. Excluded drivers and other products are still left out.
    Ranked(Vec<(Candidate, u64)>),
    /// Drivers who freed up near a trip that waits for one (batched matching hands such a
    /// trip a driver as it frees up), with their pickup ETAs: taken as
    /// [`TripCommand::Ranked`] would take them, and a driver that could not hold an
    /// earlier offer of this trip ([`TripCommand::OfferRefused`]: it never saw it) may be
    /// offered it again. If none of them can be offered, nothing changes (the trip goes
    /// on searching, rather than end as an empty search would end it).
    Freed(Vec<(Candidate, u64)>),
    /// The driver of offer `seq` could not hold it (no longer available).
    OfferRefused {
        seq: u64,
    },
    Accept {
        driver_id: DriverId,
    },
    Decline {
        driver_id: DriverId,
    },
    /// The timer of offer `seq` fired.
    OfferTimeout {
        seq: u64,
    },
    /// The timer armed by [`TripEffect::ArmDeadline`] fired.
    DeadlineReached,
    Arrived {
        driver_id: DriverId,
    },
    Start {
        driver_id: DriverId,
    },
    Complete {
        driver_id: DriverId,
    },
    DriverCancel {
        driver_id: DriverId,
        reason: Option<String>,
    },
    /// A rider, admin or system cancel. `by` must not be [`CancelledBy::Driver`].
    Cancel {
        by: CancelledBy,
        reason: Option<String>,
    },
}

impl TripCommand {
    /// The command's name (a metrics label, a log field).
    pub fn kind(&self) -> &'static str {
        match self {
            TripCommand::Candidates(_) => "candidates",
            TripCommand::Ranked(_) => "ranked",
            TripCommand::Freed(_) => "freed",
            TripCommand::OfferRefused { .. } => "offer_refused",
            TripCommand::Accept { .. } => "accept",
            TripCommand::Decline { .. } => "decline",
            TripCommand::OfferTimeout { .. } => "offer_timeout",
            TripCommand::DeadlineReached => "deadline_reached",
            TripCommand::Arrived { .. } => "arrived",
            TripCommand::Start { .. } => "start",
            TripCommand::Complete { .. } => "complete",
            TripCommand::DriverCancel { .. } => "driver_cancel",
            TripCommand::Cancel { .. } => "cancel",
        }
    }
}

/// What the caller must carry out, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum TripEffect {
    /// Find candidates near the pickup, leaving out these drivers.
    Search { exclude: Vec<DriverId> },
    /// Reserve the driver and show it the offer; answer with `OfferRefused` if it cannot
    /// hold it, and arm `OfferTimeout { seq }` for `expires_at_ms`.
    SendOffer(Offer),
    /// The driver's open offer ended; tell it (`offer_expired`) unless it declined itself.
    OfferEnded {
        driver_id: DriverId,
        seq: u64,
        why: OfferEnd,
    },
    /// Arm `DeadlineReached` for this time.
    ArmDeadline { at_ms: u64 },
    /// The trip moved to a new state (and `version`): persist, then notify rider and driver.
    Transitioned {
        from: TripState,
        to: TripState,
        by: Mover,
        at_ms: u64,
    },
    /// The driver accepted and is now on the trip.
    DriverAssigned { driver_id: DriverId },
    /// The driver is off the trip (completed, cancelled, taken off): free it and send it
    /// this last update.
    DriverReleased { driver_id: DriverId },
    /// The trip reached a final state: the rider may request again.
    Finished,
}

/// An error that changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TripError {
    /// The caller may not make this move on this trip at all.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The move is not allowed in the trip's current state.
    #[error("{0}")]
    Conflict(&'static str),
    /// There is no such trip.
    #[error("no such {0}")]
    NotFound(&'static str),
    /// The trip cannot take commands just now (it is being restarted): retry.
    #[error("{0}")]
    Unavailable(&'static str),
}

/// One trip: its public record and its dispatch bookkeeping.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Trip {
    pub id: TripId,
    pub rider_id: RiderId,
    pub product: Product,
    pub pickup: Point,
    pub dropoff: Point,
    pub quote: QuoteTerms,
    pub created_at_ms: u64,
    state: TripState,
    version: u64,
    driver_id: Option<DriverId>,
    pickup_eta_s: Option<u64>,
    fare_cents: Option<i64>,
    cancelled_by: Option<CancelledBy>,
    cancel_reason: Option<String>,
    updated_at_ms: u64,
    started_at_ms: Option<u64>,
    completed_at_ms: Option<u64>,
    // Dispatch bookkeeping.
    candidates: VecDeque<(Candidate, u64)>,
    /// Drivers already offered this trip in this or an earlier dispatch round, or taken off it.
    excluded: BTreeSet<DriverId>,
    /// Of `excluded`, the drivers that could not hold their offer (they never saw it):
    /// only [`TripCommand::Freed`] may offer them the trip again.
    #[cfg_attr(feature = "serde", serde(default))]
    refused: BTreeSet<DriverId>,
    offer: Option<Offer>,
    offer_seq: u64,
    deadline_ms: u64,
    searching: bool,
}

impl Trip {
    /// A new trip in `dispatching`, version 1, decided whole: its first journal record
    /// (the request, by the rider), the first search and the dispatch deadline.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        id: TripId,
        rider_id: RiderId,
        product: Product,
        pickup: Point,
        dropoff: Point,
        quote: QuoteTerms,
        now_ms: u64,
        cfg: &DispatchConfig,
    ) -> Decision {
        let deadline_ms = now_ms.saturating_add(cfg.dispatch_deadline_ms);
        let trip = Trip {
            id,
            rider_id,
            product,
            pickup,
            dropoff,
            quote,
            created_at_ms: now_ms,
            state: TripState::Dispatching,
            version: 1,
            driver_id: None,
            pickup_eta_s: None,
            fare_cents: None,
            cancelled_by: None,
            cancel_reason: None,
            updated_at_ms: now_ms,
            started_at_ms: None,
            completed_at_ms: None,
            candidates: VecDeque::new(),
            excluded: BTreeSet::new(),
            refused: BTreeSet::new(),
            offer: None,
            offer_seq: 0,
            deadline_ms,
            searching: true,
        };
        let journal = Some(Transition {
            from: TripState::Dispatching,
            to: TripState::Dispatching,
            by: Mover::Rider,
            at_ms: now_ms,
            version: trip.version,
        });
        Decision {
            trip,
            effects: vec![
                TripEffect::ArmDeadline { at_ms: deadline_ms },
                TripEffect::Search { exclude: vec![] },
            ],
            journal,
            payment: PaymentPlan::None,
        }
    }

    pub fn state(&self) -> TripState {
        self.state
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn driver_id(&self) -> Option<&DriverId> {
        self.driver_id.as_ref()
    }
    pub fn pickup_eta_s(&self) -> Option<u64> {
        self.pickup_eta_s
    }
    pub fn fare_cents(&self) -> Option<i64> {
        self.fare_cents
    }
    pub fn cancelled_by(&self) -> Option<CancelledBy> {
        self.cancelled_by
    }
    pub fn cancel_reason(&self) -> Option<&str> {
        self.cancel_reason.as_deref()
    }
    /// A rider's late cancel cost `fee` (the payment rules decided it): the trip shows it
    /// as its fare. Only for a trip the rider cancelled.
    pub fn charge_cancellation_fee(&mut self, fee: i64) -> Result<(), TripError> {
        if self.state != TripState::Cancelled || self.cancelled_by != Some(CancelledBy::Rider) {
            return Err(TripError::Conflict(
                "only a trip the rider cancelled carries a cancellation fee",
            ));
        }
        self.fare_cents = Some(fee);
        Ok(())
    }

    pub fn updated_at_ms(&self) -> u64 {
        self.updated_at_ms
    }
    pub fn started_at_ms(&self) -> Option<u64> {
        self.started_at_ms
    }
    pub fn completed_at_ms(&self) -> Option<u64> {
        self.completed_at_ms
    }
    pub fn offer(&self) -> Option<&Offer> {
        self.offer.as_ref()
    }
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }
    pub fn excluded(&self) -> impl Iterator<Item = &DriverId> {
        self.excluded.iter()
    }
    pub fn is_searching(&self) -> bool {
        self.searching
    }
    /// The drivers that could not hold an offer of this trip (they never saw it).
    pub fn refused(&self) -> impl Iterator<Item = &DriverId> {
        self.refused.iter()
    }
    /// Whether [`TripCommand::Freed`] would offer this candidate the trip: while it
    /// searches, one of its product that it has not tried or that could not hold its
    /// offer.
    pub fn may_offer_freed(&self, c: &Candidate) -> bool {
        self.would_offer(c)
            || (self.state == TripState::Dispatching
                && self.searching
                && c.driver.product == self.product
                && self.refused.contains(&c.driver.driver_id))
    }

    /// Applies one command at `now_ms`. On error nothing changed.
    pub fn apply(
        &mut self,
        cmd: TripCommand,
        now_ms: u64,
        cfg: &DispatchConfig,
        eta: &dyn EtaModel,
    ) -> Result<Vec<TripEffect>, TripError> {
        let mut fx = Vec::new();
        match cmd {
            TripCommand::Candidates(found) => {
                // Only candidates it would offer are estimated.
                let ranked = found
                    .into_iter()
                    .filter(|c| self.would_offer(c))
                    .map(|c| {
                        let e = eta.estimate(c.driver.position, self.pickup);
                        (c, e.duration_s.round() as u64)
                    })
                    .collect();
                self.take_candidates(ranked, now_ms, cfg, eta, &mut fx);
            }
            TripCommand::Ranked(ranked) => self.take_candidates(ranked, now_ms, cfg, eta, &mut fx),
            TripCommand::Freed(freed) => {
                let freed: Vec<(Candidate, u64)> = freed
                    .into_iter()
                    .filter(|(c, _)| self.may_offer_freed(c))
                    .collect();
                if !freed.is_empty() {
                    for (c, _) in &freed {
                        if self.refused.remove(&c.driver.driver_id) {
                            self.excluded.remove(&c.driver.driver_id);
                        }
                    }
                    self.take_candidates(freed, now_ms, cfg, eta, &mut fx);
                }
            }
            TripCommand::OfferRefused { seq } => {
                if self.state == TripState::Dispatching
                    && self.offer.as_ref().is_some_and(|o| o.seq == seq)
                    && let Some(o) = self.offer.take()
                {
                    self.refused.insert(o.driver_id);
                    self.advance(now_ms, cfg, eta, &mut fx);
                }
            }
            TripCommand::OfferTimeout { seq } => {
                if self.state == TripState::Dispatching
                    && self.offer.as_ref().is_some_and(|o| o.seq == seq)
                {
                    let o = self.offer.take().expect("checked above");
                    fx.push(TripEffect::OfferEnded {
                        driver_id: o.driver_id,
                        seq,
                        why: OfferEnd::Expired,
                    });
                    self.advance(now_ms, cfg, eta, &mut fx);
                }
            }
            TripCommand::Decline { driver_id } => {
                let seq = self.open_offer_for(&driver_id)?;
                self.offer = None;
                fx.push(TripEffect::OfferEnded {
                    driver_id,
                    seq,
                    why: OfferEnd::Declined,
                });
                self.advance(now_ms, cfg, eta, &mut fx);
            }
            TripCommand::Accept { driver_id } => {
                self.open_offer_for(&driver_id)?;
                if self
                    .offer
                    .as_ref()
                    .is_some_and(|o| now_ms >= o.expires_at_ms)
                {
                    // Its timer has not been handled yet, but the offer is over.
                    return Err(TripError::Conflict("the offer has expired"));
                }
                if now_ms >= self.deadline_ms {
                    // Likewise the trip's dispatch deadline: it is ending no_driver_found.
                    return Err(TripError::Conflict(
                        "the trip's dispatch deadline has passed",
                    ));
                }
                let offer = self.offer.take().expect("checked above");
                self.candidates.clear();
                self.driver_id = Some(driver_id.clone());
                self.pickup_eta_s = Some(offer.pickup_eta_s);
                self.transition(
                    TripState::DriverAssigned,
                    Mover::Driver(driver_id.clone()),
                    now_ms,
                    &mut fx,
                );
                fx.push(TripEffect::DriverAssigned { driver_id });
            }
            TripCommand::DeadlineReached => {
                if self.state == TripState::Dispatching && now_ms >= self.deadline_ms {
                    self.no_driver_found(now_ms, &mut fx);
                }
            }
            TripCommand::Arrived { driver_id } => {
                self.check_driver(
                    &driver_id,
                    TripState::DriverAssigned,
                    "the trip is not awaiting the driver's arrival",
                )?;
                self.pickup_eta_s = Some(0);
                self.transition(
                    TripState::DriverArrived,
                    Mover::Driver(driver_id),
                    now_ms,
                    &mut fx,
                );
            }
            TripCommand::Start { driver_id } => {
                self.check_driver(
                    &driver_id,
                    TripState::DriverArrived,
                    "the driver has not arrived at the pickup",
                )?;
                self.started_at_ms = Some(now_ms);
                self.pickup_eta_s = None;
                self.transition(
                    TripState::InProgress,
                    Mover::Driver(driver_id),
                    now_ms,
                    &mut fx,
                );
            }
            TripCommand::Complete { driver_id } => {
                self.check_driver(
                    &driver_id,
                    TripState::InProgress,
                    "the trip is not in progress",
                )?;
                self.completed_at_ms = Some(now_ms);
                self.fare_cents = Some(self.quote.fare_cents);
                self.transition(
                    TripState::Completed,
                    Mover::Driver(driver_id.clone()),
                    now_ms,
                    &mut fx,
                );
                fx.push(TripEffect::DriverReleased { driver_id });
                fx.push(TripEffect::Finished);
            }
            TripCommand::DriverCancel {
                driver_id,
                reason: _,
            } => {
                if self.driver_id.as_ref() != Some(&driver_id) {
                    return Err(TripError::Forbidden("the driver is not on this trip"));
                }
                if self.state.is_final() {
                    // The driver was on it, and someone else ended it first.
                    return Err(TripError::Conflict("the trip has already ended"));
                }
                if !matches!(
                    self.state,
                    TripState::DriverAssigned | TripState::DriverArrived
                ) {
                    return Err(TripError::Conflict(
                        "a driver can cancel only before pickup",
                    ));
                }
                self.driver_id = None;
                self.pickup_eta_s = None;
                self.excluded.insert(driver_id.clone());
                self.deadline_ms = now_ms.saturating_add(cfg.dispatch_deadline_ms);
                self.transition(
                    TripState::Dispatching,
                    Mover::Driver(driver_id.clone()),
                    now_ms,
                    &mut fx,
                );
                fx.push(TripEffect::DriverReleased { driver_id });
                fx.push(TripEffect::ArmDeadline {
                    at_ms: self.deadline_ms,
                });
                self.searching = true;
                fx.push(TripEffect::Search {
                    exclude: self.excluded.iter().cloned().collect(),
                });
            }
            TripCommand::Cancel { by, reason } => {
                let allowed = match by {
                    CancelledBy::Admin => !self.state.is_final(),
                    CancelledBy::Rider | CancelledBy::System => matches!(
                        self.state,
                        TripState::Dispatching
                            | TripState::DriverAssigned
                            | TripState::DriverArrived
                    ),
                    CancelledBy::Driver => {
                        return Err(TripError::Forbidden("drivers cancel with DriverCancel"));
                    }
                };
                if !allowed {
                    return Err(TripError::Conflict(if self.state.is_final() {
                        "the trip has already ended"
                    } else {
                        "the trip is in progress and can no longer be cancelled"
                    }));
                }
                if let Some(o) = self.offer.take() {
                    fx.push(TripEffect::OfferEnded {
                        driver_id: o.driver_id,
                        seq: o.seq,
                        why: OfferEnd::Withdrawn,
                    });
                }
                self.candidates.clear();
                self.searching = false;
                self.cancelled_by = Some(by);
                self.cancel_reason = reason;
                self.pickup_eta_s = None;
                let mover = match by {
                    CancelledBy::Rider => Mover::Rider,
                    CancelledBy::Admin => Mover::Admin,
                    _ => Mover::System,
                };
                self.transition(TripState::Cancelled, mover, now_ms, &mut fx);
                if let Some(d) = self.driver_id.clone() {
                    fx.push(TripEffect::DriverReleased { driver_id: d });
                }
                fx.push(TripEffect::Finished);
            }
        }
        debug_assert_eq!(self.check_invariants(), Ok(()));
        Ok(fx)
    }

    /// Gives the open offer a fresh timeout from `now_ms` (after a restart, the driver
    /// gets the whole window again). Returns the refreshed offer.
    pub fn refresh_offer(&mut self, now_ms: u64, cfg: &DispatchConfig) -> Option<&Offer> {
        let o = self.offer.as_mut()?;
        o.expires_at_ms = now_ms.saturating_add(cfg.offer_timeout_ms);
        Some(o)
    }

    /// The assigned driver moved: refresh the pickup ETA while it is heading there.
    /// Returns the new ETA, or `None` when the trip is not awaiting this driver.
    pub fn driver_moved(
        &mut self,
        driver_id: &DriverId,
        at: Point,
        eta: &dyn EtaModel,
    ) -> Option<u64> {
        if self.state != TripState::DriverAssigned || self.driver_id.as_ref() != Some(driver_id) {
            return None;
        }
        let s = eta.estimate(at, self.pickup).duration_s.round() as u64;
        self.pickup_eta_s = Some(s);
        Some(s)
    }

    /// The trip's own consistency rules; `apply` checks them in debug builds.
    pub fn check_invariants(&self) -> Result<(), String> {
        let s = self.state;
        if self.offer.is_some() && s != TripState::Dispatching {
            return Err(format!("{}: open offer in {}", self.id, s.as_str()));
        }
        if let Some(o) = &self.offer
            && self.driver_id.is_some()
        {
            return Err(format!(
                "{}: offer to {} while a driver is assigned",
                self.id, o.driver_id
            ));
        }
        let needs_driver = matches!(
            s,
            TripState::DriverAssigned
                | TripState::DriverArrived
                | TripState::InProgress
                | TripState::Completed
        );
        if needs_driver != self.driver_id.is_some() && s != TripState::Cancelled {
            return Err(format!(
                "{}: driver {:?} in {}",
                self.id,
                self.driver_id,
                s.as_str()
            ));
        }
        if (s == TripState::Cancelled) != self.cancelled_by.is_some() {
            return Err(format!(
                "{}: cancelled_by {:?} in {}",
                self.id,
                self.cancelled_by,
                s.as_str()
            ));
        }
        let fare_ok = match s {
            TripState::Completed => self.fare_cents.is_some(),
            // A rider's late cancel shows the cancellation fee it cost.
            TripState::Cancelled => {
                self.fare_cents.is_none() || self.cancelled_by == Some(CancelledBy::Rider)
            }
            _ => self.fare_cents.is_none(),
        };
        if !fare_ok {
            return Err(format!(
                "{}: fare {:?} in {}",
                self.id,
                self.fare_cents,
                s.as_str()
            ));
        }
        if s.is_final() && (!self.candidates.is_empty() || self.searching) {
            return Err(format!("{}: still dispatching in {}", self.id, s.as_str()));
        }
        if self.version == 0 {
            return Err(format!("{}: version 0", self.id));
        }
        Ok(())
    }

    fn open_offer_for(&self, driver_id: &DriverId) -> Result<u64, TripError> {
        match &self.offer {
            Some(o) if &o.driver_id == driver_id && self.state == TripState::Dispatching => {
                Ok(o.seq)
            }
            _ if self.excluded.contains(driver_id)
                || self.driver_id.as_ref() == Some(driver_id) =>
            {
                Err(TripError::Conflict(
                    "the offer has expired or gone to another driver",
                ))
            }
            _ => Err(TripError::Forbidden(
                "this trip was not offered to this driver",
            )),
        }
    }

    fn check_driver(
        &self,
        driver_id: &DriverId,
        want: TripState,
        msg: &'static str,
    ) -> Result<(), TripError> {
        if self.driver_id.as_ref() != Some(driver_id) {
            return Err(TripError::Forbidden("the driver is not on this trip"));
        }
        if self.state != want {
            return Err(TripError::Conflict(msg));
        }
        Ok(())
    }

    fn transition(&mut self, to: TripState, by: Mover, now_ms: u64, fx: &mut Vec<TripEffect>) {
        let from = self.state;
        assert!(
            from.can_move_to(to),
            "illegal transition {} -> {}",
            from.as_str(),
            to.as_str()
        );
        self.state = to;
        self.version += 1;
        self.updated_at_ms = now_ms;
        fx.push(TripEffect::Transitioned {
            from,
            to,
            by,
            at_ms: now_ms,
        });
    }

    /// A search's answer, each candidate with its pickup ETA: ranked, best first, and the
    /// first offered; with nobody new in it the trip ends.
    fn take_candidates(
        &mut self,
        found: Vec<(Candidate, u64)>,
        now_ms: u64,
        cfg: &DispatchConfig,
        eta: &dyn EtaModel,
        fx: &mut Vec<TripEffect>,
    ) {
        if self.state != TripState::Dispatching || !self.searching {
            return; // a late answer to a search that no longer matters
        }
        let mut ranked: Vec<(Candidate, u64)> = found
            .into_iter()
            .filter(|(c, _)| self.would_offer(c))
            .collect();
        self.searching = false;
        ranked.sort_by(|a, b| {
            a.1.cmp(&b.1)
                .then(a.0.distance_m.total_cmp(&b.0.distance_m))
        });
        ranked.dedup_by(|a, b| a.0.driver.driver_id == b.0.driver.driver_id);
        if ranked.is_empty() {
            // Nobody new is within reach: searching again would find the same
            // nobody, so the trip ends now.
            self.no_driver_found(now_ms, fx);
        } else {
            self.candidates = ranked.into();
            self.advance(now_ms, cfg, eta, fx);
        }
    }

    /// Whether a search's candidate may be offered this trip: while it searches, one of
    /// its product that it has not tried.
    fn would_offer(&self, c: &Candidate) -> bool {
        self.state == TripState::Dispatching
            && self.searching
            && !self.excluded.contains(&c.driver.driver_id)
            && c.driver.product == self.product
    }

    fn no_driver_found(&mut self, now_ms: u64, fx: &mut Vec<TripEffect>) {
        if let Some(o) = self.offer.take() {
            fx.push(TripEffect::OfferEnded {
                driver_id: o.driver_id,
                seq: o.seq,
                why: OfferEnd::Withdrawn,
            });
        }
        self.candidates.clear();
        self.searching = false;
        self.transition(TripState::NoDriverFound, Mover::System, now_ms, fx);
        fx.push(TripEffect::Finished);
    }

    /// Offers the trip to the next candidate, searches again, or gives up.
    fn advance(
        &mut self,
        now_ms: u64,
        cfg: &DispatchConfig,
        _eta: &dyn EtaModel,
        fx: &mut Vec<TripEffect>,
    ) {
        if self.state != TripState::Dispatching || self.offer.is_some() || self.searching {
            return;
        }
        if now_ms >= self.deadline_ms {
            self.no_driver_found(now_ms, fx);
            return;
        }
        while let Some((c, eta_s)) = self.candidates.pop_front() {
            if !self.excluded.insert(c.driver.driver_id.clone()) {
                continue;
            }
            self.offer_seq += 1;
            let offer = Offer {
                driver_id: c.driver.driver_id,
                seq: self.offer_seq,
                expires_at_ms: now_ms.saturating_add(cfg.offer_timeout_ms),
                pickup_distance_m: c.distance_m.round() as u64,
                pickup_eta_s: eta_s,
            };
            self.offer = Some(offer.clone());
            fx.push(TripEffect::SendOffer(offer));
            return;
        }
        // Everyone on the list was tried: look again, leaving them out. An empty answer
        // to that search ends the trip (see `Candidates`).
        if fx.iter().any(|e| matches!(e, TripEffect::Search { .. })) {
            return;
        }
        self.searching = true;
        fx.push(TripEffect::Search {
            exclude: self.excluded.iter().cloned().collect(),
        });
    }
}
