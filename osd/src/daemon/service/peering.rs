//! Peering and recovery as a PG's primary, carried out over the data plane.
//!
//! Before a primary serves a PG whose acting set it has not settled (after
//! every map change that touches the PG, and after its own start), it
//! gathers the inventories (`PgList`) of every member and every other up
//! OSD, plans with [`RecoveryPlan`], raises its version counter above
//! everything seen and serves I/O; meanwhile it copies each stale or
//! missing object from an OSD that holds the newest version (`ObjPull`) to
//! every member that lacks it (`ObjPush`, or locally). Client ops that
//! arrive before the plan wait a little and are then answered `Busy`, which
//! the client retries. A write to an object not copied yet skips the
//! members that lack it when the rest make `min_size` (asynchronous
//! recovery, as Ceph's), else copies it first.
//!
//! Every acknowledged write is on at least `min_size` OSDs (all members of
//! its interval, or the holders a write around a pending copy reached), so
//! while one of them is up, asking every up OSD finds it.
//!
//! Recovery runs `recovery_max_active` PGs at a time and at most
//! `recovery_bytes_per_sec_max` bytes per second (copies pause to keep to
//! it), below client I/O: while this OSD served a client op in the last
//! `CLIENT_ACTIVE_WINDOW`, background copies run one at a time and at
//! `recovery_bytes_per_sec_busy` (the idea of Ceph's recovery sleep and
//! mClock's client reservation: a busy disk goes to clients first). A copy a
//! client op waits for is never held back. Once a PG's copies are done, the
//! up OSDs outside the acting set that reported objects of it at peering
//! (strays: a stand-in after the OSD it replaced returned, a former member)
//! are told to remove them (`PgRemove`), and only then is the PG clean. A
//! stray that came back after its PG peered announces itself at every new
//! map (`PgNotify`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_placement::{ClusterMap, HostId, ObjectId, OsdId, PgId, Placer, PoolId, VolumeId};
use basalt_wire::op::{OP_REPAIR, ObjectContents};
use basalt_wire::{Frame, Kind, OpHeader, Status};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;

use super::{OsdService, message, reply, store_status};
use crate::recovery::{Inventory, RecoveryPlan, next_version_after};
use crate::store::ObjectKey;

/// How long a client op waits for its PG to finish peering before `Busy`.
const CLIENT_WAIT_FOR_PEERING: Duration = Duration::from_secs(3);
/// PGs peered at once (inventories and planning; no data moves).
const PEERING_CONCURRENCY: usize = 16;
/// A client op this recent makes background recovery yield.
const CLIENT_ACTIVE_WINDOW: Duration = Duration::from_millis(500);

/// Recovery limits.
#[derive(Clone, Copy, Debug)]
pub struct RecoveryConfig {
    /// PGs peered and recovered at once. Default 2.
    pub recovery_max_active: usize,
    /// Object copies in flight within one PG. Default 4.
    pub recovery_copies_in_flight: usize,
    /// Recovery bandwidth ceiling, bytes per second. Default 256 MiB/s.
    pub recovery_bytes_per_sec_max: u64,
    /// The ceiling while clients are active on this OSD. Default 32 MiB/s.
    pub recovery_bytes_per_sec_busy: u64,
    /// Light scrub (metadata checksums compared across members) of every
    /// PG this OSD leads, every this many seconds; 0 turns it off. Default
    /// 21,600 (6 h).
    pub scrub_interval_secs: u64,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            recovery_max_active: 2,
            recovery_copies_in_flight: 4,
            recovery_bytes_per_sec_max: 256 << 20,
            recovery_bytes_per_sec_busy: 32 << 20,
            scrub_interval_secs: 6 * 3600,
        }
    }
}

/// Where a PG stands on its primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgPhase {
    /// Gathering the members' inventories; no I/O yet.
    Peering,
    /// Serving I/O while copying objects (`copied` of `to_copy`); writes
    /// to an object still to copy skip the members that lack it.
    /// `backfill`: a member holds nothing of the PG (see `RecoveryPlan`).
    Recovering {
        to_copy: u64,
        copied: u64,
        backfill: bool,
    },
    /// Settled for `acting`; serving I/O.
    Active,
    /// Peering failed (a member did not answer, a copy failed); retried on
    /// the next op or map change.
    Incomplete(String),
}

/// A PG's peering record on its primary.
#[derive(Clone, Debug)]
pub struct PgPeering {
    pub acting: Vec<OsdId>,
    /// Boot count of each member when peered: a member that restarted
    /// (even within its heartbeat grace) may have missed writes, so the PG
    /// peers again.
    pub boots: Vec<u64>,
    pub phase: PgPhase,
}

/// Returns the boot count of each OSD of `acting` in `map`.
fn boots_of(map: &ClusterMap, acting: &[OsdId]) -> Vec<u64> {
    acting
        .iter()
        .map(|osd| map.osds.get(osd).map_or(0, |o| o.boots))
        .collect()
}

