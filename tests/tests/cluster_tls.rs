//! TLS on the cluster links (issue 16, `--cluster-tls-*`) across real `dispatchd` processes
//! on loopback, with certificates the test makes with the `openssl` command (a CA, a
//! certificate per node, and a second CA): 3 nodes with TLS form membership (read from
//! `/metrics`, as tests/tests/membership.rs does); idle connections that never start a
//! handshake are capped and timed out without stopping the node accepting; a node whose
//! certificate comes from another CA and a node without TLS are refused, counted by reason
//! in `dispatch_cluster_tls_refusals_total`, and never listed; a bad certificate file, a
//! key of another certificate and a certificate the CA did not sign stop the start with
//! a message naming the flag.
//!
//! In cluster mode on one fresh PostgreSQL database, like membership.rs.

use std::path::Path;
use std::time::Duration;

use dispatch_tests::cluster::{all_list, cluster_node, cluster_setup, idle_flood, members, names};
use dispatch_tests::{Dispatchd, SLOW, WAIT, eventually_within, openssl};

const COOKIE: &str = "tls-test-cookie-0123456789abcdef";
/// Cluster ports of this test's own (the TLS helper's range 32000–32999).
const PORTS: [u16; 5] = [32101, 32102, 32103, 32104, 32105];
const HEARTBEAT_MS: u64 = 200;
const PEER_TIMEOUT_MS: u64 = 1_000;

/// A self-signed CA `<name>.pem` with its key `<name>.key`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=dispatchd test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir,
    );
}

/// `<name>.pem` and `<name>.key`, signed by the CA `<ca>`, for `localhost` and 127.0.0.1,
/// for both ends of a link.
fn make_cert(dir: &Path, name: &str, ca: &str) {
    std::fs::write(
        dir.join(format!("{name}.ext")),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n\
         extendedKeyUsage=serverAuth,clientAuth\n\
         basicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
        dir,
    );
}

fn tls_flags(dir: &Path, cert: &str, key: &str, ca: &str) -> Vec<String> {
    let path = |f: &str| dir.join(f).display().to_string();
    vec![
        "--cluster-tls-cert".into(),
        path(cert),
        "--cluster-tls-key".into(),
        path(key),
        "--cluster-tls-ca".into(),
        path(ca),
    ]
}

fn node(i: usize, cookie: &Path, db: &str, extra: &[String]) -> dispatch_tests::DispatchdBuilder {
    cluster_node(
        &format!("n{i}"),
        "leader",
        PORTS[i],
        &PORTS[..3],
        cookie,
        db,
        (HEARTBEAT_MS, PEER_TIMEOUT_MS),
        extra,
    )
}

async fn refusals(d: &Dispatchd, direction: &str, reason: &str) -> f64 {
    d.metric_value(&format!(
        "dispatch_cluster_tls_refusals_total{{direction=\"{direction}\",reason=\"{reason}\"}}"
    ))
    .await
}

