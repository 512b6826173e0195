//! SO-100 / SO-101 followers and leaders as LeRobot 0.6.1 drives them
//! (`robots/so_follower`, `teleoperators/so_leader`, `motors/feetech`): the same motors, the
//! same handshake, the same `configure()` register writes in the same order, normalized
//! positions, and the `max_relative_target` safety clamp.

use std::path::{Path, PathBuf};

use crate::calibration::{Calibration, CalibrationError, MotorCalibration};
use crate::feetech::table::{self, Register};
use crate::feetech::{Bus, BusConfig, BusError, Transport};
use crate::normalize::{normalize, unnormalize, NormError, NormMode};

/// The arm's joints, ids 1..6, as LeRobot names them.
pub const MOTOR_NAMES: [&str; 6] = [
    "shoulder_pan",
    "shoulder_lift",
    "elbow_flex",
    "wrist_flex",
    "wrist_roll",
    "gripper",
];
/// The joint LeRobot does not record a range for: it gets the full turn 0..4095.
pub const FULL_TURN_MOTOR: &str = "wrist_roll";
/// LeRobot's motor model key for every SO arm motor.
pub const MOTOR_MODEL: &str = "sts3215";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArmModel {
    So100,
    So101,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    Leader,
}

/// Which arm: model and role. Both models share LeRobot's one implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmSpec {
    pub model: ArmModel,
    pub role: Role,
}

impl ArmSpec {
    pub const fn new(model: ArmModel, role: Role) -> Self {
        Self { model, role }
    }

