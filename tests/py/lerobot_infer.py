"""LeRobot's side of the `zk0-agent infer` interop test (tests/tests/robot_infer.rs).

usage: lerobot_infer.py --model DIR --dataset DIR --episode N --tokenizer FILE --noise FILE --out FILE

Loads the checkpoint with LeRobot (`SmolVLAPolicy.from_pretrained`; the tiny test backbone's
local loaders as in trainer/tests/py/lerobot_interop.py), its processors when the checkpoint
has them, else builds them from the dataset's statistics (`make_pre_post_processors(...,
dataset_stats=dataset.meta.stats)`), draws one noise tensor (saved to --noise), and every
`n_action_steps` frames of the episode from its first runs preprocessor →
`predict_action_chunk(noise=...)` → postprocessor. Writes `actions` [n, chunk, action_dim],
`frame_index` [n] and the camera frames it decoded (`frames.<key>` [n, 3, H, W]) to --out.
"""

import argparse
import json
import os
import sys
import types

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../trainer/tests/py"))
from lerobot_interop import load  # noqa: E402

import lerobot.processor.tokenizer_processor as tp  # noqa: E402
from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402
from lerobot.policies.factory import make_pre_post_processors  # noqa: E402
from lerobot.processor import PolicyProcessorPipeline  # noqa: E402
from lerobot.processor.converters import (  # noqa: E402
    policy_action_to_transition,
    transition_to_policy_action,
)
from transformers import PreTrainedTokenizerFast  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--dataset", required=True)
ap.add_argument("--episode", type=int, default=0)
ap.add_argument("--tokenizer", required=True)
ap.add_argument("--noise", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()

policy = load(args.model)
policy.eval()
tokenizer = PreTrainedTokenizerFast(tokenizer_file=args.tokenizer, pad_token="<pad>", eos_token="<|endoftext|>")
tp.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: tokenizer)
ds = LeRobotDataset("local/infer-test", root=args.dataset)
if os.path.exists(os.path.join(args.model, "policy_preprocessor.json")):
    pre = PolicyProcessorPipeline.from_pretrained(args.model, config_filename="policy_preprocessor.json")
    post = PolicyProcessorPipeline.from_pretrained(
        args.model,
        config_filename="policy_postprocessor.json",
        to_transition=policy_action_to_transition,
        to_output=transition_to_policy_action,
    )
    source = "checkpoint processors"
else:
    pre, post = make_pre_post_processors(policy.config, dataset_stats=ds.meta.stats)
    source = "dataset stats"

cfg = policy.config
torch.manual_seed(args.seed)
noise = torch.randn(cfg.chunk_size, cfg.max_action_dim)
save_file({"noise": noise.contiguous()}, args.noise)

ep = ds.meta.episodes[args.episode]
start, end = int(ep["dataset_from_index"]), int(ep["dataset_to_index"])
cams = [k for k in cfg.input_features if k.startswith("observation.images.")]
actions, frames, images = [], [], {k: [] for k in cams}
for fi in range(0, end - start, cfg.n_action_steps):
    item = ds[start + fi]
    batch = {k: v for k, v in item.items() if k.startswith("observation.")}
    batch["task"] = item["task"]
    for k in cams:
        images[k].append(item[k].clone())
    batch = pre(batch)
    policy.reset()
    with torch.no_grad():
        a = policy.predict_action_chunk(batch, noise=noise.unsqueeze(0).clone())
    a = post(a)
    actions.append(a[0])
    frames.append(fi)
out = {"actions": torch.stack(actions).contiguous(), "frame_index": torch.tensor(frames, dtype=torch.int64)}
for k in cams:
    out[f"frames.{k}"] = torch.stack(images[k]).contiguous()
save_file(out, args.out)
print(json.dumps({"predictions": len(frames), "processors": source, "cameras": cams}))
