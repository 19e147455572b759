//! The real `dispatchd` binary as a child process: the one way the tests run it.
//!
//! [`Dispatchd::builder`] takes the flags, the environment, the data directory (a fresh
//! temporary one unless given) and the port (a free one unless given); [`start`] waits for
//! `/readyz`, [`spawn`] does not (for a start that must fail). The child's output goes to
//! a log file in the run's work directory; when a test fails, that directory (logs, and
//! the data unless it was given) is kept and its path printed. A [`Dispatchd`] is killed
//! when dropped; [`kill9`], [`sigterm`], [`stop`] end it on purpose, and [`again`] starts
//! another on the same data directory.
//!
//! [`start`]: DispatchdBuilder::start
//! [`spawn`]: DispatchdBuilder::spawn
//! [`kill9`]: Dispatchd::kill9
//! [`sigterm`]: Dispatchd::sigterm
//! [`stop`]: Dispatchd::stop
//! [`again`]: Dispatchd::again
//!
//! The store: sled in the data directory, unless the test process has
//! `DISPATCH_TEST_STORE=postgres`: then each run gets a fresh PostgreSQL database on the
//! server `DISPATCH_TEST_DATABASE_URL` names (kept across restarts of the run), and the
//! child runs with `--store postgres` through `DISPATCH_STORE`/`DISPATCH_DATABASE_URL`.
//! A test that reads or damages sled's files itself says [`sled_only`].
//!
//! The matching mode: the server's default (batch, 2 s windows) unless the test process
//! has `DISPATCH_MATCHING` / `DISPATCH_MATCH_WINDOW_MS` ([`MATCHING_ENV`]), which reach
//! the child; a test that depends on one mode says `--matching` in its flags.
//!
//! [`sled_only`]: DispatchdBuilder::sled_only

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{Endpoint, SLOW, WAIT};

/// Short timeouts, so whole trips (and their ends) fit a load test's run: 3 s offers, a
/// 15 s dispatch deadline, a minute's session grace, a snapshot every 200 ms, 5 s to
/// shut down.
pub const SHORT_TRIP_FLAGS: &[&str] = &[
    "--offer-timeout-ms",
    "3000",
    "--dispatch-deadline-ms",
    "15000",
    "--session-grace-ms",
    "60000",
    "--snapshot-interval-ms",
    "200",
    "--shutdown-timeout-ms",
    "5000",
];

/// The variables of the test process's own environment that reach every child (the rest
/// of `DISPATCH_*` does not): the matching mode and window, so that the whole suite can
/// run in either mode (`DISPATCH_MATCHING=greedy cargo test -p dispatch-tests`).
pub const MATCHING_ENV: [&str; 2] = ["DISPATCH_MATCHING", "DISPATCH_MATCH_WINDOW_MS"];

/// The `dispatchd` binary cargo built next to the test executable.
pub fn dispatchd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>/deps");
    dir.join("dispatchd")
}

/// The `dispatchd` binary. Under cargo it is (re)built first, so it is never older than
/// the code under test (a no-op when it is fresh); run bare, it must already exist.
pub fn built_dispatchd() -> PathBuf {
    built_bin("dispatch-transport", "dispatchd")
}

/// The workspace binary `bin` of `package`, next to the test executable. Under cargo it
/// is (re)built once per test process first (a no-op when it is fresh); run bare, it must
/// already exist.
pub fn built_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let path = dispatchd_bin().with_file_name(bin);
    let build = format!("cargo build -p {package} --bin {bin}");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.contains(&build)
        && let Ok(cargo) = std::env::var("CARGO")
    {
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", bin]);
        // Not the variables cargo sets for this test crate (CARGO_PKG_NAME, ...): ring's
        // build script reruns when they change, so inheriting them would rebuild ring and
        // everything above it at every switch between `cargo test` and this build.
        let per_crate = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_TARGET_TMPDIR",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_RUSTC_CURRENT_DIR",
        ];
        for (k, _) in std::env::vars_os() {
            if k.to_str()
                .is_some_and(|k| per_crate.iter().any(|p| k.starts_with(p)))
            {
                cmd.env_remove(k);
            }
        }
        if path.parent().and_then(|p| p.file_name()) == Some("release".as_ref()) {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(workspace)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "`{build}` failed");
        built.push(build.clone());
    }
    assert!(
        path.exists(),
        "{} does not exist: build it with `{build}` (`cargo test --workspace` builds it too)",
        path.display()
    );
    path
}

