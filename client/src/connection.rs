//! `Connection`: one pipelined data-plane connection to an OSD.
//!
//! Requests are written by a writer task in the order they are issued;
//! replies are matched to requests by id as they arrive, in any order, so
//! many requests share one TCP connection. A protocol error or a closed
//! socket fails every request in flight and marks the connection dead; the
//! pool opens a new one for the next request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use basalt_wire::{FLAG_REPLY, Frame, FrameCodec};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;

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
        let (mut sink, mut stream) = Framed::new(stream, FrameCodec::default()).split();
        let (outgoing, mut queue) = mpsc::channel::<Frame>(1024);
        let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
        let dead = Arc::new(AtomicBool::new(false));

        let writer_dead = dead.clone();
        tokio::spawn(async move {
            while let Some(frame) = queue.recv().await {
                if let Err(e) = sink.send(frame).await {
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

/// Connections to OSDs by address, reopened when they die.
#[derive(Default)]
pub struct ConnectionPool {
    connections: tokio::sync::Mutex<HashMap<SocketAddr, Arc<Connection>>>,
}

impl ConnectionPool {
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
        let connection = self.get(addr).await?;
        let reply = connection.call(frame, timeout).await;
        if reply.is_err() {
            self.forget(addr).await;
        }
        reply
    }
}
