//! `basalt osd ls` and `basalt pg ls`: what the map says about OSDs and
//! placement groups, with object counts asked of each PG's primary.

use std::collections::HashMap;

use basalt_client::{BlockClient, ClientConfig};
use basalt_monitor::MonClient;
use basalt_placement::{ClusterMap, OsdId, PgId, Placer};
use serde_json::json;

use crate::table;

async fn fetch(mon: &str) -> anyhow::Result<std::sync::Arc<BlockClient>> {
    let config = ClientConfig {
        retry_for: std::time::Duration::from_secs(5),
        ..ClientConfig::default()
    };
    Ok(BlockClient::connect(MonClient::from_list(mon)?, config).await?)
}

/// Returns (state, members) of a PG from the map alone.
fn pg_state(map: &ClusterMap, placer: &Placer<'_>, pg: PgId) -> (String, Vec<OsdId>) {
    let Some(pool) = map.pools.get(&pg.pool) else {
        return ("unknown".into(), Vec::new());
    };
    match placer.acting_set(pg) {
        Ok(set) => {
            let count = set.members.len() as u32;
            let state = if count >= pool.size {
                "active+clean"
            } else if count >= pool.min_size {
                "active+undersized+degraded"
            } else {
                "inactive+undersized"
            };
            (state.into(), set.members)
        }
        Err(_) => ("inactive".into(), Vec::new()),
    }
}

/// A PG serving while its primary copies objects to members that lack them:
/// `active+clean` and `recovering 3/10` make `active+recovering+degraded
/// 3/10` (Ceph's words: degraded while some copies are missing).
fn copying_state(map_state: &str, phase: &str) -> String {
    let (kind, progress) = phase.split_once(' ').unwrap_or((phase, ""));
    let mut parts: Vec<&str> = map_state.split('+').filter(|p| *p != "clean").collect();
    parts.push(kind);
    if !parts.contains(&"degraded") {
        parts.push("degraded");
    }
    format!("{} {progress}", parts.join("+"))
        .trim_end()
        .to_string()
}

