//! Recovery: scan every segment in index order, verify each record (length, CRC32C,
//! index contiguity, across segments too), cut a torn tail off the last segment, and
//! refuse (`LogError::Corrupt`, naming file and byte offset) anything else.
//!
//! Why the rules are sound, given how `Log` writes:
//! - A segment is fdatasynced before its successor is created (roll), and deleted
//!   segments are made durable (directory fsync) before the surviving one is rewritten
//!   (conflict truncation). So every segment but the last is complete: any defect in
//!   it, or a gap between segments, is corruption.
//! - `sync` appends a marker record after the data it makes durable. A bad record in
//!   the last segment followed by a valid marker was synced: corruption. A bad record
//!   with no valid marker after it belongs to a write that was never acknowledged: a
//!   torn tail, cut off and reported.

use crate::record::{self, Defect};
use crate::segment::{self, Segment, MAGIC, MAGIC_BYTES};
use crate::{io_error, LogError, LogOptions, RecoveryReport};
use bytes::Bytes;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// First indexes of the segment files in `dir`, ascending.
fn list_segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut firsts = Vec::new();
    for item in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let item = item.map_err(io_error(dir))?;
        let name = item.file_name();
        match name.to_str().and_then(segment::parse_file_name) {
            Some(first) => firsts.push(first),
            None => {
                tracing::warn!(file = ?name, dir = %dir.display(), "ignoring a file that is not a segment")
            }
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Recovers every segment of `dir`. Returns them in order (possibly none).
pub fn recover_dir(
    dir: &Path,
    opts: &LogOptions,
) -> Result<(Vec<Segment>, RecoveryReport), LogError> {
    let firsts = list_segments(dir)?;
    let mut report = RecoveryReport::default();
    let mut segments: Vec<Segment> = Vec::with_capacity(firsts.len());
    for (i, first_index) in firsts.iter().copied().enumerate() {
        let path = dir.join(segment::file_name(first_index));
        if let Some(prev) = segments.last() {
            if prev.next_index() != first_index {
                return Err(LogError::Corrupt {
                    path,
                    offset: 0,
                    reason: format!(
                        "index gap: the previous segment ends before index {}",
                        prev.next_index()
                    ),
                });
            }
        }
        let is_last = i + 1 == firsts.len();
        let (segment, torn) = recover_segment(&path, first_index, is_last, opts.max_record_bytes)?;
        if let Some((offset, cut_bytes)) = torn {
            report.torn_tail = Some((path, offset));
            report.truncated_bytes += cut_bytes;
        }
        report.records += segment.len();
        segments.push(segment);
    }
    report.segments = segments.len();
    Ok((segments, report))
}

/// Scans one segment. Returns it and, if a torn tail was cut, (offset, bytes cut).
fn recover_segment(
    path: &Path,
    first_index: u64,
    is_last: bool,
    max_record_bytes: u32,
) -> Result<(Segment, Option<(u64, u64)>), LogError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error(path))?;
    let data = Bytes::from(std::fs::read(path).map_err(io_error(path))?);
    let mut segment = Segment::opened(path.to_path_buf(), file, first_index);
    if data.len() < MAGIC.len() || data[..MAGIC.len()] != MAGIC[..] {
        // A last segment created just before a crash may lack (part of) its header.
        let partial = MAGIC.starts_with(&data[..]) || data.iter().all(|b| *b == 0);
        let torn_header = is_last && data.len() < MAGIC.len() && partial;
        if !torn_header {
            return Err(corrupt(path, 0, "missing or wrong segment header".into()));
        }
        segment.file().set_len(0).map_err(io_error(path))?;
        segment
            .file()
            .write_all_at(MAGIC, 0)
            .map_err(io_error(path))?;
        segment.file().sync_data().map_err(io_error(path))?;
        let torn = (!data.is_empty()).then_some((0, data.len() as u64));
        return Ok((segment, torn));
    }
    let end_bytes = scan_records(&mut segment, &data, is_last, max_record_bytes)?;
    let torn = if end_bytes < data.len() as u64 {
        // A torn tail: nothing after it was acknowledged. Cut it durably, so a later
        // append can't end up behind stale bytes.
        segment.file().set_len(end_bytes).map_err(io_error(path))?;
        segment.file().sync_data().map_err(io_error(path))?;
        tracing::warn!(path = %path.display(), offset = end_bytes, cut_bytes = data.len() as u64 - end_bytes, "cut a torn tail");
        Some((end_bytes, data.len() as u64 - end_bytes))
    } else {
        None
    };
    segment.set_recovered_size(end_bytes);
    Ok((segment, torn))
}

