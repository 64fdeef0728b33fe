//! Seeded simulation of one replicated placement group through crashes,
//! restarts, lost and late (reordered) replication messages and lost
//! recovery copies, driving the real recovery planner (`RecoveryPlan`), the
//! real version rule (`next_version_after`), the replicas' rule for late
//! deliveries (`replica_should_apply`) and the rule for writes to objects
//! recovery has not copied yet (`Copy::write_around`): as the daemon, the PG
//! serves once planned and copies in the background. Checks after every
//! step:
//! - no acknowledged write is lost: the primary's copy of every object is the
//!   last acknowledged write to it, or a write issued after it;
//! - no member holds a newer version than the primary;
//! - once recovery finished, every member of the acting set holds every
//!   acknowledged write (or a later one).
//!
//! 300 seeds run in CI; `BASALT_SIM_SEEDS=20000 cargo test -p basalt-osd
//! --test recovery_simulation` runs more (scripts/nightly.sh). A failure
//! prints its seed; `BASALT_SIM_SEED=N` replays one.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::collections::BTreeMap;

use basalt_osd::recovery::{
    Copy as Pending, Inventory, RecoveryPlan, next_version_after, replica_should_apply,
};
use basalt_placement::{ObjectId, OsdId, VolumeId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const OSDS: u32 = 5;
const SIZE: usize = 3;
const OBJECTS: u64 = 6;
const STEPS: usize = 250;

/// One stored copy: the version and which write produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Copy {
    version: u64,
    write: u64,
}

#[derive(Default)]
struct Osd {
    up: bool,
    objects: BTreeMap<u64, Copy>,
    /// The primary's version counter: memory only, lost in a crash.
    counter: Option<u64>,
}

/// What a run may do: the pool's `min_size` and how many OSDs may be down
/// at once.
#[derive(Clone, Copy, Debug)]
struct Rules {
    min_size: usize,
    max_down: usize,
}

/// `min_size == size`: writes never go around a pending copy, every
/// acknowledged write is on all three members, and two OSDs may be down.
const STRICT: Rules = Rules {
    min_size: 3,
    max_down: 2,
};
/// `min_size` 2: writes go around pending copies (two copies during
/// recovery), so one failure at a time is what the pool promises to survive.
const ASYNC_RECOVERY: Rules = Rules {
    min_size: 2,
    max_down: 1,
};

struct Sim {
    rules: Rules,
    rng: ChaCha8Rng,
    osds: Vec<Osd>,
    /// The PG's OSD preference order (what placement would compute).
    order: Vec<u32>,
    epoch: u64,
    /// Whether the current interval has peered (planned; it serves from
    /// then).
    peered: bool,
    /// Copies the current interval still has to make, by object.
    pending: BTreeMap<u64, Pending>,
    next_write: u64,
    /// object -> write id of the last acknowledged write.
    acked: BTreeMap<u64, u64>,
    /// Replication messages still on the wire: (osd, object, copy, epoch
    /// they were sent at).
    late: Vec<(u32, u64, Copy, u64)>,
    trace: Vec<String>,
}

fn id(object: u64) -> ObjectId {
    ObjectId {
        volume: VolumeId(1),
        index: object,
    }
}

