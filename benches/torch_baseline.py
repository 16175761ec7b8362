#!/usr/bin/env python3
"""PyTorch/diffusers baselines to run beside `sd-rbee bench`, in the same session (compare_with_pytorch.py
runs both halves and prints the ratios).

  torch_baseline.py pipeline MODEL_DIR [--steps 20] [--width 96 --height 64] [--batch 1,2,4] [--threads 2]
      median ms per denoising step (classifier-free guidance on) and images/s of a diffusers pipeline folder,
      per batch size (that many images per call, one generator per image)
  torch_baseline.py sd15-unet OUT_DIR [--latent 64] [--batch 1,2,4,8] [--threads 2]
      writes a full-size SD 1.5 UNet (860M params, seeded random weights, diffusers naming, ~3.4 GB f32) to
      OUT_DIR the first time (sd-rbee then loads the very same weights), then prints, per batch size, the
      median seconds of one forward pass at 2 × batch rows (classifier-free guidance) and the peak RSS
  torch_baseline.py random-pipeline --arch sd15|sdxl [--width 512 --height 512] [--steps 20] [--batch 1,4,8]
          [--dtype f16] [--device cuda]
      the whole pipeline (text encoders, UNet, VAE) with seeded random weights, built in memory from sd-rbee's
      built-in configurations: the diffusers half of `sd-rbee bench pipeline --model random:sd15|random:sdxl`
  torch_baseline.py unet --arch sd15|sdxl [--latent N] [--batch 1,2,4] [--dtype f32|f16] [--device cpu|cuda]
      the same for the real SD 1.5 or SDXL UNet built in memory with PyTorch's default (seeded) init: the
      PyTorch half of `sd-rbee bench unet --arch`; `--profile` adds one call timed module by module
      (`profile: ...` lines, the components `sd-rbee bench unet --profile` names)

Needs torch and diffusers (pip install torch diffusers transformers safetensors; several GB). Prints one
`baseline: ...` line per batch size, so a script can read it.
"""
import argparse, contextlib, os, resource, statistics, time

import torch

SD15 = dict(sample_size=64, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5)


