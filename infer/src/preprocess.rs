//! Host-side preprocessing of LeRobot's SmolVLA pipeline, in plain Rust (no libtorch):
//! camera frames to resized-with-pad `[0, 1]` CHW floats, MEAN_STD (un)normalization with the
//! processors' statistics, and task tokenization to a fixed length.
//!
//! Everything here reproduces what LeRobot does on the host before (or after) the policy's
//! tensors; the `x·2 − 1` of `prepare_images` lives inside the exported ONNX graph.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// Errors of the preprocessing steps.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("statistic {name}: unsupported dtype {dtype} (expected F32, F64, F16 or BF16)")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("no mean/std statistics for feature {0:?}")]
    MissingFeature(String),
    #[error("feature {feature:?}: mean has {mean} values but std has {std}")]
    StatsMismatch {
        feature: String,
        mean: usize,
        std: usize,
    },
    #[error("feature {feature:?}: {len} values are not rows of the feature's {dim}")]
    LengthMismatch {
        feature: String,
        len: usize,
        dim: usize,
    },
    #[error("image: {0}")]
    Image(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("task {task:?} has {tokens} tokens, more than the fixed length {length}")]
    TooManyTokens {
        task: String,
        tokens: usize,
        length: usize,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// The resized size of LeRobot's `resize_with_pad`: `ratio = max(w/out_w, h/out_h)` in f64 (as
/// Python's float division), sizes truncated toward zero as `int(...)` does.
pub fn resized_size(h: usize, w: usize, out_h: usize, out_w: usize) -> (usize, usize) {
    let ratio = f64::max(w as f64 / out_w as f64, h as f64 / out_h as f64);
    ((h as f64 / ratio) as usize, (w as f64 / ratio) as usize)
}

/// Source indices and weights of torch's `upsample_bilinear2d` (align_corners=False, no
/// scale factor given) along one axis: `scale = (float)in / out`, the source coordinate
/// `(dst + 0.5)·scale − 0.5` clamped at 0, the low index clamped to `in − 1`, the high one
/// equal to it on the last row/column. All in f32, as torch's float opmath does; the
/// coordinate is rounded after the product (not fused), which is what matches torch's bits.
fn linear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|dst| {
            let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let lambda1 = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - lambda1, lambda1)
        })
        .collect()
}

/// Bilinear resize of a CHW image as torch's `F.interpolate(mode="bilinear",
/// align_corners=False)` without antialias, bit for bit like torch's generic CPU kernel (the
/// one its x86 builds run for outputs with h + w > 128, i.e. every real camera): along the
/// width first, then the height, each step `fma(x0, w0, x1·w1)` (torch's compiled code fuses
/// it). Torch's kernel for small outputs rounds differently, by up to a few 1e-7.
///
/// # Panics
/// If `img.len() != c·h·w` (a caller's bug; [`prepare_image`] checks shapes and never panics).
pub fn resize_bilinear(
    img: &[f32],
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<f32> {
    assert_eq!(img.len(), c * h * w, "image of {c}x{h}x{w}");
    if (h, w) == (oh, ow) {
        return img.to_vec();
    }
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return vec![0.0; c * oh * ow];
    }
    let ys = linear_taps(h, oh);
    let xs = linear_taps(w, ow);
    let mut out = Vec::with_capacity(c * oh * ow);
    for plane in img.chunks_exact(h * w) {
        for &(y0, y1, wy0, wy1) in &ys {
            let (r0, r1) = (&plane[y0 * w..(y0 + 1) * w], &plane[y1 * w..(y1 + 1) * w]);
            for &(x0, x1, wx0, wx1) in &xs {
                let top = r0[x0].mul_add(wx0, r0[x1] * wx1);
                let bottom = r1[x0].mul_add(wx0, r1[x1] * wx1);
                out.push(top.mul_add(wy0, bottom * wy1));
            }
        }
    }
    out
}

