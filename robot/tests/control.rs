//! The teleop step on emulated arms: actions are the leader's positions normalized with the
//! leader's calibration, goals land in the follower unnormalized with the follower's, and a
//! servo that stops answering is an error naming the arm and the motor.

use zk0_robot::arm::Role;
use zk0_robot::control::{prepare, ControlError, Teleop};
use zk0_robot::feetech::table;
use zk0_robot::normalize::{normalize, unnormalize};
use zk0_robot::sim::{self, Servos, SimTransport, Sweep};
use zk0_robot::{Arm, ArmConfig, ArmModel, ArmSpec, BusConfig, Calibration};

fn arm(role: Role, servos: Servos) -> (Arm<SimTransport>, sim::SharedServos, Calibration) {
    let cfg = ArmConfig::new(ArmSpec::new(ArmModel::So101, role));
    let t = SimTransport::new(servos);
    let shared = t.servos();
    let mut a = Arm::new(cfg, t, BusConfig::default());
    let mut cal = sim::calibration(a.motors());
    if role == Role::Leader {
        // Different calibrations on the two arms, so a mix-up shows.
        for (_, c) in &mut cal.motors {
            c.homing_offset = 37;
        }
    }
    assert!(
        prepare(&mut a, cal.clone()).unwrap(),
        "calibration written to fresh servos"
    );
    (a, shared, cal)
}

#[test]
fn teleop_step_records_normalized_leader_positions_and_drives_the_follower() {
    let mut leader_servos = Servos::new(1..=6);
    for id in 1..=6 {
        let sweep = Sweep {
            lo: 1500.0,
            hi: 2600.0,
            step: 3.0 * f64::from(id),
        };
        leader_servos.set_sweep(id, Some(sweep));
    }
    let mut follower_servos = Servos::new(1..=6);
    follower_servos.set_time_constant(std::time::Duration::ZERO);
    let (leader, ls, lcal) = arm(Role::Leader, leader_servos);
    let (follower, fs, fcal) = arm(Role::Follower, follower_servos);
    let mut t = Teleop::new(leader, follower);
    let motors = t.leader.motors().to_vec();
    let mut last = vec![];
    for _ in 0..5 {
        let step = t.step().unwrap();
        let mut ls = ls.lock().unwrap();
        let mut fs = fs.lock().unwrap();
        for (i, m) in motors.iter().enumerate() {
            let raw = ls.register(m.id, &table::PRESENT_POSITION).unwrap();
            let c = lcal.get(m.name).unwrap();
            assert_eq!(
                step.action[i],
                normalize(m.name, m.norm_mode, c, raw).unwrap()
            );
            let goal = fs.register(m.id, &table::GOAL_POSITION).unwrap();
            let fc = fcal.get(m.name).unwrap();
            assert_eq!(
                goal,
                unnormalize(m.name, m.norm_mode, fc, step.action[i]).unwrap()
            );
        }
        assert_eq!(step.sent, step.action, "no clamp configured");
        assert_ne!(step.action, last, "the leader moves every read");
        last = step.action;
    }
    // The follower (instant motion) now reads where it was sent.
    let step = t.step().unwrap();
    for (o, a) in step.observation.iter().zip(&last) {
        assert!((o - a).abs() < 0.2, "{o} vs {a}");
    }

    ls.lock().unwrap().faults_mut(3).unwrap().silent = true;
    let e = t.step().unwrap_err();
    assert!(matches!(e, ControlError::Leader(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("leader arm:") && msg.contains("elbow_flex"),
        "{msg}"
    );
    ls.lock().unwrap().faults_mut(3).unwrap().silent = false;
    fs.lock().unwrap().faults_mut(6).unwrap().silent = true;
    let msg = t.step().unwrap_err().to_string();
    assert!(
        msg.starts_with("follower arm:") && msg.contains("gripper"),
        "{msg}"
    );
}
