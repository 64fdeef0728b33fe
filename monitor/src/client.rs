//! `MonClient`: talks to a monitor quorum from OSDs, gateways and the CLI.
//!
//! Every call has a deadline. Writes go to the leader: a follower answers
//! UNAVAILABLE with the leader's address in the `x-basalt-leader` metadata
//! and the client goes there next; a monitor that cannot be reached, or a
//! quorum that cannot commit, is retried on the other monitors with
//! exponential backoff until `retry_for` runs out. Other errors (NOT_FOUND,
//! ALREADY_EXISTS, INVALID_ARGUMENT, ...) come back at once: retrying them
//! cannot help.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use basalt_proto::monitor::monitor_client::MonitorClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Metadata key in which a follower names the leader's address.
pub const LEADER_METADATA: &str = "x-basalt-leader";

/// Why a monitor call failed.
#[derive(Debug, thiserror::Error)]
pub enum MonClientError {
    #[error("monitor address {0:?} is not host:port")]
    InvalidAddress(String),
    #[error("no monitor address given")]
    NoAddress,
    /// The monitors answered with an error that retrying cannot fix.
    #[error("{}", .0.message())]
    Status(Status),
    /// No monitor could complete the call within the retry budget.
    #[error("monitors unavailable after {attempts} attempts over {elapsed:?}: {last}")]
    Unavailable {
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
}

impl MonClientError {
    /// Returns the gRPC code of the failure (UNAVAILABLE when unreachable).
    pub fn code(&self) -> Code {
        match self {
            MonClientError::Status(status) => status.code(),
            MonClientError::Unavailable { .. } => Code::Unavailable,
            MonClientError::InvalidAddress(_) | MonClientError::NoAddress => Code::InvalidArgument,
        }
    }
}

/// A client of the monitor quorum.
pub struct MonClient {
    addrs: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    leader_hint: Mutex<Option<String>>,
    /// Deadline of one call to one monitor. Default 5 s.
    pub call_timeout: Duration,
    /// How long to keep retrying across monitors. Default 20 s.
    pub retry_for: Duration,
}

impl MonClient {
    /// A client of the monitors at `addrs` (`host:port` each). Connects lazily.
    pub fn new(addrs: &[String]) -> Result<MonClient, MonClientError> {
        if addrs.is_empty() {
            return Err(MonClientError::NoAddress);
        }
        for addr in addrs {
            if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
                return Err(MonClientError::InvalidAddress(addr.clone()));
            }
        }
        Ok(MonClient {
            addrs: addrs.to_vec(),
            channels: Mutex::new(HashMap::new()),
            leader_hint: Mutex::new(None),
            call_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(20),
        })
    }

    /// Parses a comma-separated list of monitor addresses.
    pub fn from_list(list: &str) -> Result<MonClient, MonClientError> {
        let addrs: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
        MonClient::new(&addrs)
    }

    /// Returns the monitor addresses.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    fn channel(&self, addr: &str) -> Result<Channel, MonClientError> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|_| MonClientError::InvalidAddress(addr.to_string()))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(self.call_timeout)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Calls `f` on a monitor, following the leader and retrying across
    /// monitors as described in the module docs.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, MonClientError>
    where
        F: FnMut(MonitorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut next = 0usize;
        let mut backoff = Duration::from_millis(50);
        let mut last: String;
        loop {
            let hint = self
                .leader_hint
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let addr = match hint {
                Some(addr) => addr,
                None => {
                    let addr = self.addrs[next % self.addrs.len()].clone();
                    next += 1;
                    addr
                }
            };
            attempts += 1;
            let client =
                MonitorClient::new(self.channel(&addr)?).max_decoding_message_size(256 << 20);
            let outcome = tokio::time::timeout(self.call_timeout, f(client)).await;
            let status = match outcome {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!("{addr} did not answer in time")),
            };
            let leader = status
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            match status.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
                    last = format!("{addr}: {}", status.message());
                    let redirected = leader.as_ref().is_some_and(|l| *l != addr);
                    *self.leader_hint.lock().unwrap_or_else(|e| e.into_inner()) = leader;
                    if started.elapsed() >= self.retry_for {
                        return Err(MonClientError::Unavailable {
                            attempts,
                            elapsed: started.elapsed(),
                            last,
                        });
                    }
                    if !redirected {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(250));
                    }
                }
                _ => return Err(MonClientError::Status(status)),
            }
        }
    }
}
