//! The agent config's `[robot]` section, and the arms and cameras it opens.
//!
//! ```toml
//! [robot]
//! type = "so101"                    # so100 | so101
//! follower_port = "/dev/ttyACM0"    # "sim": the servo emulator, in this process
//! leader_port = "/dev/ttyACM1"
//! follower_id = "follower"          # calibration file names, as LeRobot's --robot.id
//! leader_id = "leader"
//! calibration_dir = ""              # empty: LeRobot's ($HF_LEROBOT_CALIBRATION, …)
//! max_relative_target = 20.0        # optional follower safety clamp, per tick
//! bus_timeout_ms = 50               # fixed part of each bus transaction's deadline (LeRobot's)
//!
//! [[robot.cameras]]
//! name = "front"                    # → observation.images.front
//! kind = "test-pattern"             # test-pattern | v4l2 (not built yet)
//! width = 640
//! height = 480
//! fps = 30
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zk0_robot::arm::MaxRelativeTarget;
use zk0_robot::camera::{Camera, TestPattern, TestPatternConfig};
use zk0_robot::control::{prepare, Teleop};
use zk0_robot::sim::{self, Servos, SimTransport, Sweep};
use zk0_robot::{
    Arm, ArmConfig, ArmModel, ArmSpec, BusConfig, Calibration, Role, SerialTransport, Transport,
};

use super::{RecordError, Rig};

/// The port name that selects the in-process emulator.
pub const SIM_PORT: &str = "sim";

/// The smallest frame side libsvtav1 (the dataset's encoder) accepts.
pub const MIN_VIDEO_SIDE: u32 = 64;