/// Recovery bandwidth accounting shared by every copy of this OSD.
#[derive(Debug)]
pub struct Throttle {
    started: Instant,
    bytes: u64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            started: Instant::now(),
            bytes: 0,
        }
    }
}

impl Throttle {
    /// Records `bytes` and returns how long to pause to stay under `limit`
    /// bytes per second.
    fn charge(&mut self, bytes: u64, limit: u64) -> Duration {
        // A one-second window: restart the accounting after it.
        if self.started.elapsed() > Duration::from_secs(1) {
            self.started = Instant::now();
            self.bytes = 0;
        }
        self.bytes += bytes;
        let allowed = Duration::from_secs_f64(self.bytes as f64 / limit.max(1) as f64);
        allowed.saturating_sub(self.started.elapsed())
    }
}

/// Why a PG does not serve client ops (`OsdService::ensure_active`).
pub(super) enum Inactive {
    /// Not one of `pgs_of(map)`: nothing will peer it.
    NotInMap(String),
    /// Peering, or incomplete: retry.
    NotYet(String),
}

/// Whether `pg` is one of `pgs_of(map)`.
fn is_pg_of(map: &ClusterMap, pg: PgId) -> bool {
    map.pools.get(&pg.pool).is_some_and(|pool| {
        pg.seed < pool.pg_count
            && (pg.home.is_none() || volume_homes(map, pg.pool).any(|home| home == pg.home))
    })
}

/// The homes of the volumes of pool `pool` (`None` for an unhomed volume),
/// with repeats.
fn volume_homes(map: &ClusterMap, pool: PoolId) -> impl Iterator<Item = Option<HostId>> + '_ {
    map.volumes
        .values()
        .filter(move |v| v.pool == pool)
        .map(|v| v.home)
}

/// Returns every PG of the map: each pool's seeds, unhomed and for every
/// host that is some volume's home in that pool.
fn pgs_of(map: &ClusterMap) -> Vec<PgId> {
    let mut pgs = Vec::new();
    for (pool_id, pool) in &map.pools {
        let mut homes: std::collections::BTreeSet<Option<basalt_placement::HostId>> =
            std::collections::BTreeSet::from([None]);
        homes.extend(volume_homes(map, *pool_id));
        for home in homes {
            for seed in 0..pool.pg_count {
                pgs.push(PgId {
                    pool: *pool_id,
                    seed,
                    home,
                });
            }
        }
    }
    pgs
}

fn encode_inventory(objects: &[(ObjectKey, u64)]) -> Bytes {
    let mut out = BytesMut::with_capacity(objects.len() * 24);
    for (key, version) in objects {
        out.put_u64_le(key.object.volume.0);
        out.put_u64_le(key.object.index);
        out.put_u64_le(*version);
    }
    out.freeze()
}

fn decode_inventory(mut payload: Bytes) -> Option<BTreeMap<ObjectId, u64>> {
    if !payload.len().is_multiple_of(24) {
        return None;
    }
    let mut objects = BTreeMap::new();
    while payload.has_remaining() {
        let volume = VolumeId(payload.get_u64_le());
        let index = payload.get_u64_le();
        objects.insert(ObjectId { volume, index }, payload.get_u64_le());
    }
    Some(objects)
}

impl OsdService {
    /// Answers the peering kinds (`PgList`, `ObjPull`, `ObjPush`), which any
    /// OSD serves whatever its role.
    pub(super) async fn handle_peering(
        &self,
        frame: &Frame,
        header: &OpHeader,
        data: Bytes,
        map: &ClusterMap,
    ) -> Frame {
        let epoch = map.epoch.0;
        let key = ObjectKey {
            pg: header.object.pg,
            object: header.object.object,
        };
        match frame.kind {
            Kind::PgList => match self.store.list_pg(key.pg) {
                Ok(objects) => reply(frame, Status::Ok, epoch, encode_inventory(&objects)),
                Err(e) => reply(frame, Status::Io, epoch, message(e.to_string())),
            },
            Kind::PgRemove => self.remove_stray_pg(frame, key.pg, map).await,
            Kind::PgNotify => self.stray_notified(frame, key.pg, data, map).await,
            Kind::ObjPull => match self.store.object_contents(&key).await {
                Ok(Some((version, blocks))) => reply(
                    frame,
                    Status::Ok,
                    epoch,
                    ObjectContents { version, blocks }.encode(),
                ),
                Ok(None) => reply(frame, Status::Invalid, epoch, message(format!("no {key}"))),
                Err(e) => {
                    tracing::warn!("recovery read of {key} failed: {e}");
                    reply(frame, Status::Io, epoch, message(e.to_string()))
                }
            },
            _ => {
                // ObjPush: only into a PG this OSD is a member of; the
                // version guard in the store keeps a late push from ever
                // replacing newer data.
                let member = self
                    .acting
                    .acting_set(map, key.pg)
                    .is_ok_and(|acting| acting.members.contains(&self.id));
                if !member {
                    return reply(
                        frame,
                        Status::StaleEpoch,
                        epoch,
                        message(format!("{} is not a member of {}", self.id, key.pg)),
                    );
                }
                let contents = match ObjectContents::decode(data) {
                    Ok(contents) => contents,
                    Err(e) => return reply(frame, Status::Invalid, epoch, message(e.to_string())),
                };
                match self
                    .store
                    .replace_object(
                        &key,
                        &contents.blocks,
                        contents.version,
                        header.flags & OP_REPAIR != 0,
                    )
                    .await
                {
                    Ok(_) => reply(frame, Status::Ok, epoch, Bytes::new()),
                    Err(e) => {
                        if !e.is_request_error() {
                            tracing::error!("failed to store recovered {key}: {e}");
                        }
                        reply(frame, Status::Io, epoch, message(e.to_string()))
                    }
                }
            }
        }
    }

