#!/usr/bin/env python3
"""Float64 diffusers references for the fixture models (tests/fixtures/<model>/expected_f64.safetensors).

The float32 references in expected.safetensors are one float32 rounding of each computation. For a
well-conditioned case that is within ~1e-5 of the exact result, but SDXL with DDIM built from the Euler
config (clip_sample=True by DDIM's defaults, guidance 5) amplifies float32 rounding: diffusers' own float32
result moves by ~3e-4 when PyTorch runs it on 1 thread instead of 2. Float64 removes that noise, so these
tensors check the arithmetic itself, tightly, for every text-to-image case.

Run from the repository root with torch and diffusers 0.42 installed:  python3 scripts/make_f64_references.py
"""
import os
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UniPCMultistepScheduler)
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SD15 = {"ddim": (DDIMScheduler, {}), "euler": (EulerDiscreteScheduler, {}),
        "dpmpp_2m": (DPMSolverMultistepScheduler, {}), "unipc": (UniPCMultistepScheduler, {})}
SDXL = {"euler": (EulerDiscreteScheduler, {}), "ddim": (DDIMScheduler, {}),
        "turbo_1step": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"})}


def images(pipe, folder, cases, guidance, dtype):
    """The text-to-image cases from the fixture's initial latents (in `dtype`), by name; the pipeline keeps
    its scheduler."""
    original = pipe.scheduler
    lat = load_file(os.path.join(folder, "expected.safetensors"))["initial_latents"].to(dtype)
    out = {}
    for name, (sched, extra) in cases.items():
        pipe.scheduler = sched.from_config(original.config, **extra)
        turbo = name == "turbo_1step"
        img = pipe(prompt=PROMPT, negative_prompt=None if turbo else NEGATIVE, num_inference_steps=1 if turbo else 10,
                   guidance_scale=0.0 if turbo else guidance, height=64, width=96, latents=lat.clone(),
                   output_type="pt").images
        out[f"txt2img_{name}_image"] = img.contiguous()
    pipe.scheduler = original
    return out


def run(model, cls, cases, guidance):
    d = os.path.join(ROOT, model)
    pipe = cls.from_pretrained(d, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    out = images(pipe, d, cases, guidance, torch.float64)
    save_file(out, os.path.join(d, "expected_f64.safetensors"))
    print(model, sorted(out))


if __name__ == "__main__":
    torch.set_num_threads(2)
    run("tiny-sd15", StableDiffusionPipeline, SD15, 7.5)
    run("tiny-sdxl", StableDiffusionXLPipeline, SDXL, 5.0)
