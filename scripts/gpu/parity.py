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
    # diffusers' own float16 error on this case (computed on the CPU by scripts/make_f16_references.py)
    theirs = ""
    f16_refs = os.path.join(fixtures, model, "expected_f16.safetensors")
    if dtype.startswith("f16") and os.path.exists(f16_refs):
        t = np.abs(load_file(f16_refs)[f"txt2img_{case}_image"].astype(np.float64) - want)
        theirs = f" (diffusers f16 on the CPU: max_abs={t.max():.3e} mean_abs={t.mean():.3e})"
    print(f"parity: {model:10s} {case:12s} {dtype:5s} max_abs={d.max():.3e} mean_abs={d.mean():.3e}"
          + ("" if finite else " NON-FINITE VALUES") + theirs)
