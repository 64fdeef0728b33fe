//! The cluster map: the shared, versioned description of the cluster that the
//! monitors replicate and every daemon and client caches.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::MapError;
use crate::ids::{Epoch, HostId, OsdId, PgId, PoolId, SnapshotId, VolumeId, Weight, ZoneId};

/// The map layout this code writes. Decoders accept this version only; an
/// older layout will get its own module and a conversion when one exists.
pub const MAP_FORMAT_VERSION: u32 = 1;

/// Name of the zone hosts belong to when none is given.
pub const DEFAULT_ZONE: &str = "default";

/// Smallest object size a volume may use (one store block).
pub const BLOCK_SIZE_BYTES: u64 = 4096;

/// A zone: hosts that share a failure (rack, room, power feed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    pub name: String,
}

/// A host: one machine, the default failure domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub zone: ZoneId,
}

/// One storage daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Osd {
    pub host: HostId,
    /// Placement weight, usually the disk size in TiB.
    pub weight: Weight,
    /// Heartbeating: set by the monitors from heartbeats.
    pub up: bool,
    /// Part of data placement; an OSD is marked out after a long outage.
    #[serde(rename = "in")]
    pub in_: bool,
    /// Data-plane address, `ip:port`, once the OSD has booted.
    pub addr: Option<String>,
    /// How many times the OSD has booted, or been marked up again after
    /// being down. Every boot is a new epoch, so a daemon that restarted
    /// within its heartbeat grace still starts a new interval (replication
    /// from its previous incarnation is refused), and a primary that was
    /// marked down and up again peers afresh.
    #[serde(default)]
    pub boots: u64,
}

impl Osd {
    /// Returns whether placement may choose this OSD.
    pub fn is_eligible(&self) -> bool {
        self.up && self.in_ && self.weight.0 > 0
    }
}

/// What two members of an acting set must not share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureDomain {
    Host,
    Zone,
}

impl std::fmt::Display for FailureDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailureDomain::Host => "host",
            FailureDomain::Zone => "zone",
        })
    }
}

impl std::str::FromStr for FailureDomain {
    type Err = MapError;
    fn from_str(s: &str) -> Result<Self, MapError> {
        match s {
            "host" => Ok(FailureDomain::Host),
            "zone" => Ok(FailureDomain::Zone),
            other => Err(MapError::UnknownFailureDomain(other.to_string())),
        }
    }
}

/// A pool: a replication rule over a fixed number of placement groups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    /// Copies of every object.
    pub size: u32,
    /// Fewest copies that may accept writes.
    pub min_size: u32,
    /// Number of placement groups; a power of two.
    pub pg_count: u32,
    pub failure_domain: FailureDomain,
    /// Explicit exceptions to the computed placement (as Ceph's upmap items),
    /// keyed by PG seed: each `(from, to)` replaces member `from` by `to`.
    /// Written by the balancer and by movement-minimising transitions.
    #[serde(default)]
    pub upmap: Upmap,
}

/// A volume: a virtual disk cut into fixed-size objects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    pub pool: PoolId,
    pub size_bytes: u64,
    pub object_size_bytes: u64,
    /// The host whose OSDs hold the primary copy (locality), if any.
    pub home: Option<HostId>,
}

impl Volume {
    /// Returns the index of the object that holds byte `offset`.
    pub fn object_index(&self, offset: u64) -> u64 {
        offset / self.object_size_bytes
    }

    /// Returns the number of objects the volume spans.
    pub fn object_count(&self) -> u64 {
        self.size_bytes.div_ceil(self.object_size_bytes)
    }
}

/// A snapshot record: which volume, what name, taken at which epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub volume: VolumeId,
    pub name: String,
    pub created_epoch: Epoch,
}

/// A pool's placement exceptions: PG seed -> `(from, to)` replacements.
pub type Upmap = BTreeMap<u32, Vec<(OsdId, OsdId)>>;

