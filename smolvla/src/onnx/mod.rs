//! ONNX export of SmolVLA's inference path, written from Rust (tch cannot export ONNX).
//!
//! Two graphs with the Euler loop on the host, the split LeRobot's own exporter and NVIDIA's
//! deployments use:
//! - `prefix.onnx`: the cameras (resized with padding, [0, 1]), the language tokens and mask
//!   and the normalized state → the prefix pad mask and, per decoder layer, what the denoising
//!   pass reads of it: the VLM's post-RoPE keys/values for the expert's self-attention layers
//!   (`past_key_{l}`, `past_value_{l}`), and for its cross-attention layers the expert's own
//!   k/v projections of them (`cross_key_{l}`, `cross_value_{l}`), which are the same at every
//!   step and so are computed once per chunk instead of ten times.
//! - `denoise.onnx`: `x_t`, `timestep` and that cache → the velocity `v_t`.
//!
//! Shapes are static (batch 1, the checkpoint's cameras, language padded to
//! `tokenizer_max_length`; masked padding is inert), opset 17, IR version 8; weights are
//! external data aligned for memory mapping. `export.json` ([`smolvla_config::export`])
//! describes every input and output and the host-side pre- and post-processing.
//!
//! Modules: [`proto`] (the ONNX protobuf messages), [`graph`] (the builder), [`layers`] (one
//! emitter per building block of the tch model), and here the two graphs.

pub mod graph;
pub mod layers;
pub mod proto;

use std::path::Path;

use smolvla_config::export::{self as manifest, ExportManifest, KvInput};
use tch::{Kind, Tensor};

use self::graph::{Elem, Graph, ValueSpec};
use self::layers::{
    apply_rope, attention, layer_norm, linear, llama_mlp, rms_norm, rope_constant,
    rope_from_positions, weight, AttnShape, Params,
};
use crate::{Error, Result, SmolVlaPolicy};

/// The opset the graphs are written for (LayerNormalization needs 17; 18 changes ReduceMean).
pub const OPSET: i64 = 17;

/// Export options.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Matrix products in float16 (weights stored as float16); norms, softmax, RoPE, the time
    /// embedding, the residual stream and the host's Euler accumulation stay float32.
    pub fp16: bool,
    /// The prefix graph's linear layers (vision tower, connector, VLM; 78 % of a full-size
    /// chunk on CPU) as dynamically quantized int8 products; the denoise graph, the patch
    /// convolution, norms, attention and the Euler loop stay float32.
    pub int8: bool,
    /// A tokenizer file to ship as `tokenizer.json` (else the checkpoint's own, if any).
    pub tokenizer: Option<std::path::PathBuf>,
}

