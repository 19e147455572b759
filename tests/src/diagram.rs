//! The trip state machine as a client may check it, over the wire types: which moves are
//! legal, what each command moves a trip to, and the happy path. One copy, for every test
//! that checks what clients were told against it.

use dispatch_transport::wire::TripState::{self, *};

/// The happy path: each command, and the state it moves the trip to.
pub const HAPPY_PATH: [(&str, TripState); 4] = [
    ("accept", DriverAssigned),
    ("arrived", DriverArrived),
    ("start_trip", InProgress),
    ("complete_trip", Completed),
];

/// Whether one transition may take a trip from `from` to `to`.
pub fn can_move(from: TripState, to: TripState) -> bool {
    matches!(
        (from, to),
        (Dispatching, DriverAssigned | NoDriverFound | Cancelled)
            | (DriverAssigned, DriverArrived | Dispatching | Cancelled)
            | (DriverArrived, InProgress | Dispatching | Cancelled)
            // An admin may cancel any non-final trip.
            | (InProgress, Completed | Cancelled)
    )
}

/// Every state: dispatching, the happy path's, and the two other ends.
pub fn states() -> impl Iterator<Item = TripState> {
    std::iter::once(Dispatching)
        .chain(HAPPY_PATH.map(|(_, s)| s))
        .chain([Cancelled, NoDriverFound])
}

/// Whether any number of transitions (none included) take a trip from `from` to `to`.
pub fn reachable(from: TripState, to: TripState) -> bool {
    let mut seen = vec![from];
    let mut todo = vec![from];
    while let Some(s) = todo.pop() {
        for n in states() {
            if can_move(s, n) && !seen.contains(&n) {
                seen.push(n);
                todo.push(n);
            }
        }
    }
    seen.contains(&to)
}

/// A state with a driver on the trip.
pub fn has_driver(s: TripState) -> bool {
    matches!(s, DriverAssigned | DriverArrived | InProgress)
}

/// The state an acknowledged command moved its trip to (a driver's `cancel_trip` sends it
/// back to dispatching); `None` for a command that moves no trip.
pub fn state_after(cmd: &str) -> Option<TripState> {
    Some(match cmd {
        "accept" => DriverAssigned,
        "arrived" => DriverArrived,
        "start_trip" => InProgress,
        "complete_trip" => Completed,
        "cancel_trip" => Dispatching,
        "cancel_ride" => Cancelled,
        _ => return None,
    })
}

/// The driver's commands along the happy path from `from` to `to` (none if `to` is not
/// ahead of `from` on it).
pub fn happy_steps(from: TripState, to: TripState) -> Vec<&'static str> {
    let at = |s| {
        (s == Dispatching)
            .then_some(0)
            .or_else(|| HAPPY_PATH.iter().position(|(_, x)| *x == s).map(|i| i + 1))
    };
    match (at(from), at(to)) {
        (Some(a), Some(b)) if a < b => HAPPY_PATH[a..b].iter().map(|(c, _)| *c).collect(),
        _ => Vec::new(),
    }
}

/// The wire name of a state (`driver_assigned`).
pub fn name(s: TripState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .expect("a state serializes as a string")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_happy_path_is_legal_and_its_steps_add_up() {
        let mut at = Dispatching;
        for (cmd, to) in HAPPY_PATH {
            assert!(can_move(at, to));
            assert_eq!(state_after(cmd), Some(to));
            at = to;
        }
        assert_eq!(
            happy_steps(Dispatching, Completed),
            ["accept", "arrived", "start_trip", "complete_trip"]
        );
        assert_eq!(happy_steps(DriverArrived, InProgress), ["start_trip"]);
        assert!(happy_steps(InProgress, DriverArrived).is_empty());
        assert!(reachable(DriverArrived, Dispatching));
        assert!(!reachable(Completed, Cancelled));
        assert_eq!(name(NoDriverFound), "no_driver_found");
        assert_eq!(states().count(), 7);
    }
}
