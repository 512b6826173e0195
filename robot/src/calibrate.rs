//! LeRobot's calibration procedure (`SOFollower.calibrate` = `SOLeader.calibrate`) as a pure
//! state machine: events in (the user's ENTERs, raw position reads), commands out (register
//! writes, reads, prompts, the file to save). [`Calibrator::run_step`] executes commands on an
//! [`Arm`]; tests drive it from the emulator, moving joints "by hand" between events.
//!
//! 1. torque off, Operating_Mode = 0 for every motor; prompt: middle pose.
//! 2. ENTER: reset (Homing_Offset = 0, Min = 0, Max = 4095 per motor), read raw positions,
//!    `homing_offset = position - 2047`, written per motor; the middle pose then reads ~2047.
//! 3. Raw positions read over and over while the user moves each joint through its range;
//!    min and max tracked for every motor except `wrist_roll` (which gets 0..4095).
//! 4. ENTER: a motor that never moved (min == max) is an error; otherwise per motor
//!    Homing_Offset, Min_Position_Limit, Max_Position_Limit are written and the file saved.

use crate::arm::{Arm, ArmError, Motor, FULL_TURN_MOTOR};
use crate::calibration::{Calibration, MotorCalibration};
use crate::feetech::table::{self, Register, MAX_RES};
use crate::feetech::Transport;

