"""LeRobot side of `cargo xtask bench train -- --only round` (run by trainer/benches/train/round.rs).

Usage, with a Python that has lerobot 0.6.1 installed:
    python lerobot_round.py --model DIR --threads T -- <lerobot-train arguments>

Runs `lerobot.scripts.lerobot_train.main()`, the function LeRobot's `lerobot-train` console script
calls, with the given arguments (`--policy.path=DIR` among them). The bench checkpoints use a
local SmolVLM config (`DIR/vlm_config.json`) and tokenizer (`DIR/tokenizer.json`) instead of the
Hub's, so before that the Hub look-ups of SmolVLM's config, processor and tokenizer are replaced
by those local objects, as trainer/tests/py/lerobot_interop.py does for the other interop checks.
Nothing else of the training script is touched: its dataset, dataloader workers, preprocessor,
`update_policy` and log lines (`data_s`, `updt_s` per logged step) are LeRobot's own.
`--threads` sets torch's intra-op threads of the training process (dataloader workers use one
each, torch's default).
"""

import argparse
import os
import sys
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "py"))
from lerobot_interop import install_local_loaders  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("train_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import json

    import transformers
    from transformers import PreTrainedTokenizerFast

    import lerobot.processor.tokenizer_processor as tp
    from lerobot.scripts.lerobot_train import main as lerobot_train_main

    with open(os.path.join(args.model, "vlm_config.json")) as f:
        install_local_loaders(transformers.SmolVLMConfig.from_dict(json.load(f)))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(args.model, "tokenizer.json"),
        pad_token="<pad>",
        eos_token="<|endoftext|>",
    )
    tp.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: tokenizer)

    rest = [a for a in args.train_args if a != "--"]
    sys.argv = ["lerobot-train", *rest]
    lerobot_train_main()


if __name__ == "__main__":
    main()
