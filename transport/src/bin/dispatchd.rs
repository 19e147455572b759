//! Run with `cargo run --release --bin dispatchd` (every flag has a `DISPATCH_*`
//! environment variable; `--help` lists them). `dispatchd openapi` prints the OpenAPI
//! document of the REST routes (what `docs/openapi.json` holds) and exits; `dispatchd
//! asyncapi` the AsyncAPI document of the sessions (`docs/asyncapi.yaml`). `dispatchd
//! migrate --from sled --data-dir … --to postgres --database-url …` (or back) copies a
//! stopped store, verified by counts and checksums.

use clap::Parser;
use dispatch_transport::server::{self, Args};
use dispatch_transport::telemetry;
use tracing_subscriber::EnvFilter;

// mimalloc rather than glibc's malloc: recovery creates ~100,000 actors at once, and
// glibc's allocator dominated its profile (see the recovery benchmark). Built with
// `RUSTFLAGS="--cfg dispatch_system_alloc"` it keeps the system allocator, so heaptrack and
// valgrind's dhat, which see only malloc, can attribute the server's memory (issue 14).
#[cfg(not(dispatch_system_alloc))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("openapi") => {
            print!("{}", server::openapi::document());
            return Ok(());
        }
        Some("asyncapi") => {
            print!("{}", server::asyncapi::document());
            return Ok(());
        }
        Some("migrate") => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::new("warn"))
                .with_writer(std::io::stderr)
                .try_init();
            return server::migrate::run(std::env::args().skip(1));
        }
        _ => {}
    }
    let args = Args::parse();
    let config = match args.build_and_validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dispatchd: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Logs, and the OTLP export of traces when configured (its task runs on the runtime).
    let filter = EnvFilter::try_from_env("DISPATCH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let telemetry = {
        let _rt = runtime.enter();
        telemetry::init(filter, config.log_format, &config.traces)?
    };
    // Every WebSocket session is a file: take the whole hard limit (containers often start
    // with a soft limit of 1024), and say so when it cannot cover --max-connections.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < config.max_connections as u64 + 64 => tracing::warn!(
            open_files = n,
            max_connections = config.max_connections,
            "the open-file limit is below --max-connections; sessions past it will fail"
        ),
        Ok(n) => tracing::info!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let served = server::run(listener, config, server::shutdown_signal()).await;
        // The spans of the last requests are exported (bounded) before the process ends.
        if let Some(t) = telemetry {
            t.shutdown().await;
        }
        served
    })
}
