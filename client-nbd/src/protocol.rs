//! The NBD wire format: constants from the protocol document
//! (`doc/proto.md` of the NetworkBlockDevice project), request headers and
//! reply encoding. Pure code: no sockets, so every byte layout is unit-tested.

use bytes::{BufMut, Bytes, BytesMut};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR + 10;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TX_HAS_FLAGS: u16 = 1;
pub const TX_READ_ONLY: u16 = 1 << 1;
pub const TX_SEND_FLUSH: u16 = 1 << 2;
pub const TX_SEND_FUA: u16 = 1 << 3;
pub const TX_SEND_TRIM: u16 = 1 << 5;
pub const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TX_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TX_SEND_CACHE: u16 = 1 << 10;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Our one metadata context, `base:allocation`.
pub const ALLOCATION_CONTEXT: u32 = 1;
pub const ALLOCATION_CONTEXT_NAME: &str = "base:allocation";

/// Which headers a connection uses in transmission, as negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderStyle {
    /// 28-byte requests, simple replies.
    Simple,
    /// 28-byte requests, structured reply chunks (NBD_OPT_STRUCTURED_REPLY).
    Structured,
    /// 32-byte requests with 64-bit lengths, extended reply chunks
    /// (NBD_OPT_EXTENDED_HEADERS).
    Extended,
}

impl HeaderStyle {
    /// Returns the size of one request header.
    pub fn request_header_len(self) -> usize {
        match self {
            HeaderStyle::Simple | HeaderStyle::Structured => 28,
            HeaderStyle::Extended => 32,
        }
    }

    /// Returns the name used in logs.
    pub fn name(self) -> &'static str {
        match self {
            HeaderStyle::Simple => "simple",
            HeaderStyle::Structured => "structured",
            HeaderStyle::Extended => "extended",
        }
    }
}

/// One transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    /// The effect length (bytes read, written, trimmed, ...).
    pub length: u64,
    /// Bytes of payload that follow the header.
    pub payload_len: u64,
}

/// Why a request header could not be parsed: the connection must close.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad request magic {magic:#010x} for {style} headers")]
    Magic { magic: u32, style: &'static str },
}

impl Request {
    /// Parses a request header of `style` (exactly `style.request_header_len()` bytes).
    pub fn parse(style: HeaderStyle, header: &[u8]) -> Result<Request, HeaderError> {
        debug_assert_eq!(header.len(), style.request_header_len());
        let u16_at = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let u64_at = |at: usize| (u64::from(u32_at(at)) << 32) | u64::from(u32_at(at + 4));
        let magic = u32_at(0);
        let (expected, length) = match style {
            HeaderStyle::Simple | HeaderStyle::Structured => (REQUEST_MAGIC, u64::from(u32_at(24))),
            HeaderStyle::Extended => (EXTENDED_REQUEST_MAGIC, u64_at(24)),
        };
        if magic != expected {
            return Err(HeaderError::Magic {
                magic,
                style: style.name(),
            });
        }
        let flags = u16_at(4);
        let command = u16_at(6);
        // A write always carries its length in payload; with extended
        // headers any other command may too (NBD_CMD_FLAG_PAYLOAD_LEN).
        let payload_len = if command == CMD_WRITE
            || (style == HeaderStyle::Extended && flags & CMD_FLAG_PAYLOAD_LEN != 0)
        {
            length
        } else {
            0
        };
        Ok(Request {
            flags,
            command,
            cookie: u64_at(8),
            offset: u64_at(16),
            length,
            payload_len,
        })
    }

    /// Encodes this request (client side: tests and the kernel attach path).
    pub fn encode(&self, style: HeaderStyle) -> BytesMut {
        let mut out = BytesMut::with_capacity(style.request_header_len());
        let extended = style == HeaderStyle::Extended;
        out.put_u32(if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        });
        out.put_u16(self.flags);
        out.put_u16(self.command);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        if extended {
            out.put_u64(self.length);
        } else {
            out.put_u32(self.length as u32);
        }
        out
    }
}

/// What a request produced.
#[derive(Debug)]
pub enum Outcome {
    Done,
    Data(Bytes),
    /// Block status extents: (length, state flags).
    Extents(Vec<(u64, u32)>),
    Error(u32),
}

