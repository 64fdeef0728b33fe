//! `RaftStore`: the raft log, vote and state-machine snapshots in RocksDB,
//! and the state machine itself (the cluster map) in memory.
//!
//! Column families: `logs` (index, big-endian -> entry JSON) and `store`
//! (vote, committed, last purged, latest snapshot). Every write that raft
//! relies on is synced before it is acknowledged. The map is rebuilt at start
//! from the latest snapshot, after which openraft replays the committed log
//! (it re-applies `(snapshot, committed]` inside `Raft::new`). Snapshots are
//! taken every `snapshot_every` entries and let raft purge the log, so it
//! does not grow without bound.

// openraft's traits fix StorageError (224 bytes) as the error type; boxing
// it in our helpers would only add conversions at every trait boundary.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

use basalt_placement::ClusterMap;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::command::{self, Command, CommandResult};

openraft::declare_raft_types!(
    /// Raft types of the monitor group.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The raft handle of a monitor.
pub type MonRaft = openraft::Raft<TypeConfig>;

/// What applying one entry produced (nothing for raft's own entries).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub result: Option<CommandResult>,
}

const CF_LOGS: &str = "logs";
const CF_STORE: &str = "store";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";

type NodeId = u64;
type Result<T> = std::result::Result<T, StorageError<NodeId>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

fn synced() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

/// Opens the monitor's raft database.
pub fn open_db(path: &Path) -> std::result::Result<Arc<DB>, rocksdb::Error> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let families = [CF_LOGS, CF_STORE]
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    Ok(Arc::new(DB::open_cf_descriptors(&options, path, families)?))
}

