//! `BlockClient` and `Volume`: block I/O on volumes, routed to PG primaries.
//!
//! A volume offset lives in object `offset / object_size`; the object's PG
//! comes from the map, the PG's primary from the placement, and the op goes
//! to that OSD with the client's map epoch. A reply saying the epoch is stale
//! or the OSD is not the primary makes the client fetch the map and resend;
//! a lost connection, a timeout or a busy/degraded PG is retried with
//! backoff until `retry_for` runs out. Writes are idempotent (the same bytes
//! to the same place), so resending after an unknown outcome is safe.
//! Requests may be issued concurrently: each object piece is its own request
//! on a shared, pipelined connection.
//!
//! # Durability
//! A change is `Durability::Durable` (acknowledged once every copy would
//! survive power loss) or `Durability::Buffered` (acknowledged once every
//! copy applied it; NBD's write without FUA). The client remembers every OSD
//! of the acting sets it sent buffered changes to; `flush` sends `Flush` to
//! each of them, so when it returns every change acknowledged before it was
//! called is durable on every copy. Flushes run one at a time: a flush that
//! found nothing new to do still waits for the one in progress.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use basalt_monitor::MonClient;
use basalt_placement::{ActingCache, ClusterMap, ObjectId, OsdId, VolumeId};
use basalt_proto::monitor as pb;
pub use basalt_wire::Durability;
use basalt_wire::op::{OP_ALLOCATE, OP_BUFFERED};
use basalt_wire::{Frame, Kind, ObjectRef, OpHeader, Status};
use bytes::{Bytes, BytesMut};
use futures::future::{join_all, try_join_all};

use crate::connection::ConnectionPool;
use crate::error::ClientError;

const BLOCK: u64 = 4096;
/// Largest read or write sent as one op: well inside the wire's payload
/// bound (8 MiB and an op header), whatever the object size.
const DATA_PIECE_MAX: u64 = 4 << 20;

/// Settings of a block client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Deadline of one request to one OSD. Default 10 s.
    pub request_timeout: Duration,
    /// How long one operation keeps retrying. Default 60 s.
    pub retry_for: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(60),
        }
    }
}

/// A connection to a cluster: monitors for the map, OSDs for data.
pub struct BlockClient {
    mon: MonClient,
    map: RwLock<Arc<ClusterMap>>,
    /// Acting sets at the map's epoch (one per op otherwise).
    acting: ActingCache,
    pool: ConnectionPool,
    config: ClientConfig,
    /// OSDs holding buffered changes of ours not flushed yet.
    dirty: Mutex<BTreeSet<OsdId>>,
    /// One flush at a time.
    flushing: tokio::sync::Mutex<()>,
}

/// An open volume.
#[derive(Clone)]
pub struct Volume {
    client: Arc<BlockClient>,
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub object_size_bytes: u64,
}

enum Op {
    Read,
    Write(Bytes, Durability),
    Zeroes {
        allocate: bool,
        durability: Durability,
    },
    Discard(Durability),
}