pub fn osd_ls(mon: &str, as_json: bool) -> anyhow::Result<()> {
    let rt = crate::daemon::runtime()?;
    let client = rt.block_on(fetch(mon))?;
    let map = client.map();
    let placer = Placer::new(&map);
    let mut pgs: HashMap<OsdId, (usize, usize)> = HashMap::new();
    for (pool_id, pool) in &map.pools {
        for seed in 0..pool.pg_count {
            let (_, members) = pg_state(&map, &placer, PgId::new(*pool_id, seed));
            for (i, osd) in members.iter().enumerate() {
                let entry = pgs.entry(*osd).or_default();
                entry.0 += 1;
                if i == 0 {
                    entry.1 += 1;
                }
            }
        }
    }
    let host = |osd: &basalt_placement::Osd| {
        map.hosts
            .get(&osd.host)
            .map(|h| h.name.clone())
            .unwrap_or_default()
    };
    if as_json {
        let osds: Vec<_> = map
            .osds
            .iter()
            .map(|(id, osd)| {
                let (count, primary) = pgs.get(id).copied().unwrap_or_default();
                json!({"id": id.0, "host": host(osd), "addr": osd.addr, "up": osd.up, "in": osd.in_,
                       "weight": osd.weight.as_f64(), "pgs": count, "primary_pgs": primary})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&osds)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = map
        .osds
        .iter()
        .map(|(id, osd)| {
            let (count, primary) = pgs.get(id).copied().unwrap_or_default();
            vec![
                id.to_string(),
                host(osd),
                osd.addr.clone().unwrap_or_else(|| "-".into()),
                if osd.up { "up" } else { "down" }.into(),
                if osd.in_ { "in" } else { "out" }.into(),
                osd.weight.to_string(),
                count.to_string(),
                primary.to_string(),
            ]
        })
        .collect();
    table::print(
        &[
            "OSD", "HOST", "ADDR", "UP", "IN", "WEIGHT", "PGS", "PRIMARY",
        ],
        &rows,
    );
    println!("epoch {}", map.epoch.0);
    Ok(())
}

pub fn pg_ls(mon: &str, pool: &str, as_json: bool) -> anyhow::Result<()> {
    let rt = crate::daemon::runtime()?;
    rt.block_on(async {
        let client = fetch(mon).await?;
        let map = client.map();
        let placer = Placer::new(&map);
        let pools: Vec<_> = map
            .pools
            .iter()
            .filter(|(_, p)| pool.is_empty() || p.name == pool)
            .map(|(id, p)| (*id, p.pg_count))
            .collect();
        if pools.is_empty() && !pool.is_empty() {
            anyhow::bail!("pool {pool:?} not found");
        }
        let mut rows = Vec::new();
        let mut entries = Vec::new();
        for (pool_id, pg_count) in pools {
            for seed in 0..pg_count {
                let pg = PgId::new(pool_id, seed);
                let (mut state, members) = pg_state(&map, &placer, pg);
                let mut error = None;
                let objects = match client.pg_stat(pg).await {
                    Ok((count, phase)) => {
                        // The primary's peering phase refines the map's view:
                        // a PG is only active once its primary peered it.
                        if phase.starts_with("recovering") || phase.starts_with("backfilling") {
                            state = copying_state(&state, &phase);
                        } else if phase != "active" && !phase.is_empty() {
                            state = state.replacen("active", &phase, 1);
                            if !state.contains(&phase) {
                                state = format!("{phase}+{state}");
                            }
                        }
                        Some(count)
                    }
                    Err(e) => {
                        // The map alone cannot tell a clean PG from one that
                        // is peering or backfilling (a stand-in makes the
                        // set whole at once): without its primary's word the
                        // state is unknown, as Ceph shows a PG no OSD
                        // reported. (A PG the map already calls inactive
                        // stays so.)
                        tracing::debug!("object count of {pg}: {e}");
                        if state.starts_with("active") {
                            state = "unknown".into();
                        }
                        error = Some(e.to_string());
                        None
                    }
                };
                let acting: Vec<String> = members.iter().map(|m| m.0.to_string()).collect();
                entries.push(json!({
                    "pg": pg.to_string(), "acting": members.iter().map(|m| m.0).collect::<Vec<_>>(),
                    "primary": members.first().map(|m| m.0), "state": state, "objects": objects,
                    "error": error,
                }));
                rows.push(vec![
                    pg.to_string(),
                    format!("[{}]", acting.join(",")),
                    members.first().map_or("-".into(), |m| m.0.to_string()),
                    state,
                    objects.map_or("?".into(), |c| c.to_string()),
                ]);
            }
        }
        if as_json {
            println!("{}", serde_json::to_string_pretty(&entries)?);
        } else {
            table::print(&["PG", "ACTING", "PRIMARY", "STATE", "OBJECTS"], &rows);
        }
        Ok(())
    })
}

/// Parses a PG as `pg ls` prints it: `POOL.SEED` (seed in hex), with
/// `@HOST` for a homed PG.
fn parse_pg(text: &str) -> anyhow::Result<PgId> {
    let bad = || anyhow::anyhow!("{text:?} is not a PG (expected POOL.SEED, e.g. 0.1f)");
    let (base, home) = match text.split_once('@') {
        Some((base, home)) => (base, Some(home.parse::<u32>().map_err(|_| bad())?)),
        None => (text, None),
    };
    let (pool, seed) = base.split_once('.').ok_or_else(bad)?;
    Ok(PgId {
        pool: basalt_placement::PoolId(pool.parse().map_err(|_| bad())?),
        seed: u32::from_str_radix(seed, 16).map_err(|_| bad())?,
        home: home.map(basalt_placement::HostId),
    })
}

/// `basalt scrub PG|--all [--deep]`: each PG's primary compares its
/// members' copies and repairs what differs. Exits non-zero if anything
/// could not be repaired.
pub fn scrub(
    mon: &str,
    pg: Option<String>,
    all: bool,
    deep: bool,
    as_json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let rt = crate::daemon::runtime()?;
    rt.block_on(async {
        let client = fetch(mon).await?;
        let map = client.map();
        let pgs: Vec<PgId> = match (pg, all) {
            (Some(pg), false) => {
                let pg = parse_pg(&pg)?;
                let pool = map
                    .pools
                    .get(&pg.pool)
                    .ok_or_else(|| anyhow::anyhow!("no pool {} in the map", pg.pool.0))?;
                anyhow::ensure!(
                    pg.seed < pool.pg_count,
                    "pool {} has {} PGs; {pg} is not one of them",
                    pool.name,
                    pool.pg_count
                );
                vec![pg]
            }
            (None, true) => map
                .pools
                .iter()
                .flat_map(|(id, pool)| (0..pool.pg_count).map(|seed| PgId::new(*id, seed)))
                .collect(),
            _ => anyhow::bail!("name one PG or give --all"),
        };
        let mut reports = Vec::new();
        let mut unrepaired = 0;
        let (mut objects, mut mismatches) = (0, 0);
        for (done, pg) in pgs.iter().enumerate() {
            if !as_json && pgs.len() > 1 {
                eprint!("\rscrubbing {}/{}", done + 1, pgs.len());
            }
            let report = client
                .scrub_pg(*pg, deep)
                .await
                .map_err(|e| anyhow::anyhow!("scrub {pg}: {e}"))?;
            unrepaired += report["unrepaired"].as_u64().unwrap_or(0);
            objects += report["objects"].as_u64().unwrap_or(0);
            mismatches += report["mismatches"].as_array().map_or(0, Vec::len);
            reports.push(report);
        }
        if !as_json && pgs.len() > 1 {
            eprintln!();
        }
        if as_json {
            println!("{}", serde_json::to_string_pretty(&reports)?);
        } else {
            let mut rows = Vec::new();
            for report in &reports {
                for mismatch in report["mismatches"].as_array().into_iter().flatten() {
                    rows.push(vec![
                        report["pg"].as_str().unwrap_or("?").to_string(),
                        mismatch["object"].as_str().unwrap_or("?").to_string(),
                        format!("osd.{}", mismatch["osd"]),
                        mismatch["problem"].as_str().unwrap_or("?").to_string(),
                        if mismatch["repaired"] == true { "yes" } else { "NO" }.to_string(),
                    ]);
                }
            }
            if !rows.is_empty() {
                table::print(&["PG", "OBJECT", "OSD", "PROBLEM", "REPAIRED"], &rows);
            }
            println!(
                "{} scrub of {} PGs: {objects} objects, {mismatches} mismatches, {unrepaired} unrepaired",
                if deep { "deep" } else { "light" },
                pgs.len()
            );
        }
        Ok(if unrepaired > 0 {
            std::process::ExitCode::FAILURE
        } else {
            std::process::ExitCode::SUCCESS
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copying_pgs_read_as_degraded_with_their_progress() {
        assert_eq!(
            copying_state("active+clean", "backfilling 3/10"),
            "active+backfilling+degraded 3/10"
        );
        assert_eq!(
            copying_state("active+undersized+degraded", "recovering 0/4"),
            "active+undersized+degraded+recovering 0/4"
        );
    }
}
