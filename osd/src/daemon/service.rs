//! `OsdService`: answers data-plane frames as a PG's primary or replica.
//!
//! Primary-copy replication: a client op goes to the PG's primary, which
//! orders writes per object (one replicated write to an object at a time, so
//! every member applies them in the same order), assigns the PG's next
//! version, writes locally and sends the same write to every replica in
//! parallel, and answers only when every member of the acting set has it
//! durably. Below the pool's min_size writes are refused (`Degraded`) while
//! reads of existing data still work. An OSD that is not the primary at its
//! map epoch answers `StaleEpoch` with that epoch, so the client refreshes.
//!
//! Versions come from an in-memory per-PG counter seeded from the clock at
//! start; the PG log that makes them survive restarts (and peering) belongs
//! to the failure-handling work.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use basalt_client::ConnectionPool;
use basalt_placement::{ClusterMap, OsdId, PgId, Placer};
use basalt_wire::op::OP_ALLOCATE;
use basalt_wire::{FLAG_REPLY, Frame, Kind, OpHeader, Status};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;

use crate::store::{ObjectKey, ObjectStore, StoreError, UringDevice};

/// Deadline of a replication request to a replica.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(5);
/// Object lock stripes on the primary.
const ORDER_STRIPES: usize = 1024;

/// The data-plane side of one OSD.
pub struct OsdService {
    pub id: OsdId,
    store: Arc<ObjectStore<UringDevice>>,
    map: watch::Receiver<Arc<ClusterMap>>,
    /// Asks the map task for a map at least this new.
    want_epoch: watch::Sender<u64>,
    peers: ConnectionPool,
    order: Vec<tokio::sync::Mutex<()>>,
    versions: Mutex<HashMap<PgId, u64>>,
    version_base: u64,
}

fn reply(request: &Frame, status: Status, epoch: u64, payload: Bytes) -> Frame {
    Frame {
        kind: request.kind,
        flags: FLAG_REPLY,
        request_id: request.request_id,
        epoch,
        status: status as u32,
        payload,
    }
}

fn message(text: impl Into<String>) -> Bytes {
    Bytes::from(text.into())
}

fn store_status(error: &StoreError) -> Status {
    match error {
        StoreError::InvalidAlignment { .. } | StoreError::InvalidRange { .. } => Status::Invalid,
        StoreError::NoSpace { .. } => Status::NoSpace,
        StoreError::Checksum { .. } => Status::Checksum,
        _ => Status::Io,
    }
}

impl OsdService {
    pub fn new(
        id: OsdId,
        store: Arc<ObjectStore<UringDevice>>,
        map: watch::Receiver<Arc<ClusterMap>>,
        want_epoch: watch::Sender<u64>,
    ) -> Self {
        // Versions only need to grow within a PG: seed them above anything
        // this OSD handed out before a restart.
        let version_base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
            << 8;
        Self {
            id,
            store,
            map,
            want_epoch,
            peers: ConnectionPool::default(),
            order: (0..ORDER_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            versions: Mutex::new(HashMap::new()),
            version_base,
        }
    }

    /// Returns a map at least as new as `epoch`, waiting up to 2 s for it.
    async fn map_at_least(&self, epoch: u64) -> Arc<ClusterMap> {
        let mut map = self.map.clone();
        if map.borrow().epoch.0 >= epoch {
            return map.borrow().clone();
        }
        self.want_epoch.send_if_modified(|wanted| {
            let newer = epoch > *wanted;
            if newer {
                *wanted = epoch;
            }
            newer
        });
        let waited =
            tokio::time::timeout(Duration::from_secs(2), map.wait_for(|m| m.epoch.0 >= epoch))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|current| current.clone());
        waited.unwrap_or_else(|| self.map.borrow().clone())
    }

    fn next_version(&self, pg: PgId) -> u64 {
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        let version = versions.entry(pg).or_insert(self.version_base);
        *version += 1;
        *version
    }

    fn stripe(&self, key: &ObjectKey) -> usize {
        crate::store::keys::stripe_of(key, ORDER_STRIPES)
    }

