//! The STS3215 control table as LeRobot 0.6.1 uses it (`motors/feetech/tables.py`,
//! `STS_SMS_SERIES_CONTROL_TABLE`), and its sign-magnitude registers.
//!
//! Addresses 0..=39 are EPROM (persistent, written with torque off and Lock = 0), 40 and up SRAM.
//! Values are little-endian on the wire; a few registers keep a sign in one bit
//! (`STS_SMS_SERIES_ENCODINGS_TABLE`): Homing_Offset bit 11, Present_Load bit 10, positions and
//! velocities bit 15.

/// Model_Number of an STS3215.
pub const STS3215_MODEL: u16 = 777;
/// Encoder steps per turn of an STS3215 (`MODEL_RESOLUTION`); raw positions are `0..=4095`.
pub const STS3215_RESOLUTION: u32 = 4096;
/// The highest raw position, LeRobot's `max_res`.
pub const MAX_RES: i32 = STS3215_RESOLUTION as i32 - 1;

/// One register: name as LeRobot spells it, address, size in bytes, and the sign bit of its
/// sign-magnitude encoding, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Register {
    pub name: &'static str,
    pub addr: u8,
    pub size: u8,
    pub sign_bit: Option<u8>,
}

/// A value that does not fit a register.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{register}: {value} does not fit {bits} magnitude bits and a sign")]
    SignMagnitude {
        register: &'static str,
        value: i64,
        bits: u8,
    },
    #[error("{register}: negative value {value} in an unsigned register")]
    Negative { register: &'static str, value: i64 },
    #[error("{register}: {value} does not fit {size} byte(s)")]
    TooLarge {
        register: &'static str,
        value: i64,
        size: u8,
    },
}

const fn reg(name: &'static str, addr: u8, size: u8) -> Register {
    Register {
        name,
        addr,
        size,
        sign_bit: None,
    }
}

const fn signed(name: &'static str, addr: u8, size: u8, bit: u8) -> Register {
    Register {
        name,
        addr,
        size,
        sign_bit: Some(bit),
    }
}

pub const FIRMWARE_MAJOR_VERSION: Register = reg("Firmware_Major_Version", 0, 1);
pub const FIRMWARE_MINOR_VERSION: Register = reg("Firmware_Minor_Version", 1, 1);
pub const MODEL_NUMBER: Register = reg("Model_Number", 3, 2);
pub const ID: Register = reg("ID", 5, 1);
pub const BAUD_RATE: Register = reg("Baud_Rate", 6, 1);
pub const RETURN_DELAY_TIME: Register = reg("Return_Delay_Time", 7, 1);
pub const RESPONSE_STATUS_LEVEL: Register = reg("Response_Status_Level", 8, 1);
pub const MIN_POSITION_LIMIT: Register = reg("Min_Position_Limit", 9, 2);
pub const MAX_POSITION_LIMIT: Register = reg("Max_Position_Limit", 11, 2);
pub const MAX_TEMPERATURE_LIMIT: Register = reg("Max_Temperature_Limit", 13, 1);
pub const MAX_VOLTAGE_LIMIT: Register = reg("Max_Voltage_Limit", 14, 1);
pub const MIN_VOLTAGE_LIMIT: Register = reg("Min_Voltage_Limit", 15, 1);
pub const MAX_TORQUE_LIMIT: Register = reg("Max_Torque_Limit", 16, 2);
pub const PHASE: Register = reg("Phase", 18, 1);
pub const UNLOADING_CONDITION: Register = reg("Unloading_Condition", 19, 1);
pub const LED_ALARM_CONDITION: Register = reg("LED_Alarm_Condition", 20, 1);
pub const P_COEFFICIENT: Register = reg("P_Coefficient", 21, 1);
pub const D_COEFFICIENT: Register = reg("D_Coefficient", 22, 1);
pub const I_COEFFICIENT: Register = reg("I_Coefficient", 23, 1);
pub const MINIMUM_STARTUP_FORCE: Register = reg("Minimum_Startup_Force", 24, 2);
pub const CW_DEAD_ZONE: Register = reg("CW_Dead_Zone", 26, 1);
pub const CCW_DEAD_ZONE: Register = reg("CCW_Dead_Zone", 27, 1);
pub const PROTECTION_CURRENT: Register = reg("Protection_Current", 28, 2);
pub const ANGULAR_RESOLUTION: Register = reg("Angular_Resolution", 30, 1);
pub const HOMING_OFFSET: Register = signed("Homing_Offset", 31, 2, 11);
pub const OPERATING_MODE: Register = reg("Operating_Mode", 33, 1);
pub const PROTECTIVE_TORQUE: Register = reg("Protective_Torque", 34, 1);
pub const PROTECTION_TIME: Register = reg("Protection_Time", 35, 1);
pub const OVERLOAD_TORQUE: Register = reg("Overload_Torque", 36, 1);
pub const VELOCITY_P_COEFFICIENT: Register =
    reg("Velocity_closed_loop_P_proportional_coefficient", 37, 1);
