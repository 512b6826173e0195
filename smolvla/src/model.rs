//! `model.vlm_with_expert` (LeRobot's `SmolVLMWithExpertModel`) and `model`
//! (`VLAFlowMatching`): prefix/suffix embedding, the joint decoder with interleaved cross- and
//! self-attention, the flow-matching loss and the cached Euler sampler.
//!
//! The joint and split training passes, the prefill and the cached denoising pass all run one
//! layer step, [`SmolVlmWithExpert`]'s `layer`, over a prefix stream (computed, or read from
//! the prefill's [`KvCache`]) and an optional expert stream, like candle's one block forward
//! with an optional cache.

use std::collections::BTreeMap;

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

use crate::config::{ModelDims, SmolVlaConfig};
use crate::layers::{
    apply_rope_with, eager_attention, make_att_2d_masks, sinusoidal_time_embedding, Linear,
    RopeTables,
};
use crate::text::{ExpertModel, TextModel};
use crate::vision::{Connector, VisionTransformer};

/// Named intermediate tensors, recorded only when enabled (for parity checks).
#[derive(Debug, Default)]
pub struct Trace {
    enabled: bool,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Trace {
    pub fn off() -> Self {
        Self::default()
    }
    pub fn on() -> Self {
        Self {
            enabled: true,
            tensors: BTreeMap::new(),
        }
    }
    pub fn is_on(&self) -> bool {
        self.enabled
    }
    /// Records a detached copy under `name` (first value wins, like LeRobot's hooks).
    pub fn record(&mut self, name: impl Into<String>, t: &Tensor) {
        if self.enabled {
            self.tensors
                .entry(name.into())
                .or_insert_with(|| t.detach().copy());
        }
    }
}

/// Per layer: the prefix's post-RoPE keys and values [B, Lp, kv_heads, D] (VLM stream only).
pub type KvCache = Vec<(Tensor, Tensor)>;

/// One attention block of the prefix (VLM) stream: hidden states [B, n, hidden], the RoPE
/// tables of its positions and the mask of its rows against the prefix keys it sees: the first
/// block its own, a later one the prefix's up to and including itself.
struct PrefixBlock {
    x: Tensor,
    rope: RopeTables,
    mask: Tensor,
}

impl PrefixBlock {
    fn new(x: &Tensor, pos: &Tensor, mask: Tensor, head_dim: i64) -> Self {
        Self {
            x: x.shallow_clone(),
            rope: RopeTables::new(pos, head_dim),
            mask,
        }
    }
}

/// The prefix side of one layer step.
enum PrefixSource<'a> {
    /// The prefix stream goes through the layer. `out: false` skips the blocks' attention and
    /// o_proj/MLP: the last layer of the split pass and of the prefill, whose VLM output
    /// nothing reads.
    Live {
        blocks: &'a mut [PrefixBlock],
        out: bool,
    },
    /// The layer's keys and values from a prefill ([`SmolVlmWithExpert::fill_cache`]).
    Cached(&'a (Tensor, Tensor)),
}

/// The action expert's stream: hidden states [B, Ls, expert hidden] with the RoPE tables of
/// its positions (self-attention layers) and of those positions restarted at 0
/// (cross-attention layers), and its masks.
struct ExpertStream {
    x: Tensor,
    rope: RopeTables,
    cross_rope: RopeTables,
    /// Expert rows against the prefix keys [B, Ls, Lp] (cross-attention layers).
    cross_mask: Tensor,
    /// Self-attention layers: expert rows against [prefix; suffix] keys [B, Ls, Lp + Ls], or
    /// with `joint` all rows [B, Lp + Ls, Lp + Ls].
    self_mask: Tensor,
    /// Self-attention layers run as one attention whose queries are the prefix's and the
    /// expert's together (LeRobot's own computation, padding rows included: what the parity
    /// fixtures record). Otherwise the expert attends alone and the prefix keeps to its blocks.
    joint: bool,
}

impl ExpertStream {
    fn new(
        x: &Tensor,
        pos: &Tensor,
        cross_mask: Tensor,
        self_mask: Tensor,
        joint: bool,
        head_dim: i64,
    ) -> Self {
        Self {
            x: x.shallow_clone(),
            rope: RopeTables::new(pos, head_dim),
            cross_rope: RopeTables::new(&restart(pos), head_dim),
            cross_mask,
            self_mask,
            joint,
        }
    }
}

/// `vlm_with_expert`: the SmolVLM2 backbone (vision, connector, text) and the action expert.
#[derive(Debug)]
pub struct SmolVlmWithExpert {
    pub vision_model: VisionTransformer,
    pub connector: Connector,
    pub text_model: TextModel,
    /// `vlm.lm_head.weight`: in LeRobot's state dict but never used by SmolVLA.
    pub lm_head: Tensor,
    pub lm_expert: ExpertModel,
    heads: i64,
    kv_heads: i64,
    self_attn_every_n_layers: i64,
    cross_attn: bool,
}

impl SmolVlmWithExpert {
    pub fn new(vs: &Path<'_>, cfg: &SmolVlaConfig, d: &ModelDims) -> Self {
        let vlm = vs / "vlm";
        let vlm_model = &vlm / "model";
        let cross_attn = cfg.attention_mode.contains("cross");
        let n = cfg.self_attn_every_n_layers;
        let is_cross = move |l: i64| cross_attn && !(n > 0 && l % n == 0);
        Self {
            vision_model: VisionTransformer::new(&(&vlm_model / "vision_model"), &d.vision),
            connector: Connector::new(
                &(&vlm_model / "connector"),
                d.vision.hidden_size,
                d.text.hidden_size,
                d.scale_factor,
            ),
            text_model: TextModel::new(&(&vlm_model / "text_model"), d),
            lm_head: (&vlm / "lm_head").var(
                "weight",
                &[d.text.vocab_size, d.text.hidden_size],
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            lm_expert: ExpertModel::new(&(vs / "lm_expert"), d, is_cross),
            heads: d.text.num_attention_heads,
            kv_heads: d.text.kv_heads(),
            self_attn_every_n_layers: n,
            cross_attn,
        }
    }

    fn is_cross(&self, l: usize) -> bool {
        let n = self.self_attn_every_n_layers;
        self.cross_attn && !(n > 0 && (l as i64) % n == 0)
    }

    /// The head dim shared by the VLM and the expert (RoPE tables serve both).
    fn head_dim(&self) -> i64 {
        self.text_model.layers.first().map_or(2, |tl| tl.head_dim)
    }

    /// Vision tower + connector: [B, 3, S, S] in [-1, 1] → [B, tokens, text hidden].
    pub fn embed_image(&self, pixels: &Tensor, trace: &mut Trace, cam: usize) -> Tensor {
        let v = self.vision_model.forward(pixels);
        trace.record(format!("debug.vision_out_cam{cam}"), &v);
        let e = self.connector.forward(&v);
        trace.record(format!("debug.image_emb_cam{cam}"), &e);
        e
    }

    fn attn(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
        eager_attention(q, k, v, mask, self.heads, self.kv_heads)
    }

    /// One interleaved layer `l`, the step every pass runs: the prefix's post-RoPE keys and
    /// values (computed from its blocks, or read from a prefill), the prefix blocks' attention
    /// and the expert's against them (cross or self per layer), then each stream's
    /// o_proj/residual/MLP. A prefill passes `keep`, which receives the layer's prefix keys and
    /// values.
    fn layer(
        &self,
        l: usize,
        prefix: PrefixSource<'_>,
        expert: Option<&mut ExpertStream>,
        keep: Option<&mut KvCache>,
    ) {
        let tl = &self.text_model.layers[l];
        let (blocks, out, cached) = match prefix {
            PrefixSource::Live { blocks, out } => (blocks, out, None),
            PrefixSource::Cached(kv) => (Default::default(), false, Some(kv)),
        };
        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for b in blocks.iter() {
            let (q, k, v) = tl.qkv(&b.x);
            qs.push(apply_rope_with(&q, &b.rope));
            ks.push(apply_rope_with(&k, &b.rope));
            vs.push(v);
        }
        let (pk, pv) = match cached {
            Some((k, v)) => (k.shallow_clone(), v.shallow_clone()),
            None => (join(&ks), join(&vs)),
        };
        let joint = expert
            .as_deref()
            .is_some_and(|e| e.joint && !self.is_cross(l));
        debug_assert!(
            !joint || blocks.len() == 1,
            "a joint pass has one prefix block"
        );
        // Each block attends to the prefix up to itself (the first block to its own keys).
        let mut pa = Vec::new();
        if out && !joint {
            for (i, b) in blocks.iter().enumerate() {
                let (k, v) = if i + 1 == blocks.len() {
                    (pk.shallow_clone(), pv.shallow_clone())
                } else {
                    (join(&ks[..=i]), join(&vs[..=i]))
                };
                pa.push(self.attn(&qs[i], &k, &v, &b.mask));
            }
        }
        let sa = expert.as_deref().map(|e| {
            let (ja, sa) = self.expert_attend(l, e, &pk, &pv, qs.first().filter(|_| joint));
            pa.extend(ja);
            sa
        });
        if out {
            for (b, a) in blocks.iter_mut().zip(&pa) {
                b.x = tl.finish(&b.x, a);
            }
        }
        if let (Some(e), Some(sa)) = (expert, sa) {
            e.x = self.lm_expert.layers[l].finish(&e.x, &sa);
        }
        if let Some(cache) = keep {
            cache.push((pk, pv));
        }
    }

    /// The expert's attention at layer `l` against the prefix keys/values `pk`/`pv`: in a
    /// cross-attention layer its queries (positions restarted at 0) over its own k/v
    /// projections of the prefix's, else self-attention over [prefix; its own keys]. With
    /// `joint_q` (the joint pass's self-attention layers) the prefix queries join the expert's
    /// in one attention, and their rows come back first.
    fn expert_attend(
        &self,
        l: usize,
        e: &ExpertStream,
        pk: &Tensor,
        pv: &Tensor,
        joint_q: Option<&Tensor>,
    ) -> (Option<Tensor>, Tensor) {
        let el = &self.lm_expert.layers[l];
        if self.is_cross(l) {
            let q = apply_rope_with(&el.query(&e.x), &e.cross_rope);
            let (k, v) = el.cross_kv(pk, pv);
            return (None, self.attn(&q, &k, &v, &e.cross_mask));
        }
        let (q, k, v) = el.qkv(&e.x);
        let q = apply_rope_with(&q, &e.rope);
        let k = apply_rope_with(&k, &e.rope);
        let (lp, ls) = (pk.size()[1], q.size()[1]);
        let q = match joint_q {
            Some(pq) => Tensor::cat(&[pq, &q], 1),
            None => q,
        };
        let a = self.attn(
            &q,
            &Tensor::cat(&[pk, &k], 1),
            &Tensor::cat(&[pv, &v], 1),
            &e.self_mask,
        );
        match joint_q {
            Some(_) => (Some(a.narrow(1, 0, lp)), a.narrow(1, lp, ls)),
            None => (None, a),
        }
    }

    /// Training forward over [prefix, suffix]: `mask` [B, L, L], `pos` [B, L] with
    /// L = Lp + Ls. Returns both streams after their final norms.
    pub fn forward_joint(
        &self,
        prefix: &Tensor,
        suffix: &Tensor,
        mask: &Tensor,
        pos: &Tensor,
        trace: &mut Trace,
    ) -> (Tensor, Tensor) {
        let lp = prefix.size()[1];
        let ls = suffix.size()[1];
        let hd = self.head_dim();
        let pmask = mask.narrow(1, 0, lp).narrow(2, 0, lp);
        let mut blocks = [PrefixBlock::new(prefix, &pos.narrow(1, 0, lp), pmask, hd)];
        let cross_mask = mask.narrow(1, lp, ls).narrow(2, 0, lp);
        let mut e = ExpertStream::new(
            suffix,
            &pos.narrow(1, lp, ls),
            cross_mask,
            mask.shallow_clone(),
            true,
            hd,
        );
        for l in 0..self.text_model.layers.len() {
            let prefix = PrefixSource::Live {
                blocks: &mut blocks,
                out: true,
            };
            self.layer(l, prefix, Some(&mut e), None);
            trace.record(format!("debug.vlm_layer{l}_out"), &blocks[0].x);
            trace.record(format!("debug.expert_layer{l}_out"), &e.x);
        }
        let po = self.text_model.norm.forward(&blocks[0].x);
        let so = self.lm_expert.norm.forward(&e.x);
        trace.record("debug.vlm_final_norm_out", &po);
        trace.record("debug.expert_final_norm_out", &so);
        (po, so)
    }

    /// The training forward of [`Self::forward_joint`] for a prefix whose last token (the state
    /// token) opens its own attention block, with the prefix given as `ctx` (the camera and
    /// language tokens, [B, Lp − 1, hidden]) and `state` ([B, 1, hidden]). Returns the expert
    /// stream after its final norm (the VLM stream's output is not used by the loss).
    ///
    /// Same maths as the joint pass, less work: under the block-causal mask no context token
    /// attends to the state token or the expert, so the context stream is computed on its own
    /// (its masked keys weigh exactly 0 in the softmax) and, when nothing in it is trainable
    /// (`train_expert_only`), autograd records none of it; only the one state token carries the
    /// gradient back through the VLM to `state_proj`. The joint pass differs only in the
    /// outputs of fully masked (padding) rows, which reach no real token and no gradient. The
    /// last VLM layer's o_proj/MLP and the final VLM norm, whose output is unused, are skipped.
    fn forward_joint_split(
        &self,
        ctx: &Tensor,
        state: &Tensor,
        suffix: &Tensor,
        mask: &Tensor,
        pos: &Tensor,
    ) -> Tensor {
        let lc = ctx.size()[1];
        let lp = lc + 1;
        let ls = suffix.size()[1];
        let hd = self.head_dim();
        let mut blocks = [
            PrefixBlock::new(
                ctx,
                &pos.narrow(1, 0, lc),
                mask.narrow(1, 0, lc).narrow(2, 0, lc),
                hd,
            ),
            PrefixBlock::new(
                state,
                &pos.narrow(1, lc, 1),
                mask.narrow(1, lc, 1).narrow(2, 0, lp),
                hd,
            ),
        ];
        let mut e = ExpertStream::new(
            suffix,
            &pos.narrow(1, lp, ls),
            mask.narrow(1, lp, ls).narrow(2, 0, lp),
            mask.narrow(1, lp, ls),
            false,
            hd,
        );
        let n = self.text_model.layers.len();
        for l in 0..n {
            let prefix = PrefixSource::Live {
                blocks: &mut blocks,
                out: l + 1 < n,
            };
            self.layer(l, prefix, Some(&mut e), None);
        }
        self.lm_expert.norm.forward(&e.x)
    }

    /// Prefill: every layer as self-attention over the prefix alone, keeping each layer's
    /// post-RoPE K/V (LeRobot's `fill_kv_cache=True`).
    pub fn fill_cache(&self, prefix: &Tensor, mask: &Tensor, pos: &Tensor) -> KvCache {
        let mut blocks = [PrefixBlock::new(
            prefix,
            pos,
            mask.shallow_clone(),
            self.head_dim(),
        )];
        let n = self.text_model.layers.len();
        let mut cache = Vec::with_capacity(n);
        for l in 0..n {
            // The last layer's attention output is never read: only its K/V are kept.
            let prefix = PrefixSource::Live {
                blocks: &mut blocks,
                out: l + 1 < n,
            };
            self.layer(l, prefix, None, Some(&mut cache));
        }
        cache
    }

    /// The expert stream alone against a prefix cache: `mask` [B, Ls, Lp + Ls], `pos` [B, Ls].
    pub fn forward_cached(
        &self,
        suffix: &Tensor,
        cache: &KvCache,
        mask: &Tensor,
        pos: &Tensor,
    ) -> Tensor {
        let lp = cache.first().map_or(0, |(k, _)| k.size()[1]);
        let mut e = ExpertStream::new(
            suffix,
            pos,
            mask.narrow(2, 0, lp),
            mask.shallow_clone(),
            false,
            self.head_dim(),
        );
        for (l, kv) in cache.iter().enumerate().take(self.lm_expert.layers.len()) {
            self.layer(l, PrefixSource::Cached(kv), Some(&mut e), None);
        }
        self.lm_expert.norm.forward(&e.x)
    }
}

/// One block's tensor as is, several concatenated along the sequence.
fn join(ts: &[Tensor]) -> Tensor {
    match ts {
        [t] => t.shallow_clone(),
        _ => Tensor::cat(ts, 1),
    }
}

/// Expert query positions in cross-attention layers restart at 0 (`pos − min(pos)`).
fn restart(pos: &Tensor) -> Tensor {
    let (min, _) = pos.min_dim(1, true);
    pos - min
}

/// Prefix embedding and its masks.
#[derive(Debug)]
pub struct Prefix {
    pub embs: Tensor,
    pub pad_masks: Tensor,
    pub att_masks: Tensor,
}

/// Outputs of the training forward.
#[derive(Debug)]
pub struct FlowOutput {
    /// (u_t − v_t)² elementwise, [B, chunk, max_action_dim].
    pub losses: Tensor,
    pub v_t: Tensor,
    pub u_t: Tensor,
    pub x_t: Tensor,
}

/// `model` (LeRobot's `VLAFlowMatching`).
#[derive(Debug)]
pub struct VlaFlowMatching {
    pub vlm_with_expert: SmolVlmWithExpert,
    pub state_proj: Linear,
    pub action_in_proj: Linear,
    pub action_out_proj: Linear,
    pub action_time_mlp_in: Linear,
    pub action_time_mlp_out: Linear,
    pub chunk_size: i64,
    pub num_steps: i64,
    min_period: f64,
    max_period: f64,
    expert_hidden: i64,
    text_hidden: i64,
}

impl VlaFlowMatching {
    pub fn new(vs: &Path<'_>, cfg: &SmolVlaConfig, d: &ModelDims) -> Self {
        let e = d.expert_hidden;
        Self {
            vlm_with_expert: SmolVlmWithExpert::new(&(vs / "vlm_with_expert"), cfg, d),
            state_proj: Linear::new(
                &(vs / "state_proj"),
                cfg.max_state_dim,
                d.text.hidden_size,
                true,
            ),
            action_in_proj: Linear::new(&(vs / "action_in_proj"), cfg.max_action_dim, e, true),
            action_out_proj: Linear::new(&(vs / "action_out_proj"), e, cfg.max_action_dim, true),
            action_time_mlp_in: Linear::new(&(vs / "action_time_mlp_in"), 2 * e, e, true),
            action_time_mlp_out: Linear::new(&(vs / "action_time_mlp_out"), e, e, true),
            chunk_size: cfg.chunk_size,
            num_steps: cfg.num_steps,
            min_period: cfg.min_period,
            max_period: cfg.max_period,
            expert_hidden: e,
            text_hidden: d.text.hidden_size,
        }
    }

