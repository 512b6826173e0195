"""Load a dataset directory with LeRobot's own reader and print what it returns, as JSON.

Usage: python load_with_lerobot.py DIR [--images I,J,...]
Prints {"total_episodes", "total_frames", "fps", "video_backend", "camera_keys",
"frames": [{"index", "episode_index", "frame_index", "timestamp", "task", "task_index",
"features": {name: [values]}, "images": {camera: {"mean_rgb": [r, g, b]}}}]}: every frame's
non-camera values, and for the frames listed in --images (global indices) each camera's decoded
mean RGB on a 0-255 scale. Run offline (HF_HUB_OFFLINE=1); HF_HOME should point at scratch space.
"""

import argparse
import json

import torch

from lerobot.datasets.lerobot_dataset import LeRobotDataset


def to_list(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        if v.dtype == torch.bool:
            return [bool(x) for x in v.reshape(-1).tolist()]
        return [x for x in v.reshape(-1).tolist()]
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--images", default="")
    args = ap.parse_args()
    ds = LeRobotDataset(repo_id="local/x", root=args.root)
    image_idx = {int(x) for x in args.images.split(",") if x}
    cams = list(ds.meta.camera_keys)
    skip = set(cams) | {"index", "episode_index", "frame_index", "timestamp", "task_index", "task"}
    names = [k for k in ds.meta.features if k not in skip]
    frames = []
    hf = ds.hf_dataset.with_format("torch")
    for i in range(len(ds)):
        if i in image_idx:
            it = ds[i]
        else:
            it = dict(hf[i])
            it["task"] = ds.meta.tasks.iloc[int(it["task_index"])].name
        fr = {
            "index": int(it["index"]),
            "episode_index": int(it["episode_index"]),
            "frame_index": int(it["frame_index"]),
            "timestamp": float(it["timestamp"]),
            "task_index": int(it["task_index"]),
            "task": it["task"],
            "features": {k: to_list(it[k]) for k in names},
            "images": {},
        }
        if i in image_idx:
            for c in cams:
                img = it[c]  # float CHW in [0, 1]
                fr["images"][c] = {"mean_rgb": [float(img[k].mean()) * 255.0 for k in range(3)]}
        frames.append(fr)
    out = {
        "total_episodes": ds.meta.total_episodes,
        "total_frames": ds.meta.total_frames,
        "fps": ds.fps,
        "video_backend": ds.video_backend if hasattr(ds, "video_backend") else ds._video_backend,
        "camera_keys": cams,
        "frames": frames,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
