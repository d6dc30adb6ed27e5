use super::*;
use proptest::prelude::*;

fn entry(index: u64, term: u64, size: usize) -> Entry {
    let data: Vec<u8> = (0..size).map(|i| (index as usize * 31 + i) as u8).collect();
    Entry {
        index,
        term,
        kind: (index % 3) as u8,
        context: Bytes::from(vec![index as u8; (index % 4) as usize]),
        data: Bytes::from(data),
    }
}

fn small_opts() -> LogOptions {
    LogOptions {
        segment_max_bytes: 4096,
        cache_max_bytes: 2048,
        max_record_bytes: 1 << 20,
    }
}

#[test]
fn append_read_roll_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut log, _) = Log::open(dir.path(), small_opts()).expect("open");
    assert_eq!((log.first_index(), log.last_index()), (1, 0));
    let entries: Vec<Entry> = (1..=100).map(|i| entry(i, 1 + i / 40, 100)).collect();
    log.append(&entries[..50]).expect("append");
    log.append(&entries[50..]).expect("append");
    log.sync().expect("sync");
    assert!(log.segment_count() > 1, "segments roll");
    for e in &entries {
        assert_eq!(&log.entry(e.index).expect("read"), e);
        assert_eq!(log.term(e.index).expect("term"), e.term);
    }
    assert_eq!(log.entries(10, 20, None).expect("range").len(), 10);
    assert_eq!(log.entries(10, 20, Some(1)).expect("range").len(), 1);
    drop(log);
    let (log, report) = Log::open(dir.path(), small_opts()).expect("reopen");
    assert_eq!(report.records, 100);
    assert!(report.torn_tail.is_none());
    for e in &entries {
        assert_eq!(&log.entry(e.index).expect("read"), e);
    }
}

#[test]
fn conflict_truncation_across_segments() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut log, _) = Log::open(dir.path(), small_opts()).expect("open");
    let entries: Vec<Entry> = (1..=100).map(|i| entry(i, 1, 100)).collect();
    log.append(&entries).expect("append");
    let segments_before = log.segment_count();
    let replacement: Vec<Entry> = (20..=25).map(|i| entry(i, 2, 10)).collect();
    log.append(&replacement).expect("overwrite");
    log.sync().expect("sync");
    assert!(log.segment_count() < segments_before);
    assert_eq!(log.last_index(), 25);
    assert_eq!(log.term(19).expect("term"), 1);
    assert_eq!(log.term(20).expect("term"), 2);
    assert!(matches!(
        log.append(&[entry(30, 2, 1)]),
        Err(LogError::NonContiguous { .. })
    ));
    drop(log);
    let (log, _) = Log::open(dir.path(), small_opts()).expect("reopen");
    assert_eq!(log.last_index(), 25);
    assert_eq!(log.entry(22).expect("read"), replacement[2]);
}

#[test]
fn release_and_reset() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut log, _) = Log::open(dir.path(), small_opts()).expect("open");
    let entries: Vec<Entry> = (1..=100).map(|i| entry(i, 1, 100)).collect();
    log.append(&entries).expect("append");
    let before = log.disk_bytes();
    let freed = log.release_before(60).expect("release");
    assert!(freed > 0 && log.disk_bytes() == before - freed);
    assert!(log.first_index() <= 60 && log.first_index() > 1);
    assert!(matches!(log.entry(1), Err(LogError::OutOfRange { .. })));
    assert_eq!(log.entry(60).expect("kept"), entries[59]);
    log.reset(500).expect("reset");
    assert_eq!((log.first_index(), log.last_index()), (500, 499));
    log.append(&[entry(500, 3, 5)]).expect("append after reset");
    log.sync().expect("sync");
    drop(log);
    let (log, _) = Log::open(dir.path(), small_opts()).expect("reopen");
    assert_eq!((log.first_index(), log.last_index()), (500, 500));
}

#[test]
fn oversized_record_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let opts = LogOptions {
        max_record_bytes: 100,
        ..small_opts()
    };
    let (mut log, _) = Log::open(dir.path(), opts).expect("open");
    assert!(matches!(
        log.append(&[entry(1, 1, 500)]),
        Err(LogError::RecordTooLarge { .. })
    ));
    assert_eq!(log.last_index(), 0);
}

