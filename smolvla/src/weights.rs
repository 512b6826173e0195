//! A safetensors file read one tensor at a time.
//!
//! `Tensor::read_safetensors` reads the whole file into memory and then copies every tensor out
//! of it: loading the 1.8 GB smolvla_base checkpoint into a model that already holds its 1.8 GB
//! of parameters peaked at three model sizes. Here only the header is parsed up front and each
//! tensor's bytes are read (positioned reads, no mapping) when asked for, so loading costs the
//! model plus its largest tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Header fields larger than this are refused (safetensors' own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// One tensor's place in the file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// An open safetensors file whose header has been checked against the file's length.
#[derive(Debug)]
pub struct WeightsFile {
    path: PathBuf,
    file: File,
    entries: BTreeMap<String, Entry>,
}

fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

impl WeightsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bad = |msg: String| Error::invalid(format!("{}: {msg}", path.display()));
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .map_err(|_| bad(format!("{len} bytes: too short for a safetensors header")))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || n + 8 > len {
            return Err(bad(format!(
                "header of {n} bytes does not fit the file ({len} bytes)"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| Error::io(&path, e))?;
        // Metadata's deserializer also checks that the data offsets tile the data section.
        let meta: Metadata = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("bad safetensors header: {e}")))?;
        let data_start = 8 + n;
        let mut entries = BTreeMap::new();
        let mut data_len = 0u64;
        for (name, info) in meta.tensors() {
            let kind = kind_of(info.dtype)
                .ok_or_else(|| bad(format!("{name}: unsupported dtype {:?}", info.dtype)))?;
            let (s, e) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
            data_len = data_len.max(e);
            entries.insert(
                name,
                Entry {
                    kind,
                    shape: info.shape.iter().map(|&d| d as i64).collect(),
                    start: data_start + s,
                    end: data_start + e,
                },
            );
        }
        if data_start + data_len != len {
            return Err(bad(format!(
                "the header describes {} bytes, the file has {len} (truncated or padded)",
                data_start + data_len
            )));
        }
        Ok(Self {
            path,
            file,
            entries,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor's name and place, sorted by name.
    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    /// Reads tensor `name` from the file (a fresh CPU tensor).
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::invalid(format!("{}: no tensor {name}", self.path.display())))?;
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        self.file
            .read_exact_at(&mut bytes, e.start)
            .map_err(|err| Error::io(&self.path, err))?;
        Ok(Tensor::f_from_data_size(&bytes, &e.shape, e.kind)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_tch_wrote_and_refuses_a_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([3, 4]);
        let b = Tensor::from_slice(&[1i64, -2, 3]);
        let c = Tensor::from_slice(&[0.5f32, -1.25]).to_kind(Kind::BFloat16);
        Tensor::write_safetensors(&[("a", &a), ("b", &b), ("c", &c)], &path).unwrap();
        let w = WeightsFile::open(&path).unwrap();
        assert_eq!(
            w.entries().keys().collect::<Vec<_>>(),
            ["a", "b", "c"].iter().collect::<Vec<_>>()
        );
        for (name, want) in [("a", &a), ("b", &b), ("c", &c)] {
            let got = w.read(name).unwrap();
            assert_eq!(got.kind(), want.kind(), "{name}");
            assert_eq!(got.size(), want.size(), "{name}");
            assert!(got.equal(want), "{name}");
        }
        assert!(w.read("d").is_err());

        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
        let err = WeightsFile::open(&cut).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&cut, &bytes[..5]).unwrap();
        assert!(WeightsFile::open(&cut).is_err());
        std::fs::write(&cut, b"\xff\xff\xff\xff\xff\xff\xff\x7f{}").unwrap();
        assert!(WeightsFile::open(&cut).is_err());
    }
}
