//! The two exported graphs on ONNX Runtime and the Euler sampler between them.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use ort::execution_providers::{
    CPUExecutionProvider, CUDAExecutionProvider, ExecutionProvider, TensorRTExecutionProvider,
};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};
use smolvla_config::export::{self as manifest, ExportManifest};

use crate::{Error, Result};

/// Where the graphs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    #[default]
    Cpu,
    Cuda,
    TensorRt,
}

impl std::str::FromStr for Provider {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "tensorrt" | "trt" => Ok(Self::TensorRt),
            _ => Err(Error::Config(format!(
                "execution provider {s:?}: expected cpu, cuda or tensorrt"
            ))),
        }
    }
}

/// Session options.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    pub provider: Provider,
    /// Intra-op threads (default: ONNX Runtime's, one per core).
    pub threads: Option<usize>,
    /// Load the graphs without ONNX Runtime's graph optimizations (for debugging a graph).
    pub no_optimization: bool,
}

/// Loads the onnxruntime shared library from `path` (or, with `None`, from `ORT_DYLIB_PATH`, else
/// the system's `libonnxruntime.so`). Call before the first session; later calls do nothing.
pub fn init(path: Option<&Path>) -> Result<()> {
    // ort's load-dynamic panics on a library it cannot open: find and check it first.
    let path = match path {
        Some(p) if p.is_file() => p.to_path_buf(),
        Some(p) => return Err(Error::Runtime(format!("{}: no such file", p.display()))),
        None => {
            let found = zk0_host::find_onnxruntime().ok_or_else(|| {
                Error::Runtime(
                    "libonnxruntime.so not found: set ORT_DYLIB_PATH (`cargo xtask setup` \
                     fetches the PyPI wheel's library)"
                        .into(),
                )
            })?;
            if let Some(e) = found.error {
                return Err(Error::Runtime(format!("{}: {e}", found.path)));
            }
            PathBuf::from(found.path)
        }
    };
    let shown = path.display().to_string();
    // A file that is not an onnxruntime library still makes ort panic: catch it, quietly
    // (the error below says what happened).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let committed = std::panic::catch_unwind(move || {
        ort::init_from(path.display().to_string())
            .with_name("zk0-infer")
            .commit()
    });
    std::panic::set_hook(hook);
    match committed {
        Ok(r) => r.map(|_| ()).map_err(Error::ort),
        Err(_) => Err(Error::Runtime(format!(
            "{shown}: cannot be loaded as onnxruntime"
        ))),
    }
}

/// The observation at the model boundary, preprocessed on the host (see [`crate::preprocess`]).
#[derive(Debug, Clone, Default)]
pub struct ModelInputs {
    /// Per camera of the manifest, in its order: [3, H, W] floats in [0, 1], resized with pad.
    pub images: Vec<Vec<f32>>,
    /// Per camera: present.
    pub image_masks: Vec<bool>,
    /// `language.max_length` token ids and their mask.
    pub tokens: Vec<i64>,
    pub token_mask: Vec<bool>,
    /// The normalized state, `state_dim` values.
    pub state: Vec<f32>,
}

/// The prefix graph's outputs, fed to every denoising step.
#[derive(Debug)]
pub struct PrefixCache {
    values: Vec<(String, DynValue)>,
}

impl PrefixCache {
    /// An output by name as (shape, float values); the pad mask comes back as 0/1.
    pub fn get(&self, name: &str) -> Result<(Vec<i64>, Vec<f32>)> {
        let v = self
            .values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| Error::Missing(name.into()))?;
        if let Ok((s, d)) = v.try_extract_tensor::<f32>() {
            return Ok((s.to_vec(), d.to_vec()));
        }
        let (s, d) = v.try_extract_tensor::<bool>().map_err(Error::ort)?;
        Ok((
            s.to_vec(),
            d.iter().map(|&b| f32::from(u8::from(b))).collect(),
        ))
    }
}

