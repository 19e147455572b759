//! `--embedded`: an in-process dispatchd on a free loopback port with a temporary data
//! directory, for a one-command demo (and the integration test, which includes this file).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use dispatch_transport::server::{self, Args};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct EmbeddedServer {
    pub addr: SocketAddr,
    /// `ws://127.0.0.1:<port>`.
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
    _data_dir: tempfile::TempDir,
}

impl EmbeddedServer {
    /// Starts dispatchd with its defaults plus `flags`, and waits for `/readyz` 200.
    pub async fn start(flags: &[&str]) -> Result<EmbeddedServer> {
        let data_dir = tempfile::tempdir().context("a temporary data directory")?;
        let dir = data_dir
            .path()
            .to_str()
            .context("a UTF-8 temporary path")?
            .to_owned();
        // Every simulated rider and driver registers from this one address.
        let mut argv = vec!["dispatchd", "--listen", "127.0.0.1:0", "--data-dir", &dir];
        argv.extend_from_slice(&dispatch_transport::server::ratelimit::UNLIMITED);
        argv.extend_from_slice(flags);
        let config = Args::parse_from(argv)
            .build_and_validate()
            .map_err(|e| anyhow!("embedded dispatchd: {e}"))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async move {
            let _ = rx.await;
        }));
        let mut s = EmbeddedServer {
            addr,
            url: format!("ws://{addr}"),
            stop: Some(tx),
            task: Some(task),
            _data_dir: data_dir,
        };
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
                && r.status() == 200
            {
                return Ok(s);
            }
            if s.task.as_ref().is_some_and(|t| t.is_finished()) {
                let t = s.task.take().unwrap();
                let e = match t.await {
                    Ok(Ok(())) => anyhow!("stopped before it was ready"),
                    Ok(Err(e)) => e,
                    Err(e) => anyhow!(e),
                };
                bail!("embedded dispatchd failed: {e}");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("embedded dispatchd not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops it as SIGTERM would and waits for the end.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .context("embedded dispatchd did not stop within 30 s")??,
            None => Ok(()),
        }
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
