#!/usr/bin/env python3
"""diffusers' own float16 results for the fixture models (tests/fixtures/<model>/expected_f16.safetensors),
and how sensitive each text-to-image case is to float16 rounding.

The parity bound for float16 is 1e-2 max abs from diffusers' float32 image. One case cannot meet it in any
float16 implementation: SDXL with DDIM built from the Euler config (DDIM's defaults switch on clip_sample;
guidance 5). This script measures that, on the CPU, three ways:
  - diffusers' whole pipeline in float16 (the tensors this script saves, which tests/parity.rs compares
    sd-rbee's float16 error with);
  - diffusers in float32 with only the UNet's output rounded to float16 once per call (the least any float16
    UNet does);
  - diffusers in float32 with N(0, s²) noise added to the guided noise prediction at every step: the
    image's max abs change per unit of noise is the case's amplification.

Run from the repository root with torch and diffusers 0.42 installed:  python3 scripts/make_f16_references.py
"""
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_f64_references import ROOT, SD15, SDXL, images as reference_images  # noqa: E402  the same cases


class Perturbed(torch.nn.Module):
    """Wraps a UNet: rounds its output to float16 and/or adds seeded noise of a given scale to it."""

    def __init__(self, unet, round_f16=False, noise=0.0):
        super().__init__()
        self.unet, self.round_f16, self.noise = unet, round_f16, noise
        self.gen = torch.Generator().manual_seed(7)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.unet, name)

    def forward(self, *args, **kwargs):
        out = self.unet(*args, **kwargs)
        s = out[0] if isinstance(out, tuple) else out.sample
        if self.round_f16:
            s = s.half().float()
        if self.noise:
            # the same noise on both CFG rows, so the guided prediction moves by exactly this much
            n = torch.randn(s[:1].shape, generator=self.gen) * self.noise
            s = s + n
        return (s,) if isinstance(out, tuple) else type(out)(sample=s)


def images(pipe, folder, cases, guidance, dtype):
    return {k: v.float() for k, v in reference_images(pipe, folder, cases, guidance, dtype).items()}


def run(model, cls, cases, guidance):
    d = os.path.join(ROOT, model)
    want = load_file(os.path.join(d, "expected.safetensors"))

    def err(got):
        return {k: (got[k] - want[k]).abs().max().item() for k in got}

    pipe = cls.from_pretrained(d, torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    f16 = images(pipe, d, cases, guidance, torch.float16)
    save_file(f16, os.path.join(d, "expected_f16.safetensors"))

    pipe = cls.from_pretrained(d, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    pipe.unet = Perturbed(unet, round_f16=True)
    rounded = err(images(pipe, d, cases, guidance, torch.float32))
    pipe.unet = Perturbed(unet, noise=1e-4)
    noisy = err(images(pipe, d, cases, guidance, torch.float32))
    print(f"{model}: max abs from diffusers' float32 image")
    print(f"  {'case':26s} {'diffusers f16':>14s} {'UNet output to f16':>19s} {'noise 1e-4: gain':>17s}")
    for k, e in err(f16).items():
        print(f"  {k:26s} {e:14.3e} {rounded[k]:19.3e} {noisy[k] / 1e-4:17.1f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    run("tiny-sd15", StableDiffusionPipeline, SD15, 7.5)
    run("tiny-sdxl", StableDiffusionXLPipeline, SDXL, 5.0)
