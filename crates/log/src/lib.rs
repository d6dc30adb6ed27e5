//! The segmented append-only log of one Raft group (a partition or the metadata group).
//!
//! It *is* the group's Raft log: a message payload is written here once and read back
//! from here to PUSH it. On-disk format (see `FORMAT.md`): a directory of segment files
//! named by their first index; each holds an 8-byte magic and CRC32C-framed records.
//!
//! Contract:
//! - Single-threaded: one owner (the node loop) appends, syncs and releases; reads take
//!   `&self` (positional reads), so Raft's `Storage` can serve them.
//! - `append` writes to the OS; `sync` makes everything appended durable (fdatasync of
//!   the segments written and fsync of the directory when files were added or removed).
//!   A failed sync must be treated as fatal by the caller.
//! - Recovery returns exactly a prefix of what was appended: a torn tail of the last
//!   segment is cut off and reported; a bad record anywhere else, or one followed by
//!   valid data, is corruption and `open` fails naming the file and byte offset.
//!   A record that fails its checksum is never returned, at recovery or on a later read.

mod atomic;
mod record;
mod segment;

pub use atomic::{read_checked, write_atomic};

use bytes::Bytes;
use segment::Segment;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct LogOptions {
    /// Roll to a new segment after this many bytes.
    pub segment_max_bytes: u64,
    /// Recently appended entries kept in memory for zero-copy reads.
    pub cache_max_bytes: u64,
    /// Larger records are refused on append and treated as corruption on recovery.
    pub max_record_bytes: u32,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_max_bytes: 64 << 20,
            cache_max_bytes: 64 << 20,
            max_record_bytes: 64 << 20,
        }
    }
}

/// One log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub index: u64,
    pub term: u64,
    pub kind: u8,
    pub context: Bytes,
    pub data: Bytes,
}

/// What `open` found.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub truncated_bytes: u64,
    pub torn_tail: Option<(PathBuf, u64)>,
}

#[derive(thiserror::Error, Debug)]
pub enum LogError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt log file {path} at byte offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("append must start at index {expected} or earlier, got {got}")]
    NonContiguous { expected: u64, got: u64 },
    #[error("index {index} is outside the log [{first}, {last}]")]
    OutOfRange { index: u64, first: u64, last: u64 },
    #[error("record of {bytes} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge { bytes: u64, max: u64 },
}