    /// `embed_prefix`: camera tokens (×√hidden), language tokens (×√hidden), one state token.
    /// `images` are already prepared ([-1, 1], square); `img_masks` [B] bool each.
    pub fn embed_prefix(
        &self,
        images: &[Tensor],
        img_masks: &[Tensor],
        lang_tokens: &Tensor,
        lang_masks: &Tensor,
        state: &Tensor,
        trace: &mut Trace,
    ) -> Prefix {
        let (ctx, st, pad_masks, att_masks) =
            self.embed_prefix_parts(images, img_masks, lang_tokens, lang_masks, state, trace);
        let embs = Tensor::cat(&[ctx, st], 1);
        trace.record("debug.prefix_embs", &embs);
        trace.record("debug.prefix_pad_masks", &pad_masks);
        trace.record("debug.prefix_att_masks", &att_masks);
        Prefix {
            embs,
            pad_masks,
            att_masks,
        }
    }

    /// [`Self::embed_prefix`] with the embeddings kept in two parts: the camera and language
    /// tokens [B, Lp − 1, hidden] (no gradient unless the VLM trains) and the state token
    /// [B, 1, hidden]. Returns (context, state, pad masks, att masks).
    fn embed_prefix_parts(
        &self,
        images: &[Tensor],
        img_masks: &[Tensor],
        lang_tokens: &Tensor,
        lang_masks: &Tensor,
        state: &Tensor,
        trace: &mut Trace,
    ) -> (Tensor, Tensor, Tensor, Tensor) {
        let mut embs = Vec::new();
        let mut pads = Vec::new();
        let mut att: Vec<i64> = Vec::new();
        let scale = (self.text_hidden as f64).sqrt();
        for (i, (img, m)) in images.iter().zip(img_masks).enumerate() {
            let e = self.vlm_with_expert.embed_image(img, trace, i);
            let (b, n) = (e.size()[0], e.size()[1]);
            // LeRobot multiplies by a tensor of the embedding dtype; a float32 scalar is the same.
            embs.push(e * scale);
            pads.push(m.to_kind(Kind::Bool).unsqueeze(1).expand([b, n], false));
            att.extend(std::iter::repeat_n(0, n as usize));
        }
        let lang = self.vlm_with_expert.text_model.embed(lang_tokens) * scale;
        att.extend(std::iter::repeat_n(0, lang_tokens.size()[1] as usize));
        embs.push(lang);
        pads.push(lang_masks.to_kind(Kind::Bool));
        let st = self.state_proj.forward(state).unsqueeze(1);
        let b = st.size()[0];
        pads.push(Tensor::ones([b, 1], (Kind::Bool, state.device())));
        // The state token opens its own block: no camera or language token attends to it
        // (what `forward_joint_split` relies on).
        att.push(1);
        let ctx = Tensor::cat(&embs, 1);
        let pad_masks = Tensor::cat(&pads, 1);
        let att_masks = Tensor::from_slice(&att)
            .to_kind(Kind::Bool)
            .to_device(state.device())
            .unsqueeze(0)
            .expand([b, att.len() as i64], false);
        (ctx, st, pad_masks, att_masks)
    }