/// Adds every valid record of `data` to `segment`; returns where the valid part ends
/// (before a torn tail, if any). Errors on corruption.
fn scan_records(
    segment: &mut Segment,
    data: &Bytes,
    is_last: bool,
    max_record_bytes: u32,
) -> Result<u64, LogError> {
    let path = segment.path.clone();
    let mut pos = MAGIC.len();
    while pos < data.len() {
        let expected = segment.next_index();
        match record::decode(data, pos, max_record_bytes) {
            Ok((entry, record_bytes)) if record::is_marker(&entry) => {
                if entry.index + 1 != expected {
                    let reason = format!(
                        "sync marker for index {} where {} was expected",
                        entry.index,
                        expected - 1
                    );
                    return Err(corrupt(&path, pos as u64, reason));
                }
                pos += record_bytes;
            }
            Ok((entry, record_bytes)) if entry.index == expected => {
                if !segment.push(pos as u64, entry.term) {
                    let reason = "record starts past 4 GiB: segment too large".into();
                    return Err(corrupt(&path, pos as u64, reason));
                }
                pos += record_bytes;
            }
            Ok((entry, _)) => {
                let reason = format!("record has index {}, expected {expected}", entry.index);
                return Err(corrupt(&path, pos as u64, reason));
            }
            Err(defect) => {
                check_torn(
                    &path,
                    data,
                    pos,
                    expected,
                    is_last,
                    defect,
                    max_record_bytes,
                )?;
                return Ok(pos as u64);
            }
        }
    }
    Ok(data.len() as u64)
}

/// A bad record at `pos`: Ok if it is a torn tail, else the corruption error.
fn check_torn(
    path: &Path,
    data: &Bytes,
    pos: usize,
    expected: u64,
    is_last: bool,
    defect: Defect,
    max_record_bytes: u32,
) -> Result<(), LogError> {
    if !is_last {
        let reason = format!("{defect} in a segment that is not the last");
        return Err(corrupt(path, pos as u64, reason));
    }
    // Bounded by the file size; each position is rejected by cheap checks unless it
    // really looks like a marker.
    let after = expected - 1;
    if let Some(marker_pos) =
        (pos + 1..data.len()).find(|p| record::marker_at(data, *p, after, max_record_bytes))
    {
        let reason = format!("{defect}, followed by synced data (marker at byte {marker_pos})");
        return Err(corrupt(path, pos as u64, reason));
    }
    debug_assert!(pos as u64 >= MAGIC_BYTES);
    Ok(())
}

