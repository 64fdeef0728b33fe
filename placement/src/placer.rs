//! `Placer`: maps a placement group to its ordered acting set of OSDs.
//!
//! # How a PG is placed
//!
//! For each PG the placer walks a deterministic *candidate stream*. Candidate
//! `t` is found by descending the tree root -> zone -> host -> OSD, choosing at
//! each level the child with the best straw2 draw `ln(hash(pg, child, t)) /
//! weight`. Tree weights are the sums of the weights of every OSD in the map,
//! whatever its state. A candidate is skipped when its OSD is down or out, or
//! when its failure domain (host, or zone if the pool says so) already holds a
//! member. The first `size` candidates that survive form the acting set; the
//! first of them is the primary.
//!
//! Why this shape:
//! - Cost is linear in the depth of the tree (zones + hosts-per-zone +
//!   OSDs-per-host draws per candidate), not in the number of OSDs.
//! - An OSD that goes down or out leaves every tree weight alone, so no other
//!   candidate changes: only PGs that held that OSD get one new member each
//!   (exactly the data that has to move). The same holds for a whole host.
//! - Straw2 weights make each OSD's share proportional to its weight.
//! - Changing weights (adding an OSD, growing one) moves more than the
//!   minimum in any hierarchy; `transition` corrects that with exceptions.
//!
//! # Locality
//!
//! A PG of a homed volume (`PgId::home`) takes as primary the best-drawing
//! up+in OSD of its home host and as replicas the acting set of the unhomed PG
//! with the same `(pool, seed)`, minus any member in the home's failure
//! domain. Two homes therefore share replicas: moving a volume from host A to
//! host B moves the copy on A to B and (only if B's domain held a replica) one
//! replica, never the whole set. While the home host has no up OSD the PG uses
//! the unhomed set unchanged, and returns when the host does.
//!
//! # Exceptions
//!
//! `Pool::upmap` lists per-seed replacements `(from, to)` applied to the
//! computed set, as Ceph's upmap items; an exception whose target is not
//! eligible or would break the failure-domain rule is ignored.
//!
//! Rejected: a flat straw2 over all OSDs (optimal movement on every change but
//! O(OSDs) per PG: seconds per map at 10,000 OSDs), consistent-hash rings (no
//! per-level failure domains, poor balance), and hash-mod tables (all data
//! moves when they grow).

use std::collections::HashMap;

use crate::error::PlacementError;
use crate::hash::{hash2, hash3, inverse_weight, straw2_draw};
use crate::ids::{Epoch, HostId, OsdId, PgId, PoolId, ZoneId};
use crate::map::{ClusterMap, FailureDomain, Pool};

/// Candidates tried per member before the exhaustive fallback.
const TRIES_PER_MEMBER: u32 = 16;
/// Extra candidates tried per PG before the exhaustive fallback.
const TRIES_BASE: u32 = 32;
/// Try index used for the home host's OSD choice (never a stream index).
const HOME_TRY: u64 = u64::MAX - 1;

const ZONE_TAG: u64 = 1 << 40;
const HOST_TAG: u64 = 2 << 40;
const OSD_TAG: u64 = 3 << 40;

/// The ordered OSDs that hold a PG; the first is the primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActingSet {
    pub pg: PgId,
    pub members: Vec<OsdId>,
    /// The pool's size: fewer members means the set is degraded.
    pub size: u32,
}

impl ActingSet {
    /// Returns the primary, if the set has any member.
    pub fn primary(&self) -> Option<OsdId> {
        self.members.first().copied()
    }

    /// Returns whether the set has fewer members than the pool's size.
    pub fn is_degraded(&self) -> bool {
        (self.members.len() as u32) < self.size
    }
}

#[derive(Clone, Debug)]
struct ZoneNode {
    key: u64,
    inverse_weight: i64,
    hosts: std::ops::Range<usize>,
}

#[derive(Clone, Debug)]
struct HostNode {
    id: HostId,
    key: u64,
    inverse_weight: i64,
    osds: std::ops::Range<usize>,
}

#[derive(Clone, Debug)]
struct OsdNode {
    id: OsdId,
    key: u64,
    host_index: u32,
    zone_index: u32,
    inverse_weight: i64,
    eligible: bool,
}

