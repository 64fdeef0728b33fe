//! Attaching a volume to the kernel's NBD client (/dev/nbdX), the way
//! `nbd-client -N` does it with netlink: we connect to a gateway, run the
//! handshake ourselves (NBD_OPT_GO, simple replies: the kernel speaks no
//! structured replies), then hand the connected socket to the kernel with a
//! generic-netlink NBD_CMD_CONNECT. The kernel keeps its own reference to the
//! socket; nothing of ours stays running. `unmap` sends NBD_CMD_DISCONNECT.
//!
//! Machines without the `nbd` module have no "nbd" generic-netlink family:
//! that is detected first and reported as [`KernelError::ModuleMissing`].
//! Rejected: the old ioctl interface (NBD_SET_SOCK + a process blocked in
//! NBD_DO_IT for the device's lifetime) — netlink needs no resident process.
//!
//! Message encoding and parsing are pure functions, unit-tested here; the
//! syscalls are at the edge (`NetlinkSocket`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::protocol::*;

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NBD_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// Why attaching or detaching failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "the kernel's nbd driver is not available on this machine (no \"nbd\" generic-netlink \
         family): load it with `modprobe nbd` where the module exists; containers and VMs \
         without loadable modules cannot attach /dev/nbd devices, use nbd:// clients instead"
    )]
    ModuleMissing,
    #[error("netlink: {0}")]
    Netlink(std::io::Error),
    #[error("kernel refused {operation}: {source}")]
    Refused {
        operation: &'static str,
        source: std::io::Error,
    },
    #[error("connect to gateway {addr}: {source}")]
    Gateway {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gateway {addr} refused export {export:?}: {message}")]
    Export {
        addr: SocketAddr,
        export: String,
        message: String,
    },
    #[error("malformed netlink reply: {0}")]
    Malformed(String),
    #[error("no /dev/nbd device is attached to {0:?}")]
    NotMapped(String),
}

/// What the handshake told us about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub flags: u16,
    pub block_bytes: u32,
}

/// Connects to the gateway at `addr` and negotiates `export` with
/// NBD_OPT_GO, leaving the socket at the start of transmission with simple
/// replies, as the kernel expects it.
pub fn handshake(addr: SocketAddr, export: &str) -> Result<(TcpStream, ExportInfo), KernelError> {
    let gateway = |source| KernelError::Gateway { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(gateway)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(gateway)?;
    let _ = stream.set_nodelay(true);
    let mut hello = [0u8; 18];
    stream.read_exact(&mut hello).map_err(gateway)?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().unwrap_or_default());
    let opt = u64::from_be_bytes(hello[8..16].try_into().unwrap_or_default());
    let flags = u16::from_be_bytes([hello[16], hello[17]]);
    if magic != NBDMAGIC || opt != IHAVEOPT || flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(KernelError::Export {
            addr,
            export: export.into(),
            message: "not a fixed-newstyle NBD server".into(),
        });
    }
    let mut request = Vec::new();
    request.extend_from_slice(
        &(CLIENT_FIXED_NEWSTYLE | (u32::from(flags) & CLIENT_NO_ZEROES)).to_be_bytes(),
    );
    request.extend_from_slice(&IHAVEOPT.to_be_bytes());
    request.extend_from_slice(&OPT_GO.to_be_bytes());
    let data_len = 4 + export.len() + 2 + 2;
    request.extend_from_slice(&(data_len as u32).to_be_bytes());
    request.extend_from_slice(&(export.len() as u32).to_be_bytes());
    request.extend_from_slice(export.as_bytes());
    request.extend_from_slice(&1u16.to_be_bytes());
    request.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    stream.write_all(&request).map_err(gateway)?;
    let mut info = ExportInfo {
        size_bytes: 0,
        flags: 0,
        block_bytes: 512,
    };
    loop {
        let mut head = [0u8; 20];
        stream.read_exact(&mut head).map_err(gateway)?;
        let kind = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
        let len = u32::from_be_bytes([head[16], head[17], head[18], head[19]]);
        if len > 64 * 1024 {
            return Err(KernelError::Export {
                addr,
                export: export.into(),
                message: format!("option reply of {len} bytes"),
            });
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).map_err(gateway)?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 12 && data[0..2] == INFO_EXPORT.to_be_bytes() => {
                info.size_bytes = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                info.flags = u16::from_be_bytes([data[10], data[11]]);
            }
            REP_INFO if data.len() >= 14 && data[0..2] == INFO_BLOCK_SIZE.to_be_bytes() => {
                // The preferred block size, capped to what the kernel takes.
                let preferred = u32::from_be_bytes([data[6], data[7], data[8], data[9]]);
                info.block_bytes = preferred.clamp(512, 4096);
            }
            REP_INFO => {}
            error => {
                return Err(KernelError::Export {
                    addr,
                    export: export.into(),
                    message: format!(
                        "option error {error:#x}: {}",
                        String::from_utf8_lossy(&data)
                    ),
                });
            }
        }
    }
    stream.set_read_timeout(None).map_err(gateway)?;
    Ok((stream, info))
}

