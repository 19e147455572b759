//! `dispatch-loadgen`: a simulated city of drivers and riders, each a real WebSocket
//! client of dispatchd, with a latency report. The `loadgen` binary is a thin wrapper
//! around [`main_entry`]; tests call [`run`] directly.

pub mod acklog;
pub mod capacity;
pub mod cli;
pub mod demand;
pub mod driver;
#[cfg(feature = "embedded")]
pub mod embedded;
pub mod geo;
pub mod html;
pub mod net;
pub mod reconnect;
pub mod replay;
pub mod report;
pub mod rider;
pub mod session;
pub mod sim;
pub mod stats;
pub mod ui;
pub mod workers;

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;

pub use cli::Args;
pub use report::Report;

/// A finished run: the report, and the exit code its checks call for.
pub struct Outcome {
    pub report: Report,
    /// 0 when every check passed, else 1.
    pub exit_code: i32,
}

/// Runs the whole city as `args` describe (starting the embedded server if asked), prints
/// the report to stdout, writes `--json` and `--html`, and returns it.
pub async fn run(args: Args) -> Result<Outcome> {
    args.validate()?;
    if args.worker_index.is_some() {
        bail!("run() is not for workers; use workers::run_worker");
    }
    #[cfg(feature = "embedded")]
    let embedded = if args.embedded {
        let s = embedded::EmbeddedServer::start(&[]).await?;
        eprintln!("loadgen: embedded dispatchd on {}", s.url);
        Some(s)
    } else {
        None
    };
    #[cfg(not(feature = "embedded"))]
    if args.embedded {
        bail!(
            "--embedded needs a loadgen built with the `embedded` feature: \
             cargo run --release -p dispatch-loadgen --features embedded -- --embedded …; \
             or start dispatchd yourself and pass --url"
        );
    }
    #[cfg(feature = "embedded")]
    let url = embedded
        .as_ref()
        .map_or_else(|| args.url.clone(), |s| s.url.clone());
    #[cfg(not(feature = "embedded"))]
    let url = args.url.clone();

    let outcome = run_against(&args, &url).await;

    #[cfg(feature = "embedded")]
    if let Some(s) = embedded {
        s.stop().await?;
    }
    outcome
}

/// Runs against a server already listening at `url` (`ws://host:port`).
pub async fn run_against(args: &Args, url: &str) -> Result<Outcome> {
    let args = &args.resolved();
    let (demand, _) = sim::demand(args)?;
    let target = net::Target::resolve(url, args.spread).await?;
    if let Some(p) = &args.ack_log {
        // Emptied once; every process of the run appends to it.
        acklog::AckLog::truncate(p)?;
    }
    let progress = ui::Progress::new(args.quiet, args.duration + args.drain);
    // Sampled before any client connects: the baseline of the capacity report.
    let sampler = args.server_pid.map(|pid| {
        Arc::new(capacity::Sampler::new(
            pid,
            args.steady_after.as_secs_f64(),
            args.duration.as_secs_f64(),
        ))
    });
    let observe = {
        let sampler = sampler.clone();
        move |t: &sim::Tick| {
            if let Some(s) = &sampler {
                s.observe(t);
            }
        }
    };
    let merged = if args.workers > 1 {
        workers::run_parent(args, url, &progress, &observe).await?
    } else {
        let p = Arc::new(progress);
        let tick: sim::TickFn = {
            let p = p.clone();
            Arc::new(move |t: &sim::Tick| {
                p.tick(t);
                observe(t);
            })
        };
        let r = sim::run_local(
            Arc::new(args.clone()),
            target,
            0,
            1,
            tick,
            std::future::ready(()),
        )
        .await?;
        p.finish();
        let mut m = stats::Merged::default();
        m.add(&r);
        m
    };
    let server = args.server_pid.map(|pid| report::ServerUsage {
        pid,
        cpu_s: stats::process_cpu_s(Some(pid)),
        vm_hwm_kib: stats::proc_status_kib(pid, "VmHWM"),
        vm_rss_kib: stats::proc_status_kib(pid, "VmRSS"),
        capacity: sampler.as_ref().and_then(|s| s.report()),
    });
    let report = Report::build(args, url, &demand.source, &merged, server);
    print!("{}", report.text());
    if let Some(p) = &args.json {
        let f =
            std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?;
        serde_json::to_writer_pretty(std::io::BufWriter::new(f), &report)?;
    }
    if let Some(p) = &args.html {
        std::fs::write(p, html::page(&report))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    let exit_code = if report.passed { 0 } else { 1 };
    Ok(Outcome { report, exit_code })
}

/// The binary's `main`: parses the command line, runs, and returns the exit code
/// (0 passed, 1 a check failed, 2 could not run).
pub fn main_entry() -> i32 {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return 2;
        }
    };
    let res = rt.block_on(async move {
        if args.worker_index.is_some() {
            args.validate()?;
            workers::run_worker(args).await.map(|()| 0)
        } else {
            run(args).await.map(|o| o.exit_code)
        }
    });
    // Client tasks may still hold sockets; do not wait for them.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            2
        }
    }
}
