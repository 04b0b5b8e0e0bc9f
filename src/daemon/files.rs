//! Credentials on disk: one codec envelope per file (so corruption is
//! caught by the CRC), written atomically and readable only by the owner.

use crate::core::codec::{self, Wire};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why a credential file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is corrupt or not a keel credential file ({cause}); restore it from a backup")]
    Corrupt { path: String, cause: String },
}

/// Reads `path`, or `None` if it does not exist.
pub fn read<T: Wire>(path: &Path) -> Result<Option<T>, FileError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FileError::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    codec::decode(&bytes)
        .map(Some)
        .map_err(|e| FileError::Corrupt {
            path: path.display().to_string(),
            cause: e.to_string(),
        })
}

/// Writes `value` to `path` atomically (temporary file, fsync, rename,
/// directory fsync) with mode 0600: it holds private keys.
pub fn write<T: Wire>(path: &Path, value: &T) -> Result<(), FileError> {
    let error = |source| FileError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(error)?;
    file.write_all(&codec::encode(value)).map_err(error)?;
    file.sync_all().map_err(error)?;
    fs::rename(&tmp, path).map_err(error)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::kv::KvQuery;

    #[test]
    fn round_trip_private_and_corruption_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cred");
        assert!(read::<KvQuery>(&path).unwrap().is_none());
        let value = KvQuery::Get { key: b"k".to_vec() };
        write(&path, &value).unwrap();
        assert_eq!(read::<KvQuery>(&path).unwrap(), Some(value));
        let mode = fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(
            read::<KvQuery>(&path),
            Err(FileError::Corrupt { .. })
        ));
    }
}
