#!/usr/bin/env python3
"""The tensor names and shapes diffusers/transformers give the real SD 1.5, 2.1 and XL models (and the inpainting
variants), built on the meta device (no weights), with the configurations sd-rbee has built in for single-file
checkpoints (src/diffusion/checkpoint/configs.rs: keep the two equal). tests check that every one of these tensors
maps to a tensor of the same size in the real checkpoint listings (make_checkpoint_listings.py).

Usage: make_diffusers_listings.py OUT_DIR   (writes diffusers-<arch>.json)
Needs torch, diffusers, transformers.
"""
import json, os, sys

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              projection_dim=768)
OPEN_CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-5,
                   projection_dim=512)
OPEN_CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-5,
                       projection_dim=1280)
VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
           layers_per_block=2, norm_num_groups=32)


def unet(family, in_channels):
    if family == "sdxl":
        return dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    in_channels=in_channels, out_channels=4, layers_per_block=2,
                    projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
                    use_linear_projection=True)
    v2 = family == "sd2"
    return dict(attention_head_dim=[5, 10, 20, 20] if v2 else 8, block_out_channels=[320, 640, 1280, 1280],
                cross_attention_dim=1024 if v2 else 768,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=in_channels, out_channels=4,
                layers_per_block=2, use_linear_projection=v2)


def listing(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def main():
    out = sys.argv[1]
    for name, family, channels in [("sd15", "sd1", 4), ("sd15-inpaint", "sd1", 9), ("sd21", "sd2", 4),
                                   ("sd2-inpaint", "sd2", 9), ("sdxl", "sdxl", 4)]:
        with torch.device("meta"):
            u = UNet2DConditionModel(**unet(family, channels))
            v = AutoencoderKL(**VAE)
            te_cfg = OPEN_CLIP_H if family == "sd2" else CLIP_L
            te = CLIPTextModel(CLIPTextConfig(**te_cfg))
            parts = {"unet": listing(u), "vae": listing(v), "text_encoder": listing(te)}
            configs = {"unet": unet(family, channels), "vae": VAE, "text_encoder": te_cfg}
            if family == "sdxl":
                parts["text_encoder_2"] = listing(CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIG_G)))
                configs["text_encoder_2"] = OPEN_CLIP_BIG_G
        doc = {"made_by": "scripts/make_diffusers_listings.py", "configs": configs, "tensors": parts}
        with open(os.path.join(out, f"diffusers-{name}.json"), "w") as f:
            json.dump(doc, f, indent=0, sort_keys=True)
        print(name, {k: len(v) for k, v in parts.items()})


if __name__ == "__main__":
    main()