# The rest of sd-rbee's built-in configurations (src/diffusion/checkpoint/configs.rs), for whole pipelines with
# seeded random weights: the VAE, the CLIP text encoders, the scheduler.
VAE = dict(act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, in_channels=3, out_channels=3, latent_channels=4,
           layers_per_block=2, norm_num_groups=32, sample_size=512)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              projection_dim=768, eos_token_id=49407)
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-5,
                  projection_dim=1280, eos_token_id=49407)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
                 prediction_type="epsilon")


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def pipeline(a):
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(a.path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for images in a.batch:
        stamps, walls = [], []
        def cb(p, i, t, kw):
            stamps.append(time.perf_counter()); return kw
        for run in range(1 + a.runs):  # the first run warms up
            stamps.clear()
            gens = [torch.Generator().manual_seed(i) for i in range(images)]
            t0 = time.perf_counter()
            pipe(["a photograph of an astronaut riding a horse"] * images, negative_prompt=["blurry"] * images,
                 num_inference_steps=a.steps, guidance_scale=7.5, height=a.height, width=a.width,
                 generator=gens, callback_on_step_end=cb)
            if run > 0:
                walls.append(time.perf_counter() - t0)
        steps = [b - x for x, b in zip(stamps, stamps[1:])]
        wall = statistics.median(walls)
        print(f"baseline: diffusers pipeline {os.path.basename(a.path.rstrip('/'))} {a.width}x{a.height} "
              f"images={images} threads={torch.get_num_threads()} median_step_ms={statistics.median(steps) * 1000:.2f} "
              f"median_image_ms={wall * 1000:.1f} images_per_s={images / wall:.3f} peak_rss_gb={peak_rss_gb():.2f}",
              flush=True)


def random_pipeline(a):
    """The diffusers half of `sd-rbee bench pipeline --model random:ARCH`: the whole pipeline (text encoders,
    UNet, scheduler, VAE) with PyTorch's seeded default init, built on the device."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizerFast
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    xl = a.arch == "sdxl"
    tokenizer = lambda pad: CLIPTokenizerFast(tokenizer_file=a.tokenizer, bos_token="<|startoftext|>",
                                              eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad,
                                              model_max_length=77)
    torch.manual_seed(0)
    with torch.device(a.device):
        unet = UNet2DConditionModel(**(SDXL if xl else SD15))
        vae = AutoencoderKL(**VAE, scaling_factor=0.13025 if xl else 0.18215, force_upcast=xl)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        if xl:
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G))
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer("<|endoftext|>"))
    if xl:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer("!"),
                                         scheduler=EulerDiscreteScheduler.from_config(SCHEDULER))
    else:
        pipe = StableDiffusionPipeline(**parts, scheduler=DDIMScheduler.from_config(SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(a.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    guidance = 5.0 if xl else 7.5
    for images in a.batch:
        stamps, walls = [], []

        def cb(p, i, t, kw):  # host stamps, no sync (that would slow diffusers down): on CUDA the host runs
            stamps.append(time.perf_counter())  # at most a launch queue ahead, so steps still read as the GPU's
            return kw
        for run in range(1 + a.runs):  # the first run warms up
            stamps.clear()
            gens = [torch.Generator(a.device).manual_seed(i) for i in range(images)]
            sync(a.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = pipe(["a photograph of an astronaut riding a horse"] * images, negative_prompt=["blurry"] * images,
                           num_inference_steps=a.steps, guidance_scale=guidance, height=a.height, width=a.width,
                           generator=gens, callback_on_step_end=cb, output_type="pil")
            sync(a.device)
            if run > 0:
                walls.append(time.perf_counter() - t0)
            assert len(out.images) == images
        steps = [b - x for x, b in zip(stamps, stamps[1:])]
        wall = statistics.median(walls)
        mem = f" peak_device_gb={torch.cuda.max_memory_reserved() / 1e9:.2f}" if a.device == "cuda" else ""
        print(f"baseline: diffusers pipeline random:{a.arch} {a.dtype} {a.width}x{a.height} steps={a.steps} "
              f"images={images} threads={torch.get_num_threads()} median_step_ms={statistics.median(steps) * 1000:.2f} "
              f"median_image_ms={wall * 1000:.1f} images_per_s={images / wall:.3f} peak_rss_gb={peak_rss_gb():.2f}{mem}",
              flush=True)


# diffusers module classes, named as sd-rbee's profile scopes name the same components
# (src/diffusion/profile.rs); a class not listed is charged to the listed module around it
COMPONENTS = {"UNet2DConditionModel": "unet", "CrossAttnDownBlock2D": "down_block", "DownBlock2D": "down_block",
              "UNetMidBlock2DCrossAttn": "mid_block", "CrossAttnUpBlock2D": "up_block", "UpBlock2D": "up_block",
              "ResnetBlock2D": "resnet", "Transformer2DModel": "transformer",
              "BasicTransformerBlock": "transformer_block", "Attention": "attention", "FeedForward": "feed_forward",
              "Conv2d": "conv", "LoRACompatibleConv": "conv", "Linear": "linear", "LoRACompatibleLinear": "linear",
              "GroupNorm": "group_norm", "LayerNorm": "layer_norm", "TimestepEmbedding": "time_embedding",
              "Downsample2D": "downsample", "Upsample2D": "upsample", "SiLU": "silu"}


def profile(unet, call, device):
    """One call with every listed module timed on its own (the device waited for at its start and end):
    `component=NAME calls=N own_ms=X incl_ms=Y share=Z%` lines, own = inclusive less nested modules'."""
    stack, totals = [], {}

    def pre(name, *_):
        sync(device)
        stack.append([name, time.perf_counter(), 0.0])

    def post(*_):
        sync(device)
        name, start, children = stack.pop()
        inclusive = time.perf_counter() - start
        if stack:
            stack[-1][2] += inclusive
        t = totals.setdefault(name, [0, 0.0, 0.0])
        t[0] += 1
        t[1] += inclusive
        t[2] += inclusive - children

    handles = []
    for m in unet.modules():
        name = COMPONENTS.get(type(m).__name__)
        if name:
            handles += [m.register_forward_pre_hook(lambda *x, n=name: pre(n)), m.register_forward_hook(post)]
    sync(device)
    t0 = time.perf_counter()
    call()
    sync(device)
    wall = time.perf_counter() - t0
    for h in handles:
        h.remove()
    lines = [f"component={n} calls={c} own_ms={own * 1e3:.3f} incl_ms={inc * 1e3:.3f} share={100 * own / wall:.1f}%"
             for n, (c, inc, own) in sorted(totals.items(), key=lambda kv: (-kv[1][2], kv[0]))]
    covered = sum(t[2] for t in totals.values())
    return lines + [f"component=total wall_ms={wall * 1e3:.3f} covered_ms={covered * 1e3:.3f}"]


@contextlib.contextmanager
def profiler_window(device):
    """The timed calls, marked for a profiler attached to the process (cudaProfilerStart/Stop), as sd-rbee
    bench unet marks its own: scripts/gpu/kernel_census.c counts the kernels inside."""
    if device == "cuda":
        torch.cuda.profiler.start()
    try:
        yield
    finally:
        if device == "cuda":
            torch.cuda.profiler.stop()


def time_unet(unet, what, latent, a, dtype, device):
    cfg = unet.config
    g = torch.Generator().manual_seed(1234)
    for images in a.batch:
        rows = 2 * images
        ehs = torch.randn(rows, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
        lat = torch.randn(rows, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
        added = None
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            px = float(latent * 8)
            added = {"text_embeds": torch.randn(rows, pooled, generator=g).to(device, dtype),
                     "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]] * rows).to(device, dtype)}
        with torch.inference_mode():
            for _ in range(2):  # warm-ups, as sd-rbee bench unet does
                unet(lat, 981, encoder_hidden_states=ehs, added_cond_kwargs=added)
            sync(device)
            ts = []
            with profiler_window(device):
                for _ in range(a.runs):
                    t0 = time.perf_counter()
                    unet(lat, 981, encoder_hidden_states=ehs, added_cond_kwargs=added)
                    sync(device)
                    ts.append(time.perf_counter() - t0)
        med = statistics.median(ts)
        mem = (f" peak_device_gb={torch.cuda.max_memory_reserved() / 1e9:.2f}"
               f" peak_allocated_gb={torch.cuda.max_memory_allocated() / 1e9:.2f}") if device == "cuda" else ""
        print(f"baseline: diffusers {what} {a.dtype}{'' if getattr(a, 'tf32', 'default') == 'default' else ' tf32=' + a.tf32} unet latent {latent}x{latent} images {images} (batch {rows}) "
              f"threads={torch.get_num_threads()} median_s={med:.4f} image_steps_per_s={images / med:.3f} "
              f"peak_rss_gb={peak_rss_gb():.2f}{mem}", flush=True)
        if a.profile:
            with torch.inference_mode():
                lines = profile(unet, lambda: unet(lat, 981, encoder_hidden_states=ehs, added_cond_kwargs=added),
                                device)
            for line in lines:
                print(f"profile: diffusers unet images {images} {line}", flush=True)


def sd15_unet(a):
    from diffusers import UNet2DConditionModel
    if not os.path.exists(os.path.join(a.path, "config.json")):
        torch.manual_seed(0)
        UNet2DConditionModel(**SD15).save_pretrained(a.path, safe_serialization=True)
    unet = UNet2DConditionModel.from_pretrained(a.path, torch_dtype=torch.float32).eval()
    time_unet(unet, "sd15", a.latent or 64, a, torch.float32, "cpu")


def unet(a):
    from diffusers import UNet2DConditionModel
    config = {"sd15": SD15, "sdxl": SDXL}[a.arch]
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    with torch.device(a.device):  # PyTorch's default init, run on the device (SDXL's 2.6B on a CPU is slow)
        model = UNet2DConditionModel(**config).to(dtype).eval()
    if a.device == "cuda" and a.tf32 != "default":
        torch.backends.cuda.matmul.allow_tf32 = a.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = a.tf32 == "on"
    time_unet(model, a.arch, a.latent or config["sample_size"], a, dtype, a.device)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["pipeline", "random-pipeline", "sd15-unet", "unet"])
    ap.add_argument("path", nargs="?")
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--steps", type=int, default=20); ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--height", type=int, default=64); ap.add_argument("--latent", type=int, default=None)
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets",
                                                         "clip-tokenizer.json"),
                    help="random-pipeline: the CLIP tokenizer.json (sd-rbee's built-in one by default)")
    ap.add_argument("--profile", action="store_true",
                    help="unet: after the timed calls, one call timed module by module (as sd-rbee bench unet --profile)")
    ap.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                    help="CUDA f32: PyTorch's defaults (cuDNN convolutions may use TF32, matmuls do not), TF32 "
                         "for both, or for neither")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.what not in ("unet", "random-pipeline") and not a.path:
        ap.error(f"{a.what} needs a path")
    {"pipeline": pipeline, "random-pipeline": random_pipeline, "sd15-unet": sd15_unet, "unet": unet}[a.what](a)
