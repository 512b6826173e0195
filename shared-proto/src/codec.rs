//! The delta codec: quantize a model delta, pack it as safetensors, compress with zstd.
//!
//! The codec name goes in the safetensors `__metadata__` under [`CODEC_KEY`]. Layout per codec,
//! for each model tensor `<name>` of shape `S` (model names must not contain `.__`):
//!
//! | codec | tensors stored |
//! |---|---|
//! | `f32` | `<name>` F32 `S` |
//! | `bf16` | `<name>` BF16 `S` (round to nearest even, saturating at ±bf16::MAX) |
//! | `int8` | `<name>` I8 `S`; `<name>.__scale` F32 `[rows]`, rows = `S[0]` if `S` has ≥ 2 dims, else 1; value = q · scale\[row\], scale = row absmax / 127 |
//! | `topk:<f>` | `<name>.__idx` I32 (I64 past 2³¹ elements) `[k]` flat row-major indices, strictly ascending; `<name>.__val` I8 `[k]`; `<name>.__scale` F32 `[1]`; `<name>.__shape` I64 `[len S]`; k = ceil(f · numel) clamped to [1, numel] |
//!
//! Error feedback (kept on the robot): with a residual, the encoder quantizes `delta + residual`
//! and stores back exactly what the receiver will not see, so quantization error is sent later
//! instead of lost. Decoding always yields f32, checked against the model's [`ModelSpec`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;

use crate::tensor::{
    checked_numel, f32_to_le, le_to_f32, parse_raw, write_raw_to, Dtype, ModelSpec, RawTensor,
    Tensor, TensorSet,
};
use crate::ProtoError;

/// `__metadata__` key holding the codec string.
pub const CODEC_KEY: &str = "zk0.codec";

const SUFFIX_SCALE: &str = ".__scale";
const SUFFIX_IDX: &str = ".__idx";
const SUFFIX_VAL: &str = ".__val";
const SUFFIX_SHAPE: &str = ".__shape";

/// How a delta's values are represented on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Codec {
    F32,
    Bf16,
    /// Per-row absmax int8.
    Int8,
    /// The `fraction` largest-magnitude entries of each tensor, int8 with one scale per tensor.
    TopK {
        fraction: f32,
    },
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::F32 => f.write_str("f32"),
            Codec::Bf16 => f.write_str("bf16"),
            Codec::Int8 => f.write_str("int8"),
            // f32's Display is the shortest string that parses back to the same value.
            Codec::TopK { fraction } => write!(f, "topk:{fraction}"),
        }
    }
}

impl FromStr for Codec {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        let bad = || ProtoError::UnsupportedCodec(s.chars().take(40).collect());
        Ok(match s {
            "f32" => Codec::F32,
            "bf16" => Codec::Bf16,
            "int8" => Codec::Int8,
            _ => {
                let fraction: f32 = s
                    .strip_prefix("topk:")
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?;
                if !(fraction > 0.0 && fraction <= 1.0) {
                    return Err(bad());
                }
                Codec::TopK { fraction }
            }
        })
    }
}

impl Codec {
    /// Elements kept out of `numel` by top-k (all of them for the other codecs).
    pub fn kept(&self, numel: usize) -> usize {
        match *self {
            Codec::TopK { fraction } if numel > 0 => {
                let k = (f64::from(fraction) * numel as f64).ceil();
                (k as usize).clamp(1, numel)
            }
            _ => numel,
        }
    }
}

/// Encoder settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodeOptions {
    pub codec: Codec,
    /// zstd level (1–22; 3 is zstd's default balance).
    pub zstd_level: i32,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            codec: Codec::Int8,
            zstd_level: 3,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Encodes a delta. With `residual`, encodes `delta + residual` and leaves in `residual` what
/// was not transmitted (so `residual_new + decoded == delta + residual_old`). Residual entries
/// whose name or shape no longer match the delta are treated as zero and replaced.
pub fn encode_delta(
    delta: &TensorSet,
    opts: &EncodeOptions,
    residual: Option<&mut TensorSet>,
) -> Result<Vec<u8>, ProtoError> {
    for (name, t) in delta {
        if name.contains(".__") || name == "__metadata__" {
            return Err(ProtoError::InvalidName {
                what: "tensor name",
                value: name.clone(),
                why: "'.__' is reserved by the codec",
            });
        }
        if checked_numel(&t.shape) != Some(t.data.len()) {
            return Err(ProtoError::ShapeMismatch {
                name: name.clone(),
                expected: t.shape.clone(),
                found: vec![t.data.len()],
            });
        }
        if !t.is_finite() {
            return Err(ProtoError::NonFinite(name.clone()));
        }
    }

    let mut raw = BTreeMap::new();
    let mut new_residual = TensorSet::new();
    let feedback = residual.is_some();
    for (name, t) in delta {
        let target: Cow<'_, [f32]> = match residual.as_deref().and_then(|r| r.get(name)) {
            Some(r) if r.shape == t.shape && r.data.len() == t.data.len() && r.is_finite() => {
                Cow::Owned(t.data.iter().zip(&r.data).map(|(d, r)| d + r).collect())
            }
            _ => Cow::Borrowed(&t.data),
        };
        if !target.iter().all(|x| x.is_finite()) {
            return Err(ProtoError::NonFinite(name.clone()));
        }
        let sent = quantize(name, &t.shape, &target, opts.codec, feedback, &mut raw);
        if feedback {
            let data = target.iter().zip(&sent).map(|(x, s)| x - s).collect();
            new_residual.insert(
                name.clone(),
                Tensor {
                    shape: t.shape.clone(),
                    data,
                },
            );
        }
    }
    if let Some(r) = residual {
        *r = new_residual;
    }

    let mut metadata = BTreeMap::new();
    metadata.insert(CODEC_KEY.to_owned(), opts.codec.to_string());
    // Stream straight into zstd: no intermediate copy of the uncompressed file.
    let zstd_err = |e: std::io::Error| ProtoError::Zstd(e.to_string());
    let mut encoder =
        zstd::stream::write::Encoder::new(Vec::new(), opts.zstd_level).map_err(zstd_err)?;
    let mut write_result = Ok(());
    write_raw_to(&raw, &metadata, &mut |bytes| {
        if write_result.is_ok() {
            write_result = encoder.write_all(bytes);
        }
    });
    write_result.map_err(zstd_err)?;
    encoder.finish().map_err(zstd_err)
}