/// An index of one map, built once per epoch, that answers placement
/// questions. Building costs O(OSDs); each lookup O(depth).
#[derive(Clone, Debug)]
pub struct Placer<'a> {
    map: &'a ClusterMap,
    zones: Vec<ZoneNode>,
    hosts: Vec<HostNode>,
    osds: Vec<OsdNode>,
    osd_index: HashMap<OsdId, u32>,
    host_index: HashMap<HostId, u32>,
}

/// One candidate member while a set is assembled: OSD index and domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Member {
    osd: u32,
    domain: u32,
}

impl<'a> Placer<'a> {
    /// Indexes `map`.
    pub fn new(map: &'a ClusterMap) -> Self {
        let mut zones = Vec::new();
        let mut hosts = Vec::new();
        let mut osds = Vec::new();
        // Group OSDs by host and hosts by zone, in id order (deterministic).
        let mut osds_by_host: HashMap<HostId, Vec<OsdId>> = HashMap::new();
        for (id, osd) in &map.osds {
            osds_by_host.entry(osd.host).or_default().push(*id);
        }
        let mut hosts_by_zone: HashMap<ZoneId, Vec<HostId>> = HashMap::new();
        for (id, host) in &map.hosts {
            hosts_by_zone.entry(host.zone).or_default().push(*id);
        }
        for zone_id in map.zones.keys() {
            let zone_index = zones.len() as u32;
            let hosts_start = hosts.len();
            let mut zone_weight: u64 = 0;
            for host_id in hosts_by_zone.get(zone_id).into_iter().flatten() {
                let host_index = hosts.len() as u32;
                let osds_start = osds.len();
                let mut host_weight: u64 = 0;
                for osd_id in osds_by_host.get(host_id).into_iter().flatten() {
                    let osd = &map.osds[osd_id];
                    host_weight += osd.weight.0 as u64;
                    osds.push(OsdNode {
                        id: *osd_id,
                        key: OSD_TAG | osd_id.0 as u64,
                        host_index,
                        zone_index,
                        inverse_weight: inverse_weight(osd.weight.0),
                        eligible: osd.is_eligible(),
                    });
                }
                zone_weight += host_weight;
                hosts.push(HostNode {
                    id: *host_id,
                    key: HOST_TAG | host_id.0 as u64,
                    inverse_weight: inverse_weight(clamp_weight(host_weight)),
                    osds: osds_start..osds.len(),
                });
            }
            zones.push(ZoneNode {
                key: ZONE_TAG | zone_id.0 as u64,
                inverse_weight: inverse_weight(clamp_weight(zone_weight)),
                hosts: hosts_start..hosts.len(),
            });
        }
        let osd_index = osds
            .iter()
            .enumerate()
            .map(|(i, o)| (o.id, i as u32))
            .collect();
        let host_index = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.id, i as u32))
            .collect();
        Self {
            map,
            zones,
            hosts,
            osds,
            osd_index,
            host_index,
        }
    }

    /// Returns the map this placer indexes.
    pub fn map(&self) -> &'a ClusterMap {
        self.map
    }

    /// Returns how many failure domains of `kind` have an eligible OSD.
    pub fn eligible_domains(&self, kind: FailureDomain) -> usize {
        let mut seen = vec![false; self.domain_count(kind)];
        for osd in self.osds.iter().filter(|o| o.eligible) {
            seen[self.domain_of(osd, kind) as usize] = true;
        }
        seen.into_iter().filter(|s| *s).count()
    }

    /// Checks that `pool` can be placed in full: enough failure domains with
    /// an eligible OSD. Used to refuse pools that could only ever be degraded.
    pub fn check_pool(&self, pool: PoolId) -> Result<(), PlacementError> {
        let rule = self
            .map
            .pools
            .get(&pool)
            .ok_or(PlacementError::PoolNotFound(pool))?;
        let available = self.eligible_domains(rule.failure_domain);
        if available < rule.size as usize {
            return Err(PlacementError::InsufficientFailureDomains {
                pool,
                size: rule.size,
                failure_domain: rule.failure_domain,
                available,
            });
        }
        Ok(())
    }

    /// Returns the acting set of `pg`: computed placement, the pool's
    /// exceptions, then the home host's primary.
    ///
    /// With fewer eligible failure domains than the pool's size the set is
    /// degraded (shorter), never doubled up in a domain. It is an error only
    /// when the pool is missing or no OSD at all is eligible.
    pub fn acting_set(&self, pg: PgId) -> Result<ActingSet, PlacementError> {
        let pool = self
            .map
            .pools
            .get(&pg.pool)
            .ok_or(PlacementError::PoolNotFound(pg.pool))?;
        let base = self.effective_members(pg.pool, pool, pg.seed);
        let members = match pg.home.and_then(|home| self.home_osd(pg, home)) {
            Some(primary) => {
                let home_domain = self.domain_of(&self.osds[primary as usize], pool.failure_domain);
                let mut members = vec![self.osds[primary as usize].id];
                members.extend(
                    base.iter()
                        .filter(|m| m.domain != home_domain)
                        .take(pool.size as usize - 1)
                        .map(|m| self.osds[m.osd as usize].id),
                );
                members
            }
            None => base.iter().map(|m| self.osds[m.osd as usize].id).collect(),
        };
        if members.is_empty() {
            return Err(PlacementError::NoEligibleOsd { pg });
        }
        Ok(ActingSet {
            pg,
            members,
            size: pool.size,
        })
    }

    /// Returns the computed set of the unhomed PG `(pool, seed)` before
    /// exceptions.
    pub fn raw_set(&self, pool_id: PoolId, seed: u32) -> Result<Vec<OsdId>, PlacementError> {
        let pool = self
            .map
            .pools
            .get(&pool_id)
            .ok_or(PlacementError::PoolNotFound(pool_id))?;
        Ok(self.ids(&self.raw_members(pool_id, pool, seed)))
    }

    /// Returns the set of the unhomed PG `(pool, seed)` with exceptions applied.
    pub fn base_set(&self, pool_id: PoolId, seed: u32) -> Result<Vec<OsdId>, PlacementError> {
        let pool = self
            .map
            .pools
            .get(&pool_id)
            .ok_or(PlacementError::PoolNotFound(pool_id))?;
        Ok(self.ids(&self.effective_members(pool_id, pool, seed)))
    }

    /// Returns the failure domain (as an index) of `osd` under `kind`, or
    /// `None` for an OSD missing from the map.
    pub fn domain(&self, osd: OsdId, kind: FailureDomain) -> Option<u32> {
        let index = *self.osd_index.get(&osd)?;
        Some(self.domain_of(&self.osds[index as usize], kind))
    }

    /// Returns the host of `osd`.
    pub fn host_of(&self, osd: OsdId) -> Option<HostId> {
        let index = *self.osd_index.get(&osd)?;
        Some(self.hosts[self.osds[index as usize].host_index as usize].id)
    }

    /// Returns whether placement may choose `osd`.
    pub fn is_eligible(&self, osd: OsdId) -> bool {
        self.osd_index
            .get(&osd)
            .is_some_and(|i| self.osds[*i as usize].eligible)
    }

    /// Returns whether `members` respects the pool's rule: distinct, eligible
    /// OSDs in distinct failure domains.
    pub fn is_valid_set(&self, members: &[OsdId], kind: FailureDomain) -> bool {
        let mut domains = Vec::with_capacity(members.len());
        for (i, osd) in members.iter().enumerate() {
            if !self.is_eligible(*osd) || members[..i].contains(osd) {
                return false;
            }
            let Some(domain) = self.domain(*osd, kind) else {
                return false;
            };
            if domains.contains(&domain) {
                return false;
            }
            domains.push(domain);
        }
        true
    }

    /// Applies exceptions `(from, to)` to `raw` by position (each `from` is
    /// looked up in `raw`, so the order of exceptions does not matter). An
    /// exception is dropped when its result would be ineligible, duplicated or
    /// share a failure domain; the result is always a valid set.
    pub fn apply_exceptions(
        &self,
        raw: &[OsdId],
        exceptions: &[(OsdId, OsdId)],
        kind: FailureDomain,
    ) -> Vec<OsdId> {
        let mut result = raw.to_vec();
        let mut substituted = vec![false; raw.len()];
        for (from, to) in exceptions {
            if let Some(pos) = raw.iter().position(|m| m == from)
                && !substituted[pos]
                && self.is_eligible(*to)
            {
                result[pos] = *to;
                substituted[pos] = true;
            }
        }
        // Revert substitutions that conflict, until the set is valid. A raw
        // member never conflicts with another raw member, so this ends.
        loop {
            let mut reverted = false;
            for pos in 0..result.len() {
                if !substituted[pos] {
                    continue;
                }
                let conflict = result.iter().enumerate().any(|(other, osd)| {
                    other != pos
                        && (*osd == result[pos]
                            || self.domain(*osd, kind) == self.domain(result[pos], kind))
                });
                if conflict {
                    result[pos] = raw[pos];
                    substituted[pos] = false;
                    reverted = true;
                }
            }
            if !reverted {
                break;
            }
        }
        debug_assert!(self.is_valid_set(&result, kind));
        result
    }

    fn ids(&self, members: &[Member]) -> Vec<OsdId> {
        members
            .iter()
            .map(|m| self.osds[m.osd as usize].id)
            .collect()
    }

    fn effective_members(&self, pool_id: PoolId, pool: &Pool, seed: u32) -> Vec<Member> {
        let raw = self.raw_members(pool_id, pool, seed);
        match pool.upmap.get(&seed) {
            None => raw,
            Some(exceptions) => {
                let applied =
                    self.apply_exceptions(&self.ids(&raw), exceptions, pool.failure_domain);
                applied
                    .iter()
                    .map(|id| {
                        let osd = self.osd_index[id];
                        Member {
                            osd,
                            domain: self.domain_of(&self.osds[osd as usize], pool.failure_domain),
                        }
                    })
                    .collect()
            }
        }
    }

    fn raw_members(&self, pool_id: PoolId, pool: &Pool, seed: u32) -> Vec<Member> {
        let key = base_key(pool_id, seed);
        self.select(key, pool.size as usize, pool.failure_domain)
    }

    /// Walks the candidate stream of `key` until `count` members are found.
    fn select(&self, key: u64, count: usize, kind: FailureDomain) -> Vec<Member> {
        let mut members: Vec<Member> = Vec::with_capacity(count);
        if self.zones.is_empty() || count == 0 {
            return members;
        }
        let tries = TRIES_BASE + TRIES_PER_MEMBER * count as u32;
        for t in 0..tries as u64 {
            if let Some(member) = self.descend(key, t, kind, &members) {
                members.push(member);
                if members.len() == count {
                    return members;
                }
            }
        }
        self.fill_exhaustively(key, count, kind, &mut members);
        members
    }

    /// Returns candidate `t` of `key` if it is eligible and its failure
    /// domain is free. Stops descending as soon as the domain is taken.
    fn descend(&self, key: u64, t: u64, kind: FailureDomain, taken: &[Member]) -> Option<Member> {
        let zone_index = best(self.zones.iter().enumerate(), |(_, zone)| {
            straw2_draw(hash3(key, zone.key, t), zone.inverse_weight)
        })?
        .0;
        if kind == FailureDomain::Zone && taken.iter().any(|m| m.domain == zone_index as u32) {
            return None;
        }
        let zone = &self.zones[zone_index];
        let host_index = zone.hosts.start
            + best(
                self.hosts[zone.hosts.clone()].iter().enumerate(),
                |(_, host)| straw2_draw(hash3(key, host.key, t), host.inverse_weight),
            )?
            .0;
        if kind == FailureDomain::Host && taken.iter().any(|m| m.domain == host_index as u32) {
            return None;
        }
        let host = &self.hosts[host_index];
        let osd_index = host.osds.start
            + best(
                self.osds[host.osds.clone()].iter().enumerate(),
                |(_, osd)| straw2_draw(hash3(key, osd.key, t), osd.inverse_weight),
            )?
            .0;
        let osd = &self.osds[osd_index];
        if !osd.eligible {
            return None;
        }
        Some(Member {
            osd: osd_index as u32,
            domain: self.domain_of(osd, kind),
        })
    }

    /// The stream ran out (tiny or mostly-down clusters): pick the remaining
    /// members by a straw2 over every eligible OSD in a free domain. Costs
    /// O(OSDs) but only runs when the stream failed.
    fn fill_exhaustively(
        &self,
        key: u64,
        count: usize,
        kind: FailureDomain,
        members: &mut Vec<Member>,
    ) {
        while members.len() < count {
            let slot = members.len() as u64;
            let choice = best(
                self.osds.iter().enumerate().filter(|(_, osd)| {
                    osd.eligible
                        && !members
                            .iter()
                            .any(|m| m.domain == self.domain_of(osd, kind))
                }),
                |(_, osd)| {
                    straw2_draw(hash3(key, osd.key, u64::MAX - 2 - slot), osd.inverse_weight)
                },
            );
            match choice {
                Some((index, osd)) => members.push(Member {
                    osd: index as u32,
                    domain: self.domain_of(osd, kind),
                }),
                None => break,
            }
        }
    }

    /// Returns the home host's OSD for `pg`, if the host has an eligible one.
    fn home_osd(&self, pg: PgId, home: HostId) -> Option<u32> {
        let host = &self.hosts[*self.host_index.get(&home)? as usize];
        let key = base_key(pg.pool, pg.seed);
        best(
            self.osds[host.osds.clone()]
                .iter()
                .enumerate()
                .filter(|(_, osd)| osd.eligible),
            |(_, osd)| straw2_draw(hash3(key, osd.key, HOME_TRY), osd.inverse_weight),
        )
        .map(|(i, _)| (host.osds.start + i) as u32)
    }

    fn domain_of(&self, osd: &OsdNode, kind: FailureDomain) -> u32 {
        match kind {
            FailureDomain::Host => osd.host_index,
            FailureDomain::Zone => osd.zone_index,
        }
    }

    fn domain_count(&self, kind: FailureDomain) -> usize {
        match kind {
            FailureDomain::Host => self.hosts.len(),
            FailureDomain::Zone => self.zones.len(),
        }
    }
}

