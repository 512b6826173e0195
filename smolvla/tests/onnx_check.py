"""Independent checks of a zk0 ONNX export, with the PyPI `onnx` and `onnxruntime` packages.

usage: onnx_check.py EXPORT_DIR INPUTS.safetensors
INPUTS holds the prefix graph's inputs (by graph input name) plus `noise` and `chunk` (what
zk0's own `ort` path sampled from them). Prints JSON: the checker verdicts, the inputs/outputs
ONNX Runtime sees, and the error of stock onnxruntime's chunk against zk0's.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file

out_dir, inputs_path = sys.argv[1], sys.argv[2]
manifest = json.load(open(f"{out_dir}/export.json"))
result = {"onnx": onnx.__version__, "onnxruntime": ort.__version__}
for g in ("prefix", "denoise"):
    path = f"{out_dir}/{manifest[g]['file']}"
    # The path, not a loaded model: the checker then reads the external data too.
    onnx.checker.check_model(path, full_check=True)
    result[f"{g}_checked"] = True

opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
sess = {
    g: ort.InferenceSession(f"{out_dir}/{manifest[g]['file']}", opts, providers=["CPUExecutionProvider"])
    for g in ("prefix", "denoise")
}
result["denoise_inputs"] = [i.name for i in sess["denoise"].get_inputs()]
data = load_file(inputs_path)
feeds = {}
for i in sess["prefix"].get_inputs():
    v = data[i.name]
    feeds[i.name] = v.astype(bool) if i.type == "tensor(bool)" else v
names = [o.name for o in sess["prefix"].get_outputs()]
cache = dict(zip(names, sess["prefix"].run(None, feeds)))
x = data["noise"].astype(np.float32)
steps = manifest["num_steps"]
dt = np.float32(-1.0 / steps)
for k in range(steps):
    t = np.float32(1.0) + np.float32(k) * dt
    feed = {n: cache[n] for n in result["denoise_inputs"] if n in cache}
    feed["x_t"] = x
    feed["timestep"] = np.array([t], dtype=np.float32)
    (v,) = sess["denoise"].run(["v_t"], feed)
    x = x + dt * v
ours = data["chunk"].reshape(x.shape)
result["max_abs"] = float(np.abs(x - ours).max())
result["cosine"] = float((x * ours).sum() / (np.linalg.norm(x) * np.linalg.norm(ours)))
print(json.dumps(result))