/// Encodes the header of the reply to request (`cookie`, `offset`) and the
/// payload bytes that precede any data; returns them with the data to send
/// after (reads), so read data is never copied into a header buffer.
pub fn encode_reply(
    style: HeaderStyle,
    cookie: u64,
    offset: u64,
    outcome: Outcome,
) -> (BytesMut, Option<Bytes>) {
    let mut out = BytesMut::with_capacity(64);
    if style == HeaderStyle::Simple {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        match outcome {
            Outcome::Error(error) => {
                out.put_u32(error);
                out.put_u64(cookie);
                return (out, None);
            }
            Outcome::Data(data) => {
                out.put_u32(0);
                out.put_u64(cookie);
                return (out, Some(data));
            }
            Outcome::Done | Outcome::Extents(_) => {
                out.put_u32(0);
                out.put_u64(cookie);
                return (out, None);
            }
        }
    }
    let (kind, payload, data): (u16, BytesMut, Option<Bytes>) = match outcome {
        Outcome::Done => (REPLY_TYPE_NONE, BytesMut::new(), None),
        Outcome::Data(data) => {
            let mut payload = BytesMut::with_capacity(8);
            payload.put_u64(offset);
            (REPLY_TYPE_OFFSET_DATA, payload, Some(data))
        }
        Outcome::Extents(extents) if style == HeaderStyle::Extended => {
            let mut payload = BytesMut::with_capacity(8 + 16 * extents.len());
            payload.put_u32(ALLOCATION_CONTEXT);
            payload.put_u32(extents.len() as u32);
            for (length, flags) in extents {
                payload.put_u64(length);
                payload.put_u64(u64::from(flags));
            }
            (REPLY_TYPE_BLOCK_STATUS_EXT, payload, None)
        }
        Outcome::Extents(extents) => {
            let mut payload = BytesMut::with_capacity(4 + 8 * extents.len());
            payload.put_u32(ALLOCATION_CONTEXT);
            for (length, flags) in extents {
                // Callers never produce an extent above 32 bits without
                // extended headers (one object at most, see `transmission`).
                debug_assert!(length <= u64::from(u32::MAX));
                payload.put_u32(length as u32);
                payload.put_u32(flags);
            }
            (REPLY_TYPE_BLOCK_STATUS, payload, None)
        }
        Outcome::Error(error) => {
            let mut payload = BytesMut::with_capacity(6);
            payload.put_u32(error);
            payload.put_u16(0);
            (REPLY_TYPE_ERROR, payload, None)
        }
    };
    let total = payload.len() as u64 + data.as_ref().map_or(0, |d| d.len() as u64);
    if style == HeaderStyle::Extended {
        out.put_u32(EXTENDED_REPLY_MAGIC);
        out.put_u16(REPLY_FLAG_DONE);
        out.put_u16(kind);
        out.put_u64(cookie);
        out.put_u64(offset);
        out.put_u64(total);
    } else {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(REPLY_FLAG_DONE);
        out.put_u16(kind);
        out.put_u64(cookie);
        out.put_u32(total as u32);
    }
    out.put_slice(&payload);
    (out, data)
}

/// Encodes an option reply of the negotiation phase.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(20 + data.len());
    buf.put_u64(REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(kind);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
    buf
}

/// Parses a meta-context request: export name, then the queries. Returns
/// `None` when the lengths inside do not add up.
pub fn meta_queries(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut cursor = data;
    let take_u32 = |cursor: &mut &[u8]| -> Option<u32> {
        let (head, rest) = cursor.split_at_checked(4)?;
        *cursor = rest;
        Some(u32::from_be_bytes([head[0], head[1], head[2], head[3]]))
    };
    let name_len = take_u32(&mut cursor)? as usize;
    let (name, rest) = cursor.split_at_checked(name_len)?;
    let name = String::from_utf8_lossy(name).into_owned();
    cursor = rest;
    let count = take_u32(&mut cursor)?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = take_u32(&mut cursor)? as usize;
        let (query, rest) = cursor.split_at_checked(len)?;
        queries.push(String::from_utf8_lossy(query).into_owned());
        cursor = rest;
    }
    cursor.is_empty().then_some((name, queries))
}

