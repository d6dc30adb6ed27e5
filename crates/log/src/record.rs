//! Record framing: `u32 BE body length | u32 BE CRC32C(body) | body`, where body =
//! `u64 index | u64 term | u8 kind | u32 context length | context | data`.

use crate::Entry;
use bytes::{BufMut, Bytes};

/// Body length + CRC.
pub const HEADER_BYTES: usize = 8;
/// index + term + kind + context length.
pub const BODY_FIXED_BYTES: usize = 8 + 8 + 1 + 4;
/// `kind` of a sync marker: a record with no context and no data whose index repeats
/// the last entry's (or `first_index - 1` in an empty segment). `Log::sync` writes one
/// after the data it makes durable, in the same fdatasync. A bad record followed by a
/// valid marker therefore lies inside synced data: that is corruption, not a torn write.
pub const MARKER_KIND: u8 = 0xFF;

/// Body bytes of `e` (what `max_record_bytes` limits and `body length` records).
pub fn body_len(e: &Entry) -> u64 {
    (BODY_FIXED_BYTES + e.context.len() + e.data.len()) as u64
}

/// Bytes `e` takes on disk.
pub fn encoded_len(e: &Entry) -> u64 {
    HEADER_BYTES as u64 + body_len(e)
}

pub fn marker(index: u64) -> Entry {
    Entry {
        index,
        term: 0,
        kind: MARKER_KIND,
        context: Bytes::new(),
        data: Bytes::new(),
    }
}

pub fn is_marker(e: &Entry) -> bool {
    e.kind == MARKER_KIND && e.context.is_empty() && e.data.is_empty()
}

/// Appends the encoding of `e` to `out`. The caller has checked the size limit, which
/// keeps every length within u32.
pub fn encode(e: &Entry, out: &mut Vec<u8>) {
    let body_bytes = body_len(e);
    assert!(
        body_bytes <= u64::from(u32::MAX),
        "record length checked by the caller"
    );
    let start = out.len();
    out.reserve(HEADER_BYTES + body_bytes as usize);
    out.put_u32(body_bytes as u32);
    out.put_u32(0); // CRC, filled in once the body is in place.
    let body_start = out.len();
    out.put_u64(e.index);
    out.put_u64(e.term);
    out.put_u8(e.kind);
    out.put_u32(e.context.len() as u32);
    out.put_slice(&e.context);
    out.put_slice(&e.data);
    let crc = crc32c::crc32c(&out[body_start..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    debug_assert_eq!((out.len() - start) as u64, encoded_len(e));
}

/// Why a record at some offset could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum Defect {
    /// Fewer bytes left than the header or body claims: typical of a torn write.
    Incomplete,
    /// A length that can't be right (too small, over the limit, or a context longer
    /// than the body).
    Length(u64),
    /// The checksum does not match the body.
    Checksum,
}

impl std::fmt::Display for Defect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Defect::Incomplete => write!(f, "incomplete record"),
            Defect::Length(n) => write!(f, "implausible length {n}"),
            Defect::Checksum => write!(f, "checksum mismatch"),
        }
    }
}

fn u32_at(buf: &[u8], pos: usize) -> u32 {
    u32::from_be_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]])
}

fn u64_at(buf: &[u8], pos: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&buf[pos..pos + 8]);
    u64::from_be_bytes(raw)
}

/// Parses the record at `buf[pos..]`; returns the entry and the record's total size.
/// Context and data are zero-copy slices of `buf`. A record is returned only if its
/// checksum matches.
pub fn decode(buf: &Bytes, pos: usize, max_record_bytes: u32) -> Result<(Entry, usize), Defect> {
    let rest_bytes = buf.len().saturating_sub(pos);
    if rest_bytes < HEADER_BYTES {
        return Err(Defect::Incomplete);
    }
    let body_bytes = u32_at(buf, pos) as usize;
    if body_bytes < BODY_FIXED_BYTES || body_bytes as u64 > u64::from(max_record_bytes) {
        return Err(Defect::Length(body_bytes as u64));
    }
    if rest_bytes < HEADER_BYTES + body_bytes {
        return Err(Defect::Incomplete);
    }
    let crc = u32_at(buf, pos + 4);
    let body_start = pos + HEADER_BYTES;
    let body = &buf[body_start..body_start + body_bytes];
    if crc32c::crc32c(body) != crc {
        return Err(Defect::Checksum);
    }
    let context_bytes = u32_at(body, 17) as usize;
    if context_bytes > body_bytes - BODY_FIXED_BYTES {
        // The checksum matched, so it was written like this; still refuse it.
        return Err(Defect::Length(context_bytes as u64));
    }
    let context_start = body_start + BODY_FIXED_BYTES;
    let entry = Entry {
        index: u64_at(body, 0),
        term: u64_at(body, 8),
        kind: body[16],
        context: buf.slice(context_start..context_start + context_bytes),
        data: buf.slice(context_start + context_bytes..body_start + body_bytes),
    };
    Ok((entry, HEADER_BYTES + body_bytes))
}

/// Used when scanning past a bad record in the last segment: does a valid sync marker
/// for index `after` or later start at `buf[pos..]`? Only markers count as evidence of
/// corruption: every synced record is followed by one, while valid *entries* after a
/// bad record may just be the unsynced pages of a write that the crash cut short in a
/// different order than they were written.
pub fn marker_at(buf: &Bytes, pos: usize, after: u64, max_record_bytes: u32) -> bool {
    // Cheap filters first, so scanning a long torn tail byte by byte stays fast.
    if buf.len().saturating_sub(pos) < HEADER_BYTES + BODY_FIXED_BYTES {
        return false;
    }
    if u32_at(buf, pos) as usize != BODY_FIXED_BYTES || buf[pos + HEADER_BYTES + 16] != MARKER_KIND
    {
        return false;
    }
    let index = u64_at(buf, pos + HEADER_BYTES);
    // A segment can't hold more records than it has room for minimal ones.
    let max_gap = (buf.len() / (HEADER_BYTES + BODY_FIXED_BYTES)) as u64 + 1;
    if index < after || index > after.saturating_add(max_gap) {
        return false;
    }
    matches!(decode(buf, pos, max_record_bytes), Ok((e, _)) if is_marker(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        Entry {
            index: 7,
            term: 3,
            kind: 1,
            context: Bytes::from_static(b"ctx"),
            data: Bytes::from_static(b"payload"),
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf);
        encode(&marker(7), &mut buf);
        let buf = Bytes::from(buf);
        let (e, n) = decode(&buf, 0, 1024).unwrap();
        assert_eq!(e, sample());
        assert_eq!(n as u64, encoded_len(&sample()));
        let (m, _) = decode(&buf, n, 1024).unwrap();
        assert!(is_marker(&m));
        assert!(marker_at(&buf, n, 7, 1024));
        assert!(!marker_at(&buf, n, 8, 1024));
        assert!(!marker_at(&buf, 0, 7, 1024));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf);
        for bit in 0..buf.len() * 8 {
            let mut damaged = buf.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&Bytes::from(damaged), 0, 1024).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn limits() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf);
        let buf = Bytes::from(buf);
        let body = body_len(&sample());
        assert_eq!(decode(&buf, 0, body as u32 - 1), Err(Defect::Length(body)));
        assert_eq!(
            decode(&buf.slice(..buf.len() - 1), 0, 1024),
            Err(Defect::Incomplete)
        );
        assert_eq!(decode(&buf.slice(..3), 0, 1024), Err(Defect::Incomplete));
    }
}