pub struct Log {
    dir: PathBuf,
    opts: LogOptions,
    /// Sorted by first index; never empty (the last one is the active segment).
    segments: Vec<Segment>,
    /// A contiguous run of the newest entries.
    cache: VecDeque<Entry>,
    cache_bytes: u64,
    /// Segment files were created or deleted since the last directory fsync.
    dir_dirty: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Log {
    pub fn open(dir: &Path, opts: LogOptions) -> Result<(Log, RecoveryReport), LogError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut firsts = Vec::new();
        for item in std::fs::read_dir(dir).map_err(io(dir))? {
            let item = item.map_err(io(dir))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".log") {
                match stem.parse::<u64>() {
                    Ok(first) if stem.len() == 20 => firsts.push(first),
                    _ => tracing::warn!(file = %name, "ignoring a file that is not a segment"),
                }
            }
        }
        firsts.sort_unstable();
        let mut report = RecoveryReport::default();
        let mut segments: Vec<Segment> = Vec::new();
        for (i, first) in firsts.iter().enumerate() {
            let path = dir.join(segment::file_name(*first));
            if let Some(prev) = segments.last() {
                if prev.next_index() != *first {
                    return Err(LogError::Corrupt {
                        path,
                        offset: 0,
                        reason: format!(
                            "gap: previous segment ends before index {}",
                            prev.next_index()
                        ),
                    });
                }
            }
            let scan =
                Segment::recover(&path, *first, i + 1 == firsts.len(), opts.max_record_bytes)?;
            if let Some(at) = scan.torn_at {
                report.torn_tail = Some((path.clone(), at));
                report.truncated_bytes += scan.truncated_bytes;
            }
            report.records += scan.segment.len();
            segments.push(scan.segment);
        }
        let mut dir_dirty = false;
        if segments.is_empty() {
            segments.push(Segment::create(dir, 1)?);
            dir_dirty = true;
        }
        report.segments = segments.len();
        let mut log = Log {
            dir: dir.to_path_buf(),
            opts,
            segments,
            cache: VecDeque::new(),
            cache_bytes: 0,
            dir_dirty,
        };
        log.sync()?;
        Ok((log, report))
    }

    pub fn first_index(&self) -> u64 {
        self.segments[0].first_index
    }

    pub fn last_index(&self) -> u64 {
        self.active().next_index() - 1
    }

    fn active(&self) -> &Segment {
        &self.segments[self.segments.len() - 1]
    }

    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size_bytes).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let next = self.last_index() + 1;
        if first.index > next || first.index < self.first_index() {
            return Err(LogError::NonContiguous {
                expected: next,
                got: first.index,
            });
        }
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(
                e.index,
                first.index + i as u64,
                "entries passed to append must be contiguous"
            );
            assert!(
                e.kind != record::MARKER_KIND,
                "kind {} is reserved for sync markers",
                record::MARKER_KIND
            );
            let size = record::encoded_len(e) as u64;
            if size > u64::from(self.opts.max_record_bytes) {
                return Err(LogError::RecordTooLarge {
                    bytes: size,
                    max: u64::from(self.opts.max_record_bytes),
                });
            }
        }
        if first.index < next {
            self.truncate_from(first.index)?;
        }
        let mut buf = Vec::new();
        let mut sizes = Vec::new();
        for e in entries {
            let active = self.active();
            let would_be = active.size_bytes + (buf.len() + record::encoded_len(e)) as u64;
            if active.len() + (sizes.len() as u64) > 0 && would_be > self.opts.segment_max_bytes {
                self.write_active(&buf, &sizes)?;
                buf.clear();
                sizes.clear();
                self.roll(e.index)?;
            }
            let before = buf.len();
            record::encode(e, &mut buf);
            sizes.push((e.term, buf.len() - before));
        }
        self.write_active(&buf, &sizes)?;
        for e in entries {
            self.cache_push(e.clone());
        }
        Ok(())
    }

    fn write_active(&mut self, buf: &[u8], sizes: &[(u64, usize)]) -> Result<(), LogError> {
        if sizes.is_empty() {
            return Ok(());
        }
        let n = self.segments.len();
        self.segments[n - 1].append(buf, sizes)
    }

    fn roll(&mut self, first_index: u64) -> Result<(), LogError> {
        let seg = Segment::create(&self.dir, first_index)?;
        self.segments.push(seg);
        self.dir_dirty = true;
        Ok(())
    }

    /// Removes every record from `index` on (Raft conflict resolution).
    fn truncate_from(&mut self, index: u64) -> Result<(), LogError> {
        while self.segments.len() > 1 && self.active().first_index >= index {
            if let Some(seg) = self.segments.pop() {
                std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
                self.dir_dirty = true;
            }
        }
        let n = self.segments.len();
        self.segments[n - 1].truncate_from(index)?;
        while self.cache.back().is_some_and(|e| e.index >= index) {
            if let Some(e) = self.cache.pop_back() {
                self.cache_bytes -= entry_bytes(&e);
            }
        }
        Ok(())
    }

    fn cache_push(&mut self, e: Entry) {
        if self.cache.back().is_some_and(|b| b.index + 1 != e.index) {
            self.cache.clear();
            self.cache_bytes = 0;
        }
        self.cache_bytes += entry_bytes(&e);
        self.cache.push_back(e);
        while self.cache_bytes > self.opts.cache_max_bytes && self.cache.len() > 1 {
            if let Some(old) = self.cache.pop_front() {
                self.cache_bytes -= entry_bytes(&old);
            }
        }
    }

    pub fn sync(&mut self) -> Result<(), LogError> {
        let n = self.segments.len();
        if self.segments[n - 1].dirty {
            // Written in the same fdatasync as the data it vouches for.
            self.segments[n - 1].write_marker()?;
        }
        for seg in self.segments.iter_mut() {
            seg.sync()?;
        }
        if self.dir_dirty {
            let dir = std::fs::File::open(&self.dir).map_err(io(&self.dir))?;
            dir.sync_all().map_err(io(&self.dir))?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    fn segment_of(&self, index: u64) -> Result<&Segment, LogError> {
        let i = self.segments.partition_point(|s| s.first_index <= index);
        match i.checked_sub(1).map(|i| &self.segments[i]) {
            Some(seg) if seg.contains(index) => Ok(seg),
            _ => Err(LogError::OutOfRange {
                index,
                first: self.first_index(),
                last: self.last_index(),
            }),
        }
    }

    pub fn entry(&self, index: u64) -> Result<Entry, LogError> {
        if let Some(front) = self.cache.front() {
            if index >= front.index {
                if let Some(e) = self.cache.get((index - front.index) as usize) {
                    return Ok(e.clone());
                }
            }
        }
        self.segment_of(index)?
            .read(index, self.opts.max_record_bytes)
    }

    pub fn entries(
        &self,
        lo: u64,
        hi: u64,
        max_bytes: Option<u64>,
    ) -> Result<Vec<Entry>, LogError> {
        let mut out = Vec::new();
        let mut total = 0u64;
        for index in lo..hi {
            let e = self.entry(index)?;
            total += entry_bytes(&e);
            if !out.is_empty() && max_bytes.is_some_and(|m| total > m) {
                break;
            }
            out.push(e);
        }
        Ok(out)
    }

    pub fn term(&self, index: u64) -> Result<u64, LogError> {
        let seg = self.segment_of(index)?;
        seg.term(index).ok_or(LogError::OutOfRange {
            index,
            first: self.first_index(),
            last: self.last_index(),
        })
    }

    /// Deletes whole segments all of whose records are below `index`. Returns bytes freed.
    pub fn release_before(&mut self, index: u64) -> Result<u64, LogError> {
        let mut freed = 0;
        while self.segments.len() > 1 && self.segments[1].first_index <= index {
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
            freed += seg.size_bytes;
            self.dir_dirty = true;
        }
        while self
            .cache
            .front()
            .is_some_and(|e| e.index < self.first_index())
        {
            if let Some(e) = self.cache.pop_front() {
                self.cache_bytes -= entry_bytes(&e);
            }
        }
        Ok(freed)
    }

    /// Drops every record; the next append starts at `next_index`.
    pub fn reset(&mut self, next_index: u64) -> Result<(), LogError> {
        for seg in self.segments.drain(..) {
            std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
        }
        self.cache.clear();
        self.cache_bytes = 0;
        self.segments.push(Segment::create(&self.dir, next_index)?);
        self.dir_dirty = true;
        self.sync()
    }
}

fn entry_bytes(e: &Entry) -> u64 {
    (e.data.len() + e.context.len() + 32) as u64
}

#[cfg(test)]
mod tests;
