//! `SmolVLAPolicy`: the model with its parameters (a `VarStore` whose names are LeRobot's state
//! dict keys), strict checkpoint loading, the freeze rules, the batch preparation at the model
//! boundary, the masked loss, and action selection with a queue.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::{ModelDims, SmolVlaConfig, VlmConfig};
use crate::layers::pad_vector;
use crate::model::{FlowOutput, Trace, VlaFlowMatching};
use crate::processor::prepare_image;
use crate::weights::WeightsFile;
use crate::{Error, Result};

pub use smolvla_config::params::{is_trainable, module_order_key};

/// A batch keyed like LeRobot's (`observation.images.<cam>`, `observation.state`,
/// `observation.language.tokens`, `observation.language.attention_mask`, `action`,
/// `action_is_pad`, optional `<cam>_padding_mask`).
pub type Batch = BTreeMap<String, Tensor>;

pub const OBS_STATE: &str = "observation.state";
pub const OBS_TOKENS: &str = "observation.language.tokens";
pub const OBS_TOKEN_MASK: &str = "observation.language.attention_mask";
pub const ACTION: &str = "action";
pub const ACTION_IS_PAD: &str = "action_is_pad";

/// Keys of a parity fixture's `inputs.safetensors` that hold the random draws it was recorded
/// with rather than batch entries.
pub const FIXTURE_DRAWS: [&str; 3] = ["noise", "time", "sample_noise"];

/// A parity fixture's `inputs.safetensors` (LeRobot's preprocessed batch plus the draws of
/// [`FIXTURE_DRAWS`] present), as (batch, draws).
pub fn read_fixture_inputs(path: impl AsRef<Path>) -> Result<(Batch, BTreeMap<String, Tensor>)> {
    let (draws, batch): (BTreeMap<String, Tensor>, Batch) =
        Tensor::read_safetensors(path.as_ref())?
            .into_iter()
            .partition(|(k, _)| FIXTURE_DRAWS.contains(&k.as_str()));
    Ok((batch, draws))
}

/// Loss of one training forward.
#[derive(Debug)]
pub struct LossOutput {
    /// Mean over valid (non-padded) entries of the real action dims, shape [].
    pub loss: Tensor,
    /// The same normalisation per sample (`reduction="none"`), shape [B].
    pub per_sample: Tensor,
    pub flow: FlowOutput,
}

/// LeRobot's SmolVLA policy.
#[derive(Debug)]
pub struct SmolVlaPolicy {
    pub config: SmolVlaConfig,
    pub vlm_config: VlmConfig,
    pub dims: ModelDims,
    pub vs: VarStore,
    pub model: VlaFlowMatching,
    queue: VecDeque<Tensor>,
}

impl SmolVlaPolicy {
    /// Builds the architecture with random weights on `device` and applies the freeze rules.
    pub fn new(config: SmolVlaConfig, vlm_config: VlmConfig, device: Device) -> Result<Self> {
        let dims = ModelDims::new(&config, &vlm_config)?;
        if dims.expert_layers != dims.vlm_layers {
            return Err(Error::invalid(format!(
                "num_expert_layers {} != num_vlm_layers {}: only a full-depth expert is supported",
                dims.expert_layers, dims.vlm_layers
            )));
        }
        let vs = VarStore::new(device);
        let model = VlaFlowMatching::new(&(vs.root() / "model"), &config, &dims);
        let mut p = Self {
            config,
            vlm_config,
            dims,
            vs,
            model,
            queue: VecDeque::new(),
        };
        p.apply_freeze();
        Ok(p)
    }

    /// Loads a LeRobot checkpoint directory: `config.json`, the backbone config
    /// (`vlm_config.json` when present, else SmolVLM2-500M's architecture) and `model.safetensors`.
    pub fn from_dir(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = SmolVlaConfig::from_file(dir.join("config.json"))?;
        let vlm_path = dir.join("vlm_config.json");
        let vlm = if vlm_path.exists() {
            VlmConfig::from_file(&vlm_path)?
        } else {
            VlmConfig::smolvlm2_500m()
        };
        let mut p = Self::new(config, vlm, device)?;
        p.load_weights(dir.join("model.safetensors"))?;
        Ok(p)
    }

    /// Sets requires_grad per [`is_trainable`]; call again after changing the freeze settings.
    pub fn apply_freeze(&mut self) {
        for (name, t) in self.vs.variables() {
            let _ = t.set_requires_grad(is_trainable(&name, &self.config));
        }
    }

