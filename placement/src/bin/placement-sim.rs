//! placement-sim: measures balance, data movement, locality and speed of the
//! placement math on a synthetic cluster (thousands of OSDs), in one process.
//!
//! `cargo run --release -p basalt-placement --bin placement-sim -- \
//!     --zones 40 --hosts 1000 --osds-per-host 10 --pgs 262144 --size 3 [--json]`

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, bail};
use basalt_placement::{
    Balancer, ClusterMap, Epoch, FailureDomain, HostId, OsdId, PgId, Placer, Pool, PoolId, Weight,
    hash::hash2, plan_transition,
};
use clap::Parser;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Simulate Basalt placement on a synthetic cluster")]
struct Args {
    /// Zones (racks); hosts are spread over them round-robin.
    #[arg(long, default_value_t = 40)]
    zones: u32,
    /// Hosts in the cluster.
    #[arg(long, default_value_t = 1000)]
    hosts: u32,
    /// OSDs on each host, each of weight 1.
    #[arg(long, default_value_t = 10)]
    osds_per_host: u32,
    /// Placement groups in the pool (a power of two).
    #[arg(long, default_value_t = 262_144)]
    pgs: u32,
    /// Copies per object.
    #[arg(long, default_value_t = 3)]
    size: u32,
    /// What two copies must not share: host or zone.
    #[arg(long, default_value = "host")]
    failure_domain: FailureDomain,
    /// Homed PGs sampled for the locality figures.
    #[arg(long, default_value_t = 20_000)]
    homed_pgs: u32,
    /// Balancer tolerance over each OSD's target (0.0 aims at ceil(target)).
    #[arg(long, default_value_t = 0.0)]
    max_deviation: f64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Debug)]
struct Report {
    zones: u32,
    hosts: u32,
    osds: usize,
    pgs: u32,
    size: u32,
    failure_domain: String,
    mapping_seconds: f64,
    max_over_mean_raw: f64,
    min_over_mean_raw: f64,
    stddev_over_mean_raw: f64,
    max_over_mean_balanced: f64,
    min_over_mean_balanced: f64,
    stddev_over_mean_balanced: f64,
    balancer_moves: usize,
    balancer_seconds: f64,
    degraded_pgs: usize,
    failure_domain_violations: usize,
    moved_fraction_add_osd: f64,
    optimal_fraction_add_osd: f64,
    moved_fraction_add_osd_without_transition: f64,
    balancer_followup_moves_add_osd: usize,
    moved_fraction_remove_osd: f64,
    optimal_fraction_remove_osd: f64,
    balancer_followup_moves_remove_osd: usize,
    moved_fraction_remove_host: f64,
    optimal_fraction_remove_host: f64,
    balancer_followup_moves_remove_host: usize,
    home_primary_fraction: f64,
    home_primary_fraction_after_remove_host: f64,
    moved_fraction_change_home: f64,
    optimal_fraction_change_home: f64,
    weighted_error: f64,
    weighted_max_over_target_balanced: f64,
}

type Sets = Vec<Vec<OsdId>>;

