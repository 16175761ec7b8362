#!/usr/bin/env python3
"""The tiny pipelines' PyTorch/diffusers baseline for .gpu/run.sh; prints `baseline: ...` lines.

  torch_bench.py pipeline MODEL_DIR --device cuda --dtypes f32,f16 [--steps 20 --width 96 --height 64 --runs 3]

Median ms per denoising step (classifier-free guidance on, batch 1) and median whole-image ms, per dtype.
f32 = PyTorch's defaults (cuDNN convolutions may use TF32, matmuls do not); f32-notf32 = TF32 off everywhere.
The full-size UNet halves are benches/torch_baseline.py's.
"""
import argparse, os, statistics, time, warnings
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
try:
    import diffusers, transformers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
except Exception as e:  # the script still reports why it cannot run below
    print("baseline-env: import:", e, flush=True)

DT = {"f32": torch.float32, "f32-notf32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def set_tf32(variant):
    strict = variant == "f32-notf32"
    torch.backends.cudnn.allow_tf32 = not strict
    torch.backends.cuda.matmul.allow_tf32 = False


def pipeline(a):
    from diffusers import DiffusionPipeline
    dev = torch.device(a.device)
    for variant in a.dtypes.split(","):
        dt = DT[variant]
        set_tf32(variant)
        pipe = DiffusionPipeline.from_pretrained(a.path, torch_dtype=dt).to(dev)
        pipe.set_progress_bar_config(disable=True)
        stamps = []

        def cb(p, i, t, kw):
            sync(dev)
            stamps.append(time.perf_counter())
            return kw

        steps, images = [], []
        for run in range(a.runs + 1):  # the first run warms up
            stamps.clear()
            sync(dev)
            t0 = time.perf_counter()
            pipe("a photograph of an astronaut riding a horse", negative_prompt="blurry", num_inference_steps=a.steps,
                 guidance_scale=7.5, height=a.height, width=a.width, callback_on_step_end=cb,
                 generator=torch.Generator().manual_seed(0))
            sync(dev)
            if run > 0:
                images.append((time.perf_counter() - t0) * 1000)
                steps += [(b - x) * 1000 for x, b in zip(stamps, stamps[1:])]
        print(f"baseline: diffusers pipeline {os.path.basename(a.path.rstrip('/'))} {a.width}x{a.height} "
              f"steps={a.steps} device={a.device} dtype={variant} median_step_ms={statistics.median(steps):.2f} "
              f"median_image_ms={statistics.median(images):.1f}", flush=True)
        del pipe
        if dev.type == "cuda":
            torch.cuda.empty_cache()


ap = argparse.ArgumentParser()
ap.add_argument("what", choices=["pipeline"])
ap.add_argument("path")
ap.add_argument("--device", default="cuda")
ap.add_argument("--dtypes", default="f32,f16")
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--width", type=int, default=96)
ap.add_argument("--height", type=int, default=64)
ap.add_argument("--runs", type=int, default=3)
a = ap.parse_args()
print(f"baseline-env: torch {torch.__version__} cuda={torch.version.cuda} "
      f"gpu={torch.cuda.get_device_name(0) if torch.cuda.is_available() else None} threads={torch.get_num_threads()}",
      flush=True)
pipeline(a)
