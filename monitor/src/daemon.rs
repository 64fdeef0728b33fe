//! `MonitorDaemon`: assembles and runs one monitor process.
//!
//! Bootstrap: every monitor is started with the same `--peers` list
//! (`name=addr,...`). Member ids are the names' positions in sorted order
//! (plus one), so every monitor derives the same membership. The first
//! member in name order, on its first start (no raft state), initialises the
//! group with that membership; the others wait to be contacted, so the group
//! forms as soon as that monitor and a majority are up, whatever the order of
//! starts. (Initialising on every member is allowed by raft but races with
//! the first election and makes openraft log errors.) A monitor whose data
//! directory was wiped starts empty and is brought up to date by the leader,
//! by snapshot when the log it needs was compacted away; only the first
//! member must not be wiped while the others are down, or it would found a
//! new, empty group.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use basalt_proto::monitor::monitor_server::MonitorServer;
use basalt_proto::monitor::raft_server::RaftServer;
use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio_util::sync::CancellationToken;

use crate::failure_detector::FailureConfig;
use crate::network::{Network, RaftService};
use crate::raft_store::{LogStore, MonRaft, StateMachine, open_db};
use crate::service::{MonitorNode, MonitorService};

/// Errors that stop a monitor from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("open raft database in {path}: {source}")]
    OpenDb {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("serve gRPC on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
}

/// Settings of one monitor.
#[derive(Clone, Debug)]
pub struct MonitorConfig {
    /// This monitor's name; must appear in `peers`.
    pub name: String,
    /// Data directory (raft log, vote, snapshots).
    pub data_dir: PathBuf,
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// Every member, this one included: name -> address.
    pub peers: BTreeMap<String, SocketAddr>,
    /// Silence after which an OSD is marked down. Default 6,000 ms.
    pub osd_down_after_ms: u64,
    /// Silence after which an OSD is marked out. Default 600,000 ms.
    pub osd_out_after_ms: u64,
    /// Raft heartbeat. Default 150 ms.
    pub raft_heartbeat_ms: u64,
    /// Raft election timeout range. Default 600-1,200 ms: a dead leader is
    /// replaced in well under 3 s, while a loaded 2-core machine still
    /// delivers heartbeats in time.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Log entries between snapshots. Default 5,000.
    pub snapshot_every_entries: u64,
    /// How often the leader runs the balancer. Default 10,000 ms.
    pub balance_interval_ms: u64,
}

impl MonitorConfig {
    /// A config with defaults for everything but identity and addresses.
    pub fn new(
        name: String,
        data_dir: PathBuf,
        listen: SocketAddr,
        peers: BTreeMap<String, SocketAddr>,
    ) -> Self {
        Self {
            name,
            data_dir,
            listen,
            peers,
            osd_down_after_ms: 6_000,
            osd_out_after_ms: 600_000,
            raft_heartbeat_ms: 150,
            election_timeout_min_ms: 600,
            election_timeout_max_ms: 1_200,
            snapshot_every_entries: 5_000,
            balance_interval_ms: 10_000,
        }
    }

    /// Parses `a=127.0.1.1:6789,b=...`.
    pub fn parse_peers(list: &str) -> Result<BTreeMap<String, SocketAddr>, MonitorError> {
        let mut peers = BTreeMap::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, addr) = item.split_once('=').ok_or_else(|| {
                MonitorError::Config(format!("peer {item:?} is not name=ip:port"))
            })?;
            let addr: SocketAddr = addr.parse().map_err(|_| {
                MonitorError::Config(format!("peer {name:?} address {addr:?} is not ip:port"))
            })?;
            if peers.insert(name.to_string(), addr).is_some() {
                return Err(MonitorError::Config(format!("peer {name:?} listed twice")));
            }
        }
        Ok(peers)
    }

    fn validate(&self) -> Result<(), MonitorError> {
        if !self.peers.contains_key(&self.name) {
            return Err(MonitorError::Config(format!(
                "this monitor ({:?}) is not in --peers",
                self.name
            )));
        }
        if ![1, 3, 5].contains(&self.peers.len()) {
            return Err(MonitorError::Config(format!(
                "{} monitors: use 1, 3 or 5",
                self.peers.len()
            )));
        }
        if self.osd_down_after_ms == 0 || self.osd_out_after_ms < self.osd_down_after_ms {
            return Err(MonitorError::Config(
                "osd_out_after_ms must be at least osd_down_after_ms, which must be positive"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Member ids: position in sorted name order, plus one.
    pub fn members(&self) -> BTreeMap<u64, (String, String)> {
        self.peers
            .iter()
            .enumerate()
            .map(|(i, (name, addr))| (i as u64 + 1, (name.clone(), addr.to_string())))
            .collect()
    }
}

/// Returns whether another member already belongs to a formed group (it
/// reports a raft term), in which case this monitor must join it, not found
/// a new one: it lost its data directory.
async fn peers_have_a_group(members: &BTreeMap<u64, (String, String)>, id: u64) -> bool {
    for (peer, (_, addr)) in members {
        if *peer == id {
            continue;
        }
        let Ok(mon) = crate::client::MonClient::new(std::slice::from_ref(addr)) else {
            continue;
        };
        let mut mon = mon;
        mon.call_timeout = Duration::from_secs(1);
        mon.retry_for = Duration::ZERO;
        let status = mon
            .call(|mut c| async move { c.status(basalt_proto::monitor::StatusRequest {}).await })
            .await;
        if status.is_ok_and(|s| s.raft_term > 0) {
            return true;
        }
    }
    false
}

/// Runs a monitor until `shutdown` is cancelled.
pub async fn run(config: MonitorConfig, shutdown: CancellationToken) -> Result<(), MonitorError> {
    config.validate()?;
    let members = config.members();
    let id = members
        .iter()
        .find(|(_, (name, _))| *name == config.name)
        .map(|(id, _)| *id)
        .ok_or_else(|| MonitorError::Config("this monitor is not a member".into()))?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| MonitorError::Config(format!("create {}: {e}", config.data_dir.display())))?;
    let db_path = config.data_dir.join("raft");
    let db = open_db(&db_path).map_err(|source| MonitorError::OpenDb {
        path: db_path.clone(),
        source,
    })?;
    let (state_machine, shared) =
        StateMachine::open(db.clone()).map_err(|e| MonitorError::Raft(e.to_string()))?;
    let raft_config = Config {
        cluster_name: "basalt-monitors".into(),
        heartbeat_interval: config.raft_heartbeat_ms,
        election_timeout_min: config.election_timeout_min_ms,
        election_timeout_max: config.election_timeout_max_ms,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
        // Keep some log after a snapshot for followers that lag a little;
        // further behind they get the snapshot.
        max_in_snapshot_log_to_keep: (config.snapshot_every_entries / 2).min(500),
        purge_batch_size: (config.snapshot_every_entries / 4).clamp(1, 256),
        ..Default::default()
    }
    .validate()
    .map_err(|e| MonitorError::Config(e.to_string()))?;
    let raft = MonRaft::new(
        id,
        Arc::new(raft_config),
        Network,
        LogStore::new(db.clone()),
        state_machine,
    )
    .await
    .map_err(|e| MonitorError::Raft(e.to_string()))?;

    let mut node = MonitorNode::new(
        id,
        raft.clone(),
        shared,
        members.clone(),
        FailureConfig {
            down_after_ms: config.osd_down_after_ms,
            out_after_ms: config.osd_out_after_ms,
        },
    );
    node.balance_interval_ms = config.balance_interval_ms.max(100);
    let node = Arc::new(node);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| MonitorError::Config(format!("bind {}: {e}", config.listen)))?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server_shutdown = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            MonitorServer::new(MonitorService::new(node.clone()))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(256 << 20),
        )
        .add_service(
            RaftServer::new(RaftService::new(raft.clone()))
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
        )
        .serve_with_incoming_shutdown(incoming, async move { server_shutdown.cancelled().await });
    let listen = config.listen;
    let server = tokio::spawn(server);

    if raft
        .is_initialized()
        .await
        .map_err(|e| MonitorError::Raft(e.to_string()))?
    {
        tracing::info!(monitor = %config.name, id, "monitor restarted with its data");
    } else if members.keys().next() == Some(&id) && !peers_have_a_group(&members, id).await {
        let nodes: BTreeMap<u64, BasicNode> = members
            .iter()
            .map(|(id, (_, addr))| (*id, BasicNode::new(addr.clone())))
            .collect();
        match raft.initialize(nodes).await {
            Ok(()) => tracing::info!(monitor = %config.name, id, "monitor group initialised"),
            Err(e) => tracing::info!(monitor = %config.name, "not initialising: {e}"),
        }
    } else {
        tracing::info!(monitor = %config.name, id, "waiting to join the monitor group");
    }

    let ticker_node = node.clone();
    let ticker_shutdown = shutdown.clone();
    let ticker = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = ticker_shutdown.cancelled() => return,
                _ = interval.tick() => ticker_node.leader_tick().await,
            }
        }
    });

    tracing::info!(monitor = %config.name, %listen, "monitor serving");
    shutdown.cancelled().await;
    let _ = ticker.await;
    let served = server.await;
    let _ = raft.shutdown().await;
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(MonitorError::Serve {
            addr: listen,
            source,
        }),
        Err(e) => Err(MonitorError::Raft(format!("server task: {e}"))),
    }
}
