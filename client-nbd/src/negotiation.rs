//! The handshake phase: fixed newstyle negotiation up to the export a client
//! picks (NBD_OPT_GO or NBD_OPT_EXPORT_NAME). Every option we do not know, or
//! know but refuse, gets its NBD_REP_ERR_* and the negotiation continues; only
//! a framing violation (no IHAVEOPT, an oversized option) ends the connection.

use std::sync::Arc;

use basalt_client::{BlockClient, Volume};
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::NbdError;
use crate::protocol::*;

/// Largest option payload read into memory; larger ones are skipped and
/// answered NBD_REP_ERR_TOO_BIG. Export names are at most 4 KiB.
const MAX_OPTION_BYTES: u32 = 64 * 1024;
/// Larger than this and the option is not even skipped: the connection ends.
const MAX_SKIPPED_OPTION_BYTES: u32 = 16 << 20;

/// What the handshake settled.
pub struct Session {
    pub volume: Volume,
    /// The export name as the client gave it.
    pub export: String,
    pub style: HeaderStyle,
    /// Whether `base:allocation` was selected (BLOCK_STATUS allowed).
    pub allocation_context: bool,
}

/// Largest request payload accepted and advertised (QEMU sends up to 32 MiB).
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;
/// The minimum and preferred block size: requests must be aligned to it.
pub const BLOCK_BYTES: u32 = 4096;

/// Returns the transmission flags of an export.
pub fn transmission_flags(read_only: bool) -> u16 {
    (if read_only { TX_READ_ONLY } else { 0 })
        | TX_HAS_FLAGS
        | TX_SEND_FLUSH
        | TX_SEND_FUA
        | TX_SEND_TRIM
        | TX_SEND_WRITE_ZEROES
        | TX_CAN_MULTI_CONN
        | TX_SEND_CACHE
}

fn export_info(volume: &Volume, read_only: bool) -> Vec<u8> {
    let mut info = Vec::with_capacity(12);
    info.put_u16(INFO_EXPORT);
    info.put_u64(volume.size_bytes);
    info.put_u16(transmission_flags(read_only));
    info
}

/// Opens `name` (`volume` in pool `rbd`, or `pool/volume`).
async fn open(client: &Arc<BlockClient>, name: &str) -> Result<Volume, String> {
    let (pool, volume) = name.split_once('/').unwrap_or(("", name));
    client.open(pool, volume).await.map_err(|e| e.to_string())
}

async fn reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    stream
        .write_all(&option_reply(option, kind, data))
        .await
        .map_err(NbdError::from)
}

