//! The OSD daemon: formats its data directory on first start, boots into
//! the monitors' map, heartbeats, follows the map, and serves the data
//! plane (client ops as primary, replication ops as replica).
//!
//! Identity: the id the monitors assign at first boot is kept in
//! `DIR/osd.json`, so a restarted OSD returns as itself (and gets its PGs
//! back, where its data is).

pub mod service;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use basalt_monitor::MonClient;
use basalt_placement::{ClusterMap, OsdId};
use basalt_proto::monitor as pb;
use basalt_wire::{Frame, FrameCodec, Kind};
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::store::{BLOCK_BYTES, ObjectStore, StoreConfig, StoreError, UringDevice};
pub use service::{OsdService, PgPhase, RecoveryConfig};

/// Requests one connection may have in flight.
const IN_FLIGHT_PER_CONNECTION: usize = 256;

/// Why an OSD could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum OsdError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("monitors: {0}")]
    Monitor(#[from] basalt_monitor::MonClientError),
    #[error("{0}")]
    Config(String),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Settings of one OSD daemon.
#[derive(Clone, Debug)]
pub struct OsdConfig {
    /// Expected id (checked against the data directory), if known.
    pub id: Option<u32>,
    pub data_dir: PathBuf,
    pub mon: Vec<String>,
    /// Data-plane address (also published in the map).
    pub listen: SocketAddr,
    pub host: String,
    pub zone: String,
    /// Size of the data file created on first start.
    pub size_bytes: u64,
    /// Write zeros over the data file when creating it (later writes are
    /// pure overwrites: no file-system allocation on the data path).
    pub prezero: bool,
    /// Placement weight.
    pub weight: f64,
    /// Heartbeat interval. Default 1,000 ms.
    pub heartbeat_interval_ms: u64,
    /// Peering and recovery limits.
    pub recovery: RecoveryConfig,
    /// Settings of the object store.
    pub store: StoreConfig,
}

#[derive(Serialize, Deserialize)]
struct Identity {
    osd_id: u32,
}

fn identity_path(config: &OsdConfig) -> PathBuf {
    config.data_dir.join("osd.json")
}

/// The OSD as seen by a gateway in the same process (a node daemon): request
/// frames are answered by the service directly. Holds the service weakly, so
/// a stopping OSD still closes its store once in-flight requests are done.
pub struct LocalService {
    service: std::sync::Weak<OsdService>,
    /// The OSD's shutdown: from then on no new request is taken, as its
    /// listener takes no new connection.
    stopping: CancellationToken,
}

impl basalt_client::LocalOsd for LocalService {
    fn call(&self, frame: Frame) -> futures::future::BoxFuture<'static, Option<Frame>> {
        let service = if self.stopping.is_cancelled() {
            None
        } else {
            self.service.upgrade()
        };
        Box::pin(async move {
            let service = service?;
            // A read changes nothing, so a caller may drop it half-way (its
            // I/O buffer stays with the ring until the kernel is done; a
            // read repair cut short leaves the bad copy for the next read
            // to repair): run in the caller's task, without a spawn and a
            // wake-up more. A panic stays with the request (the caller sees
            // a lost connection), as in a task of its own.
            if frame.kind == Kind::Read {
                return AssertUnwindSafe(service.handle(frame))
                    .catch_unwind()
                    .await
                    .ok();
            }
            // Spawned, as a request read from a socket is: a caller that
            // stops waiting (timeout, closed NBD connection) must not cut a
            // replicated write in half.
            tokio::spawn(async move { service.handle(frame).await })
                .await
                .ok()
        })
    }
}

/// Runs an OSD until `shutdown` is cancelled.
pub async fn run(config: OsdConfig, shutdown: CancellationToken) -> Result<(), OsdError> {
    run_with_local(config, shutdown, None).await
}