/// The placement key of the unhomed PG `(pool, seed)`.
fn base_key(pool: PoolId, seed: u32) -> u64 {
    hash2(pool.0 as u64, seed as u64)
}

fn clamp_weight(weight: u64) -> u32 {
    weight.min(u32::MAX as u64) as u32
}

/// Returns the item with the largest draw; ties go to the first. Items whose
/// draw is `i64::MIN` (zero weight) never win.
fn best<T>(items: impl Iterator<Item = T>, mut draw: impl FnMut(&T) -> i64) -> Option<T> {
    let mut winner: Option<(i64, T)> = None;
    for item in items {
        let value = draw(&item);
        if value == i64::MIN {
            continue;
        }
        if winner.as_ref().is_none_or(|(best, _)| value > *best) {
            winner = Some((value, item));
        }
    }
    winner.map(|(_, item)| item)
}

/// PGs an [`ActingCache`] remembers before it starts over.
const ACTING_CACHE_PGS: usize = 1 << 16;

/// Acting sets of one map epoch, each computed once.
///
/// The data path needs a PG's acting set for every op, on the client and
/// on every OSD the op reaches. [`Placer::new`] indexes the whole map and
/// each set costs straw2 draws: ~2% of an OSD's CPU at 4 KiB random writes,
/// for the same answer every time until the map changes. A map's epoch
/// names its content (the monitors never publish two maps under one
/// epoch), so the cache starts over when it sees another epoch. Errors are
/// not remembered.
#[derive(Debug, Default)]
pub struct ActingCache {
    inner: std::sync::Mutex<(Option<Epoch>, HashMap<PgId, ActingSet>)>,
}

impl ActingCache {
    /// Returns `Placer::new(map).acting_set(pg)`.
    pub fn acting_set(&self, map: &ClusterMap, pg: PgId) -> Result<ActingSet, PlacementError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (epoch, sets) = &mut *inner;
        if *epoch != Some(map.epoch) || sets.len() >= ACTING_CACHE_PGS {
            *epoch = Some(map.epoch);
            sets.clear();
        }
        if let Some(set) = sets.get(&pg) {
            return Ok(set.clone());
        }
        let set = Placer::new(map).acting_set(pg)?;
        sets.insert(pg, set.clone());
        Ok(set)
    }
}
