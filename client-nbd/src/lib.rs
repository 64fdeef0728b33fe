//! The NBD gateway: exports the cluster's volumes by name at
//! `nbd://<address>:10809/<volume>` (or `<pool>/<volume>`), for QEMU,
//! libnbd, fio and the kernel client.
//!
//! Negotiation (`negotiation`) is fixed newstyle with NBD_OPT_EXPORT_NAME,
//! GO, INFO, LIST, ABORT, STRUCTURED_REPLY, EXTENDED_HEADERS and
//! LIST/SET_META_CONTEXT for `base:allocation`; other options get their
//! NBD_REP_ERR_* and negotiation continues. Transmission (`transmission`)
//! answers READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE), CACHE,
//! BLOCK_STATUS (REQ_ONE) and DISC with simple, structured or extended
//! replies, concurrently and out of order, within per-connection bounds.
//! The wire format itself is pure code in `protocol`.
//!
//! The block size is advertised as 4 KiB minimum; unaligned or out-of-range
//! requests get EINVAL and the connection stays usable (we rejected
//! read-modify-write in the gateway: two connections of one multi-conn client
//! could interleave the read and the write of one block). A write without FUA
//! is acknowledged once every copy applied it, with FUA once every copy has it
//! durably; FLUSH makes every acknowledged write durable on every copy, those
//! completed on the gateway's other connections included
//! (NBD_FLAG_CAN_MULTI_CONN is truthful). See `transmission`.
//!
//! `kernel` attaches a volume to a /dev/nbdX through the kernel's netlink
//! interface (`basalt volume map`).

use std::sync::Arc;
use std::time::Duration;

use basalt_client::BlockClient;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub mod kernel;
mod negotiation;
pub mod protocol;
mod transmission;

pub use negotiation::{BLOCK_BYTES, MAX_PAYLOAD_BYTES};

/// How long a client may take to pick an export before it is disconnected
/// (a connection that never negotiates would otherwise hold a task forever).
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);

/// The clients connected to a gateway: connection id -> (peer, export).
#[derive(Clone, Default)]
pub struct Clients {
    inner: Arc<std::sync::Mutex<std::collections::BTreeMap<u64, (String, String)>>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Clients {
    /// Returns (peer, export) of every client in transmission.
    pub fn list(&self) -> Vec<(String, String)> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn add(&self, peer: String, export: String) -> ClientGuard {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (peer, export));
        ClientGuard {
            clients: self.clone(),
            id,
        }
    }
}

/// Removes a client from the list when its connection ends.
struct ClientGuard {
    clients: Clients,
    id: u64,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.clients
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Errors that end a connection (not a request: those get an NBD error).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Serves NBD on `listener` until `shutdown`. On shutdown every connection
/// is closed at once, in-flight requests unanswered: QEMU with
/// `reconnect-delay` reconnects (here or to another node's gateway) and
/// resends them, where error replies while draining would reach the guest
/// as I/O errors.
pub async fn serve(
    listener: TcpListener,
    client: Arc<BlockClient>,
    read_only: bool,
    clients: Clients,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: this connection
                // fails, the gateway goes on.
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (client, shutdown, clients) = (client.clone(), shutdown.clone(), clients.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = connection(stream, client, read_only, peer.to_string(), clients) => match result {
                    Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                    // A client gone without a word (a health check that
                    // only connects, fio closing without NBD_CMD_DISC).
                    Err(NbdError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(%peer, "NBD client hung up")
                    }
                    Err(e) => tracing::warn!(%peer, "NBD connection closed: {e}"),
                },
            }
        });
    }
}

/// Negotiates, then serves commands on one connection.
async fn connection(
    mut stream: TcpStream,
    client: Arc<BlockClient>,
    read_only: bool,
    peer: String,
    clients: Clients,
) -> Result<(), NbdError> {
    let negotiated = tokio::time::timeout(
        NEGOTIATION_TIMEOUT,
        negotiation::negotiate(&mut stream, &client, read_only),
    )
    .await
    .map_err(|_| NbdError::Protocol("no export chosen within the negotiation timeout".into()))??;
    let Some(session) = negotiated else {
        return Ok(());
    };
    tracing::info!(
        %peer,
        export = %session.export,
        headers = session.style.name(),
        block_status = session.allocation_context,
        "NBD client connected"
    );
    let _listed = clients.add(peer, session.export.clone());
    transmission::transmission(stream, session, read_only).await
}
