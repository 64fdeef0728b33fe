//! The transmission phase of one connection: requests are read in order,
//! run concurrently against the cluster and answered out of order.
//!
//! Bounds: at most `MAX_REQUESTS_IN_FLIGHT` requests and
//! `MAX_BYTES_IN_FLIGHT` bytes of payload (writes read, reads produced) per
//! connection; when either is reached the gateway stops reading from the
//! socket, so a client that floods requests is slowed, not served out of
//! memory. Replies go through one writer task that batches small replies into
//! one send when several are ready.
//!
//! Durability: a write, trim or write-zeroes with FUA is acknowledged once
//! every copy has it durably; without FUA once every copy applied it (as the
//! NBD protocol allows). FLUSH makes every write acknowledged before it
//! durable, including those of the gateway's other connections (the block
//! client tracks every OSD it left dirty), so CAN_MULTI_CONN stays truthful.
//! A connection's first FLUSH flushes every OSD: the client may be continuing
//! writes it made through another gateway or before a gateway restart. A
//! connection that ends (DISC or EOF) is flushed too, as qemu-nbd does when
//! its last client leaves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use basalt_client::{ClientError, Durability, Volume};
use bytes::{Bytes, BytesMut};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::NbdError;
use crate::negotiation::{BLOCK_BYTES, MAX_PAYLOAD_BYTES, Session};
use crate::protocol::*;

/// Requests one connection may have in flight (QEMU keeps up to 16, fio
/// iodepth at most a few hundred).
const MAX_REQUESTS_IN_FLIGHT: u32 = 256;
/// Payload bytes one connection may have in flight, in 4 KiB units.
const MAX_BYTES_IN_FLIGHT: u32 = 128 << 20;

/// Largest slice of a TRIM or WRITE_ZEROES run at once.
const EFFECT_SLICE_BYTES: u64 = 1 << 30;