#[test]
fn corruption_in_the_middle_is_reported_with_file_and_offset() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut log, _) = Log::open(dir.path(), small_opts()).expect("open");
    log.append(&(1..=10).map(|i| entry(i, 1, 50)).collect::<Vec<_>>())
        .expect("append");
    log.sync().expect("sync");
    drop(log);
    let path = dir.path().join(segment::file_name(1));
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[40] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    match Log::open(dir.path(), small_opts()) {
        Err(LogError::Corrupt {
            path: p, offset, ..
        }) => {
            assert_eq!(p, path);
            // The offset of the damaged record (byte 40 lies inside it).
            assert!((8..=40).contains(&offset), "offset {offset}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("corrupt data accepted"),
    }
}

#[test]
fn atomic_files_detect_damage() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("state");
    assert!(read_checked(&path).expect("missing is fine").is_none());
    write_atomic(&path, b"hello").expect("write");
    assert_eq!(
        read_checked(&path).expect("read").as_deref(),
        Some(&b"hello"[..])
    );
    let mut bytes = std::fs::read(&path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    std::fs::write(&path, &bytes).expect("write");
    assert!(matches!(read_checked(&path), Err(LogError::Corrupt { .. })));
}

#[derive(Debug, Clone)]
enum Damage {
    Truncate {
        segment_pick: usize,
        at_fraction: f64,
    },
    FlipBit {
        segment_pick: usize,
        at_fraction: f64,
        bit: u8,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 0.0..1.0f64).prop_map(|(s, f)| Damage::Truncate {
            segment_pick: s,
            at_fraction: f
        }),
        (any::<usize>(), 0.0..1.0f64, 0..8u8).prop_map(|(s, f, b)| Damage::FlipBit {
            segment_pick: s,
            at_fraction: f,
            bit: b
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// After random damage, recovery yields exactly a prefix of what was written, or
    /// reports corruption; truncating the last segment always recovers every record
    /// that lies wholly before the cut; undamaged, everything synced is recovered.
    #[test]
    fn recovery_is_a_prefix_or_an_error(
        batches in prop::collection::vec(prop::collection::vec(1usize..300, 1..8), 1..12),
        dmg in prop::option::of(damage()),
    ) {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut log, _) = Log::open(dir.path(), small_opts()).expect("open");
        let mut written = Vec::new();
        let mut index = 1;
        for batch in &batches {
            let entries: Vec<Entry> = batch.iter().map(|size| { let e = entry(index, 1, *size); index += 1; e }).collect();
            log.append(&entries).expect("append");
            log.sync().expect("sync");
            written.extend(entries);
        }
        drop(log);
        let mut files: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").path()).collect();
        files.sort();
        // End offset of each entry in the last segment, read before any damage.
        let last_first: u64 = files.last().and_then(|p| p.file_stem()).and_then(|s| s.to_str()).and_then(|s| s.parse().ok()).expect("name");
        let ends_before_damage: Vec<(u64, u64)> = {
            let data = Bytes::from(std::fs::read(files.last().expect("one")).expect("read"));
            let mut pos = 8;
            let mut ends = Vec::new();
            while let Ok((e, len)) = record::decode(&data, pos, 1 << 20) {
                pos += len;
                if e.kind != record::MARKER_KIND {
                    ends.push((e.index, pos as u64));
                }
            }
            ends
        };
        let mut truncated_last = None;
        match &dmg {
            None => {}
            Some(Damage::Truncate { segment_pick, at_fraction }) => {
                let f = &files[segment_pick % files.len()];
                let len = std::fs::metadata(f).expect("meta").len();
                let cut = (len as f64 * at_fraction) as u64;
                std::fs::OpenOptions::new().write(true).open(f).expect("open").set_len(cut).expect("truncate");
                if f == files.last().expect("one") { truncated_last = Some(cut); }
            }
            Some(Damage::FlipBit { segment_pick, at_fraction, bit }) => {
                let f = &files[segment_pick % files.len()];
                let mut bytes = std::fs::read(f).expect("read");
                if !bytes.is_empty() {
                    let at = ((bytes.len() as f64 * at_fraction) as usize).min(bytes.len() - 1);
                    bytes[at] ^= 1 << bit;
                    std::fs::write(f, &bytes).expect("write");
                }
            }
        }
        match Log::open(dir.path(), small_opts()) {
            Err(LogError::Corrupt { .. }) => prop_assert!(dmg.is_some() && truncated_last.is_none(), "only damage may make recovery fail"),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
            Ok((log, _)) => {
                let n = log.last_index();
                prop_assert!(n as usize <= written.len());
                prop_assert_eq!(log.first_index(), 1);
                for e in &written[..n as usize] {
                    prop_assert_eq!(&log.entry(e.index).expect("read"), e);
                }
                if dmg.is_none() {
                    prop_assert_eq!(n as usize, written.len());
                }
                if let Some(cut) = truncated_last {
                    // Every entry wholly before the cut in the last segment survives.
                    let expect_last = ends_before_damage
                        .iter()
                        .filter(|(_, end)| *end <= cut)
                        .map(|(index, _)| *index)
                        .max()
                        .unwrap_or(last_first - 1);
                    prop_assert_eq!(n, expect_last);
                }
            }
        }
    }
}
