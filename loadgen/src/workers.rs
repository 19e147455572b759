//! `--workers N`: the parent re-executes its own binary N times with `--worker-index i`
//! and a slice of the population; each worker sets up, reports `ready` on stdout, waits
//! for `go` on stdin, runs, and prints its measurements as one JSON line.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::cli::Args;
use crate::net::Target;
use crate::sim::{self, Tick, TickFn};
use crate::stats::{Merged, WorkerResult};
use crate::ui::Progress;

/// One line of a worker's stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerLine {
    Ready,
    Progress(Box<Tick>),
    Result(Box<WorkerResult>),
}

fn emit(line: &WorkerLine) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// The worker side: runs its slice, talking to the parent over stdin/stdout.
pub async fn run_worker(args: Args) -> Result<()> {
    let index = args.worker_index.context("not a worker")?;
    let target = Target::resolve(&args.url, args.spread).await?;
    let count = args.workers;
    let ready_sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tick: TickFn = {
        let ready_sent = ready_sent.clone();
        Arc::new(move |t: &Tick| {
            if t.phase == "ready" {
                if !ready_sent.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    emit(&WorkerLine::Ready);
                }
            } else {
                emit(&WorkerLine::Progress(Box::new(t.clone())));
            }
        })
    };
    let go = {
        let tick = tick.clone();
        async move {
            // Say `ready` at once, not at the next tick.
            tick(&Tick {
                phase: "ready".into(),
                ..Tick::default()
            });
            let line = tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).map(|_| line)
            })
            .await;
            match line {
                Ok(Ok(l)) if l.trim() == "go" => {}
                // The parent is gone: stop here.
                _ => std::process::exit(3),
            }
        }
    };
    let res = sim::run_local(Arc::new(args), target, index, count, tick, go).await?;
    emit(&WorkerLine::Result(Box::new(res)));
    Ok(())
}

enum Event {
    Line(usize, WorkerLine),
    Eof(usize),
}

/// The parent side: starts the workers, releases them together, shows their summed
/// progress, and merges their results.
pub async fn run_parent(
    args: &Args,
    url: &str,
    progress: &Progress,
    observe: &(dyn Fn(&Tick) + Sync),
) -> Result<Merged> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.starts_with("loadgen") {
        bail!(
            "--workers re-executes the loadgen binary, but this process is {}; run the `loadgen` binary",
            exe.display()
        );
    }
    let n = args.workers;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    for i in 0..n {
        let mut child = Command::new(&exe)
            .args(args.worker_argv(i, url))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start worker {i} ({})", exe.display()))?;
        stdins.push(child.stdin.take().context("worker stdin")?);
        let stdout = child.stdout.take().context("worker stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                match serde_json::from_str::<WorkerLine>(&l) {
                    Ok(w) => {
                        let _ = tx.send(Event::Line(i, w));
                    }
                    Err(_) => eprintln!("worker {i}: {l}"),
                }
            }
            let _ = tx.send(Event::Eof(i));
        });
        children.push(child);
    }
    drop(tx);
    let mut ready = vec![false; n];
    let mut ticks: BTreeMap<usize, Tick> = BTreeMap::new();
    let mut results: Vec<Option<WorkerResult>> = (0..n).map(|_| None).collect();
    let mut ended = 0;
    let mut went = false;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Line(i, WorkerLine::Ready) => {
                ready[i] = true;
                if !went && ready.iter().all(|r| *r) {
                    went = true;
                    for s in &mut stdins {
                        s.write_all(b"go\n").await.context("releasing a worker")?;
                        s.flush().await?;
                    }
                }
            }
            Event::Line(i, WorkerLine::Progress(t)) => {
                ticks.insert(i, *t);
                let mut sum = Tick {
                    phase: if went { "running" } else { "setting up" }.into(),
                    ..Tick::default()
                };
                for t in ticks.values() {
                    sum.counters.add(&t.counters);
                    sum.connected += t.connected;
                    sum.clients += t.clients;
                    sum.run_s = sum.run_s.max(t.run_s);
                }
                if ticks.values().any(|t| t.phase == "draining") {
                    sum.phase = "draining".into();
                }
                progress.tick(&sum);
                observe(&sum);
            }
            Event::Line(i, WorkerLine::Result(r)) => results[i] = Some(*r),
            Event::Eof(i) => {
                ended += 1;
                if results[i].is_none() {
                    let status = children[i].wait().await.ok();
                    bail!(
                        "worker {i} exited without a result ({})",
                        status.map_or("unknown status".into(), |s| s.to_string())
                    );
                }
                if ended == n {
                    break;
                }
            }
        }
    }
    for c in &mut children {
        let _ = c.wait().await;
    }
    let mut merged = Merged::default();
    for (i, r) in results.into_iter().enumerate() {
        merged.add(&r.with_context(|| format!("worker {i} sent no result"))?);
    }
    merged.join_offers();
    Ok(merged)
}
