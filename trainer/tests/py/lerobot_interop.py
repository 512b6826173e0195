"""LeRobot side of zk0's checkpoint interop test (run by trainer/tests/lerobot_interop.rs).

Usage, with a Python that has lerobot 0.6.1 installed:
    python lerobot_interop.py loss --model DIR --inputs inputs.safetensors
        Loads DIR with LeRobot's `SmolVLAPolicy.from_pretrained` and prints
        {"loss": ..., "per_sample_loss": [...]} of `forward(batch, noise, time)`.
    python lerobot_interop.py step --model DIR --inputs inputs.safetensors --out DIR2 [--lr 1e-3]
        Loads DIR, takes one clipped AdamW step (the SmolVLA preset's betas/eps/weight decay) on
        the loss of that batch, writes the policy with `save_pretrained(DIR2)` (plus the tiny
        backbone's vlm_config.json) and prints the loss of the updated policy as above.
    python lerobot_interop.py pipeline --model DIR --pipeline PIPELINE_DIR
        Loads DIR's processors (`policy_preprocessor.json`, `policy_postprocessor.json` with
        their state files; the tokenizer from DIR/tokenizer.json) with LeRobot's
        `PolicyProcessorPipeline.from_pretrained`, runs the preprocessor on the pipeline
        fixture's raw batch and prints the max abs error against the batch LeRobot's own
        processors made (`batch.*` in its expected.safetensors), the loss of DIR's policy on
        that batch with the fixture's noise/time, and the postprocessor's round trip error.
        With --dump FILE the preprocessed batch (+ noise, time) is written in the fixture
        inputs format, for `zk0-train loss --inputs FILE`.

The tiny test checkpoints use a local SmolVLM config (`vlm_config.json` in the checkpoint)
instead of the Hub's, so the Hub look-ups in LeRobot's SmolVLM wrapper are replaced by local
objects, exactly as the fixture generator (shared/fixtures/smolvla-tiny/generate.py) does.
"""

import argparse
import json
import os
import shutil
import types

import torch
import transformers
from safetensors.torch import load_file

import lerobot.policies.smolvla.smolvlm_with_expert as swe
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

FAKE_IMAGE_TOKEN_ID = 500
GLOBAL_IMAGE_TOKEN_ID = 501


def install_local_loaders(vlm_config):
    tokenizer = types.SimpleNamespace(
        fake_image_token_id=FAKE_IMAGE_TOKEN_ID, global_image_token_id=GLOBAL_IMAGE_TOKEN_ID
    )
    swe.AutoConfig = types.SimpleNamespace(from_pretrained=lambda *a, **k: vlm_config)
    swe.AutoProcessor = types.SimpleNamespace(
        from_pretrained=lambda *a, **k: types.SimpleNamespace(tokenizer=tokenizer)
    )


def load(model_dir):
    with open(os.path.join(model_dir, "vlm_config.json")) as f:
        vlm_config = transformers.SmolVLMConfig.from_dict(json.load(f))
    install_local_loaders(vlm_config)
    policy = SmolVLAPolicy.from_pretrained(model_dir)
    policy.to("cpu")
    return policy


def read_inputs(path):
    inputs = load_file(path)
    for k in ("action_is_pad", "observation.language.attention_mask"):
        if k in inputs:
            inputs[k] = inputs[k].to(torch.bool)
    batch = {k: v for k, v in inputs.items() if k not in ("noise", "time", "sample_noise")}
    return batch, inputs["noise"], inputs["time"]


def loss_of(policy, batch, noise, time):
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    policy.train()
    loss, _ = policy.forward({k: v.clone() for k, v in batch.items()}, noise=noise.clone(), time=time.clone())
    per_sample, _ = policy.forward(
        {k: v.clone() for k, v in batch.items()}, noise=noise.clone(), time=time.clone(), reduction="none"
    )
    return loss, per_sample


def pipeline(policy, model_dir, pipeline_dir, dump=None):
    import lerobot.processor.tokenizer_processor as tp
    from lerobot.processor import PolicyProcessorPipeline
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(model_dir, "tokenizer.json"), pad_token="<pad>", eos_token="<|endoftext|>"
    )
    tp.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: tokenizer)
    pre = PolicyProcessorPipeline.from_pretrained(model_dir, config_filename="policy_preprocessor.json")
    post = PolicyProcessorPipeline.from_pretrained(
        model_dir, config_filename="policy_postprocessor.json",
        to_transition=__import__("lerobot.processor.converters", fromlist=["x"]).policy_action_to_transition,
        to_output=__import__("lerobot.processor.converters", fromlist=["x"]).transition_to_policy_action,
    )
    with open(os.path.join(pipeline_dir, "pipeline.json")) as f:
        meta = json.load(f)
    inputs = load_file(os.path.join(pipeline_dir, "inputs.safetensors"))
    expected = load_file(os.path.join(pipeline_dir, "expected.safetensors"))
    raw = {k[len("raw."):]: v for k, v in inputs.items() if k.startswith("raw.")}
    raw["action_is_pad"] = raw["action_is_pad"].to(torch.bool)
    raw["task"] = list(meta["tasks"])
    batch = pre(dict(raw))
    errs = {}
    for k, v in expected.items():
        if k.startswith("batch."):
            ours = batch[k[len("batch."):]]
            errs[k] = (ours.to(torch.float64) - v.to(torch.float64)).abs().max().item() if ours.shape == v.shape else float("inf")
    with torch.no_grad():
        loss, _ = loss_of(policy, batch, inputs["noise"], inputs["time"])
        round_trip = post(batch["action"])
    if dump:
        from safetensors.torch import save_file

        tensors = {
            k: (v.to(torch.uint8) if v.dtype == torch.bool else v).contiguous()
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }
        tensors.update(noise=inputs["noise"], time=inputs["time"])
        save_file(tensors, dump)
    return {
        "batch_max_abs_err": errs,
        "pipeline_loss": loss.item(),
        "postprocess_max_abs_err": (round_trip - raw["action"]).abs().max().item(),
        "preprocessor_steps": [type(s).__name__ for s in pre.steps],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["loss", "step", "pipeline"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs")
    ap.add_argument("--pipeline")
    ap.add_argument("--dump")
    ap.add_argument("--out")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    policy = load(args.model)
    if args.mode == "pipeline":
        print(json.dumps(pipeline(policy, args.model, args.pipeline, args.dump)))
        return
    batch, noise, time = read_inputs(args.inputs)
    report = {}
    if args.mode == "step":
        cfg = policy.config
        trainable = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            trainable, lr=args.lr, betas=cfg.optimizer_betas, eps=cfg.optimizer_eps,
            weight_decay=cfg.optimizer_weight_decay,
        )
        loss, _ = loss_of(policy, batch, noise, time)
        report["loss_before"] = loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.optimizer_grad_clip_norm)
        opt.step()
        opt.zero_grad()
        policy.save_pretrained(args.out)
        shutil.copy(os.path.join(args.model, "vlm_config.json"), os.path.join(args.out, "vlm_config.json"))
    with torch.no_grad():
        loss, per_sample = loss_of(policy, batch, noise, time)
    report["loss"] = loss.item()
    report["per_sample_loss"] = per_sample.tolist()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
