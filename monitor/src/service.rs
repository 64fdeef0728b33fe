//! `MonitorNode` and the `Monitor` gRPC service.
//!
//! Reads (map, pools, volumes, status) are served from this monitor's
//! applied state, which may trail the leader by a few entries; the epoch in
//! every reply says how fresh it is. Writes are proposed to raft: on a
//! follower they are answered UNAVAILABLE with the leader's address in the
//! `x-basalt-leader` metadata (the client library follows it), and a write
//! that cannot be committed within `write_timeout` (no quorum) is answered
//! UNAVAILABLE rather than left hanging.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use basalt_placement::{Balancer, ClusterMap, FailureDomain, OsdId, Placer, Weight};
use basalt_proto::monitor as pb;
use basalt_proto::monitor::monitor_server::Monitor;
use openraft::error::{ClientWriteError, RaftError};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::client::LEADER_METADATA;
use crate::command::{Command, CommandError, DEFAULT_POOL, Reply};
use crate::failure_detector::{FailureConfig, FailureDetector};
use crate::raft_store::{MonRaft, SharedMap};

/// One monitor of the group, as its services see it.
pub struct MonitorNode {
    pub id: u64,
    pub raft: MonRaft,
    pub shared: SharedMap,
    /// Every member: id -> (name, address).
    pub members: BTreeMap<u64, (String, String)>,
    pub failure: FailureConfig,
    pub write_timeout: Duration,
    started: Instant,
    detector: Mutex<Option<FailureDetector>>,
    /// When the balancer last ran, in `now_ms` time.
    balanced_at_ms: Mutex<Option<u64>>,
    /// How often the leader runs the balancer. Default 10 s.
    pub balance_interval_ms: u64,
    /// NBD gateways' last reports: address -> (clients, when, in `now_ms`).
    gateways: Mutex<BTreeMap<String, (Vec<pb::GatewayClient>, u64)>>,
}

/// Gateways silent for longer than this drop out of `status`.
const GATEWAY_REPORT_EXPIRY_MS: u64 = 10_000;

impl From<CommandError> for Status {
    fn from(error: CommandError) -> Status {
        match &error {
            CommandError::AlreadyExists(_) => Status::already_exists(error.to_string()),
            CommandError::NotFound(_) => Status::not_found(error.to_string()),
            CommandError::InvalidArgument(_) => Status::invalid_argument(error.to_string()),
            CommandError::FailedPrecondition(_) => Status::failed_precondition(error.to_string()),
        }
    }
}

impl MonitorNode {
    pub fn new(
        id: u64,
        raft: MonRaft,
        shared: SharedMap,
        members: BTreeMap<u64, (String, String)>,
        failure: FailureConfig,
    ) -> Self {
        Self {
            id,
            raft,
            shared,
            members,
            failure,
            write_timeout: Duration::from_secs(5),
            started: Instant::now(),
            detector: Mutex::new(None),
            balanced_at_ms: Mutex::new(None),
            balance_interval_ms: 10_000,
            gateways: Mutex::new(BTreeMap::new()),
        }
    }