/// The cluster map at one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    pub format_version: u32,
    pub epoch: Epoch,
    pub zones: BTreeMap<ZoneId, Zone>,
    pub hosts: BTreeMap<HostId, Host>,
    pub osds: BTreeMap<OsdId, Osd>,
    pub pools: BTreeMap<PoolId, Pool>,
    pub volumes: BTreeMap<VolumeId, Volume>,
    #[serde(default)]
    pub snapshots: BTreeMap<SnapshotId, Snapshot>,
    /// Every volume id below this one was handed out: ids are never reused,
    /// so a new volume never finds a deleted one's objects, and an id below
    /// it that `volumes` lacks names a deleted volume whose objects the
    /// OSDs remove ([`ClusterMap::volume_was_deleted`]). 0 in maps written
    /// before it was kept: their deleted volumes are not known.
    #[serde(default)]
    pub next_volume_id: u64,
    /// Every snapshot id below this one was handed out; as for volumes, a
    /// deleted snapshot's id is never given to a new one (a snapshot's
    /// objects are named by its id). 0 in maps written before it was kept.
    #[serde(default)]
    pub next_snapshot_id: u64,
}

impl Default for ClusterMap {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterMap {
    /// Returns an empty map at epoch 0.
    pub fn new() -> Self {
        Self {
            format_version: MAP_FORMAT_VERSION,
            epoch: Epoch(0),
            zones: BTreeMap::new(),
            hosts: BTreeMap::new(),
            osds: BTreeMap::new(),
            pools: BTreeMap::new(),
            volumes: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            next_volume_id: 0,
            next_snapshot_id: 0,
        }
    }

    /// Returns a fresh volume id (never one a deleted volume had, as far as
    /// this map knows) and records it as handed out.
    pub fn allocate_volume_id(&mut self) -> VolumeId {
        VolumeId(allocate_id(
            &mut self.next_volume_id,
            self.volumes.keys().map(|v| v.0),
        ))
    }

    /// Removes a volume; its id stays handed out (see `next_volume_id`).
    pub fn remove_volume(&mut self, id: VolumeId) -> Option<Volume> {
        // Maps from before the counter was kept start it at 0.
        self.next_volume_id = self.next_volume_id.max(id.0 + 1);
        self.volumes.remove(&id)
    }

    /// Returns a fresh snapshot id (never one a deleted snapshot had, as far
    /// as this map knows) and records it as handed out.
    pub fn allocate_snapshot_id(&mut self) -> SnapshotId {
        SnapshotId(allocate_id(
            &mut self.next_snapshot_id,
            self.snapshots.keys().map(|s| s.0),
        ))
    }

    /// Removes a snapshot; its id stays handed out (see `next_snapshot_id`).
    pub fn remove_snapshot(&mut self, id: SnapshotId) -> Option<Snapshot> {
        self.next_snapshot_id = self.next_snapshot_id.max(id.0 + 1);
        self.snapshots.remove(&id)
    }

    /// Returns whether `id` belonged to a volume that was deleted. A volume
    /// newer than this map is not "deleted": an OSD holding an old map may
    /// already see its first writes.
    pub fn volume_was_deleted(&self, id: VolumeId) -> bool {
        id.0 < self.next_volume_id && !self.volumes.contains_key(&id)
    }

    /// Returns whether any volume id this map knows of was deleted: every
    /// existing volume has an id below `next_volume_id`, one each, so this
    /// is whether fewer exist than were handed out.
    pub fn has_deleted_volumes(&self) -> bool {
        (self.volumes.len() as u64) < self.next_volume_id
    }

    /// Returns the zone named `name`, adding it if missing.
    pub fn ensure_zone(&mut self, name: &str) -> ZoneId {
        if let Some((id, _)) = self.zones.iter().find(|(_, zone)| zone.name == name) {
            return *id;
        }
        let id = ZoneId(next_id(self.zones.keys().map(|z| z.0)));
        self.zones.insert(
            id,
            Zone {
                name: name.to_string(),
            },
        );
        id
    }

    /// Returns the host named `name`, adding it to `zone` if missing.
    pub fn ensure_host(&mut self, name: &str, zone: ZoneId) -> Result<HostId, MapError> {
        if !self.zones.contains_key(&zone) {
            return Err(MapError::ZoneNotFound(zone));
        }
        if let Some((id, host)) = self.hosts.iter().find(|(_, host)| host.name == name) {
            if host.zone != zone {
                return Err(MapError::HostInOtherZone {
                    host: name.to_string(),
                    zone: host.zone,
                });
            }
            return Ok(*id);
        }
        let id = HostId(next_id(self.hosts.keys().map(|h| h.0)));
        self.hosts.insert(
            id,
            Host {
                name: name.to_string(),
                zone,
            },
        );
        Ok(id)
    }

