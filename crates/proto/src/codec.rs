//! Length-prefixed codec. (Implementation pending.)
use crate::Frame;
use bytes::BytesMut;

/// Default bound on one frame (length field value): 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u32 },
    #[error("malformed frame type 0x{frame_type:02x}: {reason}")]
    Malformed { frame_type: u8, reason: String },
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
}

/// Encodes and decodes [`Frame`]s; rejects frames larger than `max_frame_bytes`.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    pub max_frame_bytes: u32,
}

impl FrameCodec {
    pub fn new(max_frame_bytes: u32) -> Self {
        FrameCodec { max_frame_bytes }
    }
}

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = ProtoError;
    fn decode(&mut self, _src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        todo!()
    }
}

impl tokio_util::codec::Encoder<Frame> for FrameCodec {
    type Error = ProtoError;
    fn encode(&mut self, _item: Frame, _dst: &mut BytesMut) -> Result<(), ProtoError> {
        todo!()
    }
}
