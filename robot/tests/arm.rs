//! Arms as LeRobot drives them. The whole of `lerobot-so101-trace.json` replayed: our leader and
//! follower must send LeRobot's bytes in LeRobot's order (handshake, calibration check,
//! `configure()`, two teleop steps, disconnect) and compute LeRobot's normalized values to the
//! bit. Then the safety clamp and the calibration procedure, driven on the emulator.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::{bytes, trace};
use serde_json::Value;
use zk0_robot::arm::MOTOR_NAMES;
use zk0_robot::calibrate::{CalibrateError, Calibrator, Command, Event, Prompt};
use zk0_robot::feetech::table;
use zk0_robot::sim::{Servos, SharedServos, SimTransport};
use zk0_robot::{
    Arm, ArmConfig, ArmModel, ArmSpec, BusConfig, Calibration, MaxRelativeTarget, Role, Transport,
};

/// One bus of the trace: each write must be the next recorded instruction; its recorded reply
/// becomes readable.
struct TracePort {
    bus: &'static str,
    script: VecDeque<(usize, String, Vec<u8>, Vec<u8>)>,
    rx: VecDeque<u8>,
}

impl TracePort {
    fn new(trace: &Value, bus: &'static str) -> Self {
        let script = trace["exchanges"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, e)| e["bus"] == bus)
            .map(|(n, e)| {
                let what = format!("{} id {} {}", e["phase"], e["id"], e["what"]);
                (n, what, bytes(&e["tx"]), bytes(&e["rx"]))
            })
            .collect();
        Self {
            bus,
            script,
            rx: VecDeque::new(),
        }
    }
}

impl Transport for TracePort {
    fn write_all(&mut self, tx: &[u8]) -> std::io::Result<()> {
        let Some((n, what, want, reply)) = self.script.pop_front() else {
            panic!(
                "{}: extra instruction {} after the end of the trace",
                self.bus,
                hex::encode(tx)
            );
        };
        assert_eq!(
            hex::encode(tx),
            hex::encode(&want),
            "{} exchange #{n} ({what})",
            self.bus
        );
        self.rx.extend(reply);
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8], _: Duration) -> std::io::Result<usize> {
        let n = buf.len().min(self.rx.len());
        for (b, r) in buf.iter_mut().zip(self.rx.drain(..n)) {
            *b = r;
        }
        Ok(n)
    }

    fn clear_input(&mut self) -> std::io::Result<()> {
        self.rx.clear();
        Ok(())
    }
}

fn trace_calibration(trace: &Value) -> Calibration {
    let text = serde_json::to_string(&trace["calibration_file_example"]).unwrap();
    let ids: Vec<(&str, u8)> = MOTOR_NAMES.iter().copied().zip(1..).collect();
    Calibration::from_json(&text, &ids, "trace".as_ref()).unwrap()
}

/// The teleop values of the trace, in file order (observation, action, sent per step), each in
/// motor order. Parsed from the text with `str::parse`, which rounds correctly: serde_json's
/// default float parser can be one ulp off (its `float_roundtrip` feature is not enabled), and
/// this test compares to the bit.
fn teleop_values() -> Vec<Vec<f64>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/feetech/lerobot-so101-trace.json"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let per_motor: Vec<Vec<f64>> = MOTOR_NAMES
        .iter()
        .map(|m| {
            let key = format!("\"{m}.pos\": ");
            text.match_indices(&key)
                .map(|(at, _)| {
                    let rest = &text[at + key.len()..];
                    let end = rest.find([',', '}', '\n']).unwrap();
                    rest[..end].trim().parse::<f64>().unwrap()
                })
                .collect()
        })
        .collect();
    (0..per_motor[0].len())
        .map(|k| per_motor.iter().map(|v| v[k]).collect())
        .collect()
}

