//! Shared by the persistence crate's integration tests (`mod common;`).

use dispatch_engine::{DispatchConfig, Point, Product, QuoteTerms, RiderId, Trip, TripId};

/// Runs `f` with a client of the PostgreSQL database `url`, on a thread and runtime of
/// its own (so it works from sync and async tests alike).
#[allow(dead_code)]
pub fn with_client<T: Send + 'static, Fut: std::future::Future<Output = T>>(
    url: &str,
    f: impl FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
) -> T {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            f(c).await
        })
    })
    .join()
    .unwrap()
}

/// A trip of `rdr_1` just requested (dispatching, nobody offered yet).
#[allow(dead_code)]
pub fn trip(id: &str) -> Trip {
    let quote = QuoteTerms {
        fare_cents: 1234,
        currency: "USD".into(),
        surge: 1.0,
        distance_m: 3000,
        duration_s: 400,
    };
    Trip::start(
        TripId::new(id),
        RiderId::new("rdr_1"),
        Product::Economy,
        Point::new(45.5, -73.6).unwrap(),
        Point::new(45.52, -73.6).unwrap(),
        quote,
        1_000,
        &DispatchConfig::default(),
    )
    .trip
}
