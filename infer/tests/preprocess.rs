//! The preprocessing against tensors made by LeRobot (and torch) in `tests/fixtures`.

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use zk0_infer::preprocess::{self, Error, Normalizer, TaskTokenizer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// One tensor of a safetensors file: shape and raw little-endian bytes.
struct Loaded {
    shape: Vec<usize>,
    dtype: Dtype,
    data: Vec<u8>,
}

impl Loaded {
    fn f32(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32);
        self.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn i64(&self) -> Vec<i64> {
        assert_eq!(self.dtype, Dtype::I64);
        self.data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn bools(&self) -> Vec<bool> {
        assert!(matches!(self.dtype, Dtype::U8 | Dtype::BOOL));
        self.data.iter().map(|&b| b != 0).collect()
    }
}

fn load(rel: &str, name: &str) -> Loaded {
    let path = fixtures().join(rel);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
    Loaded {
        shape: t.shape().to_vec(),
        dtype: t.dtype(),
        data: t.data().to_vec(),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

// --- images -----------------------------------------------------------------------------------

/// `debug.images_prepared_cam{i}` of a parity fixture = LeRobot's `prepare_images` output
/// (resize-with-pad to `resize_imgs_with_padding`, then ×2−1) for each batch item.
fn check_prepared(fixture: &str, cameras: &[&str]) -> f32 {
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(fixture).join("config.json")).unwrap(),
    )
    .unwrap();
    // LeRobot's order is (width, height).
    let size = cfg["resize_imgs_with_padding"].as_array().unwrap();
    let (out_w, out_h) = (
        size[0].as_u64().unwrap() as usize,
        size[1].as_u64().unwrap() as usize,
    );
    let mut worst = 0.0f32;
    for (i, cam) in cameras.iter().enumerate() {
        let input = load(
            &format!("{fixture}/inputs.safetensors"),
            &format!("observation.images.{cam}"),
        );
        let expected = load(
            &format!("{fixture}/expected_extra.safetensors"),
            &format!("debug.images_prepared_cam{i}"),
        );
        let [b, c, h, w] = input.shape[..] else {
            panic!("{fixture} {cam}: shape {:?}", input.shape)
        };
        assert_eq!(expected.shape, vec![b, c, out_h, out_w]);
        let (x, want) = (input.f32(), expected.f32());
        for item in 0..b {
            let img = &x[item * c * h * w..(item + 1) * c * h * w];
            let got: Vec<f32> = preprocess::prepare_image(img, &[c, h, w], out_h, out_w)
                .unwrap()
                .iter()
                .map(|v| v * 2.0 - 1.0)
                .collect();
            let n = c * out_h * out_w;
            let d = max_abs_diff(&got, &want[item * n..(item + 1) * n]);
            assert!(d <= 1e-5, "{fixture} cam{i} item {item}: max diff {d}");
            worst = worst.max(d);
        }
    }
    eprintln!("{fixture}: prepared images max abs diff {worst:e}");
    worst
}

#[test]
fn prepared_images_match_lerobot_tiny() {
    check_prepared("smolvla-tiny", &["front"]);
}

#[test]
fn prepared_images_match_lerobot_two_cameras() {
    // 48x64 (pad on top) and 64x40 (pad on the left) into 64x64.
    check_prepared("smolvla-two-cameras", &["front", "wrist"]);
}

#[test]
fn prepared_images_match_lerobot_other_fixtures() {
    check_prepared("smolvla-chunk5", &["front"]);
    check_prepared("smolvla-seed1-b3-t9", &["front"]);
}

#[test]
fn prepare_image_takes_last_time_step_and_checks_shape() {
    let input = load(
        "smolvla-tiny/inputs.safetensors",
        "observation.images.front",
    );
    let x = input.f32();
    let [b, c, h, w] = input.shape[..] else {
        panic!()
    };
    // Both batch items as a [T=2, C, H, W] history: the last one is prepared.
    let stacked = preprocess::prepare_image(&x, &[b, c, h, w], 64, 64).unwrap();
    let last = preprocess::prepare_image(&x[(b - 1) * c * h * w..], &[c, h, w], 64, 64).unwrap();
    assert_eq!(stacked, last);
    assert!(matches!(
        preprocess::prepare_image(&x[1..], &[b, c, h, w], 64, 64),
        Err(Error::Image(_))
    ));
    assert!(matches!(
        preprocess::prepare_image(&x, &[c, h * w * b], 64, 64),
        Err(Error::Image(_))
    ));
}

#[test]
fn u8_frames_convert_like_lerobot_decoding() {
    // The pipeline's raw camera frames were decoded by LeRobot as u8 / 255: quantizing them
    // back to u8 and converting must give them again.
    let raw = load(
        "smolvla-tiny/pipeline/inputs.safetensors",
        "raw.observation.images.front",
    );
    let [b, c, h, w] = raw.shape[..] else {
        panic!()
    };
    let x = raw.f32();
    for item in 0..b {
        let chw = &x[item * c * h * w..(item + 1) * c * h * w];
        let mut hwc = vec![0u8; c * h * w];
        for ch in 0..c {
            for p in 0..h * w {
                hwc[p * c + ch] = (chw[ch * h * w + p] * 255.0).round() as u8;
            }
        }
        let back = preprocess::hwc_u8_to_chw_f32(&hwc, h, w, c).unwrap();
        assert_eq!(back, chw, "item {item}");
    }
    assert!(preprocess::hwc_u8_to_chw_f32(&[0; 5], 1, 2, 3).is_err());
}

/// Cases of `tests/fixtures/resize-with-pad/generate.py`: LeRobot's `resize_with_pad` run by
/// torch on sizes that really interpolate (down, up, odd, 1-pixel), which the parity fixtures
/// (48x64 and 64x40 into 64x64: pad only) do not.
#[test]
fn resize_with_pad_matches_torch() {
    let path = fixtures().join("resize-with-pad/expected.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["cases"]).unwrap();
    let cases = cases.as_object().unwrap();
    assert!(cases.len() >= 10);
    let (mut worst, mut generic) = (0.0f32, 0);
    for (name, case) in cases {
        let input = load(
            "resize-with-pad/expected.safetensors",
            &format!("{name}.input"),
        );
        let output = load(
            "resize-with-pad/expected.safetensors",
            &format!("{name}.output"),
        );
        let [c, h, w] = input.shape[..] else { panic!() };
        let (oh, ow) = (
            case["out_h"].as_u64().unwrap() as usize,
            case["out_w"].as_u64().unwrap() as usize,
        );
        let pad = case["pad_value"].as_f64().unwrap() as f32;
        assert_eq!(output.shape, vec![c, oh, ow], "{name}");
        let got = preprocess::resize_with_pad(&input.f32(), c, h, w, oh, ow, pad);
        let want = output.f32();
        let d = max_abs_diff(&got, &want);
        let kernel = case["kernel"].as_str().unwrap();
        eprintln!("resize {name}: {h}x{w} -> {oh}x{ow} ({kernel}): max abs diff {d:e}");
        match kernel {
            // Torch's generic kernel (every real camera size) and no resize: bit for bit.
            "generic" | "none" => {
                assert!(got == want, "{name}: not bit-exact, max diff {d}");
                generic += 1;
            }
            // Torch's small-output kernel rounds in another order.
            _ => assert!(d <= 1e-6, "{name}: max diff {d}"),
        }
        worst = worst.max(d);
    }
    assert!(generic >= 4);
    eprintln!("resize-with-pad vs torch: max abs diff {worst:e}");
}

// --- normalization ------------------------------------------------------------------------------

const PIPELINE: &str = "smolvla-tiny/pipeline";

#[test]
fn normalize_state_matches_lerobot() {
    let norm = Normalizer::from_file(
        &fixtures()
            .join(PIPELINE)
            .join("policy_preprocessor_step_5_normalizer_processor.safetensors"),
    )
    .unwrap();
    assert!(norm.features().any(|f| f == "observation.state"));
    assert_eq!(norm.stats("observation.state").unwrap().0.len(), 6);
    let mut state = load(
        &format!("{PIPELINE}/inputs.safetensors"),
        "raw.observation.state",
    )
    .f32();
    let want = load(
        &format!("{PIPELINE}/expected.safetensors"),
        "batch.observation.state",
    )
    .f32();
    assert_ne!(state, want);
    // All three batch rows in one call.
    norm.normalize("observation.state", &mut state).unwrap();
    let d = max_abs_diff(&state, &want);
    eprintln!("normalize observation.state: max abs diff {d:e}");
    assert!(d <= 1e-5, "max diff {d}");

    // The action targets too.
    let mut action = load(&format!("{PIPELINE}/inputs.safetensors"), "raw.action").f32();
    let want = load(&format!("{PIPELINE}/expected.safetensors"), "batch.action").f32();
    norm.normalize("action", &mut action).unwrap();
    let d = max_abs_diff(&action, &want);
    eprintln!("normalize action: max abs diff {d:e}");
    assert!(d <= 1e-5, "max diff {d}");
}

#[test]
fn unnormalize_actions_matches_lerobot_postprocessor() {
    let norm = Normalizer::from_file(
        &fixtures()
            .join(PIPELINE)
            .join("policy_postprocessor_step_0_unnormalizer_processor.safetensors"),
    )
    .unwrap();
    let mut actions = load(
        &format!("{PIPELINE}/expected.safetensors"),
        "sample.actions_normalized",
    )
    .f32();
    let want = load(
        &format!("{PIPELINE}/expected.safetensors"),
        "sample.actions",
    )
    .f32();
    assert_ne!(actions, want);
    // [3, 8, 6] chunk in one call.
    norm.unnormalize("action", &mut actions).unwrap();
    let d = max_abs_diff(&actions, &want);
    eprintln!("unnormalize sample.actions: max abs diff {d:e}");
    assert!(d <= 1e-5, "max diff {d}");
}

#[test]
fn in_memory_stats_equal_the_file_and_errors_are_clear() {
    let file = Normalizer::from_file(
        &fixtures()
            .join(PIPELINE)
            .join("policy_preprocessor_step_5_normalizer_processor.safetensors"),
    )
    .unwrap();
    let (mean, std) = file.stats("observation.state").unwrap();
    let mem = Normalizer::from_stats([(
        "observation.state".to_string(),
        (mean.to_vec(), std.to_vec()),
    )])
    .unwrap();
    let mut a = load(
        &format!("{PIPELINE}/inputs.safetensors"),
        "raw.observation.state",
    )
    .f32();
    let mut b = a.clone();
    file.normalize("observation.state", &mut a).unwrap();
    mem.normalize("observation.state", &mut b).unwrap();
    assert_eq!(a, b);
    // Round trip: unnormalize(normalize(x)) ≈ x.
    let orig = load(
        &format!("{PIPELINE}/inputs.safetensors"),
        "raw.observation.state",
    )
    .f32();
    mem.unnormalize("observation.state", &mut b).unwrap();
    assert!(max_abs_diff(&b, &orig) <= 1e-5);

    assert!(matches!(
        mem.normalize("action", &mut a),
        Err(Error::MissingFeature(f)) if f == "action"
    ));
    assert!(matches!(
        mem.unnormalize("observation.state", &mut [0.0; 7]),
        Err(Error::LengthMismatch { len: 7, dim: 6, .. })
    ));
    assert!(matches!(
        Normalizer::from_stats([("x".to_string(), (vec![0.0; 2], vec![1.0; 3]))]),
        Err(Error::StatsMismatch { .. })
    ));
    assert!(matches!(
        Normalizer::from_file(&fixtures().join(PIPELINE).join("pipeline.json")),
        Err(Error::Safetensors { .. })
    ));
}

// --- tokenization ------------------------------------------------------------------------------

#[test]
fn tokens_match_lerobot_and_pad_to_fixed_length() {
    let pipeline: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(PIPELINE).join("pipeline.json")).unwrap(),
    )
    .unwrap();
    let tasks: Vec<&str> = pipeline["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let max_length = pipeline["tokenizer_max_length"].as_u64().unwrap() as usize;
    let tok = TaskTokenizer::from_file(
        &fixtures().join(PIPELINE).join("tokenizer.json"),
        max_length,
        "<pad>",
    )
    .unwrap();
    let want_ids = load(
        &format!("{PIPELINE}/expected.safetensors"),
        "batch.observation.language.tokens",
    );
    let want_mask = load(
        &format!("{PIPELINE}/expected.safetensors"),
        "batch.observation.language.attention_mask",
    );
    let [b, longest] = want_ids.shape[..] else {
        panic!()
    };
    assert_eq!(b, tasks.len());
    let (want_ids, want_mask) = (want_ids.i64(), want_mask.bools());
    // The fixture pads to its longest prompt, so some of its rows are padded.
    assert!(want_mask.iter().any(|m| !m));

    let length = max_length + 4;
    let (ids, mask) = tok.encode_batch(&tasks, length).unwrap();
    assert_eq!((ids.len(), mask.len()), (b * length, b * length));
    for row in 0..b {
        let (ids, mask) = (
            &ids[row * length..][..length],
            &mask[row * length..][..length],
        );
        assert_eq!(
            &ids[..longest],
            &want_ids[row * longest..][..longest],
            "row {row}"
        );
        assert_eq!(
            &mask[..longest],
            &want_mask[row * longest..][..longest],
            "row {row}"
        );
        // Past the fixture's length: pad tokens, masked out.
        assert!(ids[longest..].iter().all(|&i| i == tok.pad_id() as i64));
        assert!(mask[longest..].iter().all(|&m| !m));
        // Padded positions inside the fixture carry LeRobot's pad id too.
        for j in 0..longest {
            if !mask[j] {
                assert_eq!(ids[j], tok.pad_id() as i64);
            }
        }
    }
    // A task that already ends with a newline gets no second one.
    assert_eq!(
        tok.encode(&format!("{}\n", tasks[0]), length).unwrap(),
        tok.encode(tasks[0], length).unwrap()
    );
}

#[test]
fn long_tasks_truncate_at_max_length() {
    let tok = TaskTokenizer::from_file(
        &fixtures().join(PIPELINE).join("tokenizer.json"),
        12,
        "<pad>",
    )
    .unwrap();
    let long = "Pick up the red cube and put it in the bowl, then pick up the cube again.";
    let untruncated = TaskTokenizer::from_file(
        &fixtures().join(PIPELINE).join("tokenizer.json"),
        1000,
        "<pad>",
    )
    .unwrap()
    .tokens(long)
    .unwrap();
    assert!(untruncated.len() > 12);
    let (ids, mask) = tok.encode(long, 12).unwrap();
    assert_eq!(ids, untruncated[..12]);
    assert!(mask.iter().all(|&m| m));
    // A fixed length below the prompt is an error, not a silent cut.
    assert!(matches!(
        tok.encode(long, 8),
        Err(Error::TooManyTokens {
            tokens: 12,
            length: 8,
            ..
        })
    ));
    assert!(matches!(
        TaskTokenizer::from_file(
            &fixtures().join(PIPELINE).join("tokenizer.json"),
            12,
            "<nope>"
        ),
        Err(Error::Tokenizer(_))
    ));
}