pub const OVER_CURRENT_PROTECTION_TIME: Register = reg("Over_Current_Protection_Time", 38, 1);
pub const VELOCITY_I_COEFFICIENT: Register =
    reg("Velocity_closed_loop_I_integral_coefficient", 39, 1);
pub const TORQUE_ENABLE: Register = reg("Torque_Enable", 40, 1);
pub const ACCELERATION: Register = reg("Acceleration", 41, 1);
pub const GOAL_POSITION: Register = signed("Goal_Position", 42, 2, 15);
pub const GOAL_TIME: Register = reg("Goal_Time", 44, 2);
pub const GOAL_VELOCITY: Register = signed("Goal_Velocity", 46, 2, 15);
pub const TORQUE_LIMIT: Register = reg("Torque_Limit", 48, 2);
pub const LOCK: Register = reg("Lock", 55, 1);
pub const PRESENT_POSITION: Register = signed("Present_Position", 56, 2, 15);
pub const PRESENT_VELOCITY: Register = signed("Present_Velocity", 58, 2, 15);
pub const PRESENT_LOAD: Register = signed("Present_Load", 60, 2, 10);
pub const PRESENT_VOLTAGE: Register = reg("Present_Voltage", 62, 1);
pub const PRESENT_TEMPERATURE: Register = reg("Present_Temperature", 63, 1);
pub const STATUS: Register = reg("Status", 65, 1);
pub const MOVING: Register = reg("Moving", 66, 1);
pub const PRESENT_CURRENT: Register = reg("Present_Current", 69, 2);
pub const GOAL_POSITION_2: Register = reg("Goal_Position_2", 71, 2);
pub const MOVING_VELOCITY: Register = reg("Moving_Velocity", 80, 1);
pub const DTS: Register = reg("DTs", 81, 1);
pub const VELOCITY_UNIT_FACTOR: Register = reg("Velocity_Unit_factor", 82, 1);
pub const HTS: Register = reg("Hts", 83, 1);
pub const MAXIMUM_VELOCITY_LIMIT: Register = reg("Maximum_Velocity_Limit", 84, 1);
pub const MAXIMUM_ACCELERATION: Register = reg("Maximum_Acceleration", 85, 1);
/// LeRobot's key has a trailing space: `"Acceleration_Multiplier "`.
pub const ACCELERATION_MULTIPLIER: Register = reg("Acceleration_Multiplier ", 86, 1);

/// Every register, in address order.
pub const CONTROL_TABLE: &[Register] = &[
    FIRMWARE_MAJOR_VERSION,
    FIRMWARE_MINOR_VERSION,
    MODEL_NUMBER,
    ID,
    BAUD_RATE,
    RETURN_DELAY_TIME,
    RESPONSE_STATUS_LEVEL,
    MIN_POSITION_LIMIT,
    MAX_POSITION_LIMIT,
    MAX_TEMPERATURE_LIMIT,
    MAX_VOLTAGE_LIMIT,
    MIN_VOLTAGE_LIMIT,
    MAX_TORQUE_LIMIT,
    PHASE,
    UNLOADING_CONDITION,
    LED_ALARM_CONDITION,
    P_COEFFICIENT,
    D_COEFFICIENT,
    I_COEFFICIENT,
    MINIMUM_STARTUP_FORCE,
    CW_DEAD_ZONE,
    CCW_DEAD_ZONE,
    PROTECTION_CURRENT,
    ANGULAR_RESOLUTION,
    HOMING_OFFSET,
    OPERATING_MODE,
    PROTECTIVE_TORQUE,
    PROTECTION_TIME,
    OVERLOAD_TORQUE,
    VELOCITY_P_COEFFICIENT,
    OVER_CURRENT_PROTECTION_TIME,
    VELOCITY_I_COEFFICIENT,
    TORQUE_ENABLE,
    ACCELERATION,
    GOAL_POSITION,
    GOAL_TIME,
    GOAL_VELOCITY,
    TORQUE_LIMIT,
    LOCK,
    PRESENT_POSITION,
    PRESENT_VELOCITY,
    PRESENT_LOAD,
    PRESENT_VOLTAGE,
    PRESENT_TEMPERATURE,
    STATUS,
    MOVING,
    PRESENT_CURRENT,
    GOAL_POSITION_2,
    MOVING_VELOCITY,
    DTS,
    VELOCITY_UNIT_FACTOR,
    HTS,
    MAXIMUM_VELOCITY_LIMIT,
    MAXIMUM_ACCELERATION,
    ACCELERATION_MULTIPLIER,
];