/// What the procedure asks of the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prompt {
    MoveToMiddle,
    MoveThroughRanges,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Write {
        id: u8,
        register: Register,
        value: i64,
    },
    /// Sync read raw Present_Position of every motor, answered with [`Event::Positions`].
    ReadPositions,
    Prompt(Prompt),
    /// The result: write nothing more, save this file.
    Save(Calibration),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The user pressed ENTER.
    Enter,
    /// Raw positions, one per motor in motor order.
    Positions(Vec<i64>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalibrateError {
    #[error("motor {0} did not move: its range min and max are equal")]
    NoRange(String),
    #[error("{got} positions for {expected} motors")]
    Length { expected: usize, got: usize },
    #[error("event {0} is not expected now")]
    Unexpected(&'static str),
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    New,
    AtMiddle,
    ReadingMiddle,
    Recording {
        homing: Vec<i64>,
        mins: Vec<i64>,
        maxes: Vec<i64>,
        started: bool,
    },
    Done,
}

/// The procedure for one arm.
#[derive(Debug, Clone)]
pub struct Calibrator {
    motors: Vec<Motor>,
    state: State,
}

impl Calibrator {
    pub fn new(motors: &[Motor]) -> Self {
        Self {
            motors: motors.to_vec(),
            state: State::New,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn writes(&self, regs: &[(Register, i64)]) -> Vec<Command> {
        self.motors
            .iter()
            .flat_map(|m| {
                regs.iter().map(|(register, value)| Command::Write {
                    id: m.id,
                    register: *register,
                    value: *value,
                })
            })
            .collect()
    }

    /// The first commands: torque off, position mode, ask for the middle pose.
    pub fn start(&mut self) -> Vec<Command> {
        self.state = State::AtMiddle;
        let mut out = self.writes(&[(table::TORQUE_ENABLE, 0), (table::LOCK, 0)]);
        out.extend(self.writes(&[(table::OPERATING_MODE, 0)]));
        out.push(Command::Prompt(Prompt::MoveToMiddle));
        out
    }

    pub fn on_event(&mut self, event: Event) -> Result<Vec<Command>, CalibrateError> {
        let state = std::mem::replace(&mut self.state, State::Done);
        let (next, out) = self.step(state.clone(), event);
        self.state = match &out {
            Ok(_) => next,
            Err(_) => state,
        };
        out
    }

    fn step(&self, state: State, event: Event) -> (State, Result<Vec<Command>, CalibrateError>) {
        match (state, event) {
            (State::AtMiddle, Event::Enter) => {
                let mut out = self.writes(&[
                    (table::HOMING_OFFSET, 0),
                    (table::MIN_POSITION_LIMIT, 0),
                    (table::MAX_POSITION_LIMIT, i64::from(MAX_RES)),
                ]);
                out.push(Command::ReadPositions);
                (State::ReadingMiddle, Ok(out))
            }
            (State::ReadingMiddle, Event::Positions(p)) => {
                if let Err(e) = self.check_len(&p) {
                    return (State::ReadingMiddle, Err(e));
                }
                // LeRobot's `_get_half_turn_homings`: position - int(max_res / 2).
                let homing: Vec<i64> = p.iter().map(|v| v - i64::from(MAX_RES / 2)).collect();
                let mut out: Vec<Command> = self
                    .motors
                    .iter()
                    .zip(&homing)
                    .map(|(m, h)| Command::Write {
                        id: m.id,
                        register: table::HOMING_OFFSET,
                        value: *h,
                    })
                    .collect();
                out.push(Command::Prompt(Prompt::MoveThroughRanges));
                out.push(Command::ReadPositions);
                let n = self.motors.len();
                let recording = State::Recording {
                    homing,
                    mins: vec![0; n],
                    maxes: vec![0; n],
                    started: false,
                };
                (recording, Ok(out))
            }
            (
                State::Recording {
                    homing,
                    mut mins,
                    mut maxes,
                    started,
                },
                Event::Positions(p),
            ) => {
                if let Err(e) = self.check_len(&p) {
                    return (
                        State::Recording {
                            homing,
                            mins,
                            maxes,
                            started,
                        },
                        Err(e),
                    );
                }
                for ((lo, hi), v) in mins.iter_mut().zip(maxes.iter_mut()).zip(&p) {
                    (*lo, *hi) = if started {
                        ((*lo).min(*v), (*hi).max(*v))
                    } else {
                        (*v, *v)
                    };
                }
                let next = State::Recording {
                    homing,
                    mins,
                    maxes,
                    started: true,
                };
                (next, Ok(vec![Command::ReadPositions]))
            }
            (
                State::Recording {
                    homing,
                    mins,
                    maxes,
                    started,
                },
                Event::Enter,
            ) => {
                let mut motors = Vec::with_capacity(self.motors.len());
                for (i, m) in self.motors.iter().enumerate() {
                    let (lo, hi) = if m.name == FULL_TURN_MOTOR {
                        (0, i64::from(MAX_RES))
                    } else {
                        (mins[i], maxes[i])
                    };
                    if lo == hi {
                        let again = State::Recording {
                            homing,
                            mins,
                            maxes,
                            started,
                        };
                        return (again, Err(CalibrateError::NoRange(m.name.to_string())));
                    }
                    let c = MotorCalibration {
                        id: m.id,
                        drive_mode: 0,
                        homing_offset: homing[i],
                        range_min: lo,
                        range_max: hi,
                    };
                    motors.push((m.name.to_string(), c));
                }
                let calibration = Calibration { motors };
                let mut out = Vec::new();
                for (_, c) in &calibration.motors {
                    for (register, value) in [
                        (table::HOMING_OFFSET, c.homing_offset),
                        (table::MIN_POSITION_LIMIT, c.range_min),
                        (table::MAX_POSITION_LIMIT, c.range_max),
                    ] {
                        out.push(Command::Write {
                            id: c.id,
                            register,
                            value,
                        });
                    }
                }
                out.push(Command::Save(calibration));
                (State::Done, Ok(out))
            }
            (s, Event::Enter) => (s, Err(CalibrateError::Unexpected("ENTER"))),
            (s, Event::Positions(_)) => (s, Err(CalibrateError::Unexpected("positions"))),
        }
    }

    fn check_len(&self, p: &[i64]) -> Result<(), CalibrateError> {
        if p.len() != self.motors.len() {
            return Err(CalibrateError::Length {
                expected: self.motors.len(),
                got: p.len(),
            });
        }
        Ok(())
    }

    /// Executes `commands` on `arm`: writes and reads go to the bus; returns the positions
    /// event (if a read was asked), the prompts met, and the calibration to save (if any).
    pub fn run_step<T: Transport>(
        arm: &mut Arm<T>,
        commands: Vec<Command>,
    ) -> Result<Outcome, ArmError> {
        let mut outcome = Outcome::default();
        for c in commands {
            match c {
                Command::Write {
                    id,
                    register,
                    value,
                } => arm.bus_mut().write(id, &register, value)?,
                Command::ReadPositions => {
                    let ids: Vec<u8> = arm.motors().iter().map(|m| m.id).collect();
                    let raw = arm.bus_mut().sync_read(&table::PRESENT_POSITION, &ids)?;
                    outcome.event = Some(Event::Positions(raw));
                }
                Command::Prompt(p) => outcome.prompts.push(p),
                Command::Save(c) => {
                    arm.set_calibration(c.clone());
                    outcome.save = Some(c);
                }
            }
        }
        Ok(outcome)
    }
}

/// What [`Calibrator::run_step`] leaves for the caller.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub event: Option<Event>,
    pub prompts: Vec<Prompt>,
    pub save: Option<Calibration>,
}
