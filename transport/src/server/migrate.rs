//! `dispatchd migrate`: copies a stopped store into an empty one of the other kind
//! (sled into PostgreSQL, or back), then reads both and compares each tree's record
//! count and CRC-32. Both servers must be stopped: nothing else may write meanwhile.

use clap::Parser;
use dispatch_persistence::{PgOptions, Store};

use super::config::{DatabaseUrl, StoreKind};

/// Copy a stopped store into another: `dispatchd migrate --from sled --data-dir ./data
/// --to postgres --database-url postgres://…` (or `--from postgres … --to sled`).
#[derive(Debug, Parser)]
#[command(name = "dispatchd migrate")]
pub struct MigrateArgs {
    /// The store to read.
    #[arg(long, value_enum)]
    pub from: StoreKind,
    /// The store to write (it must be empty, or hold the same records).
    #[arg(long, value_enum)]
    pub to: StoreKind,
    /// The sled directory (the source or the target).
    #[arg(long, env = "DISPATCH_DATA_DIR")]
    pub data_dir: std::path::PathBuf,
    /// The PostgreSQL database (the source or the target); never printed.
    #[arg(long, env = "DISPATCH_DATABASE_URL", hide_env_values = true)]
    pub database_url: DatabaseUrl,
}

/// Runs `dispatchd migrate` with `args` (after the subcommand's name); prints what was
/// copied, one line per tree.
pub fn run(args: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let a = MigrateArgs::parse_from(args);
    if a.from == a.to {
        anyhow::bail!("--from and --to are the same store kind: nothing to migrate");
    }
    let open = |kind: StoreKind| -> anyhow::Result<Store> {
        Ok(match kind {
            StoreKind::Sled => Store::open(&a.data_dir, |_| {})?,
            StoreKind::Postgres => {
                let mut o = PgOptions::new(a.database_url.0.clone());
                o.start_timeout = std::time::Duration::from_secs(10);
                o.call_timeout = std::time::Duration::from_secs(60);
                o.statement_timeout = o.call_timeout;
                Store::open_postgres(o, |_| {})?
            }
        })
    };
    let (from, to) = (open(a.from)?, open(a.to)?);
    let started = std::time::Instant::now();
    let report = from.copy_into(&to)?;
    for t in &report {
        println!(
            "{:<9} {:>9} records  crc32 {:#010x}  (same on both sides)",
            t.tree, t.records, t.crc32
        );
    }
    println!(
        "migrated {} records from {} {} to {} {} in {} ms, verified",
        report.iter().map(|t| t.records).sum::<usize>(),
        from.kind(),
        from.dir().display(),
        to.kind(),
        to.dir().display(),
        started.elapsed().as_millis()
    );
    to.close()?;
    from.close()?;
    Ok(())
}
