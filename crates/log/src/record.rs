//! Record framing: `u32 BE body length | u32 BE CRC32C(body) | body`, where body =
//! `u64 index | u64 term | u8 kind | u32 context length | context | data`.

use crate::Entry;
use bytes::{BufMut, Bytes};

pub const HEADER_BYTES: usize = 8;
/// `kind` of a sync marker: a record with no data whose index repeats the last entry's.
/// Written at every sync after the data, it makes damage to the last synced entry
/// detectable (a bad record followed by a valid marker is corruption, not a torn write).
pub const MARKER_KIND: u8 = 0xFF;
/// index + term + kind + context length.
pub const BODY_FIXED_BYTES: usize = 8 + 8 + 1 + 4;

pub fn encoded_len(e: &Entry) -> usize {
    HEADER_BYTES + BODY_FIXED_BYTES + e.context.len() + e.data.len()
}

pub fn encode(e: &Entry, out: &mut Vec<u8>) {
    let body_len = BODY_FIXED_BYTES + e.context.len() + e.data.len();
    let start = out.len();
    out.put_u32(body_len as u32);
    out.put_u32(0); // CRC, filled below
    let body_start = out.len();
    out.put_u64(e.index);
    out.put_u64(e.term);
    out.put_u8(e.kind);
    out.put_u32(e.context.len() as u32);
    out.put_slice(&e.context);
    out.put_slice(&e.data);
    let crc = crc32c::crc32c(&out[body_start..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// Why a record at some offset could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum Defect {
    /// Fewer bytes left than the header or body claims: typical of a torn write.
    Incomplete,
    /// A length that can't be right (too small or over the limit).
    Length(u64),
    /// The checksum does not match the body.
    Checksum,
}

/// Parses the record at `buf[pos..]`; returns the entry and the record's total size.
/// `buf` is one whole segment, so entries are zero-copy slices of it.
pub fn decode(buf: &Bytes, pos: usize, max_record_bytes: u32) -> Result<(Entry, usize), Defect> {
    let rest = buf.len().saturating_sub(pos);
    if rest < HEADER_BYTES {
        return Err(Defect::Incomplete);
    }
    let body_len =
        u32::from_be_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize;
    if body_len < BODY_FIXED_BYTES || body_len as u64 > u64::from(max_record_bytes) {
        return Err(Defect::Length(body_len as u64));
    }
    if rest < HEADER_BYTES + body_len {
        return Err(Defect::Incomplete);
    }
    let crc = u32::from_be_bytes([buf[pos + 4], buf[pos + 5], buf[pos + 6], buf[pos + 7]]);
    let body = &buf[pos + HEADER_BYTES..pos + HEADER_BYTES + body_len];
    if crc32c::crc32c(body) != crc {
        return Err(Defect::Checksum);
    }
    let u64_at = |o: usize| u64::from_be_bytes(body[o..o + 8].try_into().unwrap_or([0; 8]));
    let index = u64_at(0);
    let term = u64_at(8);
    let kind = body[16];
    let ctx_len = u32::from_be_bytes(body[17..21].try_into().unwrap_or([0; 4])) as usize;
    if BODY_FIXED_BYTES + ctx_len > body_len {
        // The CRC matched, so this was written like this: still refuse it.
        return Err(Defect::Length(ctx_len as u64));
    }
    let base = pos + HEADER_BYTES + BODY_FIXED_BYTES;
    let context = buf.slice(base..base + ctx_len);
    let data = buf.slice(base + ctx_len..pos + HEADER_BYTES + body_len);
    Ok((
        Entry {
            index,
            term,
            kind,
            context,
            data,
        },
        HEADER_BYTES + body_len,
    ))
}

/// Cheap plausibility test used when scanning past a bad record: does a valid record
/// (an entry with index in `(after, after + max_gap]`, or a marker for `after` or later)
/// start at `pos`?
pub fn valid_record_at(buf: &Bytes, pos: usize, after: u64, max_record_bytes: u32) -> bool {
    if buf.len().saturating_sub(pos) < HEADER_BYTES + BODY_FIXED_BYTES {
        return false;
    }
    let idx = u64::from_be_bytes(buf[pos + 8..pos + 16].try_into().unwrap_or([0; 8]));
    let max_gap = (buf.len() / (HEADER_BYTES + BODY_FIXED_BYTES)) as u64 + 1;
    if idx < after || idx > after.saturating_add(max_gap) {
        return false;
    }
    match decode(buf, pos, max_record_bytes) {
        // A marker repeats the index of the entry before it; an entry comes after `after`.
        Ok((e, _)) => (e.kind == MARKER_KIND && e.data.is_empty()) || idx > after,
        Err(_) => false,
    }
}
