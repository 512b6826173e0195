//! f32 tensors, model specs, and a strict safetensors reader/writer.
//!
//! The reader is our own rather than the `safetensors` crate's so that every length is checked
//! arithmetic (the input comes from the network) and so the writer is deterministic: tensors
//! sorted by (element size descending, name), metadata keys sorted. That determinism is what
//! makes [`model_id`] a content address.
//!
//! Under the f32 API sits a raw layer ([`parse_raw`], [`write_raw`], [`RawTensor`], [`Dtype`]):
//! tensors as dtype, shape and little-endian bytes, with the same checks. The delta codec stores
//! its integer tensors through it, and the aggregator's checkpoint merge uses it to copy a base
//! checkpoint's tensors through untouched while replacing the global ones in their own dtype.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::hash::StreamHasher;
use crate::ProtoError;

/// A dense row-major f32 tensor.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Named tensors, sorted by name (which keeps every encoding deterministic).
pub type TensorSet = BTreeMap<String, Tensor>;

impl Tensor {
    /// A tensor, checking that `data` has exactly as many elements as `shape` says.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ProtoError> {
        match checked_numel(&shape) {
            Some(n) if n == data.len() => Ok(Self { shape, data }),
            _ => Err(ProtoError::ShapeMismatch {
                name: String::new(),
                expected: shape,
                found: vec![data.len()],
            }),
        }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = checked_numel(&shape).unwrap_or(0);
        Self {
            shape,
            data: vec![0.0; n],
        }
    }

    /// Number of elements the shape describes (saturating, so absurd shapes never panic).
    pub fn numel(&self) -> usize {
        checked_numel(&self.shape).unwrap_or(usize::MAX)
    }

    /// Σx², accumulated in f64 so large tensors keep precision.
    pub fn l2_norm_sq(&self) -> f64 {
        self.data.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
    }

    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|x| x.is_finite())
    }
}

pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Σ over tensors of Σx² (f64): the squared L2 norm of a whole update.
pub fn l2_norm_sq(set: &TensorSet) -> f64 {
    set.values().map(Tensor::l2_norm_sq).sum()
}

/// The names and shapes a model (or a delta against it) must have.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelSpec {
    pub tensors: BTreeMap<String, Vec<usize>>,
}

impl ModelSpec {
    pub fn from_tensors(set: &TensorSet) -> Self {
        Self {
            tensors: set
                .iter()
                .map(|(k, t)| (k.clone(), t.shape.clone()))
                .collect(),
        }
    }

    /// Total number of f32 elements (saturating).
    pub fn numel(&self) -> usize {
        self.tensors
            .values()
            .map(|s| checked_numel(s).unwrap_or(usize::MAX))
            .fold(0, usize::saturating_add)
    }

    /// Size of the model as f32, a natural bound for `max_decoded_bytes` (plus headroom).
    pub fn f32_bytes(&self) -> usize {
        self.numel().saturating_mul(4)
    }

    /// Checks that `set` has exactly this spec's names and shapes and only finite values.
    pub fn validate(&self, set: &TensorSet) -> Result<(), ProtoError> {
        if let Some(name) = self.tensors.keys().find(|k| !set.contains_key(*k)) {
            return Err(ProtoError::MissingTensor(name.clone()));
        }
        if let Some(name) = set.keys().find(|k| !self.tensors.contains_key(*k)) {
            return Err(ProtoError::UnexpectedTensor(name.clone()));
        }
        for (name, t) in set {
            let expected = &self.tensors[name];
            if &t.shape != expected || checked_numel(&t.shape) != Some(t.data.len()) {
                return Err(ProtoError::ShapeMismatch {
                    name: name.clone(),
                    expected: expected.clone(),
                    found: t.shape.clone(),
                });
            }
            if !t.is_finite() {
                return Err(ProtoError::NonFinite(name.clone()));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Raw safetensors layer, shared with the codec (which also stores I8/I32/I64/BF16 tensors) and
// with the aggregator's checkpoint merge.

/// The safetensors dtypes this crate reads or writes (a file with any other is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    I8,
    I32,
    I64,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::I8 => 1,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::I64 => 8,
        }
    }

    /// The name in a safetensors header (`"F32"`, `"BF16"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I8 => "I8",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I8" => Dtype::I8,
            "I32" => Dtype::I32,
            "I64" => Dtype::I64,
            _ => return None,
        })
    }
}

