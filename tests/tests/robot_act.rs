//! `zk0-agent act` as a real process: the tiny SmolVLA fixture exported by `zk0-train
//! export-onnx`, normalized with a synthetic dataset's statistics, driving the emulated
//! follower (`--sim`, a test-pattern camera) at 30 fps for 60 s, stopped by SIGTERM:
//! - a clean exit (status 0) with the report written;
//! - the loop held its rate (tick count, period, p99 jitter) on one inference thread;
//! - the queue never ran dry once the first chunk was in (starved = 0), a chunk about every
//!   n_action_steps · (1 − chunk_size_threshold) ticks;
//! - the follower followed the goals (present positions near the goal sent the tick before,
//!   against the goals' span), torque off after the disconnect;
//!
//! and a camera that disappears mid-run: an error naming it, a report, a failed exit, no panic.
//!
//! `zk0-train` links libtorch and is not built by [`ensure_built`]: without it the test is
//! skipped (a failure under `CI`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use zk0_e2e::{bin, ensure_built, run_ok, synth_dataset, wait_for, workspace_root, ChildGuard};

const FPS: f64 = 30.0;
const RUN_S: u64 = 60;

/// The export and the dataset its statistics come from, in `dir`; `None` without zk0-train.
fn export(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let train = bin("zk0-train");
    if !train.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but {} is not built",
            train.display()
        );
        eprintln!("SKIPPED: {} is not built", train.display());
        return None;
    }
    ensure_built().unwrap();
    let fixture = workspace_root().join("tests/fixtures/smolvla-tiny");
    let out = dir.join("export");
    run_ok(
        Command::new(&train)
            .args(["--threads", "1", "export-onnx", "--model"])
            .arg(&fixture)
            .arg("--tokenizer")
            .arg(fixture.join("pipeline/tokenizer.json"))
            .arg("--out")
            .arg(&out),
    )
    .unwrap();
    let dataset = dir.join("dataset");
    synth_dataset(&dataset, 1, 20, &["front:64x48"], 1).unwrap();
    Some((out, dataset))
}

fn act(export: &Path, dataset: &Path, report: &Path) -> Command {
    let mut cmd = Command::new(bin("zk0-agent"));
    cmd.arg("act")
        .arg("--model")
        .arg(export)
        .arg("--dataset")
        .arg(dataset)
        .args(["--task", "pick the cube", "--threads", "1"])
        .args(["--fps", &FPS.to_string(), "--max-relative-target", "10"])
        .arg("--report")
        .arg(report)
        .env("RUST_LOG", "info");
    cmd
}

fn read_report(path: &Path, log: &str) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no report at {}: {e}\n{log}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn act_closes_the_loop_at_30_fps_and_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((export, dataset)) = export(tmp.path()) else {
        return;
    };
    let (report, log) = (tmp.path().join("report.json"), tmp.path().join("act.log"));
    let mut cmd = act(&export, &dataset, &report);
    cmd.arg("--sim");
    let mut child = ChildGuard::spawn("zk0-agent act", cmd, &log).unwrap();
    wait_for(Duration::from_secs(60), "the loop to start", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("acting").then_some(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(RUN_S));
    child.signal("TERM");
    let st = child.wait_timeout(Duration::from_secs(30)).unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "{text}");
    assert!(st.success(), "exit {st} after SIGTERM:\n{text}");
    let r = read_report(&report, &text);
    eprintln!("zk0-agent act: {r}");
    assert_eq!(r["exit_reason"], "signal", "{r}");
    assert_eq!(r["error"], Value::Null);

    // The rate held.
    let ticks = f(&r["ticks"]);
    let want = RUN_S as f64 * FPS;
    assert!(
        (ticks - want).abs() <= 0.03 * want,
        "{ticks} ticks in {RUN_S} s at {FPS} fps"
    );
    assert!((f(&r["period_ms"]["p50"]) - 1e3 / FPS).abs() < 1.0, "{r}");
    let jitter = f(&r["jitter_ms"]["p99"]);
    assert!(jitter < 10.0, "p99 jitter {jitter} ms");

    // The queue: fed from the first chunk on, a chunk about every n · (1 − g) ticks.
    assert_eq!(r["starved"], 0, "{r}");
    assert_eq!(r["busy"], 0, "{r}");
    let chunks = f(&r["chunks"]);
    let every = f(&r["n_action_steps"]) * (1.0 - f(&r["chunk_size_threshold"]));
    let per = ticks / chunks;
    assert!(
        (0.6 * every..=1.3 * every).contains(&per),
        "a chunk every {per} ticks, expected about {every}"
    );
    assert!(f(&r["inference_ms"]["p99"]) < 1e3 * every / FPS, "{r}");
    let first = f(&r["first_chunk_tick"]);
    assert!(
        f(&r["goals_sent"]) >= ticks - first - 1.0,
        "a goal every tick after the first chunk: {r}"
    );

    // The follower followed: one tick after each goal, the joints are much nearer to it than
    // the goals spread; the clamps are reported.
    let (err, span) = (f(&r["tracking_error_mean"]), f(&r["goal_span_mean"]));
    assert!(span > 1.0, "the goals barely moved: {r}");
    assert!(
        err < 0.25 * span,
        "tracking error {err} for goals spanning {span}"
    );
    assert!(r["max_clamp"].as_f64().is_some());
    assert_eq!(
        r["torque_after_disconnect"],
        serde_json::json!([0, 0, 0, 0, 0, 0])
    );
    assert_eq!(r["follower_bus"]["timeouts"], 0);
}

#[test]
fn act_reports_a_lost_camera_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((export, dataset)) = export(tmp.path()) else {
        return;
    };
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        "[robot]\nfollower_port = \"sim\"\nleader_port = \"sim\"\n\
         [[robot.cameras]]\nname = \"front\"\nwidth = 64\nheight = 64\nfps = 30\nfail_after = 45\n",
    )
    .unwrap();
    let (report, log) = (tmp.path().join("report.json"), tmp.path().join("act.log"));
    let mut cmd = act(&export, &dataset, &report);
    cmd.arg("--config").arg(&config).args(["--seconds", "20"]);
    let mut child = ChildGuard::spawn("zk0-agent act", cmd, &log).unwrap();
    let st = child.wait_timeout(Duration::from_secs(60)).unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "{text}");
    assert!(!st.success(), "a lost camera must fail the run:\n{text}");
    let r = read_report(&report, &text);
    assert_eq!(r["exit_reason"], "error");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("camera front") && e.contains("lost"), "{e}");
    assert!(f(&r["chunks"]) >= 1.0, "it ran before the camera went: {r}");
    assert_eq!(
        r["torque_after_disconnect"],
        serde_json::json!([0, 0, 0, 0, 0, 0])
    );
}
