//! `basalt nbd`: the NBD gateway of a node.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use basalt_client::{BlockClient, ClientConfig, LocalOsd};
use basalt_monitor::MonClient;
use clap::Args;

#[derive(Args, Debug)]
pub struct NbdArgs {
    /// Address to serve NBD on.
    #[arg(long, default_value = "127.0.1.1:10809")]
    listen: SocketAddr,
    /// Export every volume read-only (writes get EPERM).
    #[arg(long)]
    read_only: bool,
}

pub fn run_gateway(args: NbdArgs, mon: &str) -> anyhow::Result<()> {
    let mon = mon.to_string();
    crate::daemon::run_until_signal("NBD gateway", move |shutdown| {
        serve_gateway(args.listen, args.read_only, mon, None, shutdown)
    })
}

/// Serves NBD on `listen` until `shutdown`. With `local`, requests for that
/// OSD (the node daemon's own) are answered in this process, not over TCP.
pub async fn serve_gateway(
    listen: SocketAddr,
    read_only: bool,
    mon: String,
    local: Option<(SocketAddr, Arc<dyn LocalOsd>)>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), GatewayError> {
    let client = BlockClient::connect(MonClient::from_list(&mon)?, ClientConfig::default())
        .await
        .context("connect to the cluster")?;
    let in_process = local.is_some();
    if let Some((addr, osd)) = local {
        client.set_local_osd(addr, osd);
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    tracing::info!(%listen, in_process, "NBD gateway serving");
    let clients = basalt_client_nbd::Clients::default();
    // Report connected clients to the monitors every 2 s (shown by
    // `basalt status`).
    let reporter = MonClient::from_list(&mon)?;
    let (listed, addr, stop) = (clients.clone(), listen.to_string(), shutdown.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        while !stop.is_cancelled() {
            tick.tick().await;
            let request = basalt_proto::monitor::GatewayReportRequest {
                addr: addr.clone(),
                clients: listed
                    .list()
                    .into_iter()
                    .map(|(peer, export)| basalt_proto::monitor::GatewayClient { peer, export })
                    .collect(),
            };
            let sent = reporter
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.gateway_report(request).await }
                })
                .await;
            if let Err(e) = sent {
                tracing::debug!("gateway report failed: {e}");
            }
        }
    });
    basalt_client_nbd::serve(listener, client, read_only, clients, shutdown)
        .await
        .context("serve NBD")?;
    Ok(())
}

/// anyhow errors carried through the daemon runner.
#[derive(Debug)]
pub struct GatewayError(anyhow::Error);

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for GatewayError {}

impl From<anyhow::Error> for GatewayError {
    fn from(e: anyhow::Error) -> Self {
        GatewayError(e)
    }
}

impl From<basalt_monitor::MonClientError> for GatewayError {
    fn from(e: basalt_monitor::MonClientError) -> Self {
        GatewayError(e.into())
    }
}
