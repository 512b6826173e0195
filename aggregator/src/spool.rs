//! The update spool on disk: one file per upload, each chunk written in place at its offset,
//! the whole file renamed into `accepted/` once the update is accepted.
//!
//! ```text
//! spool/r<round>/<cid>.manifest the client's signed manifest, as received
//! spool/r<round>/<cid>.part     the blob as it fills in: chunk i at i·chunk_size
//! spool/r<round>/<cid>.chunks   8 bytes per stored chunk (index, length; u32 LE), appended
//!                               after the chunk's bytes: what a restart resumes from
//! ```
//!
//! So an accepted update's bytes are written once (as chunks arrive) and renamed, never copied.
//! Neither file is fsynced per chunk: after a power loss a torn chunk fails the SHA-256 check
//! and the client's update is rejected, never accepted corrupt. The rename into `accepted/` is
//! durable (file and directory fsync) before `state.json` records the acceptance.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::store::Store;

fn part_path(store: &Store, round: u64, cid: &str) -> PathBuf {
    store.spool_round_dir(round).join(format!("{cid}.part"))
}

fn log_path(store: &Store, round: u64, cid: &str) -> PathBuf {
    store.spool_round_dir(round).join(format!("{cid}.chunks"))
}

fn manifest_path(store: &Store, round: u64, cid: &str) -> PathBuf {
    store.spool_round_dir(round).join(format!("{cid}.manifest"))
}

/// Keeps the upload's signed manifest (the CBOR received), so a restart can resume it.
pub fn write_manifest(store: &Store, round: u64, cid: &str, payload: &[u8]) -> Result<()> {
    let dir = store.spool_round_dir(round);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    zk0_daemon::write_atomic(
        &manifest_path(store, round, cid),
        payload,
        zk0_daemon::Durability::Atomic,
    )?;
    Ok(())
}

/// An upload spooled before a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Spooled {
    /// The signed manifest, as received.
    pub manifest: Vec<u8>,
    /// Stored chunks: index → length (a chunk logged twice keeps its last length).
    pub chunks: BTreeMap<u32, u32>,
}

/// Writes chunk `index` at `offset` of the upload's file and logs it.
pub fn write_chunk(
    store: &Store,
    round: u64,
    cid: &str,
    index: u32,
    offset: u64,
    bytes: &[u8],
) -> Result<()> {
    let dir = store.spool_round_dir(round);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let part = part_path(store, round, cid);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part)
        .with_context(|| format!("opening {}", part.display()))?;
    f.write_all_at(bytes, offset)
        .with_context(|| format!("writing chunk {index} into {}", part.display()))?;
    let log = log_path(store, round, cid);
    let mut record = [0u8; 8];
    record[..4].copy_from_slice(&index.to_le_bytes());
    record[4..].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .and_then(|mut l| l.write_all(&record))
        .with_context(|| format!("appending to {}", log.display()))
}

/// The first `len` bytes of the upload's file: the blob to verify.
pub fn read_blob(store: &Store, round: u64, cid: &str, len: u64) -> Result<Vec<u8>> {
    let part = part_path(store, round, cid);
    let f = File::open(&part).with_context(|| format!("opening {}", part.display()))?;
    let mut blob = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(len)
        .read_to_end(&mut blob)
        .with_context(|| format!("reading {}", part.display()))?;
    Ok(blob)
}

/// Moves the verified upload to `accepted/r<round>/<cid>.delta`, durably, cut to `len` bytes
/// (junk chunks past the manifest's count may have grown the file).
pub fn accept(store: &Store, round: u64, cid: &str, len: u64) -> Result<PathBuf> {
    let part = part_path(store, round, cid);
    let dest = store.accepted_path(round, cid);
    let dir = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let f = OpenOptions::new()
        .write(true)
        .open(&part)
        .with_context(|| format!("opening {}", part.display()))?;
    f.set_len(len)?;
    f.sync_all()?;
    fs::rename(&part, &dest).with_context(|| format!("renaming onto {}", dest.display()))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    let _ = fs::remove_file(log_path(store, round, cid));
    let _ = fs::remove_file(manifest_path(store, round, cid));
    Ok(dest)
}

/// Forgets an upload's stored chunks and manifest (rejected, or superseded).
pub fn discard(store: &Store, round: u64, cid: &str) {
    let _ = fs::remove_file(part_path(store, round, cid));
    let _ = fs::remove_file(log_path(store, round, cid));
    let _ = fs::remove_file(manifest_path(store, round, cid));
}

/// After a restart: every upload spooled for `round` with its manifest (chunks without one
/// were never asked for and are ignored).
pub fn stored(store: &Store, round: u64) -> BTreeMap<String, Spooled> {
    let mut out = BTreeMap::new();
    let Ok(rd) = fs::read_dir(store.spool_round_dir(round)) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(cid) = name.strip_suffix(".manifest") else {
            continue;
        };
        if shared_proto::topic::validate_client_id(cid).is_err() {
            continue;
        }
        let Ok(manifest) = fs::read(e.path()) else {
            continue;
        };
        let log = fs::read(log_path(store, round, cid)).unwrap_or_default();
        // A crash mid-append leaves a short last record: ignore it (that chunk is resent).
        let chunks = log
            .chunks_exact(8)
            .map(|r| {
                let index = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
                let len = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
                (index, len)
            })
            .collect();
        out.insert(cid.to_string(), Spooled { manifest, chunks });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_land_in_place_and_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        // Out of order, one repeated, chunk size 4.
        write_manifest(&store, 3, "arm-a", b"signed").unwrap();
        write_chunk(&store, 3, "arm-a", 1, 4, b"efgh").unwrap();
        write_chunk(&store, 3, "arm-a", 2, 8, b"ij").unwrap();
        write_chunk(&store, 3, "arm-a", 0, 0, b"xxxx").unwrap();
        write_chunk(&store, 3, "arm-a", 0, 0, b"abcd").unwrap();
        let s = stored(&store, 3);
        assert_eq!(s["arm-a"].manifest, b"signed");
        assert_eq!(
            s["arm-a"]
                .chunks
                .iter()
                .map(|(&i, &l)| (i, l))
                .collect::<Vec<_>>(),
            [(0, 4), (1, 4), (2, 2)]
        );
        assert_eq!(read_blob(&store, 3, "arm-a", 10).unwrap(), b"abcdefghij");
        let path = accept(&store, 3, "arm-a", 10).unwrap();
        assert_eq!(fs::read(path).unwrap(), b"abcdefghij");
        assert!(stored(&store, 3).is_empty(), "the log goes with the accept");
        write_chunk(&store, 3, "arm-c", 0, 0, b"zz").unwrap();
        assert!(
            stored(&store, 3).is_empty(),
            "chunks without a manifest do not resume"
        );
        write_manifest(&store, 3, "arm-b", b"m").unwrap();
        write_chunk(&store, 3, "arm-b", 0, 0, b"zz").unwrap();
        discard(&store, 3, "arm-b");
        discard(&store, 3, "arm-c");
        assert_eq!(fs::read_dir(store.spool_round_dir(3)).unwrap().count(), 0);
    }
}
