//! Identifiers and small value types of the cluster map.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hash::WEIGHT_ONE;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A version of the cluster map; every change makes a new epoch.
    Epoch(u64),
    "e"
);
id_type!(
    /// One storage daemon (one disk).
    OsdId(u32),
    "osd."
);
id_type!(
    /// A host (a machine), the default failure domain.
    HostId(u32),
    "host."
);
id_type!(
    /// A zone (a rack, a room): a group of hosts that can fail together.
    ZoneId(u32),
    "zone."
);
id_type!(
    /// A pool: replication rule and placement groups.
    PoolId(u32),
    "pool."
);
id_type!(
    /// A volume (a virtual disk).
    VolumeId(u64),
    "vol."
);
id_type!(
    /// A point-in-time snapshot of a volume.
    SnapshotId(u64),
    "snap."
);

/// A placement group: the unit of replication, ordering and recovery.
///
/// `seed` selects the group inside its pool (`0..pool.pg_count`). A PG of a
/// volume homed on a host carries that host: its primary lives there. Homed
/// and unhomed PGs with the same `(pool, seed)` share their replica choice, so
/// changing a volume's home moves one copy, not all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PgId {
    pub pool: PoolId,
    pub seed: u32,
    pub home: Option<HostId>,
}

impl PgId {
    /// An unhomed PG.
    pub fn new(pool: PoolId, seed: u32) -> Self {
        Self {
            pool,
            seed,
            home: None,
        }
    }
}

impl fmt::Display for PgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:x}", self.pool.0, self.seed)?;
        if let Some(home) = self.home {
            write!(f, "@{}", home.0)?;
        }
        Ok(())
    }
}

/// One object of a volume: `index` covers bytes
/// `[index * object_size, (index + 1) * object_size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectId {
    pub volume: VolumeId,
    pub index: u64,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.obj{}", self.volume, self.index)
    }
}

/// A placement weight in 1/65536 units (`Weight::ONE` is 1.0). Fixed point so
/// that every node computes bit-identical placements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Weight(pub u32);

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const ONE: Weight = Weight(WEIGHT_ONE);

    /// Returns the weight closest to `value` (clamped to the representable range).
    pub fn from_f64(value: f64) -> Weight {
        let raw = (value * WEIGHT_ONE as f64).round();
        Weight(raw.clamp(0.0, u32::MAX as f64) as u32)
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / WEIGHT_ONE as f64
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3}", self.as_f64())
    }
}
