//! LeRobot's position normalization (`MotorsBus._normalize` / `_unnormalize`, 0.6.1), with the
//! same float operations in the same order so values match LeRobot's to the bit.
//!
//! Only Goal_Position and Present_Position are ever normalized; other registers are raw.

use crate::calibration::MotorCalibration;
use crate::feetech::table::MAX_RES;

/// How a motor's raw steps map to the values in actions and observations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormMode {
    /// Degrees from the middle of the calibrated range, not clamped (LeRobot's default since
    /// `use_degrees = True`).
    Degrees,
    /// -100..100 over the calibrated range, clamped (`use_degrees = False`, joints 1..5).
    RangeM100To100,
    /// 0..100 over the calibrated range, clamped (the gripper).
    Range0To100,
}

/// A calibration LeRobot would also refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid calibration for motor {motor}: range_min and range_max are both {value}")]
pub struct NormError {
    pub motor: String,
    pub value: i64,
}

fn check(motor: &str, c: &MotorCalibration) -> Result<(f64, f64), NormError> {
    if c.range_min == c.range_max {
        return Err(NormError {
            motor: motor.to_string(),
            value: c.range_min,
        });
    }
    Ok((c.range_min as f64, c.range_max as f64))
}

/// Raw (sign-decoded) steps to the normalized value.
pub fn normalize(
    motor: &str,
    mode: NormMode,
    c: &MotorCalibration,
    raw: i64,
) -> Result<f64, NormError> {
    let (min, max) = check(motor, c)?;
    let drive = c.drive_mode != 0;
    // Python's `min(max_, max(min_, val))`: no panic when a file has min > max.
    let bounded = max.min(min.max(raw as f64));
    Ok(match mode {
        NormMode::RangeM100To100 => {
            let n = ((bounded - min) / (max - min)) * 200.0 - 100.0;
            if drive {
                -n
            } else {
                n
            }
        }
        NormMode::Range0To100 => {
            let n = ((bounded - min) / (max - min)) * 100.0;
            if drive {
                100.0 - n
            } else {
                n
            }
        }
        NormMode::Degrees => {
            let mid = (min + max) / 2.0;
            (raw as f64 - mid) * 360.0 / f64::from(MAX_RES)
        }
    })
}

/// The normalized value back to raw steps (truncated toward zero, as Python's `int()`).
pub fn unnormalize(
    motor: &str,
    mode: NormMode,
    c: &MotorCalibration,
    value: f64,
) -> Result<i64, NormError> {
    let (min, max) = check(motor, c)?;
    let drive = c.drive_mode != 0;
    let raw = match mode {
        NormMode::RangeM100To100 => {
            let v = if drive { -value } else { value };
            let b = v.clamp(-100.0, 100.0);
            ((b + 100.0) / 200.0) * (max - min) + min
        }
        NormMode::Range0To100 => {
            let v = if drive { 100.0 - value } else { value };
            let b = v.clamp(0.0, 100.0);
            (b / 100.0) * (max - min) + min
        }
        NormMode::Degrees => {
            let mid = (min + max) / 2.0;
            (value * f64::from(MAX_RES) / 360.0) + mid
        }
    };
    // `as` saturates (and maps NaN to 0); the register encoder then refuses what does not fit.
    Ok(raw.trunc() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cal(min: i64, max: i64, drive: u8) -> MotorCalibration {
        MotorCalibration {
            id: 1,
            drive_mode: drive,
            homing_offset: 0,
            range_min: min,
            range_max: max,
        }
    }

    #[test]
    fn values_from_the_research_note() {
        let pan = cal(757, 3375, 0);
        assert_eq!(
            normalize("p", NormMode::Degrees, &pan, 2050).unwrap(),
            -1.4065934065934067
        );
        let grip = cal(2031, 3455, 0);
        assert_eq!(
            normalize("g", NormMode::Range0To100, &grip, 2110).unwrap(),
            5.547752808988764
        );
    }

    #[test]
    fn ranges_clamp_and_drive_mode_flips() {
        use NormMode::{Range0To100 as R0, RangeM100To100 as R100};
        // (mode, drive_mode, raw, normalized): normalize(raw) == normalized.
        let forward = [
            (R100, 0, 500, -100.0),
            (R100, 0, 2000, 0.0),
            (R0, 1, 1500, 75.0),
            (R100, 1, 1500, 50.0),
        ];
        // (mode, drive_mode, normalized, raw): unnormalize(normalized) == raw, clamped.
        let back = [
            (R100, 0, 250.0, 3000),
            (R0, 0, 50.0, 2000),
            (R0, 1, 75.0, 1500),
        ];
        for (mode, drive, raw, n) in forward {
            assert_eq!(
                normalize("m", mode, &cal(1000, 3000, drive), raw).unwrap(),
                n,
                "{mode:?} {raw}"
            );
        }
        for (mode, drive, n, raw) in back {
            assert_eq!(
                unnormalize("m", mode, &cal(1000, 3000, drive), n).unwrap(),
                raw,
                "{mode:?} {n}"
            );
        }
        // Degrees are not clamped, and int() truncates toward zero.
        let c = cal(1000, 3000, 0);
        assert_eq!(
            normalize("m", NormMode::Degrees, &c, 0).unwrap(),
            -2000.0 * 360.0 / 4095.0
        );
        assert_eq!(
            unnormalize("m", NormMode::Degrees, &cal(0, 1, 0), -0.1).unwrap(),
            0
        );
        assert_eq!(
            unnormalize("m", NormMode::Degrees, &cal(0, 1, 0), -0.2).unwrap(),
            -1
        );
    }

    #[test]
    fn equal_min_and_max_is_refused() {
        let err = normalize("gripper", NormMode::Degrees, &cal(5, 5, 0), 5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid calibration for motor gripper: range_min and range_max are both 5"
        );
        assert!(unnormalize("g", NormMode::Range0To100, &cal(5, 5, 0), 1.0).is_err());
        // min > max: LeRobot's expression gives max; so do we, without panicking.
        assert_eq!(
            normalize("g", NormMode::Range0To100, &cal(3000, 1000, 0), 2000).unwrap(),
            100.0
        );
    }
}
