//! One fixture that brings a ride to any state of the happy path: a driver online near
//! the pickup, a connected rider, the trip requested and offered, and the driver's
//! commands up to the state asked for, each seen by both.

use dispatch_transport::wire::{Offer, Trip, TripState};
use serde_json::json;

use crate::diagram::{HAPPY_PATH, happy_steps};
use crate::{Client, Endpoint, TestServer, north_of};

/// Where the tests' rides start and end (Montréal).
pub const PICKUP: (f64, f64) = (45.5030, -73.5690);
pub const DROPOFF: (f64, f64) = (45.5200, -73.5800);

/// Who rides where; [`RidePlan::default`] is Dana, 200 m north of [`PICKUP`], driving
/// Riley from [`PICKUP`] to [`DROPOFF`] in an economy car.
#[derive(Clone, Debug)]
pub struct RidePlan {
    pub driver: &'static str,
    pub rider: &'static str,
    pub product: &'static str,
    pub driver_at: (f64, f64),
    pub pickup: (f64, f64),
    pub dropoff: (f64, f64),
}

impl Default for RidePlan {
    fn default() -> Self {
        RidePlan {
            driver: "Dana",
            rider: "Riley",
            product: "economy",
            driver_at: north_of(PICKUP, 200.0),
            pickup: PICKUP,
            dropoff: DROPOFF,
        }
    }
}

impl RidePlan {
    /// The driver this far north of the pickup.
    pub fn driver_north(mut self, m: f64) -> Self {
        self.driver_at = north_of(self.pickup, m);
        self
    }

    /// The driver, registered, connected (`welcome` read) and online at `driver_at`:
    /// (driver_id, token, session).
    pub async fn online_driver(&self, s: &Endpoint) -> (String, String, Client) {
        s.online_driver_token(
            self.driver,
            self.product,
            self.driver_at.0,
            self.driver_at.1,
        )
        .await
    }

    /// `s` with the driver online (as [`RidePlan::online_driver`]) and the rider connected
    /// (`welcome` read); nothing requested yet.
    pub async fn scene(&self, s: TestServer) -> Scene {
        let (did, dtoken, d) = self.online_driver(&s).await;
        let (rid, rtoken, r) = s.connected_rider(self.rider).await;
        Scene {
            s,
            did,
            dtoken,
            d,
            rid,
            rtoken,
            r,
        }
    }

    /// Registers both, connects both (welcomes read), puts the driver online, has the
    /// rider request the ride and the driver receive its offer, then drives it to `state`
    /// (see [`Ride::advance`]).
    pub async fn to(&self, s: &Endpoint, state: TripState) -> Ride {
        let driver = self.online_driver(s).await;
        let rider = s.connected_rider(self.rider).await;
        let mut ride = Ride::offered(self, driver, rider).await;
        ride.advance(state).await;
        ride
    }
}

/// [`RidePlan::default`] brought to `state`.
pub async fn ride_to(s: &Endpoint, state: TripState) -> Ride {
    RidePlan::default().to(s, state).await
}

/// A server, a driver online and a rider connected, before any ride: what
/// [`RidePlan::scene`] sets up.
pub struct Scene {
    pub s: TestServer,
    pub did: String,
    pub dtoken: String,
    /// The driver's session.
    pub d: Client,
    pub rid: String,
    pub rtoken: String,
    /// The rider's session.
    pub r: Client,
}

/// A driver and a rider, both connected, and their trip.
pub struct Ride {
    pub driver_id: String,
    pub driver_token: String,
    /// The driver's session.
    pub d: Client,
    pub rider_id: String,
    pub rider_token: String,
    /// The rider's session.
    pub r: Client,
    /// The trip as both last saw it.
    pub trip: Trip,
    /// The offer the driver was sent.
    pub offer: Offer,
}

impl Ride {
    /// The rider (connected) requests `plan`'s ride, and the driver (online, the only one
    /// free near its pickup) is offered it. Each side is (id, token, session).
    pub async fn offered(
        plan: &RidePlan,
        (driver_id, driver_token, mut d): (String, String, Client),
        (rider_id, rider_token, mut r): (String, String, Client),
    ) -> Ride {
        let trip = r
            .request_ride(plan.pickup, plan.dropoff, plan.product)
            .await;
        let offer = d.offer().await;
        assert_eq!(offer.trip_id, trip.trip_id, "the only driver's offer");
        Ride {
            driver_id,
            driver_token,
            d,
            rider_id,
            rider_token,
            r,
            trip,
            offer,
        }
    }

    pub fn trip_id(&self) -> &str {
        &self.trip.trip_id
    }

    /// While the store refuses writes (a `dispatching` trip): the driver's accept is
    /// answered `unavailable`, and the trip, read from memory, is as it was.
    pub async fn accept_is_refused_and_changes_nothing(&mut self, s: &Endpoint) {
        let path = format!("/v1/trips/{}", self.trip.trip_id);
        let before = s.get_ok(&path, &self.rider_token).await;
        let code = self
            .d
            .err(json!({"type": "accept", "trip_id": self.trip.trip_id}))
            .await;
        assert_eq!(code, "unavailable");
        let after = s.get_ok(&path, &self.rider_token).await;
        assert_eq!(
            (&after["state"], &after["version"]),
            (&before["state"], &before["version"]),
            "a refused write changed the trip: {after}"
        );
        assert_eq!(after["state"], "dispatching");
    }

    /// The driver's commands along the happy path up to `state`, each acknowledged, and
    /// each one's `trip_update` (the next version, in its state) read by the driver and
    /// the rider. A state not ahead on the happy path is a mistake in the test.
    pub async fn advance(&mut self, state: TripState) {
        let steps = happy_steps(self.trip.state, state);
        assert!(
            self.trip.state == state || !steps.is_empty(),
            "{:?} is not ahead of {:?} on the happy path",
            state,
            self.trip.state
        );
        for cmd in steps {
            self.step(cmd).await;
        }
    }

    /// One driver command of the happy path, acknowledged, and its update seen by both.
    pub async fn step(&mut self, cmd: &str) -> Trip {
        let (_, to) = HAPPY_PATH
            .iter()
            .find(|(c, _)| *c == cmd)
            .unwrap_or_else(|| panic!("{cmd} is not on the happy path"));
        let id = self.trip.trip_id.clone();
        self.d.ok(json!({"type": cmd, "trip_id": id})).await;
        let want = (id.as_str(), *to, self.trip.version + 1);
        for (who, c) in [("driver", &mut self.d), ("rider", &mut self.r)] {
            let t = c.trip_update().await;
            assert_eq!(
                (t.trip_id.as_str(), t.state, t.version),
                want,
                "the {who}'s update after {cmd}"
            );
            self.trip = t;
        }
        self.trip.clone()
    }
}
