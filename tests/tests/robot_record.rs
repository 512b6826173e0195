//! `zk0-agent record` as a real process against the servo emulator on two ptys (leader and
//! follower) and two test-pattern cameras; the result checked through LeRobot 0.6.1's own
//! `LeRobotDataset` (`ZK0_LEROBOT_PYTHON`, from `eval "$(cargo xtask env)"`):
//! - 3 episodes of 2 s at 10 fps: LeRobot loads them and decodes every frame; each episode
//!   has fps × time frames; every action is a leader position normalized as LeRobot does,
//!   one leader read per frame (the emulated hand moves the leader a known step per read);
//!   each camera's decoded frames carry consecutive indices (no drop, no duplicate);
//! - SIGTERM mid-episode: a clean exit, the episodes saved before intact and loadable;
//! - Ctrl-C (SIGINT to the process group, ffmpeg included) during a save: the save finishes;
//! - a leader servo that stops answering, a camera that disappears: an error naming the part,
//!   no panic, the episodes saved before intact.
//!
//! Without the venv the LeRobot half is skipped (the Rust reader still checks the dataset),
//! except under `CI`, where that fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use zk0_e2e::{bin, ensure_built, lerobot_python, wait_for, ChildGuard};
use zk0_robot::arm::{ArmSpec, Motor};
use zk0_robot::camera::decode_pattern;
use zk0_robot::normalize::normalize;
use zk0_robot::sim::{self, PtyEmulator, Servos, Sweep};
use zk0_robot::{ArmModel, Calibration, Role};

const FPS: u32 = 10;
const EPISODE_S: f64 = 2.0;
const FRAMES: usize = 20;
/// Raw steps the leader's joint `id` moves per read.
fn step(id: u8) -> f64 {
    2.0 + f64::from(id)
}
const LEADER_HOMING: i64 = 25;

fn motors() -> Vec<Motor> {
    ArmSpec::new(ArmModel::So101, Role::Leader).motors(true)
}

fn leader_calibration() -> Calibration {
    let mut c = sim::calibration(&motors());
    for (_, m) in &mut c.motors {
        m.homing_offset = LEADER_HOMING;
    }
    c
}

/// The two emulated arms and the agent's config pointing at them.
struct Rig {
    leader: PtyEmulator,
    _follower: PtyEmulator,
    dir: tempfile::TempDir,
}

impl Rig {
    fn start(cameras: &str) -> Rig {
        let mut leader = Servos::new(1..=6);
        for id in 1..=6 {
            let sweep = Sweep {
                lo: 1500.0,
                hi: 2600.0,
                step: step(id),
            };
            leader.set_sweep(id, Some(sweep));
        }
        let leader = PtyEmulator::start(leader).expect("leader pty");
        let follower = PtyEmulator::start(Servos::new(1..=6)).expect("follower pty");
        let dir = tempfile::tempdir().unwrap();
        let cal = dir.path().join("calibration");
        let spec = |r| ArmSpec::new(ArmModel::So101, r);
        leader_calibration()
            .save(&spec(Role::Leader).calibration_path(&cal, "lead"))
            .unwrap();
        sim::calibration(&motors())
            .save(&spec(Role::Follower).calibration_path(&cal, "follow"))
            .unwrap();
        let config = format!(
            "[robot]\ntype = \"so101\"\nfollower_port = \"{}\"\nleader_port = \"{}\"\nfollower_id = \"follow\"\nleader_id = \"lead\"\ncalibration_dir = \"{}\"\n{BUS}{cameras}",
            follower.path(),
            leader.path(),
            cal.display()
        );
        std::fs::write(dir.path().join("agent.toml"), config).unwrap();
        Rig {
            leader,
            _follower: follower,
            dir,
        }
    }

    fn dataset(&self) -> PathBuf {
        self.dir.path().join("dataset")
    }