    /// Answers one request frame.
    pub async fn handle(&self, frame: Frame) -> Frame {
        if frame.kind == Kind::Ping {
            let epoch = self.map.borrow().epoch.0;
            return reply(&frame, Status::Ok, epoch, Bytes::new());
        }
        let (header, data) = match OpHeader::decode(frame.payload.clone()) {
            Ok(parts) => parts,
            Err(e) => {
                let epoch = self.map.borrow().epoch.0;
                return reply(&frame, Status::Invalid, epoch, message(e.to_string()));
            }
        };
        let map = self.map_at_least(frame.epoch).await;
        let epoch = map.epoch.0;
        let key = ObjectKey {
            pg: header.object.pg,
            object: header.object.object,
        };
        let acting = match Placer::new(&map).acting_set(header.object.pg) {
            Ok(acting) => acting,
            Err(e) => return reply(&frame, Status::StaleEpoch, epoch, message(e.to_string())),
        };
        let replica_op = matches!(
            frame.kind,
            Kind::RepWrite | Kind::RepWriteZeroes | Kind::RepDiscard
        );
        if replica_op {
            if !acting.members.contains(&self.id) {
                return reply(
                    &frame,
                    Status::StaleEpoch,
                    epoch,
                    message(format!(
                        "{} is not in the acting set of {}",
                        self.id, key.pg
                    )),
                );
            }
            return self.apply_local(&frame, &header, &key, data, epoch).await;
        }
        if acting.primary() != Some(self.id) {
            return reply(
                &frame,
                Status::StaleEpoch,
                epoch,
                message(format!(
                    "{} is not the primary of {} at epoch {epoch}",
                    self.id, key.pg
                )),
            );
        }
        match frame.kind {
            Kind::Read => match self
                .store
                .read(&key, header.offset, header.length as u64)
                .await
            {
                Ok(bytes) => reply(&frame, Status::Ok, epoch, bytes),
                Err(e) => {
                    tracing::warn!("read of {key} failed: {e}");
                    reply(&frame, store_status(&e), epoch, message(e.to_string()))
                }
            },
            Kind::PgStat => match self.store.list_pg(key.pg) {
                Ok(objects) => {
                    let mut out = BytesMut::with_capacity(8);
                    out.put_u64_le(objects.len() as u64);
                    reply(&frame, Status::Ok, epoch, out.freeze())
                }
                Err(e) => reply(&frame, store_status(&e), epoch, message(e.to_string())),
            },
            Kind::BlockStatus => match self.store.allocated_blocks(&key).await {
                Ok(blocks) => {
                    let mut out = BytesMut::with_capacity(blocks.len() * 4);
                    for block in blocks {
                        out.put_u32_le(block);
                    }
                    reply(&frame, Status::Ok, epoch, out.freeze())
                }
                Err(e) => reply(&frame, store_status(&e), epoch, message(e.to_string())),
            },
            Kind::Write | Kind::WriteZeroes | Kind::Discard => {
                let pool_min = map
                    .pools
                    .get(&key.pg.pool)
                    .map_or(1, |p| p.min_size as usize);
                if acting.members.len() < pool_min {
                    return reply(
                        &frame,
                        Status::Degraded,
                        epoch,
                        message(format!(
                            "{} has {} of min_size {pool_min} copies available",
                            key.pg,
                            acting.members.len()
                        )),
                    );
                }
                let _order = self.order[self.stripe(&key)].lock().await;
                let mut header = header;
                header.version = self.next_version(key.pg);
                let replica_kind = match frame.kind {
                    Kind::Write => Kind::RepWrite,
                    Kind::WriteZeroes => Kind::RepWriteZeroes,
                    _ => Kind::RepDiscard,
                };
                let payload = header.encode_with(&data);
                let local = self.apply_local(&frame, &header, &key, data.clone(), epoch);
                let remotes = acting.members[1..].iter().map(|osd| {
                    let payload = payload.clone();
                    let addr = map
                        .osds
                        .get(osd)
                        .and_then(|o| o.addr.as_deref())
                        .and_then(|a| a.parse::<SocketAddr>().ok());
                    self.replicate(*osd, addr, replica_kind, epoch, payload)
                });
                let (local, remotes) = tokio::join!(local, futures::future::join_all(remotes));
                if local.status != Status::Ok as u32 {
                    return local;
                }
                if let Some(failure) = remotes.into_iter().find_map(Result::err) {
                    return reply(&frame, Status::Busy, epoch, message(failure));
                }
                reply(&frame, Status::Ok, epoch, Bytes::new())
            }
            _ => reply(
                &frame,
                Status::Invalid,
                epoch,
                message(format!("{:?} is not a client op", frame.kind)),
            ),
        }
    }

    async fn replicate(
        &self,
        osd: OsdId,
        addr: Option<SocketAddr>,
        kind: Kind,
        epoch: u64,
        payload: Bytes,
    ) -> Result<(), String> {
        let addr = addr.ok_or_else(|| format!("{osd} has no address"))?;
        let frame = Frame {
            kind,
            flags: 0,
            request_id: 0,
            epoch,
            status: 0,
            payload,
        };
        let connection = self
            .peers
            .get(addr)
            .await
            .map_err(|e| format!("replica {osd}: {e}"))?;
        match connection.call(frame, REPLICA_TIMEOUT).await {
            Ok(reply) if reply.status == Status::Ok as u32 => Ok(()),
            Ok(reply) => Err(format!(
                "replica {osd} answered {:?}: {}",
                Status::from_u32(reply.status),
                String::from_utf8_lossy(&reply.payload)
            )),
            Err(e) => {
                self.peers.forget(addr).await;
                Err(format!("replica {osd}: {e}"))
            }
        }
    }

    async fn apply_local(
        &self,
        frame: &Frame,
        header: &OpHeader,
        key: &ObjectKey,
        data: Bytes,
        epoch: u64,
    ) -> Frame {
        let result = match frame.kind {
            Kind::Write | Kind::RepWrite => {
                if data.len() != header.length as usize {
                    return reply(
                        frame,
                        Status::Invalid,
                        epoch,
                        message(format!(
                            "write carries {} bytes but says {}",
                            data.len(),
                            header.length
                        )),
                    );
                }
                self.store
                    .write(key, header.offset, &data, header.version)
                    .await
            }
            Kind::WriteZeroes | Kind::RepWriteZeroes => {
                self.store
                    .write_zeroes(
                        key,
                        header.offset,
                        header.length as u64,
                        header.flags & OP_ALLOCATE != 0,
                        header.version,
                    )
                    .await
            }
            _ => {
                self.store
                    .discard(key, header.offset, header.length as u64, header.version)
                    .await
            }
        };
        match result {
            Ok(()) => reply(frame, Status::Ok, epoch, Bytes::new()),
            Err(e) => {
                if !e.is_request_error() {
                    tracing::error!("failed to apply {:?} to {key}: {e}", frame.kind);
                }
                reply(frame, store_status(&e), epoch, message(e.to_string()))
            }
        }
    }
}
