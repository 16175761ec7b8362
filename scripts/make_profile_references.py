#!/usr/bin/env python3
"""How many times diffusers calls each UNet component in one forward pass of the fixture UNets
(tests/fixtures/profile-calls.json): the component names of `sd-rbee bench unet --profile`, counted by the
same module hooks `benches/torch_baseline.py unet --profile` times. tests/cli_generate.rs checks that
sd-rbee's profile finds the same components the same number of times (SiLU aside: sd-rbee fuses it into
the norm before it).

Run from the repository root with torch and diffusers 0.42 installed:  python3 scripts/make_profile_references.py
"""
import json, os, re, sys

import torch
from diffusers import UNet2DConditionModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "benches"))
from torch_baseline import profile  # noqa: E402

LATENT = 8


def calls(model):
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, "tests", "fixtures", model, "unet")).eval()
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, cfg.in_channels, LATENT, LATENT, generator=g)
    ehs = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    added = None
    if cfg.addition_embed_type == "text_time":
        px = float(LATENT * 8)
        added = {"text_embeds": torch.randn(2, cfg.projection_class_embeddings_input_dim
                                            - 6 * cfg.addition_time_embed_dim, generator=g),
                 "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]] * 2)}
    with torch.inference_mode():
        lines = profile(unet, lambda: unet(lat, 981, encoder_hidden_states=ehs, added_cond_kwargs=added), "cpu")
    found = (re.match(r"component=(\S+) calls=([0-9]+)", l) for l in lines)
    return {m.group(1): int(m.group(2)) for m in found if m and m.group(1) != "silu"}


if __name__ == "__main__":
    out = {"latent": LATENT, **{m: calls(m) for m in ("tiny-sd15", "tiny-sdxl")}}
    path = os.path.join(ROOT, "tests", "fixtures", "profile-calls.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(path, out)
