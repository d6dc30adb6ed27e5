//! One segment file: `<20-digit first index>.log`, an 8-byte magic, then records.
//!
//! The in-memory index holds a u32 byte offset per record (4 bytes each) and the terms
//! as runs (16 bytes per term change, which is rare), so `term()` never reads the disk.

use crate::record;
use crate::{io_error, Entry, LogError};
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"TERNLOG1";
pub const MAGIC_BYTES: u64 = MAGIC.len() as u64;

pub fn file_name(first_index: u64) -> String {
    format!("{first_index:020}.log")
}

/// Parses a segment file name; `None` for any other file.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

pub struct Segment {
    pub path: PathBuf,
    pub first_index: u64,
    file: File,
    /// Byte offset of each record; record i has index `first_index + i`. u32 is enough
    /// because a record only starts below `segment_max_bytes` (checked <= u32::MAX).
    offsets: Vec<u32>,
    /// (first index, term) of each run of equal terms, ascending.
    term_runs: Vec<(u64, u64)>,
    /// File size = where the next record goes.
    size_bytes: u64,
    /// Written (or cut) since the last fdatasync.
    dirty: bool,
    /// Records were appended since the last sync marker.
    needs_marker: bool,
}

impl Segment {
    /// Creates (or empties) the segment file starting at `first_index` and writes its magic.
    pub fn create(dir: &Path, first_index: u64) -> Result<Segment, LogError> {
        let path = dir.join(file_name(first_index));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_error(&path))?;
        file.write_all_at(MAGIC, 0).map_err(io_error(&path))?;
        let mut segment = Segment::opened(path, file, first_index);
        segment.dirty = true;
        Ok(segment)
    }

    /// An already open file holding just its magic; recovery adds records with `push`.
    pub fn opened(path: PathBuf, file: File, first_index: u64) -> Segment {
        Segment {
            path,
            first_index,
            file,
            offsets: Vec::new(),
            term_runs: Vec::new(),
            size_bytes: MAGIC_BYTES,
            dirty: false,
            needs_marker: false,
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn len(&self) -> u64 {
        self.offsets.len() as u64
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn needs_marker(&self) -> bool {
        self.needs_marker
    }

    /// Index after the last record.
    pub fn next_index(&self) -> u64 {
        self.first_index + self.len()
    }

    pub fn contains(&self, index: u64) -> bool {
        index >= self.first_index && index < self.next_index()
    }

    pub fn term(&self, index: u64) -> Option<u64> {
        if !self.contains(index) {
            return None;
        }
        let run = self.term_runs.partition_point(|(first, _)| *first <= index);
        debug_assert!(run > 0, "the first run starts at the first record");
        Some(self.term_runs[run - 1].1)
    }

    /// Records that the next record (index `next_index()`) starts at `offset`.
    /// Returns false if `offset` doesn't fit the u32 index (recovery reports that).
    pub fn push(&mut self, offset: u64, term: u64) -> bool {
        let Ok(offset) = u32::try_from(offset) else {
            return false;
        };
        debug_assert!(offset as u64 >= self.size_bytes.min(MAGIC_BYTES));
        let index = self.next_index();
        if self.term_runs.last().map(|run| run.1) != Some(term) {
            self.term_runs.push((index, term));
        }
        self.offsets.push(offset);
        true
    }

    /// Sets the file size after recovery scanned (and maybe cut) the file.
    pub fn set_recovered_size(&mut self, size_bytes: u64) {
        assert!(size_bytes >= MAGIC_BYTES);
        assert!(self
            .offsets
            .last()
            .iter()
            .all(|o| u64::from(**o) < size_bytes));
        self.size_bytes = size_bytes;
    }

    /// Appends pre-encoded records (one write) for the entries `next_index()..`;
    /// `records` holds each one's (term, encoded bytes).
    pub fn append(&mut self, buf: &[u8], records: &[(u64, u64)]) -> Result<(), LogError> {
        debug_assert_eq!(records.iter().map(|r| r.1).sum::<u64>(), buf.len() as u64);
        self.file
            .write_all_at(buf, self.size_bytes)
            .map_err(io_error(&self.path))?;
        self.dirty = true;
        self.needs_marker = true;
        let mut offset = self.size_bytes;
        for (term, record_bytes) in records {
            // The caller rolls before a record could start past segment_max_bytes.
            assert!(self.push(offset, *term), "record offset exceeds u32");
            offset += record_bytes;
        }
        self.size_bytes = offset;
        Ok(())
    }

    /// Appends a sync marker after the last record (see [`record::MARKER_KIND`]).
    pub fn append_marker(&mut self) -> Result<(), LogError> {
        // In an empty segment this is first_index - 1, which recovery expects too.
        let marker = record::marker(self.next_index() - 1);
        let mut buf = Vec::with_capacity(record::encoded_len(&marker) as usize);
        record::encode(&marker, &mut buf);
        self.file
            .write_all_at(&buf, self.size_bytes)
            .map_err(io_error(&self.path))?;
        self.size_bytes += buf.len() as u64;
        self.dirty = true;
        self.needs_marker = false;
        Ok(())
    }

    /// Drops the records from `index` on, durably: the cut is fdatasynced before any
    /// new record is written over it. Otherwise a crash could keep the new records and
    /// the old ones after them, a mixed log whose indexes still look contiguous.
    pub fn truncate_from(&mut self, index: u64) -> Result<(), LogError> {
        assert!(index >= self.first_index);
        let keep = (index - self.first_index) as usize;
        if keep >= self.offsets.len() {
            return Ok(());
        }
        let cut_bytes = u64::from(self.offsets[keep]);
        self.file.set_len(cut_bytes).map_err(io_error(&self.path))?;
        self.file.sync_data().map_err(io_error(&self.path))?;
        self.offsets.truncate(keep);
        self.term_runs.retain(|(first, _)| *first < index);
        self.size_bytes = cut_bytes;
        Ok(())
    }

    pub fn sync(&mut self) -> Result<(), LogError> {
        if self.dirty {
            self.file.sync_data().map_err(io_error(&self.path))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Reads and verifies one record with a single pread; never returns a record that
    /// fails its checksum.
    pub fn read(&self, index: u64, max_record_bytes: u32) -> Result<Entry, LogError> {
        assert!(self.contains(index));
        let i = (index - self.first_index) as usize;
        let start = u64::from(self.offsets[i]);
        // Up to the next record: may include sync markers, which decode ignores.
        let end = self
            .offsets
            .get(i + 1)
            .map_or(self.size_bytes, |o| u64::from(*o));
        debug_assert!(end > start);
        let mut buf = vec![0u8; (end - start) as usize];
        self.file
            .read_exact_at(&mut buf, start)
            .map_err(io_error(&self.path))?;
        let corrupt = |reason: String| LogError::Corrupt {
            path: self.path.clone(),
            offset: start,
            reason,
        };
        match record::decode(&Bytes::from(buf), 0, max_record_bytes) {
            Ok((e, _)) if e.index == index && !record::is_marker(&e) => Ok(e),
            Ok((e, _)) => Err(corrupt(format!(
                "read index {} where {index} was expected",
                e.index
            ))),
            Err(defect) => Err(corrupt(format!("{defect} on read"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(file_name(42), "00000000000000000042.log");
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name("42.log"), None);
        assert_eq!(parse_file_name("0000000000000000004x.log"), None);
        assert_eq!(parse_file_name("00000000000000000042.tmp"), None);
    }

    #[test]
    fn term_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), 10).unwrap();
        for (i, term) in [1u64, 1, 2, 2, 2, 5].iter().enumerate() {
            assert!(seg.push(8 + i as u64 * 30, *term));
        }
        assert_eq!(seg.term_runs.len(), 3);
        let terms: Vec<_> = (9..=16).map(|i| seg.term(i)).collect();
        let expected = [
            None,
            Some(1),
            Some(1),
            Some(2),
            Some(2),
            Some(2),
            Some(5),
            None,
        ];
        assert_eq!(terms, expected);
        seg.set_recovered_size(8 + 6 * 30);
        seg.truncate_from(13).unwrap();
        assert_eq!(seg.term_runs, vec![(10, 1), (12, 2)]);
        assert_eq!(seg.next_index(), 13);
        assert_eq!(seg.size_bytes(), 8 + 3 * 30);
    }
}
