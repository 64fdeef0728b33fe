//! The NBD gateway against the protocol: every option and command through
//! libnbd (errors included), extended headers (64-bit requests) through a
//! raw client of our own, since Debian 12's libnbd predates them, and
//! thousands of random requests through that client.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use basalt_client_nbd::protocol::*;
use basalt_tests::{
    DevCluster, basalt, env_or, must_reach_nbd, must_run, must_succeed, start_gateway,
};

/// libnbd drives every negotiation option and every command, with the
/// error replies the protocol asks for, and the connection keeps working
/// after each error (the script: `tests/nbd/libnbd_checks.py`).
#[test]
fn libnbd_exercises_every_option_and_command() {
    let cluster = DevCluster::up("1G").unwrap();
    let mons = cluster.mon_list();
    must_succeed(&basalt(&[
        "--mon", &mons, "volume", "create", "proto", "--size", "64M",
    ]));
    let (mut gateway, addr) =
        start_gateway(cluster.dir.path(), "nbd", &mons, "127.0.1.2", &[]).unwrap();
    must_reach_nbd(&format!("nbd://{addr}/proto"));
    let script = basalt_tests::workspace_dir()
        .join("tests/nbd/libnbd_checks.py")
        .to_string_lossy()
        .into_owned();
    // Debian's python3 has python3-libnbd; the python3 first on PATH may not.
    let out = must_run(
        "/usr/bin/python3",
        &[&script, &addr, "proto", &(64u64 << 20).to_string()],
    );
    let stdout = must_succeed(&out);
    assert!(stdout.contains("ALL OK"), "{stdout}");
    assert!(gateway.is_running());
    assert_eq!(gateway.unexpected_errors(&[]), Vec::<String>::new());
}