/// Flags each command may carry; anything else is EINVAL.
fn allowed_flags(command: u16) -> u16 {
    match command {
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_READ => CMD_FLAG_DF,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

fn errno(error: &ClientError) -> u32 {
    match error {
        ClientError::Invalid(_) => EINVAL,
        ClientError::NoSpace => ENOSPC,
        _ => EIO,
    }
}

struct Reply {
    cookie: u64,
    offset: u64,
    outcome: Outcome,
    /// Released once the reply is on the wire.
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

/// Serves requests until the client disconnects or breaks the protocol.
pub async fn transmission<S>(stream: S, session: Session, read_only: bool) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let Session {
        volume,
        style,
        allocation_context,
        ..
    } = session;
    let (reader, writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    let (replies, mut outgoing) = mpsc::unbounded_channel::<Reply>();
    let writer_task = tokio::spawn(async move {
        let mut writer = BufWriter::with_capacity(256 * 1024, writer);
        while let Some(reply) = outgoing.recv().await {
            let mut next = Some(reply);
            // Write every reply that is ready, then flush once.
            while let Some(reply) = next.take() {
                let (head, data) = encode_reply(style, reply.cookie, reply.offset, reply.outcome);
                if writer.write_all(&head).await.is_err() {
                    return;
                }
                if let Some(data) = data
                    && writer.write_all(&data).await.is_err()
                {
                    return;
                }
                next = outgoing.try_recv().ok();
            }
            if writer.flush().await.is_err() {
                return;
            }
        }
    });
    let requests = Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT as usize));
    let bytes = Arc::new(Semaphore::new((MAX_BYTES_IN_FLIGHT / BLOCK_BYTES) as usize));
    let mut header = vec![0u8; style.request_header_len()];
    // No FLUSH seen on this connection yet (its first one goes everywhere).
    let first_flush = Arc::new(AtomicBool::new(true));
    let result = loop {
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let request = match Request::parse(style, &header) {
            Ok(request) => request,
            Err(e) => break Err(NbdError::Protocol(e.to_string())),
        };
        if request.command == CMD_DISC {
            break Ok(());
        }
        if request.payload_len > u64::from(MAX_PAYLOAD_BYTES) {
            // We advertised the maximum; the payload cannot be skipped cheaply.
            break Err(NbdError::Protocol(format!(
                "payload of {} bytes (maximum {MAX_PAYLOAD_BYTES})",
                request.payload_len
            )));
        }
        let Ok(slot) = requests.clone().acquire_owned().await else {
            break Ok(());
        };
        // Reads produce and writes carry data: both count against the byte
        // budget (at least one unit so a zero-length request still counts).
        let data_len = match request.command {
            CMD_READ => request.length.min(u64::from(MAX_PAYLOAD_BYTES)),
            _ => request.payload_len,
        };
        let units = data_len.div_ceil(u64::from(BLOCK_BYTES)).max(1) as u32;
        let Ok(budget) = bytes.clone().acquire_many_owned(units).await else {
            break Ok(());
        };
        let payload = match read_payload(&mut reader, request.payload_len as usize).await {
            Ok(payload) => payload,
            Err(e) => break Err(e.into()),
        };
        let (volume, replies, first_flush) = (volume.clone(), replies.clone(), first_flush.clone());
        tokio::spawn(async move {
            let outcome = match execute(
                &volume,
                style,
                allocation_context,
                read_only,
                &first_flush,
                &request,
                payload,
            )
            .await
            {
                Ok(outcome) => outcome,
                Err(error) => Outcome::Error(error),
            };
            let _ = replies.send(Reply {
                cookie: request.cookie,
                offset: request.offset,
                outcome,
                _permits: (slot, Some(budget)),
            });
        });
    };
    drop(replies);
    // Every request task held a reply sender: once the writer is done, no
    // request is running any more.
    let _ = writer_task.await;
    if !read_only && let Err(e) = volume.flush(false).await {
        tracing::warn!(volume = %volume.name, "flush at disconnect failed: {e}");
    }
    result
}

/// Reads a request's `len` bytes of payload into a buffer of its own (not
/// zeroed first; sent on to the OSDs without a copy). A large one is placed
/// at an aligned address, so that the node's own OSD writes it to disk
/// without copying it either (`basalt_wire::aligned_buffer`), and only what
/// the reader holds already is copied out of its buffer: the rest is read
/// from the socket straight into place (through the buffer, up to 256 KiB
/// of each 1 MiB write was copied once more).
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    len: usize,
) -> std::io::Result<Bytes> {
    if len < basalt_wire::ALIGN_PAYLOADS_FROM {
        let mut payload = BytesMut::with_capacity(len);
        // Through the reader's buffer: it may hold the next request's
        // header too, and that must stay there.
        fill_to(reader, &mut payload, len).await?;
        return Ok(payload.freeze());
    }
    let mut payload = basalt_wire::aligned_buffer(len, 0);
    let buffered = reader.buffer().len().min(len);
    payload.extend_from_slice(&reader.buffer()[..buffered]);
    reader.consume(buffered);
    // The reader's buffer is empty now (or held the whole payload): reading
    // the socket itself keeps the byte order.
    fill_to(reader.get_mut(), &mut payload, len).await?;
    Ok(payload.freeze())
}

