"""Load a recorded dataset with LeRobot's own LeRobotDataset, read every item (every video
frame decoded), and dump what the Rust test checks.

Usage: python load_recording.py DIR OUT_DIR
Writes OUT_DIR/<camera key>.rgb (every item's frame as HxWx3 uint8, concatenated) and prints
one JSON line: {"num_episodes", "num_frames", "fps", "robot_type", "camera_keys",
"shapes": {camera: [h, w, c]}, "names": {"action": [...], "observation.state": [...]},
"rows": [{"episode_index", "frame_index", "action", "state", "task"}]}.
Run offline (HF_HUB_OFFLINE=1) with HF_HOME pointing at scratch space.
"""

import json
import os
import sys

import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset


def main():
    root, out_dir = sys.argv[1], sys.argv[2]
    ds = LeRobotDataset(repo_id="local/recording", root=root)
    cams = list(ds.meta.camera_keys)
    dumps = {c: open(os.path.join(out_dir, c + ".rgb"), "wb") for c in cams}
    rows = []
    for i in range(len(ds)):
        it = ds[i]
        rows.append(
            {
                "episode_index": int(it["episode_index"]),
                "frame_index": int(it["frame_index"]),
                "action": [float(x) for x in it["action"].tolist()],
                "state": [float(x) for x in it["observation.state"].tolist()],
                "task": it["task"],
            }
        )
        for c in cams:
            # float CHW in [0, 1] -> uint8 HWC, as the frame was before encoding.
            img = (it[c].permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8)
            dumps[c].write(img.contiguous().numpy().tobytes())
    for f in dumps.values():
        f.close()
    feats = ds.meta.features
    print(
        json.dumps(
            {
                "num_episodes": ds.num_episodes,
                "num_frames": ds.num_frames,
                "fps": ds.fps,
                "robot_type": ds.meta.robot_type,
                "camera_keys": cams,
                "shapes": {c: list(feats[c]["shape"]) for c in cams},
                "names": {k: feats[k]["names"] for k in ("action", "observation.state")},
                "rows": rows,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