    /// `embed_suffix`: noisy actions and time through `action_time_mlp`; every action token
    /// starts a new attention block (causal among actions).
    pub fn embed_suffix(&self, x_t: &Tensor, time: &Tensor) -> (Tensor, Tensor, Tensor) {
        let a = self.action_in_proj.forward(x_t);
        let (b, c) = (a.size()[0], a.size()[1]);
        let temb =
            sinusoidal_time_embedding(time, self.expert_hidden, self.min_period, self.max_period)
                .to_kind(a.kind())
                .unsqueeze(1)
                .expand_as(&a);
        let h = self
            .action_time_mlp_in
            .forward(&Tensor::cat(&[&a, &temb], 2))
            .silu();
        let h = self.action_time_mlp_out.forward(&h);
        let pad = Tensor::ones([b, c], (Kind::Bool, x_t.device()));
        let att = Tensor::ones([b, c], (Kind::Bool, x_t.device()));
        (h, pad, att)
    }

    /// `VLAFlowMatching.forward`: x_t = t·noise + (1−t)·actions, u_t = noise − actions,
    /// v_t from the joint decoder, losses = (u_t − v_t)².
    pub fn forward(
        &self,
        images: &[Tensor],
        img_masks: &[Tensor],
        lang_tokens: &Tensor,
        lang_masks: &Tensor,
        state: &Tensor,
        actions: &Tensor,
        noise: &Tensor,
        time: &Tensor,
        trace: &mut Trace,
    ) -> FlowOutput {
        let t = time.view([-1, 1, 1]);
        let x_t = &t * noise + (1.0 - &t) * actions;
        let u_t = noise - actions;
        trace.record("debug.x_t", &x_t);
        let (ctx, st, p_pad, p_att) =
            self.embed_prefix_parts(images, img_masks, lang_tokens, lang_masks, state, trace);
        let (s_embs, s_pad, s_att) = self.embed_suffix(&x_t, time);
        trace.record("debug.suffix_embs", &s_embs);
        let pad = Tensor::cat(&[&p_pad, &s_pad], 1);
        let att = Tensor::cat(&[&p_att, &s_att], 1);
        let mask = make_att_2d_masks(&pad, &att);
        let pos = pad.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1;
        let so = if trace.is_on() {
            // The parity path: LeRobot's joint pass, whose intermediates (padding rows included)
            // the fixtures record.
            let embs = Tensor::cat(&[&ctx, &st], 1);
            trace.record("debug.prefix_embs", &embs);
            trace.record("debug.prefix_pad_masks", &p_pad);
            trace.record("debug.prefix_att_masks", &p_att);
            trace.record("debug.att_2d_masks", &mask);
            trace.record("debug.position_ids", &pos);
            self.vlm_with_expert
                .forward_joint(&embs, &s_embs, &mask, &pos, trace)
                .1
        } else {
            self.vlm_with_expert
                .forward_joint_split(&ctx, &st, &s_embs, &mask, &pos)
        };
        let l = so.size()[1];
        let so = so
            .narrow(1, l - self.chunk_size, self.chunk_size)
            .to_kind(Kind::Float);
        let v_t = self.action_out_proj.forward(&so);
        let losses = (&u_t - &v_t).square();
        FlowOutput {
            losses,
            v_t,
            u_t,
            x_t,
        }
    }