/// Adds `name`'s stored tensors to `raw`; returns the values the receiver will decode if
/// `want_sent` (error feedback needs them), else an empty vector to spare a model-sized copy.
fn quantize(
    name: &str,
    shape: &[usize],
    x: &[f32],
    codec: Codec,
    want_sent: bool,
    raw: &mut BTreeMap<String, RawTensor<'static>>,
) -> Vec<f32> {
    let mut put = |suffix: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>| {
        raw.insert(
            format!("{name}{suffix}"),
            RawTensor {
                dtype,
                shape,
                data: Cow::Owned(data),
            },
        );
    };
    match codec {
        Codec::F32 => {
            put("", Dtype::F32, shape.to_vec(), f32_to_le(x).into_owned());
            if want_sent {
                x.to_vec()
            } else {
                Vec::new()
            }
        }
        Codec::Bf16 => {
            let max = half::bf16::MAX.to_f32();
            let q: Vec<half::bf16> = x
                .iter()
                .map(|&v| half::bf16::from_f32(v.clamp(-max, max)))
                .collect();
            put(
                "",
                Dtype::BF16,
                shape.to_vec(),
                q.iter().flat_map(|b| b.to_le_bytes()).collect(),
            );
            if want_sent {
                q.iter().map(|b| b.to_f32()).collect()
            } else {
                Vec::new()
            }
        }
        Codec::Int8 => {
            let rows = int8_rows(shape);
            let row_len = x.len().checked_div(rows).unwrap_or(0);
            let mut q = Vec::with_capacity(x.len());
            let mut scales = Vec::with_capacity(rows);
            // Not `chunks`: an empty vector still has one row (and one scale).
            for r in 0..rows {
                let row = &x[r * row_len..(r + 1) * row_len];
                let scale = absmax(row) / 127.0;
                scales.push(scale);
                q.extend(row.iter().map(|&v| quantize_i8(v, scale)));
            }
            let sent = if want_sent {
                dequantize_rows(&q, &scales, row_len)
            } else {
                Vec::new()
            };
            put(
                "",
                Dtype::I8,
                shape.to_vec(),
                q.iter().map(|&v| v as u8).collect(),
            );
            put(
                SUFFIX_SCALE,
                Dtype::F32,
                vec![rows],
                f32_to_le(&scales).into_owned(),
            );
            sent
        }
        Codec::TopK { .. } => {
            let idx = topk_indices(x, codec.kept(x.len()));
            let picked: Vec<f32> = idx.iter().map(|&i| x[i]).collect();
            let scale = absmax(&picked) / 127.0;
            let q: Vec<i8> = picked.iter().map(|&v| quantize_i8(v, scale)).collect();
            let mut sent = Vec::new();
            if want_sent {
                sent = vec![0.0; x.len()];
                for (&i, &v) in idx.iter().zip(&q) {
                    sent[i] = f32::from(v) * scale;
                }
            }
            let idx_bytes = if x.len() <= i32::MAX as usize {
                (
                    Dtype::I32,
                    idx.iter().flat_map(|&i| (i as i32).to_le_bytes()).collect(),
                )
            } else {
                (
                    Dtype::I64,
                    idx.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect(),
                )
            };
            put(SUFFIX_IDX, idx_bytes.0, vec![idx.len()], idx_bytes.1);
            put(
                SUFFIX_VAL,
                Dtype::I8,
                vec![q.len()],
                q.iter().map(|&v| v as u8).collect(),
            );
            put(
                SUFFIX_SCALE,
                Dtype::F32,
                vec![1],
                scale.to_le_bytes().to_vec(),
            );
            put(
                SUFFIX_SHAPE,
                Dtype::I64,
                vec![shape.len()],
                shape
                    .iter()
                    .flat_map(|&d| (d as i64).to_le_bytes())
                    .collect(),
            );
            sent
        }
    }
}

/// Rows of the int8 codec: the first dim of a matrix or higher, one row for scalars and vectors.
fn int8_rows(shape: &[usize]) -> usize {
    if shape.len() >= 2 {
        shape[0]
    } else {
        1
    }
}

fn absmax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

