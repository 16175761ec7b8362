#!/usr/bin/env python3
"""The reference for tiled VAE decoding (tests/vae_tiling.rs): diffusers' `AutoencoderKL` of the tiny SD 1.5
fixture with `enable_tiling()` decodes seeded latents much larger than its tile (64 px, i.e. 8 latents), and
the same latents decoded whole, for contrast.

  /work/venv/bin/python scripts/make_vae_tiling_reference.py   # writes tests/fixtures/vae-tiling/reference.safetensors
"""
import os
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, "tests/fixtures/tiny-sd15/vae"), torch_dtype=torch.float32).eval()
g = torch.Generator().manual_seed(20261130)
# 22 × 30 latents: tiles start every 6 latents, the last ones partial in both directions.
latents = torch.randn(1, 4, 22, 30, generator=g)
with torch.inference_mode():
    whole = vae.decode(latents).sample
    vae.enable_tiling()
    tiled = vae.decode(latents).sample
out = os.path.join(ROOT, "tests/fixtures/vae-tiling/reference.safetensors")
save_file({"latents": latents.contiguous(), "tiled": tiled.contiguous(), "whole": whole.contiguous()}, out)
print(out, tuple(tiled.shape), "tiled vs whole max abs:", (tiled - whole).abs().max().item())