impl Sim {
    fn new(seed: u64, rules: Rules) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<u32> = (0..OSDS).collect();
        for i in (1..order.len()).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        Sim {
            rules,
            rng,
            osds: (0..OSDS)
                .map(|_| Osd {
                    up: true,
                    ..Osd::default()
                })
                .collect(),
            order,
            epoch: 1,
            peered: false,
            pending: BTreeMap::new(),
            next_write: 1,
            acked: BTreeMap::new(),
            late: Vec::new(),
            trace: Vec::new(),
        }
    }

    fn acting(&self) -> Vec<u32> {
        self.order
            .iter()
            .copied()
            .filter(|o| self.osds[*o as usize].up)
            .take(SIZE)
            .collect()
    }

    fn lost(&mut self) -> bool {
        self.rng.random_bool(0.1)
    }

    /// The new primary peers: inventories from every up OSD (as the
    /// daemon), then a plan; the PG serves from here while the planned
    /// copies run (`recover_one`).
    fn peer(&mut self) {
        let acting = self.acting();
        if acting.len() < self.rules.min_size {
            return;
        }
        let mut sources = acting.clone();
        for osd in 0..OSDS {
            if self.osds[osd as usize].up && !sources.contains(&osd) {
                sources.push(osd);
            }
        }
        let inventories: Vec<Inventory> = sources
            .iter()
            .map(|osd| Inventory {
                osd: OsdId(*osd),
                objects: self.osds[*osd as usize]
                    .objects
                    .iter()
                    .map(|(o, c)| (id(*o), c.version))
                    .collect(),
            })
            .collect();
        let acting_ids: Vec<OsdId> = acting.iter().map(|o| OsdId(*o)).collect();
        let plan = RecoveryPlan::new(&acting_ids, &inventories).unwrap();
        let primary = &mut self.osds[acting[0] as usize];
        primary.counter = Some(next_version_after(
            primary.counter.unwrap_or(0),
            plan.max_version,
            self.epoch,
        ));
        self.trace.push(format!(
            "peer acting={acting:?} copies={}",
            plan.copies.len()
        ));
        self.pending = plan
            .copies
            .into_iter()
            .map(|copy| (copy.object.index, copy))
            .collect();
        self.peered = true;
    }

    /// Makes `object`'s pending copy (each push may be lost: the copy then
    /// stays pending). Returns whether it is done.
    fn copy(&mut self, object: u64) -> bool {
        let Some(copy) = self.pending.get(&object).cloned() else {
            return true;
        };
        let data = self.osds[copy.source.0 as usize].objects[&object];
        assert!(
            data.version >= copy.version,
            "source osd.{} holds v{} of obj{object}, below the planned v{}",
            copy.source.0,
            data.version,
            copy.version
        );
        let mut complete = true;
        for target in &copy.targets {
            if self.lost() {
                complete = false;
                continue;
            }
            // ObjPush never replaces a newer version.
            let member = &mut self.osds[target.0 as usize];
            let held = member.objects.get(&object).map(|c| c.version);
            if held.is_none_or(|held| held < data.version) {
                member.objects.insert(object, data);
            }
        }
        self.trace.push(format!(
            "copy obj{object} v{} from osd.{} complete={complete}",
            data.version, copy.source.0
        ));
        if complete {
            self.pending.remove(&object);
        }
        complete
    }

    /// Background recovery makes one pending copy.
    fn recover_one(&mut self) {
        if !self.peered || self.pending.is_empty() {
            return;
        }
        let objects: Vec<u64> = self.pending.keys().copied().collect();
        let object = objects[self.rng.random_range(0..objects.len())];
        self.copy(object);
    }

    fn write(&mut self, object: u64) {
        if !self.peered {
            self.peer();
        }
        let acting = self.acting();
        if !self.peered || acting.len() < self.rules.min_size {
            self.trace.push(format!("write obj{object}: refused"));
            return;
        }
        let acting_ids: Vec<OsdId> = acting.iter().map(|o| OsdId(*o)).collect();
        let around = self
            .pending
            .get(&object)
            .map(|copy| copy.write_around(acting_ids[0], &acting_ids, self.rules.min_size));
        if around == Some(None) && !self.copy(object) {
            self.trace
                .push(format!("write obj{object}: refused, its copy failed"));
            return;
        }
        let write = self.next_write;
        self.next_write += 1;
        let primary = &mut self.osds[acting[0] as usize];
        let version = primary.counter.unwrap_or(0) + 1;
        primary.counter = Some(version);
        let skipped: Vec<u32> = match self.pending.get_mut(&object) {
            Some(pending) => {
                let skipped = pending
                    .write_around(acting_ids[0], &acting_ids, self.rules.min_size)
                    .expect("copied above when the write could not go around")
                    .iter()
                    .map(|osd| osd.0)
                    .collect();
                pending.written_around(acting_ids[0], version);
                skipped
            }
            None => Vec::new(),
        };
        let copy = Copy { version, write };
        let mut everyone = true;
        for (position, osd) in acting.iter().enumerate() {
            if skipped.contains(osd) {
                continue;
            }
            if position > 0 && self.lost() {
                // Lost, or only late: it may still arrive after later writes.
                everyone = false;
                if self.rng.random_bool(0.5) {
                    self.late.push((*osd, object, copy, self.epoch));
                }
                continue;
            }
            self.osds[*osd as usize].objects.insert(object, copy);
        }
        if everyone {
            self.acked.insert(object, write);
        }
        self.trace.push(format!(
            "write obj{object} w{write} v{version} skipped={skipped:?} acked={everyone}"
        ));
    }

    fn map_change(&mut self) {
        self.epoch += 1;
        self.peered = false;
    }

    /// Delivers one late replication message, if any, under the replicas'
    /// rule.
    fn deliver_late(&mut self) {
        if self.late.is_empty() {
            return;
        }
        let index = self.rng.random_range(0..self.late.len());
        let (osd, object, copy, sent_at) = self.late.swap_remove(index);
        let member = &mut self.osds[osd as usize];
        if !member.up {
            return;
        }
        let held = member.objects.get(&object).map(|c| c.version);
        // Replication from an older interval is refused (the daemon checks
        // the frame's epoch); within the interval, only newer versions apply.
        let applied = sent_at >= self.epoch && replica_should_apply(held, copy.version);
        if applied {
            member.objects.insert(object, copy);
        }
        self.trace.push(format!(
            "late delivery to osd.{osd} obj{object} w{} v{} applied={applied}",
            copy.write, copy.version
        ));
    }

    fn step(&mut self) {
        let down = self.osds.iter().filter(|o| !o.up).count();
        match self.rng.random_range(0..12) {
            10 | 11 => self.deliver_late(),
            4 | 5 => self.recover_one(),
            0 | 1 if down < self.rules.max_down => {
                let osd = self.rng.random_range(0..OSDS);
                if self.osds[osd as usize].up {
                    self.osds[osd as usize].up = false;
                    self.osds[osd as usize].counter = None;
                    // Messages to a crashed OSD are gone with its sockets.
                    self.late.retain(|(to, _, _, _)| *to != osd);
                    self.trace.push(format!("crash osd.{osd}"));
                    self.map_change();
                }
            }
            2 | 3 => {
                let osd = self.rng.random_range(0..OSDS);
                if !self.osds[osd as usize].up {
                    self.osds[osd as usize].up = true;
                    self.trace.push(format!("restart osd.{osd}"));
                    self.map_change();
                }
            }
            _ => {
                let object = self.rng.random_range(0..OBJECTS);
                self.write(object);
            }
        }
        self.check();
    }

    fn check(&self) {
        if !self.peered {
            return;
        }
        let acting = self.acting();
        let primary = &self.osds[acting[0] as usize];
        // What a read would return: an object the primary still lacks is
        // copied first, from the pending copy's source.
        let served = |object: &u64| match self.pending.get(object) {
            Some(copy) if copy.targets.contains(&OsdId(acting[0])) => {
                self.osds[copy.source.0 as usize].objects.get(object)
            }
            _ => primary.objects.get(object),
        };
        for (object, write) in &self.acked {
            let held = served(object).map_or(0, |c| c.write);
            assert!(
                held >= *write,
                "acknowledged write w{write} to obj{object} lost: primary osd.{} holds w{held}",
                acting[0]
            );
        }
        if self.pending.is_empty() {
            for osd in &acting[1..] {
                for (object, write) in &self.acked {
                    let held = self.osds[*osd as usize]
                        .objects
                        .get(object)
                        .map_or(0, |c| c.write);
                    assert!(
                        held >= *write,
                        "recovered, but osd.{osd} misses acknowledged w{write} to obj{object}: holds w{held}"
                    );
                }
            }
        }
        for osd in &acting[1..] {
            for object in 0..OBJECTS {
                let theirs = self.osds[*osd as usize].objects.get(&object);
                let ours = served(&object);
                // Only writes after peering may still be in flight to a
                // member, and those are unacknowledged retries: a member may
                // lag the primary but never hold something the primary
                // does not know.
                if let (Some(theirs), Some(ours)) = (theirs, ours) {
                    assert!(
                        theirs.version <= ours.version,
                        "osd.{osd} holds v{} of obj{object}, newer than the primary's v{}",
                        theirs.version,
                        ours.version
                    );
                }
            }
        }
    }
}

