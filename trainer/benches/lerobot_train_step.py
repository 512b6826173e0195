"""LeRobot side of `cargo xtask bench train` (run by trainer/benches/train.rs).

Usage, with a Python that has lerobot 0.6.1 installed:
    python lerobot_train_step.py --model DIR --inputs inputs.safetensors \
        --steps N --warmup W --threads T [--bf16]

Loads DIR (config.json, vlm_config.json, model.safetensors: the same files zk0-train loads)
with LeRobot's `SmolVLAPolicy.from_pretrained` and times the body of LeRobot's
`lerobot_train.update_policy` on one fixed batch: `policy.forward` (the flow-matching loss),
`backward`, `clip_grad_norm_` over the policy's parameters with the preset's norm, and the
preset's `torch.optim.AdamW` step (built by `get_optimizer_preset().build`), then `zero_grad`.
The noise and time of the batch file are passed in, as zk0-train's side does. The first
`warmup` steps (at least one) are not timed. Prints one JSON line with steps/s and this
process's peak RSS (VmHWM).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "py"))
from lerobot_interop import load, read_inputs  # noqa: E402  (local loaders for the backbone)


def peak_rss_kib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    if args.steps < 1:
        sys.exit("--steps must be at least 1")
    torch.set_num_threads(args.threads)

    t_load = time.perf_counter()
    policy = load(args.model)
    batch, noise, t_in = read_inputs(args.inputs)
    cfg = policy.config
    optimizer = cfg.get_optimizer_preset().build(policy.get_optim_params())
    load_seconds = time.perf_counter() - t_load
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else None

    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def step(timed=False):
        t = time.perf_counter()

        def lap(name):
            nonlocal t
            if timed:
                phases[name] += time.perf_counter() - t
            t = time.perf_counter()

        policy.train()
        if amp is not None:
            with amp:
                loss, _ = policy.forward(dict(batch), noise=noise, time=t_in)
        else:
            loss, _ = policy.forward(dict(batch), noise=noise, time=t_in)
        lap("forward")
        loss.backward()
        lap("backward")
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optimizer_grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad()
        lap("optimizer")
        return loss.item(), grad_norm.item()

    first, _ = step()
    for _ in range(1, args.warmup):
        step()
    t0 = time.perf_counter()
    last = first
    for _ in range(args.steps):
        last, _ = step(timed=True)
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "impl": "lerobot",
                "steps": args.steps,
                "warmup": max(args.warmup, 1),
                "batch_size": int(noise.shape[0]),
                "threads": torch.get_num_threads(),
                "bf16": args.bf16,
                "torch": torch.__version__,
                "load_seconds": load_seconds,
                "seconds": seconds,
                "steps_per_s": args.steps / seconds,
                "first_loss": first,
                "last_loss": last,
                "trainable_tensors": sum(1 for p in policy.parameters() if p.requires_grad),
                "phase_seconds": phases,
                "peak_rss_kib": peak_rss_kib(),
            }
        )
    )


if __name__ == "__main__":
    main()
