//! The ONNX export against the tch model it came from and against LeRobot, on every vendored
//! SmolVLA parity fixture: the prefix graph's cache, each denoising step's velocity and the
//! sampled chunk, run through ONNX Runtime by `zk0-infer` (the robot's runtime).
//!
//! Needs `ORT_DYLIB_PATH` (set by `cargo xtask test`); fails naming it when absent.

use std::path::{Path, PathBuf};

use smolvla::layers::make_att_2d_masks;
use smolvla::onnx::{export, ExportOptions};
use smolvla::policy::{read_fixture_inputs, Batch, OBS_STATE, OBS_TOKENS, OBS_TOKEN_MASK};
use smolvla::processor::resize_with_pad;
use smolvla::{SmolVlaPolicy, Trace};
use smolvla_config::export::ExportManifest;
use tch::{Device, Kind, Tensor};
use zk0_infer::{ModelInputs, OnnxPolicy, RuntimeOptions};

const FIXTURES: [&str; 4] = [
    "smolvla-tiny",
    "smolvla-two-cameras",
    "smolvla-chunk5",
    "smolvla-seed1-b3-t9",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn ort_ready() {
    let lib = std::env::var_os("ORT_DYLIB_PATH").expect(
        "ORT_DYLIB_PATH is not set: run through `cargo xtask test` (it provisions onnxruntime)",
    );
    zk0_infer::init(Some(Path::new(&lib))).unwrap();
}

fn floats(t: &Tensor) -> Vec<f32> {
    Vec::try_from(t.to_kind(Kind::Float).contiguous().view(-1)).unwrap()
}

/// Max abs error and cosine similarity of `got` against `want`.
fn compare(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "length");
    let (mut dot, mut ng, mut nw, mut max) = (0f64, 0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        dot += g * w;
        ng += g * g;
        nw += w * w;
        max = max.max((g - w).abs());
    }
    let cos = if ng == 0.0 && nw == 0.0 {
        1.0
    } else {
        dot / (ng.sqrt() * nw.sqrt())
    };
    (max, cos)
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f64, min_cos: f64) -> f64 {
    let (max, cos) = compare(got, want);
    assert!(
        max <= atol && cos >= min_cos,
        "{what}: max |error| {max:e} (atol {atol:e}), cosine {cos} (min {min_cos})"
    );
    max
}

/// Sample `b` of a fixture batch, as a batch of one.
fn one(batch: &Batch, b: i64) -> Batch {
    batch
        .iter()
        .map(|(k, t)| (k.clone(), t.narrow(0, b, 1)))
        .collect()
}

/// The export's host-side inputs for a batch of one, with the language padded to the
/// manifest's fixed length (padding masked out), and the same padded tokens for tch.
fn model_inputs(
    policy: &SmolVlaPolicy,
    batch: &Batch,
    onnx: &OnnxPolicy,
) -> (ModelInputs, Tensor, Tensor) {
    let m = &onnx.manifest;
    let (h, w) = policy.config.resize_hw();
    let mut images = Vec::new();
    for cam in &m.cameras {
        let img = batch[&cam.key].to_kind(Kind::Float);
        let s = img.size();
        let img = if s[2] == h && s[3] == w {
            img
        } else {
            resize_with_pad(&img, h, w, 0.0)
        };
        images.push(floats(&img));
    }
    let tokens: Vec<i64> = Vec::try_from(batch[OBS_TOKENS].view(-1)).unwrap();
    let mask: Vec<i64> =
        Vec::try_from(batch[OBS_TOKEN_MASK].to_kind(Kind::Int64).view(-1)).unwrap();
    let l = m.language.max_length as usize;
    assert!(tokens.len() <= l);
    let mut t = tokens.clone();
    t.resize(l, 0);
    let mut mk: Vec<bool> = mask.iter().map(|&x| x != 0).collect();
    mk.resize(l, false);
    let state = floats(&batch[OBS_STATE]);
    let tt = Tensor::from_slice(&t).view([1, l as i64]);
    let tm = Tensor::from_slice(&mk).view([1, l as i64]);
    (
        ModelInputs {
            images,
            image_masks: vec![true; m.cameras.len()],
            tokens: t,
            token_mask: mk,
            state,
        },
        tt,
        tm,
    )
}

