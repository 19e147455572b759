//! A throwaway PostgreSQL server of a test's own, for the tests that stop and start the
//! server itself (the shared one of `.ci/postgres.sh` must stay up for everyone else).
//!
//! [`PgServer::start`] runs Debian's `initdb` and `pg_ctl` (the newest
//! `/usr/lib/postgresql/*/bin`) on a fresh temporary directory, as the unprivileged user
//! `dispatchci` when the test runs as root (initdb refuses root; the user is created if
//! missing, as `.ci/postgres.sh` does), listening on a free loopback port only (no Unix
//! socket), with `fsync` and `synchronous_commit` as shipped (on). [`PgServer::crash`] is
//! `pg_ctl stop -m immediate` (the server dies without a checkpoint; committed work is
//! in its WAL), [`PgServer::restart`] starts it again on the same data. Dropped, it is
//! stopped (also when the test panics) and its directory removed.
//!
//! Without PostgreSQL installed it is `None` after saying so on stderr, or, when `CI` is
//! set, a panic: PostgreSQL tests never skip silently in CI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const USER: &str = "dispatchci";
const PASSWORD: &str = "dispatch";

/// A PostgreSQL server of one test's own; see the module's documentation.
pub struct PgServer {
    bin: PathBuf,
    dir: Option<tempfile::TempDir>,
    port: u16,
    as_user: bool,
    running: bool,
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn postgres_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl PgServer {
    /// A fresh server, started and accepting connections; see the module's documentation.
    pub fn start(test: &str) -> Option<PgServer> {
        let Some(bin) = postgres_bin() else {
            dispatch_persistence::pg::no_postgres(
                test,
                "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; `source .ci/postgres.sh start` installs it)",
            );
            return None;
        };
        let as_user = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        if as_user
            && !Command::new("id")
                .arg(USER)
                .output()
                .is_ok_and(|o| o.status.success())
        {
            // Another test may create it at the same moment: check again rather than fail.
            let _ = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(USER)
                .status();
            run(
                &format!("{test}: the user {USER}"),
                Command::new("id").arg(USER),
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("pgstop-")
            .tempdir()
            .expect("a temporary directory for PostgreSQL");
        if as_user {
            run(test, Command::new("chown").arg(USER).arg(dir.path()));
        }
        let pw = dir.path().join("pw");
        std::fs::write(&pw, format!("{PASSWORD}\n")).expect("the password file");
        let mut s = PgServer {
            bin,
            port: std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port(),
            dir: Some(dir),
            as_user,
            running: false,
        };
        let mut initdb = s.command("initdb");
        initdb
            .arg("-D")
            .arg(s.data())
            .args(["-U", "dispatch", "--auth=scram-sha-256", "-E", "UTF8"])
            .arg(format!("--pwfile={}", pw.display()));
        run(&format!("{test}: initdb"), &mut initdb);
        s.restart();
        Some(s)
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().expect("the directory").path()
    }

    fn data(&self) -> PathBuf {
        self.path().join("data")
    }

    /// `bin/<tool>`, run as the cluster's owner.
    fn command(&self, tool: &str) -> Command {
        let tool = self.bin.join(tool);
        if self.as_user {
            let mut c = Command::new("runuser");
            c.args(["-u", USER, "--"]).arg(tool);
            c
        } else {
            Command::new(tool)
        }
    }

    /// `postgres://dispatch:…@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!(
            "postgres://dispatch:{PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// The server's own log (for a failure's message).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.path().join("server.log")).unwrap_or_default()
    }

    /// Starts the server on its data directory (again) and waits until it accepts
    /// connections (`pg_ctl -w`, up to 60 s).
    pub fn restart(&mut self) {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.path().join("server.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories=''",
                self.port
            ))
            .arg("start");
        let out = c.output().expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed ({}):\n{}\n--- server log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        self.running = true;
    }

    /// `pg_ctl stop -m immediate`: every server process ends at once, without a
    /// checkpoint (a crash of the database; it recovers from its WAL at the next start).
    /// Returns once the server is gone.
    pub fn crash(&mut self) {
        self.stop("immediate");
    }

    fn stop(&mut self, mode: &str) {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "-t", "60", "stop"]);
        run("pg_ctl stop", &mut c);
        self.running = false;
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let mut c = self.command("pg_ctl");
            c.arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "-t", "60", "stop"]);
            let _ = c.output();
        }
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!(
                "dispatch-tests: the failed test's PostgreSQL data and log are kept in {}",
                dir.keep().display()
            );
        }
    }
}