    /// Milliseconds since this monitor started: the failure detector's clock.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Returns the current leader's id, if one is known.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// Returns whether this monitor leads.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.id)
    }

    pub fn not_leader(&self) -> Status {
        match self.leader().and_then(|id| self.members.get(&id)) {
            Some((name, addr)) => {
                let mut status =
                    Status::unavailable(format!("not the leader; monitor {name} at {addr} is"));
                if let Ok(value) = addr.parse() {
                    status.metadata_mut().insert(LEADER_METADATA, value);
                }
                status
            }
            None => Status::unavailable("no monitor leader elected (no quorum?)"),
        }
    }

    /// Commits `command` through raft and returns what applying it gave.
    pub async fn propose(&self, command: Command) -> Result<Reply, Status> {
        let write = self.raft.client_write(command);
        match tokio::time::timeout(self.write_timeout, write).await {
            Err(_) => Err(Status::unavailable(format!(
                "the change was not committed within {:?}: no quorum of monitors",
                self.write_timeout
            ))),
            Ok(Ok(response)) => match response.data.result {
                Some(result) => result.map_err(Status::from),
                None => Err(Status::internal("raft returned no result for a command")),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Err(self.not_leader())
            }
            Ok(Err(e)) => Err(Status::unavailable(format!("raft: {e}"))),
        }
    }

    /// Runs the leader's duties once: failure verdicts, and every
    /// `balance_interval_ms` the balancer. Called periodically by the
    /// daemon; does nothing on followers.
    pub async fn leader_tick(&self) {
        if !self.is_leader() {
            *self.detector.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return;
        }
        let verdicts = {
            let mut detector = self.detector.lock().unwrap_or_else(|e| e.into_inner());
            let now = self.now_ms();
            let detector = detector.get_or_insert_with(|| FailureDetector::new(self.failure, now));
            detector.verdicts(&self.shared.map(), now)
        };
        for command in verdicts {
            tracing::info!(?command, "failure detector verdict");
            if let Err(e) = self.propose(command).await {
                tracing::warn!("failed to commit failure verdict: {}", e.message());
            }
        }
        let due = {
            let now = self.now_ms();
            let mut last = self
                .balanced_at_ms
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|at| now.saturating_sub(at) >= self.balance_interval_ms);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            self.balance().await;
        }
    }

    /// Runs the balancer on every pool of the current map and commits the
    /// exceptions of each pool it improved. Refused as stale (and retried on
    /// the next round) when the map moved on meanwhile.
    ///
    /// Only pools that hold no volume are rebalanced for now: moving a PG
    /// member needs backfill to bring the data along, which comes with the
    /// failure-handling issue (tracker issue 7). Until then a pool is
    /// balanced when it is created and kept where its data is afterwards.
    async fn balance(&self) {
        let map = self.shared.map();
        let proposals = tokio::task::spawn_blocking(move || {
            let mut proposals = Vec::new();
            let in_use: std::collections::HashSet<_> =
                map.volumes.values().map(|v| v.pool).collect();
            for pool in map.pools.keys().filter(|p| !in_use.contains(p)) {
                let mut copy = (*map).clone();
                match Balancer::default().balance(&mut copy, *pool) {
                    Ok(report) if report.moves > 0 => {
                        if let Some(balanced) = copy.pools.get(pool)
                            && Some(&balanced.upmap) != map.pools.get(pool).map(|p| &p.upmap)
                        {
                            proposals.push((
                                report,
                                Command::SetUpmap {
                                    pool: *pool,
                                    upmap: balanced.upmap.clone(),
                                    base_epoch: map.epoch,
                                },
                            ));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("balancer failed on {pool}: {e}"),
                }
            }
            proposals
        })
        .await
        .unwrap_or_default();
        for (report, command) in proposals {
            tracing::info!(
                moves = report.moves,
                before = report.max_over_target_before,
                after = report.max_over_target_after,
                "balancer proposes exceptions"
            );
            if let Err(e) = self.propose(command).await {
                tracing::info!("balancer result not committed: {}", e.message());
            }
        }
    }

    fn heartbeat(&self, osd: OsdId) -> Result<(), Status> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if !self.shared.map().osds.contains_key(&osd) {
            return Err(Status::not_found(format!(
                "{osd} is not in the map; boot first"
            )));
        }
        let now = self.now_ms();
        let mut detector = self.detector.lock().unwrap_or_else(|e| e.into_inner());
        detector
            .get_or_insert_with(|| FailureDetector::new(self.failure, now))
            .heartbeat(osd, now);
        Ok(())
    }
}

/// The gRPC face of a monitor.
pub struct MonitorService {
    node: std::sync::Arc<MonitorNode>,
}

impl MonitorService {
    pub fn new(node: std::sync::Arc<MonitorNode>) -> Self {
        Self { node }
    }
}

fn map_reply(map: &ClusterMap) -> Result<pb::MapReply, Status> {
    Ok(pb::MapReply {
        epoch: map.epoch.0,
        map_json: serde_json::to_vec(map)
            .map_err(|e| Status::internal(format!("encode map: {e}")))?,
    })
}

fn pool_message(map: &ClusterMap, id: basalt_placement::PoolId) -> Option<pb::Pool> {
    map.pools.get(&id).map(|pool| pb::Pool {
        id: id.0,
        name: pool.name.clone(),
        size: pool.size,
        min_size: pool.min_size,
        pg_count: pool.pg_count,
        failure_domain: pool.failure_domain.to_string(),
    })
}

