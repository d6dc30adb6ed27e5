//! One segment file: `<20-digit first index>.log`, an 8-byte magic, then records.
//! Its in-memory index keeps each record's offset and term (16 bytes per record).

use crate::record;
use crate::{Entry, LogError};
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"TERNLOG1";

pub struct Segment {
    pub path: PathBuf,
    pub first_index: u64,
    file: File,
    /// Byte offset of each record; record i has index `first_index + i`.
    offsets: Vec<u64>,
    terms: Vec<u64>,
    /// File size = where the next record goes.
    pub size_bytes: u64,
    /// Written since the last fdatasync.
    pub dirty: bool,
}

/// What recovery found at the end of a segment.
pub struct Scan {
    pub segment: Segment,
    /// Offset of a torn tail that was cut off, if any.
    pub torn_at: Option<u64>,
    pub truncated_bytes: u64,
}

pub fn file_name(first_index: u64) -> String {
    format!("{first_index:020}.log")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Segment {
    pub fn create(dir: &Path, first_index: u64) -> Result<Segment, LogError> {
        let path = dir.join(file_name(first_index));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io(&path))?;
        file.write_all_at(MAGIC, 0).map_err(io(&path))?;
        Ok(Segment {
            path,
            first_index,
            file,
            offsets: Vec::new(),
            terms: Vec::new(),
            size_bytes: MAGIC.len() as u64,
            dirty: true,
        })
    }

    /// Opens and scans a segment. `is_last` allows a torn tail to be cut off; anywhere
    /// else a bad record is corruption. `expect_first` is the index the previous
    /// segment ends before (None for the first segment).
    pub fn recover(
        path: &Path,
        first_index: u64,
        is_last: bool,
        max_record_bytes: u32,
    ) -> Result<Scan, LogError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(path))?;
        let data = Bytes::from(std::fs::read(path).map_err(io(path))?);
        let corrupt = |offset: u64, reason: String| LogError::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason,
        };
        if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
            if is_last
                && data.len() < MAGIC.len()
                && data.iter().all(|b| *b == 0 || MAGIC.contains(b))
            {
                // Created but its header never reached the disk: start it again.
                file.set_len(0).map_err(io(path))?;
                file.write_all_at(MAGIC, 0).map_err(io(path))?;
                file.sync_data().map_err(io(path))?;
                let seg = Segment {
                    path: path.to_path_buf(),
                    first_index,
                    file,
                    offsets: vec![],
                    terms: vec![],
                    size_bytes: 8,
                    dirty: false,
                };
                return Ok(Scan {
                    segment: seg,
                    torn_at: Some(0),
                    truncated_bytes: data.len() as u64,
                });
            }
            return Err(corrupt(0, "missing or wrong segment header".into()));
        }
        let mut seg = Segment {
            path: path.to_path_buf(),
            first_index,
            file,
            offsets: vec![],
            terms: vec![],
            size_bytes: 0,
            dirty: false,
        };
        let mut pos = MAGIC.len();
        let mut expected = first_index;
        while pos < data.len() {
            match record::decode(&data, pos, max_record_bytes) {
                Ok((entry, len)) if entry.kind == record::MARKER_KIND && entry.data.is_empty() => {
                    if entry.index + 1 != expected {
                        return Err(corrupt(
                            pos as u64,
                            format!(
                                "sync marker for index {} where {} was expected",
                                entry.index,
                                expected - 1
                            ),
                        ));
                    }
                    pos += len;
                }
                Ok((entry, len)) if entry.index == expected => {
                    seg.offsets.push(pos as u64);
                    seg.terms.push(entry.term);
                    expected += 1;
                    pos += len;
                }
                Ok((entry, _)) => {
                    return Err(corrupt(
                        pos as u64,
                        format!("record has index {}, expected {expected}", entry.index),
                    ));
                }
                Err(bad) => {
                    let reason = format!("{bad:?}");
                    let later_valid = (pos + 1..data.len()).any(|p| {
                        record::valid_record_at(
                            &data,
                            p,
                            expected.saturating_sub(1),
                            max_record_bytes,
                        )
                    });
                    if !is_last || later_valid {
                        return Err(corrupt(
                            pos as u64,
                            format!("bad record ({reason}) followed by valid data"),
                        ));
                    }
                    // A torn tail: nothing after it was ever acknowledged as synced.
                    seg.file.set_len(pos as u64).map_err(io(path))?;
                    seg.file.sync_data().map_err(io(path))?;
                    seg.size_bytes = pos as u64;
                    return Ok(Scan {
                        segment: seg,
                        torn_at: Some(pos as u64),
                        truncated_bytes: (data.len() - pos) as u64,
                    });
                }
            }
        }
        seg.size_bytes = data.len() as u64;
        Ok(Scan {
            segment: seg,
            torn_at: None,
            truncated_bytes: 0,
        })
    }

    pub fn len(&self) -> u64 {
        self.offsets.len() as u64
    }

    /// Index after the last record.
    pub fn next_index(&self) -> u64 {
        self.first_index + self.len()
    }

    pub fn contains(&self, index: u64) -> bool {
        index >= self.first_index && index < self.next_index()
    }

    pub fn term(&self, index: u64) -> Option<u64> {
        self.terms
            .get(index.checked_sub(self.first_index)? as usize)
            .copied()
    }

    /// Appends pre-encoded records (one write) for entries `first..first+terms.len()`.
    pub fn append(&mut self, buf: &[u8], record_sizes: &[(u64, usize)]) -> Result<(), LogError> {
        self.file
            .write_all_at(buf, self.size_bytes)
            .map_err(io(&self.path))?;
        let mut pos = self.size_bytes;
        for (term, size) in record_sizes {
            self.offsets.push(pos);
            self.terms.push(*term);
            pos += *size as u64;
        }
        debug_assert_eq!(pos, self.size_bytes + buf.len() as u64);
        self.size_bytes = pos;
        self.dirty = true;
        Ok(())
    }

    /// Drops records from `index` on.
    pub fn truncate_from(&mut self, index: u64) -> Result<(), LogError> {
        let keep = index.saturating_sub(self.first_index) as usize;
        if keep >= self.offsets.len() {
            return Ok(());
        }
        let cut = self.offsets[keep];
        self.file.set_len(cut).map_err(io(&self.path))?;
        self.offsets.truncate(keep);
        self.terms.truncate(keep);
        self.size_bytes = cut;
        self.dirty = true;
        Ok(())
    }

    /// Appends a sync marker after the last record (see [`record::MARKER_KIND`]).
    pub fn write_marker(&mut self) -> Result<(), LogError> {
        let marker = Entry {
            index: self.next_index() - 1,
            term: 0,
            kind: record::MARKER_KIND,
            context: Bytes::new(),
            data: Bytes::new(),
        };
        let mut buf = Vec::with_capacity(record::encoded_len(&marker));
        record::encode(&marker, &mut buf);
        self.file
            .write_all_at(&buf, self.size_bytes)
            .map_err(io(&self.path))?;
        self.size_bytes += buf.len() as u64;
        self.dirty = true;
        Ok(())
    }

    pub fn sync(&mut self) -> Result<(), LogError> {
        if self.dirty {
            self.file.sync_data().map_err(io(&self.path))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Reads and verifies one record from disk.
    pub fn read(&self, index: u64, max_record_bytes: u32) -> Result<Entry, LogError> {
        let i = (index - self.first_index) as usize;
        let start = self.offsets[i];
        let end = self.offsets.get(i + 1).copied().unwrap_or(self.size_bytes);
        let mut buf = vec![0u8; (end - start) as usize];
        self.file
            .read_exact_at(&mut buf, start)
            .map_err(io(&self.path))?;
        let buf = Bytes::from(buf);
        match record::decode(&buf, 0, max_record_bytes) {
            Ok((e, _)) if e.index == index => Ok(e),
            Ok((e, _)) => Err(LogError::Corrupt {
                path: self.path.clone(),
                offset: start,
                reason: format!("index {} where {index} was expected", e.index),
            }),
            Err(bad) => Err(LogError::Corrupt {
                path: self.path.clone(),
                offset: start,
                reason: format!("{bad:?} on read"),
            }),
        }
    }
}
