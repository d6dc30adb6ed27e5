//! The segmented append-only log of one Raft group (a partition or the metadata group).
//!
//! It *is* the group's Raft log: a message payload is written here once and read back
//! from here. It knows nothing of Raft: it stores generic records (index, term, kind,
//! context, data).
//!
//! Contract:
//! - Single owner: one thread (the node loop) appends, syncs, releases; reads take
//!   `&self` (positional reads), so Raft's `Storage` can serve them.
//! - `append` writes to the OS (one write per segment per call); `sync` makes everything
//!   appended durable (fdatasync of the segments written, fsync of the directory when
//!   files were added or removed). A failed sync must be treated as fatal by the caller.
//! - Recovery returns exactly a prefix of what was appended: a torn tail of the last
//!   segment is cut off and reported; a bad record anywhere else, or one followed by
//!   synced data, is corruption and `open` fails naming the file and byte offset.
//!   A record that fails its checksum is never returned, at recovery or on a later read.
//!
//! Memory: 4 bytes per record (its offset) plus 16 bytes per run of equal terms per
//! segment, plus the tail cache (`cache_max_bytes` of recent entries, shared `Bytes`).
//!
#![doc = include_str!("../FORMAT.md")]

mod atomic;
mod record;
mod recovery;
mod segment;

pub use atomic::{read_checked, write_atomic};

use bytes::Bytes;
use segment::Segment;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct LogOptions {
    /// Roll to a new segment once the next record would take the active one past this
    /// (a single bigger record gets a segment of its own). At most `u32::MAX`.
    pub segment_max_bytes: u64,
    /// Recently appended entries kept in memory for zero-copy reads.
    pub cache_max_bytes: u64,
    /// Larger records (header included) are refused on append; on recovery a record
    /// whose body is larger is corruption.
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
    /// 255 is reserved (sync markers).
    pub kind: u8,
    pub context: Bytes,
    pub data: Bytes,
}

/// What `open` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub truncated_bytes: u64,
    /// The segment whose torn tail was cut off, and the byte offset of the cut.
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
    #[error("append must be contiguous: expected index {expected} (or an earlier retained one), got {got}")]
    NonContiguous { expected: u64, got: u64 },
    #[error("index {index} is outside the log [{first}, {last}]")]
    OutOfRange { index: u64, first: u64, last: u64 },
    #[error("record of {bytes} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge { bytes: u64, max: u64 },
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

fn remove_segment(segment: &Segment) -> Result<(), LogError> {
    std::fs::remove_file(&segment.path).map_err(io_error(&segment.path))
}

/// What `max_bytes` of [`Log::entries`] counts.
fn payload_bytes(e: &Entry) -> u64 {
    (e.data.len() + e.context.len()) as u64
}

/// What the tail cache counts (the fixed part approximates the Entry itself).
fn cache_bytes(e: &Entry) -> u64 {
    payload_bytes(e) + std::mem::size_of::<Entry>() as u64
}

pub struct Log {
    dir: PathBuf,
    opts: LogOptions,
    /// Sorted by first index, contiguous; never empty (the last is the active segment).
    segments: Vec<Segment>,
    /// A contiguous run of the newest entries.
    cache: VecDeque<Entry>,
    cache_bytes: u64,
    /// Segment files were created or deleted since the last directory fsync.
    dir_dirty: bool,
}

impl Log {
    /// Opens (creating the directory if missing) and recovers. An empty log has
    /// `first_index() == 1` and `last_index() == 0`.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<(Log, RecoveryReport), LogError> {
        assert!(opts.segment_max_bytes <= u64::from(u32::MAX));
        assert!(opts.segment_max_bytes > segment::MAGIC_BYTES);
        create_dir_durably(dir)?;
        let (segments, report) = recovery::recover_dir(dir, &opts)?;
        let mut log = Log {
            dir: dir.to_path_buf(),
            opts,
            segments,
            cache: VecDeque::new(),
            cache_bytes: 0,
            dir_dirty: false,
        };
        if log.segments.is_empty() {
            log.segments.push(Segment::create(dir, 1)?);
            log.dir_dirty = true;
            log.sync()?;
        }
        log.check_invariants();
        tracing::debug!(dir = %dir.display(), ?report, first = log.first_index(), last = log.last_index(), "log opened");
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