/// Any bus: a serial port or the emulator.
pub type AnyTransport = Box<dyn Transport + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RobotType {
    So100,
    #[default]
    So101,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CameraKind {
    #[default]
    TestPattern,
    V4l2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CameraConfig {
    pub name: String,
    pub kind: CameraKind,
    /// V4L2 device (`/dev/video0`).
    pub device: String,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    /// Test pattern only: fail after this many frames, as an unplugged camera (fault drills).
    pub fail_after: Option<u64>,
}

impl Default for CameraConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: CameraKind::TestPattern,
            device: String::new(),
            width: 640,
            height: 480,
            fps: 30.0,
            fail_after: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RobotConfig {
    #[serde(rename = "type")]
    pub robot_type: RobotType,
    pub follower_port: String,
    pub leader_port: String,
    pub follower_id: String,
    pub leader_id: String,
    pub calibration_dir: PathBuf,
    pub max_relative_target: Option<f64>,
    /// Fixed part of each transaction's deadline (LeRobot: 50 ms); more for a slow adapter.
    pub bus_timeout_ms: u64,
    pub cameras: Vec<CameraConfig>,
}

impl Default for RobotConfig {
    fn default() -> Self {
        Self {
            robot_type: RobotType::So101,
            follower_port: "/dev/ttyACM0".into(),
            leader_port: "/dev/ttyACM1".into(),
            follower_id: "follower".into(),
            leader_id: "leader".into(),
            calibration_dir: PathBuf::new(),
            max_relative_target: None,
            bus_timeout_ms: 50,
            cameras: Vec::new(),
        }
    }
}

fn setup(part: impl Into<String>, reason: impl std::fmt::Display) -> RecordError {
    RecordError::Setup {
        part: part.into(),
        reason: reason.to_string(),
    }
}

impl RobotConfig {
    /// Both ports to the emulator (`--sim`).
    pub fn simulated(mut self) -> Self {
        self.follower_port = SIM_PORT.into();
        self.leader_port = SIM_PORT.into();
        self
    }

    pub fn model(&self) -> ArmModel {
        match self.robot_type {
            RobotType::So100 => ArmModel::So100,
            RobotType::So101 => ArmModel::So101,
        }
    }

    pub fn port(&self, role: Role) -> &str {
        match role {
            Role::Follower => &self.follower_port,
            Role::Leader => &self.leader_port,
        }
    }

    pub fn id(&self, role: Role) -> &str {
        match role {
            Role::Follower => &self.follower_id,
            Role::Leader => &self.leader_id,
        }
    }

    pub fn validate(&self) -> Result<(), RecordError> {
        for role in [Role::Follower, Role::Leader] {
            let part = role_name(role);
            if self.port(role).is_empty() {
                return Err(setup(format!("{part} arm"), "no port configured"));
            }
            if !valid_name(self.id(role)) {
                return Err(setup(
                    format!("{part} arm"),
                    format!("id {:?} must be letters, digits, '_' or '-'", self.id(role)),
                ));
            }
        }
        if !(1..=5000).contains(&self.bus_timeout_ms) {
            return Err(setup(
                "bus",
                format!(
                    "bus_timeout_ms must be in 1..=5000, got {}",
                    self.bus_timeout_ms
                ),
            ));
        }
        if let Some(c) = self.max_relative_target {
            if !(c.is_finite() && c > 0.0) {
                return Err(setup(
                    "follower arm",
                    format!("max_relative_target must be positive, got {c}"),
                ));
            }
        }
        for (i, c) in self.cameras.iter().enumerate() {
            if !valid_name(&c.name) {
                return Err(setup(
                    format!("camera #{}", i + 1),
                    format!("name {:?} must be letters, digits, '_' or '-'", c.name),
                ));
            }
            if self.cameras[..i].iter().any(|o| o.name == c.name) {
                return Err(setup(format!("camera {}", c.name), "name used twice"));
            }
            if c.width < MIN_VIDEO_SIDE || c.height < MIN_VIDEO_SIDE {
                // Caught here rather than by ffmpeg after the first episode.
                return Err(setup(
                    format!("camera {}", c.name),
                    format!(
                        "{}x{} is smaller than the AV1 encoder's {MIN_VIDEO_SIDE}x{MIN_VIDEO_SIDE}",
                        c.width, c.height
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Where `role`'s calibration file is (LeRobot's layout under the calibration root).
    pub fn calibration_path(&self, role: Role) -> Result<PathBuf, RecordError> {
        let root = if self.calibration_dir.as_os_str().is_empty() {
            zk0_robot::calibration::calibration_root().map_err(|e| setup("calibration", e))?
        } else {
            self.calibration_dir.clone()
        };
        Ok(ArmSpec::new(self.model(), role).calibration_path(&root, self.id(role)))
    }

    fn bus_config(&self) -> BusConfig {
        BusConfig {
            base_timeout: std::time::Duration::from_millis(self.bus_timeout_ms),
            ..BusConfig::default()
        }
    }

    fn arm_config(&self, role: Role) -> ArmConfig {
        let mut c = ArmConfig::new(ArmSpec::new(self.model(), role));
        if role == Role::Follower {
            c.max_relative_target = self.max_relative_target.map(MaxRelativeTarget::All);
        }
        c
    }

    /// The arm on its port, not connected, without a calibration. On the emulator the
    /// leader's joints sweep (a hand moving it), and the follower's too when `hand` is set
    /// (calibrating it).
    pub fn open_bare_arm(&self, role: Role, hand: bool) -> Result<Arm<AnyTransport>, RecordError> {
        let port = self.port(role);
        let cfg = self.arm_config(role);
        let t: AnyTransport = if port == SIM_PORT {
            let mut servos = Servos::new(1..=6);
            if role == Role::Leader || hand {
                for id in 1..=6u8 {
                    let step = 2.0 + f64::from(id);
                    servos.set_sweep(
                        id,
                        Some(Sweep {
                            lo: 1400.0,
                            hi: 2700.0,
                            step,
                        }),
                    );
                }
            }
            Box::new(SimTransport::new(servos))
        } else {
            let part = format!("{} arm ({port})", role_name(role));
            Box::new(
                SerialTransport::open(port, BusConfig::default().baud)
                    .map_err(|e| setup(part, format!("cannot open the port: {e}")))?,
            )
        };
        Ok(Arm::new(cfg, t, self.bus_config()))
    }

    /// The arm on its port, not connected yet, and the calibration it is to use: from its
    /// file, or the emulator's.
    pub fn open_arm(&self, role: Role) -> Result<(Arm<AnyTransport>, Calibration), RecordError> {
        let port = self.port(role);
        let part = format!("{} arm ({port})", role_name(role));
        let arm = self.open_bare_arm(role, false)?;
        if port == SIM_PORT {
            let cal = sim::calibration(arm.motors());
            return Ok((arm, cal));
        }
        let path = self.calibration_path(role)?;
        if !path.exists() {
            return Err(setup(
                part,
                format!(
                    "no calibration at {}: run `zk0-agent calibrate --arm {}` first",
                    path.display(),
                    role_name(role)
                ),
            ));
        }
        let cal = Calibration::load(&path, &arm.motor_ids()).map_err(|e| setup(part, e))?;
        Ok((arm, cal))
    }

    /// An arm opened, handshaken, calibrated and configured as LeRobot's `connect()` does.
    pub fn connect_arm(&self, role: Role) -> Result<Arm<AnyTransport>, RecordError> {
        let (mut arm, cal) = self.open_arm(role)?;
        let part = format!("{} arm ({})", role_name(role), self.port(role));
        let written = prepare(&mut arm, cal).map_err(|e| setup(part.clone(), e))?;
        if written && self.port(role) != SIM_PORT {
            tracing::warn!(arm = %part, "the motors did not hold the calibration file's values: wrote the file's to them");
        }
        Ok(arm)
    }

    /// Leader, then follower (LeRobot's order), then the cameras.
    pub fn connect(&self) -> Result<Rig<AnyTransport, AnyTransport>, RecordError> {
        self.validate()?;
        let leader = self.connect_arm(Role::Leader)?;
        let follower = self.connect_arm(Role::Follower)?;
        let cameras = self.start_cameras()?;
        Ok(Rig {
            teleop: Teleop::new(leader, follower),
            cameras,
        })
    }

    pub fn start_cameras(&self) -> Result<Vec<Camera>, RecordError> {
        self.cameras.iter().map(start_camera).collect()
    }
}

fn start_camera(c: &CameraConfig) -> Result<Camera, RecordError> {
    let part = format!("camera {}", c.name);
    match c.kind {
        CameraKind::TestPattern => {
            let src = TestPattern::new(TestPatternConfig {
                width: c.width,
                height: c.height,
                fps: c.fps,
                fail_after: c.fail_after,
            })
            .map_err(|e| setup(part.clone(), e))?;
            Camera::start(&c.name, Box::new(src)).map_err(|e| setup(part, e))
        }
        CameraKind::V4l2 => {
            Err(setup(
                part,
                format!(
                "V4L2 capture ({}) is not built into this agent yet; use kind = \"test-pattern\"",
                if c.device.is_empty() { "no device" } else { &c.device }
            ),
            ))
        }
    }
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Follower => "follower",
        Role::Leader => "leader",
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// `HF_LEROBOT_HOME`-style default for `--repo-id` without `--dataset`.
pub fn default_dataset_root(repo_id: &str) -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let home = env("HF_LEROBOT_HOME")
        .or_else(|| env("HF_HOME").map(|h| h.join("lerobot")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/huggingface/lerobot")))?;
    Some(home.join(Path::new(repo_id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robot_section_parses_and_bad_values_are_named() {
        let c: RobotConfig = toml::from_str(
            r#"
type = "so100"
follower_port = "sim"
leader_port = "sim"
[[cameras]]
name = "front"
width = 64
height = 64
fps = 10
[[cameras]]
name = "wrist"
kind = "v4l2"
device = "/dev/video0"
"#,
        )
        .unwrap();
        assert_eq!(c.robot_type, RobotType::So100);
        assert_eq!(c.cameras[1].kind, CameraKind::V4l2);
        c.validate().unwrap();
        let e = start_camera(&c.cameras[1]).unwrap_err().to_string();
        assert!(e.starts_with("camera wrist:") && e.contains("V4L2"), "{e}");
        assert!(toml::from_str::<RobotConfig>("colour = 1").is_err());

        let mut bad = c.clone();
        bad.cameras[1].name = "front".into();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("camera front") && e.contains("twice"), "{e}");
        bad.cameras[1].name = "a b".into();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("camera #2"));
        let mut bad = c.clone();
        bad.bus_timeout_ms = 0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("bus_timeout_ms"));
        let mut bad = c;
        bad.follower_id = "../x".into();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("follower arm"));
    }

    #[test]
    fn real_port_without_calibration_says_what_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let c = RobotConfig {
            calibration_dir: dir.path().into(),
            follower_port: "/nonexistent/ttyACM9".into(),
            ..RobotConfig::default()
        };
        let Err(e) = c.open_arm(Role::Follower) else {
            panic!("opened a port that does not exist");
        };
        let e = e.to_string();
        assert!(e.contains("follower arm (/nonexistent/ttyACM9)"), "{e}");
        let p = c.calibration_path(Role::Follower).unwrap();
        assert!(
            p.ends_with("robots/so_follower/follower.json"),
            "{}",
            p.display()
        );
    }
}