fn run(seed: u64, rules: Rules) {
    let mut sim = Sim::new(seed, rules);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..STEPS {
            sim.step();
        }
    }));
    if let Err(panic) = result {
        let tail: Vec<&String> = sim.trace.iter().rev().take(40).collect();
        eprintln!(
            "simulation ({rules:?}) failed with seed {seed}; replay: BASALT_SIM_SEED={seed} cargo test -p basalt-osd --test recovery_simulation\nlast steps (newest first): {tail:#?}"
        );
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn seeded_crashes_and_lost_messages_lose_no_acknowledged_write() {
    if let Some(seed) = std::env::var("BASALT_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run(seed, STRICT);
        run(seed, ASYNC_RECOVERY);
        return;
    }
    let seeds: u64 = std::env::var("BASALT_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    for seed in 0..seeds {
        run(seed, STRICT);
        run(seed, ASYNC_RECOVERY);
    }
}

/// The version rule matters: a primary that restarted (counter lost) or
/// took over must number its writes above everything any member holds.
/// With versions that restart from a fixed base the simulation above fails;
/// this pins the rule itself.
#[test]
fn next_version_is_above_everything_seen_and_the_epoch() {
    assert!(next_version_after(0, 500, 3) > 500);
    assert!(next_version_after(0, 0, 3) >= 3 << 32);
    assert_eq!(next_version_after(9 << 32, 5, 3), 9 << 32);
}
