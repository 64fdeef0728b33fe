//! Running a daemon: a tokio runtime, and a shutdown token cancelled on
//! SIGTERM or SIGINT.

use std::future::Future;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// Returns the runtime every daemon and tool runs on: by default one thread
/// runs every task (many daemons share few cores: on the dev cluster's two
/// cores this saved a fifth of the context switches per NBD read and gave
/// 5-25% more IOPS than two workers); `BASALT_WORKER_THREADS=N` gives N
/// worker threads instead. Disk I/O is submitted from the runtime's own
/// threads (io_uring); some RocksDB work runs on the blocking pool.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let threads: usize = std::env::var("BASALT_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if threads == 0 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start runtime");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("start runtime")
}

/// Runs `daemon` with a token that SIGTERM or SIGINT cancels.
pub fn run_until_signal<F, Fut, E>(name: &'static str, daemon: F) -> anyhow::Result<()>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let runtime = runtime()?;
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("{name} stopping");
            signal.cancel();
        });
        daemon(shutdown)
            .await
            .with_context(|| format!("{name} failed"))
    });
    // The daemon has stopped (stores closed). Blocking work it left running
    // (an OSD's format zeroing its data file, which the next start redoes)
    // does not hold the exit up for long.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

/// Waits for SIGTERM or SIGINT.
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
