//! Scrub and read repair, as a PG's primary.
//!
//! A scrub gathers every member's digest of the PG (`PgDigest`: per object
//! its version and the crc32c of each allocated block; a deep scrub reads
//! and verifies every block, a light one uses the checksums in metadata),
//! settles the authoritative copy of each object (the newest version among
//! copies that verify, the primary's when it is one of them), reports every
//! member that differs (missing, older, different blocks, unreadable) and
//! repairs it by pushing the good copy (`ObjPush` with `OP_REPAIR`, which
//! replaces a copy of the same version). A read that fails its checksum on
//! the primary is served from a replica whose copy verifies, and the
//! primary's copy is repaired on the way; bad bytes are never returned.

use std::collections::BTreeMap;
use std::sync::Arc;

use basalt_placement::{ClusterMap, ObjectId, OsdId, PgId};
use basalt_wire::op::{OP_DEEP, OP_REPAIR, ObjectContents, ObjectDigest};
use basalt_wire::{Frame, Kind, OpHeader, Status};
use bytes::Bytes;
use serde::Serialize;

use super::{OsdService, message, reply};
use crate::store::{ObjectKey, StoreError};

/// One difference a scrub found.
#[derive(Clone, Debug, Serialize)]
pub struct ScrubMismatch {
    pub object: String,
    pub osd: u32,
    pub problem: String,
    pub repaired: bool,
}

/// What a scrub of one PG found and did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScrubReport {
    pub pg: String,
    pub deep: bool,
    pub members: Vec<u32>,
    pub objects: u64,
    pub mismatches: Vec<ScrubMismatch>,
    pub repaired: u64,
    pub unrepaired: u64,
}

impl OsdService {
    /// Returns this OSD's digests of every object of `pg`.
    pub(super) async fn local_digests(
        &self,
        pg: PgId,
        deep: bool,
    ) -> Result<Vec<ObjectDigest>, StoreError> {
        let mut digests = Vec::new();
        for (key, version) in self.store.list_pg(pg)? {
            let digest = match self.store.object_digest(&key, deep).await {
                Ok(Some((version, crcs))) => ObjectDigest {
                    object: key.object,
                    version,
                    state: 0,
                    crcs,
                },
                Ok(None) => continue,
                Err(StoreError::Checksum { .. }) => ObjectDigest {
                    object: key.object,
                    version,
                    state: 1,
                    crcs: Vec::new(),
                },
                Err(e) => {
                    tracing::warn!("scrub could not read {key}: {e}");
                    ObjectDigest {
                        object: key.object,
                        version,
                        state: 2,
                        crcs: Vec::new(),
                    }
                }
            };
            digests.push(digest);
        }
        Ok(digests)
    }

    /// Answers `PgDigest`.
    pub(super) async fn handle_pg_digest(
        &self,
        frame: &Frame,
        header: &OpHeader,
        epoch: u64,
    ) -> Frame {
        match self
            .local_digests(header.object.pg, header.flags & OP_DEEP != 0)
            .await
        {
            Ok(digests) => reply(frame, Status::Ok, epoch, ObjectDigest::encode_all(&digests)),
            Err(e) => reply(frame, Status::Io, epoch, message(e.to_string())),
        }
    }

