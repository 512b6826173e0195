//! `zk0-agent infer` against LeRobot itself: the same checkpoint exported by `zk0-train
//! export-onnx`, the same episode, the same noise. LeRobot runs its preprocessor,
//! `predict_action_chunk` and postprocessor (tests/py/lerobot_infer.py); zk0 runs the ONNX
//! export through ONNX Runtime with its own libtorch-free preprocessing. One camera with the
//! checkpoint's own processors (the pipeline fixture's model on the LeRobot-made dataset), and
//! two cameras of different sizes with statistics from a zk0-recorded dataset.

use std::path::{Path, PathBuf};
use std::process::Command;

use zk0_e2e::{bin, ensure_built, lerobot_python, run_ok, synth_dataset, workspace_root};

fn fixtures() -> PathBuf {
    workspace_root().join("tests/fixtures")
}

/// A float32 or int64 tensor of a safetensors file, as f64 values with its shape.
fn tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
    let v = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        d => panic!("{name}: dtype {d:?}"),
    };
    (t.shape().to_vec(), v)
}

fn copy_dir_files(from: &Path, to: &Path, keep: impl Fn(&str) -> bool) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_str().unwrap().to_string();
        if p.is_file() && keep(&n) {
            std::fs::copy(&p, to.join(&n)).unwrap();
        }
    }
}

/// Exports `checkpoint`, runs LeRobot and `zk0-agent infer` on episode `episode` of
/// `dataset`, and compares the unnormalized chunks. Returns (max |Δaction| relative to the
/// largest |action|, max |Δpixel|): unnormalized actions are in joint units (degrees, up to
/// ~100), so 1e-4 in the normalized space the model works in is ~1e-3 here.
fn compare(
    label: &str,
    py: &Path,
    checkpoint: &Path,
    dataset: &Path,
    episode: usize,
    work: &Path,
) -> (f64, f64) {
    let tok = fixtures().join("smolvla-tiny/pipeline/tokenizer.json");
    let export = work.join("export");
    run_ok(
        Command::new(bin("zk0-train"))
            .args(["--threads", "1", "export-onnx", "--model"])
            .arg(checkpoint)
            .arg("--tokenizer")
            .arg(&tok)
            .arg("--out")
            .arg(&export),
    )
    .unwrap();
    let (noise, theirs, ours) = (
        work.join("noise.safetensors"),
        work.join("lerobot.safetensors"),
        work.join("zk0.safetensors"),
    );
    let script = workspace_root().join("tests/py/lerobot_infer.py");
    let lr = run_ok(
        Command::new(py)
            .arg(&script)
            .arg("--model")
            .arg(checkpoint)
            .arg("--dataset")
            .arg(dataset)
            .args(["--episode", &episode.to_string()])
            .arg("--tokenizer")
            .arg(&tok)
            .arg("--noise")
            .arg(&noise)
            .arg("--out")
            .arg(&theirs),
    )
    .unwrap();
    eprintln!("{label}: LeRobot {}", lr.trim());
    let report = run_ok(
        Command::new(bin("zk0-agent"))
            .args(["infer", "--threads", "1", "--model"])
            .arg(&export)
            .arg("--dataset")
            .arg(dataset)
            .args(["--episode", &episode.to_string()])
            .arg("--noise")
            .arg(&noise)
            .arg("--out")
            .arg(&ours),
    )
    .unwrap();
    eprintln!("{label}: zk0-agent infer {}", report.trim());
    let r: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    let (sa, a) = tensor(&theirs, "actions");
    let (sb, b) = tensor(&ours, "actions");
    assert_eq!(sa, sb, "{label}: actions shape");
    assert_eq!(
        tensor(&theirs, "frame_index"),
        tensor(&ours, "frame_index"),
        "{label}: frames"
    );
    assert_eq!(r["predictions"].as_u64().unwrap() as usize, sa[0]);
    assert!(sa[0] >= 2, "{label}: {sa:?}: want several predictions");
    let max_action = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let spread = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(spread > 1e-3, "{label}: LeRobot's actions are all ~0");
    // The camera frames LeRobot decoded, against ours: the same pixels up to a decoder level.
    let ds = lerobot_dataset::LeRobotDataset::open(dataset).unwrap();
    let mut max_px = 0f64;
    let (_, frames) = tensor(&theirs, "frame_index");
    for key in ds.camera_keys() {
        let (shape, px) = tensor(&theirs, &format!("frames.{key}"));
        let per = shape[1..].iter().product::<usize>();
        for (i, f) in frames.iter().enumerate() {
            let img = &ds.get_episode_frame(episode, *f as usize).unwrap().images[&key];
            let (h, w) = (img.height() as usize, img.width() as usize);
            for (j, lp) in px[i * per..(i + 1) * per].iter().enumerate() {
                let (c, y, x) = (j / (h * w), (j / w) % h, j % w);
                let ours = img.get_pixel(x as u32, y as u32)[c] as f64 / 255.0;
                max_px = max_px.max((ours - lp).abs());
            }
        }
    }
    eprintln!("{label}: max |Δaction| {max_action:.3e} (|action| up to {spread:.2}), max |Δpixel| {max_px:.3e}");
    (max_action / spread.max(1.0), max_px)
}