    /// `sample_actions`: prefill the prefix cache, then `num_steps` Euler steps from `noise`
    /// (t = 1) to t ≈ 0. Returns x_0 padded to max_action_dim. With tracing on it records each
    /// step's x_t, v_t and t.
    pub fn sample_actions(
        &self,
        images: &[Tensor],
        img_masks: &[Tensor],
        lang_tokens: &Tensor,
        lang_masks: &Tensor,
        state: &Tensor,
        noise: &Tensor,
        trace: &mut Trace,
    ) -> Tensor {
        let mut quiet = Trace::off();
        let prefix = self.embed_prefix(
            images,
            img_masks,
            lang_tokens,
            lang_masks,
            state,
            &mut quiet,
        );
        let pmask = make_att_2d_masks(&prefix.pad_masks, &prefix.att_masks);
        let ppos = prefix.pad_masks.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1;
        let cache = self.vlm_with_expert.fill_cache(&prefix.embs, &pmask, &ppos);
        let b = noise.size()[0];
        let dt = -1.0 / self.num_steps as f64;
        let mut x = noise.shallow_clone();
        let (mut xs, mut vs, mut ts) = (Vec::new(), Vec::new(), Vec::new());
        for k in 0..self.num_steps {
            let t = 1.0 + k as f64 * dt;
            let time = Tensor::from(t as f32)
                .to_device(noise.device())
                .expand([b], false);
            let v = self.denoise_step(&prefix.pad_masks, &cache, &x, &time);
            if trace.is_on() {
                xs.push(x.detach().copy());
                vs.push(v.detach().copy());
                ts.push(time.copy());
            }
            x = &x + v * dt;
        }
        if trace.is_on() {
            trace.record("sample.x_t_steps", &Tensor::stack(&xs, 0));
            trace.record("sample.v_t_steps", &Tensor::stack(&vs, 0));
            trace.record("sample.time_steps", &Tensor::stack(&ts, 0));
            trace.record("sample.x_0_padded", &x);
        }
        x
    }

