//! The check behind the `log_recovery` fuzz target, shared with the corpus replay test
//! `crates/log/tests/fuzz_corpus.rs` (included there with `#[path]`).
//!
//! Byte 0 picks the mode:
//! - even: raw. The rest of the input is written as the segment file
//!   `00000000000000000001.log` of an otherwise empty log directory.
//! - odd: builder. The rest is a small program that writes well-formed records (valid
//!   CRC32C, so the fuzzer gets past the checksum), sync markers, new segments, torn
//!   ends, flipped bytes, garbage and out-of-order indexes (see `build`).
//!
//! Checked, whatever the bytes:
//! - `Log::open` returns `Ok` or a clean `Err`; it never panics;
//! - after `Ok`, every index in `[first_index, last_index]` reads back, and (builder
//!   mode) each entry is one that was written with that index: recovery never makes an
//!   entry up;
//! - the recovered log is usable: reopening it gives the same entries, and an append
//!   plus sync followed by another reopen gives those entries plus the new one.

use bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;
use tern_log::{Entry, Log, LogOptions};

const MAGIC: &[u8; 8] = b"TERNLOG1";
const MARKER_KIND: u8 = 255;

fn opts() -> LogOptions {
    LogOptions {
        segment_max_bytes: 64 << 10,
        cache_max_bytes: 64 << 10,
        max_record_bytes: 8 << 10,
    }
}

fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}.log")
}