/// LeRobot's `resize_with_pad` on one CHW image (f32 in [0, 1]): keep the aspect ratio with
/// [`resize_bilinear`] to [`resized_size`], then pad with `pad_value` on the LEFT and TOP to
/// (out_h, out_w). Same sizes are returned as is. A degenerate resized size of 0 (an extreme
/// aspect ratio, where torch would raise) gives an image of `pad_value` only.
///
/// # Panics
/// If `img.len() != c·h·w`, as [`resize_bilinear`].
pub fn resize_with_pad(
    img: &[f32],
    c: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    pad_value: f32,
) -> Vec<f32> {
    assert_eq!(img.len(), c * h * w, "image of {c}x{h}x{w}");
    if (h, w) == (out_h, out_w) {
        return img.to_vec();
    }
    let (rh, rw) = resized_size(h, w, out_h, out_w);
    if rh == 0 || rw == 0 {
        return vec![pad_value; c * out_h * out_w];
    }
    let resized = resize_bilinear(img, c, h, w, rh, rw);
    // `ratio` makes both sizes fit, so the pads are >= 0 (LeRobot clamps them at 0 too).
    let (pad_h, pad_w) = (out_h.saturating_sub(rh), out_w.saturating_sub(rw));
    let (fh, fw) = (rh + pad_h, rw + pad_w);
    let mut out = vec![pad_value; c * fh * fw];
    for (ch, plane) in resized.chunks_exact(rh * rw).enumerate() {
        for (y, row) in plane.chunks_exact(rw).enumerate() {
            let start = ch * fh * fw + (y + pad_h) * fw + pad_w;
            out[start..start + rw].copy_from_slice(row);
        }
    }
    out
}

/// A u8 HWC frame (as a video decoder or camera gives it) to f32 CHW in [0, 1]: `x / 255` in
/// f32, what LeRobot's dataset video decoding (`frames.type(torch.float32) / 255`) gives.
pub fn hwc_u8_to_chw_f32(frame: &[u8], h: usize, w: usize, c: usize) -> Result<Vec<f32>> {
    if frame.len() != h * w * c {
        return Err(Error::Image(format!(
            "{} bytes for a {h}x{w}x{c} HWC frame",
            frame.len()
        )));
    }
    let mut out = vec![0.0f32; frame.len()];
    for (p, px) in frame.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            out[ch * h * w + p] = v as f32 / 255.0;
        }
    }
    Ok(out)
}

/// `SmolVLAPolicy.prepare_images` for one camera up to, not including, `x·2 − 1` (done in the
/// ONNX graph): `shape` is `[C, H, W]` or `[T, C, H, W]` (the last time step is taken, as
/// LeRobot does with a 5-D batch), resized-with-pad (pad 0) to (out_h, out_w). Returns `[0, 1]`
/// floats of shape `[C, out_h, out_w]`.
pub fn prepare_image(img: &[f32], shape: &[usize], out_h: usize, out_w: usize) -> Result<Vec<f32>> {
    let (t, c, h, w) = match *shape {
        [c, h, w] => (1, c, h, w),
        [t, c, h, w] if t > 0 => (t, c, h, w),
        _ => {
            return Err(Error::Image(format!(
                "shape {shape:?}: expected [C, H, W] or [T, C, H, W]"
            )))
        }
    };
    let frame = c * h * w;
    if img.len() != t * frame {
        return Err(Error::Image(format!(
            "{} values for shape {shape:?}",
            img.len()
        )));
    }
    let (rh, rw) = resized_size(h, w, out_h, out_w);
    if (h, w) != (out_h, out_w) && (rh == 0 || rw == 0) {
        return Err(Error::Image(format!(
            "{h}x{w} resizes to {rh}x{rw} to fit {out_h}x{out_w}"
        )));
    }
    let last = &img[(t - 1) * frame..];
    Ok(resize_with_pad(last, c, h, w, out_h, out_w, 0.0))
}

// ---------------------------------------------------------------------------------------------
// Normalization
// ---------------------------------------------------------------------------------------------

/// LeRobot's normalizer epsilon (`NormalizerProcessorStep.eps`).
pub const DEFAULT_EPS: f32 = 1e-8;

/// MEAN_STD statistics per feature, as LeRobot's normalizer / unnormalizer processors use
/// them (`policy_preprocessor_step_5_normalizer_processor.safetensors`,
/// `policy_postprocessor_step_0_unnormalizer_processor.safetensors`).
#[derive(Debug, Clone)]
pub struct Normalizer {
    stats: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
    eps: f32,
}