    /// Scrubs `pg` (this OSD is its primary and has peered it) and repairs
    /// what differs.
    pub(super) async fn scrub(
        &self,
        pg: PgId,
        acting: &[OsdId],
        map: &Arc<ClusterMap>,
        deep: bool,
    ) -> Result<ScrubReport, String> {
        let mut by_member: Vec<(OsdId, BTreeMap<ObjectId, ObjectDigest>)> = Vec::new();
        for osd in acting {
            let digests = if *osd == self.id {
                self.local_digests(pg, deep)
                    .await
                    .map_err(|e| e.to_string())?
            } else {
                let header = OpHeader::for_pg(pg, if deep { OP_DEEP } else { 0 });
                let payload = self
                    .call_peer(*osd, map, Kind::PgDigest, header.encode_with(&[]))
                    .await?;
                ObjectDigest::decode_all(payload).map_err(|e| format!("{osd}: {e}"))?
            };
            by_member.push((*osd, digests.into_iter().map(|d| (d.object, d)).collect()));
        }
        let mut report = ScrubReport {
            pg: pg.to_string(),
            deep,
            members: acting.iter().map(|o| o.0).collect(),
            ..ScrubReport::default()
        };
        let objects: std::collections::BTreeSet<ObjectId> = by_member
            .iter()
            .flat_map(|(_, digests)| digests.keys().copied())
            .collect();
        report.objects = objects.len() as u64;
        for object in objects {
            // The authoritative copy: newest version among readable copies,
            // the first member (the primary) winning ties.
            let good = by_member
                .iter()
                .filter_map(|(osd, digests)| digests.get(&object).map(|d| (*osd, d)))
                .filter(|(_, d)| d.state == 0)
                .fold(
                    None::<(OsdId, &ObjectDigest)>,
                    |best, (osd, d)| match best {
                        Some((_, b)) if b.version >= d.version => best,
                        _ => Some((osd, d)),
                    },
                );
            let key = ObjectKey { pg, object };
            let mut bad: Vec<(OsdId, String)> = Vec::new();
            for (osd, digests) in &by_member {
                let problem = match (digests.get(&object), good) {
                    (None, _) => Some("missing".to_string()),
                    (Some(d), _) if d.state == 1 => Some("checksum mismatch in its data".into()),
                    (Some(d), _) if d.state != 0 => Some("unreadable".into()),
                    (Some(d), Some((_, g))) if d.version < g.version => {
                        Some(format!("version {} behind {}", d.version, g.version))
                    }
                    (Some(d), Some((_, g))) if d.crcs != g.crcs => {
                        Some("blocks differ from the authoritative copy".into())
                    }
                    _ => None,
                };
                if let Some(problem) = problem {
                    bad.push((*osd, problem));
                }
            }
            if bad.is_empty() {
                continue;
            }
            let repaired = match good {
                Some((source, _)) => self.repair(&key, source, &bad, map).await,
                None => Err(format!("no readable copy of {key}")),
            };
            if let Err(e) = &repaired {
                tracing::error!("scrub could not repair {key}: {e}");
            }
            for (osd, problem) in bad {
                tracing::warn!(%pg, object = %object, osd = %osd, "scrub: {problem}");
                if repaired.is_ok() {
                    report.repaired += 1;
                } else {
                    report.unrepaired += 1;
                }
                report.mismatches.push(ScrubMismatch {
                    object: object.to_string(),
                    osd: osd.0,
                    problem,
                    repaired: repaired.is_ok(),
                });
            }
        }
        Ok(report)
    }

    /// Copies the good copy of `key` from `source` over the bad copies.
    async fn repair(
        &self,
        key: &ObjectKey,
        source: OsdId,
        bad: &[(OsdId, String)],
        map: &ClusterMap,
    ) -> Result<(), String> {
        let contents = self.fetch_contents(key, source, map).await?;
        let mut payload = None;
        for (osd, _) in bad {
            if *osd == self.id {
                self.store
                    .replace_object(key, &contents.blocks, contents.version, true)
                    .await
                    .map_err(|e| format!("repair {key} here: {e}"))?;
            } else {
                let payload = payload
                    .get_or_insert_with(|| {
                        OpHeader::for_object(key.pg, key.object, OP_REPAIR)
                            .encode_with(&contents.encode())
                    })
                    .clone();
                self.call_peer(*osd, map, Kind::ObjPush, payload).await?;
            }
        }
        Ok(())
    }

    /// Returns an object's whole contents from `source` (here or remote).
    async fn fetch_contents(
        &self,
        key: &ObjectKey,
        source: OsdId,
        map: &ClusterMap,
    ) -> Result<ObjectContents, String> {
        if source == self.id {
            let (version, blocks) = self
                .store
                .object_contents(key)
                .await
                .map_err(|e| format!("read {key}: {e}"))?
                .ok_or_else(|| format!("{key} vanished"))?;
            return Ok(ObjectContents { version, blocks });
        }
        let header = OpHeader::for_object(key.pg, key.object, 0);
        let payload = self
            .call_peer(source, map, Kind::ObjPull, header.encode_with(&[]))
            .await?;
        ObjectContents::decode(payload).map_err(|e| format!("pull {key}: {e}"))
    }

    /// A read on the primary failed its checksum: repair the primary's copy
    /// from the first replica whose copy verifies (at the primary's version
    /// or newer), then read again. Returns the good bytes or why not.
    pub(super) async fn read_repair(
        &self,
        key: &ObjectKey,
        offset: u64,
        length: u64,
        acting: &[OsdId],
        map: &ClusterMap,
    ) -> Result<Bytes, String> {
        let mut last = String::from("no replica");
        for replica in acting.iter().filter(|o| **o != self.id) {
            match self.fetch_contents(key, *replica, map).await {
                Ok(contents) => {
                    let replaced = self
                        .store
                        .replace_object(key, &contents.blocks, contents.version, true)
                        .await
                        .map_err(|e| format!("repair {key}: {e}"))?;
                    if !replaced {
                        last = format!("{replica} holds an older version");
                        continue;
                    }
                    tracing::warn!(%key, source = %replica, "repaired a bad copy on read");
                    return self
                        .store
                        .read(key, offset, length)
                        .await
                        .map_err(|e| format!("read {key} after repair: {e}"));
                }
                Err(e) => last = e,
            }
        }
        Err(format!("no good copy of {key}: {last}"))
    }
}
