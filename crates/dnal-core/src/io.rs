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
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(CoreError::io(dir))?;
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