    /// Adds an OSD on `host`, up and in, and returns its id.
    pub fn add_osd(&mut self, host: HostId, weight: Weight) -> Result<OsdId, MapError> {
        let id = OsdId(next_id(self.osds.keys().map(|o| o.0)));
        self.insert_osd(id, host, weight)?;
        Ok(id)
    }

    /// Adds OSD `id` on `host`, up and in.
    pub fn insert_osd(&mut self, id: OsdId, host: HostId, weight: Weight) -> Result<(), MapError> {
        if !self.hosts.contains_key(&host) {
            return Err(MapError::HostNotFound(host));
        }
        if self.osds.contains_key(&id) {
            return Err(MapError::OsdExists(id));
        }
        self.osds.insert(
            id,
            Osd {
                host,
                weight,
                up: true,
                in_: true,
                addr: None,
                boots: 0,
            },
        );
        Ok(())
    }

    /// Adds a pool after checking its parameters.
    pub fn add_pool(&mut self, pool: Pool) -> Result<PoolId, MapError> {
        validate_pool(&pool)?;
        if self.pools.values().any(|p| p.name == pool.name) {
            return Err(MapError::PoolExists(pool.name));
        }
        let id = PoolId(next_id(self.pools.keys().map(|p| p.0)));
        self.pools.insert(id, pool);
        Ok(id)
    }

    /// Returns the host named `name`.
    pub fn host_by_name(&self, name: &str) -> Option<HostId> {
        self.hosts
            .iter()
            .find(|(_, host)| host.name == name)
            .map(|(id, _)| *id)
    }

    /// Returns the pool named `name`.
    pub fn pool_by_name(&self, name: &str) -> Option<PoolId> {
        self.pools
            .iter()
            .find(|(_, pool)| pool.name == name)
            .map(|(id, _)| *id)
    }

    /// Returns the PG that holds object `object_index` of `volume`.
    pub fn pg_of_object(&self, volume: VolumeId, object_index: u64) -> Result<PgId, MapError> {
        let vol = self
            .volumes
            .get(&volume)
            .ok_or(MapError::VolumeNotFound(volume))?;
        let pool = self
            .pools
            .get(&vol.pool)
            .ok_or(MapError::PoolNotFound(vol.pool))?;
        Ok(PgId {
            pool: vol.pool,
            seed: object_seed(volume, object_index, pool.pg_count),
            home: vol.home,
        })
    }

    /// Checks the map's internal references and parameters.
    pub fn validate(&self) -> Result<(), MapError> {
        if self.format_version != MAP_FORMAT_VERSION {
            return Err(MapError::UnsupportedFormat(self.format_version));
        }
        for (id, host) in &self.hosts {
            if !self.zones.contains_key(&host.zone) {
                return Err(MapError::Dangling(format!(
                    "{id} refers to missing {}",
                    host.zone
                )));
            }
        }
        for (id, osd) in &self.osds {
            if !self.hosts.contains_key(&osd.host) {
                return Err(MapError::Dangling(format!(
                    "{id} refers to missing {}",
                    osd.host
                )));
            }
        }
        let mut names = BTreeSet::new();
        for pool in self.pools.values() {
            validate_pool(pool)?;
            if !names.insert(pool.name.as_str()) {
                return Err(MapError::PoolExists(pool.name.clone()));
            }
        }
        for (id, volume) in &self.volumes {
            if !self.pools.contains_key(&volume.pool) {
                return Err(MapError::Dangling(format!(
                    "{id} refers to missing {}",
                    volume.pool
                )));
            }
            if let Some(home) = volume.home
                && !self.hosts.contains_key(&home)
            {
                return Err(MapError::Dangling(format!(
                    "{id} is homed on missing {home}"
                )));
            }
            validate_volume_geometry(volume.size_bytes, volume.object_size_bytes)?;
        }
        Ok(())
    }
}

/// Returns the PG seed of object `object_index` of `volume` in a pool of
/// `pg_count` (a power of two) PGs.
pub fn object_seed(volume: VolumeId, object_index: u64, pg_count: u32) -> u32 {
    debug_assert!(pg_count.is_power_of_two());
    (crate::hash::hash2(volume.0, object_index) & (pg_count as u64 - 1)) as u32
}

/// Checks a pool's parameters.
pub fn validate_pool(pool: &Pool) -> Result<(), MapError> {
    let invalid = |reason: String| Err(MapError::InvalidPool { reason });
    if pool.name.is_empty() {
        return invalid("pool name is empty".into());
    }
    if pool.size == 0 || pool.size > 16 {
        return invalid(format!("size {} is not in 1..=16", pool.size));
    }
    if pool.min_size == 0 || pool.min_size > pool.size {
        return invalid(format!(
            "min_size {} is not in 1..=size ({})",
            pool.min_size, pool.size
        ));
    }
    if !pool.pg_count.is_power_of_two() || pool.pg_count > 1 << 24 {
        return invalid(format!(
            "pg_count {} is not a power of two up to 2^24",
            pool.pg_count
        ));
    }
    Ok(())
}

/// Checks a volume's size and object size.
pub fn validate_volume_geometry(size_bytes: u64, object_size_bytes: u64) -> Result<(), MapError> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK_SIZE_BYTES) {
        return Err(MapError::InvalidVolume {
            reason: format!("size {size_bytes} is not a positive multiple of {BLOCK_SIZE_BYTES}"),
        });
    }
    if object_size_bytes < BLOCK_SIZE_BYTES
        || !object_size_bytes.is_power_of_two()
        || object_size_bytes > 64 << 20
    {
        return Err(MapError::InvalidVolume {
            reason: format!(
                "object size {object_size_bytes} is not a power of two between 4 KiB and 64 MiB"
            ),
        });
    }
    Ok(())
}

