"""Read every item of each dataset directory through LeRobot's own LeRobotDataset, with its
default video backend and tolerance, as `lerobot-train` does; print one JSON line per dataset.

Usage: python read_every_item.py [--backend NAME] DIR [DIR ...]
(--backend: a LeRobot video backend, e.g. pyav; default: LeRobot's own default.)
Each line: {"root", "video_backend", "tolerance_s", "items", "error",
"means": [[camera mean RGB on a 0-255 scale, per camera in camera_keys order] per item],
"camera_keys"}. "error" is null when every item was read, else the exception LeRobot raised
(e.g. FrameTimestampError) with the index of the item. Run offline (HF_HUB_OFFLINE=1) with
HF_HOME pointing at scratch space.
"""

import json
import sys

from lerobot.datasets.lerobot_dataset import LeRobotDataset


def main():
    args = sys.argv[1:]
    backend = None
    if args[:1] == ["--backend"]:
        backend, args = args[1], args[2:]
    for root in args:
        ds = LeRobotDataset(repo_id="local/x", root=root, video_backend=backend)
        cams = list(ds.meta.camera_keys)
        out = {
            "root": root,
            "video_backend": getattr(ds, "video_backend", None) or getattr(ds, "_video_backend", None),
            "tolerance_s": ds.tolerance_s,
            "camera_keys": cams,
            "items": 0,
            "error": None,
            "means": [],
        }
        for i in range(len(ds)):
            try:
                it = ds[i]
            except Exception as e:  # noqa: BLE001 - reported to the Rust test verbatim
                out["error"] = f"item {i}: {type(e).__name__}: {e}"
                break
            out["means"].append([[float(it[c][k].mean()) * 255.0 for k in range(3)] for c in cams])
            out["items"] += 1
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
