//! Drivers move between cell actors as they cross H3 borders, and searches find them
//! in their new cell only.

use dispatch_actors::System;
use dispatch_actors::messages::CellMsg;
use dispatch_actors::messages::{DriverCommand, DriverMsg};
use dispatch_actors::session::Outbound;
use dispatch_engine::{CellId, Point};

mod common;

use common::{App, ask, register_driver, start};

async fn count(sys: &System, cell: CellId) -> usize {
    match sys.cell_ref(&cell) {
        Some(a) => ask(&a, CellMsg::Count).await.1,
        None => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_crossing_a_border_moves_to_the_next_cell_actor() {
    let dir = tempfile::tempdir().unwrap();
    let (sys, _store) = start(dir.path()).await;
    let id = register_driver(&sys, "D", rand::random()).await;
    let a = sys.driver_ref(&id).unwrap();
    let mut app = App::new(&sys);
    app.attach_driver(&a).await;

    let here = Point::new(45.50, -73.57).unwrap();
    let grid = sys.config().grid;
    let from = grid.cell_of(here);
    // Walk north until the cell changes.
    let mut there = here;
    while grid.cell_of(there) == from {
        there = Point::new(there.lat() + 0.001, there.lng()).unwrap();
    }
    let to = grid.cell_of(there);

    app.drive(
        &a,
        DriverCommand::Location {
            position: here,
            heading: None,
        },
    );
    app.drive(&a, DriverCommand::GoOnline);
    let last = app.drive(
        &a,
        DriverCommand::Location {
            position: there,
            heading: Some(0.0),
        },
    );
    // Every reply up to the last one is an ack.
    let m = app
        .next_where("the last ack", |m| {
            matches!(m, Outbound::Ack { req } if *req == last)
                || matches!(m, Outbound::Error { .. })
        })
        .await;
    assert!(!matches!(m, Outbound::Error { .. }), "{m:?}");
    // The removal from the old cell and the insert into the new one are casts the driver
    // made before acking; each cell handles them in order before this query.
    assert_eq!(count(&sys, from).await, 0, "still indexed in the old cell");
    assert_eq!(count(&sys, to).await, 1, "not indexed in the new cell");
    let rec = ask(&a, DriverMsg::Get).await;
    assert_eq!(rec.cell, Some(to));

    let near = sys.nearby(there, 1_000.0, 10, None).await;
    assert_eq!(near.len(), 1);
    assert_eq!(near[0].position, there);
    // Offline drivers leave the index entirely.
    let off = app.drive(&a, DriverCommand::GoOffline);
    app.next_where(
        "the offline ack",
        |m| matches!(m, Outbound::Ack { req } if *req == off),
    )
    .await;
    assert_eq!(count(&sys, to).await, 0);
    assert!(sys.nearby(there, 1_000.0, 10, None).await.is_empty());
    sys.shutdown().await;
}
