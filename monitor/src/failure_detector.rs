//! `FailureDetector`: turns OSD heartbeats into down, up and out verdicts.
//!
//! Heartbeats do not go through raft (ten thousand OSDs beating every few
//! seconds would flood the log); the leader keeps the last time it heard
//! each OSD in memory and proposes a map change only when a verdict changes.
//! A new leader starts every clock at its own start, so a failover gives every
//! OSD a full grace period rather than marking the cluster down. Pure: time
//! is passed in as milliseconds.

use std::collections::HashMap;

use basalt_placement::{ClusterMap, OsdId};

use crate::command::Command;

/// Grace periods of the detector.
#[derive(Clone, Copy, Debug)]
pub struct FailureConfig {
    /// Silence after which an up OSD is marked down.
    pub down_after_ms: u64,
    /// Silence after which a down OSD is marked out (its data re-placed).
    pub out_after_ms: u64,
}

/// Last-heard times of OSDs, kept by the leader.
#[derive(Debug)]
pub struct FailureDetector {
    config: FailureConfig,
    started_ms: u64,
    last_heard_ms: HashMap<OsdId, u64>,
}

impl FailureDetector {
    /// A detector whose clocks start at `now_ms` (the leader's start).
    pub fn new(config: FailureConfig, now_ms: u64) -> Self {
        Self {
            config,
            started_ms: now_ms,
            last_heard_ms: HashMap::new(),
        }
    }

    /// Records a heartbeat of `osd`.
    pub fn heartbeat(&mut self, osd: OsdId, now_ms: u64) {
        self.last_heard_ms.insert(osd, now_ms);
    }

    fn silence_ms(&self, osd: OsdId, now_ms: u64) -> u64 {
        let last = self
            .last_heard_ms
            .get(&osd)
            .copied()
            .unwrap_or(self.started_ms);
        now_ms.saturating_sub(last)
    }

    /// Returns the map changes the silences call for (at most one command
    /// per kind, each covering every OSD concerned).
    pub fn verdicts(&self, map: &ClusterMap, now_ms: u64) -> Vec<Command> {
        let mut down = Vec::new();
        let mut up = Vec::new();
        let mut out = Vec::new();
        for (id, osd) in &map.osds {
            let silence = self.silence_ms(*id, now_ms);
            if osd.up && silence > self.config.down_after_ms {
                down.push(*id);
            } else if !osd.up
                && self
                    .last_heard_ms
                    .get(id)
                    .is_some_and(|_| silence <= self.config.down_after_ms)
            {
                up.push(*id);
            }
            if osd.in_ && !osd.up && silence > self.config.out_after_ms {
                out.push(*id);
            }
        }
        let mut commands = Vec::new();
        if !down.is_empty() {
            commands.push(Command::MarkDown { osds: down });
        }
        if !up.is_empty() {
            commands.push(Command::MarkUp { osds: up });
        }
        if !out.is_empty() {
            commands.push(Command::MarkOut { osds: out });
        }
        commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_placement::Weight;

    fn map_with(osds: u32) -> ClusterMap {
        let mut map = ClusterMap::new();
        let zone = map.ensure_zone("default");
        let host = map.ensure_host("h", zone).unwrap();
        for _ in 0..osds {
            map.add_osd(host, Weight::ONE).unwrap();
        }
        map
    }

    const CONFIG: FailureConfig = FailureConfig {
        down_after_ms: 2_000,
        out_after_ms: 10_000,
    };

    #[test]
    fn silent_osds_go_down_then_out_and_return_up() {
        let mut map = map_with(2);
        let mut detector = FailureDetector::new(CONFIG, 0);
        detector.heartbeat(OsdId(0), 1_500);
        detector.heartbeat(OsdId(1), 1_500);
        assert!(detector.verdicts(&map, 3_000).is_empty());
        detector.heartbeat(OsdId(0), 3_000);
        let verdicts = detector.verdicts(&map, 3_600);
        assert_eq!(
            verdicts,
            vec![Command::MarkDown {
                osds: vec![OsdId(1)]
            }]
        );
        map.osds.get_mut(&OsdId(1)).unwrap().up = false;
        detector.heartbeat(OsdId(0), 11_000);
        assert_eq!(
            detector.verdicts(&map, 11_600),
            vec![Command::MarkOut {
                osds: vec![OsdId(1)]
            }]
        );
        map.osds.get_mut(&OsdId(1)).unwrap().in_ = false;
        detector.heartbeat(OsdId(1), 12_000);
        assert_eq!(
            detector.verdicts(&map, 12_100),
            vec![Command::MarkUp {
                osds: vec![OsdId(1)]
            }]
        );
    }

    #[test]
    fn a_new_leader_gives_everyone_a_full_grace() {
        let map = map_with(3);
        let detector = FailureDetector::new(CONFIG, 50_000);
        assert!(detector.verdicts(&map, 51_000).is_empty());
        assert_eq!(
            detector.verdicts(&map, 52_500),
            vec![Command::MarkDown {
                osds: vec![OsdId(0), OsdId(1), OsdId(2)]
            }]
        );
    }
}
