//! `RecoveryPlan`: what a PG's new primary must copy where before the PG
//! serves I/O again. Pure: it sees only what the members reported.
//!
//! Every replicated write carries a version the primary assigned and is
//! acknowledged only when every member of the acting set has it durably.
//! So any member of the interval that acknowledged a write holds it, and the
//! newest version of an object found on any reachable member is the
//! authoritative one: an acknowledged write always has the highest version
//! of its object (later writes to the object were ordered after it by the
//! primary's per-object lock). A write that reached only some members was
//! never acknowledged; settling on the newest version makes every member
//! agree on it (all have it or, where none kept it, none do), so it is not
//! visible on one copy and missing on another.
//!
//! Discards keep a versioned (empty) object entry, so they win over older
//! data like any write. Deleting whole objects (no volume does yet) would
//! need a tombstone to do the same; see the OSD's crate docs.

use std::collections::BTreeMap;

use basalt_placement::{ObjectId, OsdId};

/// What one OSD reported for a PG: object -> version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    pub osd: OsdId,
    pub objects: BTreeMap<ObjectId, u64>,
}

/// Copy `object` at `version` from `source` to every OSD in `targets`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copy {
    pub object: ObjectId,
    pub version: u64,
    pub source: OsdId,
    pub targets: Vec<OsdId>,
}

impl Copy {
    /// A client write to this copy's object while the copy is pending
    /// (asynchronous recovery, as Ceph's async recovery targets): returns
    /// the members the write skips (the copy's targets, which get the
    /// object from the copy afterwards), or `None` when the write must wait
    /// for the copy: the primary itself lacks the newest version, or fewer
    /// than `min_size` members of `acting` would take the write.
    pub fn write_around(
        &self,
        primary: OsdId,
        acting: &[OsdId],
        min_size: usize,
    ) -> Option<&[OsdId]> {
        if self.targets.contains(&primary) {
            return None;
        }
        let holders = acting
            .iter()
            .filter(|osd| !self.targets.contains(osd))
            .count();
        (holders >= min_size.max(1)).then_some(&self.targets)
    }

    /// Records a write at `version` made around this copy by `primary`:
    /// the targets now need that version, which the primary holds (the
    /// planned source may be an earlier member the write did not reach).
    pub fn written_around(&mut self, primary: OsdId, version: u64) {
        self.source = primary;
        self.version = self.version.max(version);
    }
}

/// The outcome of planning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryPlan {
    pub copies: Vec<Copy>,
    /// The highest version any member holds: the primary's next write must
    /// be above it.
    pub max_version: u64,
    /// Objects each acting member lacks or holds stale, for progress.
    pub missing_by_member: BTreeMap<OsdId, u64>,
    /// Some acting member holds nothing of a PG that has objects: a new
    /// member (a stand-in, or data moving) is backfilled; otherwise members
    /// that missed writes are recovered.
    pub backfill: bool,
}

impl RecoveryPlan {
    /// Plans recovery of a PG whose acting set is `acting` (primary first)
    /// from `inventories`: one per acting member, plus any other up OSD that
    /// held the PG in an earlier interval. Returns `None` if an acting
    /// member did not report (the plan would be incomplete).
    pub fn new(acting: &[OsdId], inventories: &[Inventory]) -> Option<RecoveryPlan> {
        let find = |osd: OsdId| inventories.iter().find(|i| i.osd == osd);
        if acting.iter().any(|osd| find(*osd).is_none()) {
            return None;
        }
        let mut newest: BTreeMap<ObjectId, u64> = BTreeMap::new();
        for inventory in inventories {
            for (object, version) in &inventory.objects {
                let entry = newest.entry(*object).or_insert(*version);
                *entry = (*entry).max(*version);
            }
        }
        let mut plan = RecoveryPlan {
            max_version: newest.values().copied().max().unwrap_or(0),
            ..RecoveryPlan::default()
        };
        for osd in acting {
            plan.missing_by_member.insert(*osd, 0);
        }
        plan.backfill = !newest.is_empty()
            && acting
                .iter()
                .any(|osd| find(*osd).is_some_and(|i| i.objects.is_empty()));
        for (object, version) in newest {
            let holds = |osd: OsdId| {
                find(osd).and_then(|i| i.objects.get(&object)).copied() == Some(version)
            };
            let targets: Vec<OsdId> = acting.iter().copied().filter(|osd| !holds(*osd)).collect();
            if targets.is_empty() {
                continue;
            }
            // Prefer the primary, then acting members in order, then the
            // rest: the copy then mostly starts from local data.
            let source = acting
                .iter()
                .copied()
                .chain(inventories.iter().map(|i| i.osd))
                .find(|osd| holds(*osd))
                .expect("the newest version was reported by someone");
            for target in &targets {
                *plan.missing_by_member.entry(*target).or_default() += 1;
            }
            plan.copies.push(Copy {
                object,
                version,
                source,
                targets,
            });
        }
        Some(plan)
    }

