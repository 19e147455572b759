//! The API's machine-readable documents against the real binary: `GET /admin/openapi.json`
//! serves exactly `docs/openapi.json` to the admin token, and only to it (401 without a
//! token, 403 for a rider's or a driver's); `dispatchd openapi` and `dispatchd asyncapi`
//! print the committed documents. (The unit tests in `transport/src/server/` compare the
//! committed files with what the code generates; `.ci/api.sh` fuzzes the live server
//! against the document with schemathesis.)

use std::path::PathBuf;

use dispatch_tests::{Dispatchd, built_dispatchd};
use serde_json::Value;

const ADMIN: &str = "adm-0123456789abcdef0123456789ab";

fn committed(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
async fn the_admin_listener_serves_the_committed_openapi_document_to_the_admin_token_only() {
    let d = Dispatchd::start("openapi-served", &["--admin-token", ADMIN]).await;
    let (st, doc) = d.get("/admin/openapi.json", Some(ADMIN)).await;
    assert_eq!(st, 200, "{doc}");
    let file: Value = serde_json::from_str(&committed("openapi.json")).unwrap();
    assert_eq!(doc, file, "the served document is docs/openapi.json");
    assert_eq!(doc["openapi"], "3.1.0");
    // Who may read it: like every admin route.
    let (st, v) = d.get("/admin/openapi.json", None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (_, rider) = d.rider("Ada").await;
    let (st, v) = d.get("/admin/openapi.json", Some(&rider)).await;
    assert_eq!((st, v["error"]["code"].as_str()), (403, Some("forbidden")));
    let (_, driver) = d.driver("Grace", "economy").await;
    let (st, v) = d.get("/admin/openapi.json", Some(&driver)).await;
    assert_eq!((st, v["error"]["code"].as_str()), (403, Some("forbidden")));
    d.stop_clean().await;
}

#[test]
fn the_binary_prints_the_committed_documents() {
    for (command, file) in [("openapi", "openapi.json"), ("asyncapi", "asyncapi.yaml")] {
        let out = std::process::Command::new(built_dispatchd())
            .arg(command)
            .output()
            .expect("run dispatchd");
        assert!(out.status.success(), "dispatchd {command}: {out:?}");
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            committed(file),
            "`dispatchd {command}` prints docs/{file}"
        );
    }
}