#[test]
fn infer_reproduces_lerobot_predict_action_chunk_with_one_and_two_cameras() {
    let Some(py) = lerobot_python() else { return };
    ensure_built().unwrap();
    let tmp = tempfile::tempdir().unwrap();

    // One camera: the pipeline fixture's model with its LeRobot processors, on the
    // LeRobot-made dataset it was made with (episode 1: not the first).
    let pipeline = fixtures().join("smolvla-tiny/pipeline");
    let ckpt = tmp.path().join("one/checkpoint");
    copy_dir_files(&pipeline.join("model"), &ckpt, |_| true);
    copy_dir_files(&pipeline, &ckpt, |n| n.starts_with("policy_"));
    let (da, dp) = compare(
        "1 camera",
        &py,
        &ckpt,
        &fixtures().join("lerobot-v3-tiny"),
        1,
        &tmp.path().join("one"),
    );
    assert!(dp <= 1.0 / 255.0 + 1e-6, "1 camera: frames differ by {dp}");
    assert!(
        da <= 1e-5,
        "1 camera: actions differ by {da} of their range"
    );

    // Two cameras of different sizes, no processors in the checkpoint: statistics from a
    // dataset zk0 records (H.264, seeded).
    let two = fixtures().join("smolvla-two-cameras");
    let ckpt = tmp.path().join("two/checkpoint");
    copy_dir_files(&two, &ckpt, |n| {
        matches!(n, "config.json" | "model.safetensors" | "vlm_config.json")
    });
    let dataset = tmp.path().join("two/dataset");
    synth_dataset(&dataset, 2, 20, &["front:64x48", "wrist:40x64"], 3).unwrap();
    let (da, dp) = compare(
        "2 cameras",
        &py,
        &ckpt,
        &dataset,
        1,
        &tmp.path().join("two"),
    );
    assert!(dp <= 1.0 / 255.0 + 1e-6, "2 cameras: frames differ by {dp}");
    assert!(
        da <= 1e-5,
        "2 cameras: actions differ by {da} of their range"
    );
}

/// The committed export (tests/fixtures/smolvla-tiny-onnx, what `cargo xtask cross` runs
/// under qemu-aarch64) is what the exporter writes today (same graphs, same actions), and its
/// first chunk on `lerobot-v3-tiny` episode 0 with the committed noise is LeRobot's own
/// `sample.actions[0]`.
#[test]
fn committed_export_is_current_and_gives_lerobots_chunk() {
    ensure_built().unwrap();
    let fx = fixtures().join("smolvla-tiny-onnx");
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("smolvla-tiny-pipeline");
    let pipeline = fixtures().join("smolvla-tiny/pipeline");
    copy_dir_files(&pipeline.join("model"), &ckpt, |_| true);
    copy_dir_files(&pipeline, &ckpt, |n| n.starts_with("policy_"));
    let fresh = tmp.path().join("fresh");
    run_ok(
        Command::new(bin("zk0-train"))
            .current_dir(tmp.path())
            .args([
                "export-onnx",
                "--model",
                "smolvla-tiny-pipeline",
                "--tokenizer",
            ])
            .arg(pipeline.join("tokenizer.json"))
            .arg("--out")
            .arg(&fresh),
    )
    .unwrap();
    // The same graphs (names, shapes, node counts, processing), up to the file hashes: the
    // constants libtorch computes at export (RoPE and time-embedding tables) may differ in the
    // last bit on another CPU's vector code.
    let manifest = |d: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("export.json")).unwrap()).unwrap();
        for g in ["prefix", "denoise"] {
            let o = v[g].as_object_mut().unwrap();
            o.remove("sha256");
            o.remove("data_sha256");
        }
        v
    };
    assert_eq!(
        manifest(&fresh),
        manifest(&fx),
        "tests/fixtures/smolvla-tiny-onnx is stale: regenerate it (see its README.md)"
    );
    let infer = |model: &Path, out: &Path| {
        run_ok(
            Command::new(bin("zk0-agent"))
                .args(["infer", "--threads", "1", "--episode", "0", "--model"])
                .arg(model)
                .arg("--dataset")
                .arg(fixtures().join("lerobot-v3-tiny"))
                .arg("--noise")
                .arg(fx.join("noise.safetensors"))
                .arg("--out")
                .arg(out),
        )
        .unwrap();
        tensor(out, "actions")
    };
    let (shape, ours) = infer(&fx, &tmp.path().join("pred.safetensors"));
    let (_, fresh_actions) = infer(&fresh, &tmp.path().join("fresh.safetensors"));
    let drift = ours
        .iter()
        .zip(&fresh_actions)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        drift <= 1e-4,
        "the committed export's actions differ from a fresh export's by {drift}"
    );
    let (lshape, theirs) = tensor(&pipeline.join("expected.safetensors"), "sample.actions");
    let per = lshape[1] * lshape[2];
    assert_eq!(&shape[1..], &lshape[1..]);
    let max = ours[..per]
        .iter()
        .zip(&theirs[..per])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let spread = theirs[..per].iter().fold(0.0f64, |m, x| m.max(x.abs()));
    eprintln!("committed export vs LeRobot sample.actions[0]: max |Δ| {max:.3e} (|action| up to {spread:.1})");
    assert!(max <= 1e-5 * spread.max(1.0), "max |Δ| {max}");
}
