//! `basalt osd ...`: storage daemon tools.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use basalt_osd::daemon::OsdConfig;
use basalt_osd::store::{ObjectStore, StoreConfig};
use clap::{Args, Subcommand};

/// `basalt osd`: runs the daemon, or a tool with a subcommand.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct OsdArgs {
    #[command(subcommand)]
    command: Option<OsdCommand>,
    /// The OSD's id (checked against the data directory); assigned by the
    /// monitors at first boot when omitted.
    #[arg(long)]
    id: Option<u32>,
    /// Data directory; formatted on first start.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Data-plane address, e.g. 127.0.1.1:6800.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Host name (failure domain); defaults to the machine's host name.
    #[arg(long)]
    host: Option<String>,
    /// Zone (rack) of the host.
    #[arg(long, default_value = "")]
    zone: String,
    /// Size of the data file created on first start, e.g. 8G.
    #[arg(long, default_value = "8G")]
    size: String,
    /// Placement weight.
    #[arg(long, default_value_t = 1.0)]
    weight: f64,
    /// When creating the data file on first start, write zeros over it, so
    /// later writes are pure overwrites (faster durable writes on a file
    /// system; slower first start).
    #[arg(long)]
    prezero: bool,
    /// PGs peered and recovered at once.
    #[arg(long, default_value_t = 2)]
    recovery_max_active: usize,
    /// Recovery bandwidth ceiling, e.g. 256M (per second).
    #[arg(long, default_value = "256M")]
    recovery_bytes_per_sec: String,
    /// Recovery bandwidth ceiling while clients are active on the OSD (it
    /// then also copies one object at a time).
    #[arg(long, default_value = "32M")]
    recovery_bytes_per_sec_busy: String,
    /// Small buffered writes (NBD writes without FUA, at most 32 KiB)
    /// acknowledged before their data write lands, at most at once: their
    /// data goes into the buffered-change log with their block entries.
    /// Lower latency at low queue depth, more CPU per write; 0 turns
    /// deferred writes off.
    #[arg(long, default_value_t = basalt_osd::store::DEFERRED_WRITES_IN_FLIGHT)]
    deferred_writes_in_flight: usize,
    /// Defer small buffered writes only while at most this many writes are
    /// in progress on the OSD's store, now and on average over about the
    /// last eight writes: the store is then bound by the disk's latency,
    /// not by CPU.
    #[arg(long, default_value_t = basalt_osd::store::DEFER_WHILE_WRITES_AT_MOST)]
    defer_while_writes_at_most: usize,
    /// Pace, per second (e.g. 128M), of rewriting the ranges that large
    /// reads find scattered over many small runs (random overwrites move
    /// the blocks they write) into one run each, in the background, so
    /// later large reads of them are one device read; 0 turns it off.
    #[arg(long, default_value = "128M")]
    relocate_bytes_per_sec: String,
    /// Also serve NBD on this address, in this process (a node daemon): the
    /// gateway reaches this OSD without a socket, so volumes homed on this
    /// host skip a network hop. Other OSDs are reached over TCP as usual.
    #[arg(long)]
    nbd: Option<SocketAddr>,
}

#[derive(Subcommand, Debug)]
pub enum OsdCommand {
    /// List OSDs: host, address, up/in, weight, PGs held and led.
    Ls,
    /// Check a stopped OSD's store: allocator against metadata, every
    /// block's checksum. Exits non-zero when it finds a problem.
    Fsck {
        /// The OSD's data directory.
        #[arg(long)]
        data: PathBuf,
    },
    /// Create an empty store in a new data directory.
    Format {
        /// The OSD's data directory (created).
        #[arg(long)]
        data: PathBuf,
        /// Size of the data file, e.g. 8G, 512M.
        #[arg(long, default_value = "8G")]
        size: String,
        /// Write zeros over the whole data file now, so later writes are
        /// pure overwrites (faster durable writes; slower format).
        #[arg(long)]
        prezero: bool,
    },
}