    fn record(&self, episodes: usize) -> Command {
        ensure_built().expect("build zk0-agent");
        let mut cmd = Command::new(bin("zk0-agent"));
        cmd.arg("record")
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .arg("--dataset")
            .arg(self.dataset())
            .args(["--repo-id", "test/recording", "--task", "pick the cube"])
            .args(["--episodes", &episodes.to_string()])
            .args(["--episode-time-s", &EPISODE_S.to_string()])
            .args(["--reset-time-s", "0.3", "--fps", &FPS.to_string()])
            .env("RUST_LOG", "info");
        cmd
    }

    /// Runs the agent in the background (output to a log file) until `saved` episodes are
    /// saved, then `then` further into the run.
    fn spawn_until(&self, saved: usize, then: Duration) -> (ChildGuard, PathBuf) {
        let log = self.dir.path().join("agent.log");
        let child = ChildGuard::spawn("zk0-agent record", self.record(5), &log).unwrap();
        wait_for(Duration::from_secs(120), "saved episodes", || {
            (self.saved_episodes() >= saved).then_some(())
        })
        .unwrap();
        std::thread::sleep(then);
        (child, log)
    }

    /// Waits for the background agent's exit: its status and log, which never holds a panic.
    fn finish(&self, mut child: ChildGuard, log: &Path) -> (std::process::ExitStatus, String) {
        let st = child.wait_timeout(Duration::from_secs(30)).unwrap();
        let text = std::fs::read_to_string(log).unwrap();
        assert!(!text.contains("panicked"), "{text}");
        (st, text)
    }

    fn saved_episodes(&self) -> usize {
        lerobot_dataset::Info::load(&self.dataset())
            .map(|i| i.total_episodes)
            .unwrap_or(0)
    }
}

/// Four recordings, their encoders and LeRobot run at once on a small machine: a pty reply
/// can take longer than LeRobot's 50 ms, which is not what these tests are about.
const BUS: &str = "bus_timeout_ms = 300\n";

const TWO_CAMERAS: &str =
    "[[robot.cameras]]\nname = \"front\"\nwidth = 96\nheight = 72\nfps = 10\n\
[[robot.cameras]]\nname = \"wrist\"\nwidth = 64\nheight = 64\nfps = 10\n";

fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("zk0-agent record still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// LeRobot's view of the dataset, with each camera's frames as raw RGB.
struct Loaded {
    json: Value,
    frames: Vec<(String, Vec<u8>)>,
}

fn load_with_lerobot(py: &Path, root: &Path) -> Loaded {
    let out_dir = tempfile::tempdir().unwrap();
    let script = zk0_e2e::workspace_root().join("tests/py/load_recording.py");
    let out = Command::new(py)
        .arg(&script)
        .arg(root)
        .arg(out_dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", out_dir.path().join("hf"))
        .output()
        .expect("run LeRobot python");
    assert!(
        out.status.success(),
        "LeRobot could not load {}: {}\n{}",
        root.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let json: Value = serde_json::from_str(text.trim().lines().last().unwrap()).unwrap();
    let frames = json["camera_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let k = k.as_str().unwrap().to_string();
            let bytes = std::fs::read(out_dir.path().join(format!("{k}.rgb"))).unwrap();
            (k, bytes)
        })
        .collect();
    Loaded { json, frames }
}

/// Every check on a dataset of `episodes` complete episodes, through LeRobot. `retries`:
/// the leader bus's retried reads in the run (each moved the emulated hand once more).
fn check_with_lerobot(py: &Path, root: &Path, episodes: usize, retries: u64) {
    let l = load_with_lerobot(py, root);
    let j = &l.json;
    assert_eq!(j["num_episodes"], episodes);
    assert_eq!(j["fps"], FPS);
    assert_eq!(j["robot_type"], "so_follower");
    let names: Vec<String> = motors().iter().map(|m| format!("{}.pos", m.name)).collect();
    assert_eq!(j["names"]["action"], serde_json::json!(names));
    assert_eq!(j["names"]["observation.state"], serde_json::json!(names));
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), episodes * FRAMES);

    // Frame count per episode: fps × episode time (± 1 allowed; the loop makes it exact).
    for ep in 0..episodes {
        let n = rows.iter().filter(|r| r["episode_index"] == ep).count();
        assert!(n.abs_diff(FRAMES) <= 1, "episode {ep} has {n} frames");
    }

    // Actions: the leader's raw positions (Present = actual - homing) normalized with the
    // leader's calibration, one read per frame: consecutive raws differ by ± the joint's step
    // (more only where the bus retried a read, as its counter says).
    let cal = leader_calibration();
    let mut extra = vec![0u64; 6];
    for ep in 0..episodes {
        let ep_rows: Vec<&Value> = rows.iter().filter(|r| r["episode_index"] == ep).collect();
        let mut prev: Option<Vec<i64>> = None;
        for r in &ep_rows {
            assert_eq!(r["task"], "pick the cube");
            let action: Vec<f64> = serde_json::from_value(r["action"].clone()).unwrap();
            let raw: Vec<i64> = motors()
                .iter()
                .zip(&action)
                .map(|(m, a)| {
                    let c = cal.get(m.name).unwrap();
                    // Invert the normalization, then check it maps back to the stored value.
                    let candidates = (c.range_min..=c.range_max).filter(|r| {
                        normalize(m.name, m.norm_mode, c, *r).unwrap() as f32 == *a as f32
                    });
                    let raws: Vec<i64> = candidates.collect();
                    assert_eq!(
                        raws.len(),
                        1,
                        "{}: {a} is not one normalized position",
                        m.name
                    );
                    let lo = 1500 - LEADER_HOMING;
                    let hi = 2600 - LEADER_HOMING;
                    assert!(
                        (lo..=hi).contains(&raws[0]),
                        "{}: raw {} off the sweep",
                        m.name,
                        raws[0]
                    );
                    raws[0]
                })
                .collect();
            if let Some(p) = &prev {
                for (((m, a), b), x) in motors().iter().zip(p).zip(&raw).zip(&mut extra) {
                    let st = step(m.id) as i64;
                    let what = format!(
                        "episode {ep} frame {}: {} moved {a} -> {b}",
                        r["frame_index"], m.name
                    );
                    let d = (a - b).abs();
                    assert_eq!(d % st, 0, "{what}");
                    // Two reads across a turning point can cancel out: only there may a
                    // position repeat.
                    let turning = [1500 - LEADER_HOMING, 2600 - LEADER_HOMING]
                        .iter()
                        .any(|t| (b - t).abs() <= st);
                    assert!(d > 0 || turning, "{what}: the same read recorded twice");
                    *x += if d == 0 { 1 } else { (d / st - 1) as u64 };
                }
            }
            prev = Some(raw);
        }
    }

    for (m, x) in motors().iter().zip(&extra) {
        assert!(
            *x <= retries,
            "{}: {x} extra reads, {retries} retries",
            m.name
        );
    }

    // Cameras: the decoded frames carry consecutive indices within an episode and rising
    // indices across episodes.
    for (key, bytes) in &l.frames {
        let shape = &j["shapes"][key];
        let (h, w) = (
            shape[0].as_u64().unwrap() as u32,
            shape[1].as_u64().unwrap() as u32,
        );
        let size = (w * h * 3) as usize;
        assert_eq!(bytes.len(), size * rows.len(), "{key}: one frame per item");
        let codes: Vec<u32> = bytes
            .chunks_exact(size)
            .enumerate()
            .map(|(i, f)| {
                decode_pattern(w, h, f)
                    .unwrap_or_else(|e| panic!("{key} item {i}: {e}"))
                    .index
            })
            .collect();
        for ep in 0..episodes {
            let c = &codes[ep * FRAMES..(ep + 1) * FRAMES];
            for (i, pair) in c.windows(2).enumerate() {
                assert_eq!(
                    pair[1],
                    pair[0] + 1,
                    "{key} episode {ep} frame {}: {c:?}",
                    i + 1
                );
            }
            if ep > 0 {
                assert!(
                    c[0] > codes[ep * FRAMES - 1],
                    "{key}: episode {ep} goes back in time"
                );
            }
        }
    }
}