fn volume_message(map: &ClusterMap, id: basalt_placement::VolumeId) -> Option<pb::Volume> {
    map.volumes.get(&id).map(|volume| pb::Volume {
        id: id.0,
        name: volume.name.clone(),
        pool: map
            .pools
            .get(&volume.pool)
            .map(|p| p.name.clone())
            .unwrap_or_default(),
        size_bytes: volume.size_bytes,
        object_size_bytes: volume.object_size_bytes,
        home: volume
            .home
            .and_then(|h| map.hosts.get(&h))
            .map(|h| h.name.clone())
            .unwrap_or_default(),
    })
}

fn snapshot_message(map: &ClusterMap, id: basalt_placement::SnapshotId) -> Option<pb::Snapshot> {
    let snapshot = map.snapshots.get(&id)?;
    let volume = map.volumes.get(&snapshot.volume)?;
    Some(pb::Snapshot {
        id: id.0,
        volume: volume.name.clone(),
        pool: map
            .pools
            .get(&volume.pool)
            .map(|p| p.name.clone())
            .unwrap_or_default(),
        name: snapshot.name.clone(),
        created_epoch: snapshot.created_epoch.0,
    })
}

fn pool_name(name: &str) -> String {
    if name.is_empty() {
        DEFAULT_POOL.to_string()
    } else {
        name.to_string()
    }
}

