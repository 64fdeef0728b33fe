//! `Connection`: one pipelined data-plane connection to an OSD.
//!
//! Requests are written by a writer task in the order they are issued;
//! replies are matched to requests by id as they arrive, in any order, so
//! many requests share one TCP connection. A protocol error or a closed
//! socket fails every request in flight and marks the connection dead; the
//! pool opens a new one for the next request.
//!
//! A pool may also know one OSD that lives in the caller's own process
//! ([`LocalOsd`]: a node daemon whose NBD gateway and OSD share a process).
//! Requests to that OSD's address are handed to it directly, skipping the
//! encoding, both checksums and two loopback socket hops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use basalt_wire::{FLAG_REPLY, Frame, FrameBatch, FrameCodec};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use crate::error::ClientError;

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Frame>>>>;

/// A live connection to one OSD.
pub struct Connection {
    addr: SocketAddr,
    next_id: AtomicU64,
    outgoing: mpsc::Sender<Frame>,
    waiters: Waiters,
    dead: Arc<AtomicBool>,
}

impl Connection {
    /// Connects to `addr` (TCP_NODELAY) within `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Connection, ClientError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Connect {
                addr,
                reason: "timed out".into(),
            })?
            .map_err(|e| ClientError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        stream.set_nodelay(true).map_err(|e| ClientError::Connect {
            addr,
            reason: e.to_string(),
        })?;
        let (read_half, mut write_half) = stream.into_split();
        let mut stream = FramedRead::new(read_half, FrameCodec::default());
        let (outgoing, mut queue) = mpsc::channel::<Frame>(1024);
        let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
        let dead = Arc::new(AtomicBool::new(false));

        let writer_dead = dead.clone();
        tokio::spawn(async move {
            while let Some(frame) = queue.recv().await {
                if let Err(e) = send_batch(&mut write_half, &mut queue, frame).await {
                    tracing::debug!(%addr, "connection write failed: {e}");
                    break;
                }
            }
            writer_dead.store(true, Ordering::Release);
        });

        let reader_waiters = waiters.clone();
        let reader_dead = dead.clone();
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(frame) if frame.flags & FLAG_REPLY != 0 => {
                        let waiter = reader_waiters
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&frame.request_id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(frame);
                        }
                    }
                    Ok(frame) => {
                        tracing::warn!(%addr, kind = ?frame.kind, "unexpected request on a client connection; closing");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%addr, "closing connection after protocol error: {e}");
                        break;
                    }
                }
            }
            reader_dead.store(true, Ordering::Release);
            // Fail everyone still waiting: their replies will never come.
            reader_waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        });

        Ok(Connection {
            addr,
            next_id: AtomicU64::new(1),
            outgoing,
            waiters,
            dead,
        })
    }

    /// Returns whether the connection can still carry requests.
    pub fn is_alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
    }

    /// Returns the peer address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `frame` (its request id is assigned here) and waits for the
    /// reply, at most `timeout`.
    pub async fn call(&self, mut frame: Frame, timeout: Duration) -> Result<Frame, ClientError> {
        if !self.is_alive() {
            return Err(ClientError::ConnectionLost { addr: self.addr });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        frame.request_id = id;
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        if self.outgoing.send(frame).await.is_err() {
            self.waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(ClientError::ConnectionLost { addr: self.addr });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ClientError::ConnectionLost { addr: self.addr }),
            Err(_) => {
                self.waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err(ClientError::Timeout { addr: self.addr })
            }
        }
    }
}

/// Writes `first` and every other frame already queued (at most 64) with
/// vectored writes: under load one `writev` carries many frames, and long
/// payloads go to the socket from their own buffers, not copied first.
pub async fn send_batch<W>(
    writer: &mut W,
    queue: &mut mpsc::Receiver<Frame>,
    first: Frame,
) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut batch = FrameBatch::default();
    batch.push(&first).map_err(std::io::Error::other)?;
    for _ in 0..64 {
        match queue.try_recv() {
            Ok(frame) => batch.push(&frame).map_err(std::io::Error::other)?,
            Err(_) => break,
        }
    }
    batch.finish();
    tokio::io::AsyncWriteExt::write_all_buf(writer, &mut batch).await
}

/// An OSD in the caller's own process, answering request frames directly.
pub trait LocalOsd: Send + Sync + 'static {
    /// Answers one request frame; `None` when the OSD is shutting down.
    /// The returned future must run a request that changes anything to
    /// completion even if the caller stops waiting (as a request sent over
    /// TCP would): implementors spawn it. Reads may run in the caller.
    fn call(&self, frame: Frame) -> BoxFuture<'static, Option<Frame>>;
}

