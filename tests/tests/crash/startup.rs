//! Start-up refusals: a damaged record (corrupted, or of a future version) stops
//! start-up and is left as it was; a second server on a locked data directory is refused.

use std::collections::BTreeMap;
use std::path::Path;

use dispatch_tests::{Dispatchd, SLOW, assert_clean_log};

use crate::{CENTER, from_center};

/// Every (tree, key) → value in a sled directory (the binary must be stopped).
fn dump(dir: &Path) -> BTreeMap<(Vec<u8>, Vec<u8>), Vec<u8>> {
    let db = sled::open(dir).expect("open the data directory with sled");
    let mut out = BTreeMap::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name).expect("open tree");
        for kv in tree.iter() {
            let (k, v) = kv.expect("read");
            out.insert((name.to_vec(), k.to_vec()), v.to_vec());
        }
    }
    out
}

async fn damaged_record_stops_startup(case: &str, damage: fn(&mut Vec<u8>), cause: &str) {
    let tag = format!("[{case}]");
    let server = Dispatchd::builder(case).sled_only().start().await;
    let (_, _) = server.driver("Intact", "economy").await;
    let (victim, _) = server.driver("Damaged", "economy").await;
    let (_, _) = server.rider("Someone").await;
    let (again, data) = (server.again(), server.data_dir().to_owned());
    server.stop().await;

    let key = victim.as_bytes().to_vec();
    let damaged = {
        let db = sled::open(&data).expect("open the data directory with sled");
        let drivers = db.open_tree("drivers").expect("drivers tree");
        let mut bytes = drivers
            .get(&key)
            .expect("read")
            .unwrap_or_else(|| panic!("{tag} no drivers/{victim} on disk"))
            .to_vec();
        damage(&mut bytes);
        drivers.insert(&key, bytes.clone()).expect("write");
        db.flush().expect("flush");
        bytes
    };
    let before = dump(&data);

    // `again` keeps the work directory (and the data in it) after the child is gone.
    let mut server = again.clone().spawn();
    let status = server.exits_unready().await;
    let log = server.log_text();
    assert!(
        !status.success() && status.code().is_some(),
        "{tag} dispatchd must exit non-zero, got {status}\n--- log ---\n{log}"
    );
    let named = format!("drivers/{victim}");
    let dir = data.display().to_string();
    assert!(
        log.contains(&named) && log.contains(&dir) && log.contains(cause),
        "{tag} the error must name {named}, the data directory {dir} and the cause ({cause})\n--- log ---\n{log}"
    );
    assert_clean_log(&tag, &log);
    drop(server);

    let after = dump(&data);
    assert_eq!(
        after
            .get(&(b"drivers".to_vec(), key.clone()))
            .map(Vec::as_slice),
        Some(damaged.as_slice()),
        "{tag} the damaged record was changed"
    );
    assert!(
        after == before,
        "{tag} the data directory changed after the refused start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_record_stops_startup_and_is_left_untouched() {
    damaged_record_stops_startup(
        "corrupted record",
        |b| *b.last_mut().expect("a non-empty record") ^= 0x5a,
        "checksum",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_version_record_stops_startup_and_is_left_untouched() {
    damaged_record_stops_startup(
        "future-version record",
        |b| {
            b[0] = 0x00;
            b[1] = 0x63;
        },
        "version",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_locked_data_dir_is_refused() {
    let tag = "[locked data dir]";
    let first = Dispatchd::builder("locked").sled_only().start().await;
    let (_, token) = first.rider("First").await;

    let mut second = first.again().spawn();
    let status = second.exited_within(SLOW).await;
    let log = second.log_text();
    assert!(
        !status.success() && status.code().is_some(),
        "{tag} a second dispatchd on a locked data dir must exit non-zero, got {status}\n--- log ---\n{log}"
    );
    assert!(
        log.contains("locked"),
        "{tag} the second dispatchd must say the directory is locked\n--- log ---\n{log}"
    );
    assert_clean_log(tag, &log);

    // The first keeps serving, reads and writes.
    let (st, _) = first.get("/readyz", None).await;
    assert_eq!(st, 200, "{tag} the first server stopped being ready");
    first
        .quote(&token, CENTER, from_center(0.01, 0.0), "economy")
        .await;
    let (_, _) = first.rider("Second").await;
    let log = first.stop().await;
    assert_clean_log(tag, &log);
}
