//! Movement-minimising transitions between two maps.
//!
//! Marking an OSD (or a whole host) down or out moves only the data it held:
//! the placer's tree weights do not change. Changing weights does more: a new
//! OSD raises its host's and zone's weight, so PGs drift into that zone and
//! spread over all its hosts, and in a three-level tree about three times the
//! new OSD's share moves. [`plan_transition`] corrects this the way operators
//! of Ceph do by hand with upmap: after computing the new placement it pins
//! every PG to where its data already is, except where the change requires a
//! move: a member that is no longer eligible is replaced, and an OSD that
//! gained weight or came back (a new OSD, a returning one) joins exactly the
//! PGs the new placement gives it, each replacing one member. The balancer
//! later evens out what remains, and its moves are counted as its own.

use std::collections::HashSet;

use crate::ids::{OsdId, PoolId};
use crate::map::{ClusterMap, Pool, Upmap};
use crate::placer::Placer;

/// What [`plan_transition`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransitionReport {
    /// PGs whose exceptions were rewritten to hold data in place.
    pub pgs_pinned: usize,
    /// PGs whose exceptions became unnecessary and were dropped.
    pub pgs_unpinned: usize,
}

/// Rewrites `new`'s per-pool exceptions so that each PG's set under `new`
/// differs from its set under `old` only where the change requires it.
///
/// Pools that are missing from `old`, or whose size, failure domain or PG
/// count changed, are left alone: their placement changes as a whole.
pub fn plan_transition(old: &ClusterMap, new: &mut ClusterMap) -> TransitionReport {
    let gainers = gainers(old, new);
    let mut report = TransitionReport::default();
    let mut rewritten: Vec<(PoolId, Upmap)> = Vec::new();
    {
        let old_placer = Placer::new(old);
        let new_placer = Placer::new(new);
        for (pool_id, pool) in &new.pools {
            let Some(old_pool) = old.pools.get(pool_id) else {
                continue;
            };
            if !same_rule(old_pool, pool) {
                continue;
            }
            let mut upmap = pool.upmap.clone();
            for seed in 0..pool.pg_count {
                let (Ok(before), Ok(raw)) = (
                    old_placer.base_set(*pool_id, seed),
                    new_placer.raw_set(*pool_id, seed),
                ) else {
                    continue;
                };
                let carried = pool.upmap.get(&seed).map(Vec::as_slice).unwrap_or(&[]);
                let current = new_placer.apply_exceptions(&raw, carried, pool.failure_domain);
                if current == before {
                    continue;
                }
                let target = target_set(&new_placer, pool, &before, &raw, &current, &gainers);
                let exceptions = positional_exceptions(&raw, &target);
                if exceptions.is_empty() {
                    if upmap.remove(&seed).is_some() {
                        report.pgs_unpinned += 1;
                    }
                } else if upmap.get(&seed) != Some(&exceptions) {
                    upmap.insert(seed, exceptions);
                    report.pgs_pinned += 1;
                }
            }
            rewritten.push((*pool_id, upmap));
        }
    }
    for (pool_id, upmap) in rewritten {
        if let Some(pool) = new.pools.get_mut(&pool_id) {
            pool.upmap = upmap;
        }
    }
    report
}

/// OSDs that gained weight or eligibility from `old` to `new`.
fn gainers(old: &ClusterMap, new: &ClusterMap) -> HashSet<OsdId> {
    new.osds
        .iter()
        .filter(|(id, osd)| match old.osds.get(id) {
            None => osd.is_eligible(),
            Some(before) => {
                osd.is_eligible() && (!before.is_eligible() || osd.weight > before.weight)
            }
        })
        .map(|(id, _)| *id)
        .collect()
}

fn same_rule(a: &Pool, b: &Pool) -> bool {
    a.size == b.size && a.failure_domain == b.failure_domain && a.pg_count == b.pg_count
}

/// The set a PG should have after the change: its old members that are still
/// eligible, the gainers the new placement gives it, then the new placement's
/// choices for any free slot.
fn target_set(
    placer: &Placer<'_>,
    pool: &Pool,
    before: &[OsdId],
    raw: &[OsdId],
    current: &[OsdId],
    gainers: &HashSet<OsdId>,
) -> Vec<OsdId> {
    let kind = pool.failure_domain;
    let size = pool.size as usize;
    let domain = |osd: &OsdId| placer.domain(*osd, kind);
    let mut kept: Vec<OsdId> = before
        .iter()
        .copied()
        .filter(|osd| placer.is_eligible(*osd))
        .collect();
    for gainer in raw.iter().filter(|osd| gainers.contains(osd)) {
        if kept.contains(gainer) {
            continue;
        }
        if let Some(pos) = kept.iter().position(|m| domain(m) == domain(gainer)) {
            // The domain is taken: only by someone the new placement dropped.
            if !raw.contains(&kept[pos]) {
                kept[pos] = *gainer;
            }
        } else if kept.len() < size {
            kept.push(*gainer);
        } else if let Some(pos) = kept.iter().rposition(|m| !raw.contains(m)) {
            kept[pos] = *gainer;
        }
    }
    for candidate in raw.iter().chain(current) {
        if kept.len() >= size {
            break;
        }
        if !kept.contains(candidate) && !kept.iter().any(|m| domain(m) == domain(candidate)) {
            kept.push(*candidate);
        }
    }
    kept
}

/// Exceptions that turn `raw` into `target` by replacing, position by
/// position, each raw member not in `target` with a target member not in
/// `raw`. The placer validates them when applying.
pub(crate) fn positional_exceptions(raw: &[OsdId], target: &[OsdId]) -> Vec<(OsdId, OsdId)> {
    let mut extras = target.iter().filter(|osd| !raw.contains(osd));
    let mut exceptions = Vec::new();
    for member in raw {
        if !target.contains(member)
            && let Some(replacement) = extras.next()
        {
            exceptions.push((*member, *replacement));
        }
    }
    exceptions
}