/// Runs the handshake on `stream`. Returns `None` when the client aborted.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    client: &Arc<BlockClient>,
    read_only: bool,
) -> Result<Option<Session>, NbdError> {
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    stream.write_all(&hello).await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut style = HeaderStyle::Simple;
    let mut allocation_context = false;

    loop {
        if stream.read_u64().await? != IHAVEOPT {
            return Err(NbdError::Protocol("option without IHAVEOPT".into()));
        }
        let option = stream.read_u32().await?;
        let length = stream.read_u32().await?;
        if length > MAX_OPTION_BYTES {
            if length > MAX_SKIPPED_OPTION_BYTES {
                return Err(NbdError::Protocol(format!("option of {length} bytes")));
            }
            let skipped = tokio::io::copy(
                &mut (&mut *stream).take(length.into()),
                &mut tokio::io::sink(),
            )
            .await?;
            if skipped != u64::from(length) {
                return Err(NbdError::Protocol("option data cut short".into()));
            }
            reply(stream, option, REP_ERR_TOO_BIG, b"option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        stream.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if style == HeaderStyle::Extended {
                    // The protocol forbids EXPORT_NAME once extended headers
                    // are negotiated; it cannot be answered with an error.
                    return Err(NbdError::Protocol(
                        "EXPORT_NAME after extended headers".into(),
                    ));
                }
                let volume = match open(client, &name).await {
                    Ok(volume) => volume,
                    // No way to refuse EXPORT_NAME but to close.
                    Err(e) => return Err(NbdError::Protocol(format!("export {name:?}: {e}"))),
                };
                let mut answer = BytesMut::with_capacity(134);
                answer.put_u64(volume.size_bytes);
                answer.put_u16(transmission_flags(read_only));
                if !no_zeroes {
                    answer.put_bytes(0, 124);
                }
                stream.write_all(&answer).await?;
                // EXPORT_NAME clients never negotiated block sizes; they get
                // EINVAL for unaligned requests like everyone else.
                return Ok(Some(Session {
                    volume,
                    export: name,
                    style,
                    allocation_context,
                }));
            }
            OPT_ABORT => {
                let _ = reply(stream, option, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(stream, option, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                let map = match client.refresh_map().await {
                    Ok(map) => map,
                    Err(e) => {
                        let message = format!("cluster map unavailable: {e}");
                        reply(stream, option, REP_ERR_SHUTDOWN, message.as_bytes()).await?;
                        continue;
                    }
                };
                let mut out = BytesMut::new();
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
                    out.extend_from_slice(&option_reply(option, REP_SERVER, &entry));
                }
                out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
                stream.write_all(&out).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requested)) = info_request(&data) else {
                    reply(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        b"malformed INFO/GO request",
                    )
                    .await?;
                    continue;
                };
                let volume = match open(client, &name).await {
                    Ok(volume) => volume,
                    Err(e) => {
                        let message = format!("export {name:?}: {e}");
                        reply(stream, option, REP_ERR_UNKNOWN, message.as_bytes()).await?;
                        continue;
                    }
                };
                let mut out = BytesMut::new();
                out.extend_from_slice(&option_reply(
                    option,
                    REP_INFO,
                    &export_info(&volume, read_only),
                ));
                if requested.contains(&INFO_NAME) {
                    let mut info = Vec::with_capacity(2 + name.len());
                    info.put_u16(INFO_NAME);
                    info.put_slice(name.as_bytes());
                    out.extend_from_slice(&option_reply(option, REP_INFO, &info));
                }
                if requested.contains(&INFO_DESCRIPTION) {
                    let text = format!(
                        "Basalt volume {} ({} bytes, {}-byte objects)",
                        volume.name, volume.size_bytes, volume.object_size_bytes
                    );
                    let mut info = Vec::with_capacity(2 + text.len());
                    info.put_u16(INFO_DESCRIPTION);
                    info.put_slice(text.as_bytes());
                    out.extend_from_slice(&option_reply(option, REP_INFO, &info));
                }
                // Always sent: a client that ignores it still gets EINVAL
                // for unaligned requests (the issue allows either).
                let mut block = Vec::with_capacity(14);
                block.put_u16(INFO_BLOCK_SIZE);
                block.put_u32(BLOCK_BYTES);
                block.put_u32(BLOCK_BYTES);
                block.put_u32(MAX_PAYLOAD_BYTES);
                out.extend_from_slice(&option_reply(option, REP_INFO, &block));
                out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
                stream.write_all(&out).await?;
                if option == OPT_GO {
                    return Ok(Some(Session {
                        volume,
                        export: name,
                        style,
                        allocation_context,
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(stream, option, REP_ERR_INVALID, b"takes no data").await?;
                } else if style == HeaderStyle::Extended {
                    reply(
                        stream,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        b"extended headers already negotiated",
                    )
                    .await?;
                } else if style == HeaderStyle::Structured {
                    reply(stream, option, REP_ERR_INVALID, b"already negotiated").await?;
                } else {
                    style = HeaderStyle::Structured;
                    allocation_context = false;
                    reply(stream, option, REP_ACK, &[]).await?;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    reply(stream, option, REP_ERR_INVALID, b"takes no data").await?;
                } else if style == HeaderStyle::Extended {
                    reply(stream, option, REP_ERR_INVALID, b"already negotiated").await?;
                } else {
                    // A change of header style resets the meta contexts
                    // (their reply format depends on it).
                    style = HeaderStyle::Extended;
                    allocation_context = false;
                    reply(stream, option, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let Some((_export, queries)) = meta_queries(&data) else {
                    reply(stream, option, REP_ERR_INVALID, b"malformed request").await?;
                    continue;
                };
                if option == OPT_SET_META_CONTEXT && style == HeaderStyle::Simple {
                    reply(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        b"negotiate structured replies or extended headers first",
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
                let mut out = BytesMut::new();
                if matches {
                    let mut context = Vec::with_capacity(4 + ALLOCATION_CONTEXT_NAME.len());
                    context.put_u32(ALLOCATION_CONTEXT);
                    context.put_slice(ALLOCATION_CONTEXT_NAME.as_bytes());
                    out.extend_from_slice(&option_reply(option, REP_META_CONTEXT, &context));
                }
                out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
                stream.write_all(&out).await?;
            }
            OPT_STARTTLS => {
                reply(stream, option, REP_ERR_POLICY, b"TLS is not offered").await?;
            }
            _ => {
                reply(stream, option, REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
    }
}