/// Connections to OSDs by address, reopened when they die.
#[derive(Default)]
pub struct ConnectionPool {
    connections: tokio::sync::Mutex<HashMap<SocketAddr, Arc<Connection>>>,
    local: OnceLock<(SocketAddr, Arc<dyn LocalOsd>)>,
}

impl ConnectionPool {
    /// Routes requests for `addr` to `osd`, in this process, from now on.
    /// Set once; a second call is ignored and returns false.
    pub fn set_local(&self, addr: SocketAddr, osd: Arc<dyn LocalOsd>) -> bool {
        self.local.set((addr, osd)).is_ok()
    }

    /// Returns a live connection to `addr`, connecting if needed.
    pub async fn get(&self, addr: SocketAddr) -> Result<Arc<Connection>, ClientError> {
        let mut connections = self.connections.lock().await;
        if let Some(connection) = connections.get(&addr)
            && connection.is_alive()
        {
            return Ok(connection.clone());
        }
        let connection = Arc::new(Connection::connect(addr, Duration::from_secs(2)).await?);
        connections.insert(addr, connection.clone());
        Ok(connection)
    }

    /// Drops the connection to `addr` (after an error on it).
    pub async fn forget(&self, addr: SocketAddr) {
        self.connections.lock().await.remove(&addr);
    }

    /// Sends `frame` to `addr` and returns the reply; a connection that
    /// failed is dropped, so the next call reconnects.
    pub async fn call(
        &self,
        addr: SocketAddr,
        frame: Frame,
        timeout: Duration,
    ) -> Result<Frame, ClientError> {
        if let Some((local, osd)) = self.local.get()
            && *local == addr
        {
            // The bound a socket would enforce (the sender's encoder).
            frame
                .check_size()
                .map_err(|e| ClientError::Invalid(e.to_string()))?;
            return match tokio::time::timeout(timeout, osd.call(frame)).await {
                Ok(Some(reply)) => Ok(reply),
                Ok(None) => Err(ClientError::ConnectionLost { addr }),
                Err(_) => Err(ClientError::Timeout { addr }),
            };
        }
        let connection = self.get(addr).await?;
        let reply = connection.call(frame, timeout).await;
        if reply.is_err() {
            self.forget(addr).await;
        }
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_wire::Kind;
    use bytes::Bytes;

    /// Answers every request with its own payload reversed.
    struct Echo;

    impl LocalOsd for Echo {
        fn call(&self, frame: Frame) -> BoxFuture<'static, Option<Frame>> {
            Box::pin(async move {
                let mut payload = frame.payload.to_vec();
                payload.reverse();
                Some(Frame {
                    flags: FLAG_REPLY,
                    payload: Bytes::from(payload),
                    tail: Bytes::new(),
                    data_crcs: None,
                    ..frame
                })
            })
        }
    }

    fn ping(payload: &'static [u8]) -> Frame {
        Frame {
            kind: Kind::Ping,
            flags: 0,
            request_id: 0,
            epoch: 1,
            status: 0,
            payload: Bytes::from_static(payload),
            tail: Bytes::new(),
            data_crcs: None,
        }
    }

    /// Requests for the local OSD's address never touch a socket (nothing
    /// listens there); requests for any other address still do.
    #[tokio::test]
    async fn the_local_osd_is_called_in_process_and_only_for_its_address() {
        let pool = ConnectionPool::default();
        // Bound and dropped: free, so a TCP attempt is refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = closed.local_addr().unwrap();
        let other = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        drop(closed);
        assert!(pool.set_local(local, Arc::new(Echo)));
        assert!(!pool.set_local(other, Arc::new(Echo)), "set only once");
        let reply = pool
            .call(local, ping(b"abc"), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(&reply.payload[..], b"cba");
        let remote = pool.call(other, ping(b"abc"), Duration::from_secs(1)).await;
        assert!(
            matches!(remote, Err(ClientError::Connect { addr, .. }) if addr == other),
            "{remote:?}"
        );
    }

    /// A local OSD that is gone (shutting down) looks like a lost
    /// connection, which the block client retries.
    #[tokio::test]
    async fn a_stopped_local_osd_is_a_lost_connection() {
        struct Gone;
        impl LocalOsd for Gone {
            fn call(&self, _: Frame) -> BoxFuture<'static, Option<Frame>> {
                Box::pin(async { None })
            }
        }
        let pool = ConnectionPool::default();
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        pool.set_local(addr, Arc::new(Gone));
        let reply = pool.call(addr, ping(b""), Duration::from_secs(1)).await;
        assert!(
            matches!(reply, Err(ClientError::ConnectionLost { .. })),
            "{reply:?}"
        );
    }
}