const POOL: PoolId = PoolId(0);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.pgs.is_power_of_two() {
        bail!("--pgs must be a power of two, got {}", args.pgs);
    }
    if args.zones == 0 || args.hosts == 0 || args.osds_per_host == 0 {
        bail!("--zones, --hosts and --osds-per-host must be at least 1");
    }
    let map = build_map(&args, |_| Weight::ONE)?;
    Placer::new(&map)
        .check_pool(POOL)
        .context("the pool cannot be placed on this cluster")?;
    let total = args.pgs as usize * args.size as usize;
    let mut violations = 0;

    progress("mapping every PG");
    let started = Instant::now();
    let raw = map_all(&map)?;
    let mapping_seconds = started.elapsed().as_secs_f64();
    violations += count_violations(&map, &raw);
    let degraded_pgs = raw
        .iter()
        .filter(|set| set.len() < args.size as usize)
        .count();
    let raw_stats = spread(&map, &raw);

    progress("balancing");
    let mut balanced_map = map.clone();
    let started = Instant::now();
    let balance = Balancer {
        max_deviation: args.max_deviation,
        ..Balancer::default()
    }
    .balance(&mut balanced_map, POOL)?;
    let balancer_seconds = started.elapsed().as_secs_f64();
    let balanced = map_all(&balanced_map)?;
    violations += count_violations(&balanced_map, &balanced);
    let balanced_stats = spread(&balanced_map, &balanced);

    progress("adding an OSD");
    let add_host = HostId(args.hosts / 2);
    let mut added = balanced_map.clone();
    added.epoch = Epoch(added.epoch.0 + 1);
    let new_osd = added.add_osd(add_host, Weight::ONE)?;
    let without_transition = map_all(&added)?;
    violations += count_violations(&added, &without_transition);
    let moved_without_transition = moved(&balanced, &without_transition);
    let added_change = change(
        &balanced_map,
        added,
        &balanced,
        total,
        &mut violations,
        |after| replicas_on(after, |osd| osd == new_osd),
    )?;

    progress("removing an OSD");
    let removed_osd = OsdId(args.hosts * args.osds_per_host / 3);
    let mut removed = balanced_map.clone();
    removed.epoch = Epoch(removed.epoch.0 + 1);
    if let Some(osd) = removed.osds.get_mut(&removed_osd) {
        osd.in_ = false;
    }
    let removed_change = change(
        &balanced_map,
        removed,
        &balanced,
        total,
        &mut violations,
        |_| replicas_on(&balanced, |osd| osd == removed_osd),
    )?;

    progress("removing a host");
    let removed_host = HostId(args.hosts / 3);
    let mut host_down = balanced_map.clone();
    host_down.epoch = Epoch(host_down.epoch.0 + 1);
    for osd in host_down.osds.values_mut() {
        if osd.host == removed_host {
            osd.up = false;
        }
    }
    let host_map = host_down.clone();
    let host_change = change(
        &balanced_map,
        host_down,
        &balanced,
        total,
        &mut violations,
        |_| {
            replicas_on(&balanced, |osd| {
                balanced_map.osds[&osd].host == removed_host
            })
        },
    )?;

    progress("checking locality");
    let homes = Homes::sample(&args);
    let locality = homes.measure(&balanced_map, &mut violations)?;
    let locality_after = homes.measure(&host_map, &mut violations)?;
    let change_home = homes.change_home(&balanced_map, &args)?;

    progress("weighted cluster");
    let weighted = build_map(&args, |host| {
        if host.0 % 2 == 0 {
            Weight::from_f64(2.0)
        } else {
            Weight::ONE
        }
    })?;
    let weighted_raw = map_all(&weighted)?;
    violations += count_violations(&weighted, &weighted_raw);
    let weighted_error = class_error(&weighted, &weighted_raw);
    let mut weighted_balanced = weighted.clone();
    let weighted_report = Balancer {
        max_deviation: args.max_deviation,
        ..Balancer::default()
    }
    .balance(&mut weighted_balanced, POOL)?;

    let report = Report {
        zones: args.zones,
        hosts: args.hosts,
        osds: map.osds.len(),
        pgs: args.pgs,
        size: args.size,
        failure_domain: args.failure_domain.to_string(),
        mapping_seconds,
        max_over_mean_raw: raw_stats.max_over_mean,
        min_over_mean_raw: raw_stats.min_over_mean,
        stddev_over_mean_raw: raw_stats.stddev_over_mean,
        max_over_mean_balanced: balanced_stats.max_over_mean,
        min_over_mean_balanced: balanced_stats.min_over_mean,
        stddev_over_mean_balanced: balanced_stats.stddev_over_mean,
        balancer_moves: balance.moves,
        balancer_seconds,
        degraded_pgs,
        failure_domain_violations: violations,
        moved_fraction_add_osd: added_change.moved_fraction,
        optimal_fraction_add_osd: added_change.optimal_fraction,
        moved_fraction_add_osd_without_transition: moved_without_transition as f64 / total as f64,
        balancer_followup_moves_add_osd: added_change.followup_moves,
        moved_fraction_remove_osd: removed_change.moved_fraction,
        optimal_fraction_remove_osd: removed_change.optimal_fraction,
        balancer_followup_moves_remove_osd: removed_change.followup_moves,
        moved_fraction_remove_host: host_change.moved_fraction,
        optimal_fraction_remove_host: host_change.optimal_fraction,
        balancer_followup_moves_remove_host: host_change.followup_moves,
        home_primary_fraction: locality,
        home_primary_fraction_after_remove_host: locality_after,
        moved_fraction_change_home: change_home,
        optimal_fraction_change_home: 1.0 / args.size as f64,
        weighted_error,
        weighted_max_over_target_balanced: weighted_report.max_over_target_after,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report)?;
    }
    Ok(())
}

