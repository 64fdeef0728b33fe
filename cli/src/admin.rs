//! Admin commands against the monitors: `status`, `pool ...`, `volume ...`.
//! Human tables by default, one JSON document with `--json`.

use anyhow::Context;
use basalt_monitor::MonClient;
use basalt_proto::monitor as pb;
use clap::Subcommand;
use serde_json::json;

use crate::osd::parse_size;
use crate::table;

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    /// Create a pool.
    Create {
        name: String,
        /// Copies of every object.
        #[arg(long, default_value_t = 3)]
        size: u32,
        /// Fewest copies that accept writes (default: min(size, 2)).
        #[arg(long)]
        min_size: Option<u32>,
        /// Placement groups (a power of two).
        #[arg(long, default_value_t = 128)]
        pgs: u32,
        /// What two copies must not share: host or zone.
        #[arg(long, default_value = "host")]
        failure_domain: String,
    },
    /// List pools.
    Ls,
    /// Delete an empty pool.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume.
    Create {
        name: String,
        /// Size, e.g. 10G.
        #[arg(long)]
        size: String,
        #[arg(long, default_value = "")]
        pool: String,
        /// Host that holds the primary copy (locality).
        #[arg(long)]
        home: Option<String>,
    },
    /// List volumes.
    Ls {
        #[arg(long, default_value = "")]
        pool: String,
    },
    /// Show one volume.
    Info {
        name: String,
        #[arg(long, default_value = "")]
        pool: String,
    },
    /// Change a volume's size.
    Resize {
        name: String,
        #[arg(long)]
        size: String,
        #[arg(long, default_value = "")]
        pool: String,
        /// Allow shrinking (data past the new end is lost).
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Delete a volume.
    Rm {
        name: String,
        #[arg(long, default_value = "")]
        pool: String,
    },
    /// Attach a volume to a kernel block device (/dev/nbdX) through a
    /// node's NBD gateway; needs the kernel's nbd module.
    Map {
        name: String,
        #[arg(long, default_value = "")]
        pool: String,
        /// The NBD gateway to attach through (this node's).
        #[arg(long, default_value = "127.0.1.1:10809")]
        nbd: std::net::SocketAddr,
        /// Use /dev/nbdN (default: the first free device).
        #[arg(long)]
        device: Option<u32>,
    },
    /// Detach a volume's /dev/nbdX (by volume name or device path).
    Unmap {
        /// Volume name, or a device such as /dev/nbd0.
        target: String,
        #[arg(long, default_value = "")]
        pool: String,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")
}

fn pool_json(pool: &pb::Pool) -> serde_json::Value {
    json!({
        "id": pool.id, "name": pool.name, "size": pool.size, "min_size": pool.min_size,
        "pg_count": pool.pg_count, "failure_domain": pool.failure_domain,
    })
}

fn volume_json(volume: &pb::Volume) -> serde_json::Value {
    json!({
        "id": volume.id, "name": volume.name, "pool": volume.pool, "size_bytes": volume.size_bytes,
        "object_size_bytes": volume.object_size_bytes,
        "home": if volume.home.is_empty() { None } else { Some(&volume.home) },
    })
}

fn print_volumes(volumes: &[pb::Volume]) {
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.pool.clone(),
                table::bytes(v.size_bytes),
                if v.home.is_empty() {
                    "-".into()
                } else {
                    v.home.clone()
                },
                v.id.to_string(),
            ]
        })
        .collect();
    table::print(&["NAME", "POOL", "SIZE", "HOME", "ID"], &rows);
}