impl BlockClient {
    /// Connects to the monitors at `mon` and fetches the map.
    pub async fn connect(mon: MonClient, config: ClientConfig) -> Result<Arc<Self>, ClientError> {
        let client = Arc::new(BlockClient {
            mon,
            map: RwLock::new(Arc::new(ClusterMap::new())),
            acting: ActingCache::default(),
            pool: ConnectionPool::default(),
            config,
            dirty: Mutex::new(BTreeSet::new()),
            flushing: tokio::sync::Mutex::new(()),
        });
        client.refresh_map().await?;
        // Follow the map in the background too, so routing rarely needs a
        // stale-epoch round trip to learn of a change.
        let weak = Arc::downgrade(&client);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(client) = weak.upgrade() else { return };
                if let Err(e) = client.refresh_map().await {
                    tracing::debug!("map refresh failed: {e}");
                }
            }
        });
        Ok(client)
    }

    /// Sends requests for the OSD at `addr` to `osd` in this process instead
    /// of over TCP (a node daemon's gateway and its own OSD). Returns false
    /// if a local OSD was set already.
    pub fn set_local_osd(&self, addr: SocketAddr, osd: Arc<dyn crate::LocalOsd>) -> bool {
        self.pool.set_local(addr, osd)
    }

    /// Returns the map the client routes with.
    pub fn map(&self) -> Arc<ClusterMap> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fetches the current map from the monitors (kept only if newer).
    pub async fn refresh_map(&self) -> Result<Arc<ClusterMap>, ClientError> {
        let reply = self
            .mon
            .call(|mut c| async move { c.get_map(pb::GetMapRequest { epoch: 0 }).await })
            .await?;
        let map: ClusterMap =
            serde_json::from_slice(&reply.map_json).map_err(|e| ClientError::Map(e.to_string()))?;
        let mut current = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.epoch >= current.epoch {
            *current = Arc::new(map);
        }
        Ok(current.clone())
    }

    /// Opens volume `name` of `pool` ("" for the default pool).
    pub async fn open(self: &Arc<Self>, pool: &str, name: &str) -> Result<Volume, ClientError> {
        let map = self.refresh_map().await?;
        let pool_name = if pool.is_empty() { "rbd" } else { pool };
        let pool_id = map
            .pool_by_name(pool_name)
            .ok_or_else(|| ClientError::Map(format!("pool {pool_name:?} not found")))?;
        let (id, volume) = map
            .volumes
            .iter()
            .find(|(_, v)| v.pool == pool_id && v.name == name)
            .ok_or_else(|| ClientError::VolumeNotFound(name.to_string()))?;
        Ok(Volume {
            client: self.clone(),
            id: *id,
            name: name.to_string(),
            size_bytes: volume.size_bytes,
            object_size_bytes: volume.object_size_bytes,
        })
    }

    /// Sends one op on one object piece, following the map until it lands.
    async fn object_op(
        &self,
        volume: VolumeId,
        object_index: u64,
        offset: u64,
        length: u64,
        op: &Op,
    ) -> Result<Bytes, ClientError> {
        let mut retry = Retry::new();
        let (kind, data, flags): (Kind, Bytes, u32) = match op {
            Op::Read => (Kind::Read, Bytes::new(), 0),
            Op::Write(data, durability) => (Kind::Write, data.clone(), durability.op_flags()),
            Op::Zeroes {
                allocate,
                durability,
            } => (
                Kind::WriteZeroes,
                Bytes::new(),
                durability.op_flags() | if *allocate { OP_ALLOCATE } else { 0 },
            ),
            Op::Discard(durability) => (Kind::Discard, Bytes::new(), durability.op_flags()),
        };
        loop {
            let map = self.map();
            let outcome = self
                .try_object_op(
                    &map,
                    volume,
                    object_index,
                    offset,
                    length,
                    kind,
                    data.clone(),
                    flags,
                )
                .await;
            let last = match outcome {
                Ok(Ok(bytes)) => return Ok(bytes),
                Ok(Err((status, message))) => {
                    match status {
                        Status::Invalid => return Err(ClientError::Invalid(message)),
                        Status::NoSpace => return Err(ClientError::NoSpace),
                        Status::StaleEpoch | Status::NotPrimary => {
                            let _ = self.refresh_map().await;
                        }
                        _ => {}
                    }
                    format!("{status:?}: {message}")
                }
                Err(e) => {
                    if let ClientError::Map(_) = e
                        && let Ok(map) = self.refresh_map().await
                        && !map.volumes.contains_key(&volume)
                    {
                        // It was open, so it existed at an earlier epoch:
                        // deleted since. No retry brings it back.
                        return Err(ClientError::VolumeDeleted(volume));
                    }
                    e.to_string()
                }
            };
            retry.pause(self, "object op", last).await?;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn try_object_op(
        &self,
        map: &ClusterMap,
        volume: VolumeId,
        object_index: u64,
        offset: u64,
        length: u64,
        kind: Kind,
        data: Bytes,
        flags: u32,
    ) -> Result<Result<Bytes, (Status, String)>, ClientError> {
        let pg = map
            .pg_of_object(volume, object_index)
            .map_err(|e| ClientError::Map(e.to_string()))?;
        let header = OpHeader {
            object: ObjectRef {
                pg,
                object: ObjectId {
                    volume,
                    index: object_index,
                },
            },
            offset,
            length: length as u32,
            version: 0,
            flags,
        };
        let (_, reply) = self.send_to_primary(map, header, kind, data).await?;
        match Status::from_u32(reply.status) {
            Status::Ok => Ok(Ok(reply.payload)),
            status => Ok(Err((
                status,
                String::from_utf8_lossy(&reply.payload).into_owned(),
            ))),
        }
    }
}

impl BlockClient {
    /// Returns how many objects `pg`'s primary holds for it and where its
    /// peering stands there (`active`, `peering`, `recovering N/M`,
    /// `incomplete: why`).
    pub async fn pg_stat(&self, pg: basalt_placement::PgId) -> Result<(u64, String), ClientError> {
        let map = self.map();
        let header = OpHeader::for_pg(pg, 0);
        let (primary, reply) = self
            .send_to_primary(&map, header, Kind::PgStat, Bytes::new())
            .await?;
        if reply.status != Status::Ok as u32 || reply.payload.len() < 8 {
            return Err(ClientError::Map(format!(
                "{primary} could not count {pg}: {:?}",
                Status::from_u32(reply.status)
            )));
        }
        let mut count = [0u8; 8];
        count.copy_from_slice(&reply.payload[..8]);
        let phase = String::from_utf8_lossy(&reply.payload[8..]).into_owned();
        Ok((u64::from_le_bytes(count), phase))
    }
}

impl BlockClient {
    /// Asks `pg`'s primary to scrub it (`deep`: read and verify every
    /// block) and repair what differs; returns the report as JSON.
    pub async fn scrub_pg(
        &self,
        pg: basalt_placement::PgId,
        deep: bool,
    ) -> Result<serde_json::Value, ClientError> {
        let map = self.map();
        let header = OpHeader::for_pg(pg, if deep { basalt_wire::op::OP_DEEP } else { 0 });
        let (primary, reply) = self
            .send_to_primary(&map, header, Kind::PgScrub, Bytes::new())
            .await?;
        if reply.status != Status::Ok as u32 {
            return Err(ClientError::Map(format!(
                "{primary} could not scrub {pg}: {:?}: {}",
                Status::from_u32(reply.status),
                String::from_utf8_lossy(&reply.payload)
            )));
        }
        serde_json::from_slice(&reply.payload)
            .map_err(|e| ClientError::Map(format!("scrub report of {pg}: {e}")))
    }
}

impl BlockClient {
    /// Sends one op to the primary of `header`'s PG at `map`'s epoch and
    /// returns the primary and its reply. A connection that failed is dropped
    /// from the pool.
    async fn send_to_primary(
        &self,
        map: &ClusterMap,
        header: OpHeader,
        kind: Kind,
        data: Bytes,
    ) -> Result<(basalt_placement::OsdId, Frame), ClientError> {
        let pg = header.object.pg;
        let acting = self
            .acting
            .acting_set(map, pg)
            .map_err(|e| ClientError::Map(e.to_string()))?;
        let primary = acting
            .primary()
            .ok_or_else(|| ClientError::Map(format!("{pg} has no primary")))?;
        if header.flags & OP_BUFFERED != 0 {
            // Before sending: once the change is acknowledged, a flush must
            // know every copy it went to.
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(acting.members.iter().copied());
        }
        let addr: SocketAddr = map
            .osds
            .get(&primary)
            .and_then(|o| o.addr.as_deref())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| ClientError::Map(format!("{primary} has no address")))?;
        let frame = Frame {
            kind,
            flags: 0,
            request_id: 0,
            epoch: map.epoch.0,
            status: 0,
            // The op header alone; the data goes as the frame's tail (sent
            // or handed over without a copy).
            payload: header.encode_with(&[]),
            tail: data,
            data_crcs: None,
        };
        let reply = self
            .pool
            .call(addr, frame, self.config.request_timeout)
            .await?;
        Ok((primary, reply))
    }
}

