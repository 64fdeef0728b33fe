//! Hostile and malformed requests straight to a live OSD over TCP, kind by
//! kind: each gets a clear error status with a message, nothing is lost,
//! and the OSD keeps serving.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::net::SocketAddr;
use std::time::Duration;

use basalt_client::{Connection, Durability};
use basalt_placement::{ObjectId, OsdId, Placer, PoolId, VolumeId};
use basalt_tests::{DevCluster, open_new_volume};
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
    let cluster = DevCluster::up("1G").unwrap();
    let (client, volume) = open_new_volume(&cluster.mons(), "v", 16 * MIB)
        .await
        .unwrap();
    let mut data = vec![0u8; 4 * MIB as usize];
    rand_chacha::ChaCha8Rng::seed_from_u64(5).fill_bytes(&mut data);
    volume.write(0, &data, Durability::Durable).await.unwrap();

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
    let ping = primary
        .call(
            frame(Kind::Ping, epoch, Bytes::new()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(Status::from_u32(ping.status), Status::Ok);
    for (name, _, pid) in cluster.processes() {
        // SAFETY: signal 0 only checks that the process exists.
        assert_eq!(unsafe { libc::kill(pid as i32, 0) }, 0, "{name} died");
    }
}
