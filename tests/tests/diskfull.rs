//! A full disk under the real `dispatchd`: its `--data-dir` on a small tmpfs that the
//! test fills up mid-ride.
//!
//! While the disk is full every write answers `unavailable` and changes nothing that
//! anyone was told of; once space returns the server writes again by itself (sled keeps
//! its first I/O error for good, so the store reopens its database), the ride goes on to
//! `completed`, and after a `kill -9` everything acknowledged before, during and after
//! the fault is there.
//!
//! Mounting a tmpfs needs root (CAP_SYS_ADMIN). Without it the test says so and passes
//! vacuously, unless `DISPATCH_TEST_REQUIRE_TMPFS=1` (set by `.ci/run`) makes that a
//! failure. `persistence/tests/store.rs` covers the same reopening with an injected
//! fault, which needs no privileges.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use dispatch_tests::{Dispatchd, assert_nothing_acknowledged_lost, eventually, ride_to};
use dispatch_transport::wire::TripState;
use serde_json::{Value, json};

const ADMIN: &str = "adm-diskfull-0123456789abcdef0123";

/// A tmpfs mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("a mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var("DISPATCH_TEST_REQUIRE_TMPFS").as_deref() != Ok("1"),
                    "cannot mount a tmpfs, and DISPATCH_TEST_REQUIRE_TMPFS=1: {why}"
                );
                eprintln!("SKIPPED: a tmpfs cannot be mounted here (needs root): {why}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the filesystem of `dir` with one file until a write fails for lack of space.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).expect("create the ballast file");
    let chunk = vec![0xA5u8; 64 * 1024];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    // Whatever the page cache still held is now out of room too.
    let _ = f.sync_all();
    path
}

fn rider_body(i: usize) -> Value {
    json!({"name": format!("Rider {i}"), "phone": format!("+1 555 01{i:04}")})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_unavailable_loses_nothing_and_recovers_when_space_returns() {
    let Some(fs) = Tmpfs::mount("24m") else {
        return;
    };
    let data = fs.path().join("data");
    // Offers outlive the fault, so the one the driver holds is still there after it.
    let flags = [
        "--admin-token",
        ADMIN,
        "--offer-timeout-ms",
        "120000",
        "--snapshot-interval-ms",
        "100",
    ];
    let s = Dispatchd::builder("diskfull")
        .sled_only()
        .data_dir(&data)
        .flags(&flags)
        .start()
        .await;
    let mut ride = ride_to(&s, TripState::Dispatching).await;
    let t = ride.trip.clone();

    // The disk fills up. Writes may still land in space sled's files already hold;
    // registrations go on until one is refused, and every one acknowledged is kept.
    let ballast = fill(fs.path());
    let mut acknowledged = Vec::new();
    let mut refused = None;
    for i in 1..=5_000 {
        let (st, v) = s.post("/v1/riders", None, rider_body(i)).await;
        match st {
            201 => acknowledged.push(v["rider_id"].as_str().unwrap().to_owned()),
            503 => {
                refused = Some(v);
                break;
            }
            _ => panic!("registration {i} on a full disk: {st} {v}"),
        }
    }
    let refused = refused.expect("a full disk refuses a write within 5,000 registrations");
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");

    // The driver's accept cannot be stored: `unavailable`, and the trip is as it was.
    ride.accept_is_refused_and_changes_nothing(&s).await;
    let (st, v) = s.post("/v1/riders", None, rider_body(9_999)).await;
    assert_eq!((st, &v["error"]["code"]), (503, &json!("unavailable")));

    // Space returns: writes resume without a restart.
    std::fs::remove_file(&ballast).expect("remove the ballast");
    let late = eventually("registrations succeed again once space returns", || {
        let s = &s;
        async move {
            let (st, v) = s.post("/v1/riders", None, rider_body(10_000)).await;
            (st == 201).then(|| v["rider_id"].as_str().unwrap().to_owned())
        }
    })
    .await;
    acknowledged.push(late);
    assert!(
        s.log_text().contains("store reopened; writes resume"),
        "{}",
        s.log_text()
    );

    // The ride goes on from where it stood: the offer is still the driver's.
    ride.advance(TripState::Completed).await;

    // kill -9, and start again on the same data: all of it is there.
    drop(ride);
    let s = s.crash_and_restart().await;
    assert_nothing_acknowledged_lost(&s, ADMIN, &t.trip_id, &acknowledged).await;
    drop(s);
}
