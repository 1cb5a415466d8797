//! Writing files so that a crash never leaves a half-written one behind: every file dnal
//! writes (configs, weights, reports, plots, downloads) goes through [`write_atomic_with`].

use std::io::Write;
use std::path::Path;

use crate::error::{CoreError, Result};

/// Creates or replaces `path` atomically: `write` fills a fresh temporary file in the same
/// folder (given by its path, so that libraries which open files themselves can write it), which
/// is then synced and renamed over `path`. If `write` or the rename fails, the temporary file is
/// removed and `path` keeps its old content.
pub fn write_atomic_with<E: From<CoreError>>(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(CoreError::io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // A temporary file is private (0600) by default; what dnal writes is a normal output, created
    // like any other file: read-write for all, less the process's umask.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let tmp = builder.tempfile_in(dir).map_err(CoreError::io(dir))?;
    write(tmp.path())?;
    let file = std::fs::File::open(tmp.path()).map_err(CoreError::io(tmp.path()))?;
    file.sync_all().map_err(CoreError::io(tmp.path()))?;
    tmp.persist(path)
        .map_err(|e| CoreError::io(path)(e.error))?;
    Ok(())
}

/// Writes `bytes` to `path` atomically (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(CoreError::io(tmp))?;
        f.write_all(bytes).map_err(CoreError::io(tmp))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(CoreError::invalid("test", "failed on purpose"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[cfg(unix)]
    #[test]
    fn written_files_get_the_permissions_of_any_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let atomic = dir.path().join("model.onnx");
        write_atomic(&atomic, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&atomic), mode(&plain));
    }
}