    /// LeRobot's registered config type, e.g. `so101_follower`.
    pub fn type_name(&self) -> &'static str {
        match (self.model, self.role) {
            (ArmModel::So100, Role::Follower) => "so100_follower",
            (ArmModel::So101, Role::Follower) => "so101_follower",
            (ArmModel::So100, Role::Leader) => "so100_leader",
            (ArmModel::So101, Role::Leader) => "so101_leader",
        }
    }

    /// LeRobot's class `name`: the calibration folder and the dataset `robot_type`.
    pub fn lerobot_name(&self) -> &'static str {
        match self.role {
            Role::Follower => "so_follower",
            Role::Leader => "so_leader",
        }
    }

    /// `<root>/robots/so_follower/<id>.json` or `<root>/teleoperators/so_leader/<id>.json`.
    pub fn calibration_path(&self, root: &Path, id: &str) -> PathBuf {
        let kind = match self.role {
            Role::Follower => "robots",
            Role::Leader => "teleoperators",
        };
        root.join(kind)
            .join(self.lerobot_name())
            .join(format!("{id}.json"))
    }

    /// The six motors; `use_degrees` picks joints 1..5's mode (LeRobot's default: true).
    pub fn motors(&self, use_degrees: bool) -> Vec<Motor> {
        MOTOR_NAMES
            .iter()
            .zip(1u8..)
            .map(|(name, id)| Motor {
                name,
                id,
                model: MOTOR_MODEL,
                norm_mode: match (*name, use_degrees) {
                    ("gripper", _) => NormMode::Range0To100,
                    (_, true) => NormMode::Degrees,
                    (_, false) => NormMode::RangeM100To100,
                },
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Motor {
    pub name: &'static str,
    pub id: u8,
    pub model: &'static str,
    pub norm_mode: NormMode,
}

/// `max_relative_target`: one cap for every joint, or one per joint (keys must be exactly the
/// motor names, as LeRobot requires).
#[derive(Debug, Clone, PartialEq)]
pub enum MaxRelativeTarget {
    All(f64),
    PerMotor(Vec<(String, f64)>),
}

/// LeRobot's `SOFollowerConfig` / `SOLeaderConfig` fields that reach the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmConfig {
    pub spec: ArmSpec,
    pub use_degrees: bool,
    /// Follower only.
    pub max_relative_target: Option<MaxRelativeTarget>,
    pub position_p_coefficient: u8,
    pub position_i_coefficient: u8,
    pub position_d_coefficient: u8,
    /// Follower only; a leader always drops torque on disconnect.
    pub disable_torque_on_disconnect: bool,
}

impl ArmConfig {
    /// LeRobot's defaults.
    pub fn new(spec: ArmSpec) -> Self {
        Self {
            spec,
            use_degrees: true,
            max_relative_target: None,
            position_p_coefficient: 16,
            position_i_coefficient: 0,
            position_d_coefficient: 32,
            disable_torque_on_disconnect: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("motors missing or of the wrong model: {0}")]
    Motors(String),
    #[error("motors have different firmware versions: {0}")]
    Firmware(String),
    #[error("no calibration loaded for this arm")]
    NotCalibrated,
    #[error("calibration has no entry for motor {0}")]
    MissingCalibration(String),
    #[error(transparent)]
    Norm(#[from] NormError),
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    #[error("{0} values given for {1} motors")]
    Length(usize, usize),
    #[error("max_relative_target keys {0:?} must be exactly the motor names")]
    ClampKeys(Vec<String>),
}

/// One arm on its own bus.
#[derive(Debug)]
pub struct Arm<T> {
    config: ArmConfig,
    motors: Vec<Motor>,
    bus: Bus<T>,
    calibration: Option<Calibration>,
}

impl<T: Transport> Arm<T> {
    pub fn new(config: ArmConfig, transport: T, bus_config: BusConfig) -> Self {
        let motors = config.spec.motors(config.use_degrees);
        let mut bus = Bus::new(transport, bus_config);
        bus.set_names(motors.iter().map(|m| (m.id, m.name.to_string())));
        Self {
            config,
            motors,
            bus,
            calibration: None,
        }
    }

    pub fn motors(&self) -> &[Motor] {
        &self.motors
    }

    pub fn bus(&self) -> &Bus<T> {
        &self.bus
    }

    pub fn bus_mut(&mut self) -> &mut Bus<T> {
        &mut self.bus
    }

    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    /// Uses `c` for normalization (LeRobot: the file loaded at start).
    pub fn set_calibration(&mut self, c: Calibration) {
        self.calibration = Some(c);
    }

    /// `(name, id)` of each motor, for [`Calibration::load`].
    pub fn motor_ids(&self) -> Vec<(&'static str, u8)> {
        self.motors.iter().map(|m| (m.name, m.id)).collect()
    }

    fn ids(&self) -> Vec<u8> {
        self.motors.iter().map(|m| m.id).collect()
    }

    /// LeRobot's handshake: PING + Model_Number of every motor (all checked before failing),
    /// then both firmware version bytes of each, which must agree.
    pub fn connect(&mut self) -> Result<(), ArmError> {
        let mut wrong = vec![];
        for m in &self.motors {
            match self.bus.ping(m.id) {
                Ok(table::STS3215_MODEL) => {}
                Ok(model) => wrong.push(format!("{} (id {}) is model {model}", m.name, m.id)),
                Err(e @ (BusError::Timeout { .. } | BusError::Corrupt { .. })) => {
                    wrong.push(format!("{} (id {}): {e}", m.name, m.id))
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !wrong.is_empty() {
            return Err(ArmError::Motors(wrong.join("; ")));
        }
        let mut versions = vec![];
        for m in &self.motors {
            let major = self.bus.read(m.id, &table::FIRMWARE_MAJOR_VERSION)?;
            let minor = self.bus.read(m.id, &table::FIRMWARE_MINOR_VERSION)?;
            versions.push((m.name, major, minor));
        }
        if versions
            .windows(2)
            .any(|w| (w[0].1, w[0].2) != (w[1].1, w[1].2))
        {
            let list: Vec<String> = versions
                .iter()
                .map(|(n, a, b)| format!("{n} {a}.{b}"))
                .collect();
            return Err(ArmError::Firmware(list.join(", ")));
        }
        Ok(())
    }

    /// The calibration the motors hold: per motor Min/Max_Position_Limit and Homing_Offset.
    pub fn read_calibration(&mut self) -> Result<Calibration, ArmError> {
        let mut motors = Vec::with_capacity(self.motors.len());
        for m in self.motors.clone() {
            let range_min = self.bus.read(m.id, &table::MIN_POSITION_LIMIT)?;
            let range_max = self.bus.read(m.id, &table::MAX_POSITION_LIMIT)?;
            let homing_offset = self.bus.read(m.id, &table::HOMING_OFFSET)?;
            motors.push((
                m.name.to_string(),
                MotorCalibration {
                    id: m.id,
                    drive_mode: 0,
                    homing_offset,
                    range_min,
                    range_max,
                },
            ));
        }
        Ok(Calibration { motors })
    }

    /// LeRobot's `is_calibrated`: the motors hold the loaded calibration's offsets and limits.
    pub fn is_calibrated(&mut self) -> Result<bool, ArmError> {
        let Some(want) = self.calibration.clone() else {
            return Ok(false);
        };
        let have = self.read_calibration()?;
        Ok(have.motors.iter().all(|(name, h)| {
            want.get(name).is_some_and(|w| {
                (w.homing_offset, w.range_min, w.range_max)
                    == (h.homing_offset, h.range_min, h.range_max)
            })
        }))
    }

    /// Writes per motor Homing_Offset, Min_Position_Limit, Max_Position_Limit, and keeps `c`.
    pub fn write_calibration(&mut self, c: &Calibration) -> Result<(), ArmError> {
        for (name, m) in &c.motors {
            let id = self.motor(name)?.id;
            self.bus.write(id, &table::HOMING_OFFSET, m.homing_offset)?;
            self.bus
                .write(id, &table::MIN_POSITION_LIMIT, m.range_min)?;
            self.bus
                .write(id, &table::MAX_POSITION_LIMIT, m.range_max)?;
        }
        self.calibration = Some(c.clone());
        Ok(())
    }

    fn motor(&self, name: &str) -> Result<Motor, ArmError> {
        self.motors
            .iter()
            .find(|m| m.name == name)
            .copied()
            .ok_or_else(|| ArmError::MissingCalibration(name.to_string()))
    }

    fn write_each(&mut self, writes: &[(Register, i64)]) -> Result<(), ArmError> {
        for id in self.ids() {
            for (reg, v) in writes {
                self.bus.write(id, reg, *v)?;
            }
        }
        Ok(())
    }

    /// Per motor Torque_Enable = 1, then Lock = 1.
    pub fn enable_torque(&mut self) -> Result<(), ArmError> {
        self.write_each(&[(table::TORQUE_ENABLE, 1), (table::LOCK, 1)])
    }

    /// Per motor Torque_Enable = 0, then Lock = 0.
    pub fn disable_torque(&mut self) -> Result<(), ArmError> {
        self.write_each(&[(table::TORQUE_ENABLE, 0), (table::LOCK, 0)])
    }

    /// LeRobot's `configure_motors`: no return delay, full acceleration, angle feedback mode off.
    fn configure_motors(&mut self) -> Result<(), ArmError> {
        for id in self.ids() {
            self.bus.write(id, &table::RETURN_DELAY_TIME, 0)?;
            self.bus.write(id, &table::MAXIMUM_ACCELERATION, 254)?;
            self.bus.write(id, &table::ACCELERATION, 254)?;
            let phase = self.bus.read(id, &table::PHASE)?;
            if phase & 0x10 != 0 {
                self.bus.write(id, &table::PHASE, phase & !0x10)?;
            }
        }
        Ok(())
    }

    /// `SOFollower.configure()` / `SOLeader.configure()`, register for register.
    pub fn configure(&mut self) -> Result<(), ArmError> {
        self.disable_torque()?;
        self.configure_motors()?;
        match self.config.spec.role {
            Role::Leader => self.write_each(&[(table::OPERATING_MODE, 0)]),
            Role::Follower => {
                let c = &self.config;
                let (p, i, d) = (
                    c.position_p_coefficient.into(),
                    c.position_i_coefficient.into(),
                    c.position_d_coefficient.into(),
                );
                for m in self.motors.clone() {
                    self.bus.write(m.id, &table::OPERATING_MODE, 0)?;
                    self.bus.write(m.id, &table::P_COEFFICIENT, p)?;
                    self.bus.write(m.id, &table::I_COEFFICIENT, i)?;
                    self.bus.write(m.id, &table::D_COEFFICIENT, d)?;
                    if m.name == "gripper" {
                        // Keeps the gripper from burning out when it grips.
                        self.bus.write(m.id, &table::MAX_TORQUE_LIMIT, 500)?;
                        self.bus.write(m.id, &table::PROTECTION_CURRENT, 250)?;
                        self.bus.write(m.id, &table::OVERLOAD_TORQUE, 25)?;
                    }
                }
                self.enable_torque()
            }
        }
    }

    fn calibrated(&self, m: &Motor) -> Result<MotorCalibration, ArmError> {
        let c = self.calibration.as_ref().ok_or(ArmError::NotCalibrated)?;
        c.get(m.name)
            .copied()
            .ok_or_else(|| ArmError::MissingCalibration(m.name.to_string()))
    }

    /// Present_Position of every motor, normalized (LeRobot's observation / leader action).
    pub fn read_positions(&mut self) -> Result<Vec<f64>, ArmError> {
        let raw = self.bus.sync_read(&table::PRESENT_POSITION, &self.ids())?;
        self.motors
            .iter()
            .zip(raw)
            .map(|(m, r)| Ok(normalize(m.name, m.norm_mode, &self.calibrated(m)?, r)?))
            .collect()
    }

    /// Sends normalized goals (one per motor, in motor order) and returns what was sent: with
    /// `max_relative_target`, each goal is first clamped to `present ± cap` (an extra sync read).
    pub fn send_action(&mut self, goals: &[f64]) -> Result<Vec<f64>, ArmError> {
        if goals.len() != self.motors.len() {
            return Err(ArmError::Length(goals.len(), self.motors.len()));
        }
        let mut goals = goals.to_vec();
        if let Some(cap) = self.config.max_relative_target.clone() {
            let caps = self.caps(&cap)?;
            let present = self.read_positions()?;
            for ((g, p), c) in goals.iter_mut().zip(present).zip(caps) {
                *g = clamp_relative(*g, p, c);
            }
        }
        let mut raw = Vec::with_capacity(goals.len());
        for (m, g) in self.motors.iter().zip(&goals) {
            raw.push((
                m.id,
                unnormalize(m.name, m.norm_mode, &self.calibrated(m)?, *g)?,
            ));
        }
        self.bus.sync_write(&table::GOAL_POSITION, &raw)?;
        Ok(goals)
    }

    fn caps(&self, cap: &MaxRelativeTarget) -> Result<Vec<f64>, ArmError> {
        match cap {
            MaxRelativeTarget::All(c) => Ok(vec![*c; self.motors.len()]),
            MaxRelativeTarget::PerMotor(per) => {
                let mut keys: Vec<&str> = per.iter().map(|(k, _)| k.as_str()).collect();
                keys.sort_unstable();
                let mut names: Vec<&str> = self.motors.iter().map(|m| m.name).collect();
                names.sort_unstable();
                if keys != names {
                    return Err(ArmError::ClampKeys(
                        per.iter().map(|(k, _)| k.clone()).collect(),
                    ));
                }
                Ok(self
                    .motors
                    .iter()
                    .filter_map(|m| per.iter().find(|(k, _)| k == m.name).map(|(_, c)| *c))
                    .collect())
            }
        }
    }

    /// Drops torque (a follower only when `disable_torque_on_disconnect`) and gives back the
    /// transport.
    pub fn disconnect(mut self) -> Result<T, ArmError> {
        if self.config.spec.role == Role::Leader || self.config.disable_torque_on_disconnect {
            self.disable_torque()?;
        }
        Ok(self.bus.into_transport())
    }
}

/// LeRobot's `ensure_safe_goal_position` for one joint.
pub fn clamp_relative(goal: f64, present: f64, cap: f64) -> f64 {
    let diff = (goal - present).min(cap).max(-cap);
    present + diff
}
