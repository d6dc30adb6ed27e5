//! The check behind the `frame_decode` fuzz target, shared with the corpus replay test
//! `crates/proto/tests/fuzz_corpus.rs` (included there with `#[path]`).
//!
//! Input: byte 0 picks the frame limit, byte 1 the read chunk size; the rest is what a
//! peer sent on the socket. Checked:
//! - decoding never panics and never buffers (reserves) beyond the frame limit;
//! - the frames decoded, and whether the stream ends in an error, do not depend on how
//!   the bytes were split into reads (one read versus chunks of 1..=256 bytes);
//! - every decoded frame re-encodes, and decodes back to itself, in `encoded_len` bytes.

use bytes::BytesMut;
use tern_proto::{encoded_len, Frame, FrameCodec, DEFAULT_MAX_FRAME_BYTES};
use tokio_util::codec::{Decoder, Encoder};

const LIMITS: [u32; 4] = [64, 4096, 1 << 20, DEFAULT_MAX_FRAME_BYTES];

/// What a stream decodes to: its frames, then whether it stopped at an error.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    error: bool,
}

fn decode_stream(max: u32, data: &[u8], chunk: usize) -> Outcome {
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    // A frame is at most 4 + max bytes; a read adds at most `chunk` bytes more. BytesMut
    // may round up when it grows, hence the factor 2.
    let bound = 2 * (4 + max as usize + chunk) + 64;
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(buf.len() < before, "a decoded frame consumed no bytes");
                    frames.push(frame);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                    assert!(
                        buf.capacity() <= bound,
                        "buffer capacity {} beyond the bound {bound} (max frame {max})",
                        buf.capacity()
                    );
                    break;
                }
                Err(_) => {
                    return Outcome {
                        frames,
                        error: true,
                    }
                }
            }
        }
    }
    Outcome {
        frames,
        error: false,
    }
}

pub fn check(data: &[u8]) {
    let (max, chunk, stream) = match data {
        [a, b, rest @ ..] => (
            LIMITS[usize::from(*a) % LIMITS.len()],
            usize::from(*b) + 1,
            rest,
        ),
        _ => (DEFAULT_MAX_FRAME_BYTES, 1, data),
    };
    let whole = decode_stream(max, stream, stream.len().max(1));
    let chunked = decode_stream(max, stream, chunk);
    assert_eq!(
        whole, chunked,
        "decoding depends on how the bytes were read"
    );

    let mut codec = FrameCodec::new(max);
    for frame in &whole.frames {
        let mut out = BytesMut::new();
        codec
            .encode(frame.clone(), &mut out)
            .unwrap_or_else(|e| panic!("a decoded frame does not re-encode: {e}: {frame:?}"));
        assert_eq!(
            out.len(),
            encoded_len(frame),
            "encoded_len disagrees with encode"
        );
        let back = codec
            .decode(&mut out)
            .unwrap_or_else(|e| panic!("a re-encoded frame does not decode: {e}: {frame:?}"));
        assert_eq!(
            back.as_ref(),
            Some(frame),
            "re-encoded frame decodes differently"
        );
        assert!(out.is_empty(), "re-encoded frame left bytes behind");
    }
}
