"""Write a LeRobot v3.0 dataset with LeRobot's own writer, with tiny file-size limits so data,
video and episode-metadata files roll over into several files and chunks.

Usage: python make_multichunk.py --out DIR
One 64x48 video camera, 6 episodes of 12-25 frames, chunks_size 2, metadata_buffer_size 1.
"""

import argparse
import math

import numpy as np

from lerobot.datasets.lerobot_dataset import LeRobotDataset

JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
LENGTHS = [12, 25, 17, 20, 14, 22]
TASKS = ["pick the cube", "open the drawer", "pick the cube", "wipe the table", "open the drawer", "pick the cube"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    names = [f"{j}.pos" for j in JOINTS]
    features = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": names},
        "action": {"dtype": "float32", "shape": (6,), "names": names},
        "next.done": {"dtype": "bool", "shape": (1,), "names": None},
        "observation.images.front": {
            "dtype": "video", "shape": (48, 64, 3), "names": ["height", "width", "channels"],
        },
    }
    ds = LeRobotDataset.create(
        repo_id="local/multichunk", fps=30, features=features, root=args.out,
        robot_type="so100_follower", use_videos=True, metadata_buffer_size=1,
    )
    ds.meta.update_chunk_settings(chunks_size=2, data_files_size_in_mb=0.002, video_files_size_in_mb=0.003)
    for e, (n, task) in enumerate(zip(LENGTHS, TASKS, strict=True)):
        for f in range(n):
            s = np.array([20 * math.sin(f / 7 + j + e) for j in range(6)], dtype=np.float32)
            img = np.zeros((48, 64, 3), dtype=np.uint8)
            img[:, :] = ((5 * f + 30 * e) % 200 + 20, 120, (40 * e) % 200 + 20)
            ds.add_frame({
                "observation.state": s, "action": s + 1,
                "next.done": np.array([f == n - 1]), "observation.images.front": img, "task": task,
            })
        ds.save_episode()
    ds.finalize()


if __name__ == "__main__":
    main()