/// The register LeRobot calls `name` (exact spelling).
pub fn by_name(name: &str) -> Option<Register> {
    CONTROL_TABLE.iter().copied().find(|r| r.name == name)
}

/// The register starting at `addr`.
pub fn by_addr(addr: u8) -> Option<Register> {
    CONTROL_TABLE.iter().copied().find(|r| r.addr == addr)
}

/// LeRobot's `encode_sign_magnitude`: `(v < 0) << bit | |v|`.
pub fn encode_sign_magnitude(value: i64, bit: u8) -> Option<u32> {
    let max = (1i64 << bit) - 1;
    let mag = value.checked_abs()?;
    (mag <= max).then(|| (u32::from(value < 0) << bit) | mag as u32)
}

/// LeRobot's `decode_sign_magnitude`: magnitude below `bit`, sign at `bit`, higher bits ignored.
pub fn decode_sign_magnitude(raw: u32, bit: u8) -> i32 {
    let mag = (raw & ((1u32 << bit) - 1)) as i32;
    if (raw >> bit) & 1 == 1 {
        -mag
    } else {
        mag
    }
}

impl Register {
    pub fn is_eprom(&self) -> bool {
        self.addr < 40
    }

    /// The raw register value for `value`: sign-magnitude where the register has a sign bit,
    /// then checked against the register size (LeRobot's `_encode_sign` + `_serialize_data`).
    pub fn encode(&self, value: i64) -> Result<u32, ValueError> {
        let raw = match self.sign_bit {
            Some(bits) => encode_sign_magnitude(value, bits).ok_or(ValueError::SignMagnitude {
                register: self.name,
                value,
                bits,
            })?,
            None if value < 0 => {
                return Err(ValueError::Negative {
                    register: self.name,
                    value,
                })
            }
            None => u32::try_from(value).map_err(|_| self.too_large(value))?,
        };
        if self.size < 4 && raw >> (8 * u32::from(self.size)) != 0 {
            return Err(self.too_large(value));
        }
        Ok(raw)
    }

    fn too_large(&self, value: i64) -> ValueError {
        ValueError::TooLarge {
            register: self.name,
            value,
            size: self.size,
        }
    }

    /// The value of a raw register (sign decoded where the register has a sign bit).
    pub fn decode(&self, raw: u32) -> i64 {
        match self.sign_bit {
            Some(bit) => i64::from(decode_sign_magnitude(raw, bit)),
            None => i64::from(raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_magnitude_as_lerobot() {
        assert_eq!(HOMING_OFFSET.encode(-1011), Ok(0x0BF3));
        assert_eq!(HOMING_OFFSET.decode(0x0BF3), -1011);
        assert_eq!(PRESENT_POSITION.decode(0x8010), -16);
        assert_eq!(GOAL_POSITION.encode(2048), Ok(2048));
        assert!(matches!(
            HOMING_OFFSET.encode(2048),
            Err(ValueError::SignMagnitude { bits: 11, .. })
        ));
        assert!(matches!(
            TORQUE_ENABLE.encode(-1),
            Err(ValueError::Negative { .. })
        ));
        assert!(matches!(
            TORQUE_ENABLE.encode(256),
            Err(ValueError::TooLarge { size: 1, .. })
        ));
        assert_eq!(encode_sign_magnitude(i64::MIN, 15), None);
        for v in -2047..=2047 {
            assert_eq!(HOMING_OFFSET.decode(HOMING_OFFSET.encode(v).unwrap()), v);
        }
    }

    #[test]
    fn table_is_sorted_unique_and_found_by_name() {
        for w in CONTROL_TABLE.windows(2) {
            assert!(
                w[0].addr + w[0].size <= w[1].addr,
                "{:?} overlaps {:?}",
                w[0],
                w[1]
            );
        }
        assert_eq!(by_name("Present_Position"), Some(PRESENT_POSITION));
        assert_eq!(by_addr(42), Some(GOAL_POSITION));
        assert_eq!(by_name("Acceleration_Multiplier"), None);
        assert!(HOMING_OFFSET.is_eprom() && !TORQUE_ENABLE.is_eprom());
    }
}
