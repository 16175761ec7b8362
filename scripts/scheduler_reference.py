#!/usr/bin/env python3
"""Reference numbers for the Rust schedulers in src/diffusion/schedulers/, produced by the real diffusers.

For every case below the script builds the scheduler the way `Class.from_config(config, **overrides)` does,
calls `set_timesteps(steps)` and runs a denoising loop with a deterministic fake model:

    latents = x_init * init_noise_sigma
    for i, t in enumerate(timesteps):
        scaled = scheduler.scale_model_input(latents, t)
        model_output = 0.3 * scaled + 0.1 * cos(t / 100)
        latents = scheduler.step(model_output, t, latents).prev_sample

The `*/img2img` cases start at step k instead: `set_begin_index(k)`, `latents = add_noise(x0, x_init,
timesteps[k])`, then steps k.. (the multistep solvers start a fresh history there).

It records the timesteps, init_noise_sigma, the sample after every step and `add_noise(x0, noise, timesteps[k])`
for a couple of step indices `k` (on a fresh scheduler with `set_begin_index(k)`, the way the img2img pipelines
use it). Euler ancestral draws its per-step noise from a pre-generated list (also saved), by patching the
module's `randn_tensor`.

Output: tests/fixtures/schedulers/reference.safetensors (tensors) and reference.json (metadata).

Usage: python3 scripts/scheduler_reference.py [--out tests/fixtures/schedulers] [--fixtures /work/shared/fixtures]
(requires torch, diffusers and safetensors; made with diffusers 0.42.1)
"""

import argparse
import json
import math
import os

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module
from safetensors.torch import save_file

SHAPE = (1, 4, 3, 4)  # small latents keep the fixture small; the math is elementwise

KINDS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", use_karras_sigmas=False),
    ),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", use_karras_sigmas=True),
    ),
    "unipc": (UniPCMultistepScheduler, {}),
}


def with_keys(base, **extra):
    out = dict(base)
    out.update(extra)
    return out


