#!/usr/bin/env python3
"""Writes a full-size SD 1.5 UNet with seeded random weights (torch only, no diffusers) from a manifest of
tensor names and shapes: OUT_DIR/config.json + OUT_DIR/diffusion_pytorch_model.fp16.safetensors (f16, 1.7 GB).
sd-rbee's find_weights falls back to the .fp16. file in f32 too (converting), and the PyTorch baseline loads
the same file, so both sides run identical weights.

  make_unet.py MANIFEST.json CONFIG.json OUT_DIR [DEVICE]
"""
import json, math, os, shutil, sys, time
import torch
from safetensors.torch import save_file

manifest, config, out, device = sys.argv[1], sys.argv[2], sys.argv[3], (sys.argv[4] if len(sys.argv) > 4 else "cpu")
t0 = time.time()
os.makedirs(out, exist_ok=True)
g = torch.Generator(device=device).manual_seed(0)
tensors = {}
for name, shape in json.load(open(manifest))["tensors"]:
    if len(shape) == 1:
        # the only 1-D weights are norm scales (ones); biases are zeros
        t = torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
    else:
        fan_in = math.prod(shape[1:])
        t = torch.randn(shape, generator=g, device=device) / math.sqrt(fan_in)
    tensors[name] = t.to(torch.float16).cpu().contiguous()
save_file(tensors, os.path.join(out, "diffusion_pytorch_model.fp16.safetensors"))
shutil.copy(config, os.path.join(out, "config.json"))
n = sum(t.numel() for t in tensors.values())
print(f"make_unet: {len(tensors)} tensors, {n / 1e6:.1f}M params, f16, {time.time() - t0:.1f}s -> {out}")
