"""Unpack the parts of PyPI wheels that zk0 needs (run by `cargo xtask setup`).

usage: unpack_wheels.py libtorch WHEEL_DIR OUT_DIR [--cuda]
       unpack_wheels.py onnxruntime WHEEL_DIR OUT_DIR

libtorch: torch/lib + torch/include from the torch wheel form a LIBTORCH dir. The CPU
flavour keeps only the libraries the CPU path loads (libtorch_cuda* is ~0.5 GB and left out);
libtorch_cpu still has DT_NEEDED entries for libcudart/libcupti, taken from the nvidia wheels.
The aarch64 wheel's libtorch_cpu also needs the Arm Compute Library and NVPL BLAS/LAPACK.
"""
import glob
import os
import shutil
import sys
import zipfile

CPU_LIBS = {"libc10.so", "libtorch_cpu.so", "libtorch.so", "libgomp.so.1", "libshm.so",
            "libtorch_global_deps.so"}
NVIDIA_CPU_LIBS = {"libcudart.so.13", "libcupti.so.13"}
AARCH64_CPU_LIBS = {"libarm_compute.so", "libarm_compute_graph.so", "libnvpl_blas_core.so.0",
                    "libnvpl_blas_lp64_gomp.so.0", "libnvpl_lapack_core.so.0",
                    "libnvpl_lapack_lp64_gomp.so.0"}


def extract(zf, member, dest):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with zf.open(member) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def libtorch(wheel_dir, out, cuda):
    lib_dir = os.path.join(out, "lib")
    aarch64 = any("aarch64" in w for w in glob.glob(os.path.join(wheel_dir, "torch-*.whl")))
    cpu_libs = CPU_LIBS | AARCH64_CPU_LIBS if aarch64 else CPU_LIBS
    for whl in sorted(glob.glob(os.path.join(wheel_dir, "*.whl"))):
        zf = zipfile.ZipFile(whl)
        base = os.path.basename(whl)
        for m in zf.namelist():
            if m.endswith("/"):
                continue
            name = os.path.basename(m)
            if base.startswith("torch-"):
                if m.startswith("torch/include/"):
                    extract(zf, m, os.path.join(out, m[len("torch/"):]))
                elif m.startswith("torch/lib/") and (cuda or name in cpu_libs):
                    if name != "libtorch_python.so":
                        extract(zf, m, os.path.join(lib_dir, name))
                elif m.startswith("torch.libs/") and ".so" in name:
                    extract(zf, m, os.path.join(lib_dir, name))
            elif base.startswith("nvidia"):
                if "/lib/" in m and ".so" in name and (cuda or name in NVIDIA_CPU_LIBS):
                    extract(zf, m, os.path.join(lib_dir, name))
    if aarch64 and not cuda:
        # libtorch.so only adds libtorch_cuda.so (left out) to libtorch_cpu.so, and the aarch64
        # one also defines a libstdc++ symbol a binary binds to when it comes first on the link
        # line: the binary then needs libtorch_cuda.so to load. A linker script in its place
        # gives `-ltorch` (which torch-sys always passes) libtorch_cpu.so instead.
        with open(os.path.join(lib_dir, "libtorch.so"), "w") as f:
            f.write("/* CPU libtorch: -ltorch is libtorch_cpu.so */\nINPUT(-ltorch_cpu)\n")
    missing = [n for n in cpu_libs - {"libtorch_global_deps.so"} if not os.path.exists(os.path.join(lib_dir, n))]
    missing += [n for n in NVIDIA_CPU_LIBS if not os.path.exists(os.path.join(lib_dir, n))]
    if missing:
        sys.exit(f"unpack_wheels: missing from the wheels: {', '.join(sorted(missing))}")


def onnxruntime(wheel_dir, out):
    os.makedirs(out, exist_ok=True)
    found = None
    for whl in sorted(glob.glob(os.path.join(wheel_dir, "onnxruntime*.whl"))):
        zf = zipfile.ZipFile(whl)
        for m in zf.namelist():
            name = os.path.basename(m)
            if m.startswith("onnxruntime/capi/") and name.startswith("libonnxruntime"):
                extract(zf, m, os.path.join(out, name))
                if name.startswith("libonnxruntime.so"):
                    found = name
    if not found:
        sys.exit("unpack_wheels: no libonnxruntime.so in the onnxruntime wheel")
    print(os.path.join(out, found))


if __name__ == "__main__":
    what, wheel_dir, out = sys.argv[1:4]
    if what == "libtorch":
        libtorch(wheel_dir, out, "--cuda" in sys.argv[4:])
    else:
        onnxruntime(wheel_dir, out)
