//! The balancer: explicit exceptions that even out PGs per OSD.
//!
//! Hash-based placement leaves a binomial spread: at 80 PGs per OSD some OSDs
//! hold 40% more than the mean. The balancer moves single PG members from
//! OSDs above their weight-proportional target to OSDs below it (and only
//! when the receiver ends less loaded, relative to its target, than the giver
//! was, so the most loaded OSD never gets worse), recording
//! each move as an exception `(from, to)` on the pool, as Ceph's upmap
//! balancer does. Every move keeps the pool's rule: the target is eligible,
//! not already in the set, and in a failure domain the rest of the set does
//! not use. Homed PGs follow their home host for the primary and share the
//! balanced replica sets of their unhomed twins; their primaries are not
//! balanced (that load is where the workload is, by design).

use std::collections::HashMap;

use crate::error::PlacementError;
use crate::ids::{OsdId, PoolId};
use crate::map::ClusterMap;
use crate::placer::Placer;
use crate::transition::positional_exceptions;

/// Balancer settings.
#[derive(Clone, Debug)]
pub struct Balancer {
    /// Most PG members moved in one run. Default 100,000.
    pub max_moves: usize,
    /// Allowed excess over an OSD's target, as a fraction: an OSD is
    /// overfull above `ceil(target * (1 + max_deviation))`. Default 0.0.
    pub max_deviation: f64,
}

impl Default for Balancer {
    fn default() -> Self {
        Self {
            max_moves: 100_000,
            max_deviation: 0.0,
        }
    }
}

/// What one balancer run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BalanceReport {
    /// PG members moved.
    pub moves: usize,
    /// PGs of the pool that carry exceptions afterwards.
    pub pgs_with_exceptions: usize,
    /// Largest `count / target` over eligible OSDs, before and after.
    pub max_over_target_before: f64,
    pub max_over_target_after: f64,
}

