//! Hostile and malformed requests straight to a live OSD over TCP, kind by
//! kind: each gets a clear error status with a message, nothing is lost,
//! and the OSD keeps serving.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::net::SocketAddr;
use std::time::Duration;

use basalt_client::{Connection, Durability};
use basalt_placement::{ObjectId, OsdId, Placer, PoolId, VolumeId};
use basalt_tests::{DevCluster, env_or, open_new_volume};
use basalt_wire::op::OpHeader;
use basalt_wire::{Frame, Kind, Status};
use bytes::Bytes;
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;

fn frame(kind: Kind, epoch: u64, payload: Bytes) -> Frame {
    Frame {
        kind,
        flags: 0,
        request_id: 0,
        epoch,
        status: 0,
        payload,
        tail: Bytes::new(),
        data_crcs: None,
    }
}

/// Asserts that the OSD behind `connection` answers a ping.
async fn assert_pings(connection: &Connection, epoch: u64) {
    let ping = connection
        .call(
            frame(Kind::Ping, epoch, Bytes::new()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(Status::from_u32(ping.status), Status::Ok);
}

/// A dev cluster with a volume of `size` whose first `written` bytes hold
/// seeded data (durable), and that data.
async fn cluster_with_volume(
    name: &str,
    size: u64,
    written: u64,
    seed: u64,
) -> (
    DevCluster,
    std::sync::Arc<basalt_client::BlockClient>,
    basalt_client::Volume,
    Vec<u8>,
) {
    let cluster = DevCluster::up("1G").unwrap();
    let (client, volume) = open_new_volume(&cluster.mons(), name, size).await.unwrap();
    let mut data = vec![0u8; written as usize];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut data);
    volume.write(0, &data, Durability::Durable).await.unwrap();
    (cluster, client, volume, data)
}

/// Sends `request` and asserts the reply carries `want` and a message.
async fn expect(connection: &Connection, what: &str, request: Frame, want: Status) {
    let reply = connection
        .call(request, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
    assert_eq!(
        Status::from_u32(reply.status),
        want,
        "{what}: {}",
        String::from_utf8_lossy(&reply.payload)
    );
    assert!(!reply.payload.is_empty(), "{what}: an error reply says why");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors_and_the_osd_keeps_serving() {
    let (cluster, client, volume, data) = cluster_with_volume("v", 16 * MIB, 4 * MIB, 5).await;

    let map = client.refresh_map().await.unwrap();
    let epoch = map.epoch.0;
    let pg = map.pg_of_object(volume.id, 0).unwrap();
    let object = ObjectId {
        volume: volume.id,
        index: 0,
    };
    let acting = Placer::new(&map).acting_set(pg).unwrap().members;
    let addr =
        |osd: OsdId| -> SocketAddr { map.osds[&osd].addr.as_deref().unwrap().parse().unwrap() };
    let primary = Connection::connect(addr(acting[0]), Duration::from_secs(2))
        .await
        .unwrap();
    let replica = Connection::connect(addr(acting[1]), Duration::from_secs(2))
        .await
        .unwrap();
    let header = |offset: u64, length: u32| OpHeader {
        offset,
        length,
        ..OpHeader::for_object(pg, object, 0)
    };

    let cases: Vec<(&str, &Connection, Frame, Status)> = vec![
        (
            "a read whose payload is shorter than an op header",
            &primary,
            frame(Kind::Read, epoch, Bytes::from_static(&[1, 2, 3])),
            Status::Invalid,
        ),
        (
            "a read at an unaligned offset",
            &primary,
            frame(Kind::Read, epoch, header(1, 4096).encode_with(&[])),
            Status::Invalid,
        ),
        (
            "a read past the end of the object",
            &primary,
            frame(Kind::Read, epoch, header(4 * MIB, 4096).encode_with(&[])),
            Status::Invalid,
        ),
        (
            "a read of 4 GiB",
            &primary,
            frame(Kind::Read, epoch, header(0, u32::MAX).encode_with(&[])),
            Status::Invalid,
        ),
        (
            "a write whose data is shorter than its length",
            &primary,
            frame(
                Kind::Write,
                epoch,
                header(0, 8192).encode_with(&[0u8; 4096]),
            ),
            Status::Invalid,
        ),
        (
            "a client write sent to a replica",
            &replica,
            frame(
                Kind::Write,
                epoch,
                header(0, 4096).encode_with(&[0u8; 4096]),
            ),
            Status::StaleEpoch,
        ),
        (
            "replication from an older epoch",
            &replica,
            frame(
                Kind::RepWrite,
                epoch - 1,
                header(0, 4096).encode_with(&[0u8; 4096]),
            ),
            Status::StaleEpoch,
        ),
        (
            "a recovery push of garbage",
            &replica,
            frame(
                Kind::ObjPush,
                epoch,
                OpHeader::for_object(pg, object, 0).encode_with(&[7u8; 100]),
            ),
            Status::Invalid,
        ),
        (
            "a pull of an object nobody has",
            &replica,
            frame(
                Kind::ObjPull,
                epoch,
                OpHeader::for_object(
                    pg,
                    ObjectId {
                        volume: VolumeId(999),
                        index: 1,
                    },
                    0,
                )
                .encode_with(&[]),
            ),
            Status::Invalid,
        ),
        (
            "removal of a PG the OSD is a member of",
            &replica,
            frame(
                Kind::PgRemove,
                epoch,
                OpHeader::for_pg(pg, 0).encode_with(&[]),
            ),
            Status::Invalid,
        ),
        (
            "removal decided at an older epoch",
            &replica,
            frame(
                Kind::PgRemove,
                epoch - 1,
                OpHeader::for_pg(pg, 0).encode_with(&[]),
            ),
            Status::StaleEpoch,
        ),
        (
            "a stray notice without the sender's id",
            &primary,
            frame(
                Kind::PgNotify,
                epoch,
                OpHeader::for_pg(pg, 0).encode_with(&[1, 2, 3]),
            ),
            Status::Invalid,
        ),
        (
            "an op on a PG of a pool that does not exist",
            &primary,
            frame(
                Kind::Read,
                epoch,
                OpHeader {
                    length: 4096,
                    ..OpHeader::for_object(basalt_placement::PgId::new(PoolId(77), 0), object, 0)
                }
                .encode_with(&[]),
            ),
            Status::StaleEpoch,
        ),
    ];
    for (what, connection, request, want) in cases {
        expect(connection, what, request, want).await;
    }

    // Nothing was lost and both OSDs still serve, on the same connections.
    assert!(primary.is_alive() && replica.is_alive());
    let back = volume.read(0, 4 * MIB).await.unwrap();
    assert!(back[..] == data[..], "data changed");
    assert_pings(&primary, epoch).await;
    cluster.assert_alive_without_panics();
}

/// Every request kind, with random header fields, flags, epochs and data
/// lengths, sent to every OSD of the cluster: each gets a reply (an error
/// says why), the connections stay up, the OSDs keep serving and a volume
/// nothing was aimed at reads back unchanged. `BASALT_FUZZ_FRAMES=N` and
/// `BASALT_FUZZ_SEED=S` send more, or others, by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_get_replies_and_touch_nothing_else() {
    use rand::Rng;
    const KINDS: [Kind; 18] = [
        Kind::Ping,
        Kind::Read,
        Kind::Write,
        Kind::WriteZeroes,
        Kind::Discard,
        Kind::RepWrite,
        Kind::RepWriteZeroes,
        Kind::RepDiscard,
        Kind::BlockStatus,
        Kind::PgStat,
        Kind::PgList,
        Kind::ObjPull,
        Kind::ObjPush,
        Kind::PgScrub,
        Kind::PgDigest,
        Kind::Flush,
        Kind::PgRemove,
        Kind::PgNotify,
    ];
    let (cluster, client, volume, data) = cluster_with_volume("kept", 8 * MIB, 8 * MIB, 6).await;
    let map = client.refresh_map().await.unwrap();
    let epoch = map.epoch.0;
    let kept_pgs: Vec<_> = (0..2)
        .map(|index| map.pg_of_object(volume.id, index).unwrap())
        .collect();
    let mut osds = Vec::new();
    for osd in map.osds.values() {
        let addr: SocketAddr = osd.addr.as_deref().unwrap().parse().unwrap();
        osds.push(
            Connection::connect(addr, Duration::from_secs(2))
                .await
                .unwrap(),
        );
    }

    let frames: u64 = env_or("BASALT_FUZZ_FRAMES", 1000);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(env_or("BASALT_FUZZ_SEED", 0xf022));
    let mut statuses = std::collections::BTreeMap::new();
    for n in 0..frames {
        let kind = KINDS[rng.random_range(0..KINDS.len())];
        let pg = match rng.random_range(0..4) {
            0 => kept_pgs[rng.random_range(0..kept_pgs.len())],
            1 => basalt_placement::PgId::new(PoolId(0), rng.random_range(0..64)),
            2 => basalt_placement::PgId {
                pool: PoolId(0),
                seed: rng.random_range(0..64),
                home: Some(basalt_placement::HostId(rng.random_range(0..5))),
            },
            _ => basalt_placement::PgId::new(PoolId(rng.random()), rng.random()),
        };
        // Never the kept volume's objects (its id is not drawn).
        let object = ObjectId {
            volume: VolumeId(volume.id.0 + 1 + rng.random_range(0..1u64 << 40)),
            index: rng.random_range(0..4),
        };
        let offset = match rng.random_range(0..5) {
            0 => 0,
            1 => 4096 * rng.random_range(0..1024u64),
            2 => rng.random_range(0..4 * MIB),
            3 => 4 * MIB - 4096,
            _ => rng.random(),
        };
        let length: u32 = match rng.random_range(0..5) {
            0 => 0,
            1 => 4096 * rng.random_range(1..=16u32),
            2 => rng.random_range(0..65536),
            3 => 4 * MIB as u32,
            _ => rng.random(),
        };
        let data_len = match rng.random_range(0..3) {
            0 => 0,
            1 => (length as usize).min(64 << 10),
            _ => rng.random_range(0..20_000),
        };
        let mut body = vec![0u8; data_len];
        rng.fill_bytes(&mut body);
        let payload = if rng.random_range(0..8) == 0 {
            // Not even an op header.
            let mut junk = vec![0u8; rng.random_range(0..80)];
            rng.fill_bytes(&mut junk);
            Bytes::from(junk)
        } else {
            OpHeader {
                offset,
                length,
                version: rng.random_range(0..1u64 << 20),
                flags: rng.random::<u32>() & 0xf,
                ..OpHeader::for_object(pg, object, 0)
            }
            .encode_with(&body)
        };
        // A newer epoch than the OSD's makes it wait (2 s) for that map:
        // rare, to keep the test short.
        let frame_epoch = match rng.random_range(0..200) {
            0..=29 => epoch.saturating_sub(1),
            30 => epoch + 3,
            _ => epoch,
        };
        let mut request = frame(kind, frame_epoch, payload);
        // Any flag but the reply bit (a reply sent as a request is a
        // protocol violation: the OSD hangs up, as the wire tests check).
        request.flags = rng.random::<u32>() & !basalt_wire::FLAG_REPLY;
        let to = rng.random_range(0..osds.len());
        let what = format!(
            "frame {n}: {kind:?} to OSD #{to}, {pg}, offset {offset}, length {length}, {data_len} bytes of data, epoch {frame_epoch}"
        );
        let started = std::time::Instant::now();
        let reply = osds[to]
            .call(request, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
        // Nothing at the OSD's epoch waits for peering that never comes
        // (a PG no volume is homed in used to answer Busy after 3 s).
        assert!(
            frame_epoch > epoch || started.elapsed() < Duration::from_secs(3),
            "{what}: {:?} after {:?}",
            Status::from_u32(reply.status),
            started.elapsed()
        );
        let status = Status::from_u32(reply.status);
        if status != Status::Ok {
            assert!(
                !reply.payload.is_empty(),
                "{what}: {status:?} without a reason"
            );
        }
        *statuses
            .entry(format!("{kind:?} {status:?}"))
            .or_insert(0u64) += 1;
    }
    eprintln!("replies by kind and status: {statuses:#?}");

    for (i, osd) in osds.iter().enumerate() {
        assert!(osd.is_alive(), "OSD #{i} dropped its connection");
        assert_pings(osd, epoch).await;
    }
    let back = volume.read(0, 8 * MIB).await.unwrap();
    assert!(back[..] == data[..], "the kept volume changed");
    cluster.assert_alive_without_panics();
}
