//! A driver's status and the rules for changing it. The driver's own state is the lock
//! that keeps a driver in at most one trip and with at most one open offer.

use crate::ids::TripId;

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum DriverStatus {
    Offline,
    Available,
    /// Holding one open offer for this trip.
    Offered(TripId),
    /// Assigned to this trip, from `driver_assigned` until it ends or the driver is taken off.
    OnTrip(TripId),
    Suspended,
}

impl DriverStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            DriverStatus::Offline => "offline",
            DriverStatus::Available => "available",
            DriverStatus::Offered(_) => "offered",
            DriverStatus::OnTrip(_) => "on_trip",
            DriverStatus::Suspended => "suspended",
        }
    }

    /// Whether the driver is shown on the map and kept in a cell index.
    pub fn is_indexed(&self) -> bool {
        !matches!(self, DriverStatus::Offline | DriverStatus::Suspended)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    #[error("the driver is {0}")]
    Busy(&'static str),
    #[error("the driver is suspended")]
    Suspended,
    #[error("the driver has no open offer for this trip")]
    NoSuchOffer,
    #[error("the driver is not on this trip")]
    NotOnTrip,
}

/// A driver's dispatch state. Every change goes through a method here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverState {
    status: DriverStatus,
}

impl Default for DriverState {
    fn default() -> Self {
        Self {
            status: DriverStatus::Offline,
        }
    }
}

impl DriverState {
    pub fn new(status: DriverStatus) -> Self {
        Self { status }
    }

    pub fn status(&self) -> &DriverStatus {
        &self.status
    }

    /// The trip the driver is offered or on, if any.
    pub fn trip(&self) -> Option<&TripId> {
        match &self.status {
            DriverStatus::Offered(t) | DriverStatus::OnTrip(t) => Some(t),
            _ => None,
        }
    }

    /// `offline` → `available`. Idempotent for a driver already online.
    pub fn go_online(&mut self) -> Result<(), DriverError> {
        match self.status {
            DriverStatus::Offline => {
                self.status = DriverStatus::Available;
                Ok(())
            }
            DriverStatus::Suspended => Err(DriverError::Suspended),
            _ => Ok(()),
        }
    }

    /// `available` → `offline`; refused while offered or on a trip. Idempotent when offline.
    pub fn go_offline(&mut self) -> Result<(), DriverError> {
        match self.status {
            DriverStatus::Available | DriverStatus::Offline => {
                self.status = DriverStatus::Offline;
                Ok(())
            }
            DriverStatus::Suspended => Ok(()),
            ref s => Err(DriverError::Busy(s.as_str())),
        }
    }

    /// Reserves the driver for an offer: only an available driver can hold one.
    pub fn reserve_offer(&mut self, trip: &TripId) -> Result<(), DriverError> {
        match self.status {
            DriverStatus::Available => {
                self.status = DriverStatus::Offered(trip.clone());
                Ok(())
            }
            ref s => Err(DriverError::Busy(s.as_str())),
        }
    }

    /// The open offer for `trip` ended without an assignment (declined, expired, withdrawn).
    pub fn offer_ended(&mut self, trip: &TripId) -> Result<(), DriverError> {
        let offered = DriverStatus::Offered(trip.clone());
        self.step(&offered, DriverStatus::Available, DriverError::NoSuchOffer)
    }

    /// The offer for `trip` was accepted: the driver is now on it.
    pub fn assign(&mut self, trip: &TripId) -> Result<(), DriverError> {
        let offered = DriverStatus::Offered(trip.clone());
        self.step(
            &offered,
            DriverStatus::OnTrip(trip.clone()),
            DriverError::NoSuchOffer,
        )
    }

    /// The driver left `trip` (completed, cancelled, taken off): available again.
    pub fn release(&mut self, trip: &TripId) -> Result<(), DriverError> {
        let on_it = DriverStatus::OnTrip(trip.clone());
        self.step(&on_it, DriverStatus::Available, DriverError::NotOnTrip)
    }

    /// `from` → `to`; from any other status, `otherwise`.
    fn step(
        &mut self,
        from: &DriverStatus,
        to: DriverStatus,
        otherwise: DriverError,
    ) -> Result<(), DriverError> {
        if &self.status != from {
            return Err(otherwise);
        }
        self.status = to;
        Ok(())
    }

    /// An operator suspends the driver; allowed only when not offered or on a trip.
    pub fn suspend(&mut self) -> Result<(), DriverError> {
        match self.status {
            DriverStatus::Offline | DriverStatus::Available | DriverStatus::Suspended => {
                self.status = DriverStatus::Suspended;
                Ok(())
            }
            ref s => Err(DriverError::Busy(s.as_str())),
        }
    }

    pub fn unsuspend(&mut self) {
        if self.status == DriverStatus::Suspended {
            self.status = DriverStatus::Offline;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offered_driver_cannot_take_a_second_offer_or_go_offline() {
        let (t1, t2) = (TripId::new("trp_1"), TripId::new("trp_2"));
        let mut d = DriverState::default();
        assert_eq!(d.reserve_offer(&t1), Err(DriverError::Busy("offline")));
        d.go_online().unwrap();
        d.reserve_offer(&t1).unwrap();
        assert_eq!(d.reserve_offer(&t2), Err(DriverError::Busy("offered")));
        assert_eq!(d.go_offline(), Err(DriverError::Busy("offered")));
        assert_eq!(d.assign(&t2), Err(DriverError::NoSuchOffer));
        d.assign(&t1).unwrap();
        assert_eq!(d.go_offline(), Err(DriverError::Busy("on_trip")));
        d.release(&t1).unwrap();
        d.go_offline().unwrap();
        assert_eq!(d.status(), &DriverStatus::Offline);
    }

    #[test]
    fn suspended_drivers_cannot_go_online() {
        let mut d = DriverState::default();
        d.suspend().unwrap();
        assert_eq!(d.go_online(), Err(DriverError::Suspended));
        d.unsuspend();
        d.go_online().unwrap();
    }
}