    /// Answers `PgRemove`: drops this OSD's leftover copy of `pg`, which
    /// its primary found clean without it at the frame's epoch. Refused if
    /// this OSD is a member at that epoch, or already has a newer map (the
    /// primary peers again there and asks again if still right).
    async fn remove_stray_pg(&self, frame: &Frame, pg: PgId, map: &ClusterMap) -> Frame {
        let epoch = map.epoch.0;
        if epoch != frame.epoch {
            return reply(
                frame,
                Status::StaleEpoch,
                epoch,
                message(format!(
                    "removal of {pg} decided at epoch {} but {} is at {epoch}",
                    frame.epoch, self.id
                )),
            );
        }
        let member = self
            .acting
            .acting_set(map, pg)
            .is_ok_and(|acting| acting.members.contains(&self.id));
        if member {
            return reply(
                frame,
                Status::Invalid,
                epoch,
                message(format!("{} is a member of {pg}", self.id)),
            );
        }
        let objects = match self.store.list_pg(pg) {
            Ok(objects) => objects,
            Err(e) => return reply(frame, Status::Io, epoch, message(e.to_string())),
        };
        for (key, _) in &objects {
            if let Err(e) = self.store.delete(key).await {
                tracing::warn!("removing stray {key} failed: {e}");
                return reply(frame, store_status(&e), epoch, message(e.to_string()));
            }
        }
        if !objects.is_empty() {
            tracing::info!(%pg, objects = objects.len(), "removed a stray copy");
        }
        reply(
            frame,
            Status::Ok,
            epoch,
            Bytes::copy_from_slice(&(objects.len() as u64).to_le_bytes()),
        )
    }

    /// Removes the objects of volumes deleted as of `map` (see
    /// [`ClusterMap::volume_was_deleted`]): `basalt volume rm` only changes
    /// the map, and every OSD frees its own copies when it sees it. A write
    /// still in flight to the volume may recreate an object after this
    /// pass; the next map change removes it.
    pub(super) async fn purge_deleted_volumes(&self, map: &ClusterMap) {
        // The common case, at every epoch: nothing to look for.
        if !map.has_deleted_volumes() {
            return;
        }
        let objects = match self.store.objects() {
            Ok(objects) => objects,
            Err(e) => {
                tracing::warn!("listing objects for deleted volumes failed: {e}");
                return;
            }
        };
        let mut removed: BTreeMap<VolumeId, usize> = BTreeMap::new();
        for (key, _) in objects {
            let volume = key.object.volume;
            if !map.volume_was_deleted(volume) {
                continue;
            }
            if let Err(e) = self.store.delete(&key).await {
                tracing::warn!("removing {key} of deleted {volume} failed: {e}");
                break;
            }
            *removed.entry(volume).or_default() += 1;
        }
        for (volume, objects) in &removed {
            tracing::info!(%volume, objects, "removed the objects of a deleted volume");
        }
    }

