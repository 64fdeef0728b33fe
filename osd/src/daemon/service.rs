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
//! Versions come from a per-PG counter that peering (`peering`) sets above
//! every version any member holds, so they grow across primaries and
//! restarts; a primary serves a PG only once it has peered it for the
//! current acting set.

mod peering;
mod scrub;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use basalt_client::ConnectionPool;
use basalt_placement::{ActingCache, ClusterMap, OsdId, PgId};
use basalt_wire::crc::{CRC_BLOCK_BYTES, block_crcs};
use basalt_wire::op::OP_ALLOCATE;
use basalt_wire::{BlockCrcs, Durability, FLAG_REPLY, Frame, Kind, OpHeader, Status};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;

use crate::store::{ObjectKey, ObjectStore, StoreError, UringDevice};
pub use peering::{PgPeering, PgPhase, RecoveryConfig};
pub use scrub::{ScrubMismatch, ScrubReport};

/// Deadline of a replication request to a replica.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of a peering, recovery or scrub request to another OSD.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Object lock stripes on the primary.
const ORDER_STRIPES: usize = 1024;

/// The copies a recovering PG still has to make, by object.
type PendingCopies = HashMap<basalt_placement::ObjectId, crate::recovery::Copy>;

/// The data-plane side of one OSD.
pub struct OsdService {
    pub id: OsdId,
    store: Arc<ObjectStore<UringDevice>>,
    map: watch::Receiver<Arc<ClusterMap>>,
    /// Acting sets at the current map's epoch (one per op otherwise).
    acting: ActingCache,
    /// Asks the map task for a map at least this new.
    want_epoch: watch::Sender<u64>,
    peers: ConnectionPool,
    order: Vec<tokio::sync::Mutex<()>>,
    /// Last version used per PG (set by peering).
    versions: Mutex<HashMap<PgId, u64>>,
    /// Peering state of the PGs this OSD is primary of.
    pgs: Mutex<HashMap<PgId, PgPeering>>,
    /// One peering at a time per PG.
    peer_locks: Mutex<HashMap<PgId, Arc<tokio::sync::Mutex<()>>>>,
    recovery: RecoveryConfig,
    throttle: Mutex<peering::Throttle>,
    /// When this OSD last served a client op as a primary (recovery yields
    /// to client I/O: see `peering`).
    last_client_op: Mutex<Option<std::time::Instant>>,
    /// Background copies run one at a time while clients are active.
    busy_copies: tokio::sync::Semaphore,
    /// Wakes the recovery task (a client op found its PG unsettled).
    recovery_wakeup: tokio::sync::Notify,
    /// Objects each recovering PG still has to copy.
    pending: Mutex<HashMap<PgId, PendingCopies>>,
    /// Up OSDs outside the acting set that reported objects of a PG at its
    /// last peering: told to remove them once the PG is clean.
    strays: Mutex<HashMap<PgId, Vec<OsdId>>>,
}

fn reply(request: &Frame, status: Status, epoch: u64, payload: Bytes) -> Frame {
    Frame {
        kind: request.kind,
        flags: FLAG_REPLY,
        request_id: request.request_id,
        epoch,
        status: status as u32,
        payload,
        tail: Bytes::new(),
        data_crcs: None,
    }
}

fn message(text: impl Into<String>) -> Bytes {
    Bytes::from(text.into())
}