#[test]
fn leader_and_follower_replay_lerobots_trace_byte_for_byte() {
    let trace = trace();
    let cal = trace_calibration(&trace);
    let spec = |role| ArmSpec::new(ArmModel::So101, role);
    let mut leader = Arm::new(
        ArmConfig::new(spec(Role::Leader)),
        TracePort::new(&trace, "leader"),
        BusConfig::default(),
    );
    let mut follower = Arm::new(
        ArmConfig::new(spec(Role::Follower)),
        TracePort::new(&trace, "follower"),
        BusConfig::default(),
    );
    for arm in [&mut leader, &mut follower] {
        arm.connect().unwrap();
        arm.set_calibration(cal.clone());
        assert!(arm.is_calibrated().unwrap());
        arm.configure().unwrap();
    }
    let values = teleop_values();
    assert_eq!(
        values.len(),
        3 * trace["teleop_steps"].as_array().unwrap().len()
    );
    for (n, want) in values.chunks(3).enumerate() {
        // Exact equality: the same float operations in the same order as LeRobot's.
        let obs = follower.read_positions().unwrap();
        assert_eq!(obs, want[0], "step {n} observation");
        let act = leader.read_positions().unwrap();
        assert_eq!(act, want[1], "step {n} action");
        let sent = follower.send_action(&act).unwrap();
        assert_eq!(sent, want[2], "step {n} sent");
    }
    for arm in [leader, follower] {
        let port = arm.disconnect().unwrap();
        assert!(
            port.script.is_empty(),
            "{}: {} exchanges not sent",
            port.bus,
            port.script.len()
        );
    }
}

#[test]
fn calibration_types_and_paths_are_lerobots() {
    let f = ArmSpec::new(ArmModel::So100, Role::Follower);
    let l = ArmSpec::new(ArmModel::So101, Role::Leader);
    assert_eq!(
        (f.type_name(), l.type_name()),
        ("so100_follower", "so101_leader")
    );
    let root = std::path::Path::new("/c");
    assert_eq!(
        f.calibration_path(root, "arm1"),
        root.join("robots/so_follower/arm1.json")
    );
    assert_eq!(
        l.calibration_path(root, "arm1"),
        root.join("teleoperators/so_leader/arm1.json")
    );
    let m = f.motors(true);
    let names: Vec<_> = m.iter().map(|m| (m.name, m.id, m.model)).collect();
    assert_eq!(names[0], ("shoulder_pan", 1, "sts3215"));
    assert_eq!(names[5], ("gripper", 6, "sts3215"));
}

#[test]
fn calibration_json_round_trips_in_lerobots_layout() {
    let trace = trace();
    let cal = trace_calibration(&trace);
    let text = cal.to_json();
    assert!(text
        .starts_with("{\n    \"shoulder_pan\": {\n        \"id\": 1,\n        \"drive_mode\": 0,"));
    assert!(text.ends_with("\"range_max\": 3455\n    }\n}"), "{text}");
    let parsed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed, trace["calibration_file_example"]);

    let dir = tempfile::tempdir().unwrap();
    let path = ArmSpec::new(ArmModel::So101, Role::Follower).calibration_path(dir.path(), "my_arm");
    cal.save(&path).unwrap();
    let ids: Vec<(&str, u8)> = MOTOR_NAMES.iter().copied().zip(1..).collect();
    assert_eq!(Calibration::load(&path, &ids).unwrap(), cal);
    // A file for another wiring is refused with a reason, not half-used.
    let err = Calibration::load(&path, &[("shoulder_pan", 2)]).unwrap_err();
    assert!(
        err.to_string().contains("motor shoulder_pan has id 1"),
        "{err}"
    );
    std::fs::write(&path, "{\"shoulder_pan\": {\"id\": 1}}").unwrap();
    assert!(Calibration::load(&path, &ids).is_err());
}

fn sim_arm(role: Role, servos: &SharedServos) -> Arm<SimTransport> {
    let mut config = ArmConfig::new(ArmSpec::new(ArmModel::So100, role));
    if role == Role::Follower {
        config.max_relative_target = Some(MaxRelativeTarget::All(5.0));
    }
    Arm::new(
        config,
        SimTransport::shared(servos.clone()),
        BusConfig::default(),
    )
}

#[test]
fn max_relative_target_clamps_goals_around_the_present_position() {
    let servos = SimTransport::new(Servos::new(1..=6)).servos();
    servos.lock().unwrap().set_time_constant(Duration::ZERO);
    let mut arm = sim_arm(Role::Follower, &servos);
    arm.set_calibration(trace_calibration(&trace()));
    let present = arm.read_positions().unwrap();
    let goals: Vec<f64> = present
        .iter()
        .enumerate()
        .map(|(i, p)| p + [20.0, -20.0, 3.0, -3.0, 0.0, 50.0][i])
        .collect();
    let sent = arm.send_action(&goals).unwrap();
    let want: Vec<f64> = present
        .iter()
        .enumerate()
        .map(|(i, p)| p + [5.0, -5.0, 3.0, -3.0, 0.0, 5.0][i])
        .collect();
    for (s, w) in sent.iter().zip(&want) {
        assert!((s - w).abs() < 1e-9, "{sent:?} vs {want:?}");
    }
    // Per-motor caps must name exactly the motors.
    let mut bad = ArmConfig::new(ArmSpec::new(ArmModel::So100, Role::Follower));
    bad.max_relative_target = Some(MaxRelativeTarget::PerMotor(vec![("gripper".into(), 1.0)]));
    let mut arm = Arm::new(
        bad,
        SimTransport::shared(servos.clone()),
        BusConfig::default(),
    );
    arm.set_calibration(trace_calibration(&trace()));
    assert!(arm.send_action(&goals).is_err());
    assert!(arm.send_action(&goals[..5]).is_err());
}

