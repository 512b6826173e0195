"""LeRobot side of `cargo xtask bench infer` (run by trainer/benches/infer.rs).

usage: lerobot_infer_chunk.py --model DIR --n N --threads T

Loads DIR with LeRobot's `SmolVLAPolicy.from_pretrained` (the local backbone loaders of
trainer/tests/py/lerobot_interop.py) and times `predict_action_chunk` on one fixed batch at the
model boundary (random camera frames at the config's shapes in [0, 1], a normalized state, every
language token real, the same noise each time): N chunks after one untimed warm-up. Prints one
JSON line: chunk ms p50/p99/mean and this process's peak RSS (VmHWM).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "py"))
from lerobot_interop import load  # noqa: E402


def peak_rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--n", type=int, default=5)
ap.add_argument("--threads", type=int, required=True)
args = ap.parse_args()
torch.set_num_threads(args.threads)
t0 = time.perf_counter()
policy = load(args.model)
policy.eval()
load_s = time.perf_counter() - t0
cfg = policy.config
g = torch.Generator().manual_seed(0)
batch = {}
for key, f in cfg.input_features.items():
    if key.startswith("observation.images."):
        batch[key] = torch.rand((1, *f.shape), generator=g)
batch["observation.state"] = torch.randn((1, cfg.input_features["observation.state"].shape[0]), generator=g)
L = cfg.tokenizer_max_length
batch["observation.language.tokens"] = (torch.arange(L) % 50 + 1).unsqueeze(0)
batch["observation.language.attention_mask"] = torch.ones((1, L), dtype=torch.bool)
noise = torch.randn((1, cfg.chunk_size, cfg.max_action_dim), generator=g)
times = []
with torch.no_grad():
    for i in range(args.n + 1):
        policy.reset()
        s = time.perf_counter()
        policy.predict_action_chunk(dict(batch), noise=noise.clone())
        if i > 0:
            times.append((time.perf_counter() - s) * 1e3)
times.sort()
print(json.dumps({
    "chunk_ms": {"p50": times[len(times) // 2], "p99": times[min(len(times) - 1, round((len(times) - 1) * 0.99))],
                 "mean": sum(times) / len(times)},
    "peak_rss_kib": peak_rss_kib(),
    "load_s": load_s,
    "threads": args.threads,
}))