/// Health warnings an operator should see in `basalt status`.
pub fn health_warnings(map: &ClusterMap, leader_known: bool) -> Vec<String> {
    let mut warnings = Vec::new();
    if !leader_known {
        warnings.push("no monitor leader: map changes are blocked".to_string());
    }
    let down: Vec<String> = map
        .osds
        .iter()
        .filter(|(_, o)| !o.up)
        .map(|(id, _)| id.to_string())
        .collect();
    if !down.is_empty() {
        warnings.push(format!("{} OSD(s) down: {}", down.len(), down.join(", ")));
    }
    let placer = Placer::new(map);
    for (id, pool) in &map.pools {
        if let Err(e) = placer.check_pool(*id) {
            warnings.push(format!("pool {:?} is degraded: {e}", pool.name));
        }
    }
    warnings
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::MapReply, Status>> + Send>>;

#[tonic::async_trait]
impl Monitor for MonitorService {
    async fn get_map(
        &self,
        request: Request<pb::GetMapRequest>,
    ) -> Result<Response<pb::MapReply>, Status> {
        let wanted = request.into_inner().epoch;
        let map = self.node.shared.map();
        if wanted != 0 && wanted != map.epoch.0 {
            return Err(Status::not_found(format!(
                "epoch {wanted} is not kept; the current epoch is {}",
                map.epoch.0
            )));
        }
        Ok(Response::new(map_reply(&map)?))
    }

    type WatchMapStream = WatchStream;

    async fn watch_map(
        &self,
        request: Request<pb::WatchMapRequest>,
    ) -> Result<Response<Self::WatchMapStream>, Status> {
        let from = request.into_inner().from_epoch;
        let stream = tokio_stream::wrappers::WatchStream::new(self.node.shared.subscribe())
            .filter(move |map| map.epoch.0 >= from)
            .map(|map| map_reply(&map));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn osd_boot(
        &self,
        request: Request<pb::OsdBootRequest>,
    ) -> Result<Response<pb::OsdBootReply>, Status> {
        let request = request.into_inner();
        if !(request.weight.is_finite() && request.weight >= 0.0) {
            return Err(Status::invalid_argument(format!(
                "weight {} must be a non-negative number",
                request.weight
            )));
        }
        let command = Command::OsdBoot {
            osd: (!request.new_osd).then_some(OsdId(request.osd_id)),
            host: request.host,
            zone: request.zone,
            addr: request.addr,
            weight: Weight::from_f64(request.weight),
        };
        match self.node.propose(command).await? {
            Reply::Osd { osd, epoch } => {
                // A booting OSD is alive: start its heartbeat clock now.
                let _ = self.node.heartbeat(osd);
                Ok(Response::new(pb::OsdBootReply {
                    osd_id: osd.0,
                    epoch: epoch.0,
                }))
            }
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let request = request.into_inner();
        self.node.heartbeat(OsdId(request.osd_id))?;
        Ok(Response::new(pb::HeartbeatReply {
            epoch: self.node.shared.map().epoch.0,
        }))
    }

    async fn create_pool(
        &self,
        request: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::PoolReply>, Status> {
        let request = request.into_inner();
        let failure_domain = if request.failure_domain.is_empty() {
            FailureDomain::Host
        } else {
            request
                .failure_domain
                .parse()
                .map_err(|e: basalt_placement::MapError| Status::invalid_argument(e.to_string()))?
        };
        let size = if request.size == 0 { 3 } else { request.size };
        let command = Command::CreatePool {
            name: request.name,
            size,
            min_size: if request.min_size == 0 {
                size.min(2)
            } else {
                request.min_size
            },
            pg_count: if request.pg_count == 0 {
                128
            } else {
                request.pg_count
            },
            failure_domain,
        };
        match self.node.propose(command).await? {
            Reply::Pool { pool, epoch } => Ok(Response::new(pb::PoolReply {
                pool: pool_message(&self.node.shared.map(), pool),
                epoch: epoch.0,
            })),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn list_pools(
        &self,
        _request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsReply>, Status> {
        let map = self.node.shared.map();
        Ok(Response::new(pb::ListPoolsReply {
            pools: map
                .pools
                .keys()
                .filter_map(|id| pool_message(&map, *id))
                .collect(),
        }))
    }

    async fn delete_pool(
        &self,
        request: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeleteReply>, Status> {
        let name = request.into_inner().name;
        let reply = self.node.propose(Command::DeletePool { name }).await?;
        Ok(Response::new(pb::DeleteReply {
            epoch: reply_epoch(&reply),
        }))
    }

    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::VolumeReply>, Status> {
        let request = request.into_inner();
        let command = Command::CreateVolume {
            pool: pool_name(&request.pool),
            name: request.name,
            size_bytes: request.size_bytes,
            object_size_bytes: request.object_size_bytes,
            home: (!request.home.is_empty()).then_some(request.home),
        };
        self.volume_reply(command).await
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesReply>, Status> {
        let pool = request.into_inner().pool;
        let map = self.node.shared.map();
        let pool_id = if pool.is_empty() {
            None
        } else {
            Some(
                map.pool_by_name(&pool)
                    .ok_or_else(|| Status::not_found(format!("pool {pool:?} not found")))?,
            )
        };
        Ok(Response::new(pb::ListVolumesReply {
            volumes: map
                .volumes
                .iter()
                .filter(|(_, v)| pool_id.is_none_or(|p| v.pool == p))
                .filter_map(|(id, _)| volume_message(&map, *id))
                .collect(),
        }))
    }

    async fn get_volume(
        &self,
        request: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::VolumeReply>, Status> {
        let request = request.into_inner();
        let map = self.node.shared.map();
        let pool = pool_name(&request.pool);
        let pool_id = map
            .pool_by_name(&pool)
            .ok_or_else(|| Status::not_found(format!("pool {pool:?} not found")))?;
        let id = map
            .volumes
            .iter()
            .find(|(_, v)| v.pool == pool_id && v.name == request.name)
            .map(|(id, _)| *id)
            .ok_or_else(|| Status::not_found(format!("volume {:?} not found", request.name)))?;
        Ok(Response::new(pb::VolumeReply {
            volume: volume_message(&map, id),
            epoch: map.epoch.0,
        }))
    }

    async fn resize_volume(
        &self,
        request: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::VolumeReply>, Status> {
        let request = request.into_inner();
        let command = Command::ResizeVolume {
            pool: pool_name(&request.pool),
            name: request.name,
            size_bytes: request.size_bytes,
            allow_shrink: request.allow_shrink,
        };
        self.volume_reply(command).await
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteReply>, Status> {
        let request = request.into_inner();
        let reply = self
            .node
            .propose(Command::DeleteVolume {
                pool: pool_name(&request.pool),
                name: request.name,
            })
            .await?;
        Ok(Response::new(pb::DeleteReply {
            epoch: reply_epoch(&reply),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotReply>, Status> {
        let request = request.into_inner();
        let reply = self
            .node
            .propose(Command::CreateSnapshot {
                pool: pool_name(&request.pool),
                volume: request.volume,
                name: request.name,
            })
            .await?;
        match reply {
            Reply::Snapshot { snapshot, epoch } => Ok(Response::new(pb::SnapshotReply {
                snapshot: snapshot_message(&self.node.shared.map(), snapshot),
                epoch: epoch.0,
            })),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsReply>, Status> {
        let request = request.into_inner();
        let map = self.node.shared.map();
        let pool = pool_name(&request.pool);
        Ok(Response::new(pb::ListSnapshotsReply {
            snapshots: map
                .snapshots
                .keys()
                .filter_map(|id| snapshot_message(&map, *id))
                .filter(|s| {
                    s.pool == pool && (request.volume.is_empty() || s.volume == request.volume)
                })
                .collect(),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteReply>, Status> {
        let request = request.into_inner();
        let reply = self
            .node
            .propose(Command::DeleteSnapshot {
                pool: pool_name(&request.pool),
                volume: request.volume,
                name: request.name,
            })
            .await?;
        Ok(Response::new(pb::DeleteReply {
            epoch: reply_epoch(&reply),
        }))
    }

    async fn gateway_report(
        &self,
        request: Request<pb::GatewayReportRequest>,
    ) -> Result<Response<pb::GatewayReportReply>, Status> {
        if !self.node.is_leader() {
            return Err(self.node.not_leader());
        }
        let request = request.into_inner();
        if request.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "gateway address {:?} is not ip:port",
                request.addr
            )));
        }
        let now = self.node.now_ms();
        let mut gateways = self.node.gateways.lock().unwrap_or_else(|e| e.into_inner());
        gateways.insert(request.addr, (request.clients, now));
        gateways.retain(|_, (_, at)| now.saturating_sub(*at) <= GATEWAY_REPORT_EXPIRY_MS);
        Ok(Response::new(pb::GatewayReportReply {}))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let map = self.node.shared.map();
        let now = self.node.now_ms();
        let gateways: Vec<pb::Gateway> = self
            .node
            .gateways
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, (_, at))| now.saturating_sub(*at) <= GATEWAY_REPORT_EXPIRY_MS)
            .map(|(addr, (clients, at))| pb::Gateway {
                addr: addr.clone(),
                clients: clients.clone(),
                last_report_ms: now.saturating_sub(*at),
            })
            .collect();
        let metrics = self.node.raft.metrics().borrow().clone();
        let leader = metrics.current_leader;
        Ok(Response::new(pb::StatusReply {
            epoch: map.epoch.0,
            monitors: self
                .node
                .members
                .iter()
                .map(|(id, (name, addr))| pb::MonitorMember {
                    id: *id,
                    name: name.clone(),
                    addr: addr.clone(),
                    leader: leader == Some(*id),
                })
                .collect(),
            leader: leader
                .and_then(|id| self.node.members.get(&id))
                .map(|(name, _)| name.clone())
                .unwrap_or_default(),
            raft_term: metrics.current_term,
            last_applied_index: metrics.last_applied.map_or(0, |l| l.index),
            osds_total: map.osds.len() as u32,
            osds_up: map.osds.values().filter(|o| o.up).count() as u32,
            osds_in: map.osds.values().filter(|o| o.in_).count() as u32,
            pools: map.pools.len() as u32,
            volumes: map.volumes.len() as u32,
            health_warnings: health_warnings(&map, leader.is_some()),
            gateways,
        }))
    }
}

impl MonitorService {
    async fn volume_reply(&self, command: Command) -> Result<Response<pb::VolumeReply>, Status> {
        match self.node.propose(command).await? {
            Reply::Volume { volume, epoch } => Ok(Response::new(pb::VolumeReply {
                volume: volume_message(&self.node.shared.map(), volume),
                epoch: epoch.0,
            })),
            other => Err(Status::internal(format!("unexpected reply {other:?}"))),
        }
    }
}

fn reply_epoch(reply: &Reply) -> u64 {
    match reply {
        Reply::Osd { epoch, .. }
        | Reply::Pool { epoch, .. }
        | Reply::Volume { epoch, .. }
        | Reply::Snapshot { epoch, .. }
        | Reply::Epoch(epoch) => epoch.0,
    }
}
