//! Small files replaced atomically (hard state, snapshots): write a temporary file in
//! the same directory, fsync it, rename it over the old one, fsync the directory.
//! Contents are framed as `magic "TERNFIL1" | u64 BE body length | u32 BE CRC32C(body)
//! | body`, so a damaged file is reported as corrupt, never returned.

use crate::{io_error, LogError};
use bytes::Bytes;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"TERNFIL1";
const HEADER_BYTES: usize = 8 + 8 + 4;

/// The directory holding `path` ("." for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// `<name>.tmp` next to `path` (appended, so `a.x` and `a.y` don't share one).
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map_or_else(OsString::new, OsString::from);
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    assert!(path.file_name().is_some(), "write_atomic needs a file path");
    let dir = parent_dir(path);
    let tmp = tmp_path(path);
    let mut framed = Vec::with_capacity(HEADER_BYTES + bytes.len());
    framed.extend_from_slice(MAGIC);
    framed.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    framed.extend_from_slice(&crc32c::crc32c(bytes).to_be_bytes());
    framed.extend_from_slice(bytes);
    {
        let mut file = std::fs::File::create(&tmp).map_err(io_error(&tmp))?;
        file.write_all(&framed).map_err(io_error(&tmp))?;
        // Durable before the rename publishes it, or a crash could publish a hole.
        file.sync_all().map_err(io_error(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_error(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Reads a file written by [`write_atomic`]: `Ok(None)` if it doesn't exist,
/// `Err(Corrupt)` if its framing or checksum is wrong.
pub fn read_checked(path: &Path) -> Result<Option<Bytes>, LogError> {
    let data = match std::fs::read(path) {
        Ok(data) => Bytes::from(data),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path)(e)),
    };
    let corrupt = |offset: u64, reason: &str| LogError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    };
    if data.len() < HEADER_BYTES || data[..8] != MAGIC[..] {
        return Err(corrupt(0, "missing or wrong header"));
    }
    let mut len_raw = [0u8; 8];
    len_raw.copy_from_slice(&data[8..16]);
    let mut crc_raw = [0u8; 4];
    crc_raw.copy_from_slice(&data[16..20]);
    if u64::from_be_bytes(len_raw) != (data.len() - HEADER_BYTES) as u64 {
        return Err(corrupt(8, "length does not match the file size"));
    }
    let body = data.slice(HEADER_BYTES..);
    if crc32c::crc32c(&body) != u32::from_be_bytes(crc_raw) {
        return Err(corrupt(16, "checksum mismatch"));
    }
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        assert!(read_checked(&path).unwrap().is_none());
        write_atomic(&path, b"hello").unwrap();
        write_atomic(&path, b"world!").unwrap();
        assert_eq!(
            read_checked(&path).unwrap().as_deref(),
            Some(&b"world!"[..])
        );
        write_atomic(&path, b"").unwrap();
        assert_eq!(read_checked(&path).unwrap().as_deref(), Some(&b""[..]));
        assert!(!tmp_path(&path).exists());
        assert_eq!(tmp_path(Path::new("a/b.x")), Path::new("a/b.x.tmp"));
        assert_eq!(parent_dir(Path::new("state")), Path::new("."));
    }

    #[test]
    fn every_bit_flip_and_truncation_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot");
        write_atomic(&path, b"some state").unwrap();
        let good = std::fs::read(&path).unwrap();
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            std::fs::write(&path, &bad).unwrap();
            assert!(
                matches!(read_checked(&path), Err(LogError::Corrupt { .. })),
                "bit {bit}"
            );
        }
        for len in 0..good.len() {
            std::fs::write(&path, &good[..len]).unwrap();
            assert!(
                matches!(read_checked(&path), Err(LogError::Corrupt { .. })),
                "len {len}"
            );
        }
    }
}