fn record(index: u64, term: u64, kind: u8, context: &[u8], data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(21 + context.len() + data.len());
    body.extend_from_slice(&index.to_be_bytes());
    body.extend_from_slice(&term.to_be_bytes());
    body.push(kind);
    body.extend_from_slice(&(context.len() as u32).to_be_bytes());
    body.extend_from_slice(context);
    body.extend_from_slice(data);
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Builder mode: segments (first index, bytes) and every entry written per index.
struct Built {
    segments: Vec<(u64, Vec<u8>)>,
    written: HashMap<u64, Vec<Entry>>,
}

fn build(program: &[u8]) -> Built {
    let mut segments: Vec<(u64, Vec<u8>)> = vec![(1, MAGIC.to_vec())];
    let mut written: HashMap<u64, Vec<Entry>> = HashMap::new();
    let mut next = 1u64;
    let mut term = 1u64;
    let mut it = program.iter().copied();
    let arg = |it: &mut std::iter::Copied<std::slice::Iter<'_, u8>>| it.next().unwrap_or(0);
    while let Some(op) = it.next() {
        let seg = &mut segments.last_mut().expect("never empty").1;
        match op % 10 {
            // Entries are the common case.
            0..=3 => {
                let len = usize::from(arg(&mut it)) % 64;
                let ctx_len = if op % 10 == 3 {
                    usize::from(arg(&mut it)) % 8
                } else {
                    0
                };
                let fill = arg(&mut it);
                let data = vec![fill; len];
                let context = vec![fill ^ 0x5a; ctx_len];
                let kind = arg(&mut it) % 3;
                seg.extend_from_slice(&record(next, term, kind, &context, &data));
                written.entry(next).or_default().push(Entry {
                    index: next,
                    term,
                    kind,
                    context: Bytes::from(context),
                    data: Bytes::from(data),
                });
                next += 1;
            }
            4 => seg.extend_from_slice(&record(next - 1, 0, MARKER_KIND, &[], &[])),
            5 => term += u64::from(arg(&mut it) % 3),
            6 => {
                if segments.len() < 4 {
                    segments.push((next, MAGIC.to_vec()));
                }
            }
            7 => {
                // Flip one byte (never the magic).
                let at = usize::from(u16::from_be_bytes([arg(&mut it), arg(&mut it)]));
                let mask = arg(&mut it) | 1;
                if seg.len() > 8 {
                    let i = 8 + at % (seg.len() - 8);
                    seg[i] ^= mask;
                }
            }
            8 => {
                // Torn end: drop up to 255 bytes.
                let cut = usize::from(arg(&mut it));
                let keep = seg.len().saturating_sub(cut);
                seg.truncate(keep);
            }
            _ => match arg(&mut it) % 4 {
                // Garbage bytes, copied from the program itself.
                0 => {
                    let n = usize::from(arg(&mut it)) % 32;
                    for _ in 0..n {
                        let b = arg(&mut it);
                        seg.push(b);
                    }
                }
                // A well-formed record with the wrong index.
                1 => {
                    let skew = u64::from(arg(&mut it));
                    let index = next.wrapping_add(skew).wrapping_sub(128);
                    seg.extend_from_slice(&record(index, term, 0, &[], b"skew"));
                    written.entry(index).or_default().push(Entry {
                        index,
                        term,
                        kind: 0,
                        context: Bytes::new(),
                        data: Bytes::from_static(b"skew"),
                    });
                }
                // A marker for the wrong index.
                2 => {
                    let skew = u64::from(arg(&mut it));
                    seg.extend_from_slice(&record(
                        next.wrapping_add(skew),
                        0,
                        MARKER_KIND,
                        &[],
                        &[],
                    ));
                }
                // A record with an implausible length field and nothing after it.
                _ => {
                    let len = u32::from_be_bytes([
                        arg(&mut it),
                        arg(&mut it),
                        arg(&mut it),
                        arg(&mut it),
                    ]);
                    seg.extend_from_slice(&len.to_be_bytes());
                    seg.extend_from_slice(&[0; 4]);
                }
            },
        }
    }
    Built { segments, written }
}

fn read_all(log: &Log) -> Vec<Entry> {
    let (first, last) = (log.first_index(), log.last_index());
    assert!(
        first >= 1 && last + 1 >= first,
        "bad range [{first}, {last}]"
    );
    (first..=last)
        .map(|i| {
            log.entry(i).unwrap_or_else(|e| {
                panic!("entry {i} of the recovered log [{first}, {last}] does not read: {e}")
            })
        })
        .collect()
}

fn scratch_dir() -> tempfile::TempDir {
    // tmpfs makes fsync free, which is most of an execution's cost on a disk.
    let shm = Path::new("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix("tern-fuzz-log-");
    if shm.is_dir() {
        if let Ok(d) = b.tempdir_in(shm) {
            return d;
        }
    }
    b.tempdir().expect("temp dir")
}

pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tmp = scratch_dir();
    let dir = tmp.path().join("log");
    std::fs::create_dir(&dir).expect("mkdir");
    let written = if mode % 2 == 0 {
        std::fs::write(dir.join(segment_name(1)), rest).expect("write segment");
        None
    } else {
        let built = build(rest);
        for (first, bytes) in &built.segments {
            std::fs::write(dir.join(segment_name(*first)), bytes).expect("write segment");
        }
        Some(built.written)
    };

    let entries = match Log::open(&dir, opts()) {
        Ok((log, _report)) => read_all(&log),
        Err(_) => return,
    };
    if let Some(written) = &written {
        for e in &entries {
            let ok = written.get(&e.index).is_some_and(|w| w.contains(e));
            assert!(
                ok,
                "recovery returned an entry that was never written: {e:?}"
            );
        }
    }

    // Recovery left a log that opens again, the same.
    let (mut log, _) =
        Log::open(&dir, opts()).unwrap_or_else(|e| panic!("a recovered log does not reopen: {e}"));
    assert_eq!(read_all(&log), entries, "reopening changed the entries");

    // And it takes appends that survive a reopen.
    let next = Entry {
        index: log.last_index() + 1,
        term: entries.last().map_or(1, |e| e.term),
        kind: 0,
        context: Bytes::new(),
        data: Bytes::from_static(b"after recovery"),
    };
    log.append(std::slice::from_ref(&next))
        .unwrap_or_else(|e| panic!("append after recovery failed: {e}"));
    log.sync()
        .unwrap_or_else(|e| panic!("sync after recovery failed: {e}"));
    drop(log);
    let (log, _) = Log::open(&dir, opts())
        .unwrap_or_else(|e| panic!("the log does not reopen after an append: {e}"));
    let mut expected = entries;
    expected.push(next);
    assert_eq!(
        read_all(&log),
        expected,
        "append after recovery did not survive a reopen"
    );
}
