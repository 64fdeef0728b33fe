//! Running a daemon: a tokio runtime, and a shutdown token cancelled on
//! SIGTERM or SIGINT.

use std::future::Future;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// Returns the multi-threaded runtime every daemon and tool runs on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
    runtime()?.block_on(async move {
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
    })
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