/// Runs an OSD until `shutdown` is cancelled; once it has booted and serves,
/// hands `local` (if given) the in-process entry to its service, with its
/// data-plane address.
pub async fn run_with_local(
    config: OsdConfig,
    shutdown: CancellationToken,
    local: Option<tokio::sync::oneshot::Sender<(SocketAddr, Arc<dyn basalt_client::LocalOsd>)>>,
) -> Result<(), OsdError> {
    if !config.data_dir.join("meta").exists() {
        tracing::info!(dir = %config.data_dir.display(), size = config.size_bytes, prezero = config.prezero, "formatting new OSD store");
        // Zeroing a large file takes a while: off the runtime, and a stop
        // meanwhile is not held up by it (the next start formats again).
        let (dir, size, prezero) = (config.data_dir.clone(), config.size_bytes, config.prezero);
        let format =
            tokio::task::spawn_blocking(move || ObjectStore::format_dir(&dir, size, prezero));
        tokio::select! {
            formatted = format => formatted
                .map_err(|e| OsdError::Config(format!("format task failed: {e}")))??,
            () = shutdown.cancelled() => {
                tracing::info!("stopped while formatting the store");
                return Ok(());
            }
        }
    }
    let known: Option<u32> = std::fs::read(identity_path(&config))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Identity>(&bytes).ok())
        .map(|i| i.osd_id);
    if let (Some(known), Some(wanted)) = (known, config.id)
        && known != wanted
    {
        return Err(OsdError::Config(format!(
            "{} belongs to osd.{known}, not osd.{wanted}",
            config.data_dir.display()
        )));
    }
    let store = Arc::new(ObjectStore::open_dir(&config.data_dir, config.store.clone()).await?);
    let mon = Arc::new(MonClient::new(&config.mon)?);

    let id = boot(&mon, &config, known.or(config.id)).await?;
    if known != Some(id.0) {
        let bytes = serde_json::to_vec(&Identity { osd_id: id.0 })
            .map_err(|e| OsdError::Config(e.to_string()))?;
        std::fs::write(identity_path(&config), bytes)
            .map_err(|e| OsdError::Config(format!("write osd.json: {e}")))?;
    }
    tracing::info!(osd = %id, listen = %config.listen, "OSD booted");

    let first = fetch_map(&mon).await?;
    let (map_tx, map_rx) = watch::channel(Arc::new(first));
    let (want_tx, want_rx) = watch::channel(0u64);
    tokio::spawn(follow_map(mon.clone(), map_tx, want_rx, shutdown.clone()));
    tokio::spawn(heartbeat(
        mon.clone(),
        config.clone(),
        id,
        want_tx.clone(),
        shutdown.clone(),
    ));

    let service = Arc::new(OsdService::new(
        id,
        store.clone(),
        map_rx,
        want_tx,
        config.recovery,
    ));
    let recovery = tokio::spawn(service.clone().run_recovery(shutdown.clone()));
    let relocator = tokio::spawn(relocate_scattered(store.clone(), shutdown.clone()));
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| OsdError::Listen {
            addr: config.listen,
            source,
        })?;
    if let Some(local) = local {
        let _ = local.send((
            config.listen,
            Arc::new(LocalService {
                service: Arc::downgrade(&service),
                stopping: shutdown.clone(),
            }),
        ));
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_connection(service.clone(), stream, peer, shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    let _ = recovery.await;
    let _ = relocator.await;
    // Requests already running (from sockets or an in-process gateway)
    // finish first, so the store can be closed (a journal checkpoint; the
    // next open has nothing to replay). Bounded: a stuck request must not
    // keep the daemon from stopping.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while Arc::strong_count(&service) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(service);
    match Arc::try_unwrap(store) {
        Ok(store) => store.close().await,
        Err(_) => tracing::warn!(
            "requests still running at shutdown: store left unclosed (the next start recovers it)"
        ),
    }
    Ok(())
}

/// Writes the ranges large reads found scattered into one run each
/// (`ObjectStore::relocate_scattered`), as reads queue them, at most
/// `StoreConfig::relocate_bytes_per_sec` on average.
async fn relocate_scattered(store: Arc<ObjectStore<UringDevice>>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = store.scattered_ready() => {}
        }
        // A few ranges at a time (`relocate_next`), so that shutdown does
        // not wait for the queue (or for a range whose object a stuck
        // request holds).
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = store.relocate_next() => next,
            };
            match next {
                None => break,
                Some(Ok(0)) => {}
                Some(Ok(blocks)) => {
                    tracing::debug!(blocks, "relocated scattered blocks into a run");
                    let rate = store.relocate_bytes_per_sec().max(1) as f64;
                    let pause =
                        Duration::from_secs_f64((blocks * BLOCK_BYTES as u64) as f64 / rate);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                Some(Err(e)) => tracing::warn!("relocating scattered blocks: {e}"),
            }
        }
    }
}