    /// `denoise_step`: the velocity at (x_t, t) given the prefix cache.
    pub fn denoise_step(
        &self,
        prefix_pad: &Tensor,
        cache: &KvCache,
        x_t: &Tensor,
        time: &Tensor,
    ) -> Tensor {
        let (s_embs, s_pad, s_att) = self.embed_suffix(x_t, time);
        let (b, ls) = (s_pad.size()[0], s_pad.size()[1]);
        let lp = prefix_pad.size()[1];
        let prefix_2d = prefix_pad.unsqueeze(1).expand([b, ls, lp], false);
        let mask = Tensor::cat(&[prefix_2d, make_att_2d_masks(&s_pad, &s_att)], 2);
        let offsets = prefix_pad
            .to_kind(Kind::Int64)
            .sum_dim_intlist(-1, true, Kind::Int64);
        let pos = offsets + s_pad.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1;
        let so = self
            .vlm_with_expert
            .forward_cached(&s_embs, cache, &mask, &pos);
        let l = so.size()[1];
        let so = so
            .narrow(1, l - self.chunk_size, self.chunk_size)
            .to_kind(Kind::Float);
        self.action_out_proj.forward(&so)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tch::{Device, Tensor};

    use crate::policy::read_fixture_inputs;
    use crate::{SmolVlaPolicy, Trace};

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/smolvla-tiny"
    );

