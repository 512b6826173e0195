//! A global model served from its file: a read-only memory map of `models/<id>.safetensors`,
//! handed out as [`Bytes`] whose slices are the published chunks. The broker's retained
//! messages, the MQTT client's queue and the outputs all share these pages, which belong to
//! the kernel's page cache rather than to the aggregator's heap, so publishing a model costs no
//! copy of it in the process.
//!
//! Pages the process touched (hashing the chunks, the broker writing one to a socket) still
//! count in its resident set while they stay mapped; [`ModelFile::trim`] drops them from the
//! mapping (the page cache keeps them, a later read maps them again), so a model that agents
//! keep fetching does not settle in the aggregator's memory.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{Mmap, UncheckedAdvice};

/// A model file, mapped. Cheap to clone: clones share the mapping.
#[derive(Debug, Clone)]
pub struct ModelFile {
    map: Arc<Mmap>,
    bytes: Bytes,
}

/// The owner behind the [`Bytes`]: the mapping lives until the last slice is dropped (a
/// retained message the broker still holds, a publish still queued).
struct Owner(Arc<Mmap>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl ModelFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<ModelFile> {
        let file = File::open(path)?;
        // SAFETY: a model file is content-addressed: written whole under a temporary name and
        // renamed onto `<id>.safetensors`, never written in place or truncated afterwards, so
        // the mapped bytes cannot change under a reader. (Someone editing the state dir by
        // hand could still do it; agents would then drop the chunks, whose hashes the signed
        // manifest fixes.)
        #[allow(unsafe_code)]
        let map = Arc::new(unsafe { Mmap::map(&file)? });
        let bytes = Bytes::from_owner(Owner(map.clone()));
        Ok(ModelFile { map, bytes })
    }

    /// The whole file; slices of it share the mapping.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Drops the pages this process has touched from the mapping, keeping the content: the
    /// next read faults them in again from the page cache (or the disk).
    pub fn trim(&self) {
        if self.map.is_empty() {
            return;
        }
        // SAFETY: MADV_DONTNEED on a read-only, file-backed mapping discards no data: it
        // only unmaps the pages, and a later access maps the file's (unchanged) content
        // again. Readers on other threads see the same bytes throughout.
        #[allow(unsafe_code)]
        let r = unsafe { self.map.unchecked_advise(UncheckedAdvice::DontNeed) };
        if let Err(e) = r {
            tracing::debug!(error = %e, "madvise(DONTNEED) on the model file failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident pages of the mapping at `ptr..ptr+len`, from `/proc/self/smaps`.
    fn resident_kib(ptr: *const u8) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let addr = ptr as usize;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("Rss:") {
                    return v.trim().trim_end_matches(" kB").trim().parse().unwrap();
                }
            }
        }
        panic!("mapping not found in /proc/self/smaps");
    }

    #[test]
    fn slices_read_the_file_and_trim_unmaps_touched_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let content: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let m = ModelFile::open(&path).unwrap();
        assert_eq!(&m.bytes()[..], &content[..]);
        let chunk = m.bytes().slice(1 << 20..2 << 20);
        assert_eq!(&chunk[..], &content[1 << 20..2 << 20]);
        // Read whole above: resident. Trimmed: not, and the content is still there.
        assert!(resident_kib(m.bytes().as_ptr()) >= 4 << 10);
        m.trim();
        assert!(resident_kib(m.bytes().as_ptr()) < 1 << 10);
        assert_eq!(&chunk[..], &content[1 << 20..2 << 20]);
        // A slice keeps the mapping alive after the file handle is gone.
        drop(m);
        assert_eq!(chunk.len(), 1 << 20);
        assert_eq!(chunk[0], content[1 << 20]);
    }
}
