//! Feeds arbitrary bytes to the frame decoder, in arbitrary splits: it must
//! return frames, ask for more, or report a protocol error, never panic, and
//! every frame it returns must parse its op header without panicking.
#![no_main]

use basalt_wire::{FrameCodec, OpHeader};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize) % (data.len() + 1);
    let mut codec = FrameCodec::default();
    let mut buffer = BytesMut::from(&data[..split]);
    let mut rest = &data[split..];
    loop {
        match codec.decode(&mut buffer) {
            Ok(Some(frame)) => {
                let _ = OpHeader::decode(frame.payload);
            }
            Ok(None) => {
                if rest.is_empty() {
                    break;
                }
                let take = rest.len().min(97);
                buffer.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
            }
            Err(_) => break,
        }
    }
});