/// One sampled chunk.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// x₀ [chunk_size, max_action_dim], normalized, padded.
    pub padded: Vec<f32>,
    /// Per step (when asked for): x_t and v_t, each [chunk_size·max_action_dim].
    pub steps: Vec<(f32, Vec<f32>, Vec<f32>)>,
}

/// An export loaded into two sessions.
pub struct OnnxPolicy {
    pub manifest: ExportManifest,
    pub dir: PathBuf,
    prefix: Session,
    denoise: Session,
}

impl std::fmt::Debug for OnnxPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxPolicy")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn session(path: &Path, opts: &RuntimeOptions) -> Result<Session> {
    let mut b = Session::builder().map_err(Error::ort)?;
    let eps = match opts.provider {
        Provider::Cpu => vec![CPUExecutionProvider::default().build()],
        Provider::Cuda => {
            let ep = CUDAExecutionProvider::default();
            if !ep.is_available().unwrap_or(false) {
                return Err(Error::Provider(
                    "CUDA: this onnxruntime library has no CUDA execution provider \
                     (the PyPI onnxruntime is CPU-only: use onnxruntime-gpu's library)"
                        .into(),
                ));
            }
            vec![ep.build().error_on_failure()]
        }
        Provider::TensorRt => {
            let ep = TensorRTExecutionProvider::default();
            if !ep.is_available().unwrap_or(false) {
                return Err(Error::Provider(
                    "TensorRT: this onnxruntime library has no TensorRT execution provider".into(),
                ));
            }
            vec![ep.build().error_on_failure()]
        }
    };
    b = b.with_execution_providers(eps).map_err(Error::ort)?;
    if let Some(n) = opts.threads {
        b = b.with_intra_threads(n).map_err(Error::ort)?;
    }
    if opts.no_optimization {
        b = b
            .with_optimization_level(GraphOptimizationLevel::Disable)
            .map_err(Error::ort)?;
    }
    b.commit_from_file(path)
        .map_err(|e| Error::Load(path.to_path_buf(), e.to_string()))
}

fn f32_tensor(shape: &[i64], data: Vec<f32>) -> Result<DynValue> {
    Ok(Tensor::from_array((shape.to_vec(), data))
        .map_err(Error::ort)?
        .into_dyn())
}

fn check_len(name: &str, got: usize, shape: &[i64]) -> Result<()> {
    let want: i64 = shape.iter().product();
    if got as i64 != want {
        return Err(Error::Input {
            name: name.into(),
            expected: shape.to_vec(),
            got,
        });
    }
    Ok(())
}

impl OnnxPolicy {
    /// Loads `dir/export.json` and both graphs.
    pub fn load(dir: &Path, opts: &RuntimeOptions) -> Result<Self> {
        let manifest = ExportManifest::from_dir(dir).map_err(|e| Error::Config(e.to_string()))?;
        let prefix = session(&dir.join(&manifest.prefix.file), opts)?;
        let denoise = session(&dir.join(&manifest.denoise.file), opts)?;
        for (s, g) in [(&prefix, &manifest.prefix), (&denoise, &manifest.denoise)] {
            for spec in &g.inputs {
                if !s.inputs.iter().any(|i| i.name == spec.name) {
                    return Err(Error::Missing(format!("{}: input {}", g.file, spec.name)));
                }
            }
        }
        Ok(Self {
            manifest,
            dir: dir.to_path_buf(),
            prefix,
            denoise,
        })
    }