    /// Answers `PgNotify` as `pg`'s primary: an OSD outside the acting set
    /// holds objects of it (it was a member before it went down, and this
    /// PG did not peer since it came back). Removed at once if the PG is
    /// clean, else once its recovery finishes.
    async fn stray_notified(
        &self,
        frame: &Frame,
        pg: PgId,
        data: Bytes,
        map: &ClusterMap,
    ) -> Frame {
        let epoch = map.epoch.0;
        let Ok(from) = <[u8; 4]>::try_from(&data[..]).map(|b| OsdId(u32::from_le_bytes(b))) else {
            return reply(
                frame,
                Status::Invalid,
                epoch,
                message("a PG notify carries the sender's id, 4 bytes"),
            );
        };
        let acting = match self.acting.acting_set(map, pg) {
            Ok(acting) if acting.primary() == Some(self.id) => acting.members,
            _ => {
                return reply(
                    frame,
                    Status::StaleEpoch,
                    epoch,
                    message(format!("{} is not the primary of {pg}", self.id)),
                );
            }
        };
        if acting.contains(&from) || !map.osds.contains_key(&from) {
            return reply(frame, Status::Ok, epoch, Bytes::new());
        }
        let known = self
            .strays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pg)
            .is_some_and(|strays| strays.contains(&from));
        if !known {
            // Its copy was never planned with: it may hold writes the last
            // peering could not see (it was down or slow). Peer again, which
            // inventories it and then removes it once clean.
            tracing::info!(%pg, "{from} holds a copy outside the acting set; peering again");
            self.pgs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&pg);
            self.recovery_wakeup.notify_one();
        }
        reply(frame, Status::Ok, epoch, Bytes::new())
    }

    /// As a former member: tells the primary of every PG this OSD holds
    /// objects of without being a member at `map` (see `PgNotify`).
    async fn notify_strays(&self, map: &ClusterMap) {
        let placer = Placer::new(map);
        for pg in pgs_of(map) {
            let Ok(acting) = placer.acting_set(pg) else {
                continue;
            };
            let Some(primary) = acting.primary() else {
                continue;
            };
            if acting.members.contains(&self.id) {
                continue;
            }
            if !self
                .store
                .list_pg(pg)
                .is_ok_and(|objects| !objects.is_empty())
            {
                continue;
            }
            let payload = OpHeader::for_pg(pg, 0).encode_with(&self.id.0.to_le_bytes());
            if let Err(e) = self.call_peer(primary, map, Kind::PgNotify, payload).await {
                tracing::debug!(%pg, "could not tell {primary} about a stray copy: {e}");
            }
        }
    }

    /// Once `pg` is clean on `acting`: tells the OSDs that reported
    /// leftover objects of it at peering to remove them, at this OSD's
    /// newest map (where the PG must still be settled on `acting`). Returns
    /// whether none is left; one that failed is asked again on the next
    /// round, one that is down now keeps its copy until the PG peers again.
    async fn remove_strays(&self, pg: PgId, acting: &[OsdId]) -> bool {
        let map = self.map.borrow().clone();
        let settled = self
            .acting
            .acting_set(&map, pg)
            .is_ok_and(|now| now.members == acting);
        if !settled || !self.is_active(pg, acting, &map) {
            return false;
        }
        let strays = self
            .strays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pg)
            .unwrap_or_default();
        let mut left = Vec::new();
        for osd in strays {
            if !map.osds.get(&osd).is_some_and(|o| o.up) {
                continue;
            }
            let header = OpHeader::for_pg(pg, 0);
            match self
                .call_peer(osd, &map, Kind::PgRemove, header.encode_with(&[]))
                .await
            {
                Ok(_) => tracing::debug!(%pg, "{osd} removed its stray copy"),
                Err(e) => {
                    tracing::info!(%pg, "{osd} kept its stray copy for now: {e}");
                    left.push(osd);
                }
            }
        }
        if left.is_empty() {
            return true;
        }
        self.strays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(pg)
            .or_default()
            .extend(left);
        false
    }

    /// Returns the phase of `pg` on this primary, if it has peered it.
    pub fn pg_phase(&self, pg: PgId) -> Option<PgPeering> {
        self.pgs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pg)
            .cloned()
    }

    fn set_phase(&self, pg: PgId, acting: &[OsdId], map: &ClusterMap, phase: PgPhase) {
        self.pgs.lock().unwrap_or_else(|e| e.into_inner()).insert(
            pg,
            PgPeering {
                acting: acting.to_vec(),
                boots: boots_of(map, acting),
                phase,
            },
        );
    }

    /// Returns whether `pg` is peered for `acting` as `map` has it.
    pub(super) fn is_active(&self, pg: PgId, acting: &[OsdId], map: &ClusterMap) -> bool {
        self.pg_phase(pg).is_some_and(|p| {
            matches!(p.phase, PgPhase::Active | PgPhase::Recovering { .. })
                && p.acting == acting
                && p.boots == boots_of(map, acting)
        })
    }

    /// Waits (briefly) until `pg` is active for `acting`: wakes the
    /// recovery task, which does the peering, and polls. Client ops never
    /// run peering themselves, so a client that gives up cancels nothing.
    pub(super) async fn ensure_active(
        &self,
        pg: PgId,
        acting: &[OsdId],
        map: &ClusterMap,
    ) -> Result<(), Inactive> {
        if self.is_active(pg, acting, map) {
            return Ok(());
        }
        if !is_pg_of(map, pg) {
            // Nothing will ever peer it (`pgs_of`): say so now rather than
            // after the wait, as Busy.
            return Err(Inactive::NotInMap(format!(
                "{pg} is not a PG of the map at epoch {} (no such pool, seed or volume home)",
                map.epoch.0
            )));
        }
        self.recovery_wakeup.notify_one();
        let started = Instant::now();
        while started.elapsed() < CLIENT_WAIT_FOR_PEERING {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if self.is_active(pg, acting, map) {
                return Ok(());
            }
        }
        Err(Inactive::NotYet(match self.pg_phase(pg) {
            Some(PgPeering {
                phase: PgPhase::Incomplete(why),
                ..
            }) => format!("{pg} is incomplete: {why}"),
            _ => format!("{pg} is peering"),
        }))
    }

    /// Peers `pg` for `acting` unless it already is; one peering per PG at
    /// a time. Run by the recovery task only.
    async fn settle(&self, pg: PgId, acting: &[OsdId], map: &Arc<ClusterMap>) {
        let lock = {
            let mut locks = self.peer_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(pg).or_default().clone()
        };
        let _one_at_a_time = lock.lock().await;
        if self.is_active(pg, acting, map) {
            return;
        }
        if let Err(reason) = self.peer(pg, acting, map).await {
            tracing::warn!(%pg, "peering incomplete: {reason}");
            self.set_phase(pg, acting, map, PgPhase::Incomplete(reason));
        }
    }

    /// Peers and recovers `pg` for `acting`.
    async fn peer(&self, pg: PgId, acting: &[OsdId], map: &Arc<ClusterMap>) -> Result<(), String> {
        let started = Instant::now();
        self.set_phase(pg, acting, map, PgPhase::Peering);
        // Every up OSD, not only the last intervals' members: during
        // recovery a write is acknowledged by the members that hold its
        // object (`Copy::write_around`), which a few quick map changes can
        // move out of the recent acting sets, and a restarted primary
        // remembers no earlier interval. An OSD that never held the PG
        // answers with an empty listing (one RocksDB range scan).
        let mut sources: Vec<OsdId> = acting.to_vec();
        for (osd, state) in &map.osds {
            if state.up && !sources.contains(osd) {
                sources.push(*osd);
            }
        }
        let inventories = futures::future::join_all(
            sources
                .iter()
                .map(|osd| async move { (*osd, self.inventory(*osd, pg, map).await) }),
        )
        .await;
        let mut reported = Vec::new();
        for (osd, inventory) in inventories {
            match inventory {
                Ok(objects) => reported.push(Inventory { osd, objects }),
                Err(e) if acting.contains(&osd) => {
                    return Err(format!("member {osd} did not report: {e}"));
                }
                Err(e) => tracing::debug!(%pg, "earlier member {osd} did not report: {e}"),
            }
        }
        let plan = RecoveryPlan::new(acting, &reported)
            .ok_or_else(|| "an acting member is missing from the inventories".to_string())?;
        let strays: Vec<OsdId> = reported
            .iter()
            .filter(|i| !acting.contains(&i.osd) && !i.objects.is_empty())
            .map(|i| i.osd)
            .collect();
        let has_strays = !strays.is_empty();
        self.strays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pg, strays);
        let to_copy = plan.copies.len() as u64;
        if to_copy > 0 {
            tracing::info!(%pg, objects = to_copy, members = ?plan.missing_by_member, "recovering");
        }
        // Versions first: once the PG serves, its writes must number above
        // everything any member holds.
        {
            let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
            let counter = versions.entry(pg).or_insert(0);
            *counter = next_version_after(*counter, plan.max_version, map.epoch.0);
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                pg,
                plan.copies
                    .iter()
                    .map(|copy| (copy.object, copy.clone()))
                    .collect(),
            );
        // From here the PG serves I/O; a write to an object still to copy
        // goes around it or copies it first (`recover_if_pending`). The
        // copies, then the removal of stray copies, run in `copy_pg`, a few
        // PGs at a time, after every PG has peered.
        if to_copy == 0 && !has_strays {
            self.set_phase(pg, acting, map, PgPhase::Active);
        } else {
            self.set_phase(
                pg,
                acting,
                map,
                PgPhase::Recovering {
                    to_copy,
                    copied: 0,
                    backfill: plan.backfill,
                },
            );
        }
        tracing::debug!(%pg, ms = started.elapsed().as_millis() as u64, "peered");
        Ok(())
    }

    /// Makes the copies `pg` still has pending (throttled), then marks it
    /// active and clean.
    async fn copy_pg(
        &self,
        pg: PgId,
        acting: &[OsdId],
        map: &Arc<ClusterMap>,
    ) -> Result<(), String> {
        let started = Instant::now();
        let objects: Vec<ObjectId> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pg)
            .map(|objects| objects.keys().copied().collect())
            .unwrap_or_default();
        let to_copy = objects.len() as u64;
        let backfill = self
            .pg_phase(pg)
            .is_some_and(|p| matches!(p.phase, PgPhase::Recovering { backfill: true, .. }));
        let copied = std::sync::atomic::AtomicU64::new(0);
        let copied = &copied;
        let mut copies = futures::stream::iter(objects)
            .map(|object| async move {
                // A newer map re-peered the PG: its own plan takes over.
                if !self.is_active(pg, acting, map) {
                    return Ok(());
                }
                let result = self.recover_object(pg, object, map, true).await;
                if result.is_ok() {
                    let done = copied.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if self.is_active(pg, acting, map) {
                        self.set_phase(
                            pg,
                            acting,
                            map,
                            PgPhase::Recovering {
                                to_copy,
                                copied: done,
                                backfill,
                            },
                        );
                    }
                }
                result
            })
            .buffer_unordered(self.recovery.recovery_copies_in_flight.max(1));
        while let Some(result) = copies.next().await {
            if let Err(reason) = result {
                if self.is_active(pg, acting, map) {
                    self.set_phase(pg, acting, map, PgPhase::Incomplete(reason.clone()));
                }
                return Err(reason);
            }
        }
        drop(copies);
        // Only if nothing re-peered the PG meanwhile.
        if self.is_active(pg, acting, map) {
            // Clean only once no leftover copy elsewhere can confuse a later
            // peering or hold space; else the next round tries again.
            if !self.remove_strays(pg, acting).await {
                return Ok(());
            }
            self.set_phase(pg, acting, map, PgPhase::Active);
            tracing::info!(%pg, objects = to_copy, ms = started.elapsed().as_millis() as u64, "recovered");
        }
        Ok(())
    }

    /// Returns what `osd` holds of `pg`, but for objects of volumes deleted
    /// as of `map`: those are never copied, only removed (every OSD removes
    /// its own, `purge_deleted_volumes`, which may not have run yet there).
    async fn inventory(
        &self,
        osd: OsdId,
        pg: PgId,
        map: &ClusterMap,
    ) -> Result<BTreeMap<ObjectId, u64>, String> {
        let mut objects = if osd == self.id {
            let objects = self.store.list_pg(pg).map_err(|e| e.to_string())?;
            objects
                .into_iter()
                .map(|(key, version)| (key.object, version))
                .collect()
        } else {
            let header = OpHeader::for_pg(pg, 0);
            let payload = self
                .call_peer(osd, map, Kind::PgList, header.encode_with(&[]))
                .await?;
            decode_inventory(payload).ok_or_else(|| format!("{osd} sent a malformed inventory"))?
        };
        objects.retain(|object: &ObjectId, _| !map.volume_was_deleted(object.volume));
        Ok(objects)
    }

    /// Copies `object` of `pg` if it is still to copy; holds the object's
    /// ordering lock meanwhile, so a client write to it waits for the copy
    /// (or goes around it, see `write_around_pending`, once the copy is
    /// done). A background copy (`throttled`) waits for its turn and pauses
    /// for the bandwidth limit outside that lock.
    async fn recover_object(
        &self,
        pg: PgId,
        object: ObjectId,
        map: &ClusterMap,
        throttled: bool,
    ) -> Result<(), String> {
        let key = ObjectKey { pg, object };
        // Background copies take turns while clients are active.
        let _turn = if throttled && self.clients_active() {
            Some(
                self.busy_copies
                    .acquire()
                    .await
                    .map_err(|_| "recovery stopped".to_string())?,
            )
        } else {
            None
        };
        let copied = {
            let _order = self.order[self.stripe(&key)].lock().await;
            let copy = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&pg)
                .and_then(|objects| objects.get(&object))
                .cloned();
            let Some(copy) = copy else {
                return Ok(());
            };
            let bytes = self.copy_object(pg, &copy, map).await?;
            if let Some(objects) = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&pg)
            {
                // Only the entry this copy made: a newer peering may have
                // planned this object again (other targets) meanwhile; its
                // entry stays for its own copy. Writes cannot change an entry
                // while we hold the object's lock.
                if objects.get(&object) == Some(&copy) {
                    objects.remove(&object);
                }
            }
            bytes
        };
        // Copies a client op waits for are not held back.
        if throttled {
            let limit = if self.clients_active() {
                self.recovery.recovery_bytes_per_sec_busy
            } else {
                self.recovery.recovery_bytes_per_sec_max
            };
            let pause = self
                .throttle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .charge(copied.max(4096), limit);
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        Ok(())
    }

    /// Whether this OSD served a client op within `CLIENT_ACTIVE_WINDOW`.
    fn clients_active(&self) -> bool {
        self.last_client_op
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < CLIENT_ACTIVE_WINDOW)
    }

    /// Before a client op on `key`: copies the object first if recovery has
    /// not reached it yet and the op cannot go around the copy: a read, or
    /// a write, when this primary lacks the newest version, or a write that
    /// would reach fewer than the pool's `min_size` members.
    pub(super) async fn recover_if_pending(
        &self,
        key: &ObjectKey,
        map: &ClusterMap,
        acting: &[OsdId],
        writes: bool,
    ) -> Result<(), String> {
        let min_size = super::pool_min_size(map, key.pg);
        let needed = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key.pg)
            .and_then(|objects| objects.get(&key.object))
            .is_some_and(|copy| {
                if writes {
                    copy.write_around(self.id, acting, min_size).is_none()
                } else {
                    copy.targets.contains(&self.id)
                }
            });
        if !needed {
            return Ok(());
        }
        self.recover_object(key.pg, key.object, map, false).await
    }

    /// Under `key`'s ordering lock, for a client write at `version`: the
    /// acting members the write skips because recovery has not copied the
    /// object to them yet (the pending copy now brings them this version,
    /// from this primary). Err if the write cannot go around the copy
    /// (re-planned since `recover_if_pending` looked); the client retries.
    pub(super) fn write_around_pending(
        &self,
        key: &ObjectKey,
        version: u64,
        acting: &[OsdId],
        min_size: usize,
    ) -> Result<Vec<OsdId>, String> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let Some(copy) = pending
            .get_mut(&key.pg)
            .and_then(|objects| objects.get_mut(&key.object))
        else {
            return Ok(Vec::new());
        };
        let skipped = copy
            .write_around(self.id, acting, min_size)
            .ok_or_else(|| format!("{key} is being recovered"))?
            .to_vec();
        copy.written_around(self.id, version);
        Ok(skipped)
    }

    /// Copies one object from its source to its targets; returns the bytes
    /// moved.
    async fn copy_object(
        &self,
        pg: PgId,
        copy: &crate::recovery::Copy,
        map: &ClusterMap,
    ) -> Result<u64, String> {
        let key = ObjectKey {
            pg,
            object: copy.object,
        };
        let contents = if copy.source == self.id {
            let (version, blocks) = self
                .store
                .object_contents(&key)
                .await
                .map_err(|e| format!("read {key}: {e}"))?
                .ok_or_else(|| format!("{key} vanished"))?;
            ObjectContents { version, blocks }
        } else {
            let payload = self
                .call_peer(
                    copy.source,
                    map,
                    Kind::ObjPull,
                    OpHeader::for_object(pg, copy.object, 0).encode_with(&[]),
                )
                .await?;
            ObjectContents::decode(payload).map_err(|e| format!("pull {key}: {e}"))?
        };
        if contents.version < copy.version {
            return Err(format!(
                "{key} on {} is at version {} below the planned {}",
                copy.source, contents.version, copy.version
            ));
        }
        let bytes = (contents.blocks.len() * 4096) as u64;
        let encoded = (copy.targets.iter().any(|t| *t != self.id))
            .then(|| OpHeader::for_object(pg, copy.object, 0).encode_with(&contents.encode()));
        for target in &copy.targets {
            if *target == self.id {
                self.store
                    .replace_object(&key, &contents.blocks, contents.version, false)
                    .await
                    .map_err(|e| format!("store recovered {key}: {e}"))?;
            } else if let Some(payload) = &encoded {
                self.call_peer(*target, map, Kind::ObjPush, payload.clone())
                    .await?;
            }
        }
        Ok(bytes * copy.targets.len() as u64)
    }

    /// Returns every PG this OSD is primary of at `map`, with its acting set.
    fn led_pgs(&self, map: &ClusterMap) -> Vec<(PgId, Vec<OsdId>)> {
        let placer = Placer::new(map);
        pgs_of(map)
            .into_iter()
            .filter_map(|pg| {
                let acting = placer.acting_set(pg).ok()?;
                (acting.primary() == Some(self.id)).then_some((pg, acting.members))
            })
            .collect()
    }

    /// Keeps every PG this OSD is primary of peered and recovered: at start
    /// and after every map change, `recovery_max_active` PGs at a time.
    pub async fn run_recovery(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut maps = self.map.clone();
        let mut current = maps.borrow_and_update().clone();
        let mut last_scrub = Instant::now();
        let mut copying: Option<tokio::task::JoinHandle<()>> = None;
        // The epoch at which this OSD last told primaries about its strays.
        let mut notified_at = None;
        // Removal of deleted volumes' objects: in a task of its own (a large
        // volume is many commits; peering must not wait for them), one at a
        // time, again for every epoch seen since the last one started.
        let mut purging: Option<tokio::task::JoinHandle<()>> = None;
        let mut purged_at = None;
        loop {
            // Placement of this map, once per round.
            let led = self.led_pgs(&current);
            // Forget what this OSD settled for PGs it no longer leads: if it
            // leads one again later, another primary may have taken writes
            // meanwhile, so it must peer afresh.
            {
                let led_now: std::collections::HashSet<PgId> =
                    led.iter().map(|(pg, _)| *pg).collect();
                self.pgs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|pg, _| led_now.contains(pg));
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|pg, _| led_now.contains(pg));
                self.strays
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|pg, _| led_now.contains(pg));
            }
            let mine: Vec<(PgId, Vec<OsdId>)> = led
                .iter()
                .filter(|(pg, acting)| !self.is_active(*pg, acting, &current))
                .cloned()
                .collect();
            let map = current.clone();
            let service = &self;
            // Peer every PG first (cheap: inventories and a plan) so all of
            // them serve again quickly, then copy, a few PGs at a time.
            let peering = futures::stream::iter(mine)
                .map(|(pg, acting)| {
                    let map = map.clone();
                    async move { service.settle(pg, &acting, &map).await }
                })
                .buffer_unordered(PEERING_CONCURRENCY)
                .collect::<Vec<()>>();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = peering => {}
            }
            if notified_at != Some(current.epoch) {
                notified_at = Some(current.epoch);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.notify_strays(&current) => {}
                }
            }
            if purged_at != Some(current.epoch)
                && purging.as_ref().is_none_or(|task| task.is_finished())
            {
                purged_at = Some(current.epoch);
                let (service, map) = (self.clone(), current.clone());
                purging = Some(tokio::spawn(async move {
                    service.purge_deleted_volumes(&map).await;
                }));
            }
            // Every PG still recovering (client ops may already have copied
            // all it had pending: then this only marks it clean), copied in
            // a task of its own so that a map change meanwhile is peered at
            // once; one such task at a time.
            if copying.as_ref().is_none_or(|task| task.is_finished()) {
                let recovering: Vec<(PgId, Vec<OsdId>)> = led
                    .iter()
                    .filter(|(pg, acting)| {
                        self.pg_phase(*pg)
                            .is_some_and(|p| matches!(p.phase, PgPhase::Recovering { .. }))
                            && self.is_active(*pg, acting, &current)
                    })
                    .cloned()
                    .collect();
                if !recovering.is_empty() {
                    let (service, map, shutdown) = (self.clone(), map.clone(), shutdown.clone());
                    copying = Some(tokio::spawn(async move {
                        let service = &service;
                        let copies = futures::stream::iter(recovering)
                            .map(|(pg, acting)| {
                                let map = map.clone();
                                async move {
                                    if let Err(e) = service.copy_pg(pg, &acting, &map).await {
                                        tracing::warn!(%pg, "recovery incomplete: {e}");
                                    }
                                }
                            })
                            .buffer_unordered(service.recovery.recovery_max_active.max(1))
                            .collect::<Vec<()>>();
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = copies => {}
                        }
                    }));
                }
            }
            let interval = self.recovery.scrub_interval_secs;
            if interval > 0 && last_scrub.elapsed() > Duration::from_secs(interval) {
                last_scrub = Instant::now();
                let active: Vec<&(PgId, Vec<OsdId>)> = led
                    .iter()
                    .filter(|(pg, acting)| self.is_active(*pg, acting, &current))
                    .collect();
                for (pg, acting) in active {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    let pg = *pg;
                    match self.scrub(pg, acting, &current, false).await {
                        Ok(report) if !report.mismatches.is_empty() => tracing::warn!(
                            %pg,
                            mismatches = report.mismatches.len(),
                            repaired = report.repaired,
                            "light scrub found differences"
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::debug!(%pg, "light scrub skipped: {e}"),
                    }
                }
            }
            // Wait for the next map or a client op on an unsettled PG, or
            // retry incomplete PGs every 2 s.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = maps.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = self.recovery_wakeup.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = async {
                    match copying.as_mut() {
                        Some(task) if !task.is_finished() => {
                            let _ = task.await;
                        }
                        _ => std::future::pending::<()>().await,
                    }
                } => {}
            }
            let fresh = maps.borrow_and_update().clone();
            if fresh.epoch != current.epoch {
                current = fresh;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn inventories_round_trip_and_garbage_is_refused() {
        let pg = PgId {
            pool: basalt_placement::PoolId(1),
            seed: 3,
            home: None,
        };
        let objects = vec![(
            ObjectKey {
                pg,
                object: ObjectId {
                    volume: VolumeId(7),
                    index: 9,
                },
            },
            42u64,
        )];
        let decoded = decode_inventory(encode_inventory(&objects)).unwrap();
        assert_eq!(decoded.get(&objects[0].0.object), Some(&42));
        assert!(decode_inventory(Bytes::from_static(&[1, 2, 3])).is_none());
    }

    #[test]
    fn the_throttle_asks_for_a_pause_above_the_limit() {
        let mut throttle = Throttle::default();
        assert!(throttle.charge(1000, 1 << 20) < Duration::from_millis(5));
        let pause = throttle.charge(4 << 20, 1 << 20);
        assert!(pause > Duration::from_millis(3000), "{pause:?}");
    }
}