/// One tensor as stored: dtype, shape, little-endian bytes (borrowed from the file when parsed).
#[derive(Debug, Clone)]
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl RawTensor<'static> {
    /// f32 values stored as `dtype`: F32 as is, BF16 and F16 rounded to nearest. `None` for the
    /// integer dtypes, and when `data` does not have the shape's element count.
    pub fn from_f32(dtype: Dtype, shape: Vec<usize>, data: &[f32]) -> Option<Self> {
        if checked_numel(&shape) != Some(data.len()) {
            return None;
        }
        let bytes = match dtype {
            Dtype::F32 => f32_to_le(data).into_owned(),
            Dtype::BF16 => data
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            Dtype::F16 => data
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            Dtype::I8 | Dtype::I32 | Dtype::I64 => return None,
        };
        Some(Self {
            dtype,
            shape,
            data: Cow::Owned(bytes),
        })
    }
}

/// safetensors caps its JSON header at 100 MB; so do we.
const MAX_HEADER_LEN: usize = 100_000_000;

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

fn st_err(msg: impl Into<String>) -> ProtoError {
    ProtoError::Safetensors(msg.into())
}

/// Parses a safetensors buffer into raw tensors (borrowing `bytes`) and its metadata. Every
/// length is checked, the header is capped at 100 MB, and the tensors must tile the data
/// section exactly (no gaps, overlaps or trailing bytes).
pub fn parse_raw(
    bytes: &[u8],
) -> Result<(BTreeMap<String, RawTensor<'_>>, BTreeMap<String, String>), ProtoError> {
    let (len_bytes, rest) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| st_err("shorter than its 8-byte header length"))?;
    let header_len = usize::try_from(u64::from_le_bytes(*len_bytes)).unwrap_or(usize::MAX);
    if header_len > MAX_HEADER_LEN || header_len > rest.len() {
        return Err(st_err(format!(
            "header length {header_len} exceeds the buffer"
        )));
    }
    let (header, data) = rest.split_at(header_len);
    let (entries, metadata) = parse_header(header, data.len())?;
    let tensors = entries
        .into_iter()
        .map(|e| {
            let t = RawTensor {
                dtype: e.dtype,
                shape: e.shape,
                data: Cow::Borrowed(&data[e.start..e.end]),
            };
            (e.name, t)
        })
        .collect();
    Ok((tensors, metadata))
}

/// One tensor of a safetensors header: where its bytes lie in the data section.
struct Extent {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The header's tensors, in data order, and its metadata, checked against a data section of
/// `data_len` bytes: lengths match dtype and shape, and the tensors tile the section exactly.
fn parse_header(
    header: &[u8],
    data_len: usize,
) -> Result<(Vec<Extent>, BTreeMap<String, String>), ProtoError> {
    let header = std::str::from_utf8(header).map_err(|_| st_err("header is not UTF-8"))?;
    let entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(header).map_err(|e| st_err(format!("header JSON: {e}")))?;

    let mut metadata = BTreeMap::new();
    let mut extents = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            metadata =
                serde_json::from_value(value).map_err(|e| st_err(format!("__metadata__: {e}")))?;
            continue;
        }
        let entry: HeaderEntry =
            serde_json::from_value(value).map_err(|e| st_err(format!("tensor {name:?}: {e}")))?;
        let dtype = Dtype::parse(&entry.dtype).ok_or_else(|| ProtoError::DtypeMismatch {
            name: name.clone(),
            expected: "F32, F16, BF16, I8, I32 or I64".into(),
            found: entry.dtype.chars().take(16).collect(),
        })?;
        let [start, end] = entry.data_offsets;
        let nbytes = checked_numel(&entry.shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| st_err(format!("tensor {name:?}: shape overflows")))?;
        if end < start || end - start != nbytes || end > data_len {
            return Err(st_err(format!("tensor {name:?}: bad data_offsets")));
        }
        extents.push(Extent {
            name,
            dtype,
            shape: entry.shape,
            start,
            end,
        });
    }
    // Like the reference implementation, tensors must tile the data section exactly:
    // no gaps, overlaps or trailing bytes (which could smuggle data past the hash of a model).
    extents.sort_unstable_by_key(|e| (e.start, e.end));
    let mut cursor = 0;
    for e in &extents {
        if e.start != cursor {
            return Err(st_err("tensor data overlaps or leaves gaps"));
        }
        cursor = e.end;
    }
    if cursor != data_len {
        return Err(st_err("trailing bytes after the last tensor"));
    }
    Ok((extents, metadata))
}

