//! A session on a node of a cluster that may not serve yet (issue 16): a standby still
//! joining, or one whose view of the leader is not there yet, answers the upgrade 503.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{Client, Dispatchd, SLOW, eventually_within};

/// A session on `d` at `path` (`/v1/ws/driver`) with `token`, retried (up to [`SLOW`])
/// while `d` answers 503 `unavailable`; any other refusal fails. The session and the 503s
/// seen.
pub async fn connect_when_served(d: &Dispatchd, path: &str, token: &str) -> (Client, u32) {
    let url = d.ws_url(path);
    let refused = AtomicU32::new(0);
    let c = eventually_within("a session on the node", SLOW, || {
        let (url, refused) = (url.clone(), &refused);
        async move {
            match Client::try_connect(&url, Some(token)).await {
                Ok(c) => Some(c),
                Err((503, v)) => {
                    assert_eq!(v["error"]["code"], "unavailable", "{v}");
                    refused.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    None
                }
                Err((st, v)) => panic!("a session on {path} refused {st}: {v}"),
            }
        }
    })
    .await;
    (c, refused.into_inner())
}