fn quantize_i8(v: f32, scale: f32) -> i8 {
    if scale > 0.0 {
        (v / scale).round().clamp(-127.0, 127.0) as i8
    } else {
        0
    }
}

fn dequantize_rows(q: &[i8], scales: &[f32], row_len: usize) -> Vec<f32> {
    q.chunks(row_len.max(1))
        .zip(scales)
        .flat_map(|(row, &s)| row.iter().map(move |&v| f32::from(v) * s))
        .collect()
}

/// Indices of the `k` largest |x|, ascending (ties go to the lowest indices). `x` must be
/// NaN-free.
///
/// Finds the k-th largest magnitude with a selection over a copy of |x| (4 bytes per element,
/// linear time) rather than sorting an index array, which matters for embedding-sized tensors.
pub fn topk_indices(x: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(x.len());
    if k == 0 {
        return Vec::new();
    }
    if k == x.len() {
        return (0..x.len()).collect();
    }
    let mut mags: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let (_, &mut threshold, _) = mags.select_nth_unstable_by(x.len() - k, f32::total_cmp);
    drop(mags);
    let mut ties = k - x.iter().filter(|v| v.abs() > threshold).count();
    let mut idx = Vec::with_capacity(k);
    for (i, v) in x.iter().enumerate() {
        let m = v.abs();
        if m > threshold {
            idx.push(i);
        } else if m == threshold && ties > 0 {
            idx.push(i);
            ties -= 1;
        }
    }
    idx
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Decodes a delta for the model described by `spec`: zstd (refusing to inflate past
/// `max_decoded_bytes`), safetensors, codec from the metadata, dequantize, then check names,
/// shapes, dtypes and finiteness.
pub fn decode_delta(
    bytes: &[u8],
    spec: &ModelSpec,
    max_decoded_bytes: usize,
) -> Result<TensorSet, ProtoError> {
    decode_delta_with_codec(bytes, spec, max_decoded_bytes).map(|(set, _)| set)
}

/// [`decode_delta`], also returning the codec the blob declares (to check against the manifest
/// and the round's accepted codecs).
pub fn decode_delta_with_codec(
    bytes: &[u8],
    spec: &ModelSpec,
    max_decoded_bytes: usize,
) -> Result<(TensorSet, Codec), ProtoError> {
    let mut out = TensorSet::new();
    let codec = decode_delta_each(bytes, spec, max_decoded_bytes, |name, shape, data| {
        out.insert(
            name.to_string(),
            Tensor {
                shape: shape.to_vec(),
                data,
            },
        );
        Ok::<_, ProtoError>(())
    })?;
    Ok((out, codec))
}

/// [`decode_delta_with_codec`] one tensor at a time: `each(name, shape, values)` receives the
/// tensors of `spec` in order, each checked (name, shape, dtype, finite) as it is decoded, so a
/// caller folding updates into a model never holds a whole decoded update. When a later tensor
/// fails, the earlier ones have already been handed out: callers that need all-or-nothing must
/// only observe until the end (the aggregator's receipt check keeps just a norm) or use
/// [`decode_delta`]. An error from `each` stops the decode and is returned as is.
pub fn decode_delta_each<E: From<ProtoError>>(
    bytes: &[u8],
    spec: &ModelSpec,
    max_decoded_bytes: usize,
    each: impl FnMut(&str, &[usize], Vec<f32>) -> Result<(), E>,
) -> Result<Codec, E> {
    decode_delta_each_from(bytes, spec, max_decoded_bytes, each)
}

/// [`decode_delta_each`] with the compressed blob read from `compressed` (a spooled file) as
/// it inflates, so the compressed bytes are never in memory beside the decompressed ones.
pub fn decode_delta_each_from<E: From<ProtoError>>(
    compressed: impl std::io::BufRead,
    spec: &ModelSpec,
    max_decoded_bytes: usize,
    mut each: impl FnMut(&str, &[usize], Vec<f32>) -> Result<(), E>,
) -> Result<Codec, E> {
    let st = decompress_capped(compressed, max_decoded_bytes)?;
    let (mut raw, metadata) = parse_raw(&st)?;
    let codec: Codec = metadata
        .get(CODEC_KEY)
        .ok_or_else(|| ProtoError::UnsupportedCodec(format!("<no {CODEC_KEY} in metadata>")))?
        .parse()?;

    for (name, shape) in &spec.tensors {
        let data = match codec {
            Codec::F32 => {
                let t = take(&mut raw, name, "", Dtype::F32, Some(shape))?;
                le_to_f32(&t.data)
            }
            Codec::Bf16 => {
                let t = take(&mut raw, name, "", Dtype::BF16, Some(shape))?;
                t.data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect()
            }
            Codec::Int8 => {
                let q = take(&mut raw, name, "", Dtype::I8, Some(shape))?;
                let rows = int8_rows(shape);
                let scales = take(&mut raw, name, SUFFIX_SCALE, Dtype::F32, Some(&[rows]))?;
                let row_len = q.data.len().checked_div(rows).unwrap_or(0);
                let q: Vec<i8> = q.data.iter().map(|&b| b as i8).collect();
                dequantize_rows(&q, &le_to_f32(&scales.data), row_len)
            }
            Codec::TopK { .. } => decode_topk(&mut raw, name, shape)?,
        };
        if !data.iter().all(|x| x.is_finite()) {
            return Err(ProtoError::NonFinite(name.clone()).into());
        }
        each(name, shape, data)?;
    }
    if let Some(extra) = raw.into_keys().next() {
        return Err(ProtoError::UnexpectedTensor(extra).into());
    }
    Ok(codec)
}

fn decompress_capped(bytes: impl std::io::BufRead, max: usize) -> Result<Vec<u8>, ProtoError> {
    let decoder = zstd::stream::read::Decoder::with_buffer(bytes)
        .map_err(|e| ProtoError::Zstd(e.to_string()))?;
    let mut out = Vec::new();
    // Read one byte past the cap: reaching it proves the input inflates too far, without ever
    // holding more than cap + 1 bytes.
    decoder
        .take((max as u64).saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| ProtoError::Zstd(e.to_string()))?;
    if out.len() > max {
        return Err(ProtoError::Oversize {
            what: "decompressed delta",
            len: out.len() as u64,
            max: max as u64,
        });
    }
    Ok(out)
}

/// Removes `<name><suffix>` from `raw`, checking its dtype and (if given) shape.
fn take<'a>(
    raw: &mut BTreeMap<String, RawTensor<'a>>,
    name: &str,
    suffix: &str,
    dtype: Dtype,
    shape: Option<&[usize]>,
) -> Result<RawTensor<'a>, ProtoError> {
    let key = format!("{name}{suffix}");
    let t = raw
        .remove(&key)
        .ok_or_else(|| ProtoError::MissingTensor(key.clone()))?;
    if t.dtype != dtype {
        return Err(ProtoError::DtypeMismatch {
            name: key,
            expected: dtype.as_str().into(),
            found: t.dtype.as_str().into(),
        });
    }
    if let Some(shape) = shape {
        if t.shape != shape {
            return Err(ProtoError::ShapeMismatch {
                name: key,
                expected: shape.to_vec(),
                found: t.shape,
            });
        }
    }
    Ok(t)
}