/// A raw NBD client speaking extended headers.
struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    fn connect(addr: &str) -> RawClient {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[0..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&hello[8..16], &IHAVEOPT.to_be_bytes());
        stream
            .write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
            .unwrap();
        RawClient { stream }
    }

    /// Sends an option; returns its replies up to the final one.
    fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.stream.write_all(&out).unwrap();
        let mut replies = Vec::new();
        loop {
            let mut head = [0u8; 20];
            self.stream.read_exact(&mut head).unwrap();
            assert_eq!(&head[0..8], &REPLY_MAGIC.to_be_bytes());
            assert_eq!(&head[8..12], &option.to_be_bytes());
            let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
            let mut body = vec![0u8; len as usize];
            self.stream.read_exact(&mut body).unwrap();
            let last = !matches!(kind, REP_INFO | REP_SERVER | REP_META_CONTEXT);
            replies.push((kind, body));
            if last {
                return replies;
            }
        }
    }

    fn final_reply(&mut self, option: u32, data: &[u8]) -> u32 {
        self.option(option, data).last().unwrap().0
    }

    fn send(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let request = Request {
            flags,
            command,
            cookie,
            offset,
            length,
            payload_len: payload.len() as u64,
        };
        let mut out = request.encode(HeaderStyle::Extended).to_vec();
        out.extend_from_slice(payload);
        self.stream.write_all(&out).unwrap();
    }

    /// Reads one extended reply chunk: (flags, type, cookie, offset, payload).
    fn reply(&mut self) -> (u16, u16, u64, u64, Vec<u8>) {
        let mut head = [0u8; 32];
        self.stream.read_exact(&mut head).unwrap();
        assert_eq!(
            &head[0..4],
            &EXTENDED_REPLY_MAGIC.to_be_bytes(),
            "only extended replies after NBD_OPT_EXTENDED_HEADERS"
        );
        let flags = u16::from_be_bytes([head[4], head[5]]);
        let kind = u16::from_be_bytes([head[6], head[7]]);
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(head[16..24].try_into().unwrap());
        let len = u64::from_be_bytes(head[24..32].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).unwrap();
        (flags, kind, cookie, offset, payload)
    }

    /// Sends a request and returns (type, payload) of its one reply chunk.
    fn call(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> (u16, Vec<u8>) {
        self.send(flags, command, 77, offset, length, payload);
        let (reply_flags, kind, cookie, reply_offset, body) = self.reply();
        assert_eq!(cookie, 77);
        assert_eq!(reply_offset, offset, "extended replies echo the offset");
        assert_eq!(reply_flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
        (kind, body)
    }
}

fn error_of(reply: &(u16, Vec<u8>)) -> u32 {
    assert_eq!(reply.0, REPLY_TYPE_ERROR, "expected an error chunk");
    u32::from_be_bytes(reply.1[0..4].try_into().unwrap())
}

fn name_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

/// Extended headers: negotiated (and the options that conflict with them
/// refused), 64-bit lengths honoured past 4 GiB, 64-bit block status,
/// errors as extended chunks, and a compact header afterwards treated as
/// the protocol violation it is.
#[test]
fn extended_headers_carry_64_bit_requests() {
    const GIB: u64 = 1 << 30;
    let cluster = DevCluster::up("1G").unwrap();
    let mons = cluster.mon_list();
    must_succeed(&basalt(&[
        "--mon", &mons, "volume", "create", "big", "--size", "6G",
    ]));
    let (mut gateway, addr) =
        start_gateway(cluster.dir.path(), "nbd", &mons, "127.0.1.1", &[]).unwrap();
    must_reach_nbd(&format!("nbd://{addr}/big"));

    let mut client = RawClient::connect(&addr);
    assert_eq!(client.final_reply(OPT_EXTENDED_HEADERS, &[]), REP_ACK);
    assert_eq!(
        client.final_reply(OPT_EXTENDED_HEADERS, &[]),
        REP_ERR_INVALID
    );
    assert_eq!(
        client.final_reply(OPT_STRUCTURED_REPLY, &[]),
        REP_ERR_EXT_HEADER_REQD
    );
    assert_eq!(client.final_reply(99, b"whatever"), REP_ERR_UNSUP);
    assert_eq!(client.final_reply(OPT_GO, b"\x00\x00"), REP_ERR_INVALID);
    assert_eq!(
        client.final_reply(OPT_INFO, &vec![0u8; 100 * 1024]),
        REP_ERR_TOO_BIG
    );
    assert_eq!(client.final_reply(OPT_STARTTLS, &[]), REP_ERR_POLICY);
    let mut meta = name_data("big", &[]);
    meta.truncate(4 + 3);
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&(ALLOCATION_CONTEXT_NAME.len() as u32).to_be_bytes());
    meta.extend_from_slice(ALLOCATION_CONTEXT_NAME.as_bytes());
    let replies = client.option(OPT_SET_META_CONTEXT, &meta);
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0].0, REP_META_CONTEXT);
    let go = client.option(OPT_GO, &name_data("big", &[INFO_BLOCK_SIZE]));
    assert_eq!(go.last().unwrap().0, REP_ACK);
    let export = go
        .iter()
        .find(|(kind, body)| *kind == REP_INFO && body[0..2] == [0, 0])
        .unwrap();
    assert_eq!(
        u64::from_be_bytes(export.1[2..10].try_into().unwrap()),
        6 * GIB
    );

    // A block past 4 GiB, then write-zeroes over [0, 5 GiB): a length that
    // only fits 64 bits. A 32-bit truncation would leave the block alone.
    let marked = 4 * GIB + 4096;
    let (kind, _) = client.call(0, CMD_WRITE, marked, 4096, &[0xee; 4096]);
    assert_eq!(kind, REPLY_TYPE_NONE);
    let (kind, body) = client.call(0, CMD_READ, marked, 4096, &[]);
    assert_eq!(kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&body[0..8], &marked.to_be_bytes());
    assert!(body[8..].iter().all(|b| *b == 0xee));
    let (kind, _) = client.call(0, CMD_WRITE_ZEROES, 0, 5 * GIB, &[]);
    assert_eq!(kind, REPLY_TYPE_NONE);
    let (_, body) = client.call(0, CMD_READ, marked, 4096, &[]);
    assert!(
        body[8..].iter().all(|b| *b == 0),
        "5 GiB write-zeroes stopped short"
    );

    // 8 KiB at 5 GiB with FUA; block status answers in 64-bit descriptors.
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let (kind, _) = client.call(CMD_FLAG_FUA, CMD_WRITE, 5 * GIB, 8192, &data);
    assert_eq!(kind, REPLY_TYPE_NONE);
    let (kind, body) = client.call(0, CMD_BLOCK_STATUS, 5 * GIB, GIB, &[]);
    assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS_EXT);
    assert_eq!(
        u32::from_be_bytes(body[0..4].try_into().unwrap()),
        ALLOCATION_CONTEXT
    );
    let count = u32::from_be_bytes(body[4..8].try_into().unwrap()) as usize;
    assert_eq!(body.len(), 8 + 16 * count);
    let extent = |i: usize| {
        let at = 8 + 16 * i;
        (
            u64::from_be_bytes(body[at..at + 8].try_into().unwrap()),
            u64::from_be_bytes(body[at + 8..at + 16].try_into().unwrap()),
        )
    };
    assert_eq!(extent(0), (8192, 0));
    assert_eq!(extent(1).1, u64::from(STATE_HOLE | STATE_ZERO));
    let (_, body) = client.call(0, CMD_READ, 5 * GIB, 8192, &[]);
    assert_eq!(&body[8..], &data[..]);

    // Errors come back as extended error chunks; the connection goes on.
    assert_eq!(error_of(&client.call(0, 42, 0, 4096, &[])), EINVAL);
    assert_eq!(
        error_of(&client.call(0, CMD_READ, 0, 64 << 20, &[])),
        EOVERFLOW
    );
    assert_eq!(
        error_of(&client.call(0, CMD_READ, 6 * GIB, 4096, &[])),
        EINVAL
    );
    assert_eq!(error_of(&client.call(0, CMD_TRIM, 1, 4096, &[])), EINVAL);
    assert_eq!(
        error_of(&client.call(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 0, 8, &[0; 8])),
        EINVAL
    );

    // Pipelined requests, answered by cookie.
    for cookie in 1..=8u64 {
        client.send(0, CMD_READ, cookie, 5 * GIB, 4096, &[]);
    }
    let mut cookies: Vec<u64> = (0..8).map(|_| client.reply().2).collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (1..=8).collect::<Vec<u64>>());

    // A compact request on an extended connection: the gateway hangs up.
    let compact = Request {
        flags: 0,
        command: CMD_READ,
        cookie: 1,
        offset: 0,
        length: 4096,
        payload_len: 0,
    };
    client
        .stream
        .write_all(&compact.encode(HeaderStyle::Structured))
        .unwrap();
    client.stream.write_all(&[0; 4]).unwrap();
    let mut rest = Vec::new();
    let _ = client.stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no reply to a malformed request");

    // The gateway still serves, and QEMU (10.x asks for extended headers)
    // negotiates them too.
    let io = must_succeed(&must_run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x33 {} 65536", 5 * GIB + GIB / 2),
            "-c",
            &format!("read -P 0x33 {} 65536", 5 * GIB + GIB / 2),
            &format!("nbd://{addr}/big"),
        ],
    ));
    assert!(!io.contains("Pattern verification failed"), "{io}");
    assert!(gateway.is_running());
    let log = std::fs::read_to_string(cluster.dir.path().join("nbd.log")).unwrap();
    assert!(
        log.lines()
            .filter(|l| l.contains("NBD client connected"))
            .any(|l| l.contains("headers=\"extended\"") || l.contains("headers=extended")),
        "QEMU did not negotiate extended headers:\n{log}"
    );
}

