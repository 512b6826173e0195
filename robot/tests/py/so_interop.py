"""LeRobot 0.6.1 side of robot/tests/lerobot_interop.rs. Prints one JSON document on stdout.

    load ROLE ID              load the calibration file LeRobot finds for ROLE/ID
                              (HF_LEROBOT_CALIBRATION from the environment)
    save ROLE ID CALIB_JSON   save that calibration through LeRobot's own _save_calibration
    drive PORT ID             SOFollower.connect(calibrate=False) on PORT, is_calibrated,
                              one observation and one action, disconnect
"""

import json
import sys
from dataclasses import asdict

from lerobot.motors import MotorCalibration
from lerobot.robots.so_follower import SO101Follower, SO101FollowerConfig
from lerobot.teleoperators.so_leader import SO101Leader, SO101LeaderConfig


def make(role, arm_id, port="unused"):
    if role == "follower":
        return SO101Follower(SO101FollowerConfig(port=port, id=arm_id))
    return SO101Leader(SO101LeaderConfig(port=port, id=arm_id))


def main():
    cmd = sys.argv[1]
    if cmd == "load":
        dev = make(sys.argv[2], sys.argv[3])
        out = {"path": str(dev.calibration_fpath), "calibration": {k: asdict(v) for k, v in dev.calibration.items()}}
    elif cmd == "save":
        dev = make(sys.argv[2], sys.argv[3])
        dev.calibration = {k: MotorCalibration(**v) for k, v in json.loads(sys.argv[4]).items()}
        dev._save_calibration()
        out = {"path": str(dev.calibration_fpath)}
    elif cmd == "drive":
        robot = make("follower", sys.argv[3], port=sys.argv[2])
        robot.connect(calibrate=False)
        calibrated = robot.is_calibrated
        obs = robot.get_observation()
        action = {k: v + 1.0 for k, v in obs.items()}
        sent = robot.send_action(action)
        robot.disconnect()
        out = {"is_calibrated": calibrated, "observation": obs, "sent": sent}
    else:
        raise SystemExit(f"unknown command {cmd}")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
