//! The real `dispatchd` binary as a child process: start-up, a request, SIGTERM, and a
//! bad flag.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use dispatch_tests::{Client, WAIT};
use serde_json::{Value, json};

/// The `dispatchd` binary, built first when under cargo.
fn binary() -> PathBuf {
    dispatch_tests::built_dispatchd()
}

/// A free port on 127.0.0.1 (bound, then released for the child to take).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}

/// Kills the child if the test fails before it exits, then removes its data directory.
struct Reaper(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Reaper {
    fn drop(&mut self) {
        dispatch_tests::reap(&mut self.0);
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "dispatchd did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `dispatchd` child on a free port, with its own data directory, ready:
/// (child, listen address).
async fn start_binary(flags: &[&str]) -> (Reaper, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let data = tempfile::tempdir().expect("a temporary data directory");
    let child = Command::new(binary())
        .args(["--listen", &listen, "--data-dir"])
        .arg(data.path())
        .args(flags)
        .env("DISPATCH_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dispatchd");
    let mut child = Reaper(child, data);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = http.get(format!("http://{listen}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "dispatchd exited before it was ready"
        );
        assert!(
            Instant::now() < deadline,
            "dispatchd not ready within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, listen)
}

/// Everything an exited child wrote: (stdout, stderr).
fn output(child: &mut Child) -> (String, String) {
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out).unwrap();
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut err).unwrap();
    }
    (out, err)
}

fn sigterm(child: &Child) {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_and_stops_cleanly_on_sigterm() {
    let (mut child, listen) = start_binary(&["--shutdown-timeout-ms", "3000"]).await;
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();

    // A ride-free request or two.
    let r = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{base}/v1/riders"))
        .json(&json!({"name": "Bin", "phone": "+1 555 0100"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let reg: Value = r.json().await.unwrap();
    let token = reg["token"].as_str().unwrap().to_owned();
    assert!(
        reg["rider_id"].as_str().unwrap().starts_with("rdr_"),
        "{reg}"
    );

    // An open session, then SIGTERM.
    let mut ws = Client::connect(&format!("ws://{listen}/v1/ws/rider"), Some(&token))
        .await
        .expect("rider connects");
    ws.welcome().await;
    sigterm(&child.0);
    assert_eq!(
        ws.closed_with().await,
        Some(1001),
        "an open session is closed with 1001 (going away)"
    );
    let status = wait_exit(&mut child.0, WAIT);
    assert_eq!(status.code(), Some(0), "exit status {status:?}");

    let (out, err) = output(&mut child.0);
    let log = format!("{out}{err}");
    let ready = log
        .lines()
        .find(|l| l.contains("dispatchd ready"))
        .unwrap_or_else(|| panic!("no `dispatchd ready` line in the log:\n{log}"));
    assert!(ready.contains(&listen), "{ready}");
    assert!(log.contains("dispatchd stopped"), "{log}");
    // Not a terminal: plain text, no colour codes in a log file.
    assert!(!log.contains('\x1b'), "ANSI escapes in a piped log:\n{log}");
}

/// `--log-format json`: every line is one JSON object; actor work carries the ids of its
/// span; `--slow-handler-ms` warnings name the actor group; the generated admin token
/// is logged by file name only, and no client token is ever logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_ids_and_name_slow_actor_groups_but_never_tokens() {
    let (mut child, listen) = start_binary(&[
        "--log-format",
        "json",
        "--slow-handler-ms",
        "0",
        "--shutdown-timeout-ms",
        "3000",
    ])
    .await;
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    let reg: Value = http
        .post(format!("{base}/v1/riders"))
        .json(&json!({"name": "Logs", "phone": "+1 555 0100"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = reg["token"].as_str().unwrap().to_owned();
    let mut ws = Client::connect(&format!("ws://{listen}/v1/ws/rider"), Some(&token))
        .await
        .expect("rider connects");
    ws.welcome().await;
    // No driver anywhere: the trip is created and ends `no_driver_found`.
    let reply = ws
        .request(json!({"type": "request_ride", "pickup": {"lat": -33.9, "lng": 18.4}, "dropoff": {"lat": -33.95, "lng": 18.45}, "product": "economy"}))
        .await;
    let dispatch_transport::wire::ServerMessage::TripUpdate { trip, .. } = reply else {
        panic!("request_ride reply: {reply:?}")
    };
    ws.trip_in(dispatch_transport::wire::TripState::NoDriverFound)
        .await;
    sigterm(&child.0);
    assert_eq!(wait_exit(&mut child.0, WAIT).code(), Some(0));

    let (out, err) = output(&mut child.0);
    let lines: Vec<Value> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 5, "{out}");
    let slow = |group: &str| {
        lines.iter().find(|l| {
            l["fields"]["message"] == "slow actor handler" && l["fields"]["group"] == group
        })
    };
    for group in ["rider", "session"] {
        let l =
            slow(group).unwrap_or_else(|| panic!("no slow-handler warning for {group}:\n{out}"));
        assert_eq!(l["level"], "WARN", "{l}");
        assert!(l["fields"]["kind"].is_string(), "{l}");
        // Logged inside the actor's (or session's) span, which names the rider.
        assert_eq!(l["span"]["rider_id"], reg["rider_id"], "{l}");
    }
    // The trip actor's lines sit in a span that names the trip and its rider.
    let in_trip = lines
        .iter()
        .find(|l| l["span"]["name"] == "trip" && l["span"]["trip_id"] == trip.trip_id.as_str())
        .unwrap_or_else(|| panic!("no line in the trip's span:\n{out}"));
    assert_eq!(in_trip["span"]["rider_id"], reg["rider_id"], "{in_trip}");
    assert!(
        lines
            .iter()
            .any(|l| l["span"]["name"] == "rider" && l["span"]["rider_id"] == reg["rider_id"]),
        "no line in the rider's span:\n{out}"
    );
    // The generated admin token: its file is named, the token is not.
    let token_file = child.1.path().join("admin.token");
    let admin_token = std::fs::read_to_string(&token_file).expect("admin.token written");
    assert!(
        out.contains(token_file.to_str().unwrap()),
        "the log does not say where the admin token is"
    );
    for secret in [admin_token.trim(), token.as_str()] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "a token was logged"
        );
    }
}

#[test]
fn an_invalid_flag_value_exits_non_zero_naming_the_flag() {
    let bin = binary();
    for (args, flag) in [
        (vec!["--h3-resolution", "99"], "--h3-resolution"),
        (vec!["--offer-timeout-ms", "0"], "--offer-timeout-ms"),
        (vec!["--offer-timeout-ms", "soon"], "--offer-timeout-ms"),
    ] {
        let data = tempfile::tempdir().expect("a temporary data directory");
        let child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dispatchd");
        // Bounded: a server that wrongly starts is killed, not waited on forever.
        let mut child = Reaper(child, data);
        let status = wait_exit(&mut child.0, WAIT);
        assert!(
            !status.success() && status.code().is_some(),
            "{args:?}: {status:?}"
        );
        let mut err = String::new();
        child
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(
            err.contains(flag),
            "{args:?}: stderr does not name {flag}: {err}"
        );
    }
}

/// A trip that finds no driver must not stop the server from serving everyone else, nor
/// keep it from exiting on SIGTERM within `--shutdown-timeout-ms`. (At commit b195d13
/// such a trip re-searched in a loop that never yielded, until its dispatch deadline: one
/// per core froze the server and delayed the exit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_stays_responsive_while_trips_find_no_driver() {
    // The deadline is well beyond WAIT, so only a responsive server passes.
    let (mut child, listen) = start_binary(&[
        "--dispatch-deadline-ms",
        "30000",
        "--shutdown-timeout-ms",
        "2000",
    ])
    .await;
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    // One ride request per core (the binary runs one runtime worker per core), in a
    // place no driver has ever been.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut riders = Vec::new();
    for i in 0..cores {
        let reg: Value = http
            .post(format!("{base}/v1/riders"))
            .json(&json!({"name": format!("R{i}"), "phone": "+1 555 0100"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut ws = Client::connect(&format!("ws://{listen}/v1/ws/rider"), reg["token"].as_str())
            .await
            .expect("rider connects");
        ws.welcome().await;
        ws.send(json!({"type": "request_ride", "req": 1, "pickup": {"lat": -33.9, "lng": 18.4}, "dropoff": {"lat": -33.95, "lng": 18.45}, "product": "economy"}))
            .await;
        riders.push(ws);
    }
    let asked = Instant::now();
    let health = tokio::time::timeout(WAIT, http.get(format!("{base}/healthz")).send()).await;
    assert!(
        matches!(&health, Ok(Ok(r)) if r.status() == 200),
        "/healthz unanswered {:?} after {cores} ride requests with no driver: {health:?}",
        asked.elapsed()
    );
    // Writes still go through too.
    let reg = tokio::time::timeout(
        WAIT,
        http.post(format!("{base}/v1/riders"))
            .json(&json!({"name": "Late", "phone": "+1 555 0100"}))
            .send(),
    )
    .await;
    assert!(
        matches!(&reg, Ok(Ok(r)) if r.status() == 201),
        "registration unanswered: {reg:?}"
    );
    sigterm(&child.0);
    let status = wait_exit(&mut child.0, WAIT);
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

/// `--admin-listen`: `/admin/` and `/metrics` move to their own address (for the cluster
/// network only); the client address no longer serves them, and still serves clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listen_serves_admin_and_metrics_apart_from_clients() {
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let (mut child, listen) = start_binary(&["--admin-listen", &admin_addr]).await;
    let token =
        std::fs::read_to_string(child.1.path().join("admin.token")).expect("admin.token written");
    let token = token.trim();
    let http = reqwest::Client::new();
    let get = |base: &str, path: &str| {
        let r = http.get(format!("http://{base}{path}")).bearer_auth(token);
        async move { r.send().await.unwrap().status().as_u16() }
    };
    // Clients: their routes, health, and no operator routes.
    assert_eq!(get(&listen, "/admin/stats").await, 404);
    assert_eq!(get(&listen, "/metrics").await, 404);
    assert_eq!(get(&listen, "/readyz").await, 200);
    let r = http
        .post(format!("http://{listen}/v1/riders"))
        .json(&json!({"name": "Apart", "phone": "+1 555 0100"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Operators: admin, metrics and health, and no client routes.
    assert_eq!(get(&admin_addr, "/admin/stats").await, 200);
    assert_eq!(get(&admin_addr, "/metrics").await, 200);
    assert_eq!(get(&admin_addr, "/healthz").await, 200);
    let r = http
        .post(format!("http://{admin_addr}/v1/riders"))
        .json(&json!({"name": "Wrong door", "phone": "+1 555 0100"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    sigterm(&child.0);
    assert_eq!(wait_exit(&mut child.0, WAIT).code(), Some(0));
}