    /// Stores the frozen matrix weights — every linear layer's weight and bias, the patch
    /// convolution and the unused `lm_head`, not the norms or the embedding tables — in `kind`
    /// (e.g. bfloat16), and returns how many tensors changed. Those layers then compute in
    /// `kind` ([`crate::layers::Linear::forward`]), which under `autocast(kind)` is exactly what
    /// happened anyway (each call cast the float32 weight to `kind`): the same results with half
    /// the frozen memory (smolvla_base: 1.4 → 0.8 GB) and no cast per call. Without autocast it
    /// is a deliberate approximation. Trainable parameters stay float32. Saving writes the
    /// reduced values back as float32.
    pub fn store_frozen_as(&mut self, kind: Kind) -> usize {
        let vars = self.vs.variables();
        let is_matrix = |name: &str| {
            vars.get(name).is_some_and(|t| {
                t.dim() >= 2
                    && !name.contains("embed_tokens")
                    && !name.contains("position_embedding")
            })
        };
        let mut changed = 0;
        for (name, var) in &vars {
            let weight_of = name
                .strip_suffix(".bias")
                .map(|m| format!("{m}.weight"))
                .unwrap_or_else(|| name.clone());
            if is_trainable(name, &self.config) || !is_matrix(&weight_of) || var.kind() == kind {
                continue;
            }
            // set_data swaps the storage under every handle of this tensor, so the layers'
            // shallow clones see the new dtype too.
            let mut v = var.shallow_clone();
            tch::no_grad(|| v.set_data(&var.to_kind(kind)));
            changed += 1;
        }
        changed
    }