/// Parses the data of NBD_OPT_INFO / NBD_OPT_GO: the export name and the
/// information types the client asked for. `None` if malformed.
pub fn info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let (len, rest) = data.split_at_checked(4)?;
    let name_len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let (name, rest) = rest.split_at_checked(name_len)?;
    let (count, rest) = rest.split_at_checked(2)?;
    let count = u16::from_be_bytes([count[0], count[1]]) as usize;
    if rest.len() != count * 2 {
        return None;
    }
    let requested = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((String::from_utf8_lossy(name).into_owned(), requested))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn compact_and_extended_requests_round_trip() {
        let request = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 8192,
            payload_len: 8192,
        };
        for style in [HeaderStyle::Simple, HeaderStyle::Extended] {
            let bytes = request.encode(style);
            assert_eq!(bytes.len(), style.request_header_len());
            assert_eq!(Request::parse(style, &bytes).unwrap(), request);
        }
        // A 64-bit trim length survives only in extended headers.
        let trim = Request {
            flags: 0,
            command: CMD_TRIM,
            cookie: 9,
            offset: 0,
            length: 5 << 30,
            payload_len: 0,
        };
        let parsed = Request::parse(HeaderStyle::Extended, &trim.encode(HeaderStyle::Extended));
        assert_eq!(parsed.unwrap().length, 5 << 30);
    }

    #[test]
    fn wrong_magic_for_the_negotiated_style_is_refused() {
        let request = Request {
            flags: 0,
            command: CMD_READ,
            cookie: 1,
            offset: 0,
            length: 4096,
            payload_len: 0,
        };
        let mut compact = request.encode(HeaderStyle::Simple).to_vec();
        compact.extend_from_slice(&[0; 4]);
        assert!(matches!(
            Request::parse(HeaderStyle::Extended, &compact),
            Err(HeaderError::Magic { .. })
        ));
        let extended = request.encode(HeaderStyle::Extended);
        assert!(Request::parse(HeaderStyle::Structured, &extended[..28]).is_err());
    }

    #[test]
    fn payload_len_flag_carries_payload_only_with_extended_headers() {
        let status = Request {
            flags: CMD_FLAG_PAYLOAD_LEN,
            command: CMD_BLOCK_STATUS,
            cookie: 1,
            offset: 0,
            length: 16,
            payload_len: 16,
        };
        let bytes = status.encode(HeaderStyle::Extended);
        assert_eq!(
            Request::parse(HeaderStyle::Extended, &bytes)
                .unwrap()
                .payload_len,
            16
        );
        let bytes = status.encode(HeaderStyle::Structured);
        assert_eq!(
            Request::parse(HeaderStyle::Structured, &bytes)
                .unwrap()
                .payload_len,
            0
        );
    }

    #[test]
    fn replies_use_the_negotiated_layout() {
        let data = Bytes::from_static(&[7u8; 4096]);
        let (head, tail) = encode_reply(HeaderStyle::Simple, 5, 0, Outcome::Data(data.clone()));
        assert_eq!(
            &head[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]
        );
        assert_eq!(tail.unwrap().len(), 4096);

        let (head, tail) = encode_reply(
            HeaderStyle::Structured,
            5,
            8192,
            Outcome::Data(data.clone()),
        );
        assert_eq!(head.len(), 20 + 8);
        assert_eq!(&head[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&head[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&head[16..20], &(8 + 4096u32).to_be_bytes());
        assert_eq!(&head[20..28], &8192u64.to_be_bytes());
        assert!(tail.is_some());

        let (head, tail) = encode_reply(HeaderStyle::Extended, 5, 8192, Outcome::Data(data));
        assert_eq!(head.len(), 32 + 8);
        assert_eq!(&head[0..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&head[16..24], &8192u64.to_be_bytes());
        assert_eq!(&head[24..32], &(8 + 4096u64).to_be_bytes());
        assert!(tail.is_some());

        // An error in extended style: error chunk with a zero-length message.
        let (head, _) = encode_reply(HeaderStyle::Extended, 6, 0, Outcome::Error(EINVAL));
        assert_eq!(&head[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&head[24..32], &6u64.to_be_bytes());
        assert_eq!(&head[32..36], &EINVAL.to_be_bytes());
    }

    #[test]
    fn block_status_is_64_bit_only_with_extended_headers() {
        let extents = vec![(5u64 << 30, STATE_HOLE | STATE_ZERO), (4096, 0)];
        let (head, _) = encode_reply(
            HeaderStyle::Extended,
            1,
            0,
            Outcome::Extents(extents.clone()),
        );
        assert_eq!(&head[6..8], &REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
        assert_eq!(&head[24..32], &(8 + 2 * 16u64).to_be_bytes());
        assert_eq!(&head[36..40], &2u32.to_be_bytes());
        assert_eq!(&head[40..48], &(5u64 << 30).to_be_bytes());
        let narrow = vec![(8192u64, 0u32)];
        let (head, _) = encode_reply(HeaderStyle::Structured, 1, 0, Outcome::Extents(narrow));
        assert_eq!(&head[6..8], &REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        assert_eq!(head.len(), 20 + 4 + 8);
    }

    #[test]
    fn malformed_option_data_is_rejected_not_panicked_on() {
        assert_eq!(info_request(&[]), None);
        assert_eq!(info_request(&[0, 0, 0, 9, b'a']), None);
        assert_eq!(info_request(&[0, 0, 0, 1, b'a', 0, 2, 0, 3]), None);
        assert_eq!(
            info_request(&[0, 0, 0, 1, b'a', 0, 1, 0, 3]),
            Some(("a".into(), vec![INFO_BLOCK_SIZE]))
        );
        assert_eq!(meta_queries(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]), None);
        let mut good = vec![0, 0, 0, 1, b'v', 0, 0, 0, 1, 0, 0, 0, 15];
        good.extend_from_slice(ALLOCATION_CONTEXT_NAME.as_bytes());
        assert_eq!(
            meta_queries(&good),
            Some(("v".into(), vec![ALLOCATION_CONTEXT_NAME.to_string()]))
        );
    }
}