/// Raw positions of the joints "by hand": the middle pose, then offsets from it.
const MIDDLE: [f64; 6] = [2100.0, 1500.0, 2600.0, 2050.0, 1000.0, 2300.0];

#[test]
fn calibration_procedure_driven_on_the_emulator() {
    let servos = SimTransport::new(Servos::new(1..=6)).servos();
    let mut arm = sim_arm(Role::Follower, &servos);
    arm.connect().unwrap();
    let motors = arm.motors().to_vec();
    let mut cal = Calibrator::new(&motors);
    let run =
        |arm: &mut Arm<SimTransport>, cmds: Vec<Command>| Calibrator::run_step(arm, cmds).unwrap();

    let out = run(&mut arm, cal.start());
    assert_eq!(out.prompts, [Prompt::MoveToMiddle]);
    for (id, p) in (1..).zip(MIDDLE) {
        servos.lock().unwrap().set_actual(id, p);
    }
    let out = run(&mut arm, cal.on_event(Event::Enter).unwrap());
    assert_eq!(
        out.event,
        Some(Event::Positions(MIDDLE.iter().map(|p| *p as i64).collect()))
    );
    let out = run(&mut arm, cal.on_event(out.event.unwrap()).unwrap());
    assert_eq!(out.prompts, [Prompt::MoveThroughRanges]);
    assert_eq!(
        out.event,
        Some(Event::Positions(vec![2047; 6])),
        "homed: the middle reads 2047"
    );

    // Sweep every joint but the gripper; ENTER then refuses, naming it.
    let mut event = out.event.unwrap();
    let sweep = [-300.0, 400.0, -500.0, 600.0, 0.0];
    for k in 0..=10 {
        let t = f64::from(k) / 10.0;
        for (id, d) in (1..).zip(sweep) {
            servos
                .lock()
                .unwrap()
                .set_actual(id, MIDDLE[usize::from(id) - 1] + d * t);
        }
        event = run(&mut arm, cal.on_event(event).unwrap()).event.unwrap();
    }
    assert_eq!(
        cal.on_event(Event::Enter),
        Err(CalibrateError::NoRange("gripper".into()))
    );
    for d in [200.0, -100.0] {
        servos.lock().unwrap().set_actual(6, MIDDLE[5] + d);
        event = run(&mut arm, cal.on_event(event).unwrap()).event.unwrap();
    }
    let _ = run(&mut arm, cal.on_event(event).unwrap());
    let out = run(&mut arm, cal.on_event(Event::Enter).unwrap());
    assert!(cal.is_done());
    let saved = out.save.expect("a calibration to save");
    let get = |m: &str| *saved.get(m).unwrap();
    assert_eq!(get("shoulder_pan").homing_offset, 2100 - 2047);
    assert_eq!(
        (get("shoulder_pan").range_min, get("shoulder_pan").range_max),
        (2047 - 300, 2047)
    );
    assert_eq!(
        (
            get("shoulder_lift").range_min,
            get("shoulder_lift").range_max
        ),
        (2047, 2047 + 400)
    );
    assert_eq!(
        (get("wrist_roll").range_min, get("wrist_roll").range_max),
        (0, 4095)
    );
    assert_eq!(
        (get("gripper").range_min, get("gripper").range_max),
        (2047 - 100, 2047 + 200)
    );
    assert_eq!(get("elbow_flex").homing_offset, 2600 - 2047);
    // Written to the servos: LeRobot's is_calibrated now holds.
    assert!(arm.is_calibrated().unwrap());
    let s = servos.lock().unwrap().register(3, &table::HOMING_OFFSET);
    assert_eq!(s, Some(553));
    assert_eq!(
        cal.on_event(Event::Enter),
        Err(CalibrateError::Unexpected("ENTER"))
    );
}
