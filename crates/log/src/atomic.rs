//! Small files replaced atomically (hard state, snapshots): write a temporary file,
//! fsync it, rename it over the old one, fsync the directory. Contents are framed
//! with a magic, a length and a CRC32C so a damaged file is reported, never used.

use crate::LogError;
use bytes::Bytes;
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"TERNFIL1";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut head = Vec::with_capacity(16);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        head.extend_from_slice(&crc32c::crc32c(bytes).to_be_bytes());
        f.write_all(&head).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

pub fn read_checked(path: &Path) -> Result<Option<Bytes>, LogError> {
    let data = match std::fs::read(path) {
        Ok(d) => Bytes::from(d),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LogError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    let corrupt = |offset: u64, reason: &str| LogError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    };
    if data.len() < 20 || &data[..8] != MAGIC {
        return Err(corrupt(0, "missing header"));
    }
    let len = u64::from_be_bytes(data[8..16].try_into().unwrap_or([0; 8]));
    let crc = u32::from_be_bytes(data[16..20].try_into().unwrap_or([0; 4]));
    if len != (data.len() - 20) as u64 {
        return Err(corrupt(8, "length does not match the file size"));
    }
    let body = data.slice(20..);
    if crc32c::crc32c(&body) != crc {
        return Err(corrupt(16, "checksum mismatch"));
    }
    Ok(Some(body))
}
