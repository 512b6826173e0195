//! SO-100 / SO-101 arms on the Feetech STS3215 bus, compatible with LeRobot 0.6.1.
//!
//! Map of the crate:
//! - [`feetech::protocol`]: instruction and status packets, checksum, error bits, and a stream
//!   decoder that returns typed errors and never panics (byte-exact against the vendor SDK's
//!   golden packets and LeRobot's own bus trace, see `tests/`).
//! - [`feetech::table`]: the STS3215 control table as LeRobot names it, sign-magnitude values.
//! - [`feetech::bus`]: [`Bus`] over any [`Transport`]: ping, read/write, sync read/write, input
//!   dropped before each transaction, LeRobot's deadline, retries, [`BusStats`] counters, and a
//!   [`BusError`] that names the motor and register.
//! - [`feetech::serial`]: [`SerialTransport`], the `serialport` crate without libudev.
//! - [`sim`]: emulated servos (homing offset, first-order motion, fault injection) in memory
//!   ([`sim::SimTransport`]) or on a pty ([`sim::PtyEmulator`]), for tests and the demo.
//! - [`arm`]: SO-100/SO-101 follower and leader ([`arm::Arm`]): LeRobot's motors, handshake,
//!   `configure()` writes in LeRobot's order, normalized positions, the safety clamp.
//! - [`normalize`]: LeRobot's degrees / -100..100 / 0..100 formulas, bit for bit.
//! - [`calibration`]: LeRobot's calibration JSON and where LeRobot keeps it.
//! - [`calibrate`]: the calibration procedure as a pure state machine.
//! - [`camera`]: [`camera::Camera`], a capture thread holding the latest frame over a
//!   [`camera::FrameSource`]; [`camera::TestPattern`], frames that carry their own index and
//!   time (and the decoder tests use). No V4L2 yet.
//! - [`control`]: the loop clock ([`control::Clock`], jitter and overrun counts), an arm's
//!   LeRobot-style `connect` ([`control::prepare`]) and the teleop step ([`control::Teleop`]).
//!
//! Nothing here links libtorch or writes datasets: the record loop joining this crate to
//! `lerobot-dataset` is `edge-agent`'s `record` module.

pub mod arm;
pub mod calibrate;
pub mod calibration;
pub mod camera;
pub mod control;
pub mod feetech;
pub mod normalize;
pub mod sim;

pub use arm::{Arm, ArmConfig, ArmError, ArmModel, ArmSpec, MaxRelativeTarget, Role};
pub use calibration::{Calibration, MotorCalibration};
pub use feetech::{Bus, BusConfig, BusError, BusStats, SerialTransport, Transport};