async fn boot(mon: &MonClient, config: &OsdConfig, id: Option<u32>) -> Result<OsdId, OsdError> {
    let request = pb::OsdBootRequest {
        osd_id: id.unwrap_or(0),
        new_osd: id.is_none(),
        host: config.host.clone(),
        zone: config.zone.clone(),
        addr: config.listen.to_string(),
        weight: config.weight,
        capacity_bytes: config.size_bytes,
    };
    let reply = mon
        .call(|mut c| {
            let request = request.clone();
            async move { c.osd_boot(request).await }
        })
        .await?;
    Ok(OsdId(reply.osd_id))
}

async fn fetch_map(mon: &MonClient) -> Result<ClusterMap, OsdError> {
    let reply = mon
        .call(|mut c| async move { c.get_map(pb::GetMapRequest { epoch: 0 }).await })
        .await?;
    serde_json::from_slice(&reply.map_json).map_err(|e| OsdError::Config(format!("bad map: {e}")))
}

/// Keeps the local map current: polls every second, and at once when a
/// request or heartbeat reveals a newer epoch.
async fn follow_map(
    mon: Arc<MonClient>,
    map: watch::Sender<Arc<ClusterMap>>,
    mut wanted: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wanted.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        match fetch_map(&mon).await {
            Ok(fresh) => {
                map.send_if_modified(|current| {
                    let newer = fresh.epoch > current.epoch;
                    if newer {
                        tracing::debug!(epoch = fresh.epoch.0, "new map");
                        *current = Arc::new(fresh);
                    }
                    newer
                });
            }
            Err(e) => tracing::warn!("failed to fetch the map: {e}"),
        }
    }
}

async fn heartbeat(
    mon: Arc<MonClient>,
    config: OsdConfig,
    id: OsdId,
    want_epoch: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    let mut interval =
        tokio::time::interval(Duration::from_millis(config.heartbeat_interval_ms.max(100)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let result = mon
            .call(|mut c| async move {
                c.heartbeat(pb::HeartbeatRequest {
                    osd_id: id.0,
                    epoch: 0,
                })
                .await
            })
            .await;
        match result {
            Ok(reply) => {
                want_epoch.send_if_modified(|wanted| {
                    let newer = reply.epoch > *wanted;
                    if newer {
                        *wanted = reply.epoch;
                    }
                    newer
                });
            }
            Err(e) if e.code() == tonic::Code::NotFound => {
                tracing::warn!("monitors do not know {id}; booting again");
                let _ = boot(&mon, &config, Some(id.0)).await;
            }
            Err(e) => tracing::warn!("heartbeat failed: {e}"),
        }
    }
}

/// Serves one data-plane connection: requests are handled concurrently and
/// answered as they complete. A malformed frame closes this connection only.
async fn serve_connection(
    service: Arc<OsdService>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let (read_half, mut write_half) = stream.into_split();
    let mut frames = FramedRead::new(read_half, FrameCodec::default());
    let (replies, mut outgoing) = mpsc::channel::<Frame>(IN_FLIGHT_PER_CONNECTION);
    let writer = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if basalt_client::connection::send_batch(&mut write_half, &mut outgoing, frame)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let slots = Arc::new(Semaphore::new(IN_FLIGHT_PER_CONNECTION));
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = frames.next() => next,
        };
        match next {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(%peer, "closing data connection after protocol error: {e}");
                break;
            }
            Some(Ok(frame)) if frame.is_reply() => {
                tracing::warn!(%peer, "closing data connection: a reply arrived as a request");
                break;
            }
            Some(Ok(frame)) => {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let (service, replies) = (service.clone(), replies.clone());
                tokio::spawn(async move {
                    let answer = service.handle(frame).await;
                    let _ = replies.send(answer).await;
                    drop(permit);
                });
            }
        }
    }
    drop(replies);
    let _ = writer.await;
}
