#!/usr/bin/env python3
"""Compiles the fused CUDA kernels' source with the real NVRTC, without a GPU, before a kit goes to a device.

sd-rbee compiles `src/diffusion/cuda_kernels/` with NVRTC when a process first needs them (Candle's `compile_ptx`,
no options), and falls back to Candle's own operations, with one warning, if NVRTC refuses the source. So a
kernel that g++ accepts under the shim of `kernels_on_cpu.py` but NVRTC does not would cost a device session its
fused-kernel figures without failing anything. This compiles the very text the binary embeds, as the binary
does and for compute_90 (the H100/H200), and checks that every kernel the Rust side launches
(`kernel("family", dtype)` → `family_f32`, `_f16`, `_bf16`) is an entry of the PTX.

    python3 scripts/gpu/nvrtc_check.py [path/to/libnvrtc.so.13]

Without an argument it takes `$NVRTC_LIB`, else the `nvidia-cuda-nvrtc` wheel of `scripts/gpu/build.sh`'s venv.
NVRTC loads `libnvrtc-builtins.so.13.0` from beside itself only through the library path, so this re-runs itself
with that folder on `LD_LIBRARY_PATH` where needed. Exits 1 on a compile error or a missing entry.
"""
import ctypes
import glob
import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts/gpu"))
from kernels_on_cpu import KERNELS, raw_string  # noqa: E402

FILES = ("group_norm.rs", "geglu.rs", "tails.rs")


def embedded_source():
    """`cuda_kernels::source()`: the prelude, then each file's SOURCE, as the binary concatenates them."""
    return "".join([raw_string("mod.rs", "PRELUDE")] + [raw_string(f, "SOURCE") for f in FILES])


def launched_kernels():
    """Every `family_dtype` the Rust side asks the module for."""
    families = set()
    for f in FILES:
        families.update(re.findall(r'kernel\("([a-z0-9_]+)", ', (KERNELS / f).read_text()))
    return sorted(f"{family}_{dtype}" for family in families for dtype in ("f32", "f16", "bf16"))


def find_nvrtc():
    if len(sys.argv) > 1:
        return sys.argv[1]
    if os.environ.get("NVRTC_LIB"):
        return os.environ["NVRTC_LIB"]
    venv = os.environ.get("CUDA_WORK", str(ROOT / "target/cuda-toolkit")) + "/venv"
    found = glob.glob(f"{venv}/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13")
    if not found:
        sys.exit("nvrtc_check: no libnvrtc.so.13 (give its path, set NVRTC_LIB, or run scripts/gpu/build.sh)")
    return found[0]


def compile_ptx(lib, source, options):
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"sd_rbee_fused.cu", 0, None, None)
    if rc != 0:
        sys.exit(f"nvrtc_check: nvrtcCreateProgram failed ({rc})")
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = None
    if rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode().strip(), ptx


def main():
    path = find_nvrtc()
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in os.environ.get("LD_LIBRARY_PATH", "").split(":") and not os.environ.get("NVRTC_CHECK_CHILD"):
        env = dict(os.environ, NVRTC_CHECK_CHILD="1")
        env["LD_LIBRARY_PATH"] = folder + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        os.execve(sys.executable, [sys.executable, __file__, path], env)
    lib = ctypes.CDLL(path)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    source, wanted = embedded_source(), launched_kernels()
    failed = False
    # As the binary compiles it (no options: NVRTC's default target), then for the Hopper cards explicitly.
    for options in ([], ["--gpu-architecture=compute_90"]):
        rc, log, ptx = compile_ptx(lib, source, options)
        what = " ".join(options) or "default options"
        if rc != 0:
            print(f"nvrtc_check: NVRTC {major.value}.{minor.value} ({what}) refused the kernels:\n{log}")
            failed = True
            continue
        entries = set(re.findall(r"^\.visible \.entry ([A-Za-z0-9_]+)\(", ptx, re.M))
        missing = [k for k in wanted if k not in entries]
        target = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
        version = re.search(r"^\.version (\S+)", ptx, re.M).group(1)
        print(f"nvrtc_check: NVRTC {major.value}.{minor.value} ({what}): PTX {version} for {target}, "
              f"{len(entries)} entries, {len(ptx)} bytes" + (f"; warnings:\n{log}" if log else ""))
        if missing:
            print(f"nvrtc_check: kernels the Rust side launches but the PTX lacks: {', '.join(missing)}")
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