impl Balancer {
    /// Evens out the PGs of `pool_id` over its eligible OSDs by adding
    /// exceptions to the pool in `map`.
    pub fn balance(
        &self,
        map: &mut ClusterMap,
        pool_id: PoolId,
    ) -> Result<BalanceReport, PlacementError> {
        let (report, upmap) = {
            let placer = Placer::new(map);
            let pool = map
                .pools
                .get(&pool_id)
                .ok_or(PlacementError::PoolNotFound(pool_id))?;
            let kind = pool.failure_domain;
            let mut raw_sets = Vec::with_capacity(pool.pg_count as usize);
            let mut sets = Vec::with_capacity(pool.pg_count as usize);
            for seed in 0..pool.pg_count {
                raw_sets.push(placer.raw_set(pool_id, seed)?);
                sets.push(placer.base_set(pool_id, seed)?);
            }

            // Eligible OSDs, their weight-proportional targets and loads.
            let osds: Vec<OsdId> = map
                .osds
                .iter()
                .filter(|(_, osd)| osd.is_eligible())
                .map(|(id, _)| *id)
                .collect();
            let index: HashMap<OsdId, usize> =
                osds.iter().enumerate().map(|(i, id)| (*id, i)).collect();
            let weights: Vec<f64> = osds.iter().map(|id| map.osds[id].weight.as_f64()).collect();
            let weight_total: f64 = weights.iter().sum();
            let domains: Vec<Option<u32>> =
                osds.iter().map(|id| placer.domain(*id, kind)).collect();
            let mut counts = vec![0usize; osds.len()];
            let mut pgs_on: Vec<Vec<u32>> = vec![Vec::new(); osds.len()];
            for (seed, set) in sets.iter().enumerate() {
                for member in set {
                    if let Some(i) = index.get(member) {
                        counts[*i] += 1;
                        pgs_on[*i].push(seed as u32);
                    }
                }
            }
            let total: usize = counts.iter().sum();
            if osds.is_empty() || weight_total <= 0.0 || total == 0 {
                return Ok(BalanceReport::default());
            }
            let targets: Vec<f64> = weights
                .iter()
                .map(|w| total as f64 * w / weight_total)
                .collect();
            let caps: Vec<usize> = targets
                .iter()
                .map(|t| (t * (1.0 + self.max_deviation)).ceil() as usize)
                .collect();
            let max_ratio = |counts: &[usize]| {
                counts
                    .iter()
                    .zip(&targets)
                    .filter(|(_, t)| **t > 0.0)
                    .map(|(c, t)| *c as f64 / t)
                    .fold(0.0, f64::max)
            };
            let max_over_target_before = max_ratio(&counts);

            let mut moves = 0;
            'passes: loop {
                let mut overfull: Vec<usize> =
                    (0..osds.len()).filter(|i| counts[*i] > caps[*i]).collect();
                if overfull.is_empty() {
                    break;
                }
                overfull.sort_by(|a, b| {
                    let excess = |i: &usize| counts[*i] as f64 - targets[*i];
                    excess(b).total_cmp(&excess(a)).then(a.cmp(b))
                });
                let mut underfull: Vec<usize> = (0..osds.len())
                    .filter(|i| (counts[*i] as f64) < targets[*i])
                    .collect();
                underfull.sort_by(|a, b| {
                    let deficit = |i: &usize| targets[*i] - counts[*i] as f64;
                    deficit(b).total_cmp(&deficit(a)).then(a.cmp(b))
                });
                let mut progress = false;
                for from in overfull {
                    let candidates = pgs_on[from].clone();
                    for seed in candidates {
                        if counts[from] <= caps[from] {
                            break;
                        }
                        let set = &sets[seed as usize];
                        let Some(pos) = set.iter().position(|m| *m == osds[from]) else {
                            continue;
                        };
                        let used: Vec<Option<u32>> = set
                            .iter()
                            .enumerate()
                            .filter(|(p, _)| *p != pos)
                            .map(|(_, m)| placer.domain(*m, kind))
                            .collect();
                        // The receiver must end below the giver's load
                        // relative to target: a light OSD (target 1.3 PGs)
                        // taking a second PG would be at 1.5x, worse than a
                        // giver at 5 of 4. So each move lowers the larger of
                        // the pair's ratios and the worst OSD never gets worse.
                        let from_ratio = counts[from] as f64 / targets[from];
                        let choice = underfull.iter().copied().find(|to| {
                            counts[*to] < caps[*to]
                                && (counts[*to] as f64) < targets[*to]
                                && ((counts[*to] + 1) as f64 / targets[*to]) < from_ratio
                                && !set.contains(&osds[*to])
                                && !used.contains(&domains[*to])
                        });
                        let Some(to) = choice else { continue };
                        sets[seed as usize][pos] = osds[to];
                        counts[from] -= 1;
                        counts[to] += 1;
                        pgs_on[from].retain(|s| *s != seed);
                        pgs_on[to].push(seed);
                        moves += 1;
                        progress = true;
                        if moves >= self.max_moves {
                            break 'passes;
                        }
                    }
                }
                if !progress {
                    break;
                }
            }

            let mut upmap = pool.upmap.clone();
            let mut changed = 0;
            for (seed, (raw, set)) in raw_sets.iter().zip(&sets).enumerate() {
                let exceptions = positional_exceptions(raw, set);
                let seed = seed as u32;
                if exceptions.is_empty() {
                    upmap.remove(&seed);
                } else {
                    debug_assert!(
                        same_members(&placer.apply_exceptions(raw, &exceptions, kind), set),
                        "balancer exceptions must reproduce the balanced set"
                    );
                    upmap.insert(seed, exceptions);
                    changed += 1;
                }
            }
            let report = BalanceReport {
                moves,
                pgs_with_exceptions: changed,
                max_over_target_before,
                max_over_target_after: max_ratio(&counts),
            };
            (report, upmap)
        };
        if let Some(pool) = map.pools.get_mut(&pool_id) {
            pool.upmap = upmap;
        }
        Ok(report)
    }
}

fn same_members(a: &[OsdId], b: &[OsdId]) -> bool {
    a.len() == b.len() && a.iter().all(|m| b.contains(m))
}