fn progress(step: &str) {
    eprintln!("placement-sim: {step}...");
}

fn build_map(args: &Args, host_weight: impl Fn(HostId) -> Weight) -> anyhow::Result<ClusterMap> {
    let mut map = ClusterMap::new();
    let zones: Vec<_> = (0..args.zones)
        .map(|z| map.ensure_zone(&format!("zone{z}")))
        .collect();
    for h in 0..args.hosts {
        let host = map.ensure_host(&format!("host{h}"), zones[(h % args.zones) as usize])?;
        for _ in 0..args.osds_per_host {
            map.add_osd(host, host_weight(host))?;
        }
    }
    map.add_pool(Pool {
        name: "sim".into(),
        size: args.size,
        min_size: args.size.min(2),
        pg_count: args.pgs,
        failure_domain: args.failure_domain,
        upmap: BTreeMap::new(),
    })?;
    Ok(map)
}

fn map_all(map: &ClusterMap) -> anyhow::Result<Sets> {
    let placer = Placer::new(map);
    let pool = &map.pools[&POOL];
    (0..pool.pg_count)
        .map(|seed| Ok(placer.acting_set(PgId::new(POOL, seed))?.members))
        .collect()
}

fn count_violations(map: &ClusterMap, sets: &Sets) -> usize {
    let placer = Placer::new(map);
    let kind = map.pools[&POOL].failure_domain;
    sets.iter()
        .filter(|set| !placer.is_valid_set(set, kind))
        .count()
}

/// Replicas that exist after but not before: copies that had to be made.
fn moved(before: &Sets, after: &Sets) -> usize {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.iter().filter(|m| !b.contains(m)).count())
        .sum()
}

fn replicas_on(sets: &Sets, pick: impl Fn(OsdId) -> bool) -> usize {
    sets.iter().flatten().filter(|m| pick(**m)).count()
}

struct Change {
    moved_fraction: f64,
    optimal_fraction: f64,
    followup_moves: usize,
}

/// Applies the movement-minimising transition from `before_map` to `after`,
/// measures what moved against `optimal(after_sets)`, then lets the balancer
/// react and counts its moves separately.
fn change(
    before_map: &ClusterMap,
    mut after: ClusterMap,
    before: &Sets,
    total: usize,
    violations: &mut usize,
    optimal: impl Fn(&Sets) -> usize,
) -> anyhow::Result<Change> {
    plan_transition(before_map, &mut after);
    let after_sets = map_all(&after)?;
    *violations += count_violations(&after, &after_sets);
    let moved = moved(before, &after_sets);
    let optimal = optimal(&after_sets);
    let followup = Balancer::default().balance(&mut after, POOL)?;
    Ok(Change {
        moved_fraction: moved as f64 / total as f64,
        optimal_fraction: optimal as f64 / total as f64,
        followup_moves: followup.moves,
    })
}

struct Spread {
    max_over_mean: f64,
    min_over_mean: f64,
    stddev_over_mean: f64,
}