/// Writes raw tensors as safetensors into `sink`, deterministically: tensors sorted by (element
/// size descending, name), so each is aligned to its element size; metadata keys sorted; the
/// header padded with spaces to 8 bytes.
pub fn write_raw_to(
    tensors: &BTreeMap<String, RawTensor<'_>>,
    metadata: &BTreeMap<String, String>,
    sink: &mut dyn FnMut(&[u8]),
) {
    // Largest elements first keeps every tensor aligned to its element size, as the reference
    // writer does, so mmap readers can use the data in place.
    let mut order: Vec<(&String, &RawTensor<'_>)> = tensors.iter().collect();
    order.sort_by(|(ln, lt), (rn, rt)| rt.dtype.size().cmp(&lt.dtype.size()).then(ln.cmp(rn)));

    let json = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let mut header = String::from("{");
    if !metadata.is_empty() {
        header.push_str("\"__metadata__\":{");
        let pairs: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", json(k), json(v)))
            .collect();
        header.push_str(&pairs.join(","));
        header.push_str("},");
    }
    let mut offset = 0usize;
    let mut items = Vec::with_capacity(order.len());
    for (name, t) in &order {
        let shape: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        let end = offset + t.data.len();
        items.push(format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            json(name),
            t.dtype.as_str(),
            shape.join(",")
        ));
        offset = end;
    }
    header.push_str(&items.join(","));
    if header.ends_with(',') {
        header.pop();
    }
    header.push('}');
    // Pad with spaces to 8 bytes so the data section starts aligned.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    sink(&(header.len() as u64).to_le_bytes());
    sink(header.as_bytes());
    for (_, t) in order {
        sink(&t.data);
    }
}

/// [`write_raw_to`] into one buffer.
pub fn write_raw(
    tensors: &BTreeMap<String, RawTensor<'_>>,
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut out = Vec::new();
    write_raw_to(tensors, metadata, &mut |b| out.extend_from_slice(b));
    out
}