/// Splits `[offset, offset + length)` at object boundaries and into pieces
/// of at most `max` bytes: (object index, offset in object, length, offset
/// in the request).
fn split_range(object_size: u64, offset: u64, length: u64, max: u64) -> Vec<(u64, u64, u64, u64)> {
    let mut pieces = Vec::new();
    let mut position = offset;
    while position < offset + length {
        let index = position / object_size;
        let within = position % object_size;
        let take = (object_size - within)
            .min(offset + length - position)
            .min(max);
        pieces.push((index, within, take, position - offset));
        position += take;
    }
    pieces
}

/// Pacing of an operation retried until `ClientConfig::retry_for` runs out:
/// backoff from 20 ms doubling to 500 ms, a map refresh every fourth attempt.
struct Retry {
    started: Instant,
    attempts: u32,
    backoff: Duration,
}

impl Retry {
    fn new() -> Retry {
        Retry {
            started: Instant::now(),
            attempts: 0,
            backoff: Duration::from_millis(20),
        }
    }

    /// After a failed attempt (`last` says why): gives up once `retry_for`
    /// has passed, otherwise waits before the next attempt.
    async fn pause(
        &mut self,
        client: &BlockClient,
        what: &str,
        last: String,
    ) -> Result<(), ClientError> {
        self.attempts += 1;
        if self.started.elapsed() > client.config.retry_for {
            return Err(ClientError::GaveUp {
                attempts: self.attempts,
                seconds: self.started.elapsed().as_secs_f64(),
                last,
            });
        }
        tracing::debug!(attempts = self.attempts, "retrying {what}: {last}");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(500));
        if self.attempts.is_multiple_of(4) {
            let _ = client.refresh_map().await;
        }
        Ok(())
    }
}

