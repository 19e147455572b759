//! Drivers move between cell actors as they cross H3 borders, and searches find them
//! in their new cell only.

use std::sync::Arc;
use std::time::Duration;

use dispatch_actors::messages::CellMsg;
use dispatch_actors::messages::{DriverCommand, DriverMsg};
use dispatch_actors::session::{Outbound, Responder};
use dispatch_actors::views::{DriverProfile, Vehicle};
use dispatch_actors::{Metrics, System, SystemConfig};
use dispatch_engine::{CellId, Point, Product};

const WAIT: Duration = Duration::from_secs(10);

async fn count(sys: &System, cell: CellId) -> usize {
    match sys.cell_ref(&cell) {
        Some(a) => a.call(CellMsg::Count, Some(WAIT)).await.unwrap().unwrap().1,
        None => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_crossing_a_border_moves_to_the_next_cell_actor() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(dispatch_persistence::Store::open(dir.path(), |_| {}).unwrap());
    let sys = System::start(SystemConfig::default(), Arc::new(Metrics::new()), store)
        .await
        .unwrap();
    let vehicle = Vehicle {
        make: "Kia".into(),
        model: "Niro".into(),
        plate: "X1".into(),
        color: "red".into(),
        product: Product::Economy,
        seats: 4,
    };
    let id = sys
        .register_driver(
            DriverProfile {
                name: "D".into(),
                vehicle,
            },
            rand::random(),
        )
        .await
        .unwrap();
    let a = sys.driver_ref(&id).unwrap();
    let (handle, inbox) = sys.new_session();
    let (mut rx, _) = inbox.into_parts();
    let h = handle.clone();
    a.call(|r| DriverMsg::Attach(h, r), Some(WAIT))
        .await
        .unwrap();

    let here = Point::new(45.50, -73.57).unwrap();
    let grid = sys.config().grid;
    let from = grid.cell_of(here);
    // Walk north until the cell changes.
    let mut there = here;
    while grid.cell_of(there) == from {
        there = Point::new(there.lat() + 0.001, there.lng()).unwrap();
    }
    let to = grid.cell_of(there);

    let mut req = 0;
    let mut cmd = |c: DriverCommand| {
        req += 1;
        a.cast(DriverMsg::Command(
            c,
            Responder::new(Some(req), handle.clone()),
        ))
        .unwrap();
        req
    };
    cmd(DriverCommand::Location {
        position: here,
        heading: None,
    });
    cmd(DriverCommand::GoOnline);
    let last = cmd(DriverCommand::Location {
        position: there,
        heading: Some(0.0),
    });
    loop {
        let m = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if matches!(m, Outbound::Ack { req } if req == last) {
            break;
        }
        assert!(!matches!(m, Outbound::Error { .. }), "{m:?}");
    }
    // The removal from the old cell and the insert into the new one are casts the driver
    // made before acking; each cell handles them in order before this query.
    assert_eq!(count(&sys, from).await, 0, "still indexed in the old cell");
    assert_eq!(count(&sys, to).await, 1, "not indexed in the new cell");
    let rec = a.call(DriverMsg::Get, Some(WAIT)).await.unwrap().unwrap();
    assert_eq!(rec.cell, Some(to));

    let near = sys.nearby(there, 1_000.0, 10, None).await;
    assert_eq!(near.len(), 1);
    assert_eq!(near[0].position, there);
    // Offline drivers leave the index entirely.
    let off = cmd(DriverCommand::GoOffline);
    loop {
        let m = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if matches!(m, Outbound::Ack { req } if req == off) {
            break;
        }
    }
    assert_eq!(count(&sys, to).await, 0);
    assert!(sys.nearby(there, 1_000.0, 10, None).await.is_empty());
    sys.shutdown().await;
}