/// Returns one more than the largest id, or 0.
pub fn next_id64(existing: impl Iterator<Item = u64>) -> u64 {
    existing.max().map_or(0, |max| max + 1)
}

/// An id above every `existing` one and at least `next` (ids handed out
/// before, possibly deleted since); `next` moves past it.
fn allocate_id(next: &mut u64, existing: impl Iterator<Item = u64>) -> u64 {
    let id = next_id64(existing).max(*next);
    *next = id + 1;
    id
}

fn next_id(existing: impl Iterator<Item = u32>) -> u32 {
    existing.max().map_or(0, |max| max + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trips_through_json() {
        let mut map = ClusterMap::new();
        let zone = map.ensure_zone("rack1");
        let host = map.ensure_host("node1", zone).unwrap();
        let osd = map.add_osd(host, Weight::ONE).unwrap();
        let mut pool = Pool {
            name: "rbd".into(),
            size: 3,
            min_size: 2,
            pg_count: 64,
            failure_domain: FailureDomain::Host,
            upmap: BTreeMap::new(),
        };
        pool.upmap.insert(7, vec![(osd, OsdId(9))]);
        map.add_pool(pool).unwrap();
        let json = serde_json::to_string(&map).unwrap();
        let back: ClusterMap = serde_json::from_str(&json).unwrap();
        assert_eq!(map, back);
        back.validate().unwrap();
    }

    #[test]
    fn bad_pools_and_volumes_are_refused_with_reasons() {
        let pool = |size, min_size, pg_count| Pool {
            name: "p".into(),
            size,
            min_size,
            pg_count,
            failure_domain: FailureDomain::Host,
            upmap: BTreeMap::new(),
        };
        assert!(validate_pool(&pool(3, 2, 64)).is_ok());
        for bad in [
            pool(0, 0, 64),
            pool(3, 4, 64),
            pool(3, 2, 100),
            pool(3, 0, 64),
        ] {
            let err = validate_pool(&bad).unwrap_err();
            assert!(matches!(err, MapError::InvalidPool { .. }), "{err}");
        }
        assert!(validate_volume_geometry(0, 4 << 20).is_err());
        assert!(validate_volume_geometry(4097, 4 << 20).is_err());
        assert!(validate_volume_geometry(8192, 3000).is_err());
        assert!(validate_volume_geometry(8192, 4 << 20).is_ok());
    }

    #[test]
    fn hosts_keep_their_zone() {
        let mut map = ClusterMap::new();
        let a = map.ensure_zone("a");
        let b = map.ensure_zone("b");
        let host = map.ensure_host("h", a).unwrap();
        assert_eq!(map.ensure_host("h", a).unwrap(), host);
        assert!(matches!(
            map.ensure_host("h", b),
            Err(MapError::HostInOtherZone { .. })
        ));
    }
}