impl BlockClient {
    /// Makes every buffered change this client had acknowledged before the
    /// call durable on every copy. With `everywhere`, flushes every up OSD of
    /// the map instead of only those this client made dirty: for a caller
    /// that continues writes made through another client (a reconnected NBD
    /// client, a restarted gateway).
    pub async fn flush(&self, everywhere: bool) -> Result<(), ClientError> {
        let _one_at_a_time = self.flushing.lock().await;
        let mut targets =
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        if everywhere {
            targets.extend(
                self.map()
                    .osds
                    .iter()
                    .filter(|(_, o)| o.up)
                    .map(|(id, _)| *id),
            );
        }
        let results = join_all(targets.iter().map(|osd| self.flush_osd(*osd))).await;
        let mut failed = Vec::new();
        let mut first_error = None;
        for (osd, result) in targets.iter().zip(results) {
            if let Err(e) = result {
                failed.push(*osd);
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => {
                // Still dirty: the next flush tries them again.
                self.dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(failed);
                Err(e)
            }
        }
    }

    /// Flushes one OSD, retrying until it answers or the map says it is down
    /// (then its copies are flushed with the other members; if it comes
    /// back, its store syncs at open).
    async fn flush_osd(&self, osd: OsdId) -> Result<(), ClientError> {
        let mut retry = Retry::new();
        loop {
            let map = self.map();
            let Some(entry) = map.osds.get(&osd).filter(|o| o.up) else {
                return Ok(());
            };
            let addr: Option<SocketAddr> = entry.addr.as_deref().and_then(|a| a.parse().ok());
            let last = match addr {
                None => format!("{osd} has no address"),
                Some(addr) => {
                    let frame = Frame {
                        kind: Kind::Flush,
                        flags: 0,
                        request_id: 0,
                        epoch: map.epoch.0,
                        status: 0,
                        payload: Bytes::new(),
                        tail: Bytes::new(),
                        data_crcs: None,
                    };
                    match self
                        .pool
                        .call(addr, frame, self.config.request_timeout)
                        .await
                    {
                        Ok(reply) if reply.status == Status::Ok as u32 => return Ok(()),
                        Ok(reply) => format!(
                            "{osd} answered {:?}: {}",
                            Status::from_u32(reply.status),
                            String::from_utf8_lossy(&reply.payload)
                        ),
                        Err(e) => e.to_string(),
                    }
                }
            };
            retry
                .pause(self, "flush", format!("flush of {osd}: {last}"))
                .await?;
        }
    }
}

impl Volume {
    fn check(&self, offset: u64, length: u64) -> Result<(), ClientError> {
        if !offset.is_multiple_of(BLOCK) || !length.is_multiple_of(BLOCK) {
            return Err(ClientError::Invalid(format!(
                "range {offset}+{length} is not 4 KiB-aligned"
            )));
        }
        if offset
            .checked_add(length)
            .is_none_or(|end| end > self.size_bytes)
        {
            return Err(ClientError::Invalid(format!(
                "range {offset}+{length} is past the end of volume {} ({} bytes)",
                self.name, self.size_bytes
            )));
        }
        Ok(())
    }