    /// Returns whether nothing needs copying.
    pub fn is_clean(&self) -> bool {
        self.copies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use basalt_placement::VolumeId;

    fn object(index: u64) -> ObjectId {
        ObjectId {
            volume: VolumeId(1),
            index,
        }
    }

    fn inventory(osd: u32, objects: &[(u64, u64)]) -> Inventory {
        Inventory {
            osd: OsdId(osd),
            objects: objects.iter().map(|(i, v)| (object(*i), *v)).collect(),
        }
    }

    #[test]
    fn a_returning_primary_gets_what_it_missed() {
        // osd.0 was down while osd.1 and osd.2 took writes.
        let acting = [OsdId(0), OsdId(1), OsdId(2)];
        let plan = RecoveryPlan::new(
            &acting,
            &[
                inventory(0, &[(1, 10), (2, 11)]),
                inventory(1, &[(1, 10), (2, 20), (3, 21)]),
                inventory(2, &[(1, 10), (2, 20), (3, 21)]),
            ],
        )
        .unwrap();
        assert_eq!(plan.max_version, 21);
        assert_eq!(
            plan.copies,
            vec![
                Copy {
                    object: object(2),
                    version: 20,
                    source: OsdId(1),
                    targets: vec![OsdId(0)]
                },
                Copy {
                    object: object(3),
                    version: 21,
                    source: OsdId(1),
                    targets: vec![OsdId(0)]
                },
            ]
        );
        assert_eq!(plan.missing_by_member[&OsdId(0)], 2);
        assert_eq!(plan.missing_by_member[&OsdId(1)], 0);
        assert!(!plan.backfill, "osd.0 missed writes: recovery");
    }

    #[test]
    fn a_stand_in_is_backfilled_from_the_primary() {
        let acting = [OsdId(1), OsdId(2), OsdId(7)];
        let plan = RecoveryPlan::new(
            &acting,
            &[
                inventory(1, &[(1, 5), (2, 6)]),
                inventory(2, &[(1, 5), (2, 6)]),
                inventory(7, &[]),
            ],
        )
        .unwrap();
        assert!(
            plan.copies
                .iter()
                .all(|c| c.source == OsdId(1) && c.targets == vec![OsdId(7)])
        );
        assert_eq!(plan.copies.len(), 2);
        assert!(plan.backfill, "osd.7 holds nothing: backfill");
    }

    #[test]
    fn a_write_goes_around_a_pending_copy_only_with_enough_holders() {
        let acting = [OsdId(1), OsdId(2), OsdId(7)];
        let mut copy = Copy {
            object: object(1),
            version: 5,
            source: OsdId(2),
            targets: vec![OsdId(7)],
        };
        assert_eq!(
            copy.write_around(OsdId(1), &acting, 2),
            Some(&[OsdId(7)][..])
        );
        // Two holders are not three.
        assert_eq!(copy.write_around(OsdId(1), &acting, 3), None);
        // A primary without the object copies it first.
        let behind = Copy {
            targets: vec![OsdId(1), OsdId(7)],
            ..copy.clone()
        };
        assert_eq!(behind.write_around(OsdId(1), &acting, 1), None);
        copy.written_around(OsdId(1), 9);
        assert_eq!((copy.source, copy.version), (OsdId(1), 9));
    }

    #[test]
    fn a_member_that_did_not_report_blocks_the_plan() {
        let acting = [OsdId(1), OsdId(2)];
        assert!(RecoveryPlan::new(&acting, &[inventory(1, &[])]).is_none());
    }

    #[test]
    fn an_earlier_member_outside_the_acting_set_can_be_the_source() {
        let acting = [OsdId(4), OsdId(5)];
        let plan = RecoveryPlan::new(
            &acting,
            &[
                inventory(4, &[]),
                inventory(5, &[]),
                inventory(9, &[(3, 40)]),
            ],
        )
        .unwrap();
        assert_eq!(plan.copies[0].source, OsdId(9));
        assert_eq!(plan.copies[0].targets, vec![OsdId(4), OsdId(5)]);
    }
}
