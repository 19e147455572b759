//! Admin list cursors are tamper-evident (docs/api.md, "Lists"): a cursor the server did
//! not make for this list is 400 `bad_request`, even one that decodes to a well-formed
//! position (another real id, another list, cut short), and an untouched cursor pages on
//! correctly, across a restart too.

use dispatch_tests::TestServer;
use serde_json::Value;

/// The admin token of the servers here.
const ADMIN: &str = "adm-cursors-0123456789abcdef0123";

const PICKUP: (f64, f64) = (45.5030, -73.5690);
const DROPOFF: (f64, f64) = (45.5200, -73.5800);
/// About 15 km north of `PICKUP`: another cell.
const FAR: (f64, f64) = (45.6300, -73.5690);

const REFUSAL: &str = "`cursor` is not a cursor this list gave out";

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding, as the server writes cursors.
fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn b64_decode(s: &str) -> Vec<u8> {
    let sextets: Vec<u32> = s
        .bytes()
        .map(|c| {
            B64.iter()
                .position(|b| *b == c)
                .expect("a base64url cursor") as u32
        })
        .collect();
    let mut out = Vec::new();
    for chunk in sextets.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, v)| n | v << (18 - 6 * i));
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| {
            panic!(
                "{:?} not in the decoded cursor {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(hay)
            )
        })
}

/// `cursor` decoded, the bytes from the first `from` on replaced by `with`, re-encoded:
/// a cursor that still decodes to a well-formed position.
fn altered(cursor: &str, from: &str, with: &str) -> String {
    let mut bytes = b64_decode(cursor);
    let at = find(&bytes, from.as_bytes());
    bytes.truncate(at);
    bytes.extend_from_slice(with.as_bytes());
    b64_encode(&bytes)
}

async fn aget(s: &TestServer, path: &str) -> Value {
    let (st, v) = s.get(path, Some(ADMIN)).await;
    assert_eq!(st, 200, "GET {path}: {v}");
    v
}

/// `path` with `cursor` must be 400 `bad_request` with the documented message.
async fn refused(s: &TestServer, path: &str, cursor: &str, why: &str) {
    let (st, v) = s.get(&format!("{path}&cursor={cursor}"), Some(ADMIN)).await;
    assert_eq!(
        (
            st,
            v["error"]["code"].as_str(),
            v["error"]["message"].as_str()
        ),
        (400, Some("bad_request"), Some(REFUSAL)),
        "{why}: GET {path}&cursor={cursor} answered {v}"
    );
}

/// The ids (`key`) of every item of `list`, following `next_cursor` from `cursor` one
/// item at a time.
async fn pages(s: &TestServer, list: &str, key: &str, mut cursor: Option<String>) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let path = match &cursor {
            None => format!("/admin/{list}?limit=1"),
            Some(c) => format!("/admin/{list}?limit=1&cursor={c}"),
        };
        let v = aget(s, &path).await;
        ids.extend(
            v[list]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i[key].as_str().unwrap().to_owned()),
        );
        match &v["next_cursor"] {
            Value::Null => return ids,
            Value::String(c) => cursor = Some(c.clone()),
            other => panic!("{path}: next_cursor is {other}"),
        }
    }
}

/// Every id of `list` in one page, in the list's order.
async fn all(s: &TestServer, list: &str, key: &str) -> Vec<String> {
    let v = aget(s, &format!("/admin/{list}?limit=1000")).await;
    assert!(v["next_cursor"].is_null(), "{v}");
    v[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[key].as_str().unwrap().to_owned())
        .collect()
}