/// PGs per eligible OSD, relative to the mean.
fn spread(map: &ClusterMap, sets: &Sets) -> Spread {
    let mut counts: BTreeMap<OsdId, usize> = map
        .osds
        .iter()
        .filter(|(_, o)| o.is_eligible())
        .map(|(id, _)| (*id, 0))
        .collect();
    for member in sets.iter().flatten() {
        *counts.entry(*member).or_default() += 1;
    }
    let n = counts.len() as f64;
    let mean = counts.values().sum::<usize>() as f64 / n;
    let max = counts.values().copied().max().unwrap_or(0) as f64;
    let min = counts.values().copied().min().unwrap_or(0) as f64;
    let variance = counts
        .values()
        .map(|c| (*c as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    Spread {
        max_over_mean: max / mean,
        min_over_mean: min / mean,
        stddev_over_mean: variance.sqrt() / mean,
    }
}

/// Worst relative deviation, over weight classes, of the PGs per unit of
/// weight from the weight-proportional share: the bias of the placement
/// itself, apart from the per-OSD binomial noise.
fn class_error(map: &ClusterMap, sets: &Sets) -> f64 {
    let mut per_class: BTreeMap<Weight, (usize, f64)> = BTreeMap::new();
    for osd in map.osds.values() {
        per_class.entry(osd.weight).or_default().1 += osd.weight.as_f64();
    }
    for member in sets.iter().flatten() {
        per_class.entry(map.osds[member].weight).or_default().0 += 1;
    }
    let total: usize = per_class.values().map(|(c, _)| c).sum();
    let weight: f64 = per_class.values().map(|(_, w)| w).sum();
    per_class
        .values()
        .map(|(count, w)| {
            let expected = total as f64 * w / weight;
            (*count as f64 / expected - 1.0).abs()
        })
        .fold(0.0, f64::max)
}

/// A sample of homed PGs: (home host, seed).
struct Homes {
    pgs: Vec<PgId>,
}

impl Homes {
    fn sample(args: &Args) -> Self {
        let pgs = (0..args.homed_pgs as u64)
            .map(|i| {
                let h = hash2(0x4f4d45, i);
                PgId {
                    pool: POOL,
                    seed: (h % args.pgs as u64) as u32,
                    home: Some(HostId(((h >> 32) % args.hosts as u64) as u32)),
                }
            })
            .collect();
        Self { pgs }
    }

    /// Share of sampled PGs whose home host is up and holds their primary.
    fn measure(&self, map: &ClusterMap, violations: &mut usize) -> anyhow::Result<f64> {
        let placer = Placer::new(map);
        let kind = map.pools[&POOL].failure_domain;
        let mut with_up_home = 0usize;
        let mut local = 0usize;
        for pg in &self.pgs {
            let set = placer.acting_set(*pg)?;
            if !placer.is_valid_set(&set.members, kind) {
                *violations += 1;
            }
            let Some(home) = pg.home else { continue };
            let home_up = map
                .osds
                .values()
                .any(|osd| osd.host == home && osd.is_eligible());
            if home_up {
                with_up_home += 1;
                if set.primary().and_then(|p| placer.host_of(p)) == Some(home) {
                    local += 1;
                }
            }
        }
        Ok(local as f64 / with_up_home.max(1) as f64)
    }

    /// Fraction of copies that move when each sampled PG's volume moves to
    /// the next host.
    fn change_home(&self, map: &ClusterMap, args: &Args) -> anyhow::Result<f64> {
        let placer = Placer::new(map);
        let mut moved = 0usize;
        let mut copies = 0usize;
        for pg in &self.pgs {
            let Some(home) = pg.home else { continue };
            let before = placer.acting_set(*pg)?.members;
            let after = placer
                .acting_set(PgId {
                    home: Some(HostId((home.0 + 1) % args.hosts)),
                    ..*pg
                })?
                .members;
            moved += after.iter().filter(|m| !before.contains(m)).count();
            copies += after.len();
        }
        Ok(moved as f64 / copies.max(1) as f64)
    }
}

fn print_table(report: &Report) -> anyhow::Result<()> {
    let value = serde_json::to_value(report)?;
    let Some(fields) = value.as_object() else {
        bail!("report is not an object");
    };
    println!("{:<45} {:>14}", "metric", "value");
    for (name, value) in fields {
        let shown = match value.as_f64() {
            Some(f) if value.is_f64() => format!("{f:.4}"),
            _ => value.to_string().trim_matches('"').to_string(),
        };
        println!("{name:<45} {shown:>14}");
    }
    let ratio = |moved: f64, optimal: f64| {
        if optimal > 0.0 {
            moved / optimal
        } else {
            f64::NAN
        }
    };
    println!();
    println!(
        "moved/optimal: add osd {:.3} (without transition {:.3}), remove osd {:.3}, remove host {:.3}, change home {:.3}",
        ratio(
            report.moved_fraction_add_osd,
            report.optimal_fraction_add_osd
        ),
        ratio(
            report.moved_fraction_add_osd_without_transition,
            report.optimal_fraction_add_osd
        ),
        ratio(
            report.moved_fraction_remove_osd,
            report.optimal_fraction_remove_osd
        ),
        ratio(
            report.moved_fraction_remove_host,
            report.optimal_fraction_remove_host
        ),
        ratio(
            report.moved_fraction_change_home,
            report.optimal_fraction_change_home
        ),
    );
    Ok(())
}
