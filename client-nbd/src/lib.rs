//! The NBD gateway: exports the cluster's volumes by name at
//! `nbd://<address>:10809/<volume>` (or `<pool>/<volume>`), for QEMU,
//! libnbd, fio and the kernel client.
//!
//! This version speaks fixed newstyle negotiation with NBD_OPT_EXPORT_NAME,
//! GO, INFO, LIST, ABORT, STRUCTURED_REPLY and LIST/SET_META_CONTEXT for
//! `base:allocation` (other options, extended headers among them, are refused
//! with NBD_REP_ERR_UNSUP and negotiation continues), simple or structured
//! replies, BLOCK_STATUS from the stores' block maps, and the
//! commands READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE), CACHE and
//! DISC; NBD_INFO_EXPORT, NAME, DESCRIPTION and BLOCK_SIZE.
//! Requests are handled concurrently and answered out of order. The block
//! size is advertised as 4 KiB minimum; unaligned or out-of-range requests get
//! EINVAL and the connection stays usable. Every write is durable on every
//! copy when it is acknowledged, so FLUSH has nothing left to do, FUA is
//! always honoured, and a flush on one connection covers writes completed on
//! any other (NBD_FLAG_CAN_MULTI_CONN is truthful).

use std::sync::Arc;

use basalt_client::{BlockClient, ClientError, Volume};
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const TX_HAS_FLAGS: u16 = 1;
const TX_READ_ONLY: u16 = 2;
const TX_SEND_FLUSH: u16 = 4;
const TX_SEND_FUA: u16 = 8;
const TX_SEND_TRIM: u16 = 32;
const TX_SEND_WRITE_ZEROES: u16 = 64;
const TX_CAN_MULTI_CONN: u16 = 256;
const TX_SEND_CACHE: u16 = 1024;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;
/// Our one metadata context, `base:allocation`.
const ALLOCATION_CONTEXT: u32 = 1;
const ALLOCATION_CONTEXT_NAME: &str = "base:allocation";
const CMD_FLAG_NO_HOLE: u16 = 2;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;

/// Largest request payload accepted (QEMU sends up to 32 MiB).
const MAX_REQUEST_BYTES: u32 = 32 << 20;
const BLOCK: u32 = 4096;

/// The clients connected to a gateway: connection id -> (peer, export).
#[derive(Clone, Default)]
pub struct Clients {
    inner: Arc<std::sync::Mutex<std::collections::BTreeMap<u64, (String, String)>>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Clients {
    /// Returns (peer, export) of every client in transmission.
    pub fn list(&self) -> Vec<(String, String)> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn add(&self, peer: String, export: String) -> ClientGuard {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (peer, export));
        ClientGuard {
            clients: self.clone(),
            id,
        }
    }
}

/// Removes a client from the list when its connection ends.
struct ClientGuard {
    clients: Clients,
    id: u64,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.clients
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Errors that end a connection (not a request: those get an NBD error).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Serves NBD on `listener` until `shutdown`; each connection closes
/// promptly on shutdown.
pub async fn serve(
    listener: TcpListener,
    client: Arc<BlockClient>,
    read_only: bool,
    clients: Clients,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let _ = stream.set_nodelay(true);
        let (client, shutdown, clients) = (client.clone(), shutdown.clone(), clients.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = connection(stream, client, read_only, peer.to_string(), clients) => match result {
                    Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                    Err(e) => tracing::warn!(%peer, "NBD connection closed: {e}"),
                },
            }
        });
    }
}

