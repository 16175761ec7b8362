#!/usr/bin/env python3
"""Compares the `image` tensors sd-rbee saved (--save-tensor) with diffusers' references.

  parity.py WORKDIR FIXTURES   # files WORKDIR/<model>__<case>__<dtype>.safetensors
Prints one `parity: ...` line per file: max abs and mean abs difference from
FIXTURES/<model>/expected.safetensors['txt2img_<case>_image'].
"""
import glob, os, sys
import numpy as np
from safetensors.numpy import load_file

work, fixtures = sys.argv[1], sys.argv[2]
refs = {}
for path in sorted(glob.glob(os.path.join(work, "*__*__*.safetensors"))):
    model, case, dtype = os.path.basename(path)[: -len(".safetensors")].split("__")
    if model not in refs:
        refs[model] = load_file(os.path.join(fixtures, model, "expected.safetensors"))
    want = refs[model][f"txt2img_{case}_image"].astype(np.float64)
    got = load_file(path)["image"].astype(np.float64)
    if got.shape != want.shape:
        print(f"parity: {model:10s} {case:12s} {dtype:5s} SHAPE MISMATCH got {got.shape} want {want.shape}")
        continue
    d = np.abs(got - want)
    finite = bool(np.isfinite(got).all())
    print(f"parity: {model:10s} {case:12s} {dtype:5s} max_abs={d.max():.3e} mean_abs={d.mean():.3e}"
          + ("" if finite else " NON-FINITE VALUES"))
