//! A rider's rule: at most one active trip at a time.

use crate::ids::TripId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RiderError {
    #[error("the rider already has an active trip {0}")]
    ActiveTrip(TripId),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RiderState {
    active: Option<TripId>,
}

impl RiderState {
    pub fn new(active: Option<TripId>) -> Self {
        Self { active }
    }

    pub fn active_trip(&self) -> Option<&TripId> {
        self.active.as_ref()
    }

    /// Claims the rider for a new trip; refused while another is active.
    pub fn begin(&mut self, trip: TripId) -> Result<(), RiderError> {
        match &self.active {
            Some(t) => Err(RiderError::ActiveTrip(t.clone())),
            None => {
                self.active = Some(trip);
                Ok(())
            }
        }
    }

    /// The trip reached a final state. Ending a trip that is not the active one is a no-op.
    pub fn end(&mut self, trip: &TripId) {
        if self.active.as_ref() == Some(trip) {
            self.active = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_active_trip_at_a_time() {
        let mut r = RiderState::default();
        r.begin(TripId::new("trp_1")).unwrap();
        assert_eq!(
            r.begin(TripId::new("trp_2")),
            Err(RiderError::ActiveTrip(TripId::new("trp_1")))
        );
        r.end(&TripId::new("trp_2"));
        assert!(r.active_trip().is_some());
        r.end(&TripId::new("trp_1"));
        r.begin(TripId::new("trp_2")).unwrap();
    }
}