impl Default for Normalizer {
    /// No features yet, LeRobot's epsilon.
    fn default() -> Self {
        Self {
            stats: BTreeMap::new(),
            eps: DEFAULT_EPS,
        }
    }
}

impl Normalizer {
    /// From in-memory statistics (feature → (mean, std)), e.g. stored by the exporter.
    pub fn from_stats(
        stats: impl IntoIterator<Item = (String, (Vec<f32>, Vec<f32>))>,
    ) -> Result<Self> {
        let mut n = Self::default();
        for (feature, (mean, std)) in stats {
            n.insert(feature, mean, std)?;
        }
        Ok(n)
    }

    /// Adds (or replaces) the statistics of one feature.
    pub fn insert(&mut self, feature: String, mean: Vec<f32>, std: Vec<f32>) -> Result<()> {
        if mean.len() != std.len() {
            return Err(Error::StatsMismatch {
                feature,
                mean: mean.len(),
                std: std.len(),
            });
        }
        self.stats.insert(feature, (mean, std));
        Ok(())
    }

    /// Reads a LeRobot processor state file: every feature with both `<feature>.mean` and
    /// `<feature>.std` (other statistics, min/max/quantiles/count, are not used by MEAN_STD).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_safetensors_bytes(&bytes).map_err(|e| match e {
            Error::Safetensors { msg, .. } => Error::Safetensors {
                path: path.to_path_buf(),
                msg,
            },
            e => e,
        })
    }

    /// [`Normalizer::from_file`] on the bytes of a safetensors file.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
            path: PathBuf::from("<memory>"),
            msg: e.to_string(),
        })?;
        let mut stats = Vec::new();
        for name in st.names() {
            let Some(feature) = name.strip_suffix(".mean") else {
                continue;
            };
            let std_name = format!("{feature}.std");
            let Ok(std) = st.tensor(&std_name) else {
                continue;
            };
            let mean = st.tensor(name).map_err(|e| Error::Safetensors {
                path: PathBuf::from("<memory>"),
                msg: e.to_string(),
            })?;
            stats.push((
                feature.to_string(),
                (
                    tensor_to_f32(name, mean.dtype(), mean.data())?,
                    tensor_to_f32(&std_name, std.dtype(), std.data())?,
                ),
            ));
        }
        Self::from_stats(stats)
    }

    /// Uses another epsilon than LeRobot's default 1e-8 (the processor config's `eps`).
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// The features that have statistics, in name order.
    pub fn features(&self) -> impl Iterator<Item = &str> {
        self.stats.keys().map(String::as_str)
    }

    /// (mean, std) of a feature.
    pub fn stats(&self, feature: &str) -> Option<(&[f32], &[f32])> {
        self.stats
            .get(feature)
            .map(|(m, s)| (m.as_slice(), s.as_slice()))
    }

    /// The statistics of `feature`, checked against `x`: one or more rows (row-major
    /// `[.., D]`) of the feature's D values, so an action chunk goes in one call.
    fn checked(&self, feature: &str, x: &[f32]) -> Result<(&[f32], &[f32])> {
        let (mean, std) = self
            .stats(feature)
            .ok_or_else(|| Error::MissingFeature(feature.to_string()))?;
        if mean.is_empty() || !x.len().is_multiple_of(mean.len()) {
            return Err(Error::LengthMismatch {
                feature: feature.to_string(),
                len: x.len(),
                dim: mean.len(),
            });
        }
        Ok((mean, std))
    }

    /// LeRobot's MEAN_STD normalization in place: `(x − mean) / (std + eps)`, in f32.
    pub fn normalize(&self, feature: &str, x: &mut [f32]) -> Result<()> {
        let (mean, std) = self.checked(feature, x)?;
        for row in x.chunks_exact_mut(mean.len()) {
            for ((v, m), s) in row.iter_mut().zip(mean).zip(std) {
                *v = (*v - m) / (s + self.eps);
            }
        }
        Ok(())
    }

    /// The postprocessor's MEAN_STD unnormalization in place: `x · std + mean` (no epsilon).
    pub fn unnormalize(&self, feature: &str, x: &mut [f32]) -> Result<()> {
        let (mean, std) = self.checked(feature, x)?;
        for row in x.chunks_exact_mut(mean.len()) {
            for ((v, m), s) in row.iter_mut().zip(mean).zip(std) {
                *v = *v * s + m;
            }
        }
        Ok(())
    }
}