    /// All parameters in LeRobot's `named_parameters()` order (which fixes, e.g., the float
    /// summation order of the total gradient norm).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self.vs.variables().into_iter().collect();
        v.sort_by_cached_key(|(n, _)| module_order_key(n));
        v
    }

    /// Trainable parameters, in module order.
    pub fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.named_parameters()
            .into_iter()
            .filter(|(n, _)| is_trainable(n, &self.config))
            .collect()
    }

    pub fn num_parameters(&self) -> (i64, i64) {
        let all: i64 = self
            .named_parameters()
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum();
        let tr: i64 = self
            .trainable_parameters()
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum();
        (all, tr)
    }

    /// Loads every parameter by name from a safetensors file; any missing or unexpected key,
    /// or a shape mismatch, is an error (nothing is half-loaded silently). Tensors are read one
    /// at a time ([`WeightsFile`]), so loading needs the model plus its largest tensor in memory.
    pub fn load_weights(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let file = WeightsFile::open(path)?;
        let shapes = file
            .entries()
            .iter()
            .map(|(n, e)| (n.as_str(), e.shape.clone()))
            .collect();
        self.load_each(shapes, file.path(), |name| file.read(name))
    }

    /// Like [`Self::load_weights`] from in-memory tensors.
    pub fn load_named(&mut self, tensors: &[(String, Tensor)], origin: &Path) -> Result<()> {
        let given: BTreeMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let shapes = given.iter().map(|(n, t)| (*n, t.size())).collect();
        self.load_each(shapes, origin, |name| Ok(given[name].shallow_clone()))
    }

    /// Checks the names and shapes a source offers against the model's, then copies each
    /// parameter from `fetch(name)`.
    fn load_each(
        &mut self,
        shapes: BTreeMap<&str, Vec<i64>>,
        origin: &Path,
        fetch: impl Fn(&str) -> Result<Tensor>,
    ) -> Result<()> {
        let vars = self.vs.variables();
        let mut missing: Vec<String> = vars
            .keys()
            .filter(|k| !shapes.contains_key(k.as_str()))
            .cloned()
            .collect();
        let mut unexpected: Vec<String> = shapes
            .keys()
            .filter(|k| !vars.contains_key(**k))
            .map(|k| k.to_string())
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            missing.sort();
            unexpected.sort();
            return Err(Error::Keys {
                path: origin.to_path_buf(),
                missing,
                unexpected,
            });
        }
        for (name, var) in &vars {
            let found = &shapes[name.as_str()];
            if *found != var.size() {
                return Err(Error::Shape {
                    path: origin.to_path_buf(),
                    name: name.clone(),
                    expected: var.size(),
                    found: found.clone(),
                });
            }
        }
        for (name, var) in &vars {
            let src = fetch(name)?;
            tch::no_grad(|| var.shallow_clone().f_copy_(&src.to_kind(var.kind())))?;
        }
        Ok(())
    }

    /// Copies a subset of parameters by name (e.g. trained tensors from a federated update);
    /// unknown names are an error.
    pub fn load_subset(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let vars = self.vs.variables();
        for (name, src) in tensors {
            let var = vars.get(name).ok_or_else(|| Error::Keys {
                path: "<subset>".into(),
                missing: vec![],
                unexpected: vec![name.clone()],
            })?;
            tch::no_grad(|| var.shallow_clone().f_copy_(&src.to_kind(var.kind())))?;
        }
        Ok(())
    }

    /// Writes every parameter to `path` under LeRobot's names (`model.safetensors`).
    pub fn save_weights(&self, path: impl AsRef<Path>) -> Result<()> {
        let named = self.named_parameters();
        let owned: Vec<(String, Tensor)> = named
            .into_iter()
            .map(|(n, t)| {
                let t = t.detach().to_device(tch::Device::Cpu).contiguous();
                // Frozen weights stored reduced (store_frozen_as) go back as checkpoints have them.
                let t = match t.kind() {
                    Kind::BFloat16 | Kind::Half => t.to_kind(Kind::Float),
                    _ => t,
                };
                (n, t)
            })
            .collect();
        Tensor::write_safetensors(&owned, path.as_ref())?;
        Ok(())
    }

    /// Writes a `pretrained_model/`-style directory as LeRobot's `save_pretrained` does:
    /// `config.json` and `model.safetensors` (every parameter under its LeRobot name), plus
    /// `vlm_config.json` so the backbone shape is known without the Hub (LeRobot ignores it).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let write_json = |name: &str, v: serde_json::Result<String>| -> Result<()> {
            let path = dir.join(name);
            let text = v.map_err(|e| Error::json(&path, e))?;
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
        };
        write_json("config.json", serde_json::to_string_pretty(&self.config))?;
        write_json(
            "vlm_config.json",
            serde_json::to_string_pretty(&self.vlm_config),
        )?;
        self.save_weights(dir.join("model.safetensors"))
    }

    fn get<'a>(&self, batch: &'a Batch, key: &str) -> Result<&'a Tensor> {
        batch
            .get(key)
            .ok_or_else(|| Error::Batch(format!("missing {key}")))
    }

    /// `prepare_images`: the configured cameras present in the batch, in config order.
    pub fn prepare_images(&self, batch: &Batch) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let (h, w) = self.config.resize_hw();
        let keys: Vec<String> = self
            .config
            .image_keys()
            .into_iter()
            .filter(|k| batch.contains_key(k))
            .collect();
        if keys.is_empty() {
            return Err(Error::Batch(format!(
                "none of the image features {:?} is in the batch",
                self.config.image_keys()
            )));
        }
        let mut imgs = Vec::new();
        let mut masks = Vec::new();
        for key in &keys {
            let img = prepare_image(&batch[key], h, w);
            let b = img.size()[0];
            let mask = match batch.get(&format!("{key}_padding_mask")) {
                Some(m) => m.to_kind(Kind::Bool),
                None => Tensor::ones([b], (Kind::Bool, img.device())),
            };
            imgs.push(img);
            masks.push(mask);
        }
        let missing = self.config.image_keys().len() - keys.len();
        for _ in 0..missing.min(self.config.empty_cameras.max(0) as usize) {
            let like = &imgs[0];
            imgs.push(like.ones_like() * -1.0);
            masks.push(masks[0].zeros_like());
        }
        Ok((imgs, masks))
    }

    /// `prepare_state`: last time step when 3-D, padded to max_state_dim.
    pub fn prepare_state(&self, batch: &Batch) -> Result<Tensor> {
        let s = self.get(batch, OBS_STATE)?;
        let s = if s.dim() > 2 {
            s.select(1, s.size()[1] - 1)
        } else {
            s.shallow_clone()
        };
        Ok(pad_vector(
            &s.to_kind(Kind::Float),
            self.config.max_state_dim,
        ))
    }

    /// `prepare_action`: padded to max_action_dim.
    pub fn prepare_action(&self, batch: &Batch) -> Result<Tensor> {
        Ok(pad_vector(
            &self.get(batch, ACTION)?.to_kind(Kind::Float),
            self.config.max_action_dim,
        ))
    }

    fn lang(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        Ok((
            self.get(batch, OBS_TOKENS)?.to_kind(Kind::Int64),
            self.get(batch, OBS_TOKEN_MASK)?.to_kind(Kind::Bool),
        ))
    }

    /// Flow-matching noise N(0, 1) [B, chunk, max_action_dim].
    pub fn sample_noise(&self, batch_size: i64, device: Device) -> Tensor {
        Tensor::randn(
            [
                batch_size,
                self.config.chunk_size,
                self.config.max_action_dim,
            ],
            (Kind::Float, device),
        )
    }

    /// Flow-matching time: Beta(1.5, 1.0)·0.999 + 0.001 (`sample_time_beta`).
    pub fn sample_time(&self, batch_size: i64, device: Device) -> Tensor {
        let a = Tensor::full([batch_size], 1.5, (Kind::Float, device));
        let b = Tensor::full([batch_size], 1.0, (Kind::Float, device));
        let x = Tensor::internal_standard_gamma(&a);
        let y = Tensor::internal_standard_gamma(&b);
        (&x / (&x + &y)) * 0.999 + 0.001
    }

    /// `SmolVLAPolicy.forward`: the flow-matching loss over the real action dims with padded
    /// action steps zeroed; `loss` is the mean over valid entries, `per_sample` the same per row.
    pub fn forward(
        &self,
        batch: &Batch,
        noise: Option<&Tensor>,
        time: Option<&Tensor>,
        trace: &mut Trace,
    ) -> Result<LossOutput> {
        let (images, img_masks) = self.prepare_images(batch)?;
        for (i, (img, m)) in images.iter().zip(&img_masks).enumerate() {
            trace.record(format!("debug.images_prepared_cam{i}"), img);
            trace.record(format!("debug.img_masks_cam{i}"), m);
        }
        let state = self.prepare_state(batch)?;
        let actions = self.prepare_action(batch)?;
        trace.record("debug.state_padded", &state);
        trace.record("debug.actions_padded", &actions);
        let (tokens, tmask) = self.lang(batch)?;
        let b = state.size()[0];
        let dev = state.device();
        let noise = noise
            .map(|n| n.shallow_clone())
            .unwrap_or_else(|| self.sample_noise(b, dev));
        let time = time
            .map(|t| t.shallow_clone())
            .unwrap_or_else(|| self.sample_time(b, dev));
        let flow = self.model.forward(
            &images, &img_masks, &tokens, &tmask, &state, &actions, &noise, &time, trace,
        );
        trace.record("train.losses_per_element", &flow.losses);
        let action_dim = self.get(batch, ACTION)?.size()[2];
        let valid = match batch.get(ACTION_IS_PAD) {
            Some(p) => p.to_kind(Kind::Bool).logical_not(),
            None => Tensor::ones([b, self.config.chunk_size], (Kind::Bool, dev)),
        };
        let validf = valid.to_kind(Kind::Float);
        let l = flow.losses.narrow(2, 0, action_dim) * validf.unsqueeze(-1);
        let denom = validf.sum(Kind::Float) * action_dim as f64;
        let loss = l.sum(Kind::Float) / denom.clamp_min(1.0);
        let per_denom =
            (validf.sum_dim_intlist(1, false, Kind::Float) * action_dim as f64).clamp_min(1.0);
        let per_sample = l.sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float) / per_denom;
        Ok(LossOutput {
            loss,
            per_sample,
            flow,
        })
    }

    /// `predict_action_chunk`: sampled actions [B, chunk, action_dim] (normalized space).
    pub fn predict_action_chunk(
        &self,
        batch: &Batch,
        noise: Option<&Tensor>,
        trace: &mut Trace,
    ) -> Result<Tensor> {
        let (images, img_masks) = self.prepare_images(batch)?;
        let state = self.prepare_state(batch)?;
        let (tokens, tmask) = self.lang(batch)?;
        let b = state.size()[0];
        let noise = noise
            .map(|n| n.shallow_clone())
            .unwrap_or_else(|| self.sample_noise(b, state.device()));
        let x = tch::no_grad(|| {
            self.model
                .sample_actions(&images, &img_masks, &tokens, &tmask, &state, &noise, trace)
        });
        let action_dim = self
            .config
            .action_dim()
            .ok_or_else(|| Error::invalid("no output feature `action`".into()))?;
        Ok(x.narrow(2, 0, action_dim))
    }

    /// Clears the action queue (`reset`).
    pub fn reset(&mut self) {
        self.queue.clear();
    }

    /// `select_action`: pops the next action [B, action_dim], sampling a new chunk (its first
    /// n_action_steps actions) when the queue is empty.
    pub fn select_action(&mut self, batch: &Batch, noise: Option<&Tensor>) -> Result<Tensor> {
        if self.queue.is_empty() {
            let chunk = self.predict_action_chunk(batch, noise, &mut Trace::off())?;
            let n = self.config.n_action_steps.min(chunk.size()[1]);
            for i in 0..n {
                self.queue.push_back(chunk.select(1, i));
            }
        }
        self.queue
            .pop_front()
            .ok_or_else(|| Error::invalid("n_action_steps is 0".into()))
    }
}
