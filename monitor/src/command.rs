//! `Command`: every change to the cluster map, as a raft log entry, and the
//! pure function that applies one to a map.
//!
//! Applying is deterministic (no clock, no randomness, no I/O), so every
//! monitor that applies the same log reaches the same map. A command that
//! changes the map advances its epoch by one; a refused command changes
//! nothing. Topology changes run `plan_transition` so data moves only where
//! the change requires it.

use std::collections::BTreeMap;

use basalt_placement::map::{DEFAULT_ZONE, validate_pool, validate_volume_geometry};
use basalt_placement::{
    Balancer, ClusterMap, Epoch, FailureDomain, OsdId, Pool, PoolId, Snapshot, SnapshotId, Upmap,
    Volume, VolumeId, Weight, plan_transition,
};
use serde::{Deserialize, Serialize};

/// The pool used when a request names none.
pub const DEFAULT_POOL: &str = "rbd";
/// Object size of a volume created without one.
pub const DEFAULT_OBJECT_SIZE_BYTES: u64 = 4 << 20;

/// A change to the cluster map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// An OSD starts: registers (a new id when `osd` is `None`) or returns,
    /// with its host, zone and address; it is marked up and in.
    OsdBoot {
        osd: Option<OsdId>,
        host: String,
        zone: String,
        addr: String,
        weight: Weight,
    },
    /// The failure detector's verdicts.
    MarkDown {
        osds: Vec<OsdId>,
    },
    MarkUp {
        osds: Vec<OsdId>,
    },
    MarkOut {
        osds: Vec<OsdId>,
    },
    CreatePool {
        name: String,
        size: u32,
        min_size: u32,
        pg_count: u32,
        failure_domain: FailureDomain,
    },
    DeletePool {
        name: String,
    },
    CreateVolume {
        pool: String,
        name: String,
        size_bytes: u64,
        object_size_bytes: u64,
        home: Option<String>,
    },
    ResizeVolume {
        pool: String,
        name: String,
        size_bytes: u64,
        allow_shrink: bool,
    },
    DeleteVolume {
        pool: String,
        name: String,
    },
    CreateSnapshot {
        pool: String,
        volume: String,
        name: String,
    },
    DeleteSnapshot {
        pool: String,
        volume: String,
        name: String,
    },
    /// The balancer's exceptions for a pool, computed on `base_epoch`;
    /// refused if the map moved on meanwhile.
    SetUpmap {
        pool: PoolId,
        upmap: Upmap,
        base_epoch: Epoch,
    },
}

/// What an applied command produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Osd { osd: OsdId, epoch: Epoch },
    Pool { pool: PoolId, epoch: Epoch },
    Volume { volume: VolumeId, epoch: Epoch },
    Snapshot { snapshot: SnapshotId, epoch: Epoch },
    Epoch(Epoch),
}

/// Why a command was refused. Each maps to one gRPC code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CommandError {
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
}

/// The result a raft entry carries back to the proposer.
pub type CommandResult = Result<Reply, CommandError>;

/// Applies `command` to `map`. On success the epoch has advanced by one
/// (unless the command was a no-op, which replies with the current epoch).
pub fn apply(map: &mut ClusterMap, command: &Command) -> CommandResult {
    // `map` itself stays the "before" state until the change is complete.
    let mut next = map.clone();
    let reply = apply_to(&mut next, command)?;
    if next == *map {
        return Ok(reply_with_epoch(reply, map.epoch));
    }
    next.epoch = Epoch(map.epoch.0 + 1);
    if changes_topology(command) {
        plan_transition(map, &mut next);
    }
    *map = next;
    Ok(reply_with_epoch(reply, map.epoch))
}

fn changes_topology(command: &Command) -> bool {
    matches!(
        command,
        Command::OsdBoot { .. }
            | Command::MarkDown { .. }
            | Command::MarkUp { .. }
            | Command::MarkOut { .. }
    )
}

fn reply_with_epoch(reply: Reply, epoch: Epoch) -> Reply {
    match reply {
        Reply::Osd { osd, .. } => Reply::Osd { osd, epoch },
        Reply::Pool { pool, .. } => Reply::Pool { pool, epoch },
        Reply::Volume { volume, .. } => Reply::Volume { volume, epoch },
        Reply::Snapshot { snapshot, .. } => Reply::Snapshot { snapshot, epoch },
        Reply::Epoch(_) => Reply::Epoch(epoch),
    }
}