/// Little-endian floating-point tensor bytes to f32 (F64 rounds to nearest, F16/BF16 widen
/// exactly).
fn tensor_to_f32(name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        other => {
            return Err(Error::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

/// IEEE half to single precision (exact: every f16 is an f32).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        // Subnormal: value = frac · 2^-24, exact in f32.
        (0, f) => return sign_of(h) * f as f32 * f32::powi(2.0, -24),
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

fn sign_of(h: u16) -> f32 {
    if h & 0x8000 != 0 {
        -1.0
    } else {
        1.0
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenization
// ---------------------------------------------------------------------------------------------

/// LeRobot's `NewLineTaskProcessorStep` + `TokenizerProcessorStep` for SmolVLA, padded to a
/// fixed length (the exported graph has a static language length; padded tokens are masked
/// out, so they do not change the policy's output).
#[derive(Debug)]
pub struct TaskTokenizer {
    inner: tokenizers::Tokenizer,
    max_length: usize,
    pad_id: u32,
}

impl TaskTokenizer {
    /// Loads a `tokenizer.json`; `pad_token` names the padding token (SmolVLM2: `<|im_end|>`),
    /// `max_length` is the config's `tokenizer_max_length`.
    pub fn from_file(path: &Path, max_length: usize, pad_token: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::new(inner, max_length, pad_token)
    }

    /// From a loaded tokenizer. Its own padding is turned off (padding is done here) and its
    /// truncation set to `max_length`, as the HF call `truncation=True, max_length=...`
    /// does: special tokens count toward the limit.
    pub fn new(
        mut inner: tokenizers::Tokenizer,
        max_length: usize,
        pad_token: &str,
    ) -> Result<Self> {
        let pad_id = inner
            .token_to_id(pad_token)
            .ok_or_else(|| Error::Tokenizer(format!("no pad token {pad_token:?}")))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Self {
            inner,
            max_length,
            pad_id,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token ids (truncated at `max_length`, before padding) of `task` + "\n" (unless it
    /// already ends with a newline), with special tokens.
    pub fn tokens(&self, task: &str) -> Result<Vec<i64>> {
        let text = if task.ends_with('\n') {
            task.to_string()
        } else {
            format!("{task}\n")
        };
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Ids and attention mask of `task`, right-padded with the pad token to exactly `length`
    /// (a prompt longer than `length` after truncation is an error, not cut further: choose
    /// `length >= max_length` to accept every task).
    pub fn encode(&self, task: &str, length: usize) -> Result<(Vec<i64>, Vec<bool>)> {
        let mut ids = self.tokens(task)?;
        if ids.len() > length {
            return Err(Error::TooManyTokens {
                task: task.to_string(),
                tokens: ids.len(),
                length,
            });
        }
        let mut mask = vec![true; ids.len()];
        ids.resize(length, self.pad_id as i64);
        mask.resize(length, false);
        Ok((ids, mask))
    }

    /// [`TaskTokenizer::encode`] of a batch, row-major `[B, length]`.
    pub fn encode_batch(&self, tasks: &[&str], length: usize) -> Result<(Vec<i64>, Vec<bool>)> {
        let mut ids = Vec::with_capacity(tasks.len() * length);
        let mut mask = Vec::with_capacity(tasks.len() * length);
        for t in tasks {
            let (i, m) = self.encode(t, length)?;
            ids.extend(i);
            mask.extend(m);
        }
        Ok((ids, mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 / n as f32).collect()
    }

    #[test]
    fn same_size_is_returned_as_is() {
        let img = ramp(3 * 5 * 7);
        assert_eq!(resize_with_pad(&img, 3, 5, 7, 5, 7, -1.0), img);
        assert_eq!(resize_bilinear(&img, 3, 5, 7, 5, 7), img);
    }

    #[test]
    fn downscaled_constant_stays_constant() {
        let img = vec![0.25f32; 3 * 40 * 40];
        let out = resize_with_pad(&img, 3, 40, 40, 13, 13, 0.0);
        assert_eq!(out.len(), 3 * 13 * 13);
        assert!(out.iter().all(|v| (v - 0.25).abs() < 1e-7), "{out:?}");
    }

    #[test]
    fn upscale_interpolates_between_and_clamps_at_the_border() {
        // 1x2 -> 1x4 (a single row): scale 0.5, sources -0.25 (clamped to 0), 0.25, 0.75,
        // 1.25 (the last pixel only).
        let out = resize_bilinear(&[0.0, 1.0], 1, 1, 2, 1, 4);
        assert_eq!(out, vec![0.0, 0.25, 0.75, 1.0]);
        // 2x downscale averages pixel pairs: sources 0.5 and 2.5.
        let out = resize_bilinear(&[0.0, 1.0, 2.0, 3.0], 1, 1, 4, 1, 2);
        assert_eq!(out, vec![0.5, 2.5]);
    }

    #[test]
    fn non_square_pads_left_and_top() {
        // 4x8 into 8x8: ratio 1, no resize, 4 rows of pad on top.
        let img = vec![1.0f32; 2 * 4 * 8];
        let out = resize_with_pad(&img, 2, 4, 8, 8, 8, -1.0);
        assert_eq!(out.len(), 2 * 64);
        for ch in 0..2 {
            for y in 0..8 {
                for x in 0..8 {
                    let want = if y < 4 { -1.0 } else { 1.0 };
                    assert_eq!(out[ch * 64 + y * 8 + x], want, "c{ch} y{y} x{x}");
                }
            }
        }
        // 8x4 into 8x8: 4 columns of pad on the left.
        let out = resize_with_pad(&img, 2, 8, 4, 8, 8, 0.0);
        for y in 0..8 {
            assert_eq!(
                &out[y * 8..y * 8 + 8],
                &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
            );
        }
        // 64x96 into 64x64: LeRobot's sizes, int(64 / 1.5) = 42 rows, 22 padded on top.
        assert_eq!(resized_size(64, 96, 64, 64), (42, 64));
        let out = resize_with_pad(&ramp(64 * 96), 1, 64, 96, 64, 64, 0.0);
        assert!(out[..22 * 64].iter().all(|&v| v == 0.0));
        assert!(out[22 * 64..].iter().all(|&v| v > 0.0));
    }

    #[test]
    fn one_pixel_images() {
        // 1x1 -> 8x8: every output is the pixel.
        let out = resize_with_pad(&[0.3, 0.6, 0.9], 3, 1, 1, 8, 8, 0.0);
        for (ch, v) in [0.3f32, 0.6, 0.9].iter().enumerate() {
            assert!(out[ch * 64..(ch + 1) * 64].iter().all(|x| x == v));
        }
        // 1x7 into 5x5 resizes to int(1 / 1.4) = 0 rows (torch raises): all pad here, an
        // error in prepare_image.
        assert_eq!(
            resize_with_pad(&[0.5; 7], 1, 1, 7, 5, 5, -1.0),
            vec![-1.0; 25]
        );
        assert!(matches!(
            prepare_image(&[0.5; 7], &[1, 1, 7], 5, 5),
            Err(Error::Image(_))
        ));
    }

    #[test]
    fn default_normalizer_uses_lerobots_epsilon() {
        let mut n = Normalizer::default();
        n.insert("s".into(), vec![1.0], vec![0.0]).unwrap();
        let mut x = [1.0 + 1e-8];
        n.normalize("s", &mut x).unwrap();
        assert!(x[0].is_finite());
        let mut x = [3.0f32];
        n.with_eps(1.0).normalize("s", &mut x).unwrap();
        assert_eq!(x, [2.0]);
    }

    #[test]
    fn half_floats_widen_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), f32::powi(2.0, -24));
        assert_eq!(f16_to_f32(0x8001), -f32::powi(2.0, -24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        let bf = tensor_to_f32("x", Dtype::BF16, &[0x80, 0x3f]).unwrap();
        assert_eq!(bf, vec![1.0]);
        let f64s = tensor_to_f32("x", Dtype::F64, &0.5f64.to_le_bytes()).unwrap();
        assert_eq!(f64s, vec![0.5]);
        assert!(matches!(
            tensor_to_f32("x", Dtype::I64, &[0; 8]),
            Err(Error::UnsupportedDtype { .. })
        ));
    }
}