pub fn run(args: OsdArgs, mon: &str, json: bool) -> anyhow::Result<ExitCode> {
    let Some(command) = args.command else {
        run_daemon(args, mon)?;
        return Ok(ExitCode::SUCCESS);
    };
    match command {
        OsdCommand::Ls => {
            crate::cluster_admin::osd_ls(mon, json)?;
            Ok(ExitCode::SUCCESS)
        }
        OsdCommand::Fsck { data } => fsck(data, json),
        OsdCommand::Format {
            data,
            size,
            prezero,
        } => {
            let bytes = parse_size(&size)?;
            ObjectStore::format_dir(&data, bytes, prezero)
                .with_context(|| format!("format store in {}", data.display()))?;
            println!("formatted {} ({bytes} bytes)", data.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_daemon(args: OsdArgs, mon: &str) -> anyhow::Result<()> {
    let Some(data) = args.data else {
        bail!("--data is required to run an OSD");
    };
    let Some(listen) = args.listen else {
        bail!("--listen is required to run an OSD");
    };
    let host = match args.host {
        Some(host) => host,
        None => std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into()),
    };
    let config = OsdConfig {
        id: args.id,
        data_dir: data,
        mon: mon.split(',').map(|s| s.trim().to_string()).collect(),
        listen,
        host,
        zone: args.zone,
        size_bytes: parse_size(&args.size)?,
        prezero: args.prezero,
        weight: args.weight,
        heartbeat_interval_ms: 1_000,
        recovery: basalt_osd::daemon::RecoveryConfig {
            recovery_max_active: args.recovery_max_active.max(1),
            recovery_bytes_per_sec_max: parse_size(&args.recovery_bytes_per_sec)?.max(1 << 20),
            recovery_bytes_per_sec_busy: parse_size(&args.recovery_bytes_per_sec_busy)?
                .max(1 << 20),
            ..basalt_osd::daemon::RecoveryConfig::default()
        },
        store: StoreConfig {
            deferred_writes_in_flight: args.deferred_writes_in_flight,
            defer_while_writes_at_most: args.defer_while_writes_at_most,
            relocate_bytes_per_sec: parse_size(&args.relocate_bytes_per_sec)?,
            ..StoreConfig::default()
        },
    };
    let Some(nbd) = args.nbd else {
        return crate::daemon::run_until_signal("OSD", |shutdown| {
            basalt_osd::daemon::run(config, shutdown)
        });
    };
    let mon = mon.to_string();
    crate::daemon::run_until_signal("OSD and NBD gateway", move |shutdown| async move {
        // Stopping order: the gateway first (its requests to this OSD end),
        // then the OSD, which can then close its store. Either one failing
        // stops the other.
        let gateway_stop = shutdown.child_token();
        let osd_stop = tokio_util::sync::CancellationToken::new();
        let (ready, local) = tokio::sync::oneshot::channel();
        let osd = async {
            let result =
                basalt_osd::daemon::run_with_local(config, osd_stop.clone(), Some(ready)).await;
            gateway_stop.cancel();
            result
        };
        let gateway = async {
            let result = match local.await {
                Ok(local) => {
                    crate::nbd::serve_gateway(nbd, false, mon, Some(local), gateway_stop.clone())
                        .await
                }
                // The OSD stopped before serving: its own error says why.
                Err(_) => Ok(()),
            };
            osd_stop.cancel();
            result
        };
        let (osd, gateway) = tokio::join!(osd, gateway);
        osd.context("OSD").map_err(crate::nbd::GatewayError::from)?;
        gateway
    })
}

fn fsck(data: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let report = crate::daemon::runtime()?.block_on(async {
        let store = ObjectStore::open_dir(&data, StoreConfig::default())
            .await
            .with_context(|| format!("open store in {}", data.display()))?;
        let report = store.fsck().await.context("check store")?;
        store.close().await;
        anyhow::Ok(report)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{:<14} {}", "store", data.display());
        println!("{:<14} {}", "objects", report.objects);
        println!("{:<14} {}", "blocks used", report.blocks);
        println!("{:<14} {}", "blocks free", report.free_blocks);
        println!("{:<14} {}", "blocks total", report.block_count);
        println!("{:<14} {}", "errors", report.errors.len());
        for error in &report.errors {
            println!("  {error}");
        }
        println!(
            "{}",
            if report.is_clean() {
                "clean"
            } else {
                "NOT CLEAN"
            }
        );
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Parses a size such as `8G`, `512M`, `4096` (bytes), binary units.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (number, shift) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 10),
        Some((i, 'M' | 'm')) => (&text[..i], 20),
        Some((i, 'G' | 'g')) => (&text[..i], 30),
        Some((i, 'T' | 't')) => (&text[..i], 40),
        _ => (text, 0),
    };
    let value: u64 = number
        .parse()
        .with_context(|| format!("size {text:?} is not a number with an optional K/M/G/T"))?;
    value
        .checked_mul(1u64 << shift)
        .with_context(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