/// The fewest copies `pg`'s pool accepts writes with.
fn pool_min_size(map: &ClusterMap, pg: PgId) -> usize {
    map.pools.get(&pg.pool).map_or(1, |p| p.min_size as usize)
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
        recovery: RecoveryConfig,
    ) -> Self {
        Self {
            id,
            store,
            map,
            acting: ActingCache::default(),
            want_epoch,
            peers: ConnectionPool::default(),
            order: (0..ORDER_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            versions: Mutex::new(HashMap::new()),
            pgs: Mutex::new(HashMap::new()),
            peer_locks: Mutex::new(HashMap::new()),
            recovery,
            throttle: Mutex::new(peering::Throttle::default()),
            last_client_op: Mutex::new(None),
            busy_copies: tokio::sync::Semaphore::new(1),
            recovery_wakeup: tokio::sync::Notify::new(),
            pending: Mutex::new(HashMap::new()),
            strays: Mutex::new(HashMap::new()),
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
        // Peering inserted the counter before the PG served its first write.
        let version = versions.entry(pg).or_insert(0);
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
        if frame.kind == Kind::Flush {
            // Not tied to a PG or an epoch: whatever this store acknowledged
            // becomes durable, whichever map it was written under.
            let epoch = self.map.borrow().epoch.0;
            return match self.store.flush().await {
                Ok(()) => reply(&frame, Status::Ok, epoch, Bytes::new()),
                Err(e) => {
                    tracing::error!("flush failed: {e}");
                    reply(&frame, store_status(&e), epoch, message(e.to_string()))
                }
            };
        }
        let (header, data) = match frame.op() {
            Ok(parts) => parts,
            Err(e) => {
                let epoch = self.map.borrow().epoch.0;
                return reply(&frame, Status::Invalid, epoch, message(e.to_string()));
            }
        };
        let map = self.map_at_least(frame.epoch).await;
        let epoch = map.epoch.0;
        if matches!(
            frame.kind,
            Kind::PgList | Kind::ObjPull | Kind::ObjPush | Kind::PgRemove | Kind::PgNotify
        ) {
            return self.handle_peering(&frame, &header, data, &map).await;
        }
        if frame.kind == Kind::PgDigest {
            return self.handle_pg_digest(&frame, &header, epoch).await;
        }
        let key = ObjectKey {
            pg: header.object.pg,
            object: header.object.object,
        };
        let acting = match self.acting.acting_set(&map, header.object.pg) {
            Ok(acting) => acting,
            Err(e) => return reply(&frame, Status::StaleEpoch, epoch, message(e.to_string())),
        };
        let replica_op = matches!(
            frame.kind,
            Kind::RepWrite | Kind::RepWriteZeroes | Kind::RepDiscard
        );
        if replica_op {
            // Ops from an older interval are refused: a primary that has not
            // seen the current map may no longer be the primary. It learns
            // the epoch from the reply and the client retries.
            if frame.epoch < epoch {
                return reply(
                    &frame,
                    Status::StaleEpoch,
                    epoch,
                    message(format!(
                        "replication at epoch {} but {} is at {epoch}",
                        frame.epoch, self.id
                    )),
                );
            }
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
            let crcs = frame.data_crcs_of(data.len()).cloned();
            return self
                .apply_local(&frame, &header, &key, data, crcs, epoch)
                .await;
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
        if frame.kind == Kind::PgStat {
            return self.pg_stat(&frame, key.pg, &acting.members, &map);
        }
        // A PG serves no client op until this primary has peered it.
        match self.ensure_active(key.pg, &acting.members, &map).await {
            Ok(()) => {}
            Err(peering::Inactive::NotYet(reason)) => {
                return reply(&frame, Status::Busy, epoch, message(reason));
            }
            // A sender with an older map may be behind a volume's removal,
            // and this OSD, if it waited in vain for the sender's newer map,
            // behind a volume's creation: both retry.
            Err(peering::Inactive::NotInMap(reason)) => {
                let status = if frame.epoch != epoch {
                    Status::StaleEpoch
                } else {
                    Status::Invalid
                };
                return reply(&frame, status, epoch, message(reason));
            }
        }
        let writes = matches!(frame.kind, Kind::Write | Kind::WriteZeroes | Kind::Discard);
        if writes || matches!(frame.kind, Kind::Read | Kind::BlockStatus) {
            *self
                .last_client_op
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
        }
        if frame.kind != Kind::PgScrub
            && let Err(reason) = self
                .recover_if_pending(&key, &map, &acting.members, writes)
                .await
        {
            return reply(&frame, Status::Busy, epoch, message(reason));
        }
        match frame.kind {
            Kind::Read => match self
                .store
                .read_with_crcs(&key, header.offset, header.length as u64)
                .await
            {
                Ok((bytes, crcs)) => {
                    // The store checked every block against its crc: the
                    // reply's crc follows from them, the data is not hashed
                    // again to send it.
                    let mut answer = reply(&frame, Status::Ok, epoch, bytes);
                    answer.data_crcs = Some(crcs.into());
                    answer
                }
                Err(e @ StoreError::Checksum { .. }) => {
                    // Never return bad bytes: serve from a replica's good
                    // copy, repairing ours on the way.
                    tracing::warn!("read of {key} failed its checksum: {e}; repairing");
                    let offset = header.offset;
                    match self
                        .read_repair(&key, offset, header.length as u64, &acting.members, &map)
                        .await
                    {
                        Ok(bytes) => reply(&frame, Status::Ok, epoch, bytes),
                        Err(why) => {
                            tracing::error!("could not repair {key}: {why}");
                            reply(&frame, Status::Checksum, epoch, message(why))
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("read of {key} failed: {e}");
                    reply(&frame, store_status(&e), epoch, message(e.to_string()))
                }
            },
            Kind::PgScrub => {
                let deep = header.flags & basalt_wire::op::OP_DEEP != 0;
                match self.scrub(key.pg, &acting.members, &map, deep).await {
                    Ok(report) => reply(
                        &frame,
                        Status::Ok,
                        epoch,
                        Bytes::from(serde_json::to_vec(&report).unwrap_or_default()),
                    ),
                    Err(why) => reply(&frame, Status::Busy, epoch, message(why)),
                }
            }
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
                let pool_min = pool_min_size(&map, key.pg);
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
                // The PG may have peered again (a newer interval, another
                // plan) while this op waited for the object's lock.
                if !self.is_active(key.pg, &acting.members, &map) {
                    return reply(
                        &frame,
                        Status::Busy,
                        epoch,
                        message(format!("{} peered again; retry", key.pg)),
                    );
                }
                let mut header = header;
                header.version = self.next_version(key.pg);
                // Members recovery has not brought this object to yet are
                // skipped; the pending copy brings them this write.
                let skipped = match self.write_around_pending(
                    &key,
                    header.version,
                    &acting.members,
                    pool_min,
                ) {
                    Ok(skipped) => skipped,
                    Err(reason) => return reply(&frame, Status::Busy, epoch, message(reason)),
                };
                let replica_kind = match frame.kind {
                    Kind::Write => Kind::RepWrite,
                    Kind::WriteZeroes => Kind::RepWriteZeroes,
                    _ => Kind::RepDiscard,
                };
                // The op header alone; the data is the frame's tail, sent to
                // each replica from the buffer it arrived in.
                let payload = header.encode_with(&[]);
                // The data's block crcs, hashed once: on arrival (a decoded
                // frame has them), or here for a frame handed over in
                // process. The store and every replica's frame use them.
                let crcs = match frame.data_crcs_of(data.len()) {
                    Some(crcs) => Some(crcs.clone()),
                    None if frame.kind == Kind::Write
                        && !data.is_empty()
                        && data.len().is_multiple_of(CRC_BLOCK_BYTES) =>
                    {
                        Some(BlockCrcs::from(block_crcs(&data)))
                    }
                    None => None,
                };
                let local =
                    self.apply_local(&frame, &header, &key, data.clone(), crcs.clone(), epoch);
                let remotes = acting.members[1..]
                    .iter()
                    .filter(|osd| !skipped.contains(osd))
                    .map(|osd| {
                        self.call_peer_with(
                            *osd,
                            &map,
                            replica_kind,
                            payload.clone(),
                            data.clone(),
                            crcs.clone(),
                        )
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

    /// Answers `PgStat`: object count (u64), then the peering phase as
    /// text (`active`, `peering`, `recovering N/M`, `backfilling N/M`,
    /// `incomplete: why`).
    fn pg_stat(&self, frame: &Frame, pg: PgId, acting: &[OsdId], map: &ClusterMap) -> Frame {
        let epoch = map.epoch.0;
        let objects = match self.store.list_pg(pg) {
            Ok(objects) => objects.len() as u64,
            Err(e) => return reply(frame, store_status(&e), epoch, message(e.to_string())),
        };
        let phase = if self.is_active(pg, acting, map) {
            match self.pg_phase(pg).map(|p| p.phase) {
                Some(PgPhase::Recovering {
                    to_copy,
                    copied,
                    backfill,
                }) => format!(
                    "{} {copied}/{to_copy}",
                    if backfill {
                        "backfilling"
                    } else {
                        "recovering"
                    }
                ),
                _ => "active".to_string(),
            }
        } else {
            match self.pg_phase(pg) {
                Some(p) if p.acting == acting => match p.phase {
                    PgPhase::Incomplete(why) => format!("incomplete: {why}"),
                    _ => "peering".to_string(),
                },
                _ => "peering".to_string(),
            }
        };
        let mut out = BytesMut::with_capacity(8 + phase.len());
        out.put_u64_le(objects);
        out.extend_from_slice(phase.as_bytes());
        reply(frame, Status::Ok, epoch, out.freeze())
    }

    /// Sends a request to another OSD at `map`'s epoch and returns the
    /// reply payload, or why not. Replication and peering share it: a
    /// connection that failed is forgotten, and a peer at a newer epoch makes
    /// this OSD fetch that map before the client retries.
    async fn call_peer(
        &self,
        osd: OsdId,
        map: &ClusterMap,
        kind: Kind,
        payload: Bytes,
    ) -> Result<Bytes, String> {
        self.call_peer_with(osd, map, kind, payload, Bytes::new(), None)
            .await
    }

    /// `call_peer` with more payload after `payload`, sent without joining
    /// the two (a replicated write's data), with the tail's block crcs when
    /// known (`Frame::data_crcs`).
    async fn call_peer_with(
        &self,
        osd: OsdId,
        map: &ClusterMap,
        kind: Kind,
        payload: Bytes,
        tail: Bytes,
        tail_crcs: Option<BlockCrcs>,
    ) -> Result<Bytes, String> {
        let addr = map
            .osds
            .get(&osd)
            .and_then(|o| o.addr.as_deref())
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or_else(|| format!("{osd} has no address"))?;
        let frame = Frame {
            kind,
            flags: 0,
            request_id: 0,
            epoch: map.epoch.0,
            status: 0,
            payload,
            tail,
            data_crcs: tail_crcs,
        };
        let timeout = if matches!(
            kind,
            Kind::RepWrite | Kind::RepWriteZeroes | Kind::RepDiscard
        ) {
            REPLICA_TIMEOUT
        } else {
            PEER_TIMEOUT
        };
        match self.peers.call(addr, frame, timeout).await {
            Ok(reply) if reply.status == Status::Ok as u32 => Ok(reply.payload),
            Ok(reply) if reply.status == Status::StaleEpoch as u32 => {
                self.want_epoch.send_if_modified(|wanted| {
                    let newer = reply.epoch > *wanted;
                    if newer {
                        *wanted = reply.epoch;
                    }
                    newer
                });
                Err(format!(
                    "{osd} is at a newer epoch: {}",
                    String::from_utf8_lossy(&reply.payload)
                ))
            }
            Ok(reply) => Err(format!(
                "{osd} answered {:?}: {}",
                Status::from_u32(reply.status),
                String::from_utf8_lossy(&reply.payload)
            )),
            Err(e) => Err(format!("{osd}: {e}")),
        }
    }

    /// Applies a write, write-zeroes or discard to this OSD's store; a
    /// write's `crcs` are its data's block crcs when known.
    async fn apply_local(
        &self,
        frame: &Frame,
        header: &OpHeader,
        key: &ObjectKey,
        data: Bytes,
        crcs: Option<BlockCrcs>,
        epoch: u64,
    ) -> Frame {
        if matches!(
            frame.kind,
            Kind::RepWrite | Kind::RepWriteZeroes | Kind::RepDiscard
        ) {
            // A replication that arrives after a newer one to the same
            // object (it was delayed past the primary's timeout, and the
            // client retried) must not roll the object back.
            match self.store.version(key).await {
                Ok(Some(held))
                    if !crate::recovery::replica_should_apply(Some(held), header.version) =>
                {
                    tracing::debug!(%key, held, late = header.version, "ignoring a late replication");
                    return reply(frame, Status::Ok, epoch, Bytes::new());
                }
                Ok(_) => {}
                Err(e) => return reply(frame, store_status(&e), epoch, message(e.to_string())),
            }
        }
        // The op flags travel unchanged from the client through the primary
        // to the replicas: every copy is acknowledged the same way.
        let durability = Durability::from_op_flags(header.flags);
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
                    .write_bytes_with(
                        key,
                        header.offset,
                        &data,
                        crcs.as_deref(),
                        header.version,
                        durability,
                    )
                    .await
            }
            Kind::WriteZeroes | Kind::RepWriteZeroes => {
                self.store
                    .write_zeroes_with(
                        key,
                        header.offset,
                        header.length as u64,
                        header.flags & OP_ALLOCATE != 0,
                        header.version,
                        durability,
                    )
                    .await
            }
            _ => {
                self.store
                    .discard_with(
                        key,
                        header.offset,
                        header.length as u64,
                        header.version,
                        durability,
                    )
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