fn invalid(message: impl Into<String>) -> CommandError {
    CommandError::InvalidArgument(message.into())
}

fn check_name(kind: &str, name: &str) -> Result<(), CommandError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{kind} name {name:?} must be 1-128 characters of a-z, A-Z, 0-9, '-', '_', '.'"
        )))
    }
}

fn pool_id(map: &ClusterMap, name: &str) -> Result<PoolId, CommandError> {
    let name = if name.is_empty() { DEFAULT_POOL } else { name };
    map.pool_by_name(name)
        .ok_or_else(|| CommandError::NotFound(format!("pool {name:?}")))
}

fn volume_id(map: &ClusterMap, pool: &str, name: &str) -> Result<VolumeId, CommandError> {
    let pool = pool_id(map, pool)?;
    map.volumes
        .iter()
        .find(|(_, v)| v.pool == pool && v.name == name)
        .map(|(id, _)| *id)
        .ok_or_else(|| CommandError::NotFound(format!("volume {name:?}")))
}

fn apply_to(map: &mut ClusterMap, command: &Command) -> CommandResult {
    let epoch = map.epoch;
    match command {
        Command::OsdBoot {
            osd,
            host,
            zone,
            addr,
            weight,
        } => {
            check_name("host", host)?;
            let zone_name = if zone.is_empty() { DEFAULT_ZONE } else { zone };
            check_name("zone", zone_name)?;
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(format!("OSD address {addr:?} is not ip:port")));
            }
            let zone_id = map.ensure_zone(zone_name);
            let host_id = map
                .ensure_host(host, zone_id)
                .map_err(|e| CommandError::FailedPrecondition(e.to_string()))?;
            let id = match osd {
                Some(id) => {
                    let Some(existing) = map.osds.get_mut(id) else {
                        return Err(CommandError::NotFound(format!("{id}")));
                    };
                    existing.host = host_id;
                    *id
                }
                None => map
                    .add_osd(host_id, *weight)
                    .map_err(|e| CommandError::FailedPrecondition(e.to_string()))?,
            };
            let entry = map
                .osds
                .get_mut(&id)
                .ok_or_else(|| CommandError::NotFound(format!("{id}")))?;
            entry.weight = *weight;
            entry.up = true;
            entry.in_ = true;
            entry.addr = Some(addr.clone());
            entry.boots += 1;
            Ok(Reply::Osd { osd: id, epoch })
        }
        Command::MarkDown { osds } | Command::MarkUp { osds } | Command::MarkOut { osds } => {
            for id in osds {
                let osd = map
                    .osds
                    .get_mut(id)
                    .ok_or_else(|| CommandError::NotFound(format!("{id}")))?;
                match command {
                    Command::MarkDown { .. } => osd.up = false,
                    // A down OSD marked up again starts a new incarnation,
                    // as a boot does: it may have missed writes while down,
                    // and primaries compare boot counts to know they must
                    // peer again.
                    Command::MarkUp { .. } => {
                        if !osd.up {
                            osd.boots += 1;
                        }
                        osd.up = true;
                    }
                    _ => osd.in_ = false,
                }
            }
            Ok(Reply::Epoch(epoch))
        }
        Command::CreatePool {
            name,
            size,
            min_size,
            pg_count,
            failure_domain,
        } => {
            check_name("pool", name)?;
            if map.pool_by_name(name).is_some() {
                return Err(CommandError::AlreadyExists(format!("pool {name:?}")));
            }
            let pool = Pool {
                name: name.clone(),
                size: *size,
                min_size: *min_size,
                pg_count: *pg_count,
                failure_domain: *failure_domain,
                upmap: BTreeMap::new(),
            };
            validate_pool(&pool).map_err(|e| invalid(e.to_string()))?;
            let id = map.add_pool(pool).map_err(|e| invalid(e.to_string()))?;
            // A new pool is born balanced: no data has to move for it.
            // (Deterministic, so every monitor computes the same exceptions.)
            if let Err(e) = Balancer::default().balance(map, id) {
                tracing::debug!("new pool not balanced: {e}");
            }
            Ok(Reply::Pool { pool: id, epoch })
        }
        Command::DeletePool { name } => {
            let id = pool_id(map, name)?;
            let in_use = map.volumes.values().filter(|v| v.pool == id).count();
            if in_use > 0 {
                return Err(CommandError::FailedPrecondition(format!(
                    "pool {name:?} still holds {in_use} volume(s); delete them first"
                )));
            }
            map.pools.remove(&id);
            Ok(Reply::Pool { pool: id, epoch })
        }
        Command::CreateVolume {
            pool,
            name,
            size_bytes,
            object_size_bytes,
            home,
        } => {
            check_name("volume", name)?;
            let pool = pool_id(map, pool)?;
            if map
                .volumes
                .values()
                .any(|v| v.pool == pool && v.name == *name)
            {
                return Err(CommandError::AlreadyExists(format!("volume {name:?}")));
            }
            let object_size = if *object_size_bytes == 0 {
                DEFAULT_OBJECT_SIZE_BYTES
            } else {
                *object_size_bytes
            };
            validate_volume_geometry(*size_bytes, object_size)
                .map_err(|e| invalid(e.to_string()))?;
            let home = match home.as_deref() {
                None | Some("") => None,
                Some(host) => Some(
                    map.host_by_name(host)
                        .ok_or_else(|| CommandError::NotFound(format!("host {host:?}")))?,
                ),
            };
            let id = map.allocate_volume_id();
            map.volumes.insert(
                id,
                Volume {
                    name: name.clone(),
                    pool,
                    size_bytes: *size_bytes,
                    object_size_bytes: object_size,
                    home,
                },
            );
            Ok(Reply::Volume { volume: id, epoch })
        }
        Command::ResizeVolume {
            pool,
            name,
            size_bytes,
            allow_shrink,
        } => {
            let id = volume_id(map, pool, name)?;
            let volume = map
                .volumes
                .get_mut(&id)
                .ok_or_else(|| CommandError::NotFound(format!("volume {name:?}")))?;
            validate_volume_geometry(*size_bytes, volume.object_size_bytes)
                .map_err(|e| invalid(e.to_string()))?;
            if *size_bytes < volume.size_bytes && !allow_shrink {
                return Err(invalid(format!(
                    "shrinking volume {name:?} from {} to {size_bytes} bytes loses data; \
                     pass --allow-shrink",
                    volume.size_bytes
                )));
            }
            volume.size_bytes = *size_bytes;
            Ok(Reply::Volume { volume: id, epoch })
        }
        Command::DeleteVolume { pool, name } => {
            let id = volume_id(map, pool, name)?;
            let snapshots = map.snapshots.values().filter(|s| s.volume == id).count();
            if snapshots > 0 {
                return Err(CommandError::FailedPrecondition(format!(
                    "volume {name:?} has {snapshots} snapshot(s); delete them first"
                )));
            }
            map.remove_volume(id);
            Ok(Reply::Volume { volume: id, epoch })
        }
        Command::CreateSnapshot { pool, volume, name } => {
            check_name("snapshot", name)?;
            let volume_id = volume_id(map, pool, volume)?;
            if map
                .snapshots
                .values()
                .any(|s| s.volume == volume_id && s.name == *name)
            {
                return Err(CommandError::AlreadyExists(format!(
                    "snapshot {volume}@{name}"
                )));
            }
            let id = map.allocate_snapshot_id();
            map.snapshots.insert(
                id,
                Snapshot {
                    volume: volume_id,
                    name: name.clone(),
                    created_epoch: Epoch(epoch.0 + 1),
                },
            );
            Ok(Reply::Snapshot {
                snapshot: id,
                epoch,
            })
        }
        Command::DeleteSnapshot { pool, volume, name } => {
            let volume_id = volume_id(map, pool, volume)?;
            let id = map
                .snapshots
                .iter()
                .find(|(_, s)| s.volume == volume_id && s.name == *name)
                .map(|(id, _)| *id)
                .ok_or_else(|| CommandError::NotFound(format!("snapshot {volume}@{name}")))?;
            map.remove_snapshot(id);
            Ok(Reply::Snapshot {
                snapshot: id,
                epoch,
            })
        }
        Command::SetUpmap {
            pool,
            upmap,
            base_epoch,
        } => {
            if *base_epoch != map.epoch {
                return Err(CommandError::FailedPrecondition(format!(
                    "balancer result for {base_epoch} is stale at {}",
                    map.epoch
                )));
            }
            let entry = map
                .pools
                .get_mut(pool)
                .ok_or_else(|| CommandError::NotFound(format!("{pool}")))?;
            entry.upmap = upmap.clone();
            Ok(Reply::Epoch(epoch))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(map: &mut ClusterMap, host: &str) -> OsdId {
        match apply(
            map,
            &Command::OsdBoot {
                osd: None,
                host: host.into(),
                zone: String::new(),
                addr: "127.0.0.1:7000".into(),
                weight: Weight::ONE,
            },
        ) {
            Ok(Reply::Osd { osd, .. }) => osd,
            other => panic!("{other:?}"),
        }
    }

    fn create_pool(map: &mut ClusterMap) {
        apply(
            map,
            &Command::CreatePool {
                name: "rbd".into(),
                size: 3,
                min_size: 2,
                pg_count: 64,
                failure_domain: FailureDomain::Host,
            },
        )
        .unwrap();
    }

    fn create_volume(name: &str, size_bytes: u64) -> Command {
        Command::CreateVolume {
            pool: String::new(),
            name: name.into(),
            size_bytes,
            object_size_bytes: 0,
            home: None,
        }
    }

    #[test]
    fn every_change_advances_the_epoch_and_refusals_change_nothing() {
        let mut map = ClusterMap::new();
        for host in ["n1", "n2", "n3"] {
            boot(&mut map, host);
        }
        assert_eq!(map.epoch, Epoch(3));
        create_pool(&mut map);
        let reply = apply(&mut map, &create_volume("vm1", 10 << 30)).unwrap();
        assert_eq!(
            reply,
            Reply::Volume {
                volume: VolumeId(0),
                epoch: Epoch(5)
            }
        );
        let before = map.clone();
        assert!(matches!(
            apply(&mut map, &create_volume("vm1", 1 << 30)),
            Err(CommandError::AlreadyExists(_))
        ));
        assert_eq!(map, before, "a refused command changes nothing");
        // Marking an OSD down that is already down is a no-op.
        apply(
            &mut map,
            &Command::MarkDown {
                osds: vec![OsdId(0)],
            },
        )
        .unwrap();
        let epoch = map.epoch;
        apply(
            &mut map,
            &Command::MarkDown {
                osds: vec![OsdId(0)],
            },
        )
        .unwrap();
        assert_eq!(map.epoch, epoch);
    }

    /// A deleted volume's id is never handed out again (a new volume would
    /// read the old one's data until the OSDs removed it), and the map tells
    /// deleted ids from ones not handed out yet.
    #[test]
    fn volume_ids_are_never_reused() {
        let mut map = ClusterMap::new();
        for host in ["n1", "n2", "n3"] {
            boot(&mut map, host);
        }
        create_pool(&mut map);
        let id = |reply: Result<Reply, CommandError>| match reply {
            Ok(Reply::Volume { volume, .. }) => volume,
            other => panic!("{other:?}"),
        };
        let delete = |name: &str| Command::DeleteVolume {
            pool: String::new(),
            name: name.into(),
        };
        assert_eq!(
            id(apply(&mut map, &create_volume("a", 1 << 30))),
            VolumeId(0)
        );
        assert_eq!(
            id(apply(&mut map, &create_volume("b", 1 << 30))),
            VolumeId(1)
        );
        assert!(!map.has_deleted_volumes());
        // The newest volume goes: its id is the one max + 1 would reuse.
        assert_eq!(id(apply(&mut map, &delete("b"))), VolumeId(1));
        assert!(map.has_deleted_volumes());
        assert!(map.volume_was_deleted(VolumeId(1)));
        assert!(!map.volume_was_deleted(VolumeId(0)), "still exists");
        assert!(!map.volume_was_deleted(VolumeId(2)), "not handed out yet");
        assert_eq!(
            id(apply(&mut map, &create_volume("b", 1 << 30))),
            VolumeId(2)
        );
        apply(&mut map, &delete("a")).unwrap();
        apply(&mut map, &delete("b")).unwrap();
        assert!(map.volumes.is_empty());
        assert_eq!(
            id(apply(&mut map, &create_volume("c", 1 << 30))),
            VolumeId(3)
        );
        // A map from before the counter was kept: deleting its newest
        // volume still records the id.
        let mut old = without_field(&map, "next_volume_id");
        assert_eq!(old.next_volume_id, 0);
        assert!(
            !old.has_deleted_volumes(),
            "an old map knows of no deletion"
        );
        apply(&mut old, &delete("c")).unwrap();
        assert_eq!(
            id(apply(&mut old, &create_volume("d", 1 << 30))),
            VolumeId(4)
        );
    }

    /// `map` as a map written before `field` existed.
    fn without_field(map: &ClusterMap, field: &str) -> ClusterMap {
        let mut value = serde_json::to_value(map).unwrap();
        value.as_object_mut().unwrap().remove(field);
        serde_json::from_value(value).unwrap()
    }

    /// Snapshot ids are never reused either, including in a map from before
    /// the counter was kept, once it deleted a snapshot.
    #[test]
    fn snapshot_ids_are_never_reused() {
        let mut map = ClusterMap::new();
        create_pool(&mut map);
        apply(&mut map, &create_volume("v", 1 << 30)).unwrap();
        let snap = |name: &str| Command::CreateSnapshot {
            pool: String::new(),
            volume: "v".into(),
            name: name.into(),
        };
        let delete = |name: &str| Command::DeleteSnapshot {
            pool: String::new(),
            volume: "v".into(),
            name: name.into(),
        };
        let id = |reply: Result<Reply, CommandError>| match reply {
            Ok(Reply::Snapshot { snapshot, .. }) => snapshot,
            other => panic!("{other:?}"),
        };
        assert_eq!(id(apply(&mut map, &snap("s0"))), SnapshotId(0));
        assert_eq!(id(apply(&mut map, &snap("s1"))), SnapshotId(1));
        // The newest goes: max + 1 would hand its id out again.
        assert_eq!(id(apply(&mut map, &delete("s1"))), SnapshotId(1));
        assert_eq!(id(apply(&mut map, &snap("s2"))), SnapshotId(2));
        apply(&mut map, &delete("s0")).unwrap();
        apply(&mut map, &delete("s2")).unwrap();
        assert!(map.snapshots.is_empty());
        assert_eq!(id(apply(&mut map, &snap("s3"))), SnapshotId(3));
        let mut old = without_field(&map, "next_snapshot_id");
        assert_eq!(old.next_snapshot_id, 0);
        apply(&mut old, &delete("s3")).unwrap();
        assert_eq!(id(apply(&mut old, &snap("s4"))), SnapshotId(4));
    }

    #[test]
    fn bad_volume_requests_name_the_problem() {
        let mut map = ClusterMap::new();
        create_pool(&mut map);
        let cases = [
            (create_volume("v", 0), "size 0"),
            (create_volume("v", 4097), "multiple of 4096"),
            (create_volume("bad name", 4096), "must be 1-128"),
        ];
        for (command, needle) in cases {
            let err = apply(&mut map, &command).unwrap_err();
            assert!(matches!(err, CommandError::InvalidArgument(_)), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        let missing_pool = Command::CreateVolume {
            pool: "nope".into(),
            name: "v".into(),
            size_bytes: 4096,
            object_size_bytes: 0,
            home: None,
        };
        assert!(matches!(
            apply(&mut map, &missing_pool),
            Err(CommandError::NotFound(_))
        ));
        apply(&mut map, &create_volume("v", 8 << 20)).unwrap();
        let shrink = Command::ResizeVolume {
            pool: String::new(),
            name: "v".into(),
            size_bytes: 4 << 20,
            allow_shrink: false,
        };
        let err = apply(&mut map, &shrink).unwrap_err();
        assert!(err.to_string().contains("--allow-shrink"), "{err}");
        let grow = Command::ResizeVolume {
            pool: String::new(),
            name: "v".into(),
            size_bytes: 16 << 20,
            allow_shrink: false,
        };
        apply(&mut map, &grow).unwrap();
        assert_eq!(map.volumes[&VolumeId(0)].size_bytes, 16 << 20);
        assert!(matches!(
            apply(&mut map, &Command::DeletePool { name: "rbd".into() }),
            Err(CommandError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn homed_volumes_need_a_known_host() {
        let mut map = ClusterMap::new();
        boot(&mut map, "n1");
        create_pool(&mut map);
        let homed = |home: &str| Command::CreateVolume {
            pool: "rbd".into(),
            name: format!("on-{home}"),
            size_bytes: 4096,
            object_size_bytes: 0,
            home: Some(home.into()),
        };
        apply(&mut map, &homed("n1")).unwrap();
        assert!(map.volumes.values().any(|v| v.home.is_some()));
        assert!(matches!(
            apply(&mut map, &homed("n9")),
            Err(CommandError::NotFound(_))
        ));
    }

    #[test]
    fn stale_balancer_results_are_refused() {
        let mut map = ClusterMap::new();
        create_pool(&mut map);
        let stale = Command::SetUpmap {
            pool: PoolId(0),
            upmap: Upmap::new(),
            base_epoch: Epoch(0),
        };
        assert!(matches!(
            apply(&mut map, &stale),
            Err(CommandError::FailedPrecondition(_))
        ));
    }
}