fn decode_topk(
    raw: &mut BTreeMap<String, RawTensor<'_>>,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, ProtoError> {
    let malformed = |why: &str| ProtoError::MalformedDelta(format!("{name}: {why}"));
    let numel = checked_numel(shape).ok_or_else(|| malformed("shape overflows"))?;

    let stored_shape = take(raw, name, SUFFIX_SHAPE, Dtype::I64, Some(&[shape.len()]))?;
    let stored_shape: Vec<i64> = stored_shape
        .data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    if stored_shape
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .ne(shape.iter().map(|&d| Some(d)))
    {
        return Err(ProtoError::ShapeMismatch {
            name: name.to_owned(),
            expected: shape.to_vec(),
            found: stored_shape.iter().map(|&d| d.max(0) as usize).collect(),
        });
    }

    let idx_key = format!("{name}{SUFFIX_IDX}");
    let idx_dtype = raw
        .get(&idx_key)
        .map(|t| t.dtype)
        .ok_or_else(|| ProtoError::MissingTensor(idx_key.clone()))?;
    let idx_raw = match idx_dtype {
        Dtype::I32 | Dtype::I64 => take(raw, name, SUFFIX_IDX, idx_dtype, None)?,
        other => {
            return Err(ProtoError::DtypeMismatch {
                name: idx_key,
                expected: "I32 or I64".into(),
                found: other.as_str().into(),
            })
        }
    };
    if idx_raw.shape.len() != 1 {
        return Err(malformed("index tensor is not 1-d"));
    }
    let idx: Vec<i64> = match idx_dtype {
        Dtype::I32 => idx_raw
            .data
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => idx_raw
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
    };
    let vals = take(raw, name, SUFFIX_VAL, Dtype::I8, Some(&[idx.len()]))?;
    let scale = take(raw, name, SUFFIX_SCALE, Dtype::F32, Some(&[1]))?;
    let scale = *le_to_f32(&scale.data)
        .first()
        .ok_or_else(|| malformed("no scale"))?;

    let mut out = vec![0.0f32; numel];
    let mut prev: Option<usize> = None;
    for (&i, &q) in idx.iter().zip(vals.data.iter()) {
        let i = usize::try_from(i)
            .ok()
            .filter(|&i| i < numel)
            .ok_or_else(|| malformed("index out of range"))?;
        if prev.is_some_and(|p| p >= i) {
            return Err(malformed("indices not strictly ascending"));
        }
        prev = Some(i);
        out[i] = f32::from(q as i8) * scale;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Applying

/// `global[name] += scale · delta[name]` for every tensor present in both with the same shape;
/// others are left alone. Validate the delta against the model's spec first (decoding does).
pub fn apply_delta(global: &mut TensorSet, delta: &TensorSet, scale: f32) {
    for (name, d) in delta {
        if let Some(g) = global.get_mut(name) {
            if g.shape == d.shape && g.data.len() == d.data.len() {
                g.data
                    .iter_mut()
                    .zip(&d.data)
                    .for_each(|(g, d)| *g += scale * d);
            }
        }
    }
}

/// [`apply_delta`] that first checks `delta` has exactly `global`'s names and shapes and
/// finite values, and changes nothing otherwise.
pub fn try_apply_delta(
    global: &mut TensorSet,
    delta: &TensorSet,
    scale: f32,
) -> Result<(), ProtoError> {
    ModelSpec::from_tensors(global).validate(delta)?;
    apply_delta(global, delta, scale);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::write_raw;
    use proptest::prelude::*;

    fn delta() -> TensorSet {
        let mut s = TensorSet::new();
        s.insert(
            "layer.0.w".into(),
            Tensor::new(
                vec![3, 4],
                (0..12).map(|i| (i as f32 - 5.5) * 0.013).collect(),
            )
            .unwrap(),
        );
        s.insert(
            "layer.0.b".into(),
            Tensor::new(vec![4], vec![1e-3, -2e-3, 0.0, 5e-4]).unwrap(),
        );
        s.insert("scalar".into(), Tensor::new(vec![], vec![-0.25]).unwrap());
        s.insert("empty".into(), Tensor::new(vec![0, 3], vec![]).unwrap());
        s
    }

    fn opts(codec: Codec) -> EncodeOptions {
        EncodeOptions {
            codec,
            zstd_level: 3,
        }
    }

    const CAP: usize = 1 << 20;

    #[test]
    fn codec_strings() {
        for (s, c) in [
            ("f32", Codec::F32),
            ("bf16", Codec::Bf16),
            ("int8", Codec::Int8),
            ("topk:0.01", Codec::TopK { fraction: 0.01 }),
        ] {
            assert_eq!(s.parse::<Codec>().unwrap(), c);
            assert_eq!(c.to_string(), s);
        }
        assert_eq!(
            "topk:1".parse::<Codec>().unwrap(),
            Codec::TopK { fraction: 1.0 }
        );
        for bad in [
            "",
            "F32",
            "int4",
            "topk:",
            "topk:0",
            "topk:-0.1",
            "topk:1.5",
            "topk:NaN",
            "topk:inf",
            "topk:0.1x",
        ] {
            assert!(
                matches!(bad.parse::<Codec>(), Err(ProtoError::UnsupportedCodec(_))),
                "{bad}"
            );
        }
        assert_eq!(Codec::TopK { fraction: 0.01 }.kept(1000), 10);
        assert_eq!(Codec::TopK { fraction: 0.01 }.kept(1001), 11);
        assert_eq!(Codec::TopK { fraction: 1e-9 }.kept(5), 1);
        assert_eq!(Codec::TopK { fraction: 0.5 }.kept(0), 0);
    }

    #[test]
    fn every_codec_round_trips_with_its_name_in_metadata() {
        let d = delta();
        let spec = ModelSpec::from_tensors(&d);
        for codec in [
            Codec::F32,
            Codec::Bf16,
            Codec::Int8,
            Codec::TopK { fraction: 0.25 },
        ] {
            let bytes = encode_delta(&d, &opts(codec), None).unwrap();
            let (out, got) = decode_delta_with_codec(&bytes, &spec, CAP).unwrap();
            assert_eq!(got, codec);
            spec.validate(&out).unwrap();
            let st = zstd::decode_all(&bytes[..]).unwrap();
            let (_, meta) = parse_raw(&st).unwrap();
            assert_eq!(meta[CODEC_KEY], codec.to_string());
        }
        let bytes = encode_delta(&d, &opts(Codec::F32), None).unwrap();
        assert_eq!(decode_delta(&bytes, &spec, CAP).unwrap(), d);
    }

    #[test]
    fn int8_layout_is_documented_one() {
        let d = delta();
        let bytes = encode_delta(&d, &opts(Codec::Int8), None).unwrap();
        let st = zstd::decode_all(&bytes[..]).unwrap();
        let (raw, _) = parse_raw(&st).unwrap();
        assert_eq!(raw["layer.0.w"].dtype, Dtype::I8);
        assert_eq!(raw["layer.0.w.__scale"].shape, vec![3]);
        assert_eq!(raw["layer.0.b.__scale"].shape, vec![1]);
        assert_eq!(raw["scalar.__scale"].shape, vec![1]);
        assert_eq!(raw["empty.__scale"].shape, vec![0]);
        // Readable by the reference safetensors implementation too.
        let st_ref = safetensors::SafeTensors::deserialize(&st).unwrap();
        assert_eq!(
            st_ref.tensor("layer.0.w").unwrap().dtype(),
            safetensors::Dtype::I8
        );
    }

    #[test]
    fn decode_each_hands_out_what_decode_returns_in_spec_order() {
        let mut set = TensorSet::new();
        for (name, n) in [("b", 6usize), ("a", 4), ("c", 10)] {
            set.insert(
                name.into(),
                Tensor {
                    shape: vec![2, n / 2],
                    data: (0..n).map(|i| i as f32 * 0.25 - 1.0).collect(),
                },
            );
        }
        let spec = ModelSpec::from_tensors(&set);
        for codec in [Codec::F32, Codec::Bf16, Codec::Int8] {
            let opts = EncodeOptions {
                codec,
                ..Default::default()
            };
            let blob = encode_delta(&set, &opts, None).unwrap();
            let whole = decode_delta(&blob, &spec, 1 << 20).unwrap();
            let mut seen = Vec::new();
            let got = decode_delta_each(&blob, &spec, 1 << 20, |name, shape, values| {
                assert_eq!(shape, whole[name].shape.as_slice());
                assert_eq!(values, whole[name].data, "{codec} {name}");
                seen.push(name.to_string());
                Ok::<_, ProtoError>(())
            })
            .unwrap();
            assert_eq!(got, codec);
            assert_eq!(seen, ["a", "b", "c"]);
            // Inflated from a reader (a spooled file): the same tensors, and a cut blob fails.
            let mut streamed = TensorSet::new();
            let reader = std::io::BufReader::with_capacity(7, &blob[..]);
            decode_delta_each_from(reader, &spec, 1 << 20, |name, shape, values| {
                let t = Tensor::new(shape.to_vec(), values)?;
                streamed.insert(name.to_string(), t);
                Ok::<_, ProtoError>(())
            })
            .unwrap();
            assert_eq!(streamed, whole, "{codec}");
            let cut = &blob[..blob.len() - 1];
            assert!(
                decode_delta_each_from(cut, &spec, 1 << 20, |_, _, _| Ok::<_, ProtoError>(()))
                    .is_err()
            );
            // The callback's own error stops the decode after the first tensor.
            let mut calls = 0;
            let err = decode_delta_each(&blob, &spec, 1 << 20, |_, _, _| {
                calls += 1;
                Err(ProtoError::NonFinite("stop".into()))
            })
            .unwrap_err();
            assert!(matches!(err, ProtoError::NonFinite(ref n) if n == "stop"));
            assert_eq!(calls, 1);
        }
    }

    #[test]
    fn decode_checks_the_model_spec() {
        let d = delta();
        let spec = ModelSpec::from_tensors(&d);
        for codec in [
            Codec::F32,
            Codec::Bf16,
            Codec::Int8,
            Codec::TopK { fraction: 0.5 },
        ] {
            let bytes = encode_delta(&d, &opts(codec), None).unwrap();
            let mut missing = spec.clone();
            missing.tensors.insert("other".into(), vec![2]);
            assert!(
                matches!(
                    decode_delta(&bytes, &missing, CAP),
                    Err(ProtoError::MissingTensor(_))
                ),
                "{codec}"
            );
            let mut fewer = spec.clone();
            fewer.tensors.remove("scalar");
            assert!(
                matches!(
                    decode_delta(&bytes, &fewer, CAP),
                    Err(ProtoError::UnexpectedTensor(_))
                ),
                "{codec}"
            );
            let mut reshaped = spec.clone();
            reshaped.tensors.insert("layer.0.w".into(), vec![4, 3]);
            let err = decode_delta(&bytes, &reshaped, CAP).unwrap_err();
            assert_eq!(
                err.reject_reason(),
                crate::RejectReason::ShapeMismatch,
                "{codec}: {err}"
            );
        }
    }

    /// A hand-built blob: safetensors with the given tensors and codec, zstd-compressed.
    fn blob(codec: &str, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) -> Vec<u8> {
        let raw = tensors
            .into_iter()
            .map(|(n, dtype, shape, data)| {
                (
                    n.to_string(),
                    RawTensor {
                        dtype,
                        shape,
                        data: Cow::Owned(data),
                    },
                )
            })
            .collect();
        let meta = [(CODEC_KEY.to_string(), codec.to_string())].into();
        zstd::bulk::compress(&write_raw(&raw, &meta), 3).unwrap()
    }

    #[test]
    fn rejects_nan_inf_and_bad_dtypes() {
        let spec = ModelSpec {
            tensors: [("w".to_string(), vec![2])].into(),
        };
        let f32s = |v: [f32; 2]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for v in [[f32::NAN, 0.0], [0.0, f32::INFINITY]] {
            let b = blob("f32", vec![("w", Dtype::F32, vec![2], f32s(v))]);
            assert!(matches!(
                decode_delta(&b, &spec, CAP),
                Err(ProtoError::NonFinite(_))
            ));
        }
        // int8 with an infinite scale.
        let b = blob(
            "int8",
            vec![
                ("w", Dtype::I8, vec![2], vec![1, 2]),
                (
                    "w.__scale",
                    Dtype::F32,
                    vec![1],
                    f32::INFINITY.to_le_bytes().to_vec(),
                ),
            ],
        );
        assert!(matches!(
            decode_delta(&b, &spec, CAP),
            Err(ProtoError::NonFinite(_))
        ));
        // Wrong dtype for the declared codec.
        let b = blob("f32", vec![("w", Dtype::BF16, vec![2], vec![0; 4])]);
        assert!(matches!(
            decode_delta(&b, &spec, CAP),
            Err(ProtoError::DtypeMismatch { .. })
        ));
        // Unknown or missing codec.
        let b = blob("int4", vec![("w", Dtype::F32, vec![2], f32s([0.0, 1.0]))]);
        assert!(matches!(
            decode_delta(&b, &spec, CAP),
            Err(ProtoError::UnsupportedCodec(_))
        ));
        let raw = [(
            "w".to_string(),
            RawTensor {
                dtype: Dtype::F32,
                shape: vec![2],
                data: Cow::Owned(f32s([0.0, 1.0])),
            },
        )]
        .into();
        let b = zstd::bulk::compress(&write_raw(&raw, &BTreeMap::new()), 3).unwrap();
        assert!(matches!(
            decode_delta(&b, &spec, CAP),
            Err(ProtoError::UnsupportedCodec(_))
        ));
    }

    #[test]
    fn rejects_malformed_topk() {
        let spec = ModelSpec {
            tensors: [("w".to_string(), vec![4])].into(),
        };
        let make = |idx: Vec<i32>, shape: i64| {
            let n = idx.len();
            blob(
                "topk:0.5",
                vec![
                    (
                        "w.__idx",
                        Dtype::I32,
                        vec![n],
                        idx.iter().flat_map(|i| i.to_le_bytes()).collect(),
                    ),
                    ("w.__val", Dtype::I8, vec![n], vec![1; n]),
                    (
                        "w.__scale",
                        Dtype::F32,
                        vec![1],
                        0.5f32.to_le_bytes().to_vec(),
                    ),
                    (
                        "w.__shape",
                        Dtype::I64,
                        vec![1],
                        shape.to_le_bytes().to_vec(),
                    ),
                ],
            )
        };
        assert_eq!(
            decode_delta(&make(vec![0, 3], 4), &spec, CAP).unwrap()["w"].data,
            vec![0.5, 0.0, 0.0, 0.5]
        );
        for (idx, shape) in [
            (vec![0, 4], 4),
            (vec![-1, 2], 4),
            (vec![2, 2], 4),
            (vec![3, 1], 4),
            (vec![0, 1], 5),
            (vec![0, 1], -4),
        ] {
            let err = decode_delta(&make(idx.clone(), shape), &spec, CAP).unwrap_err();
            assert!(
                matches!(
                    err,
                    ProtoError::MalformedDelta(_) | ProtoError::ShapeMismatch { .. }
                ),
                "{idx:?} {shape}: {err}"
            );
        }
    }

    #[test]
    fn topk_selection_edges() {
        assert_eq!(topk_indices(&[1.0, -1.0, 1.0, 1.0], 2), vec![0, 1]);
        assert_eq!(topk_indices(&[0.1, -5.0, 3.0, 0.0], 2), vec![1, 2]);
        assert_eq!(topk_indices(&[0.1, -5.0, 3.0], 3), vec![0, 1, 2]);
        assert_eq!(topk_indices(&[0.1, -5.0, 3.0], 9), vec![0, 1, 2]);
        assert_eq!(topk_indices(&[0.0, -0.0, 0.0], 1), vec![0]);
        assert!(topk_indices(&[], 1).is_empty());
        assert!(topk_indices(&[1.0], 0).is_empty());
    }

    #[test]
    fn zstd_bomb_is_refused() {
        // 64 MiB of zeros compress to a few KiB; the cap must stop decompression early.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        assert!(bomb.len() < 64 << 10);
        let spec = ModelSpec::default();
        assert!(matches!(
            decode_delta(&bomb, &spec, 1 << 20),
            Err(ProtoError::Oversize { .. })
        ));
        assert!(matches!(
            decode_delta(b"not zstd at all", &spec, CAP),
            Err(ProtoError::Zstd(_))
        ));
    }

    #[test]
    fn rejects_reserved_names_and_bad_input_when_encoding() {
        let mut d = delta();
        d.insert("x.__scale".into(), Tensor::zeros(vec![1]));
        assert!(matches!(
            encode_delta(&d, &opts(Codec::Int8), None),
            Err(ProtoError::InvalidName { .. })
        ));
        let mut d = delta();
        d.get_mut("scalar").unwrap().data[0] = f32::NAN;
        assert!(matches!(
            encode_delta(&d, &opts(Codec::F32), None),
            Err(ProtoError::NonFinite(_))
        ));
        let mut d = delta();
        d.get_mut("scalar").unwrap().data.push(1.0);
        assert!(matches!(
            encode_delta(&d, &opts(Codec::F32), None),
            Err(ProtoError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn bf16_saturates_instead_of_overflowing() {
        let d: TensorSet = [(
            "w".to_string(),
            Tensor::new(vec![2], vec![f32::MAX, f32::MIN]).unwrap(),
        )]
        .into();
        let out = decode_delta(
            &encode_delta(&d, &opts(Codec::Bf16), None).unwrap(),
            &ModelSpec::from_tensors(&d),
            CAP,
        )
        .unwrap();
        assert_eq!(
            out["w"].data,
            vec![half::bf16::MAX.to_f32(), half::bf16::MIN.to_f32()]
        );
    }

    #[test]
    fn apply() {
        let mut g = delta();
        let d = delta();
        apply_delta(&mut g, &d, 2.0);
        assert_eq!(g["scalar"].data, vec![-0.75]);
        let mut bad = delta();
        bad.remove("scalar");
        assert!(try_apply_delta(&mut g, &bad, 1.0).is_err());
        assert_eq!(g["scalar"].data, vec![-0.75]);
        try_apply_delta(&mut g, &d, -3.0).unwrap();
        assert_eq!(g["scalar"].data, vec![0.0]);
    }

    fn tensor_strategy() -> impl Strategy<Value = Tensor> {
        prop::collection::vec(0usize..6, 0..4).prop_flat_map(|shape| {
            let n = shape.iter().product::<usize>();
            let values = prop_oneof![-1e3f32..1e3f32, -1e-6f32..1e-6f32, Just(0.0f32)];
            prop::collection::vec(values, n).prop_map(move |data| Tensor {
                shape: shape.clone(),
                data,
            })
        })
    }

    fn set_strategy() -> impl Strategy<Value = TensorSet> {
        prop::collection::btree_map("[a-z]{1,6}(\\.[a-z0-9]{1,3})?", tensor_strategy(), 1..5)
    }

    fn round_trip(d: &TensorSet, codec: Codec) -> TensorSet {
        let bytes = encode_delta(d, &opts(codec), None).unwrap();
        decode_delta(&bytes, &ModelSpec::from_tensors(d), CAP).unwrap()
    }

    proptest! {
        #[test]
        fn f32_is_exact(d in set_strategy()) {
            prop_assert_eq!(round_trip(&d, Codec::F32), d);
        }

        #[test]
        fn bf16_within_bf16_precision(d in set_strategy()) {
            let out = round_trip(&d, Codec::Bf16);
            for (name, t) in &d {
                for (x, y) in t.data.iter().zip(&out[name].data) {
                    // 8 significant bits: relative error ≤ 2⁻⁸ after round-to-nearest.
                    prop_assert!((x - y).abs() <= x.abs() * (1.0 / 256.0) + f32::MIN_POSITIVE, "{} vs {}", x, y);
                }
            }
        }

        #[test]
        fn int8_error_within_half_step_per_row(d in set_strategy()) {
            let out = round_trip(&d, Codec::Int8);
            for (name, t) in &d {
                let rows = int8_rows(&t.shape);
                let row_len = t.data.len().checked_div(rows).unwrap_or(0);
                for (r, (xs, ys)) in t.data.chunks(row_len.max(1)).zip(out[name].data.chunks(row_len.max(1))).enumerate() {
                    let bound = absmax(xs) / 127.0 / 2.0 * (1.0 + 1e-5) + 1e-30;
                    for (x, y) in xs.iter().zip(ys) {
                        prop_assert!((x - y).abs() <= bound, "{}[{}]: {} vs {} (bound {})", name, r, x, y, bound);
                    }
                }
            }
        }

        #[test]
        fn topk_keeps_the_k_largest(d in set_strategy(), fraction in 0.001f32..=1.0) {
            let codec = Codec::TopK { fraction };
            let out = round_trip(&d, codec);
            for (name, t) in &d {
                let k = codec.kept(t.data.len());
                let expected_k = if t.data.is_empty() { 0 } else { ((fraction as f64 * t.data.len() as f64).ceil() as usize).max(1) };
                prop_assert_eq!(k, expected_k.min(t.data.len()));
                let idx = topk_indices(&t.data, k);
                prop_assert_eq!(idx.len(), k);
                let min_kept = idx.iter().map(|&i| t.data[i].abs()).fold(f32::INFINITY, f32::min);
                for j in (0..t.data.len()).filter(|j| idx.binary_search(j).is_err()) {
                    prop_assert!(t.data[j].abs() <= min_kept);
                    prop_assert_eq!(out[name].data[j], 0.0);
                }
                let picked: Vec<f32> = idx.iter().map(|&i| t.data[i]).collect();
                let bound = absmax(&picked) / 127.0 / 2.0 * (1.0 + 1e-5) + 1e-30;
                for &i in &idx {
                    prop_assert!((t.data[i] - out[name].data[i]).abs() <= bound);
                }
            }
        }

        #[test]
        fn error_feedback_conserves_the_signal(d in set_strategy(), old in set_strategy(), fraction in 0.01f32..=1.0, codec_i in 0usize..4) {
            let codec = [Codec::F32, Codec::Bf16, Codec::Int8, Codec::TopK { fraction }][codec_i];
            // Residual: matching shapes for the delta's own names, plus unrelated entries that
            // must be dropped.
            let mut residual: TensorSet = d.iter().map(|(n, t)| {
                let data = t.data.iter().enumerate().map(|(i, x)| x * 0.3 + i as f32 * 1e-3).collect();
                (n.clone(), Tensor { shape: t.shape.clone(), data })
            }).collect();
            for (n, t) in old { residual.entry(format!("zz{n}")).or_insert(t); }
            let before = residual.clone();
            let bytes = encode_delta(&d, &opts(codec), Some(&mut residual)).unwrap();
            let sent = decode_delta(&bytes, &ModelSpec::from_tensors(&d), CAP).unwrap();
            prop_assert_eq!(residual.keys().collect::<Vec<_>>(), d.keys().collect::<Vec<_>>());
            for (name, t) in &d {
                for i in 0..t.data.len() {
                    let target = t.data[i] + before[name].data[i];
                    prop_assert_eq!(residual[name].data[i] + sent[name].data[i], target, "{}[{}]", name, i);
                }
            }
        }

        #[test]
        fn decode_of_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let spec = ModelSpec { tensors: [("w".to_string(), vec![2, 2])].into() };
            let _ = decode_delta(&bytes, &spec, CAP);
            // Also as the payload of a valid zstd frame, so the safetensors parser is reached.
            let framed = zstd::bulk::compress(&bytes, 1).unwrap();
            let _ = decode_delta(&framed, &spec, CAP);
        }

        #[test]
        fn truncated_blobs_are_errors(d in set_strategy(), cut_frac in 0.0f64..1.0) {
            let bytes = encode_delta(&d, &opts(Codec::Int8), None).unwrap();
            let cut = (bytes.len() as f64 * cut_frac) as usize;
            prop_assert!(decode_delta(&bytes[..cut], &ModelSpec::from_tensors(&d), CAP).is_err());
        }
    }
}