fn corrupt(path: &Path, offset: u64, reason: String) -> LogError {
    LogError::Corrupt {
        path: PathBuf::from(path),
        offset,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::{entry, small_opts};
    use crate::{record, Entry, Log, LogError};
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::path::PathBuf;

    #[derive(Debug, Clone)]
    enum Damage {
        /// Cut a file at a fraction of its length.
        Truncate {
            pick: usize,
            at: f64,
        },
        FlipBit {
            pick: usize,
            at: f64,
            bit: u8,
        },
        /// Junk after the end of the last segment (an unsynced write gone wrong).
        Garbage {
            bytes: Vec<u8>,
        },
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            (any::<usize>(), 0.0..1.0f64).prop_map(|(pick, at)| Damage::Truncate { pick, at }),
            (any::<usize>(), 0.0..1.0f64, 0..8u8).prop_map(|(pick, at, bit)| Damage::FlipBit {
                pick,
                at,
                bit
            }),
            prop::collection::vec(any::<u8>(), 1..200).prop_map(|bytes| Damage::Garbage { bytes }),
        ]
    }

    fn segment_files(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    /// (index, end offset) of each entry record in a segment file.
    fn record_ends(path: &std::path::Path) -> Vec<(u64, u64)> {
        let data = Bytes::from(std::fs::read(path).unwrap());
        let mut pos = 8;
        let mut ends = Vec::new();
        while let Ok((e, record_bytes)) = record::decode(&data, pos, 1 << 20) {
            pos += record_bytes;
            if !record::is_marker(&e) {
                ends.push((e.index, pos as u64));
            }
        }
        ends
    }

    /// Applies `damage`; returns the cut offset if the last segment was truncated.
    fn apply(damage: &Damage, files: &[PathBuf]) -> Option<u64> {
        let last = &files[files.len() - 1];
        match damage {
            Damage::Truncate { pick, at } => {
                let path = &files[pick % files.len()];
                let cut = (std::fs::metadata(path).unwrap().len() as f64 * at) as u64;
                let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                file.set_len(cut).unwrap();
                (path == last).then_some(cut)
            }
            Damage::FlipBit { pick, at, bit } => {
                let path = &files[pick % files.len()];
                let mut bytes = std::fs::read(path).unwrap();
                if !bytes.is_empty() {
                    let at = ((bytes.len() as f64 * at) as usize).min(bytes.len() - 1);
                    bytes[at] ^= 1 << bit;
                    std::fs::write(path, &bytes).unwrap();
                }
                None
            }
            Damage::Garbage { bytes } => {
                let mut data = std::fs::read(last).unwrap();
                data.extend_from_slice(bytes);
                std::fs::write(last, &data).unwrap();
                None
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// After random damage, recovery yields exactly a prefix of what was written, or
        /// reports corruption; cutting the last segment always recovers every record
        /// wholly before the cut; junk after the end loses nothing; undamaged,
        /// everything is recovered (nothing synced is ever lost).
        #[test]
        fn recovery_is_a_prefix_or_an_error(
            batches in prop::collection::vec(
                (prop::collection::vec(0usize..300, 1..8), any::<bool>()), 1..12),
            damage in prop::option::of(damage()),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (mut log, _) = Log::open(dir.path(), small_opts()).unwrap();
            let mut written: Vec<Entry> = Vec::new();
            let mut synced_count = 0;
            for (sizes, sync) in &batches {
                let start = written.len() as u64 + 1;
                let batch: Vec<Entry> = sizes.iter().enumerate()
                    .map(|(i, size)| entry(start + i as u64, 1 + start / 10, *size)).collect();
                log.append(&batch).unwrap();
                written.extend(batch);
                if *sync {
                    log.sync().unwrap();
                    synced_count = written.len();
                }
            }
            drop(log);
            let files = segment_files(dir.path());
            let last = files[files.len() - 1].clone();
            let last_first: u64 = last.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            let ends = record_ends(&last);
            let cut = damage.as_ref().and_then(|d| apply(d, &files));
            let only_tail_damage = matches!(damage, None | Some(Damage::Garbage { .. })) || cut.is_some();
            match Log::open(dir.path(), small_opts()) {
                Err(LogError::Corrupt { .. }) => {
                    prop_assert!(!only_tail_damage, "only damage inside the log may be corruption");
                }
                Err(e) => prop_assert!(false, "unexpected error {}", e),
                Ok((log, _)) => {
                    let n = log.last_index() as usize;
                    prop_assert!(n <= written.len());
                    prop_assert_eq!(log.first_index(), 1);
                    for e in &written[..n] {
                        prop_assert_eq!(&log.entry(e.index).unwrap(), e);
                        prop_assert_eq!(log.term(e.index).unwrap(), e.term);
                    }
                    if matches!(damage, None | Some(Damage::Garbage { .. })) {
                        prop_assert_eq!(n, written.len());
                        prop_assert!(n >= synced_count);
                    }
                    if let Some(cut) = cut {
                        let expect_last = ends.iter().filter(|(_, end)| *end <= cut)
                            .map(|(index, _)| *index).max().unwrap_or(last_first - 1);
                        prop_assert_eq!(n as u64, expect_last);
                    }
                }
            }
        }
    }
}
