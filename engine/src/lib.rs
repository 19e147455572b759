//! `dispatch-engine`: the dispatch domain as plain data and pure functions.
//!
//! It owns ids, coordinates and H3 cells ([`geo`]), the per-cell index of drivers and
//! the ring-by-ring candidate search ([`index`], [`search`]), the batched min-cost
//! assignment of a window's requests to drivers ([`assign`]), the ETA and fare models
//! ([`eta`], [`fare`]), surge per H3 cell ([`surge`]), the payment rules of a
//! double-entry ledger ([`ledger`]), the driver and rider status rules ([`driver`],
//! [`rider`]), registration profiles and their rules ([`profile`]), the trip state machine
//! with its offer cascade ([`trip`]) and whole transitions ([`transition`]: the new trip,
//! its effects, its journal record and its payment plan, decided in one call).
//!
//! It must not depend on tokio, sockets, files, JSON or a clock: every function that
//! needs the time takes `now_ms` (Unix milliseconds) as an argument, and ids are handed
//! in by the caller, so every rule is deterministic, testable and replayable.

pub mod assign;
pub mod driver;
pub mod eta;
pub mod fare;
pub mod geo;
pub mod ids;
pub mod index;
pub mod ledger;
pub mod profile;
pub mod rider;
pub mod search;
pub mod shard;
pub mod surge;
pub mod transition;
pub mod trip;

pub use assign::{BatchOutcome, BatchParams, BatchStats, assign};
pub use driver::{DriverError, DriverState, DriverStatus};
pub use eta::{EtaEstimate, EtaModel, StraightLineEta};
pub use fare::{FareQuote, Product, RateCard, RateCardError, RateCards};
pub use geo::{CellId, GeoError, Grid, Point};
pub use ids::{DriverId, QuoteId, RiderId, TripId};
pub use index::{CellDrivers, DriverFilter, IndexedDriver, Wanted};
pub use ledger::{
    Account, Entry, EntryKey, Ledger, LedgerError, PaymentTerms, Posting, Step, TripMoney,
};
pub use profile::{DriverForm, DriverProfile, ProfileError, RiderProfile, TripDriver, Vehicle};
pub use rider::{RiderError, RiderState};
pub use search::{Candidate, RingSearch, SearchParams, SearchStats};
pub use surge::{SurgeBook, SurgeCell, SurgeConfig, SurgeError};
pub use transition::{
    AfterPayment, Decision, PaymentPlan, ProviderAnswer, Sender, Transition, TripRules,
    refuse_without_trip,
};
pub use trip::{
    CancelledBy, DispatchConfig, Mover, Offer, QuoteTerms, Trip, TripCommand, TripEffect,
    TripError, TripState,
};