    fn active_mut(&mut self) -> &mut Segment {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size_bytes()).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Appends contiguous entries. If `entries[0].index <= last_index()`, everything
    /// from there on is first truncated (Raft conflict resolution). `entries[0].index`
    /// must lie in `[first_index(), last_index() + 1]`. Written to the OS, not synced.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        self.check_append(entries)?;
        if first.index <= self.last_index() {
            self.truncate_from(first.index)?;
        }
        self.write_entries(entries)?;
        for e in entries {
            self.cache_push(e.clone());
        }
        self.check_invariants();
        Ok(())
    }

    /// Validates a whole batch before anything is changed.
    fn check_append(&self, entries: &[Entry]) -> Result<(), LogError> {
        let first = &entries[0];
        let next_index = self.last_index() + 1;
        if first.index < self.first_index() || first.index > next_index {
            return Err(LogError::NonContiguous {
                expected: next_index,
                got: first.index,
            });
        }
        let max_bytes = u64::from(self.opts.max_record_bytes);
        for (i, e) in entries.iter().enumerate() {
            let expected = first.index + i as u64;
            if e.index != expected {
                return Err(LogError::NonContiguous {
                    expected,
                    got: e.index,
                });
            }
            assert!(
                e.kind != record::MARKER_KIND,
                "entry kind {} is reserved for sync markers",
                record::MARKER_KIND
            );
            let record_bytes = record::encoded_len(e);
            if record_bytes > max_bytes {
                return Err(LogError::RecordTooLarge {
                    bytes: record_bytes,
                    max: max_bytes,
                });
            }
        }
        Ok(())
    }

    /// Encodes the entries into one buffer per segment and writes each with one write.
    fn write_entries(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        let mut buf = Vec::new();
        let mut records: Vec<(u64, u64)> = Vec::with_capacity(entries.len());
        for e in entries {
            debug_assert_eq!(e.index, self.active().next_index() + records.len() as u64);
            let record_bytes = record::encoded_len(e);
            let used_bytes = self.active().size_bytes() + buf.len() as u64;
            let has_records = self.active().len() > 0 || !records.is_empty();
            if has_records && used_bytes + record_bytes > self.opts.segment_max_bytes {
                self.active_mut().append(&buf, &records)?;
                buf.clear();
                records.clear();
                self.roll(e.index)?;
            }
            record::encode(e, &mut buf);
            records.push((e.term, record_bytes));
        }
        if !records.is_empty() {
            self.active_mut().append(&buf, &records)?;
        }
        Ok(())
    }

    /// Seals the active segment and starts a new one at `first_index`. The sealed one
    /// is fdatasynced *before* its successor exists, so after a crash every segment but
    /// the last is complete (recovery relies on it to call any defect there corruption).
    fn roll(&mut self, first_index: u64) -> Result<(), LogError> {
        debug_assert_eq!(first_index, self.active().next_index());
        self.active_mut().sync()?;
        let segment = Segment::create(&self.dir, first_index)?;
        self.segments.push(segment);
        self.dir_dirty = true;
        Ok(())
    }

    /// Removes every record from `index` on (Raft conflict resolution).
    fn truncate_from(&mut self, index: u64) -> Result<(), LogError> {
        assert!(index >= self.first_index() && index <= self.last_index());
        let mut removed = false;
        while self.segments.len() > 1 && self.active().first_index >= index {
            if let Some(segment) = self.segments.pop() {
                remove_segment(&segment)?;
                removed = true;
            }
        }
        if removed {
            // Make the deletions durable before the surviving segment is rewritten, or a
            // crash could bring back later segments behind new records.
            sync_dir(&self.dir)?;
        }
        self.active_mut().truncate_from(index)?;
        while self.cache.back().is_some_and(|e| e.index >= index) {
            if let Some(e) = self.cache.pop_back() {
                self.cache_bytes -= cache_bytes(&e);
            }
        }
        Ok(())
    }

    fn cache_push(&mut self, e: Entry) {
        if self.cache.back().is_some_and(|b| b.index + 1 != e.index) {
            self.cache.clear();
            self.cache_bytes = 0;
        }
        self.cache_bytes += cache_bytes(&e);
        self.cache.push_back(e);
        while self.cache_bytes > self.opts.cache_max_bytes {
            let Some(old) = self.cache.pop_front() else {
                break;
            };
            self.cache_bytes -= cache_bytes(&old);
        }
    }

    /// Makes everything appended so far durable. An error is fatal for the node (the
    /// page cache state is unknown), so nothing is retried here.
    pub fn sync(&mut self) -> Result<(), LogError> {
        if self.active().needs_marker() {
            // Synced together with the data it vouches for (see recovery).
            self.active_mut().append_marker()?;
        }
        for segment in self.segments.iter_mut() {
            segment.sync()?;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    fn segment_of(&self, index: u64) -> Result<&Segment, LogError> {
        let after = self.segments.partition_point(|s| s.first_index <= index);
        match after.checked_sub(1).map(|i| &self.segments[i]) {
            Some(segment) if segment.contains(index) => Ok(segment),
            _ => Err(self.out_of_range(index)),
        }
    }

    fn out_of_range(&self, index: u64) -> LogError {
        LogError::OutOfRange {
            index,
            first: self.first_index(),
            last: self.last_index(),
        }
    }

    /// One entry, from the tail cache or one positional read.
    pub fn entry(&self, index: u64) -> Result<Entry, LogError> {
        if let Some(front) = self.cache.front() {
            if index >= front.index {
                if let Some(e) = self.cache.get((index - front.index) as usize) {
                    debug_assert_eq!(e.index, index);
                    return Ok(e.clone());
                }
            }
        }
        self.segment_of(index)?
            .read(index, self.opts.max_record_bytes)
    }

    /// Entries `[lo, hi)`. With `max_bytes`, stops before the total data + context size
    /// would exceed it, but returns at least one entry when `lo < hi`.
    pub fn entries(
        &self,
        lo: u64,
        hi: u64,
        max_bytes: Option<u64>,
    ) -> Result<Vec<Entry>, LogError> {
        if lo >= hi {
            return Ok(Vec::new());
        }
        if lo < self.first_index() {
            return Err(self.out_of_range(lo));
        }
        if hi > self.last_index() + 1 {
            return Err(self.out_of_range(hi - 1));
        }
        let mut out = Vec::new();
        let mut total_bytes = 0u64;
        for index in lo..hi {
            let e = self.entry(index)?;
            total_bytes += payload_bytes(&e);
            if !out.is_empty() && max_bytes.is_some_and(|max| total_bytes > max) {
                break;
            }
            out.push(e);
        }
        Ok(out)
    }

    /// The term of a retained entry, from memory.
    pub fn term(&self, index: u64) -> Result<u64, LogError> {
        self.segment_of(index)?
            .term(index)
            .ok_or_else(|| self.out_of_range(index))
    }

    /// Deletes whole segments all of whose records have index < `index` (never the
    /// active segment). Returns the bytes freed. The deletions become durable with the
    /// next `sync`; a crash before brings back a contiguous prefix, which is harmless.
    pub fn release_before(&mut self, index: u64) -> Result<u64, LogError> {
        let mut freed_bytes = 0;
        while self.segments.len() > 1 && self.segments[1].first_index <= index {
            let segment = self.segments.remove(0);
            remove_segment(&segment)?;
            freed_bytes += segment.size_bytes();
            self.dir_dirty = true;
        }
        let first_index = self.first_index();
        while self.cache.front().is_some_and(|e| e.index < first_index) {
            if let Some(e) = self.cache.pop_front() {
                self.cache_bytes -= cache_bytes(&e);
            }
        }
        self.check_invariants();
        Ok(freed_bytes)
    }

    /// Drops every record; the next append must start at `next_index` (after a Raft
    /// snapshot was installed). Durable on return. A crash inside leaves either a
    /// prefix of the old log or an empty one starting at 1: the caller must check the
    /// log against its snapshot on open.
    pub fn reset(&mut self, next_index: u64) -> Result<(), LogError> {
        assert!(next_index >= 1, "indexes start at 1");
        // Newest first, so a crash leaves a contiguous prefix rather than a gap.
        while let Some(segment) = self.segments.pop() {
            remove_segment(&segment)?;
        }
        sync_dir(&self.dir)?;
        self.cache.clear();
        self.cache_bytes = 0;
        self.segments.push(Segment::create(&self.dir, next_index)?);
        self.dir_dirty = true;
        self.sync()?;
        self.check_invariants();
        Ok(())
    }

    fn check_invariants(&self) {
        assert!(!self.segments.is_empty());
        debug_assert!(self
            .segments
            .windows(2)
            .all(|w| w[0].next_index() == w[1].first_index && w[0].len() > 0));
        debug_assert!(self
            .cache
            .back()
            .is_none_or(|e| e.index == self.last_index()));
        debug_assert!(self
            .cache
            .front()
            .is_none_or(|e| e.index >= self.first_index()));
        debug_assert_eq!(
            self.cache_bytes,
            self.cache.iter().map(cache_bytes).sum::<u64>()
        );
    }
}

/// Creates `dir` if missing and, if it did, fsyncs its parent so the new directory
/// entry survives a crash.
fn create_dir_durably(dir: &Path) -> Result<(), LogError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn entry(index: u64, term: u64, data_bytes: usize) -> Entry {
        let data: Vec<u8> = (0..data_bytes)
            .map(|i| (index as usize * 31 + i) as u8)
            .collect();
        Entry {
            index,
            term,
            kind: (index % 3) as u8,
            context: Bytes::from(vec![index as u8; (index % 4) as usize]),
            data: Bytes::from(data),
        }
    }

    pub fn small_opts() -> LogOptions {
        LogOptions {
            segment_max_bytes: 4096,
            cache_max_bytes: 2048,
            max_record_bytes: 1 << 20,
        }
    }

    fn assert_reads(log: &Log, entries: &[Entry]) {
        for e in entries {
            assert_eq!(&log.entry(e.index).unwrap(), e);
            assert_eq!(log.term(e.index).unwrap(), e.term);
        }
    }

    #[test]
    fn empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let (log, report) = Log::open(&dir.path().join("new/log"), small_opts()).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (1, 0));
        assert_eq!(report, RecoveryReport::default());
        assert!(matches!(log.entry(1), Err(LogError::OutOfRange { .. })));
        assert!(matches!(log.term(0), Err(LogError::OutOfRange { .. })));
        assert!(log.entries(1, 1, None).unwrap().is_empty());
        drop(log);
        let (log, report) = Log::open(&dir.path().join("new/log"), small_opts()).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (1, 0));
        assert_eq!(report.segments, 1);
    }

    #[test]
    fn append_read_roll_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
        let entries: Vec<Entry> = (1..=100).map(|i| entry(i, 1 + i / 40, 100)).collect();
        log.append(&entries[..50]).unwrap();
        log.append(&entries[50..]).unwrap();
        log.sync().unwrap();
        assert!(log.segment_count() > 1, "segments roll");
        assert!(log.disk_bytes() > 100 * 100);
        assert_reads(&log, &entries);
        assert_eq!(log.entries(10, 20, None).unwrap(), entries[9..19].to_vec());
        assert_eq!(log.entries(10, 20, Some(0)).unwrap().len(), 1);
        // data + context: 100 + (index % 4) bytes each.
        assert_eq!(log.entries(10, 20, Some(310)).unwrap().len(), 3);
        assert!(matches!(
            log.entries(90, 102, None),
            Err(LogError::OutOfRange { index: 101, .. })
        ));
        let segments = log.segment_count();
        drop(log);
        let (log, report) = Log::open(dir.path(), small_opts()).unwrap();
        assert_eq!(report.records, 100);
        assert_eq!(report.segments, segments);
        assert!(report.torn_tail.is_none());
        assert_eq!((log.first_index(), log.last_index()), (1, 100));
        assert_reads(&log, &entries);
    }

    #[test]
    fn record_bigger_than_a_segment_gets_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
        let entries = vec![entry(1, 1, 10), entry(2, 1, 10_000), entry(3, 1, 10)];
        log.append(&entries).unwrap();
        log.sync().unwrap();
        assert_eq!(log.segment_count(), 3);
        drop(log);
        let (log, _) = Log::open(dir.path(), small_opts()).unwrap();
        assert_reads(&log, &entries);
    }

    #[test]
    fn conflict_truncation_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
        let entries: Vec<Entry> = (1..=100).map(|i| entry(i, 1, 100)).collect();
        log.append(&entries).unwrap();
        log.sync().unwrap();
        let segments_before = log.segment_count();
        let replacement: Vec<Entry> = (20..=25).map(|i| entry(i, 2, 10)).collect();
        log.append(&replacement).unwrap();
        log.sync().unwrap();
        assert!(log.segment_count() < segments_before);
        assert_eq!(log.last_index(), 25);
        assert_eq!(log.term(19).unwrap(), 1);
        assert_eq!(log.term(20).unwrap(), 2);
        assert_reads(&log, &entries[..19]);
        assert_reads(&log, &replacement);
        assert!(matches!(
            log.append(&[entry(30, 2, 1)]),
            Err(LogError::NonContiguous {
                expected: 26,
                got: 30
            })
        ));
        assert!(matches!(
            log.append(&[entry(26, 2, 1), entry(28, 2, 1)]),
            Err(LogError::NonContiguous {
                expected: 27,
                got: 28
            })
        ));
        assert_eq!(log.last_index(), 25, "a refused batch changes nothing");
        drop(log);
        let (log, _) = Log::open(dir.path(), small_opts()).unwrap();
        assert_eq!(log.last_index(), 25);
        assert_reads(&log, &entries[..19]);
        assert_reads(&log, &replacement);
    }

    #[test]
    fn truncation_at_a_segment_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
        let entries: Vec<Entry> = (1..=100).map(|i| entry(i, 1, 100)).collect();
        log.append(&entries).unwrap();
        let boundary = log.segments[1].first_index;
        log.append(&[entry(boundary, 3, 5)]).unwrap();
        assert!(log.segment_count() <= 2);
        assert_eq!(log.term(boundary - 1).unwrap(), 1);
        assert_eq!(log.last_index(), boundary);
        log.append(&[entry(1, 4, 5)]).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (1, 1));
        log.sync().unwrap();
        drop(log);
        let (log, _) = Log::open(dir.path(), small_opts()).unwrap();
        assert_eq!(log.entry(1).unwrap(), entry(1, 4, 5));
        assert_eq!(log.last_index(), 1);
    }

    #[test]
    fn release_and_reset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
        let entries: Vec<Entry> = (1..=100).map(|i| entry(i, 1, 100)).collect();
        log.append(&entries).unwrap();
        let before = log.disk_bytes();
        assert_eq!(log.release_before(1).unwrap(), 0);
        let freed = log.release_before(60).unwrap();
        assert!(freed > 0 && log.disk_bytes() == before - freed);
        assert!(log.first_index() <= 60 && log.first_index() > 1);
        assert!(matches!(log.entry(1), Err(LogError::OutOfRange { .. })));
        assert!(matches!(
            log.append(&[entry(1, 1, 1)]),
            Err(LogError::NonContiguous { .. })
        ));
        assert_eq!(log.entry(60).unwrap(), entries[59]);
        // Never the active segment.
        log.release_before(1000).unwrap();
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.last_index(), 100);
        log.sync().unwrap();
        drop(log);
        let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
        assert_eq!(log.last_index(), 100);
        assert_reads(&log, &entries[log.first_index() as usize - 1..]);

        log.reset(500).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (500, 499));
        assert_eq!(log.segment_count(), 1);
        assert!(matches!(
            log.append(&[entry(501, 3, 5)]),
            Err(LogError::NonContiguous { .. })
        ));
        log.append(&[entry(500, 3, 5)]).unwrap();
        log.sync().unwrap();
        drop(log);
        let (log, _) = Log::open(dir.path(), small_opts()).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (500, 500));
        assert_eq!(log.entry(500).unwrap(), entry(500, 3, 5));
    }

    #[test]
    fn reads_bypass_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions {
            cache_max_bytes: 0,
            ..small_opts()
        };
        let (mut log, _) = Log::open(dir.path(), opts).unwrap();
        let entries: Vec<Entry> = (1..=30).map(|i| entry(i, i / 7, 200)).collect();
        log.append(&entries).unwrap();
        assert!(log.cache.is_empty());
        assert_reads(&log, &entries);
        assert_eq!(log.entries(1, 31, None).unwrap(), entries);
    }

    #[test]
    fn oversized_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions {
            max_record_bytes: 100,
            ..small_opts()
        };
        let (mut log, _) = Log::open(dir.path(), opts).unwrap();
        assert!(matches!(
            log.append(&[entry(1, 1, 10), entry(2, 1, 500)]),
            Err(LogError::RecordTooLarge { max: 100, .. })
        ));
        assert_eq!(log.last_index(), 0);
    }

    #[test]
    fn corruption_in_the_middle_is_reported_with_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
        log.append(&(1..=10).map(|i| entry(i, 1, 50)).collect::<Vec<_>>())
            .unwrap();
        log.sync().unwrap();
        drop(log);
        let path = dir.path().join(segment::file_name(1));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = Log::open(dir.path(), small_opts())
            .err()
            .expect("must refuse");
        let message = err.to_string();
        match err {
            LogError::Corrupt {
                path: p, offset, ..
            } => {
                assert_eq!(p, path);
                assert_eq!(offset, 8, "the first record holds byte 40");
                assert!(message.contains("byte offset 8") && message.contains(".log"));
            }
            e => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn damage_to_the_last_synced_record_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
        log.append(&[entry(1, 1, 50), entry(2, 1, 50)]).unwrap();
        log.sync().unwrap();
        drop(log);
        let path = dir.path().join(segment::file_name(1));
        let mut bytes = std::fs::read(&path).unwrap();
        let in_record_2 = 8 + record::encoded_len(&entry(1, 1, 50)) as usize + 30;
        bytes[in_record_2] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Log::open(dir.path(), small_opts()),
            Err(LogError::Corrupt { .. })
        ));
    }

    #[test]
    fn torn_unsynced_write_is_cut_even_with_valid_records_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
        log.append(&[entry(1, 1, 50)]).unwrap();
        log.sync().unwrap();
        let synced_bytes = log.disk_bytes();
        // Not synced: a crash may persist record 3's page but not record 2's.
        log.append(&[entry(2, 1, 50), entry(3, 1, 50)]).unwrap();
        drop(log);
        let path = dir.path().join(segment::file_name(1));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[synced_bytes as usize + 20] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        let (log, report) = Log::open(dir.path(), small_opts()).unwrap();
        assert_eq!(log.last_index(), 1);
        assert_eq!(report.torn_tail, Some((path.clone(), synced_bytes)));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), synced_bytes);
    }

    #[test]
    fn header_torn_last_segment_and_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
        let entries: Vec<Entry> = (1..=100).map(|i| entry(i, 1, 100)).collect();
        log.append(&entries).unwrap();
        log.sync().unwrap();
        let firsts: Vec<u64> = log.segments.iter().map(|s| s.first_index).collect();
        drop(log);
        let last = dir
            .path()
            .join(segment::file_name(firsts[firsts.len() - 1]));
        std::fs::write(&last, b"TERN").unwrap();
        let (log, report) = Log::open(dir.path(), small_opts()).unwrap();
        assert_eq!(log.last_index(), firsts[firsts.len() - 1] - 1);
        assert_eq!(report.truncated_bytes, 4);
        drop(log);
        // A missing segment in the middle.
        std::fs::remove_file(dir.path().join(segment::file_name(firsts[1]))).unwrap();
        assert!(matches!(
            Log::open(dir.path(), small_opts()),
            Err(LogError::Corrupt { .. })
        ));
    }

    /// Model-based: random appends (with conflicts), syncs, releases, resets and
    /// reopens behave like a Vec of entries.
    #[derive(Debug, Clone)]
    enum Op {
        Append { back: u64, sizes: Vec<usize> },
        Sync,
        Release { at: u64 },
        Reset { ahead: u64 },
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..6u64, prop::collection::vec(0usize..700, 1..8))
                .prop_map(|(back, sizes)| Op::Append { back, sizes }),
            2 => Just(Op::Sync),
            1 => (0..200u64).prop_map(|at| Op::Release { at }),
            1 => (0..5u64).prop_map(|ahead| Op::Reset { ahead }),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn behaves_like_a_vec(ops in prop::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
            let mut model: Vec<Entry> = Vec::new();
            let mut model_first = 1u64;
            let mut term = 1;
            for op in ops {
                match op {
                    Op::Append { back, sizes } => {
                        let start = (log.last_index() + 1).saturating_sub(back).max(log.first_index());
                        term += u64::from(back > 0);
                        let batch: Vec<Entry> = sizes.iter().enumerate()
                            .map(|(i, size)| entry(start + i as u64, term, *size)).collect();
                        log.append(&batch).unwrap();
                        model.truncate((start - model_first) as usize);
                        model.extend(batch);
                    }
                    Op::Sync => log.sync().unwrap(),
                    Op::Release { at } => {
                        log.release_before(at).unwrap();
                        let drop_count = (log.first_index() - model_first) as usize;
                        prop_assert!(model[..drop_count].iter().all(|e| e.index < at));
                        model.drain(..drop_count);
                        model_first = log.first_index();
                    }
                    Op::Reset { ahead } => {
                        let next = log.last_index() + 1 + ahead;
                        log.reset(next).unwrap();
                        model.clear();
                        model_first = next;
                    }
                    Op::Reopen => {
                        log.sync().unwrap();
                        drop(log);
                        log = Log::open(dir.path(), small_opts()).unwrap().0;
                    }
                }
                prop_assert_eq!(log.first_index(), model_first);
                prop_assert_eq!(log.last_index(), model_first + model.len() as u64 - 1);
                prop_assert_eq!(&log.entries(model_first, log.last_index() + 1, None).unwrap(), &model);
                for e in &model {
                    prop_assert_eq!(log.term(e.index).unwrap(), e.term);
                }
            }
        }
    }
}