/// Kills a child that is still running and waits for it: for the `Drop` guards that keep
/// a failed test from leaving a process behind.
pub fn reap(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A free port on 127.0.0.1 (bound, then released for the child to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A run's work directory (logs; the data directory unless one was given), shared by
/// every start on it. Removed at the end, unless the test is failing: then kept, and said.
struct Work {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    /// The run's PostgreSQL database, under `DISPATCH_TEST_STORE=postgres`.
    database: Option<String>,
}

/// Whether this test process runs `dispatchd` on PostgreSQL (`DISPATCH_TEST_STORE`).
pub fn test_store_is_postgres() -> bool {
    match std::env::var("DISPATCH_TEST_STORE").as_deref() {
        Err(_) | Ok("sled") | Ok("") => false,
        Ok("postgres") => true,
        Ok(other) => panic!("DISPATCH_TEST_STORE={other}: expected sled or postgres"),
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!(
                "dispatch-tests: the failed test's dispatchd logs and data are kept in {}",
                dir.keep().display()
            );
        }
    }
}

/// How to start `dispatchd`; see [`Dispatchd::builder`].
#[derive(Clone)]
pub struct DispatchdBuilder {
    name: String,
    flags: Vec<String>,
    env: Vec<(String, String)>,
    data: Option<PathBuf>,
    port: Option<u16>,
    stderr_apart: bool,
    sled_only: bool,
    work: Option<Arc<Work>>,
}

impl DispatchdBuilder {
    /// Runs on sled whatever `DISPATCH_TEST_STORE` says: the test reads or damages
    /// sled's files (what it checks, the PostgreSQL store's own tests check there).
    pub fn sled_only(mut self) -> Self {
        self.sled_only = true;
        self
    }

    /// Appends `flags` to the command line (after `--listen` and `--data-dir`).
    pub fn flags<S: AsRef<str>>(mut self, flags: &[S]) -> Self {
        self.flags
            .extend(flags.iter().map(|f| f.as_ref().to_owned()));
        self
    }

    /// Sets `key=value` in the child's environment. Every other `DISPATCH_*` variable of
    /// the test's own environment is removed (`DISPATCH_LOG` is `info` unless set here).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Undoes [`env`](Self::env) for `key` (for a restart without a test hook).
    pub fn without_env(mut self, key: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self
    }

    /// Runs on `dir` as `--data-dir` (it need not exist) instead of a fresh temporary one.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data = Some(dir.into());
        self
    }

    /// Listens on `127.0.0.1:port` instead of a free port chosen at each start.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Writes stderr to a file of its own ([`Dispatchd::stderr_text`]); by default it
    /// shares the log file with stdout.
    pub fn stderr_apart(mut self) -> Self {
        self.stderr_apart = true;
        self
    }

    fn work(&mut self) -> Arc<Work> {
        self.work
            .get_or_insert_with(|| {
                let dir = tempfile::Builder::new()
                    .prefix(&format!("dispatchd-{}-", self.name))
                    .tempdir()
                    .expect("a temporary work directory");
                let database = (!self.sled_only && test_store_is_postgres()).then(|| {
                    dispatch_persistence::pg::test_database(&self.name).unwrap_or_else(|| {
                        panic!(
                            "{}: DISPATCH_TEST_STORE=postgres needs DISPATCH_TEST_DATABASE_URL",
                            self.name
                        )
                    })
                });
                Arc::new(Work {
                    path: dir.path().to_owned(),
                    dir: Some(dir),
                    database,
                })
            })
            .clone()
    }

    /// Spawns the child without waiting for it to be ready.
    pub fn spawn(mut self) -> Dispatchd {
        static SPAWNED: AtomicUsize = AtomicUsize::new(0);
        let work = self.work();
        let data = self.data.clone().unwrap_or_else(|| work.path.join("data"));
        let n = SPAWNED.fetch_add(1, Ordering::Relaxed);
        let log = work.path.join(format!("{}-{n}.log", self.name));
        let err = self
            .stderr_apart
            .then(|| work.path.join(format!("{}-{n}.stderr", self.name)));
        let out = std::fs::File::create(&log).expect("create the log file");
        let err_file = match &err {
            Some(p) => std::fs::File::create(p).expect("create the stderr file"),
            None => out.try_clone().expect("clone the log handle"),
        };
        let port = self.port.unwrap_or_else(free_port);
        let mut cmd = Command::new(built_dispatchd());
        cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(&data)
            .args(&self.flags);
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with("DISPATCH_")) {
                cmd.env_remove(k);
            }
        }
        cmd.env("DISPATCH_LOG", "info");
        // The matching mode of the test process (`DISPATCH_MATCHING=greedy cargo test
        // -p dispatch-tests` runs the suite in greedy mode); a test's own flags and env win.
        for key in MATCHING_ENV {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        if let Some(url) = &work.database {
            cmd.env("DISPATCH_STORE", "postgres")
                .env("DISPATCH_DATABASE_URL", url);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err_file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn dispatchd {}: {e}", self.name));
        Dispatchd {
            endpoint: Endpoint::new(
                ([127, 0, 0, 1], port).into(),
                reqwest::Client::builder()
                    .timeout(WAIT)
                    .build()
                    .expect("an HTTP client"),
            ),
            child,
            log,
            err,
            data,
            work,
            builder: self,
        }
    }

    /// Spawns the child and waits (up to [`SLOW`]) until `/readyz` is 200; a port taken
    /// in between by someone else is retried on another (unless the port was given).
    pub async fn start(self) -> Dispatchd {
        for attempt in 0.. {
            let mut d = self.clone().spawn();
            let deadline = tokio::time::Instant::now() + SLOW;
            loop {
                if let Ok(r) = d.http.get(d.url("/readyz")).send().await
                    && r.status() == 200
                {
                    // DISPATCH_TEST_STORE=postgres really runs it on PostgreSQL.
                    if d.work.database.is_some() {
                        let log = d.log_text();
                        assert!(
                            // `store=postgres postgres://…` (text) or `"store":"postgres postgres://…"` (JSON).
                            log.contains("postgres postgres://"),
                            "{}: DISPATCH_TEST_STORE=postgres, but dispatchd did not start on PostgreSQL\n--- log ---\n{log}",
                            self.name
                        );
                    }
                    return d;
                }
                if let Some(st) = d.child.try_wait().expect("try_wait") {
                    let log = d.log_text();
                    assert!(
                        self.port.is_none() && attempt < 3 && log.contains("cannot listen"),
                        "{}: dispatchd exited ({st}) before it was ready\n--- log ---\n{log}",
                        self.name
                    );
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{}: dispatchd not ready within {SLOW:?}\n--- log ---\n{}",
                    self.name,
                    d.log_text()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        unreachable!()
    }
}

/// The real `dispatchd` binary as a child process. Derefs to its [`Endpoint`]; killed
/// (SIGKILL) when dropped if it still runs.
pub struct Dispatchd {
    endpoint: Endpoint,
    pub child: Child,
    log: PathBuf,
    err: Option<PathBuf>,
    data: PathBuf,
    work: Arc<Work>,
    builder: DispatchdBuilder,
}

impl std::ops::Deref for Dispatchd {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Drop for Dispatchd {
    fn drop(&mut self) {
        reap(&mut self.child);
        if std::thread::panicking() {
            eprintln!(
                "dispatch-tests: dispatchd {} logged to {}",
                self.builder.name,
                self.log.display()
            );
        }
    }
}

impl Dispatchd {
    /// How to start a `dispatchd` named `name` (in its log file names and failures):
    /// `dispatchd --listen 127.0.0.1:<port> --data-dir <data> <flags>`.
    pub fn builder(name: &str) -> DispatchdBuilder {
        // Tests register many riders and drivers from one address: the registration
        // limit is raised out of the way unless a test sets it (flags win over these).
        let env = [
            ("DISPATCH_REGISTER_RATE_PER_S", "1000000"),
            ("DISPATCH_REGISTER_BURST", "1000000"),
        ];
        DispatchdBuilder {
            name: name.to_owned(),
            flags: Vec::new(),
            env: env.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec(),
            data: None,
            port: None,
            stderr_apart: false,
            sled_only: false,
            work: None,
        }
    }

    /// Starts `dispatchd` with `flags` on a fresh data directory and waits until ready.
    pub async fn start(name: &str, flags: &[&str]) -> Dispatchd {
        Dispatchd::builder(name).flags(flags).start().await
    }

    /// The same flags, environment, data directory (and port, if one was given), for the
    /// next start once this one has ended.
    pub fn again(&self) -> DispatchdBuilder {
        let mut b = self.builder.clone();
        b.data = Some(self.data.clone());
        b.work = Some(self.work.clone());
        b
    }

    /// The same again on the same data directory, ready, once this one has ended (killed
    /// now if it still runs).
    pub async fn restart(self) -> Dispatchd {
        let again = self.again();
        drop(self);
        again.start().await
    }

    /// SIGKILL (no shutdown code runs, nothing more is flushed), then [`Dispatchd::restart`].
    pub async fn crash_and_restart(mut self) -> Dispatchd {
        self.kill9();
        self.restart().await
    }

    /// The `--data-dir`.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The listen address, `127.0.0.1:<port>`.
    pub fn listen(&self) -> String {
        self.addr.to_string()
    }

    /// The log file (stdout, and stderr unless [`DispatchdBuilder::stderr_apart`]).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What went to stderr, with [`DispatchdBuilder::stderr_apart`] (else empty).
    pub fn stderr_text(&self) -> String {
        self.err
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: no shutdown code runs, nothing more is flushed. Asserts it was the kill
    /// that ended it.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL dispatchd");
        let st = self.child.wait().expect("reap dispatchd");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(9),
            "{}: dispatchd was not killed by SIGKILL: {st}",
            self.builder.name
        );
    }

    /// SIGTERM, without waiting.
    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// Sends the process the signal `sig` (`kill`'s spelling: `-STOP`, `-CONT`, …).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "{}: kill {sig} failed", self.builder.name);
    }

    /// Waits for the process to end by itself (not killed by the test); its exit status.
    pub async fn exited_within(&mut self, within: Duration) -> ExitStatus {
        self.wait_exit(within, false).await
    }

    /// Waits for a start that must fail: the process exits within [`SLOW`], and `/readyz`
    /// never answers 200 meanwhile. Its exit status.
    pub async fn exits_unready(&mut self) -> ExitStatus {
        self.wait_exit(SLOW, true).await
    }

    async fn wait_exit(&mut self, within: Duration, never_ready: bool) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if never_ready && let Ok(r) = self.http.get(self.url("/readyz")).send().await {
                assert_ne!(
                    r.status(),
                    200,
                    "{}: dispatchd became ready\n--- log ---\n{}",
                    self.builder.name,
                    self.log_text()
                );
            }
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: dispatchd still runs after {within:?}\n--- log ---\n{}",
                self.builder.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, and the exit must be a clean 0 within [`SLOW`]; the whole log.
    pub async fn stop(mut self) -> String {
        self.sigterm();
        let st = self.exited_within(SLOW).await;
        let log = self.log_text();
        assert_eq!(
            st.code(),
            Some(0),
            "{}: SIGTERM must end dispatchd with 0, got {st}\n--- log ---\n{log}",
            self.builder.name
        );
        log
    }

    /// [`Dispatchd::stop`], and the log must show no panic and no broken invariant.
    pub async fn stop_clean(self) -> String {
        let name = self.builder.name.clone();
        let log = self.stop().await;
        assert_clean_log(&name, &log);
        log
    }
}

/// A server log must not show a panic or a broken invariant (the debug binary also
/// panics on the latter).
pub fn assert_clean_log(what: &str, log: &str) {
    for bad in ["panicked", "invariant violated"] {
        if let Some(line) = log.lines().find(|l| l.contains(bad)) {
            panic!("{what}: the server log shows `{bad}`: {line}\n--- log ---\n{log}");
        }
    }
}

/// What a test of several nodes in cluster mode shares: a fresh database on the
/// PostgreSQL of `DISPATCH_TEST_DATABASE_URL`, and a file holding the cluster cookie.
pub struct ClusterFixture {
    pub db: String,
    pub cookie_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl ClusterFixture {
    /// `None` (the test skips) without a test database (`test_database` says why, and
    /// panics under CI=1), or under `DISPATCH_TEST_STORE=postgres`: every node runs on
    /// PostgreSQL anyway, so such a test does not run twice in CI.
    pub fn new(test: &str, cookie: &str) -> Option<ClusterFixture> {
        if test_store_is_postgres() {
            eprintln!("{test}: skipped under DISPATCH_TEST_STORE=postgres (it always runs on it)");
            return None;
        }
        let db = dispatch_persistence::pg::test_database(test)?;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let cookie_file = dir.path().join("cookie");
        std::fs::write(&cookie_file, format!("{cookie}\n")).expect("the cookie file");
        Some(ClusterFixture {
            db,
            cookie_file,
            _dir: dir,
        })
    }

    /// `--cluster-peers` for nodes on 127.0.0.1 at `ports`: `127.0.0.1:<port>,…`.
    pub fn peers(ports: &[u16]) -> String {
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A node in sharded cluster mode (`--cluster-mode sharded`, the default, said
    /// anyway): [`ClusterFixture::member`] with its cluster port `ports[i]`, every port of
    /// `ports` as peers, and `--lease-ttl-ms ttl_ms` renewed every 400 ms.
    pub fn sharded_node(
        &self,
        name: &str,
        (ports, i): (&[u16], usize),
        admin: &str,
        ttl_ms: u64,
    ) -> DispatchdBuilder {
        self.member(name, ports[i], &Self::peers(ports), admin)
            .flags(&["--cluster-mode", "sharded", "--lease-renew-ms", "400"])
            .flags(&["--lease-ttl-ms".to_owned(), ttl_ms.to_string()])
    }

    /// A node in leader cluster mode (`--cluster-mode leader`: one node serves the whole
    /// city, the others stand by and relay to it): [`ClusterFixture::member`] with the
    /// mode said, since sharded is the default.
    pub fn leader_node(&self, name: &str, port: u16, peers: &str, admin: &str) -> DispatchdBuilder {
        self.member(name, port, peers, admin)
            .flags(&["--cluster-mode", "leader"])
    }

    /// A node `name` of the cluster on this database, in no mode of its own (callers say
    /// which: [`ClusterFixture::leader_node`], [`ClusterFixture::sharded_node`]): its
    /// cluster port on 127.0.0.1:`port`, `peers` (`host:port,…`), heartbeats every 200 ms,
    /// a peer dead after 1 s.
    fn member(&self, name: &str, port: u16, peers: &str, admin: &str) -> DispatchdBuilder {
        // `sled_only`: the builder sets no database of its own; the env below sets ours.
        Dispatchd::builder(name)
            .sled_only()
            .env("DISPATCH_STORE", "postgres")
            .env("DISPATCH_DATABASE_URL", &self.db)
            .flags(&["--admin-token", admin, "--node-name", name])
            .flags(&[
                "--cluster-listen".to_owned(),
                format!("127.0.0.1:{port}"),
                "--cluster-peers".to_owned(),
                peers.to_owned(),
                "--cluster-cookie-file".to_owned(),
                self.cookie_file.display().to_string(),
            ])
            .flags(&[
                "--cluster-heartbeat-ms",
                "200",
                "--cluster-peer-timeout-ms",
                "1000",
            ])
    }
}