/// Waits until `d` has counted more than `before` incoming refusals for `reason`.
async fn refused(d: &Dispatchd, reason: &str, before: f64, what: &str) -> f64 {
    eventually_within(what, SLOW, || async {
        let now = refusals(d, "incoming", reason).await;
        (now > before).then_some(now)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_tls_form_a_cluster_and_refuse_another_ca_and_plain_tcp() {
    let Some((db, dir, cookie)) = cluster_setup("cluster_tls", COOKIE) else {
        return;
    };
    let d = dir.path();
    make_ca(d, "ca");
    make_ca(d, "other-ca");
    for n in ["n0", "n1", "n2"] {
        make_cert(d, n, "ca");
    }
    make_cert(d, "rogue", "other-ca");
    // The rogue trusts both CAs (so it gets as far as presenting its own certificate);
    // the cluster trusts only its own.
    let both = format!(
        "{}{}",
        std::fs::read_to_string(d.join("ca.pem")).unwrap(),
        std::fs::read_to_string(d.join("other-ca.pem")).unwrap()
    );
    std::fs::write(d.join("both.pem"), both).unwrap();

    // Start-up refusals: each names its flag, and the node does not start.
    for (flags, want) in [
        (
            tls_flags(d, "n0.pem", "n1.key", "ca.pem"),
            "--cluster-tls-key does not belong to --cluster-tls-cert",
        ),
        (
            tls_flags(d, "rogue.pem", "rogue.key", "ca.pem"),
            "is not accepted under --cluster-tls-ca",
        ),
        (
            tls_flags(d, "cookie", "n0.key", "ca.pem"),
            "no PEM CERTIFICATE",
        ),
        (
            tls_flags(d, "n0.pem", "n0.pem", "ca.pem"),
            "--cluster-tls-key",
        ),
        (
            tls_flags(d, "n0.pem", "n0.key", "missing.pem"),
            "--cluster-tls-ca",
        ),
    ] {
        let mut bad = node(3, &cookie, &db, &flags).stderr_apart().spawn();
        let status = bad.exited_within(WAIT).await;
        assert_eq!(status.code(), Some(2), "{flags:?}: {status:?}");
        let err = bad.stderr_text();
        assert!(
            err.contains(want),
            "{flags:?}: stderr does not say {want:?}: {err}"
        );
    }

    let tls = |n: &str| tls_flags(d, &format!("{n}.pem"), &format!("{n}.key"), "ca.pem");
    let n0 = node(0, &cookie, &db, &tls("n0")).start().await;
    let n1 = node(1, &cookie, &db, &tls("n1")).spawn();
    let n2 = node(2, &cookie, &db, &tls("n2")).spawn();
    let cluster = [(&n0, "n0"), (&n1, "n1"), (&n2, "n2")];
    let t = all_list(
        &cluster,
        &["n0", "n1", "n2"],
        "3 nodes with TLS list each other",
    )
    .await;
    eprintln!("3 nodes with TLS formed a cluster in {} ms", t.as_millis());
    assert_eq!(n0.metric_value("dispatch_cluster_members").await, 3.0);
    for reason in ["not_tls", "certificate", "handshake"] {
        assert_eq!(refusals(&n0, "incoming", reason).await, 0.0, "{reason}");
    }

    // Idle connections that never start a handshake: at most 32 wait, each at most the
    // peer timeout; the node keeps accepting (the refusals below are counted after them).
    let timeouts_before = refusals(&n0, "incoming", "timeout").await;
    let idle = idle_flood(&n0, PORTS[0], 40).await;

    // A node with a certificate from another CA (and the right cookie): refused in the
    // handshake by every node it dials.
    let before = refusals(&n0, "incoming", "certificate").await;
    let rogue_flags = tls_flags(d, "rogue.pem", "rogue.key", "both.pem");
    let rogue = node(3, &cookie, &db, &rogue_flags).spawn();
    let n = refused(
        &n0,
        "certificate",
        before,
        "the other CA's certificate refused",
    )
    .await;
    eprintln!("a certificate of another CA: n0 counted {n} refusals");
    // A node without TLS (the right cookie): not TLS.
    let before = refusals(&n0, "incoming", "not_tls").await;
    let plain = node(4, &cookie, &db, &[]).spawn();
    let n = refused(&n0, "not_tls", before, "a plain-TCP peer refused").await;
    eprintln!("a plain-TCP peer: n0 counted {n} refusals");
    let n = refused(&n0, "timeout", timeouts_before, "idle handshakes timed out").await;
    eprintln!("idle connections: n0 counted {n} handshake timeouts");
    drop(idle);

    // Several heartbeat timeouts more: neither is a member anywhere, and they count no peer.
    tokio::time::sleep(Duration::from_millis(3 * PEER_TIMEOUT_MS)).await;
    for (d, me) in cluster {
        assert_eq!(members(d, me).await, names(&["n0", "n1", "n2"]), "{me}");
    }
    assert_eq!(members(&rogue, "n3").await, names(&["n3"]));
    assert_eq!(members(&plain, "n4").await, names(&["n4"]));
    let mut n0 = n0;
    assert!(n0.running(), "the refused peers ended the node");
    drop((rogue, plain));
}