pub(crate) fn f32_to_le(data: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(data))
    } else {
        Cow::Owned(data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

pub(crate) fn le_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f32_raw(set: &TensorSet) -> BTreeMap<String, RawTensor<'_>> {
    set.iter()
        .map(|(k, t)| {
            (
                k.clone(),
                RawTensor {
                    dtype: Dtype::F32,
                    shape: t.shape.clone(),
                    data: f32_to_le(&t.data),
                },
            )
        })
        .collect()
}

/// Encodes `set` as safetensors, all tensors F32 little-endian.
///
/// A tensor whose `data` length disagrees with its shape is written with its data length as a
/// 1-d shape rather than producing an invalid file; [`ModelSpec::validate`] catches that earlier.
pub fn write_safetensors(set: &TensorSet, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    write_raw(&fix_shapes(f32_raw(set)), metadata)
}

/// [`write_safetensors`] into `sink` piece by piece (a file, a hasher), without building the
/// encoded buffer: the same bytes.
pub fn write_safetensors_to(
    set: &TensorSet,
    metadata: &BTreeMap<String, String>,
    sink: &mut dyn FnMut(&[u8]),
) {
    write_raw_to(&fix_shapes(f32_raw(set)), metadata, sink)
}

fn fix_shapes(mut raw: BTreeMap<String, RawTensor<'_>>) -> BTreeMap<String, RawTensor<'_>> {
    for t in raw.values_mut() {
        if checked_numel(&t.shape).and_then(|n| n.checked_mul(4)) != Some(t.data.len()) {
            t.shape = vec![t.data.len() / 4];
        }
    }
    raw
}

/// Reads a safetensors buffer of F32, BF16 or F16 tensors, converting to f32.
/// Values are not checked for finiteness here; [`ModelSpec::validate`] does that.
pub fn read_safetensors(bytes: &[u8]) -> Result<(TensorSet, BTreeMap<String, String>), ProtoError> {
    let (raw, metadata) = parse_raw(bytes)?;
    let mut set = TensorSet::new();
    for (name, t) in raw {
        let data = float_to_f32(&name, t.dtype, &t.data)?;
        set.insert(
            name,
            Tensor {
                shape: t.shape,
                data,
            },
        );
    }
    Ok((set, metadata))
}

/// [`read_safetensors`] from a stream of `len` bytes (a model file), one tensor's bytes at a
/// time: memory is the decoded f32 tensors plus the largest single tensor, never the encoded
/// file besides them. A short or longer stream is an error, as a bad length is for a buffer.
pub fn read_safetensors_from(
    r: &mut impl std::io::Read,
    len: u64,
) -> Result<(TensorSet, BTreeMap<String, String>), ProtoError> {
    let read_err = |e: std::io::Error| st_err(format!("reading: {e}"));
    let mut len_bytes = [0u8; 8];
    r.read_exact(&mut len_bytes)
        .map_err(|_| st_err("shorter than its 8-byte header length"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    let data_len = len
        .checked_sub(8)
        .and_then(|n| n.checked_sub(header_len))
        .filter(|_| header_len <= MAX_HEADER_LEN as u64)
        .ok_or_else(|| st_err(format!("header length {header_len} exceeds the file")))?;
    let mut header = vec![0u8; header_len as usize];
    r.read_exact(&mut header).map_err(read_err)?;
    let data_len = usize::try_from(data_len).map_err(|_| st_err("data section too large"))?;
    let (extents, metadata) = parse_header(&header, data_len)?;
    let mut set = TensorSet::new();
    let mut buf = Vec::new();
    // Tiled in data order: each tensor starts where the previous one ended.
    for e in extents {
        buf.resize(e.end - e.start, 0);
        r.read_exact(&mut buf).map_err(read_err)?;
        let data = float_to_f32(&e.name, e.dtype, &buf)?;
        set.insert(
            e.name,
            Tensor {
                shape: e.shape,
                data,
            },
        );
    }
    if r.read(&mut [0u8]).map_err(read_err)? != 0 {
        return Err(st_err("trailing bytes after the last tensor"));
    }
    Ok((set, metadata))
}

/// The f32 values of tensor `name`'s little-endian `bytes` of a float `dtype`.
fn float_to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, ProtoError> {
    Ok(match dtype {
        Dtype::F32 => le_to_f32(bytes),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(ProtoError::DtypeMismatch {
                name: name.to_string(),
                expected: "F32, BF16 or F16".into(),
                found: other.as_str().into(),
            })
        }
    })
}

/// Content address of a model: SHA-256 (hex) of its canonical F32 safetensors encoding with no
/// metadata. Streams into the hasher, so it costs no extra copy of the model.
pub fn model_id(set: &TensorSet) -> crate::ModelId {
    let mut hasher = StreamHasher::new();
    write_raw_to(&fix_shapes(f32_raw(set)), &BTreeMap::new(), &mut |b| {
        hasher.update(b)
    });
    hasher.finalize_hex().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::sha256_hex;

    fn sample() -> TensorSet {
        let mut s = TensorSet::new();
        s.insert(
            "b.weight".into(),
            Tensor::new(vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 1e-8, -7.25]).unwrap(),
        );
        s.insert(
            "a.bias".into(),
            Tensor::new(vec![3], vec![0.5, 0.25, -0.125]).unwrap(),
        );
        s.insert("scalar".into(), Tensor::new(vec![], vec![42.0]).unwrap());
        s
    }

    #[test]
    fn tensor_basics() {
        let t = Tensor::new(vec![2, 2], vec![1.0, 2.0, 2.0, 4.0]).unwrap();
        assert_eq!(t.numel(), 4);
        assert_eq!(t.l2_norm_sq(), 25.0);
        assert!(Tensor::new(vec![2, 2], vec![1.0]).is_err());
        assert_eq!(Tensor::zeros(vec![3, 0]).data.len(), 0);
        assert_eq!(
            Tensor {
                shape: vec![usize::MAX, 2],
                data: vec![]
            }
            .numel(),
            usize::MAX
        );
    }

    #[test]
    fn round_trip_with_metadata() {
        let mut meta = BTreeMap::new();
        meta.insert("format".into(), "pt".into());
        meta.insert("quote\"key".into(), "new\nline".into());
        let bytes = write_safetensors(&sample(), &meta);
        let (set, m) = read_safetensors(&bytes).unwrap();
        assert_eq!(set, sample());
        assert_eq!(m, meta);
        // Streamed in and out: the same bytes, the same tensors.
        let mut streamed = Vec::new();
        write_safetensors_to(&sample(), &meta, &mut |b| streamed.extend_from_slice(b));
        assert_eq!(streamed, bytes);
        assert_eq!(from_stream(&bytes).unwrap(), (sample(), meta));
    }

    fn from_stream(b: &[u8]) -> Result<(TensorSet, BTreeMap<String, String>), ProtoError> {
        read_safetensors_from(&mut std::io::Cursor::new(b), b.len() as u64)
    }

    #[test]
    fn stream_reader_checks_the_stated_length() {
        let good = write_safetensors(&sample(), &BTreeMap::new());
        let len = good.len() as u64;
        // The stream ends early, goes on past the end, or the length is wrong either way.
        let r = |b: &[u8], len| read_safetensors_from(&mut std::io::Cursor::new(b), len);
        assert!(r(&good[..good.len() - 1], len).is_err());
        assert!(r(&[&good[..], &[0]].concat(), len).is_err());
        assert!(r(&good, len - 1).is_err());
        assert!(r(&good, len + 1).is_err());
        assert!(r(&good, len).is_ok());
    }

    #[test]
    fn interoperates_with_reference_implementation() {
        let bytes = write_safetensors(&sample(), &BTreeMap::new());
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("b.weight").unwrap();
        assert_eq!(w.shape(), &[2, 3]);
        assert_eq!(le_to_f32(w.data()), sample()["b.weight"].data);

        // And read what the reference writes, including BF16 and F16.
        let bf: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let hf: Vec<u8> = [0.25f32, 8.0, 3.0]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let views = vec![
            (
                "x",
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![2], &bf)
                    .unwrap(),
            ),
            (
                "y",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![3, 1], &hf)
                    .unwrap(),
            ),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let (set, _) = read_safetensors(&bytes).unwrap();
        assert_eq!(set["x"].data, vec![1.5, -2.0]);
        assert_eq!(set["y"].shape, vec![3, 1]);
        assert_eq!(set["y"].data, vec![0.25, 8.0, 3.0]);
    }

    #[test]
    fn model_id_is_deterministic_and_content_addressed() {
        let id = model_id(&sample());
        assert_eq!(
            id,
            sha256_hex(&write_safetensors(&sample(), &BTreeMap::new()))
        );
        assert_eq!(id, model_id(&sample().into_iter().rev().collect()));
        let mut other = sample();
        other.get_mut("a.bias").unwrap().data[0] = 0.5000001;
        assert_ne!(id, model_id(&other));
    }

    #[test]
    fn spec_validation() {
        let spec = ModelSpec::from_tensors(&sample());
        assert_eq!(spec.numel(), 10);
        assert!(spec.validate(&sample()).is_ok());

        let mut s = sample();
        s.remove("scalar");
        assert!(matches!(spec.validate(&s), Err(ProtoError::MissingTensor(n)) if n == "scalar"));

        let mut s = sample();
        s.insert("extra".into(), Tensor::zeros(vec![1]));
        assert!(matches!(spec.validate(&s), Err(ProtoError::UnexpectedTensor(n)) if n == "extra"));

        let mut s = sample();
        s.get_mut("b.weight").unwrap().shape = vec![3, 2];
        assert!(matches!(
            spec.validate(&s),
            Err(ProtoError::ShapeMismatch { .. })
        ));

        let mut s = sample();
        s.get_mut("b.weight").unwrap().data.push(0.0);
        assert!(matches!(
            spec.validate(&s),
            Err(ProtoError::ShapeMismatch { .. })
        ));

        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut s = sample();
            s.get_mut("a.bias").unwrap().data[1] = bad;
            assert!(matches!(spec.validate(&s), Err(ProtoError::NonFinite(n)) if n == "a.bias"));
        }
    }

    #[test]
    fn rejects_malformed_files() {
        let good = write_safetensors(&sample(), &BTreeMap::new());
        // Truncations and trailing bytes.
        for cut in [0, 7, 8, 20, good.len() - 1] {
            assert!(read_safetensors(&good[..cut]).is_err(), "cut at {cut}");
            assert!(from_stream(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(read_safetensors(&long).is_err());
        assert!(from_stream(&long).is_err());
        // Absurd header length.
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read_safetensors(&huge).is_err());
        assert!(from_stream(&huge).is_err());
        // Overflowing shape, overlapping offsets, unknown dtype.
        for header in [
            r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,0]}}"#,
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
            r#"[1,2]"#,
        ] {
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(header.as_bytes());
            b.extend_from_slice(&[0; 4]);
            assert!(read_safetensors(&b).is_err(), "{header}");
            assert!(from_stream(&b).is_err(), "{header}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
                let _ = read_safetensors(&bytes);
                // Also behind a plausible header length, so the JSON parser is reached.
                let mut framed = (bytes.len() as u64).to_le_bytes().to_vec();
                framed.extend_from_slice(&bytes);
                let _ = read_safetensors(&framed);
                let _ = from_stream(&framed);
            }

            #[test]
            fn write_read_round_trip(
                set in prop::collection::btree_map(
                    "\\PC{1,12}",
                    prop::collection::vec(any::<f32>().prop_filter("finite", |x| x.is_finite()), 0..20)
                        .prop_map(|data| Tensor { shape: vec![data.len()], data }),
                    0..6,
                ),
                meta in prop::collection::btree_map("\\PC{0,8}", "\\PC{0,8}", 0..3),
            ) {
                let bytes = write_safetensors(&set, &meta);
                let (again, meta_again) = read_safetensors(&bytes).unwrap();
                prop_assert_eq!(again, set);
                prop_assert_eq!(meta_again, meta);
            }
        }
    }

    #[test]
    fn raw_from_f32_stores_each_float_dtype() {
        let v = [0.5f32, -1.25, 3.0, 1.0e-3];
        let mut raw = BTreeMap::new();
        for d in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            let t = RawTensor::from_f32(d, vec![2, 2], &v).unwrap();
            assert_eq!(t.data.len(), 4 * d.size());
            raw.insert(d.as_str().to_string(), t);
        }
        let (back, _) = read_safetensors(&write_raw(&raw, &BTreeMap::new())).unwrap();
        assert_eq!(back["F32"].data, v);
        let bf: Vec<f32> = v
            .iter()
            .map(|x| half::bf16::from_f32(*x).to_f32())
            .collect();
        let f16: Vec<f32> = v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect();
        assert_eq!(back["BF16"].data, bf);
        assert_eq!(back["F16"].data, f16);
        assert_ne!(back["BF16"].data, v, "bf16 really rounds");
        assert!(RawTensor::from_f32(Dtype::I8, vec![4], &v).is_none());
        assert!(RawTensor::from_f32(Dtype::F32, vec![3], &v).is_none());
    }

    #[test]
    fn integer_tensors_are_not_models() {
        let mut raw = BTreeMap::new();
        raw.insert(
            "i".to_string(),
            RawTensor {
                dtype: Dtype::I8,
                shape: vec![2],
                data: Cow::Owned(vec![1, 2]),
            },
        );
        let bytes = write_raw(&raw, &BTreeMap::new());
        assert!(parse_raw(&bytes).is_ok());
        assert!(matches!(
            read_safetensors(&bytes),
            Err(ProtoError::DtypeMismatch { .. })
        ));
    }
}