/// The Rust reader's view: `episodes` complete episodes, every video frame decoded and
/// carrying consecutive camera indices; and `zk0-agent dataset verify` passes (the checks
/// the agent makes before training on it).
fn check_with_rust(root: &Path, episodes: usize) {
    let verify = Command::new(bin("zk0-agent"))
        .args(["dataset", "verify"])
        .arg(root)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "dataset verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        !root.join(".recording").exists(),
        "the videos being encoded are cleaned up"
    );
    let ds = lerobot_dataset::LeRobotDataset::open(root).expect("open the dataset");
    assert_eq!(ds.episodes().len(), episodes);
    assert_eq!(ds.len(), episodes * FRAMES);
    let keys = ds.camera_keys();
    assert_eq!(
        keys,
        ["observation.images.front", "observation.images.wrist"]
    );
    for ep in 0..episodes {
        for key in &keys {
            let frames = ds.decode_episode(ep, key).expect("decode the episode");
            assert_eq!(frames.len(), FRAMES, "{key} episode {ep}");
            let codes: Vec<u32> = frames
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    decode_pattern(f.width(), f.height(), f.as_raw())
                        .unwrap_or_else(|e| panic!("{key} episode {ep} frame {i}: {e}"))
                        .index
                })
                .collect();
            for pair in codes.windows(2) {
                assert_eq!(pair[1], pair[0] + 1, "{key} episode {ep}: {codes:?}");
            }
        }
    }
}

/// The summary line in a log of stdout and stderr.
fn summary_in(log: &str) -> Value {
    let line = log.lines().rev().find(|l| l.starts_with('{'));
    serde_json::from_str(line.unwrap_or("")).unwrap_or_else(|e| panic!("no summary ({e}):\n{log}"))
}

fn leader_retries(s: &Value) -> u64 {
    s["buses"]["leader"]["retries"].as_u64().unwrap()
}