/// Static sizes of the export, from the checkpoint's config.
struct Sizes {
    cams: Vec<String>,
    img_h: i64,
    img_w: i64,
    lang: i64,
    state_dim: i64,
    action_dim: i64,
    patches_per_cam: i64,
    prefix_len: i64,
    chunk: i64,
    hidden: i64,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Sizes {
    fn new(policy: &SmolVlaPolicy) -> Result<Self> {
        let c = &policy.config;
        let d = &policy.dims;
        let (img_h, img_w) = c.resize_hw();
        let v = &d.vision;
        let patches = (img_h / v.patch_size) * (img_w / v.patch_size);
        let s2 = d.scale_factor * d.scale_factor;
        if img_h != img_w || patches % s2 != 0 || img_h % v.patch_size != 0 {
            return Err(Error::Export(format!(
                "images {img_h}x{img_w} with patch {} and pixel shuffle {}: need a square \
                 image whose patch grid the shuffle divides",
                v.patch_size, d.scale_factor
            )));
        }
        let cams = c.image_keys();
        if cams.is_empty() {
            return Err(Error::Export("the checkpoint has no camera".into()));
        }
        let state_dim = c
            .input_features
            .get(crate::policy::OBS_STATE)
            .and_then(|f| f.shape.last().copied())
            .ok_or_else(|| Error::Export("no input feature observation.state".into()))?;
        let action_dim = c
            .action_dim()
            .ok_or_else(|| Error::Export("no output feature action".into()))?;
        let lang = c.tokenizer_max_length;
        let per_cam = patches / s2;
        Ok(Self {
            prefix_len: per_cam * cams.len() as i64 + lang + 1,
            cams,
            img_h,
            img_w,
            lang,
            state_dim,
            action_dim,
            patches_per_cam: per_cam,
            chunk: c.chunk_size,
            hidden: d.text.hidden_size,
            heads: d.text.num_attention_heads,
            kv_heads: d.text.kv_heads(),
            head_dim: d.text.head_dim(),
        })
    }

    fn kv_dims(&self) -> [i64; 4] {
        [1, self.prefix_len, self.kv_heads, self.head_dim]
    }
}

const VWE: &str = "model.vlm_with_expert";

/// Whether expert layer `l` cross-attends (LeRobot's rule, as in `SmolVlmWithExpert`).
fn is_cross(policy: &SmolVlaPolicy, l: i64) -> bool {
    let n = policy.config.self_attn_every_n_layers;
    policy.config.attention_mode.contains("cross") && !(n > 0 && l % n == 0)
}

/// The cache inputs of the denoise graph, in layer order.
fn kv_inputs(policy: &SmolVlaPolicy) -> Vec<KvInput> {
    (0..policy.dims.vlm_layers)
        .map(|l| {
            let kind = if is_cross(policy, l) { "cross" } else { "past" };
            KvInput {
                layer: l,
                cross: is_cross(policy, l),
                key: format!("{kind}_key_{l}"),
                value: format!("{kind}_value_{l}"),
            }
        })
        .collect()
}

/// The vision tower and connector on one camera's pixels [1, 3, S, S] in [-1, 1] → the camera's
/// tokens [1, n, hidden], scaled by √hidden as `embed_prefix` does.
fn embed_image(
    g: &mut Graph,
    p: &Params,
    policy: &SmolVlaPolicy,
    s: &Sizes,
    px: &str,
) -> Result<String> {
    let v = &policy.dims.vision;
    let vm = format!("{VWE}.vlm.model.vision_model");
    let pe = format!("{vm}.embeddings.patch_embedding");
    let wk = format!("{pe}.weight");
    let bk = format!("{pe}.bias");
    let e = if p.fp16 { Elem::F16 } else { Elem::F32 };
    let w = g.tensor(&wk, p.get(&wk)?, e)?;
    let b = g.tensor(&bk, p.get(&bk)?, e)?;
    let pxin = if p.fp16 {
        g.cast(px, Elem::F16)
    } else {
        px.to_string()
    };
    let ps = v.patch_size;
    let conv = g.op(
        "Conv",
        &[&pxin, &w, &b],
        vec![
            ("kernel_shape", graph::Attr::Ints(vec![ps, ps])),
            ("strides", graph::Attr::Ints(vec![ps, ps])),
        ],
    );
    let conv = if p.fp16 {
        g.cast(&conv, Elem::F32)
    } else {
        conv
    };
    let n = (s.img_h / ps) * (s.img_w / ps);
    let x = g.reshape(&conv, &[1, v.hidden_size, n])?;
    let x = g.transpose(&x, &[0, 2, 1]);
    let pos_key = format!("{vm}.embeddings.position_embedding.weight");
    let pos = p.get(&pos_key)?.narrow(0, 0, n).unsqueeze(0);
    let pos = g.tensor(&pos_key, &pos, Elem::F32)?;
    let mut x = g.add(&x, &pos);
    let hd = v.hidden_size / v.num_attention_heads;
    let shape = AttnShape {
        lq: n,
        lk: n,
        heads: v.num_attention_heads,
        kv_heads: v.num_attention_heads,
        head_dim: hd,
    };
    for i in 0..v.num_hidden_layers {
        let lp = format!("{vm}.encoder.layers.{i}");
        let h = layer_norm(g, p, &format!("{lp}.layer_norm1"), &x, v.layer_norm_eps)?;
        let split = |g: &mut Graph, name: &str| -> Result<String> {
            let t = linear(g, p, &format!("{lp}.self_attn.{name}"), &h, true)?;
            g.reshape(&t, &[1, n, v.num_attention_heads, hd])
        };
        let q = split(g, "q_proj")?;
        let k = split(g, "k_proj")?;
        let vv = split(g, "v_proj")?;
        let a = attention(g, &q, &k, &vv, None, &shape)?;
        let a = linear(g, p, &format!("{lp}.self_attn.out_proj"), &a, true)?;
        x = g.add(&x, &a);
        let h = layer_norm(g, p, &format!("{lp}.layer_norm2"), &x, v.layer_norm_eps)?;
        let h = linear(g, p, &format!("{lp}.mlp.fc1"), &h, true)?;
        let h = layers::gelu_tanh(g, &h)?;
        let h = linear(g, p, &format!("{lp}.mlp.fc2"), &h, true)?;
        x = g.add(&x, &h);
    }
    let x = layer_norm(g, p, &format!("{vm}.post_layernorm"), &x, v.layer_norm_eps)?;
    // transformers' pixel_shuffle, view for view.
    let sf = policy.dims.scale_factor;
    let c = v.hidden_size;
    let side = (n as f64).sqrt() as i64;
    let x = g.reshape(&x, &[1, side, side, c])?;
    let x = g.reshape(&x, &[1, side, side / sf, c * sf])?;
    let x = g.transpose(&x, &[0, 2, 1, 3]);
    let x = g.reshape(&x, &[1, side / sf, side / sf, c * sf * sf])?;
    let x = g.transpose(&x, &[0, 2, 1, 3]);
    let x = g.reshape(&x, &[1, n / (sf * sf), c * sf * sf])?;
    let x = linear(
        g,
        p,
        &format!("{VWE}.vlm.model.connector.modality_projection.proj"),
        &x,
        false,
    )?;
    let scale = g.scalar((s.hidden as f64).sqrt() as f32)?;
    Ok(g.mul(&x, &scale))
}

/// The prefix graph: observations → pad mask and the per-layer cache of [`kv_inputs`].
fn prefix_graph(g: &mut Graph, p: &Params, policy: &SmolVlaPolicy, s: &Sizes) -> Result<()> {
    let cfg = &policy.config;
    let t = &policy.dims.text;
    let mut embs = Vec::new();
    let mut pads = Vec::new();
    for cam in &s.cams {
        let img = g.input(cam, Elem::F32, &[1, 3, s.img_h, s.img_w]);
        let mask = g.input(&format!("{cam}_padding_mask"), Elem::Bool, &[1]);
        let two = g.scalar(2.0)?;
        let one = g.scalar(1.0)?;
        let px = g.mul(&img, &two);
        let px = g.sub(&px, &one);
        embs.push(embed_image(g, p, policy, s, &px)?);
        let m = g.unsqueeze(&mask, &[1])?;
        pads.push(g.expand(&m, &[1, s.patches_per_cam])?);
    }
    let tokens = g.input(crate::policy::OBS_TOKENS, Elem::I64, &[1, s.lang]);
    let tmask = g.input(crate::policy::OBS_TOKEN_MASK, Elem::Bool, &[1, s.lang]);
    let table = weight(
        g,
        p,
        &format!("{VWE}.vlm.model.text_model.embed_tokens.weight"),
    )?;
    let lang = g.op("Gather", &[&table, &tokens], vec![]);
    let scale = g.scalar((s.hidden as f64).sqrt() as f32)?;
    embs.push(g.mul(&lang, &scale));
    pads.push(tmask);
    let state = g.input(crate::policy::OBS_STATE, Elem::F32, &[1, s.state_dim]);
    let state = if cfg.max_state_dim > s.state_dim {
        let zeros = g.constant(
            &Tensor::zeros(
                [1, cfg.max_state_dim - s.state_dim],
                (Kind::Float, tch::Device::Cpu),
            ),
            Elem::F32,
        )?;
        g.concat(&[&state, &zeros], 1)
    } else {
        state
    };
    let st = linear(g, p, "model.state_proj", &state, true)?;
    embs.push(g.unsqueeze(&st, &[1])?);
    let ones = g.constant(
        &Tensor::ones([1, 1], (Kind::Bool, tch::Device::Cpu)),
        Elem::Bool,
    )?;
    pads.push(ones);
    let refs = |v: &[String]| v.iter().map(String::clone).collect::<Vec<_>>();
    let (e, pd) = (refs(&embs), refs(&pads));
    let x0 = g.concat(&e.iter().map(String::as_str).collect::<Vec<_>>(), 1);
    let pad = g.concat(&pd.iter().map(String::as_str).collect::<Vec<_>>(), 1);
    // make_att_2d_masks with the state token opening its own block: every real token sees
    // every real camera/language token, only the state token sees itself.
    let lp = s.prefix_len;
    let mut att = vec![0i64; lp as usize];
    att[lp as usize - 1] = 1;
    let c = Tensor::from_slice(&att).cumsum(0, Kind::Int64);
    let allowed = c.unsqueeze(0).le_tensor(&c.unsqueeze(1)).unsqueeze(0);
    let allowed = g.constant(&allowed, Elem::Bool)?;
    let pr = g.unsqueeze(&pad, &[1])?;
    let pc = g.unsqueeze(&pad, &[2])?;
    let pad2d = g.op("And", &[&pr, &pc], vec![]);
    let mask = g.op("And", &[&allowed, &pad2d], vec![]);
    let padi = g.cast(&pad, Elem::I64);
    let axis = g.const_i64(&[1])?;
    let cum = g.op("CumSum", &[&padi, &axis], vec![]);
    let one = g.const_i64(&[1])?;
    let pos = g.sub(&cum, &one);
    let rope = rope_from_positions(g, &pos, s.head_dim)?;
    let shape = AttnShape {
        lq: lp,
        lk: lp,
        heads: s.heads,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
    };
    let kv_dims = s.kv_dims();
    let mut x = x0;
    let n = policy.dims.vlm_layers;
    for (l, kv) in kv_inputs(policy).into_iter().enumerate() {
        let lpref = format!("{VWE}.vlm.model.text_model.layers.{l}");
        let h = rms_norm(
            g,
            p,
            &format!("{lpref}.input_layernorm"),
            &x,
            t.rms_norm_eps,
        )?;
        let heads = |g: &mut Graph, name: &str, nh: i64| -> Result<String> {
            let y = linear(g, p, &format!("{lpref}.self_attn.{name}"), &h, false)?;
            g.reshape(&y, &[1, lp, nh, s.head_dim])
        };
        let q = heads(g, "q_proj", s.heads)?;
        let k = heads(g, "k_proj", s.kv_heads)?;
        let v = heads(g, "v_proj", s.kv_heads)?;
        let q = apply_rope(g, &q, &rope)?;
        let k = apply_rope(g, &k, &rope)?;
        if kv.cross {
            // The expert's cross-attention k/v projections of this layer's VLM keys/values.
            let ep = format!("{VWE}.lm_expert.layers.{l}.self_attn");
            let proj = |g: &mut Graph, src: &str, name: &str| -> Result<String> {
                let flat = g.reshape(src, &[1, lp, s.kv_heads * s.head_dim])?;
                let y = linear(g, p, &format!("{ep}.{name}"), &flat, false)?;
                g.reshape(&y, &kv_dims)
            };
            let ck = proj(g, &k, "k_proj")?;
            let cv = proj(g, &v, "v_proj")?;
            g.output(&ck, &kv.key, Elem::F32, &kv_dims);
            g.output(&cv, &kv.value, Elem::F32, &kv_dims);
        } else {
            g.output(&k, &kv.key, Elem::F32, &kv_dims);
            g.output(&v, &kv.value, Elem::F32, &kv_dims);
        }
        // The last layer's attention output is never read: only its keys/values are.
        if (l as i64) + 1 < n {
            let a = attention(g, &q, &k, &v, Some(&mask), &shape)?;
            x = finish(g, p, &lpref, &x, &a, t.rms_norm_eps)?;
        }
    }
    g.output(&pad, manifest::PREFIX_PAD_MASK, Elem::Bool, &[1, lp]);
    Ok(())
}

/// o_proj + residual, then post_attention_layernorm → MLP + residual.
fn finish(g: &mut Graph, p: &Params, layer: &str, x: &str, attn: &str, eps: f64) -> Result<String> {
    let o = linear(g, p, &format!("{layer}.self_attn.o_proj"), attn, false)?;
    let h = g.add(&o, x);
    let n = rms_norm(g, p, &format!("{layer}.post_attention_layernorm"), &h, eps)?;
    let m = llama_mlp(g, p, &format!("{layer}.mlp"), &n)?;
    Ok(g.add(&m, &h))
}

/// The denoise graph: (x_t, t, prefix pad mask, cache) → v_t.
fn denoise_graph(g: &mut Graph, p: &Params, policy: &SmolVlaPolicy, s: &Sizes) -> Result<()> {
    let cfg = &policy.config;
    let d = &policy.dims;
    let (c, lp, a) = (s.chunk, s.prefix_len, cfg.max_action_dim);
    let x_t = g.input(manifest::X_T, Elem::F32, &[1, c, a]);
    let time = g.input(manifest::TIMESTEP, Elem::F32, &[1]);
    let pad = g.input(manifest::PREFIX_PAD_MASK, Elem::Bool, &[1, lp]);
    let kv_dims = s.kv_dims();
    let kvs = kv_inputs(policy);
    for kv in &kvs {
        g.input(&kv.key, Elem::F32, &kv_dims);
        g.input(&kv.value, Elem::F32, &kv_dims);
    }
    // embed_suffix.
    let e = d.expert_hidden;
    let act = linear(g, p, "model.action_in_proj", &x_t, true)?;
    let temb = time_embedding(g, &time, e, cfg.min_period, cfg.max_period)?;
    let temb = g.unsqueeze(&temb, &[1])?;
    let temb = g.expand(&temb, &[1, c, e])?;
    let cat = g.concat(&[&act, &temb], 2);
    let h = linear(g, p, "model.action_time_mlp_in", &cat, true)?;
    let h = layers::silu(g, &h);
    let mut x = linear(g, p, "model.action_time_mlp_out", &h, true)?;
    // Suffix positions continue after the prefix's real tokens; cross layers restart at 0.
    let padi = g.cast(&pad, Elem::I64);
    let axis = g.const_i64(&[1])?;
    let offset = g.op(
        "ReduceSum",
        &[&padi, &axis],
        vec![("keepdims", graph::Attr::Int(1))],
    );
    let ar = g.constant(
        &Tensor::arange(c, (Kind::Int64, tch::Device::Cpu)).view([1, c]),
        Elem::I64,
    )?;
    let pos = g.add(&offset, &ar);
    let rope = rope_from_positions(g, &pos, s.head_dim)?;
    let cross_rope = rope_constant(
        g,
        &Tensor::arange(c, (Kind::Int64, tch::Device::Cpu)).view([1, c]),
        s.head_dim,
    )?;
    let pr = g.unsqueeze(&pad, &[1])?;
    let cross_mask = g.expand(&pr, &[1, c, lp])?;
    let causal = Tensor::ones([c, c], (Kind::Bool, tch::Device::Cpu))
        .tril(0)
        .unsqueeze(0);
    let causal = g.constant(&causal, Elem::Bool)?;
    let self_mask = g.concat(&[&cross_mask, &causal], 2);
    let eps = d.text.rms_norm_eps;
    for kv in &kvs {
        let lpref = format!("{VWE}.lm_expert.layers.{}", kv.layer);
        let hn = rms_norm(g, p, &format!("{lpref}.input_layernorm"), &x, eps)?;
        let heads = |g: &mut Graph, name: &str, nh: i64| -> Result<String> {
            let y = linear(g, p, &format!("{lpref}.self_attn.{name}"), &hn, false)?;
            g.reshape(&y, &[1, c, nh, s.head_dim])
        };
        let q = heads(g, "q_proj", s.heads)?;
        let att = if kv.cross {
            let q = apply_rope(g, &q, &cross_rope)?;
            let shape = AttnShape {
                lq: c,
                lk: lp,
                heads: s.heads,
                kv_heads: s.kv_heads,
                head_dim: s.head_dim,
            };
            attention(g, &q, &kv.key, &kv.value, Some(&cross_mask), &shape)?
        } else {
            let k = heads(g, "k_proj", s.kv_heads)?;
            let v = heads(g, "v_proj", s.kv_heads)?;
            let q = apply_rope(g, &q, &rope)?;
            let k = apply_rope(g, &k, &rope)?;
            let kk = g.concat(&[&kv.key, &k], 1);
            let vv = g.concat(&[&kv.value, &v], 1);
            let shape = AttnShape {
                lq: c,
                lk: lp + c,
                heads: s.heads,
                kv_heads: s.kv_heads,
                head_dim: s.head_dim,
            };
            attention(g, &q, &kk, &vv, Some(&self_mask), &shape)?
        };
        x = finish(g, p, &lpref, &x, &att, eps)?;
    }
    let x = rms_norm(g, p, &format!("{VWE}.lm_expert.norm"), &x, eps)?;
    let v_t = linear(g, p, "model.action_out_proj", &x, true)?;
    g.output(&v_t, manifest::V_T, Elem::F32, &[1, c, a]);
    Ok(())
}

/// `create_sinusoidal_pos_embedding` of the time [1] → [1, dim]. LeRobot computes the angles
/// in float64; ONNX Runtime's CPU Sin/Cos are float32 only, so the float64 angle is reduced
/// modulo 2π first (in float64) and only then rounded to float32 (error ≲ 4e-7 rad instead of
/// the ~1e-4 rad of rounding angles up to 2π/min_period).
fn time_embedding(
    g: &mut Graph,
    time: &str,
    dim: i64,
    min_period: f64,
    max_period: f64,
) -> Result<String> {
    let fraction = Tensor::linspace(0.0, 1.0, dim / 2, (Kind::Double, tch::Device::Cpu));
    let period = Tensor::pow_scalar(max_period / min_period, &fraction) * min_period;
    let scaling = (period.reciprocal() * 2.0 * std::f64::consts::PI).unsqueeze(0);
    let scaling = g.constant(&scaling, Elem::F64)?;
    let t64 = g.cast(time, Elem::F64);
    let t64 = g.unsqueeze(&t64, &[1])?;
    let angle = g.mul(&scaling, &t64);
    let two_pi = g.constant(&Tensor::from(2.0 * std::f64::consts::PI), Elem::F64)?;
    let reduced = g.op(
        "Mod",
        &[&angle, &two_pi],
        vec![("fmod", graph::Attr::Int(1))],
    );
    let a32 = g.cast(&reduced, Elem::F32);
    let sin = g.op("Sin", &[&a32], vec![]);
    let cos = g.op("Cos", &[&a32], vec![]);
    Ok(g.concat(&[&sin, &cos], 1))
}

/// Writes `prefix.onnx`, `denoise.onnx` (with their `.onnx.data`) and `export.json` into
/// `out`, plus the processor and tokenizer files found in `source_dir` (a checkpoint
/// directory). Returns the manifest written.
pub fn export(
    policy: &SmolVlaPolicy,
    source_dir: Option<&Path>,
    source: &str,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportManifest> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let s = Sizes::new(policy)?;
    let vars = policy
        .vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(tch::Device::Cpu)))
        .collect();
    let mut p = Params::new(vars, opts.fp16);
    let precision = match (opts.fp16, opts.int8) {
        (true, true) => return Err(Error::Export("--fp16 and --int8 exclude each other".into())),
        (true, false) => "fp16",
        (false, true) => "int8-prefix",
        (false, false) => "fp32",
    };
    let mut graphs = Vec::new();
    for (name, build) in [
        (
            "prefix",
            prefix_graph as fn(&mut Graph, &Params, &SmolVlaPolicy, &Sizes) -> Result<()>,
        ),
        ("denoise", denoise_graph),
    ] {
        let mut g = Graph::new(out, name)?;
        p.int8 = opts.int8 && name == "prefix";
        tch::no_grad(|| build(&mut g, &p, policy, &s))?;
        let (inputs, outputs) = (g.input_specs.clone(), g.output_specs.clone());
        let w = g.finish(
            out,
            OPSET,
            &format!("SmolVLA {name} graph ({precision}), zk0"),
        )?;
        graphs.push(manifest::GraphFile {
            file: file_name(&w.onnx),
            data: file_name(&w.data),
            sha256: graph::sha256_file(&w.onnx)?,
            data_sha256: graph::sha256_file(&w.data)?,
            nodes: w.nodes,
            inputs: inputs.into_iter().map(spec).collect(),
            outputs: outputs.into_iter().map(spec).collect(),
        });
    }
    let mut copied = Vec::new();
    if let Some(dir) = source_dir {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if manifest::is_processor_file(&name) {
                let to = out.join(&name);
                std::fs::copy(entry.path(), &to).map_err(|e| Error::io(&to, e))?;
                copied.push(name);
            }
        }
    }
    if let Some(tok) = &opts.tokenizer {
        let to = out.join("tokenizer.json");
        std::fs::copy(tok, &to).map_err(|e| Error::io(tok, e))?;
        if !copied.iter().any(|f| f == "tokenizer.json") {
            copied.push("tokenizer.json".into());
        }
    }
    copied.sort();
    let denoise = graphs.pop();
    let prefix = graphs.pop();
    let (Some(prefix), Some(denoise)) = (prefix, denoise) else {
        return Err(Error::Export("graphs not written".into()));
    };
    let cfg = &policy.config;
    let m = ExportManifest {
        format: manifest::FORMAT.into(),
        version: manifest::VERSION,
        source: source.into(),
        precision: precision.into(),
        opset: OPSET,
        ir_version: graph::IR_VERSION,
        prefix,
        denoise,
        kv: kv_inputs(policy),
        prefix_len: s.prefix_len,
        chunk_size: s.chunk,
        n_action_steps: cfg.n_action_steps,
        num_steps: cfg.num_steps,
        max_action_dim: cfg.max_action_dim,
        max_state_dim: cfg.max_state_dim,
        action_dim: s.action_dim,
        state_dim: s.state_dim,
        cameras: s
            .cams
            .iter()
            .map(|k| manifest::Camera {
                key: k.clone(),
                mask: format!("{k}_padding_mask"),
                source_shape: cfg
                    .input_features
                    .get(k)
                    .map(|f| f.shape.clone())
                    .unwrap_or_default(),
            })
            .collect(),
        image: manifest::ImagePrep {
            height: s.img_h,
            width: s.img_w,
            pad_value: 0.0,
        },
        language: manifest::LanguagePrep {
            tokens: crate::policy::OBS_TOKENS.into(),
            mask: crate::policy::OBS_TOKEN_MASK.into(),
            max_length: s.lang,
            tokenizer: copied.iter().find(|f| *f == "tokenizer.json").cloned(),
        },
        normalization: cfg
            .normalization_mapping
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        processor_files: copied,
    };
    let path = out.join(manifest::MANIFEST);
    let text = serde_json::to_string_pretty(&m).map_err(|e| Error::json(&path, e))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(m)
}

fn spec(v: ValueSpec) -> manifest::TensorSpec {
    manifest::TensorSpec {
        name: v.name,
        dtype: v.dtype,
        shape: v.shape,
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