    /// Splits `[offset, offset + length)` at object boundaries:
    /// (object index, offset in object, length, offset in the request).
    fn pieces(&self, offset: u64, length: u64) -> Vec<(u64, u64, u64, u64)> {
        split_range(self.object_size_bytes, offset, length, u64::MAX)
    }

    /// `pieces`, each also cut at `DATA_PIECE_MAX`, for ops that carry data
    /// (a frame's payload is bounded; objects may be larger than that).
    fn data_pieces(&self, offset: u64, length: u64) -> Vec<(u64, u64, u64, u64)> {
        split_range(self.object_size_bytes, offset, length, DATA_PIECE_MAX)
    }

    /// Reads `length` bytes at `offset` (4 KiB-aligned). Holes read as zeros.
    pub async fn read(&self, offset: u64, length: u64) -> Result<Bytes, ClientError> {
        self.check(offset, length)?;
        let pieces = self.data_pieces(offset, length);
        let reads = pieces.iter().map(|(index, within, take, _)| {
            self.client
                .object_op(self.id, *index, *within, *take, &Op::Read)
        });
        let parts = try_join_all(reads).await?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().unwrap_or_default());
        }
        let mut out = BytesMut::with_capacity(length as usize);
        for part in parts {
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }

    /// Writes `data` at `offset` (both 4 KiB-aligned); returns once every
    /// copy has it as `durability` says.
    pub async fn write(
        &self,
        offset: u64,
        data: &[u8],
        durability: Durability,
    ) -> Result<(), ClientError> {
        self.write_bytes(offset, Bytes::copy_from_slice(data), durability)
            .await
    }

    /// `write` without copying `data`: each object's piece is a slice of it.
    pub async fn write_bytes(
        &self,
        offset: u64,
        data: Bytes,
        durability: Durability,
    ) -> Result<(), ClientError> {
        self.check(offset, data.len() as u64)?;
        let pieces = self.data_pieces(offset, data.len() as u64);
        let writes = pieces.iter().map(|(index, within, take, at)| {
            let slice = data.slice(*at as usize..(*at + *take) as usize);
            async move {
                self.client
                    .object_op(
                        self.id,
                        *index,
                        *within,
                        *take,
                        &Op::Write(slice, durability),
                    )
                    .await
            }
        });
        try_join_all(writes).await?;
        Ok(())
    }

