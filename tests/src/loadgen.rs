//! `loadgen` as a child process of a test: killed and reaped if the test ends first, its
//! stdout and stderr in files that a failure message shows.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A running `loadgen`.
pub struct Loadgen {
    pub child: Child,
    pub out: PathBuf,
    pub err: PathBuf,
}

impl Drop for Loadgen {
    fn drop(&mut self) {
        crate::reap(&mut self.child);
    }
}

impl Loadgen {
    /// The workspace's `loadgen` (built first under cargo) with `args`, its stdout in `out`
    /// and its stderr in `err`.
    pub fn spawn(args: &[String], out: PathBuf, err: PathBuf) -> Loadgen {
        let bin = crate::built_bin("dispatch-loadgen", "loadgen");
        let child = Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("loadgen stdout file"))
            .stderr(File::create(&err).expect("loadgen stderr file"))
            .spawn()
            .expect("spawn loadgen");
        Loadgen { child, out, err }
    }

    /// Its output so far, for a failure message.
    pub fn output(&self) -> String {
        format!(
            "--- loadgen stdout ---\n{}\n--- loadgen stderr ---\n{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default()
        )
    }
}

/// A `loadgen` command line being built: its arguments, then what every test that
/// restarts or scales servers under load adds.
pub struct LoadgenArgs {
    args: Vec<String>,
}

impl LoadgenArgs {
    pub fn new(args: &[&str]) -> LoadgenArgs {
        LoadgenArgs {
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Reconnects for up to 30 s whenever its server goes away, writes every
    /// acknowledgement to `acks` (a test checks none was lost) and its report to `report`,
    /// and prints nothing else.
    pub fn recorded(mut self, acks: &Path, report: &Path) -> LoadgenArgs {
        for a in ["--reconnect", "--reconnect-for", "30s", "--ack-log"] {
            self.args.push(a.to_owned());
        }
        self.args.push(path_arg(acks));
        self.args.push("--json".to_owned());
        self.args.push(path_arg(report));
        self.args.push("--quiet".to_owned());
        self
    }

    /// Starts it, as [`Loadgen::spawn`].
    pub fn spawn(self, out: PathBuf, err: PathBuf) -> Loadgen {
        Loadgen::spawn(&self.args, out, err)
    }
}

fn path_arg(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_owned()
}