/// Random requests of every command (and an unknown one), with random
/// flags, offsets and lengths, over extended headers: each gets exactly one
/// complete reply with its cookie, the connection stays up, and an export
/// nothing was aimed at reads back unchanged. `BASALT_FUZZ_REQUESTS=N` and
/// `BASALT_FUZZ_SEED=S` send more, or others, by hand.
#[test]
fn random_requests_get_one_reply_each_and_touch_nothing_else() {
    use rand::{Rng, RngCore, SeedableRng};
    const MIB: u64 = 1 << 20;
    const SCRATCH: u64 = 64 * MIB;
    let cluster = DevCluster::up("1G").unwrap();
    let mons = cluster.mon_list();
    for (name, size) in [("kept", "8M"), ("scratch", "64M")] {
        must_succeed(&basalt(&[
            "--mon", &mons, "volume", "create", name, "--size", size,
        ]));
    }
    let addr = format!("127.0.1.1:{}", cluster.nbd_port);
    must_reach_nbd(&format!("nbd://{addr}/kept"));
    let open = |export: &str, allocation: bool| {
        let mut client = RawClient::connect(&addr);
        assert_eq!(client.final_reply(OPT_EXTENDED_HEADERS, &[]), REP_ACK);
        if allocation {
            let mut meta = name_data(export, &[]);
            meta.truncate(4 + export.len());
            meta.extend_from_slice(&1u32.to_be_bytes());
            meta.extend_from_slice(&(ALLOCATION_CONTEXT_NAME.len() as u32).to_be_bytes());
            meta.extend_from_slice(ALLOCATION_CONTEXT_NAME.as_bytes());
            let replies = client.option(OPT_SET_META_CONTEXT, &meta);
            assert_eq!(replies.last().unwrap().0, REP_ACK, "{replies:?}");
        }
        let go = client.option(OPT_GO, &name_data(export, &[]));
        assert_eq!(go.last().unwrap().0, REP_ACK, "{go:?}");
        client
    };
    let mut kept = open("kept", false);
    let mut pattern = vec![0u8; MIB as usize];
    rand_chacha::ChaCha8Rng::seed_from_u64(9).fill_bytes(&mut pattern);
    let (kind, _) = kept.call(CMD_FLAG_FUA, CMD_WRITE, MIB, MIB, &pattern);
    assert_eq!(kind, REPLY_TYPE_NONE);

    let requests: u64 = env_or("BASALT_FUZZ_REQUESTS", 3000);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(env_or("BASALT_FUZZ_SEED", 0x4e42));
    let commands = [
        CMD_READ,
        CMD_WRITE,
        CMD_FLUSH,
        CMD_TRIM,
        CMD_CACHE,
        CMD_WRITE_ZEROES,
        CMD_BLOCK_STATUS,
        42,
    ];
    let mut outcomes = std::collections::BTreeMap::new();
    let mut client = open("scratch", true);
    for n in 0..requests {
        if n % 300 == 299 {
            // A new connection now and then, half without the allocation
            // context (block status is then invalid).
            client = open("scratch", n % 600 == 299);
        }
        let command = commands[rng.random_range(0..commands.len())];
        let flags = match rng.random_range(0..4) {
            0 | 1 => 0,
            2 => {
                rng.random::<u16>()
                    & (CMD_FLAG_FUA
                        | CMD_FLAG_NO_HOLE
                        | CMD_FLAG_DF
                        | CMD_FLAG_REQ_ONE
                        | CMD_FLAG_FAST_ZERO)
            }
            _ => rng.random::<u16>() & !CMD_FLAG_PAYLOAD_LEN,
        };
        // Mostly well-formed (aligned, in range), so the commands run.
        let offset = match rng.random_range(0..9) {
            0 => 0,
            1..=4 => 4096 * rng.random_range(0..SCRATCH / 4096),
            5 => rng.random_range(0..SCRATCH),
            6 => SCRATCH - 4096,
            7 => SCRATCH,
            _ => rng.random(),
        };
        let length = match rng.random_range(0..9) {
            0 => 0,
            1..=4 => 4096 * rng.random_range(1..=16u64),
            5 => rng.random_range(0..65536),
            6 => SCRATCH,
            7 => 64 * MIB + 4096,
            _ => rng.random(),
        };
        let (offset, mut length) = if command == CMD_FLUSH && rng.random_bool(0.5) {
            (0, 0)
        } else {
            (offset, length)
        };
        let mut payload = Vec::new();
        if command == CMD_WRITE {
            // The data follows the header: at most 64 KiB of it here.
            length = length.min(64 << 10);
            payload = vec![0u8; length as usize];
            rng.fill_bytes(&mut payload);
        }
        let cookie = 1000 + n;
        client.send(flags, command, cookie, offset, length, &payload);
        let what = format!(
            "request {n}: command {command} flags {flags:#x} offset {offset} length {length}"
        );
        let mut error = None;
        loop {
            let (reply_flags, kind, reply_cookie, _, body) = client.reply();
            assert_eq!(reply_cookie, cookie, "{what}: a reply to another request");
            if kind == REPLY_TYPE_ERROR {
                assert!(body.len() >= 6, "{what}: a short error chunk");
                error = Some(u32::from_be_bytes(body[0..4].try_into().unwrap()));
            }
            if reply_flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        *outcomes
            .entry(format!("command {command}: {error:?}"))
            .or_insert(0u32) += 1;
    }
    eprintln!("outcomes: {outcomes:#?}");

    // Every connection is still usable; the kept export is unchanged.
    let (kind, _) = client.call(0, CMD_READ, 0, 4096, &[]);
    assert_ne!(kind, REPLY_TYPE_ERROR);
    let mut kept = open("kept", false);
    let (_, body) = kept.call(0, CMD_READ, MIB, MIB, &[]);
    assert!(body[8..] == pattern[..], "the kept export changed");
    let size = must_succeed(&must_run(
        "nbdinfo",
        &["--size", &format!("nbd://{addr}/kept")],
    ));
    assert_eq!(size.trim(), (8 * MIB).to_string());
    cluster.assert_alive_without_panics();
}
