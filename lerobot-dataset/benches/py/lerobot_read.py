"""Frames/s of LeRobot's own reader (LeRobotDataset, default video backend) over a dataset.

Usage: python lerobot_read.py DIR ORDER_JSON
ORDER_JSON holds {"sequential": [indices], "random": [indices]}; each list is read in order with
`ds[i]` (every feature, cameras decoded), after constructing the dataset (not timed).
Prints one JSON line {"backend", "sequential_fps", "random_fps", "frames"}.
Run offline (HF_HUB_OFFLINE=1) with HF_HOME on scratch space.
"""

import json
import sys
import time

from lerobot.datasets.lerobot_dataset import LeRobotDataset


def main():
    root, order_path = sys.argv[1], sys.argv[2]
    with open(order_path) as f:
        order = json.load(f)
    out = {}
    for name in ("sequential", "random"):
        # A fresh dataset per pattern, like the Rust side (no decoder state carried over).
        ds = LeRobotDataset(repo_id="local/bench", root=root)
        cam = ds.meta.camera_keys[0]
        idx = order[name]
        t = time.perf_counter()
        for i in idx:
            item = ds[i]
            assert item[cam].shape[0] == 3
        out[f"{name}_fps"] = len(idx) / (time.perf_counter() - t)
        out["backend"] = ds.video_backend if hasattr(ds, "video_backend") else ds._video_backend
        out["frames"] = len(idx)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