def cases(sd15, sdxl):
    """(name, kind, config, steps, spacing override or None, img2img start index).

    sd15 / sdxl are the tiny-sd15 (DDIMScheduler, scaled_linear, leading, steps_offset 1) and
    tiny-sdxl (EulerDiscreteScheduler) scheduler configs; every case's config is saved in the fixture.
    """
    out = []

    def add(name, kind, config, steps, spacing=None, begin=0):
        out.append((name, kind, config, steps, spacing, begin))

    for kind in KINDS:
        sd = sdxl if kind in ("euler", "euler_a") else sd15
        add(f"{kind}/sd", kind, sd, 10)
        add(f"{kind}/vpred", kind, with_keys(sd, prediction_type="v_prediction"), 10)
        add(f"{kind}/trailing1", kind, sd, 1, "trailing")
        add(f"{kind}/trailing4", kind, sd, 4, "trailing")
        # Every key missing: the class's own defaults (linear betas; DDIM clips x0; linspace spacing elsewhere).
        add(f"{kind}/defaults", kind, {}, 10)
        pred = "epsilon" if kind == "euler_a" else "sample"  # euler_a has no "sample" prediction
        cosine = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": pred, "clip_sample": True}
        add(f"{kind}/cosine", kind, cosine, 7)
        zsnr = with_keys(sd, prediction_type="v_prediction", rescale_betas_zero_snr=True)
        add(f"{kind}/zsnr", kind, zsnr, 4, "trailing")
    add("ddim/sd_linspace", "ddim", with_keys(sd15, timestep_spacing="linspace"), 7)
    add("euler/karras", "euler", with_keys(sdxl, use_karras_sigmas=True), 10)
    add("euler/sdxl_linspace", "euler", with_keys(sdxl, timestep_spacing="linspace"), 7)
    add("dpmpp_2m/sigma_min20", "dpmpp_2m", with_keys(sd15, final_sigmas_type="sigma_min"), 20)
    add("dpmpp_2m_karras/sd25", "dpmpp_2m_karras", sd15, 25)
    # 50 Karras steps: the last timesteps round to the same integer (1, 1).
    add("dpmpp_2m_karras/sd50", "dpmpp_2m_karras", with_keys(sd15, timestep_spacing="linspace"), 50)
    add("unipc/order3", "unipc", with_keys(sd15, solver_order=3), 8)
    add(
        "euler/continuous_v",
        "euler",
        with_keys(sdxl, prediction_type="v_prediction", timestep_type="continuous"),
        6,
    )
    add(
        "euler/karras_range",
        "euler",
        with_keys(sdxl, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
        6,
    )
    add(
        "dpmpp_2m/lambda_clip",
        "dpmpp_2m",
        with_keys(sd15, lambda_min_clipped=-2.5, timestep_spacing="linspace"),
        6,
    )
    # A key DPM-Solver does not take (sigma_max, from an Euler config) is still read by its Karras conversion.
    add("dpmpp_2m_karras/euler_cfg", "dpmpp_2m_karras", with_keys(sdxl, sigma_max=10.0), 6)
    add("unipc/karras", "unipc", with_keys(sd15, use_karras_sigmas=True), 8)
    # predict_x0=False ends in inf * 0 = NaN at a zero final sigma in diffusers, hence sigma_min.
    add("unipc/noise_pred", "unipc", with_keys(sd15, predict_x0=False, final_sigmas_type="sigma_min"), 6)
    add("unipc/no_corrector", "unipc", with_keys(sd15, disable_corrector=[0, 2]), 6)
    # A short trained schedule: trained_betas and num_train_timesteps other than 1000.
    trained = {"num_train_timesteps": 100, "trained_betas": [round(0.001 + 0.0004 * i, 6) for i in range(100)]}
    for kind in ("ddim", "euler", "dpmpp_2m_karras"):
        add(f"{kind}/trained", kind, trained, 5)
    # img2img: latents = add_noise(x0, x_init, timesteps[k]) after set_begin_index(k), then steps k..
    for kind, k in [("ddim", 4), ("euler", 5), ("euler_a", 3), ("dpmpp_2m", 4), ("dpmpp_2m_karras", 4), ("unipc", 3)]:
        add(f"{kind}/img2img", kind, sdxl if kind in ("euler", "euler_a") else sd15, 10, begin=k)
    # lower_order_final=False with a zero final sigma gives inf/NaN in diffusers (order 2 at sigma 0), and so
    # does bh1 (B(h) = -inf times a zero residual), hence sigma_min here.
    add(
        "unipc/bh1_noLOF",
        "unipc",
        with_keys(sd15, solver_type="bh1", lower_order_final=False, final_sigmas_type="sigma_min"),
        6,
        "trailing",
    )
    return out


def build(kind, config, spacing):
    cls, overrides = KINDS[kind]
    kwargs = dict(overrides)
    if spacing is not None:
        kwargs["timestep_spacing"] = spacing
    return cls.from_config(config, **kwargs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/schedulers")
    ap.add_argument("--fixtures", default="/work/shared/fixtures", help="folder holding tiny-sd15/ and tiny-sdxl/")
    args = ap.parse_args()
    with open(os.path.join(args.fixtures, "tiny-sd15/scheduler/scheduler_config.json")) as f:
        sd15_ddim = json.load(f)
    with open(os.path.join(args.fixtures, "tiny-sdxl/scheduler/scheduler_config.json")) as f:
        sdxl_euler = json.load(f)

    gen = torch.Generator().manual_seed(1234)
    x_init = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    x0 = torch.randn(SHAPE, generator=gen, dtype=torch.float32) * 0.5
    add_noise_eps = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    tensors = {"x_init": x_init, "x0": x0, "add_noise_eps": add_noise_eps}
    meta = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__, "cases": []}

    noise_gen = torch.Generator().manual_seed(99)
    for name, kind, config, steps, spacing, begin in cases(sd15_ddim, sdxl_euler):
        sched = build(kind, config, spacing)
        sched.set_timesteps(steps)
        timesteps = [float(t) for t in sched.timesteps]
        init_noise_sigma = float(sched.init_noise_sigma)

        noise_list = []
        if kind == "euler_a":
            noise_list = [torch.randn(SHAPE, generator=noise_gen, dtype=torch.float32) for _ in timesteps[begin:]]
        pending = list(noise_list)

        def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
            assert tuple(shape) == SHAPE
            return pending.pop(0).to(dtype=dtype)

        euler_a_module.randn_tensor = fake_randn

        # diffusers finds the first step index by looking the first timestep up in `timesteps` and takes the
        # *second* match when it is duplicated (it then runs off the end of `sigmas`). The Rust API is driven by
        # step index, so in that case pin the start to index 0, as img2img's set_begin_index does.
        begin_index_forced = timesteps.count(timesteps[0]) > 1
        if (begin_index_forced or begin > 0) and hasattr(sched, "set_begin_index"):  # DDIM has none
            sched.set_begin_index(begin)

        if begin > 0:
            latents = sched.add_noise(x0, x_init, sched.timesteps[begin : begin + 1])
        else:
            latents = x_init * sched.init_noise_sigma
        samples = []
        for t in sched.timesteps[begin:]:
            scaled = sched.scale_model_input(latents, t)
            model_output = 0.3 * scaled + 0.1 * math.cos(float(t) / 100.0)
            latents = sched.step(model_output, t, latents).prev_sample
            samples.append(latents.clone())
        assert not pending
        assert all(torch.isfinite(s).all() for s in samples), name

        add_noise_steps = sorted({0, steps // 2})
        noised = []
        for k in add_noise_steps:
            fresh = build(kind, config, spacing)
            fresh.set_timesteps(steps)
            if hasattr(fresh, "set_begin_index"):
                fresh.set_begin_index(k)
            noised.append(fresh.add_noise(x0, add_noise_eps, fresh.timesteps[k : k + 1]))

        tensors[f"{name}/samples"] = torch.stack(samples).contiguous()
        tensors[f"{name}/add_noise"] = torch.stack(noised).contiguous()
        if noise_list:
            tensors[f"{name}/noise"] = torch.stack(noise_list).contiguous()
        meta["cases"].append(
            {
                "name": name,
                "kind": kind,
                "config": config,
                "steps": steps,
                "spacing": spacing,
                "timesteps": timesteps,
                "init_noise_sigma": init_noise_sigma,
                "add_noise_steps": add_noise_steps,
                "begin_index_forced": begin_index_forced,
                "begin": begin,
            }
        )
        print(f"{name:28s} steps={steps:2d} timesteps={[round(t, 3) for t in timesteps]}")

    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, "reference.safetensors"))
    os.chmod(os.path.join(args.out, "reference.safetensors"), 0o644)
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        # one line per case keeps the file small and diffable
        head = {k: v for k, v in meta.items() if k != "cases"}
        f.write(json.dumps(head)[:-1] + ', "cases": [\n')
        f.write(",\n".join(json.dumps(c) for c in meta["cases"]))
        f.write("\n]}\n")


if __name__ == "__main__":
    main()