/// Reads from `reader` until `payload` holds `len` bytes, never more (the
/// buffer may have more room, and what follows belongs to the next request).
async fn fill_to<R: AsyncRead + Unpin>(
    reader: &mut R,
    payload: &mut BytesMut,
    len: usize,
) -> std::io::Result<()> {
    while payload.len() < len {
        let missing = (len - payload.len()) as u64;
        if (&mut *reader).take(missing).read_buf(payload).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Checks and runs one request; returns its outcome or an NBD errno.
async fn execute(
    volume: &Volume,
    style: HeaderStyle,
    allocation_context: bool,
    read_only: bool,
    first_flush: &AtomicBool,
    request: &Request,
    payload: Bytes,
) -> Result<Outcome, u32> {
    let Request {
        flags,
        command,
        offset,
        length,
        payload_len,
        ..
    } = *request;
    let known = matches!(
        command,
        CMD_READ
            | CMD_WRITE
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    );
    if !known {
        return Err(EINVAL);
    }
    // PAYLOAD_LEN is only meaningful for commands that take a payload; we
    // offer none beyond WRITE (NBD_FLAG_BLOCK_STAT_PAYLOAD is not advertised).
    let flags = flags & !CMD_FLAG_PAYLOAD_LEN;
    if flags & !allowed_flags(command) != 0 || (command != CMD_WRITE && payload_len > 0) {
        return Err(EINVAL);
    }
    if read_only && matches!(command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        return Err(EPERM);
    }
    if command == CMD_FLUSH {
        if offset != 0 || length != 0 {
            return Err(EINVAL);
        }
        let everywhere = first_flush.swap(false, Ordering::AcqRel);
        return volume
            .flush(everywhere)
            .await
            .map(|()| Outcome::Done)
            .map_err(|e| errno(&e));
    }
    let durability = if flags & CMD_FLAG_FUA != 0 {
        Durability::Durable
    } else {
        Durability::Buffered
    };
    let in_range = offset
        .checked_add(length)
        .is_some_and(|end| end <= volume.size_bytes);
    if !in_range {
        return Err(EINVAL);
    }
    if command == CMD_BLOCK_STATUS {
        if !allocation_context || length == 0 {
            return Err(EINVAL);
        }
        let runs = volume
            .allocation(offset, length)
            .await
            .map_err(|e| errno(&e))?;
        let mut extents: Vec<(u64, u32)> = runs
            .into_iter()
            .map(|(_, len, allocated)| {
                let state = if allocated {
                    0
                } else {
                    STATE_HOLE | STATE_ZERO
                };
                (len, state)
            })
            .collect();
        if flags & CMD_FLAG_REQ_ONE != 0 {
            extents.truncate(1);
        }
        // `allocation` covers at most one object, so lengths fit 32 bits
        // for compact headers.
        debug_assert!(
            style == HeaderStyle::Extended || extents.iter().all(|(l, _)| *l <= u32::MAX as u64)
        );
        return Ok(Outcome::Extents(extents));
    }
    let aligned = offset % u64::from(BLOCK_BYTES) == 0 && length % u64::from(BLOCK_BYTES) == 0;
    if !aligned {
        return Err(EINVAL);
    }
    match command {
        CMD_READ => {
            if length > u64::from(MAX_PAYLOAD_BYTES) {
                // The protocol's answer to a read above the advertised maximum.
                return Err(if style == HeaderStyle::Simple {
                    EINVAL
                } else {
                    EOVERFLOW
                });
            }
            volume
                .read(offset, length)
                .await
                .map(Outcome::Data)
                .map_err(|e| errno(&e))
        }
        CMD_WRITE => volume
            .write_bytes(offset, payload, durability)
            .await
            .map(|()| Outcome::Done)
            .map_err(|e| errno(&e)),
        // No client-side cache to warm.
        CMD_CACHE => Ok(Outcome::Done),
        CMD_TRIM | CMD_WRITE_ZEROES => {
            // With extended headers one request may cover the whole volume:
            // run it a slice at a time so it never fans out into more than
            // `EFFECT_SLICE_BYTES / object size` object operations at once.
            let mut position = offset;
            let end = offset + length;
            while position < end {
                let take = (end - position).min(EFFECT_SLICE_BYTES);
                let done = if command == CMD_TRIM {
                    volume.discard(position, take, durability).await
                } else {
                    volume
                        .write_zeroes(position, take, flags & CMD_FLAG_NO_HOLE != 0, durability)
                        .await
                };
                done.map_err(|e| errno(&e))?;
                position += take;
            }
            Ok(Outcome::Done)
        }
        _ => Err(ENOTSUP),
    }
}