async fn first_cursor(s: &TestServer, list: &str) -> String {
    let v = aget(s, &format!("/admin/{list}?limit=1")).await;
    v["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("{list}: no next_cursor: {v}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_cursor_is_refused_and_an_untouched_one_pages_on() {
    let s = TestServer::start(&["--admin-token", ADMIN]).await;
    // Drivers in two cells (so two cells are listed), and trips (which end
    // `no_driver_found` at once: they are economy, the drivers xl).
    let mut sessions = Vec::new();
    for (name, at) in [("Ann", PICKUP), ("Bob", FAR), ("Cy", PICKUP)] {
        sessions.push(s.online_driver(name, "xl", at.0, at.1).await.1);
    }
    for name in ["Riley", "Rose", "Ruth"] {
        let (_, _, mut r) = s.connected_rider(name).await;
        r.request_ride(PICKUP, DROPOFF, "economy").await;
    }
    let drivers = all(&s, "drivers", "driver_id").await;
    let trips = all(&s, "trips", "trip_id").await;
    let cells = all(&s, "cells", "cell").await;
    assert_eq!((drivers.len(), trips.len(), cells.len()), (3, 3, 2));

    // Untouched cursors page through each list exactly once, in order.
    assert_eq!(pages(&s, "drivers", "driver_id", None).await, drivers);
    assert_eq!(pages(&s, "trips", "trip_id", None).await, trips);
    assert_eq!(pages(&s, "cells", "cell", None).await, cells);

    let dc = first_cursor(&s, "drivers").await;
    let tc = first_cursor(&s, "trips").await;
    let cc = first_cursor(&s, "cells").await;

    // The position changed to another real, well-formed id of the same list: it would
    // page from the wrong place (skipping an item) if it were taken.
    let skip_driver = altered(&dc, "drv_", &drivers[1]);
    refused(
        &s,
        "/admin/drivers?limit=1",
        &skip_driver,
        "another driver id",
    )
    .await;
    let skip_trip = altered(&tc, "trp_", &trips[1]);
    refused(&s, "/admin/trips?limit=1", &skip_trip, "another trip id").await;
    let other_cell = u64::from_str_radix(&cells[1], 16).unwrap().to_string();
    let skip_cell = altered(&cc, "cells:", &format!("cells:{other_cell}"));
    refused(&s, "/admin/cells?limit=1", &skip_cell, "another cell").await;

    // A cursor of one list on another, as given out and rewritten to look like one of
    // the other list.
    refused(&s, "/admin/drivers?limit=1", &tc, "a trips cursor").await;
    refused(&s, "/admin/trips?limit=1", &dc, "a drivers cursor").await;
    refused(&s, "/admin/drivers?limit=1", &cc, "a cells cursor").await;
    let as_trips = altered(&dc, "drivers:", &format!("trips:{}", trips[0]));
    refused(
        &s,
        "/admin/trips?limit=1",
        &as_trips,
        "a drivers cursor made a trips one",
    )
    .await;

    // Cut short, anywhere.
    for keep in [1, 8, 22, dc.len() - 1] {
        refused(&s, "/admin/drivers?limit=1", &dc[..keep], "truncated").await;
    }

    // Refusals changed nothing: the untouched cursors still page on from where they were.
    assert_eq!(
        pages(&s, "drivers", "driver_id", Some(dc.clone())).await,
        drivers[1..]
    );
    assert_eq!(
        pages(&s, "trips", "trip_id", Some(tc.clone())).await,
        trips[1..]
    );
    assert_eq!(pages(&s, "cells", "cell", Some(cc)).await, cells[1..]);
    drop(sessions);

    // The key is the deployment's: a cursor survives a restart with the same admin token.
    let s = s.restart(&["--admin-token", ADMIN]).await;
    assert_eq!(
        pages(&s, "drivers", "driver_id", Some(dc.clone())).await,
        drivers[1..]
    );
    assert_eq!(pages(&s, "trips", "trip_id", Some(tc)).await, trips[1..]);
    refused(
        &s,
        "/admin/drivers?limit=1",
        &skip_driver,
        "another driver id, after the restart",
    )
    .await;
    s.stop().await.unwrap();
}

#[test]
fn the_tests_base64url_round_trips() {
    for n in 0..40u8 {
        let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
        assert_eq!(b64_decode(&b64_encode(&bytes)), bytes, "{n} bytes");
    }
    assert_eq!(b64_encode(b"drivers:"), "ZHJpdmVyczo");
}
