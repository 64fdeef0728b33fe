//! `MonitorDaemon`: assembles and runs one monitor process.
//!
//! Bootstrap: every monitor is started with the same `--peers` list
//! (`name=addr,...`). Member ids are the names' positions in sorted order
//! (plus one), so every monitor derives the same membership. The first
//! member in name order, with no raft state, initialises the group with
//! that membership once a majority of the members (itself included) said
//! they have no raft state and none reported a group; the others wait to be
//! contacted, so the group forms as soon as that monitor and a majority are
//! up, whatever the order of starts. (Initialising on every member is
//! allowed by raft but races with the first election and makes openraft log
//! errors.) A monitor whose data directory was wiped starts empty and is
//! brought up to date by the leader, by snapshot when the log it needs was
//! compacted away. A wiped first member waits while members do not answer
//! (down, or too slow to answer in a second): it founds nothing beside a
//! group it cannot see. Only a majority wiped at once loses the map.

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

/// What the other members answered about the monitor group.
#[derive(Debug, Default, PartialEq)]
struct PeerProbe {
    /// Members that answered with no raft state (term 0).
    empty: usize,
    /// Some member belongs to a formed group (it reports a raft term).
    group: bool,
}

/// Asks every other member whether it belongs to a formed group (1 s each).
async fn probe_peers(members: &BTreeMap<u64, (String, String)>, id: u64) -> PeerProbe {
    let mut probe = PeerProbe::default();
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
        match status {
            Ok(status) if status.raft_term > 0 => probe.group = true,
            Ok(_) => probe.empty += 1,
            // No answer says nothing: it may hold the group's data.
            Err(_) => {}
        }
    }
    probe
}

/// Whether the founder (the first member, without raft state) may found
/// the group: no member reports a group, and a majority of the members
/// (itself included) answered that they have no raft state, so no group
/// with a majority can exist elsewhere. A member that does not answer in
/// time (a slow or overloaded host) may hold the group: the founder then
/// waits rather than found a second, empty group beside it.
fn may_found(probe: &PeerProbe, members: usize) -> bool {
    !probe.group && probe.empty + 1 > members / 2
}

/// The founder without raft state: founds the group once `may_found`
/// says so, or stops as soon as it belongs to one (a leader brought it up
/// to date after its data directory was wiped) or another member reports a
/// group (whose leader will).
async fn found_when_safe(
    raft: MonRaft,
    members: BTreeMap<u64, (String, String)>,
    id: u64,
    name: String,
    shutdown: CancellationToken,
) {
    let mut waited = false;
    loop {
        if raft.is_initialized().await.unwrap_or(false) {
            tracing::info!(monitor = %name, id, "joined the monitor group");
            return;
        }
        let probe = probe_peers(&members, id).await;
        if probe.group {
            tracing::info!(
                monitor = %name,
                id,
                "another member belongs to a monitor group: waiting to join it"
            );
            return;
        }
        if may_found(&probe, members.len()) {
            let nodes: BTreeMap<u64, BasicNode> = members
                .iter()
                .map(|(id, (_, addr))| (*id, BasicNode::new(addr.clone())))
                .collect();
            match raft.initialize(nodes).await {
                Ok(()) => tracing::info!(monitor = %name, id, "monitor group initialised"),
                Err(e) => tracing::info!(monitor = %name, "not initialising: {e}"),
            }
            return;
        }
        if !waited {
            waited = true;
            tracing::info!(
                monitor = %name,
                id,
                "waiting for a majority of members to answer before founding the monitor group"
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
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
    } else if members.keys().next() == Some(&id) {
        // Serving meanwhile: the other members' probes and a leader's
        // replication reach this monitor while it waits.
        tokio::spawn(found_when_safe(
            raft.clone(),
            members.clone(),
            id,
            config.name.clone(),
            shutdown.clone(),
        ));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The founder founds only when a majority is known to be empty and no
    /// member reports a group; silence is not emptiness.
    #[test]
    fn founding_needs_a_majority_known_empty_and_no_group() {
        let probe = |empty, group| PeerProbe { empty, group };
        // Three members: itself and one empty peer are a majority.
        assert!(
            !may_found(&probe(0, false), 3),
            "alone: the others may hold the group"
        );
        assert!(may_found(&probe(1, false), 3));
        assert!(may_found(&probe(2, false), 3));
        assert!(!may_found(&probe(1, true), 3), "a peer reports a group");
        assert!(!may_found(&probe(2, true), 3));
        // Five members: itself and two.
        assert!(!may_found(&probe(1, false), 5));
        assert!(may_found(&probe(2, false), 5));
        // A group of one founds itself.
        assert!(may_found(&probe(0, false), 1));
    }
}