fn summary(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim().lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "no summary line ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn records_three_episodes_lerobot_loads() {
    let py = lerobot_python();
    let rig = Rig::start(TWO_CAMERAS);
    let out = run_bounded(rig.record(3), Duration::from_secs(180));
    assert!(
        out.status.success(),
        "record failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&out);
    assert_eq!(s["saved"], serde_json::json!([FRAMES, FRAMES, FRAMES]));
    assert_eq!(s["interrupted"], false);
    for cam in ["front", "wrist"] {
        assert_eq!(s["cameras"][cam]["frames"], 3 * FRAMES, "{s}");
    }
    check_with_rust(&rig.dataset(), 3);
    if let Some(py) = py {
        check_with_lerobot(&py, &rig.dataset(), 3, leader_retries(&s));
    }
}

#[test]
fn sigterm_mid_episode_keeps_the_saved_ones() {
    let py = lerobot_python();
    let rig = Rig::start(TWO_CAMERAS);
    // 0.3 s of reset, then 0.6 s into the third episode's 2 s.
    let (child, log) = rig.spawn_until(2, Duration::from_millis(900));
    child.signal("TERM");
    let (st, text) = rig.finish(child, &log);
    assert!(st.success(), "exit {st} after SIGTERM:\n{text}");
    assert!(text.contains("SIGTERM"), "{text}");
    let s = summary_in(&text);
    assert_eq!(s["interrupted"], true);
    assert_eq!(s["saved"], serde_json::json!([FRAMES, FRAMES]));
    assert_eq!(rig.saved_episodes(), 2);
    check_with_rust(&rig.dataset(), 2);
    if let Some(py) = py {
        check_with_lerobot(&py, &rig.dataset(), 2, leader_retries(&s));
    }
}

#[test]
fn ctrl_c_during_a_save_finishes_the_save() {
    use std::os::unix::process::CommandExt;
    let py = lerobot_python();
    let rig = Rig::start(TWO_CAMERAS);
    let log = rig.dir.path().join("agent.log");
    let mut cmd = rig.record(5);
    // Its own group, as a shell job: Ctrl-C signals the whole group, ffmpeg children too.
    cmd.process_group(0);
    let child = ChildGuard::spawn("zk0-agent record", cmd, &log).unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let start = Instant::now();
    while !read().contains("saving episode 1") {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no second save:\n{}",
            read()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let group = format!("-{}", child.child.id());
    assert!(Command::new("kill")
        .args(["-INT", "--", &group])
        .status()
        .unwrap()
        .success());
    let (st, text) = rig.finish(child, &log);
    assert!(st.success(), "exit {st} after Ctrl-C:\n{text}");
    assert!(text.contains("SIGINT"), "{text}");
    let s = summary_in(&text);
    assert_eq!(s["saved"], serde_json::json!([FRAMES, FRAMES]), "{s}");
    assert_eq!(rig.saved_episodes(), 2);
    check_with_rust(&rig.dataset(), 2);
    if let Some(py) = py {
        check_with_lerobot(&py, &rig.dataset(), 2, leader_retries(&s));
    }
}

#[test]
fn servo_that_stops_answering_is_named_and_saved_episodes_stay() {
    let py = lerobot_python();
    let rig = Rig::start(TWO_CAMERAS);
    let (child, log) = rig.spawn_until(1, Duration::from_millis(800));
    rig.leader
        .servos()
        .lock()
        .unwrap()
        .faults_mut(3)
        .unwrap()
        .silent = true;
    let (st, text) = rig.finish(child, &log);
    assert!(!st.success(), "a dead servo must fail the run:\n{text}");
    assert!(
        text.contains("leader arm") && text.contains("elbow_flex"),
        "the error names the arm and the motor:\n{text}"
    );
    assert!(text.contains("episode(s) saved before are kept"), "{text}");
    let s = summary_in(&text);
    assert!(s["error"].as_str().unwrap().contains("elbow_flex"), "{s}");
    assert!(
        s["buses"]["leader"]["timeouts"].as_u64().unwrap() > 0,
        "counted: {s}"
    );
    assert_eq!(s["saved"], serde_json::json!([FRAMES]));
    assert_eq!(rig.saved_episodes(), 1);
    check_with_rust(&rig.dataset(), 1);
    if let Some(py) = py {
        check_with_lerobot(&py, &rig.dataset(), 1, leader_retries(&s));
    }
}

#[test]
fn camera_that_disappears_is_named_and_saved_episodes_stay() {
    // The wrist camera dies 1.5 episodes in (frames keep coming during save and reset, so
    // allow for those: 20 + reset 3 + save time at 10 fps, then half an episode).
    let cams = TWO_CAMERAS.replace("name = \"wrist\"\n", "name = \"wrist\"\nfail_after = 60\n");
    let rig = Rig::start(&cams);
    let out = run_bounded(rig.record(5), Duration::from_secs(180));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a lost camera must fail the run:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    assert!(text.contains("camera wrist: lost"), "{text}");
    let saved = rig.saved_episodes();
    assert!((1..=2).contains(&saved), "{saved} saved:\n{text}");
    let s = summary(&out);
    assert_eq!(s["saved"].as_array().unwrap().len(), saved, "{s}");
    check_with_rust(&rig.dataset(), saved);
    if let Some(py) = lerobot_python() {
        check_with_lerobot(&py, &rig.dataset(), saved, leader_retries(&s));
    }
}