pub fn status(mon: &MonClient, as_json: bool) -> anyhow::Result<()> {
    let reply = runtime()?
        .block_on(mon.call(|mut c| async move { c.status(pb::StatusRequest {}).await }))?;
    if as_json {
        let monitors: Vec<_> = reply
            .monitors
            .iter()
            .map(|m| json!({"id": m.id, "name": m.name, "addr": m.addr, "leader": m.leader}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "epoch": reply.epoch, "leader": reply.leader, "raft_term": reply.raft_term,
                "last_applied_index": reply.last_applied_index, "monitors": monitors,
                "osds": {"total": reply.osds_total, "up": reply.osds_up, "in": reply.osds_in},
                "pools": reply.pools, "volumes": reply.volumes,
                "health": if reply.health_warnings.is_empty() { "ok" } else { "warn" },
                "health_warnings": reply.health_warnings,
                "gateways": reply.gateways.iter().map(|g| json!({
                    "addr": g.addr,
                    "clients": g.clients.iter().map(|c| json!({"peer": c.peer, "export": c.export})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }))?
        );
        return Ok(());
    }
    let health = if reply.health_warnings.is_empty() {
        "HEALTH_OK".to_string()
    } else {
        "HEALTH_WARN".to_string()
    };
    println!("health:   {health}");
    for warning in &reply.health_warnings {
        println!("          {warning}");
    }
    let quorum: Vec<String> = reply
        .monitors
        .iter()
        .map(|m| {
            if m.leader {
                format!("{}*", m.name)
            } else {
                m.name.clone()
            }
        })
        .collect();
    println!(
        "monitors: {} ({}; leader {}, term {})",
        reply.monitors.len(),
        quorum.join(" "),
        if reply.leader.is_empty() {
            "none"
        } else {
            &reply.leader
        },
        reply.raft_term
    );
    println!("epoch:    {}", reply.epoch);
    println!(
        "osds:     {} total, {} up, {} in",
        reply.osds_total, reply.osds_up, reply.osds_in
    );
    println!("pools:    {}", reply.pools);
    println!("volumes:  {}", reply.volumes);
    let clients: usize = reply.gateways.iter().map(|g| g.clients.len()).sum();
    println!(
        "nbd:      {} gateway(s), {clients} client(s)",
        reply.gateways.len()
    );
    for gateway in &reply.gateways {
        for client in &gateway.clients {
            println!(
                "          {} -> {} ({})",
                client.peer, gateway.addr, client.export
            );
        }
    }
    Ok(())
}

pub fn pool(mon: &MonClient, command: PoolCommand, as_json: bool) -> anyhow::Result<()> {
    let rt = runtime()?;
    match command {
        PoolCommand::Create {
            name,
            size,
            min_size,
            pgs,
            failure_domain,
        } => {
            let request = pb::CreatePoolRequest {
                name,
                size,
                min_size: min_size.unwrap_or(0),
                pg_count: pgs,
                failure_domain,
            };
            let reply = rt.block_on(mon.call(|mut c| {
                let request = request.clone();
                async move { c.create_pool(request).await }
            }))?;
            let pool = reply.pool.context("monitor returned no pool")?;
            if as_json {
                println!("{}", serde_json::to_string_pretty(&pool_json(&pool))?);
            } else {
                println!(
                    "created pool {} (size {}, min_size {}, {} PGs, failure domain {}) at epoch {}",
                    pool.name,
                    pool.size,
                    pool.min_size,
                    pool.pg_count,
                    pool.failure_domain,
                    reply.epoch
                );
            }
        }
        PoolCommand::Ls => {
            let reply = rt.block_on(
                mon.call(|mut c| async move { c.list_pools(pb::ListPoolsRequest {}).await }),
            )?;
            if as_json {
                let pools: Vec<_> = reply.pools.iter().map(pool_json).collect();
                println!("{}", serde_json::to_string_pretty(&pools)?);
            } else {
                let rows: Vec<Vec<String>> = reply
                    .pools
                    .iter()
                    .map(|p| {
                        vec![
                            p.name.clone(),
                            p.size.to_string(),
                            p.min_size.to_string(),
                            p.pg_count.to_string(),
                            p.failure_domain.clone(),
                            p.id.to_string(),
                        ]
                    })
                    .collect();
                table::print(
                    &["NAME", "SIZE", "MIN_SIZE", "PGS", "FAILURE_DOMAIN", "ID"],
                    &rows,
                );
            }
        }
        PoolCommand::Rm { name } => {
            let request = pb::DeletePoolRequest { name: name.clone() };
            let reply = rt.block_on(mon.call(|mut c| {
                let request = request.clone();
                async move { c.delete_pool(request).await }
            }))?;
            if as_json {
                println!("{}", json!({"deleted": name, "epoch": reply.epoch}));
            } else {
                println!("deleted pool {name} at epoch {}", reply.epoch);
            }
        }
    }
    Ok(())
}

pub fn volume(mon: &MonClient, command: VolumeCommand, as_json: bool) -> anyhow::Result<()> {
    let rt = runtime()?;
    let show = |volume: Option<pb::Volume>, verb: &str, epoch: u64| -> anyhow::Result<()> {
        let volume = volume.context("monitor returned no volume")?;
        if as_json {
            println!("{}", serde_json::to_string_pretty(&volume_json(&volume))?);
        } else {
            println!(
                "{verb} volume {} in pool {} ({}) at epoch {epoch}",
                volume.name,
                volume.pool,
                table::bytes(volume.size_bytes)
            );
        }
        Ok(())
    };
    match command {
        VolumeCommand::Create {
            name,
            size,
            pool,
            home,
        } => {
            let request = pb::CreateVolumeRequest {
                name,
                pool,
                size_bytes: parse_size(&size)?,
                object_size_bytes: 0,
                home: home.unwrap_or_default(),
            };
            let reply = rt.block_on(mon.call(|mut c| {
                let request = request.clone();
                async move { c.create_volume(request).await }
            }))?;
            show(reply.volume, "created", reply.epoch)
        }
        VolumeCommand::Ls { pool } => {
            let request = pb::ListVolumesRequest { pool };
            let reply = rt.block_on(mon.call(|mut c| {
                let request = request.clone();
                async move { c.list_volumes(request).await }
            }))?;
            if as_json {
                let volumes: Vec<_> = reply.volumes.iter().map(volume_json).collect();
                println!("{}", serde_json::to_string_pretty(&volumes)?);
            } else {
                print_volumes(&reply.volumes);
            }
            Ok(())
        }
        VolumeCommand::Info { name, pool } => {
            let request = pb::GetVolumeRequest { pool, name };
            let reply = rt.block_on(mon.call(|mut c| {
                let request = request.clone();
                async move { c.get_volume(request).await }
            }))?;
            let volume = reply.volume.context("monitor returned no volume")?;
            if as_json {
                println!("{}", serde_json::to_string_pretty(&volume_json(&volume))?);
            } else {
                print_volumes(std::slice::from_ref(&volume));
                println!("object size: {}", table::bytes(volume.object_size_bytes));
            }
            Ok(())
        }
        VolumeCommand::Resize {
            name,
            size,
            pool,
            allow_shrink,
        } => {
            let request = pb::ResizeVolumeRequest {
                pool,
                name,
                size_bytes: parse_size(&size)?,
                allow_shrink,
            };
            let reply = rt.block_on(mon.call(|mut c| {
                let request = request.clone();
                async move { c.resize_volume(request).await }
            }))?;
            show(reply.volume, "resized", reply.epoch)
        }
        VolumeCommand::Rm { name, pool } => {
            let request = pb::DeleteVolumeRequest {
                pool,
                name: name.clone(),
            };
            let reply = rt.block_on(mon.call(|mut c| {
                let request = request.clone();
                async move { c.delete_volume(request).await }
            }))?;
            if as_json {
                println!("{}", json!({"deleted": name, "epoch": reply.epoch}));
            } else {
                println!("deleted volume {name} at epoch {}", reply.epoch);
            }
            Ok(())
        }
        VolumeCommand::Map {
            name,
            pool,
            nbd,
            device,
        } => {
            let export = export_name(&pool, &name);
            let index = basalt_client_nbd::kernel::map(nbd, &export, device)
                .with_context(|| format!("map volume {export}"))?;
            if as_json {
                println!(
                    "{}",
                    json!({"volume": export, "device": format!("/dev/nbd{index}"), "gateway": nbd.to_string()})
                );
            } else {
                println!("mapped volume {export} at /dev/nbd{index} (through gateway {nbd})");
            }
            Ok(())
        }
        VolumeCommand::Unmap { target, pool } => {
            let index = match target.strip_prefix("/dev/nbd") {
                Some(index) => index
                    .parse::<u32>()
                    .with_context(|| format!("{target} is not an nbd device"))?,
                None => basalt_client_nbd::kernel::find_mapped(&export_name(&pool, &target))?,
            };
            basalt_client_nbd::kernel::unmap(index)
                .with_context(|| format!("unmap /dev/nbd{index}"))?;
            if as_json {
                println!("{}", json!({"unmapped": format!("/dev/nbd{index}")}));
            } else {
                println!("unmapped /dev/nbd{index}");
            }
            Ok(())
        }
    }
}

/// Returns the NBD export name of a volume: `name` in pool `rbd` (or no
/// pool given), `pool/name` otherwise.
fn export_name(pool: &str, name: &str) -> String {
    if pool.is_empty() || pool == "rbd" {
        name.to_string()
    } else {
        format!("{pool}/{name}")
    }
}