/// Attaches `export` of the gateway at `addr` to a free /dev/nbdX (or
/// `index`); returns the device index.
pub fn map(addr: SocketAddr, export: &str, index: Option<u32>) -> Result<u32, KernelError> {
    // Fail before touching the gateway when the driver is not there.
    let socket = NetlinkSocket::open()?;
    let family = socket.resolve_family(NBD_FAMILY_NAME)?;
    let (stream, info) = handshake(addr, export)?;
    let backend = format!("basalt:{addr}/{export}");
    let message = encode_connect(
        family,
        1,
        &ConnectParams {
            index,
            size_bytes: info.size_bytes,
            block_bytes: info.block_bytes,
            server_flags: info.flags,
            timeout_seconds: 60,
            socket_fd: stream.as_raw_fd() as u32,
            backend: &backend,
        },
    );
    let replies = socket.request(&message)?;
    for reply in &replies {
        if let NetlinkReply::Error(errno) = reply
            && *errno != 0
        {
            return Err(KernelError::Refused {
                operation: "NBD_CMD_CONNECT",
                source: std::io::Error::from_raw_os_error(-errno),
            });
        }
    }
    // The kernel holds its own reference to the socket now.
    drop(stream);
    replies
        .iter()
        .find_map(|reply| match reply {
            NetlinkReply::Message { attributes, .. } => attributes
                .iter()
                .find(|(kind, _)| *kind == NBD_ATTR_INDEX)
                .and_then(|(_, value)| value.get(..4))
                .map(|v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]])),
            NetlinkReply::Error(_) => None,
        })
        .or(index)
        .ok_or_else(|| KernelError::Malformed("CONNECT reply without a device index".into()))
}

/// Detaches /dev/nbd`index`.
pub fn unmap(index: u32) -> Result<(), KernelError> {
    let socket = NetlinkSocket::open()?;
    let family = socket.resolve_family(NBD_FAMILY_NAME)?;
    let message = encode_disconnect(family, 1, index);
    for reply in socket.request(&message)? {
        if let NetlinkReply::Error(errno) = reply
            && errno != 0
        {
            return Err(KernelError::Refused {
                operation: "NBD_CMD_DISCONNECT",
                source: std::io::Error::from_raw_os_error(-errno),
            });
        }
    }
    Ok(())
}

/// Returns the index of the /dev/nbdX attached to `export` by `map`, read
/// from the backend identifier the kernel shows in sysfs.
pub fn find_mapped(export: &str) -> Result<u32, KernelError> {
    let suffix = format!("/{export}");
    let entries = std::fs::read_dir("/sys/block").map_err(KernelError::Netlink)?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(index) = name.strip_prefix("nbd").and_then(|i| i.parse::<u32>().ok()) else {
            continue;
        };
        let backend = std::fs::read_to_string(entry.path().join("backend")).unwrap_or_default();
        let backend = backend.trim();
        if backend.starts_with("basalt:") && backend.ends_with(&suffix) {
            return Ok(index);
        }
    }
    Err(KernelError::NotMapped(export.into()))
}

/// Parameters of NBD_CMD_CONNECT.
pub struct ConnectParams<'a> {
    pub index: Option<u32>,
    pub size_bytes: u64,
    pub block_bytes: u32,
    pub server_flags: u16,
    pub timeout_seconds: u64,
    pub socket_fd: u32,
    pub backend: &'a str,
}

/// Builds netlink messages: header, generic header, attributes.
struct MessageBuilder {
    bytes: Vec<u8>,
    nests: Vec<usize>,
}