    /// Runs the prefix graph.
    pub fn prefix(&mut self, obs: &ModelInputs) -> Result<PrefixCache> {
        let m = &self.manifest;
        if obs.images.len() != m.cameras.len() || obs.image_masks.len() != m.cameras.len() {
            return Err(Error::Input {
                name: "images".into(),
                expected: vec![m.cameras.len() as i64],
                got: obs.images.len(),
            });
        }
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::new();
        let img_shape = [1, 3, m.image.height, m.image.width];
        for ((cam, img), &present) in m.cameras.iter().zip(&obs.images).zip(&obs.image_masks) {
            check_len(&cam.key, img.len(), &img_shape)?;
            inputs.push((
                cam.key.clone().into(),
                f32_tensor(&img_shape, img.clone())?.into(),
            ));
            let mask = Tensor::from_array((vec![1i64], vec![present])).map_err(Error::ort)?;
            inputs.push((cam.mask.clone().into(), mask.into_dyn().into()));
        }
        let l = m.language.max_length;
        check_len(&m.language.tokens, obs.tokens.len(), &[1, l])?;
        check_len(&m.language.mask, obs.token_mask.len(), &[1, l])?;
        let t = Tensor::from_array((vec![1, l], obs.tokens.clone())).map_err(Error::ort)?;
        inputs.push((m.language.tokens.clone().into(), t.into_dyn().into()));
        let t = Tensor::from_array((vec![1, l], obs.token_mask.clone())).map_err(Error::ort)?;
        inputs.push((m.language.mask.clone().into(), t.into_dyn().into()));
        check_len("observation.state", obs.state.len(), &[1, m.state_dim])?;
        inputs.push((
            "observation.state".into(),
            f32_tensor(&[1, m.state_dim], obs.state.clone())?.into(),
        ));
        let mut out = self.prefix.run(inputs).map_err(Error::ort)?;
        let mut values = Vec::new();
        let names = std::iter::once(manifest::PREFIX_PAD_MASK.to_string()).chain(
            m.kv.iter()
                .flat_map(|kv| [kv.key.clone(), kv.value.clone()]),
        );
        for name in names {
            let v = out
                .remove(&name)
                .ok_or_else(|| Error::Missing(name.clone()))?;
            values.push((name, v));
        }
        Ok(PrefixCache { values })
    }

    /// One denoising step: v_t at (x_t, t) [chunk_size·max_action_dim].
    pub fn velocity(&mut self, cache: &PrefixCache, x_t: &[f32], t: f32) -> Result<Vec<f32>> {
        let m = &self.manifest;
        let shape = [1, m.chunk_size, m.max_action_dim];
        check_len(manifest::X_T, x_t.len(), &shape)?;
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            (
                manifest::X_T.into(),
                f32_tensor(&shape, x_t.to_vec())?.into(),
            ),
            (manifest::TIMESTEP.into(), f32_tensor(&[1], vec![t])?.into()),
        ];
        for (name, v) in &cache.values {
            inputs.push((name.as_str().into(), v.into()));
        }
        let out = self.denoise.run(inputs).map_err(Error::ort)?;
        let v = out
            .get(manifest::V_T)
            .ok_or_else(|| Error::Missing(manifest::V_T.into()))?;
        let (_, d) = v.try_extract_tensor::<f32>().map_err(Error::ort)?;
        Ok(d.to_vec())
    }

    /// `sample_actions`: prefix once, then `num_steps` Euler steps from `noise` at t = 1, in
    /// float32 on the host. `keep_steps` records each step's (t, x_t, v_t).
    pub fn sample(&mut self, obs: &ModelInputs, noise: &[f32], keep_steps: bool) -> Result<Chunk> {
        let cache = self.prefix(obs)?;
        self.sample_from(&cache, noise, keep_steps)
    }

    /// The Euler loop of [`Self::sample`] from a computed prefix.
    pub fn sample_from(
        &mut self,
        cache: &PrefixCache,
        noise: &[f32],
        keep_steps: bool,
    ) -> Result<Chunk> {
        let dt = self.manifest.dt();
        let mut x = noise.to_vec();
        let mut steps = Vec::new();
        for k in 0..self.manifest.num_steps {
            // The same float32 arithmetic as LeRobot's loop: t = 1 + k·dt.
            let t = 1.0 + k as f32 * dt;
            let v = self.velocity(cache, &x, t)?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::NonFinite(format!("v_t at step {k}")));
            }
            if keep_steps {
                steps.push((t, x.clone(), v.clone()));
            }
            for (xi, vi) in x.iter_mut().zip(&v) {
                *xi += dt * vi;
            }
        }
        Ok(Chunk { padded: x, steps })
    }
}