/// A fixture's policy and its export, in a temporary directory the returned guard keeps.
fn exported(
    name: &str,
    opts: &ExportOptions,
) -> (PathBuf, SmolVlaPolicy, tempfile::TempDir, ExportManifest) {
    let dir = fixture(name);
    let policy = SmolVlaPolicy::from_dir(&dir, Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    let m = export(&policy, Some(&dir), name, out.path(), opts).unwrap();
    (dir, policy, out, m)
}

/// Prefix cache, every step's velocity and the chunk, fp32, on every fixture: ORT against tch
/// (atol 1e-4, cosine ≥ 0.99999) and the chunk against LeRobot's `predict_action_chunk`.
#[test]
fn fp32_export_matches_tch_and_lerobot_on_every_fixture() {
    tch::set_num_threads(1);
    ort_ready();
    for name in FIXTURES {
        let (dir, policy, out, m) = exported(name, &ExportOptions::default());
        assert_eq!(m.kv.len() as i64, policy.dims.vlm_layers);
        let opts = RuntimeOptions {
            threads: Some(1),
            ..Default::default()
        };
        let mut onnx = OnnxPolicy::load(out.path(), &opts).unwrap();
        let (batch, draws) = read_fixture_inputs(dir.join("inputs.safetensors")).unwrap();
        let expected: std::collections::BTreeMap<String, Tensor> =
            Tensor::read_safetensors(dir.join("expected.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let n = batch[OBS_STATE].size()[0];
        let mut worst = [0f64; 4];
        for b in 0..n {
            let bb = one(&batch, b);
            let (inputs, tokens, tmask) = model_inputs(&policy, &bb, &onnx);
            let cache = onnx.prefix(&inputs).unwrap();

            // tch's prefix on the same padded language.
            let (images, img_masks) = policy.prepare_images(&bb).unwrap();
            let state = policy.prepare_state(&bb).unwrap();
            let model = &policy.model;
            let prefix = tch::no_grad(|| {
                model.embed_prefix(
                    &images,
                    &img_masks,
                    &tokens,
                    &tmask,
                    &state,
                    &mut Trace::off(),
                )
            });
            let pmask = make_att_2d_masks(&prefix.pad_masks, &prefix.att_masks);
            let ppos = prefix.pad_masks.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1;
            let kv = tch::no_grad(|| {
                model
                    .vlm_with_expert
                    .fill_cache(&prefix.embs, &pmask, &ppos)
            });
            let (_, pad) = cache.get("prefix_pad_mask").unwrap();
            assert_eq!(
                pad,
                floats(&prefix.pad_masks),
                "{name}[{b}]: prefix pad mask"
            );
            for spec in &m.kv {
                let (k, v) = &kv[spec.layer as usize];
                let (k, v) = if spec.cross {
                    tch::no_grad(|| {
                        model.vlm_with_expert.lm_expert.layers[spec.layer as usize].cross_kv(k, v)
                    })
                } else {
                    (k.shallow_clone(), v.shallow_clone())
                };
                for (out, want) in [(&spec.key, k), (&spec.value, v)] {
                    let (shape, got) = cache.get(out).unwrap();
                    assert_eq!(shape, want.size(), "{name}: {out} shape");
                    let e = assert_close(
                        &format!("{name}[{b}] {out}"),
                        &got,
                        &floats(&want),
                        1e-4,
                        0.99999,
                    );
                    worst[0] = worst[0].max(e);
                }
            }

            // Each step's velocity and the chunk against tch's sampler, same noise.
            let noise = draws["sample_noise"].narrow(0, b, 1);
            let chunk = onnx.sample_from(&cache, &floats(&noise), true).unwrap();
            let mut trace = Trace::on();
            let x0 = tch::no_grad(|| {
                model.sample_actions(
                    &images, &img_masks, &tokens, &tmask, &state, &noise, &mut trace,
                )
            });
            let vs = &trace.tensors["sample.v_t_steps"];
            assert_eq!(chunk.steps.len() as i64, vs.size()[0]);
            for (k, (_, _, v)) in chunk.steps.iter().enumerate() {
                let e = assert_close(
                    &format!("{name}[{b}] v_t step {k}"),
                    v,
                    &floats(&vs.get(k as i64)),
                    1e-4,
                    0.99999,
                );
                worst[1] = worst[1].max(e);
            }
            let e = assert_close(
                &format!("{name}[{b}] chunk vs tch"),
                &chunk.padded,
                &floats(&x0),
                1e-4,
                0.99999,
            );
            worst[2] = worst[2].max(e);

            // LeRobot's own chunk (normalized, the real action dims) from the fixture.
            let ad = m.action_dim as usize;
            let got: Vec<f32> = chunk
                .padded
                .chunks(m.max_action_dim as usize)
                .flat_map(|row| row[..ad].to_vec())
                .collect();
            let want = floats(&expected["sample.actions"].get(b));
            let e = assert_close(
                &format!("{name}[{b}] chunk vs LeRobot"),
                &got,
                &want,
                1e-4,
                0.99999,
            );
            worst[3] = worst[3].max(e);
        }
        eprintln!(
            "{name}: max |error| cache {:.2e}, v_t {:.2e}, chunk vs tch {:.2e}, chunk vs LeRobot {:.2e}",
            worst[0], worst[1], worst[2], worst[3]
        );
    }
}

/// The LeRobot venv's Python (`cargo xtask setup --lerobot` installs `onnx` and `onnxruntime`
/// in it); the test fails naming it when absent.
fn checker_python() -> PathBuf {
    let p = std::env::var_os("ZK0_LEROBOT_PYTHON").filter(|v| !v.is_empty()).expect(
        "ZK0_LEROBOT_PYTHON is not set: run `cargo xtask setup --lerobot` and the tests through \
         `cargo xtask test` (the ONNX checkers live in that venv)",
    );
    PathBuf::from(p)
}

/// `onnx.checker.check_model(full_check=True)` passes on both graphs, and the stock Python
/// onnxruntime, driving the graphs by `export.json` alone, samples the chunk zk0's `ort` path
/// samples (both fixtures: one and two cameras).
#[test]
fn onnx_checker_and_python_onnxruntime_agree() {
    ort_ready();
    let py = checker_python();
    for name in ["smolvla-tiny", "smolvla-two-cameras"] {
        let (dir, policy, out, _m) = exported(name, &ExportOptions::default());
        let mut onnx = OnnxPolicy::load(out.path(), &RuntimeOptions::default()).unwrap();
        let (batch, draws) = read_fixture_inputs(dir.join("inputs.safetensors")).unwrap();
        let bb = one(&batch, 0);
        let (inputs, tokens, tmask) = model_inputs(&policy, &bb, &onnx);
        let noise = draws["sample_noise"].narrow(0, 0, 1);
        let chunk = onnx.sample(&inputs, &floats(&noise), false).unwrap();
        let m = &onnx.manifest;
        let (h, w) = (m.image.height, m.image.width);
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (cam, img) in m.cameras.iter().zip(&inputs.images) {
            named.push((cam.key.clone(), Tensor::from_slice(img).view([1, 3, h, w])));
            named.push((cam.mask.clone(), Tensor::from_slice(&[1u8])));
        }
        named.push((OBS_TOKENS.into(), tokens));
        named.push((OBS_TOKEN_MASK.into(), tmask.to_kind(Kind::Uint8)));
        named.push((
            OBS_STATE.into(),
            Tensor::from_slice(&inputs.state).view([1, -1]),
        ));
        named.push(("noise".into(), noise));
        named.push(("chunk".into(), Tensor::from_slice(&chunk.padded)));
        let file = out.path().join("check_inputs.safetensors");
        Tensor::write_safetensors(&named, &file).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/onnx_check.py");
        let o = std::process::Command::new(&py)
            .arg(&script)
            .arg(out.path())
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: onnx_check.py failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        eprintln!("{name}: {r}");
        assert_eq!(r["prefix_checked"], true);
        assert_eq!(r["denoise_checked"], true);
        let n_kv = m.kv.len() * 2;
        assert_eq!(
            r["denoise_inputs"].as_array().unwrap().len(),
            3 + n_kv,
            "{r}"
        );
        let (max, cos) = (
            r["max_abs"].as_f64().unwrap(),
            r["cosine"].as_f64().unwrap(),
        );
        assert!(
            max <= 1e-5 && cos >= 0.999999,
            "{name}: python onnxruntime vs zk0: {r}"
        );
    }
}

/// A reduced-precision export of fixture `name` against the fp32 tch model: the worst max
/// |error| and cosine of the sampled chunk over the fixture's batch rows.
fn chunk_vs_fp32(name: &str, opts: &ExportOptions, precision: &str) -> (f64, f64) {
    let (dir, policy, out, m) = exported(name, opts);
    assert_eq!(m.precision, precision);
    let mut onnx = OnnxPolicy::load(out.path(), &RuntimeOptions::default()).unwrap();
    let (batch, draws) = read_fixture_inputs(dir.join("inputs.safetensors")).unwrap();
    let mut worst = (0f64, 1f64);
    for b in 0..batch[OBS_STATE].size()[0] {
        let bb = one(&batch, b);
        let (inputs, tokens, tmask) = model_inputs(&policy, &bb, &onnx);
        let noise = draws["sample_noise"].narrow(0, b, 1);
        let chunk = onnx.sample(&inputs, &floats(&noise), false).unwrap();
        let (images, img_masks) = policy.prepare_images(&bb).unwrap();
        let state = policy.prepare_state(&bb).unwrap();
        let x0 = tch::no_grad(|| {
            policy.model.sample_actions(
                &images,
                &img_masks,
                &tokens,
                &tmask,
                &state,
                &noise,
                &mut Trace::off(),
            )
        });
        let (max, cos) = compare(&chunk.padded, &floats(&x0));
        worst = (worst.0.max(max), worst.1.min(cos));
    }
    eprintln!(
        "{name}: {precision} chunk max |error| {:.2e}, min cosine {:.6}",
        worst.0, worst.1
    );
    worst
}

/// The fp16 variant (matrix products in float16, accumulation and everything else float32)
/// against the fp32 tch model: chunk cosine ≥ 0.999 on every fixture.
#[test]
fn fp16_export_stays_close_to_fp32() {
    ort_ready();
    let opts = ExportOptions {
        fp16: true,
        ..Default::default()
    };
    for name in FIXTURES {
        let (max, cos) = chunk_vs_fp32(name, &opts, "fp16");
        assert!(
            cos >= 0.999 && max < 0.05,
            "{name}: fp16 chunk max |error| {max}, cosine {cos}"
        );
    }
}

/// The int8 variant (the prefix's linear layers dynamically quantized, everything else
/// float32) against the fp32 tch model: chunk cosine ≥ 0.99 on every fixture.
#[test]
fn int8_prefix_export_stays_close_to_fp32() {
    ort_ready();
    let opts = ExportOptions {
        int8: true,
        ..Default::default()
    };
    for name in FIXTURES {
        let (_, cos) = chunk_vs_fp32(name, &opts, "int8-prefix");
        assert!(cos >= 0.99, "{name}: int8 chunk cosine {cos}");
    }
}
