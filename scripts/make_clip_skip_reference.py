#!/usr/bin/env python3
"""The image diffusers makes from the tiny SD 1.5 fixture with clip skip (A1111's 2 and 3: diffusers' clip_skip=1
and 2, the text encoder's hidden_states[-2] / [-3] through its final layer norm), DDIM, 10 steps, from the
fixture's initial_latents.

Usage: make_clip_skip_reference.py tests/fixtures/tiny-sd15 OUT.safetensors
"""
import json, os, sys

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

folder, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
e = json.load(open(os.path.join(folder, "expected.json")))
ref = load_file(os.path.join(folder, "expected.safetensors"))
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
te = pipe.text_encoder
final_norm = getattr(te, "text_model", te).final_layer_norm  # transformers 5 has no `text_model` attribute


@torch.no_grad()
def embeds(text, clip_skip):
    # diffusers' encode_prompt with clip_skip, written out (it reaches for `text_encoder.text_model`)
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = te(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return final_norm(hidden)


images = {}
for a1111 in (2, 3):
    images[f"clip_skip_{a1111}_image"] = pipe(
        prompt_embeds=embeds(e["prompt"], a1111 - 1), negative_prompt_embeds=embeds(e["negative_prompt"], a1111 - 1),
        width=e["width"], height=e["height"], num_inference_steps=10, guidance_scale=7.5,
        latents=ref["initial_latents"], output_type="pt").images.contiguous()
save_file(images, out)
print({k: float((v - ref["txt2img_ddim_image"]).abs().max()) for k, v in images.items()})