impl MessageBuilder {
    fn new(kind: u16, flags: u16, seq: u32, command: u8, version: u8) -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        bytes.extend_from_slice(&[command, version, 0, 0]);
        MessageBuilder {
            bytes,
            nests: Vec::new(),
        }
    }

    fn attribute(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.bytes.extend_from_slice(&(len as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.pad();
        self
    }

    fn begin_nest(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.bytes.len());
        self.bytes.extend_from_slice(&0u16.to_ne_bytes());
        self.bytes
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn end_nest(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("end_nest follows begin_nest");
        let len = (self.bytes.len() - start) as u16;
        self.bytes[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        assert!(self.nests.is_empty(), "every nest is closed");
        let len = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&len.to_ne_bytes());
        self.bytes
    }
}

fn encode_get_family(seq: u32, name: &str) -> Vec<u8> {
    let mut message = MessageBuilder::new(GENL_ID_CTRL, NLM_F_REQUEST, seq, CTRL_CMD_GETFAMILY, 1);
    let mut value = name.as_bytes().to_vec();
    value.push(0);
    message.attribute(CTRL_ATTR_FAMILY_NAME, &value);
    message.finish()
}

/// Encodes NBD_CMD_CONNECT for the "nbd" family `family`.
pub fn encode_connect(family: u16, seq: u32, params: &ConnectParams<'_>) -> Vec<u8> {
    let mut message = MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_CONNECT,
        NBD_GENL_VERSION,
    );
    if let Some(index) = params.index {
        message.attribute(NBD_ATTR_INDEX, &index.to_ne_bytes());
    }
    message
        .attribute(NBD_ATTR_SIZE_BYTES, &params.size_bytes.to_ne_bytes())
        .attribute(
            NBD_ATTR_BLOCK_SIZE_BYTES,
            &u64::from(params.block_bytes).to_ne_bytes(),
        )
        .attribute(
            NBD_ATTR_SERVER_FLAGS,
            &u64::from(params.server_flags).to_ne_bytes(),
        )
        .attribute(NBD_ATTR_TIMEOUT, &params.timeout_seconds.to_ne_bytes())
        .begin_nest(NBD_ATTR_SOCKETS)
        .begin_nest(NBD_SOCK_ITEM)
        .attribute(NBD_SOCK_FD, &params.socket_fd.to_ne_bytes())
        .end_nest()
        .end_nest();
    let mut backend = params.backend.as_bytes().to_vec();
    backend.push(0);
    message.attribute(NBD_ATTR_BACKEND_IDENTIFIER, &backend);
    message.finish()
}

fn encode_disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut message = MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_DISCONNECT,
        NBD_GENL_VERSION,
    );
    message.attribute(NBD_ATTR_INDEX, &index.to_ne_bytes());
    message.finish()
}

/// One message the kernel sent back.
#[derive(Debug, PartialEq, Eq)]
enum NetlinkReply {
    /// NLMSG_ERROR: 0 is an acknowledgement, else a negative errno.
    Error(i32),
    /// A generic-netlink message and its top-level attributes.
    Message {
        kind: u16,
        attributes: Vec<(u16, Vec<u8>)>,
    },
}

/// Parses every message in one datagram; never panics on short input.
fn parse_replies(mut buf: &[u8]) -> Result<Vec<NetlinkReply>, KernelError> {
    let mut replies = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(KernelError::Malformed(format!("message length {len}")));
        }
        let body = &buf[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_ERROR => {
                let code = body
                    .get(..4)
                    .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .ok_or_else(|| KernelError::Malformed("short error message".into()))?;
                replies.push(NetlinkReply::Error(code));
            }
            NLMSG_DONE => {}
            _ => {
                let mut attributes = Vec::new();
                let mut rest = body.get(GENL_HDRLEN..).unwrap_or_default();
                while rest.len() >= 4 {
                    let attr_len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
                    let attr_kind = u16::from_ne_bytes([rest[2], rest[3]]) & !NLA_F_NESTED;
                    if attr_len < 4 || attr_len > rest.len() {
                        return Err(KernelError::Malformed(format!(
                            "attribute length {attr_len}"
                        )));
                    }
                    attributes.push((attr_kind, rest[4..attr_len].to_vec()));
                    let padded = attr_len.div_ceil(4) * 4;
                    rest = rest.get(padded..).unwrap_or_default();
                }
                replies.push(NetlinkReply::Message { kind, attributes });
            }
        }
        let padded = len.div_ceil(4) * 4;
        buf = buf.get(padded..).unwrap_or_default();
    }
    Ok(replies)
}

/// A NETLINK_GENERIC socket.
struct NetlinkSocket {
    fd: OwnedFd,
}

impl NetlinkSocket {
    fn open() -> Result<Self, KernelError> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(KernelError::Netlink(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a valid timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(NetlinkSocket { fd })
    }

    /// Sends `message` to the kernel and returns its replies (up to the
    /// acknowledgement or error).
    fn request(&self, message: &[u8]) -> Result<Vec<NetlinkReply>, KernelError> {
        // SAFETY: sockaddr_nl is plain data; zeroed means "the kernel".
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: message and kernel outlive the call; lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(KernelError::Netlink(std::io::Error::last_os_error()));
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is writable for its length.
            let got =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got < 0 {
                return Err(KernelError::Netlink(std::io::Error::last_os_error()));
            }
            let batch = parse_replies(&buf[..got as usize])?;
            let finished = batch
                .iter()
                .any(|reply| matches!(reply, NetlinkReply::Error(_)))
                || message_flags(message) & NLM_F_ACK == 0;
            replies.extend(batch);
            if finished {
                return Ok(replies);
            }
        }
    }