    /// Makes a range read as zeros; `allocate` keeps it allocated.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        allocate: bool,
        durability: Durability,
    ) -> Result<(), ClientError> {
        self.check(offset, length)?;
        let op = Op::Zeroes {
            allocate,
            durability,
        };
        let pieces = self.pieces(offset, length);
        let ops = pieces.iter().map(|(index, within, take, _)| {
            self.client.object_op(self.id, *index, *within, *take, &op)
        });
        try_join_all(ops).await?;
        Ok(())
    }

    /// Returns the allocation of `[offset, offset + length)` as runs of
    /// `(start, length, allocated)`, covering at least the part of the range
    /// inside the first object it touches (callers ask again for the rest).
    pub async fn allocation(
        &self,
        offset: u64,
        length: u64,
    ) -> Result<Vec<(u64, u64, bool)>, ClientError> {
        if length == 0
            || offset
                .checked_add(length)
                .is_none_or(|end| end > self.size_bytes)
        {
            return Err(ClientError::Invalid(format!(
                "range {offset}+{length} is outside volume {}",
                self.name
            )));
        }
        let index = offset / self.object_size_bytes;
        let object_start = index * self.object_size_bytes;
        let end = (offset + length).min(object_start + self.object_size_bytes);
        let map = self.client.map();
        let pg = map
            .pg_of_object(self.id, index)
            .map_err(|e| ClientError::Map(e.to_string()))?;
        let header = OpHeader {
            object: ObjectRef {
                pg,
                object: ObjectId {
                    volume: self.id,
                    index,
                },
            },
            offset: 0,
            length: 0,
            version: 0,
            flags: 0,
        };
        let (_, reply) = self
            .client
            .send_to_primary(&map, header, Kind::BlockStatus, Bytes::new())
            .await?;
        if reply.status != Status::Ok as u32 {
            return Err(ClientError::Map(format!(
                "block status of object {index}: {:?}",
                Status::from_u32(reply.status)
            )));
        }
        let allocated: std::collections::BTreeSet<u64> = reply
            .payload
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64)
            .collect();
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut position = offset;
        while position < end {
            let block = (position - object_start) / BLOCK;
            let block_end = (object_start + (block + 1) * BLOCK).min(end);
            let is_allocated = allocated.contains(&block);
            match runs.last_mut() {
                Some((_, run_length, run_allocated)) if *run_allocated == is_allocated => {
                    *run_length += block_end - position;
                }
                _ => runs.push((position, block_end - position, is_allocated)),
            }
            position = block_end;
        }
        Ok(runs)
    }

    /// Frees a range (it reads as zeros afterwards).
    pub async fn discard(
        &self,
        offset: u64,
        length: u64,
        durability: Durability,
    ) -> Result<(), ClientError> {
        self.check(offset, length)?;
        let pieces = self.pieces(offset, length);
        let op = Op::Discard(durability);
        let ops = pieces.iter().map(|(index, within, take, _)| {
            self.client.object_op(self.id, *index, *within, *take, &op)
        });
        try_join_all(ops).await?;
        Ok(())
    }

    /// Makes every buffered change acknowledged so far through this volume's
    /// client durable (see `BlockClient::flush`).
    pub async fn flush(&self, everywhere: bool) -> Result<(), ClientError> {
        self.client.flush(everywhere).await
    }
}

#[cfg(test)]
mod tests {
    use super::split_range;

    #[test]
    fn ranges_split_at_objects_and_at_the_piece_bound() {
        const M: u64 = 1 << 20;
        // Within one 4 MiB object: one piece.
        assert_eq!(
            split_range(4 * M, 4096, 8192, u64::MAX),
            vec![(0, 4096, 8192, 0)]
        );
        // Across an object boundary.
        assert_eq!(
            split_range(4 * M, 4 * M - 4096, 8192, u64::MAX),
            vec![(0, 4 * M - 4096, 4096, 0), (1, 0, 4096, 4096)]
        );
        // A 32 MiB write into a 64 MiB object, at most 4 MiB per op.
        let pieces = split_range(64 * M, 8 * M, 32 * M, 4 * M);
        assert_eq!(pieces.len(), 8);
        assert!(
            pieces
                .iter()
                .all(|(index, _, len, _)| *index == 0 && *len == 4 * M)
        );
        let mut expected_at = 0;
        for (_, within, len, at) in &pieces {
            assert_eq!(*at, expected_at);
            assert_eq!(*within, 8 * M + at);
            expected_at += len;
        }
        assert_eq!(expected_at, 32 * M);
    }
}
