//! Whole-file replacement that a crash cannot tear: write a sibling temp file, rename it over.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::Error;

/// How hard [`write_atomic`] tries to make the new content survive a power loss.
///
/// Both levels are atomic for readers and for a crash of the process: the path holds either
/// the old or the new content, never a mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Rename only. After a power loss (not a process crash) the file may be the old one, or
    /// on some file systems empty. For files that are cheap to rebuild (status, caches).
    Atomic,
    /// fsync the temp file before the rename and the directory after it: once this returns
    /// the new content survives a power loss. For state that the daemon resumes from.
    Durable,
}

/// Replaces `path` with `bytes`, creating parent directories. See [`Durability`].
pub fn write_atomic(path: &Path, bytes: &[u8], durability: Durability) -> Result<(), Error> {
    replace(path, bytes, durability, None)
}

/// [`write_atomic`] with [`Durability::Durable`] for a secret: the file is created mode 0600
/// (on Unix), so it is never briefly readable by others.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    replace(path, bytes, Durability::Durable, Some(0o600))
}

fn replace(
    path: &Path,
    bytes: &[u8],
    durability: Durability,
    mode: Option<u32>,
) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = open_new(&tmp, mode)?;
        f.write_all(bytes)?;
        if durability == Durability::Durable {
            f.sync_all()?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io {
            path: tmp,
            source: e,
        });
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::Io {
            path: path.to_owned(),
            source: e,
        }
    })?;
    if durability == Durability::Durable {
        // Makes the rename itself durable; not every platform can fsync a directory.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(unix)]
fn open_new(p: &Path, mode: Option<u32>) -> std::io::Result<fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut o = fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if let Some(m) = mode {
        o.mode(m);
    }
    let f = o.open(p)?;
    if let Some(m) = mode {
        // A stale temp file may have pre-existed with looser permissions.
        f.set_permissions(fs::Permissions::from_mode(m))?;
    }
    Ok(f)
}

#[cfg(not(unix))]
fn open_new(p: &Path, _mode: Option<u32>) -> std::io::Result<fs::File> {
    fs::File::create(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/x.json");
        write_atomic(&p, b"one", Durability::Durable).unwrap();
        write_atomic(&p, b"two", Durability::Atomic).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path().join("sub")).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        write_atomic(&p, b"old", Durability::Durable).unwrap();
        // A directory where the file should go: the rename fails, nothing is torn.
        let blocked = d.path().join("dir");
        fs::create_dir_all(blocked.join("child")).unwrap();
        assert!(write_atomic(&blocked, b"new", Durability::Durable).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2, "no temp left");
    }

    #[cfg(unix)]
    #[test]
    fn private_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        write_private(&p, b"secret").unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
