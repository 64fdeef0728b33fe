//! `basalt mon`: runs one monitor.

use std::path::PathBuf;

use basalt_monitor::{MonitorConfig, run};
use clap::Args;

#[derive(Args, Debug)]
pub struct MonArgs {
    /// This monitor's name (one of --peers).
    #[arg(long)]
    id: String,
    /// Data directory (raft log, vote, snapshots); created if missing.
    #[arg(long)]
    data: PathBuf,
    /// Address to serve on, e.g. 127.0.1.1:6789.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Every monitor, this one included: a=127.0.1.1:6789,b=127.0.1.2:6789,...
    #[arg(long)]
    peers: String,
    /// Silence after which an OSD is marked down, in milliseconds.
    #[arg(long, default_value_t = 6_000)]
    osd_down_after_ms: u64,
    /// Silence after which an OSD is marked out, in milliseconds.
    #[arg(long, default_value_t = 600_000)]
    osd_out_after_ms: u64,
    /// Log entries between raft snapshots (log compaction).
    #[arg(long, default_value_t = 5_000)]
    snapshot_every: u64,
    /// How often the leader runs the balancer, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    balance_interval_ms: u64,
}

pub fn run_monitor(args: MonArgs) -> anyhow::Result<()> {
    let peers = MonitorConfig::parse_peers(&args.peers)?;
    let mut config = MonitorConfig::new(args.id, args.data, args.listen, peers);
    config.osd_down_after_ms = args.osd_down_after_ms;
    config.osd_out_after_ms = args.osd_out_after_ms;
    config.snapshot_every_entries = args.snapshot_every.max(10);
    config.balance_interval_ms = args.balance_interval_ms;
    crate::daemon::run_until_signal("monitor", |shutdown| run(config, shutdown))
}