async fn option_reply(
    out: &mut TcpStream,
    option: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let mut buf = BytesMut::with_capacity(20 + data.len());
    buf.put_u64(REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(kind);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
    out.write_all(&buf).await?;
    Ok(())
}

fn export_info(volume: &Volume, read_only: bool) -> Vec<u8> {
    let mut info = Vec::with_capacity(12);
    info.put_u16(INFO_EXPORT);
    info.put_u64(volume.size_bytes);
    info.put_u16(transmission_flags(read_only));
    info
}

fn transmission_flags(read_only: bool) -> u16 {
    (if read_only { TX_READ_ONLY } else { 0 })
        | TX_HAS_FLAGS
        | TX_SEND_FLUSH
        | TX_SEND_FUA
        | TX_SEND_TRIM
        | TX_SEND_WRITE_ZEROES
        | TX_CAN_MULTI_CONN
        | TX_SEND_CACHE
}

async fn open(client: &Arc<BlockClient>, name: &str) -> Option<Volume> {
    let (pool, volume) = name.split_once('/').unwrap_or(("", name));
    client.open(pool, volume).await.ok()
}

/// Negotiates, then serves commands on one connection.
async fn connection(
    mut stream: TcpStream,
    client: Arc<BlockClient>,
    read_only: bool,
    peer: String,
    clients: Clients,
) -> Result<(), NbdError> {
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    stream.write_all(&hello).await?;
    let client_flags = stream.read_u32().await?;
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    let mut allocation_context = false;

    let volume = loop {
        if stream.read_u64().await? != IHAVEOPT {
            return Err(NbdError::Protocol("option without IHAVEOPT".into()));
        }
        let option = stream.read_u32().await?;
        let length = stream.read_u32().await?;
        if length > 64 * 1024 {
            return Err(NbdError::Protocol(format!("option of {length} bytes")));
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(volume) = open(&client, &name).await else {
                    // No way to refuse EXPORT_NAME but to close.
                    return Err(NbdError::Protocol(format!("unknown export {name:?}")));
                };
                let mut reply = BytesMut::with_capacity(134);
                reply.put_u64(volume.size_bytes);
                reply.put_u16(transmission_flags(read_only));
                if !no_zeroes {
                    reply.put_bytes(0, 124);
                }
                stream.write_all(&reply).await?;
                break volume;
            }
            OPT_ABORT => {
                let _ = option_reply(&mut stream, option, REP_ACK, &[]).await;
                return Ok(());
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(&mut stream, option, REP_ERR_INVALID, b"LIST takes no data")
                        .await?;
                    continue;
                }
                let map = client
                    .refresh_map()
                    .await
                    .map_err(|e| NbdError::Protocol(e.to_string()))?;
                for volume in map.volumes.values() {
                    let pool = map.pools.get(&volume.pool).map_or("", |p| p.name.as_str());
                    let name = if pool == "rbd" {
                        volume.name.clone()
                    } else {
                        format!("{pool}/{}", volume.name)
                    };
                    let mut entry = Vec::with_capacity(4 + name.len());
                    entry.put_u32(name.len() as u32);
                    entry.put_slice(name.as_bytes());
                    option_reply(&mut stream, option, REP_SERVER, &entry).await?;
                }
                option_reply(&mut stream, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                if data.len() < 6 {
                    option_reply(&mut stream, option, REP_ERR_INVALID, b"short request").await?;
                    continue;
                }
                let name_len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                if data.len() < 4 + name_len + 2 {
                    option_reply(&mut stream, option, REP_ERR_INVALID, b"bad name length").await?;
                    continue;
                }
                let name = String::from_utf8_lossy(&data[4..4 + name_len]).into_owned();
                let Some(volume) = open(&client, &name).await else {
                    let message = format!("no volume {name:?}");
                    option_reply(&mut stream, option, REP_ERR_UNKNOWN, message.as_bytes()).await?;
                    continue;
                };
                // The info types the client asked for, after the name.
                let rest = &data[4 + name_len..];
                let asked = u16::from_be_bytes([rest[0], rest[1]]) as usize;
                let requested: Vec<u16> = rest[2..]
                    .chunks_exact(2)
                    .take(asked)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                option_reply(
                    &mut stream,
                    option,
                    REP_INFO,
                    &export_info(&volume, read_only),
                )
                .await?;
                if requested.contains(&INFO_NAME) {
                    let mut info = Vec::with_capacity(2 + name.len());
                    info.put_u16(INFO_NAME);
                    info.put_slice(name.as_bytes());
                    option_reply(&mut stream, option, REP_INFO, &info).await?;
                }
                if requested.contains(&INFO_DESCRIPTION) {
                    let text = format!(
                        "Basalt volume {} ({} bytes, {}-byte objects)",
                        volume.name, volume.size_bytes, volume.object_size_bytes
                    );
                    let mut info = Vec::with_capacity(2 + text.len());
                    info.put_u16(INFO_DESCRIPTION);
                    info.put_slice(text.as_bytes());
                    option_reply(&mut stream, option, REP_INFO, &info).await?;
                }
                let mut block = Vec::with_capacity(14);
                block.put_u16(INFO_BLOCK_SIZE);
                block.put_u32(BLOCK);
                block.put_u32(BLOCK);
                block.put_u32(MAX_REQUEST_BYTES);
                option_reply(&mut stream, option, REP_INFO, &block).await?;
                option_reply(&mut stream, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    break volume;
                }
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    structured = true;
                    option_reply(&mut stream, option, REP_ACK, &[]).await?;
                } else {
                    option_reply(&mut stream, option, REP_ERR_INVALID, b"takes no data").await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let Some(queries) = meta_queries(&data) else {
                    option_reply(&mut stream, option, REP_ERR_INVALID, b"malformed request")
                        .await?;
                    continue;
                };
                if option == OPT_SET_META_CONTEXT && !structured {
                    option_reply(
                        &mut stream,
                        option,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let matches = queries.is_empty() && option == OPT_LIST_META_CONTEXT
                    || queries.iter().any(|q| {
                        q == ALLOCATION_CONTEXT_NAME
                            || (option == OPT_LIST_META_CONTEXT && q == "base:")
                    });
                if option == OPT_SET_META_CONTEXT {
                    allocation_context = matches;
                }
                if matches {
                    let mut reply = Vec::with_capacity(4 + ALLOCATION_CONTEXT_NAME.len());
                    reply.put_u32(ALLOCATION_CONTEXT);
                    reply.put_slice(ALLOCATION_CONTEXT_NAME.as_bytes());
                    option_reply(&mut stream, option, REP_META_CONTEXT, &reply).await?;
                }
                option_reply(&mut stream, option, REP_ACK, &[]).await?;
            }
            _ => {
                option_reply(&mut stream, option, REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
    };
    let _listed = clients.add(peer, volume.name.clone());
    transmission(stream, volume, structured, allocation_context, read_only).await
}

/// Parses a meta-context request: export name, then the queries.
fn meta_queries(data: &[u8]) -> Option<Vec<String>> {
    let mut cursor = data;
    let take_u32 = |cursor: &mut &[u8]| -> Option<u32> {
        let (head, rest) = cursor.split_at_checked(4)?;
        *cursor = rest;
        Some(u32::from_be_bytes([head[0], head[1], head[2], head[3]]))
    };
    let name_len = take_u32(&mut cursor)? as usize;
    cursor = cursor.get(name_len..)?;
    let count = take_u32(&mut cursor)?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = take_u32(&mut cursor)? as usize;
        let (query, rest) = cursor.split_at_checked(len)?;
        queries.push(String::from_utf8_lossy(query).into_owned());
        cursor = rest;
    }
    cursor.is_empty().then_some(queries)
}

enum Outcome {
    Done,
    Data(bytes::Bytes),
    Extents(Vec<(u32, u32)>),
    Error(u32),
}

struct Reply {
    cookie: u64,
    offset: u64,
    outcome: Outcome,
}

/// Encodes a reply as a simple reply or one structured chunk.
fn encode_reply(reply: Reply, structured: bool) -> BytesMut {
    let mut out = BytesMut::new();
    if !structured {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        match reply.outcome {
            Outcome::Error(error) => {
                out.put_u32(error);
                out.put_u64(reply.cookie);
            }
            Outcome::Data(data) => {
                out.put_u32(0);
                out.put_u64(reply.cookie);
                out.put_slice(&data);
            }
            Outcome::Done | Outcome::Extents(_) => {
                out.put_u32(0);
                out.put_u64(reply.cookie);
            }
        }
        return out;
    }
    let (kind, payload): (u16, BytesMut) = match reply.outcome {
        Outcome::Done => (REPLY_TYPE_NONE, BytesMut::new()),
        Outcome::Data(data) => {
            let mut payload = BytesMut::with_capacity(8 + data.len());
            payload.put_u64(reply.offset);
            payload.put_slice(&data);
            (REPLY_TYPE_OFFSET_DATA, payload)
        }
        Outcome::Extents(extents) => {
            let mut payload = BytesMut::with_capacity(4 + 8 * extents.len());
            payload.put_u32(ALLOCATION_CONTEXT);
            for (length, flags) in extents {
                payload.put_u32(length);
                payload.put_u32(flags);
            }
            (REPLY_TYPE_BLOCK_STATUS, payload)
        }
        Outcome::Error(error) => {
            let mut payload = BytesMut::with_capacity(6);
            payload.put_u32(error);
            payload.put_u16(0);
            (REPLY_TYPE_ERROR, payload)
        }
    };
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(REPLY_FLAG_DONE);
    out.put_u16(kind);
    out.put_u64(reply.cookie);
    out.put_u32(payload.len() as u32);
    out.put_slice(&payload);
    out
}

fn errno(error: &ClientError) -> u32 {
    match error {
        ClientError::Invalid(_) => EINVAL,
        ClientError::NoSpace => ENOSPC,
        _ => EIO,
    }
}

async fn transmission(
    stream: TcpStream,
    volume: Volume,
    structured: bool,
    allocation_context: bool,
    read_only: bool,
) -> Result<(), NbdError> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    let (replies, mut outgoing) = mpsc::channel::<Reply>(256);
    let writer_task = tokio::spawn(async move {
        while let Some(reply) = outgoing.recv().await {
            let bytes = encode_reply(reply, structured);
            if writer.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let result = loop {
        let magic = match reader.read_u32().await {
            Ok(magic) => magic,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        };
        if magic != REQUEST_MAGIC {
            break Err(NbdError::Protocol(format!("bad request magic {magic:#x}")));
        }
        let flags = reader.read_u16().await?;
        let command = reader.read_u16().await?;
        let cookie = reader.read_u64().await?;
        let offset = reader.read_u64().await?;
        let length = reader.read_u32().await?;
        let mut payload = Vec::new();
        if command == CMD_WRITE {
            if length > MAX_REQUEST_BYTES {
                break Err(NbdError::Protocol(format!("write of {length} bytes")));
            }
            payload = vec![0u8; length as usize];
            reader.read_exact(&mut payload).await?;
        }
        if command == CMD_DISC {
            break Ok(());
        }
        let in_range = offset
            .checked_add(length as u64)
            .is_some_and(|end| end <= volume.size_bytes);
        // Block status may name any byte range; data commands use 4 KiB blocks.
        let aligned =
            command == CMD_BLOCK_STATUS || (offset % BLOCK as u64 == 0 && length % BLOCK == 0);
        let (volume, replies) = (volume.clone(), replies.clone());
        tokio::spawn(async move {
            let done =
                |r: Result<(), ClientError>| r.map(|()| Outcome::Done).map_err(|e| errno(&e));
            let writes = matches!(command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
            let result: Result<Outcome, u32> = if read_only && writes {
                Err(EPERM)
            } else if !in_range || !aligned {
                Err(EINVAL)
            } else {
                match command {
                    CMD_READ => volume
                        .read(offset, length as u64)
                        .await
                        .map(Outcome::Data)
                        .map_err(|e| errno(&e)),
                    CMD_WRITE => done(volume.write(offset, &payload).await),
                    // Every acknowledged write is already durable on every
                    // copy, and there is no client-side cache to warm.
                    CMD_FLUSH | CMD_CACHE => Ok(Outcome::Done),
                    CMD_TRIM => done(volume.discard(offset, length as u64).await),
                    CMD_WRITE_ZEROES => done(
                        volume
                            .write_zeroes(offset, length as u64, flags & CMD_FLAG_NO_HOLE != 0)
                            .await,
                    ),
                    CMD_BLOCK_STATUS if allocation_context && length > 0 => volume
                        .allocation(offset, length as u64)
                        .await
                        .map(|runs| {
                            Outcome::Extents(
                                runs.into_iter()
                                    .map(|(_, len, allocated)| {
                                        let state = if allocated {
                                            0
                                        } else {
                                            STATE_HOLE | STATE_ZERO
                                        };
                                        (len as u32, state)
                                    })
                                    .collect(),
                            )
                        })
                        .map_err(|e| errno(&e)),
                    CMD_BLOCK_STATUS => Err(EINVAL),
                    _ => Err(ENOTSUP),
                }
            };
            let outcome = match result {
                Ok(outcome) => outcome,
                Err(error) => Outcome::Error(error),
            };
            let _ = replies
                .send(Reply {
                    cookie,
                    offset,
                    outcome,
                })
                .await;
        });
    };
    drop(replies);
    let _ = writer_task.await;
    result
}