    /// Returns the id of generic-netlink family `name`.
    fn resolve_family(&self, name: &str) -> Result<u16, KernelError> {
        for reply in self.request(&encode_get_family(0, name))? {
            match reply {
                NetlinkReply::Error(errno) if -errno == libc::ENOENT => {
                    return Err(KernelError::ModuleMissing);
                }
                NetlinkReply::Error(0) => {}
                NetlinkReply::Error(errno) => {
                    return Err(KernelError::Netlink(std::io::Error::from_raw_os_error(
                        -errno,
                    )));
                }
                NetlinkReply::Message { attributes, .. } => {
                    if let Some(id) = attributes
                        .iter()
                        .find(|(kind, _)| *kind == CTRL_ATTR_FAMILY_ID)
                        .and_then(|(_, v)| v.get(..2))
                    {
                        return Ok(u16::from_ne_bytes([id[0], id[1]]));
                    }
                }
            }
        }
        Err(KernelError::ModuleMissing)
    }
}

fn message_flags(message: &[u8]) -> u16 {
    u16::from_ne_bytes([message[6], message[7]])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn attrs(mut rest: &[u8]) -> Vec<(u16, bool, Vec<u8>)> {
        let mut out = Vec::new();
        while rest.len() >= 4 {
            let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
            let kind = u16::from_ne_bytes([rest[2], rest[3]]);
            out.push((
                kind & !NLA_F_NESTED,
                kind & NLA_F_NESTED != 0,
                rest[4..len].to_vec(),
            ));
            rest = &rest[len.div_ceil(4) * 4..];
        }
        out
    }

    #[test]
    fn connect_message_carries_the_socket_nested_twice() {
        let message = encode_connect(
            0x1234,
            7,
            &ConnectParams {
                index: None,
                size_bytes: 1 << 30,
                block_bytes: 4096,
                server_flags: 0x1ed,
                timeout_seconds: 60,
                socket_fd: 9,
                backend: "basalt:127.0.1.1:10809/vm1",
            },
        );
        assert_eq!(message.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(message[0..4].try_into().unwrap()) as usize,
            message.len()
        );
        assert_eq!(u16::from_ne_bytes([message[4], message[5]]), 0x1234);
        assert_eq!(message[16], NBD_CMD_CONNECT);
        let top = attrs(&message[20..]);
        let kinds: Vec<u16> = top.iter().map(|(k, _, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                NBD_ATTR_SIZE_BYTES,
                NBD_ATTR_BLOCK_SIZE_BYTES,
                NBD_ATTR_SERVER_FLAGS,
                NBD_ATTR_TIMEOUT,
                NBD_ATTR_SOCKETS,
                NBD_ATTR_BACKEND_IDENTIFIER
            ]
        );
        assert_eq!(top[0].2, (1u64 << 30).to_ne_bytes());
        let (_, nested, sockets) = &top[4];
        assert!(nested);
        let items = attrs(sockets);
        assert_eq!(items.len(), 1);
        assert_eq!((items[0].0, items[0].1), (NBD_SOCK_ITEM, true));
        let fds = attrs(&items[0].2);
        assert_eq!(fds, vec![(NBD_SOCK_FD, false, 9u32.to_ne_bytes().to_vec())]);
        assert_eq!(top[5].2.last(), Some(&0), "backend is NUL-terminated");
    }

    #[test]
    fn replies_parse_and_garbage_is_an_error_not_a_panic() {
        // An NLMSG_ERROR carrying -ENOENT (what a missing family looks like).
        let mut error = Vec::new();
        error.extend_from_slice(&36u32.to_ne_bytes());
        error.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error.extend_from_slice(&[0; 10]);
        error.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        error.extend_from_slice(&[0; 16]);
        assert_eq!(
            parse_replies(&error).unwrap(),
            vec![NetlinkReply::Error(-libc::ENOENT)]
        );
        // A family reply with the id attribute.
        let mut family = MessageBuilder::new(GENL_ID_CTRL, 0, 1, 1, 1);
        family.attribute(CTRL_ATTR_FAMILY_ID, &0x22u16.to_ne_bytes());
        let bytes = family.finish();
        let parsed = parse_replies(&bytes).unwrap();
        assert_eq!(
            parsed,
            vec![NetlinkReply::Message {
                kind: GENL_ID_CTRL,
                attributes: vec![(CTRL_ATTR_FAMILY_ID, 0x22u16.to_ne_bytes().to_vec())]
            }]
        );
        for cut in 0..bytes.len() {
            let _ = parse_replies(&bytes[..cut]);
        }
        let mut lying = bytes.clone();
        lying[0..4].copy_from_slice(&4096u32.to_ne_bytes());
        assert!(parse_replies(&lying).is_err());
    }
}