/// The raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> Self {
        Self { db }
    }

    fn get_json<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>> {
        let store = self.db.cf_handle(CF_STORE).ok_or_else(missing_cf)?;
        match self.db.get_cf(store, key).map_err(read_err)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(read_err),
        }
    }

    fn put_json<T: Serialize>(&self, key: &[u8], value: &T) -> Result<()> {
        let store = self.db.cf_handle(CF_STORE).ok_or_else(missing_cf)?;
        let bytes = serde_json::to_vec(value).map_err(write_err)?;
        self.db
            .put_cf_opt(store, key, bytes, &synced())
            .map_err(write_err)
    }

    fn last_log_id(&self) -> Result<Option<LogId<NodeId>>> {
        let logs = self.db.cf_handle(CF_LOGS).ok_or_else(missing_cf)?;
        let mut iter = self.db.iterator_cf(logs, IteratorMode::End);
        match iter.next() {
            None => Ok(None),
            Some(item) => {
                let (_, value) = item.map_err(read_err)?;
                let entry: Entry<TypeConfig> = serde_json::from_slice(&value).map_err(read_err)?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

fn missing_cf() -> StorageError<NodeId> {
    StorageIOError::read(AnyError::error("column family missing")).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let logs = self.db.cf_handle(CF_LOGS).ok_or_else(missing_cf)?;
        let mut out = Vec::new();
        let key = start.to_be_bytes();
        for item in self
            .db
            .iterator_cf(logs, IteratorMode::From(&key, Direction::Forward))
        {
            let (k, v) = item.map_err(read_err)?;
            let mut index = [0u8; 8];
            index.copy_from_slice(&k[..8]);
            let index = u64::from_be_bytes(index);
            if !range.contains(&index) {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = self.get_json(KEY_LAST_PURGED)?;
        let last = self.last_log_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        self.put_json(KEY_VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        self.get_json(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        self.put_json(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self
            .get_json::<Option<LogId<NodeId>>>(KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let logs = self.db.cf_handle(CF_LOGS).ok_or_else(missing_cf)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(write_err)?;
            batch.put_cf(logs, entry.log_id.index.to_be_bytes(), bytes);
        }
        let result = self.db.write_opt(batch, &synced());
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let logs = self.db.cf_handle(CF_LOGS).ok_or_else(missing_cf)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(logs, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
        batch.delete_cf(logs, u64::MAX.to_be_bytes());
        self.db.write_opt(batch, &synced()).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let logs = self.db.cf_handle(CF_LOGS).ok_or_else(missing_cf)?;
        let store = self.db.cf_handle(CF_STORE).ok_or_else(missing_cf)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            store,
            KEY_LAST_PURGED,
            serde_json::to_vec(&Some(log_id)).map_err(write_err)?,
        );
        batch.delete_range_cf(logs, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes());
        self.db.write_opt(batch, &synced()).map_err(write_err)
    }
}

/// The state machine's content: the map plus raft's bookkeeping.
#[derive(Clone, Debug, Default)]
pub struct SmState {
    pub map: ClusterMap,
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, BasicNode>,
}

/// What a snapshot's data holds (its meta carries raft's bookkeeping).
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    map: ClusterMap,
}

/// A snapshot as persisted.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The map everyone reads: the state machine publishes each new epoch.
#[derive(Clone)]
pub struct SharedMap {
    state: Arc<RwLock<SmState>>,
    published: watch::Sender<Arc<ClusterMap>>,
}

impl SharedMap {
    /// Returns the current map.
    pub fn map(&self) -> Arc<ClusterMap> {
        self.published.borrow().clone()
    }

    /// Returns a receiver that sees every newly applied map.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterMap>> {
        self.published.subscribe()
    }

    /// Returns the index of the last applied entry.
    pub fn last_applied_index(&self) -> Option<u64> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .last_applied
            .map(|l| l.index)
    }
}

/// The raft state machine of a monitor.
pub struct StateMachine {
    db: Arc<DB>,
    shared: SharedMap,
    snapshot_counter: u64,
}

impl StateMachine {
    /// Builds the state machine from the latest persisted snapshot (or an
    /// empty map).
    pub fn open(db: Arc<DB>) -> std::result::Result<(Self, SharedMap), StorageError<NodeId>> {
        let mut state = SmState::default();
        if let Some(stored) = load_snapshot(&db)? {
            let data: SnapshotData = serde_json::from_slice(&stored.data).map_err(read_err)?;
            state.map = data.map;
            state.last_applied = stored.meta.last_log_id;
            state.last_membership = stored.meta.last_membership;
        }
        let (published, _) = watch::channel(Arc::new(state.map.clone()));
        let shared = SharedMap {
            state: Arc::new(RwLock::new(state)),
            published,
        };
        Ok((
            StateMachine {
                db,
                shared: shared.clone(),
                snapshot_counter: 0,
            },
            shared,
        ))
    }

    fn state(&self) -> std::sync::RwLockWriteGuard<'_, SmState> {
        self.shared.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn load_snapshot(db: &DB) -> Result<Option<StoredSnapshot>> {
    let store = db.cf_handle(CF_STORE).ok_or_else(missing_cf)?;
    match db.get_cf(store, KEY_SNAPSHOT).map_err(read_err)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(read_err),
    }
}

fn save_snapshot(db: &DB, snapshot: &StoredSnapshot) -> Result<()> {
    let store = db.cf_handle(CF_STORE).ok_or_else(missing_cf)?;
    let bytes = serde_json::to_vec(snapshot).map_err(write_err)?;
    db.put_cf_opt(store, KEY_SNAPSHOT, bytes, &synced())
        .map_err(write_err)
}

/// Builds a snapshot from a copy of the state taken between applies.
pub struct SnapshotBuilder {
    db: Arc<DB>,
    state: SmState,
    id: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let data = serde_json::to_vec(&SnapshotData {
            map: self.state.map.clone(),
        })
        .map_err(write_err)?;
        let snapshot_id = match self.state.last_applied {
            Some(last) => format!("{}-{}-{}", last.leader_id, last.index, self.id),
            None => format!("empty-{}", self.id),
        };
        let meta = SnapshotMeta {
            last_log_id: self.state.last_applied,
            last_membership: self.state.last_membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || save_snapshot(&db, &stored))
            .await
            .map_err(write_err)??;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let state = self.state();
        Ok((state.last_applied, state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let published = {
            let mut state = self.state();
            let epoch_before = state.map.epoch;
            for entry in entries {
                state.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => replies.push(Applied::default()),
                    EntryPayload::Normal(command) => {
                        let result = command::apply(&mut state.map, &command);
                        replies.push(Applied {
                            result: Some(result),
                        });
                    }
                    EntryPayload::Membership(membership) => {
                        state.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        replies.push(Applied::default());
                    }
                }
            }
            (state.map.epoch != epoch_before).then(|| Arc::new(state.map.clone()))
        };
        if let Some(map) = published {
            self.shared.published.send_replace(map);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_counter += 1;
        SnapshotBuilder {
            db: self.db.clone(),
            state: self.state().clone(),
            id: self.snapshot_counter,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let bytes = snapshot.into_inner();
        let data: SnapshotData = serde_json::from_slice(&bytes).map_err(read_err)?;
        save_snapshot(
            &self.db,
            &StoredSnapshot {
                meta: meta.clone(),
                data: bytes,
            },
        )?;
        let map = {
            let mut state = self.state();
            state.map = data.map;
            state.last_applied = meta.last_log_id;
            state.last_membership = meta.last_membership.clone();
            Arc::new(state.map.clone())
        };
        tracing::info!(
            snapshot = %meta.snapshot_id,
            last_log = ?meta.last_log_id.map(|l| l.index),
            "installed snapshot from the leader"
        );
        self.shared.published.send_replace(map);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        Ok(load_snapshot(&self.db)?.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}