    /// Loss and trainable gradients of one forward/backward, joint pass (trace on) or split
    /// pass (trace off).
    fn loss_and_grads(policy: &SmolVlaPolicy, traced: bool) -> (f64, BTreeMap<String, Tensor>) {
        let (batch, draws) = read_fixture_inputs(format!("{FIXTURE}/inputs.safetensors")).unwrap();
        let params = policy.trainable_parameters();
        for (_, p) in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let mut trace = if traced { Trace::on() } else { Trace::off() };
        let lo = policy
            .forward(
                &batch,
                Some(&draws["noise"]),
                Some(&draws["time"]),
                &mut trace,
            )
            .unwrap();
        lo.loss.backward();
        let grads = params
            .into_iter()
            .map(|(n, p)| (n, p.grad().copy()))
            .collect();
        (lo.loss.double_value(&[]), grads)
    }

    /// The split training pass (context stream apart from the state token, last VLM layer
    /// skipped) gives the joint pass's loss and gradients, with the default freeze (expert only)
    /// and with the whole VLM trainable. The fixture's prompts have padding tokens, the case
    /// where the two passes' intermediates differ.
    #[test]
    fn split_pass_matches_the_joint_pass() {
        tch::set_num_threads(1);
        let mut policy = SmolVlaPolicy::from_dir(FIXTURE, Device::Cpu).unwrap();
        for full in [false, true] {
            if full {
                policy.config.freeze_vision_encoder = false;
                policy.config.train_expert_only = false;
                policy.apply_freeze();
            }
            let (l_joint, g_joint) = loss_and_grads(&policy, true);
            let (l_split, g_split) = loss_and_grads(&policy, false);
            assert!(
                (l_joint - l_split).abs() <= 1e-6 * l_joint.abs(),
                "full={full}: loss {l_joint} vs {l_split}"
            );
            assert!(g_joint.len() > 10, "full={full}: {} grads", g_joint.len());
            let mut vlm_grads = 0;
            for (n, gj) in &g_joint {
                let gs = &g_split[n];
                assert!(gj.defined() && gs.defined(), "full={full}: no grad for {n}");
                let err = (gj - gs).abs().max().double_value(&[]);
                let scale = gj.abs().max().double_value(&[]);
                assert!(
                    err <= 1e-7 + 1e-5 * scale,
                    "full={full}: {n}: max error {err} (max |grad| {scale})"
                );
                vlm_grads += usize::from(n.contains(".text_model.layers."));
            }
            // The full fine-tune really sends gradients through the context stream.
            assert_eq!(vlm_grads > 0, full);
        }
    }
}
