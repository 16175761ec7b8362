#!/usr/bin/env python3
"""LoRA references beyond the shared fixtures: LoCon convolutions, SGM (original-numbering) names on SD 1.x, and a
UNet with another block layout (three blocks, one layer each), each with the images diffusers + PEFT compute.

Usage: make_lora_variants.py FIXTURES OUT [KEEP]
  FIXTURES: the shared fixtures folder (tiny-sd15, tiny-sdxl, and fixtures-src/ beside it)
  OUT: where the variant pipelines are made (a scratch folder)
  KEEP: where to copy what the tests need (tests/fixtures/lora-variants): each variant's lora/, and unet/ of
        the variants with their own UNet; tests/lora.rs puts the rest of the pipeline back from tiny-sd15/-sdxl

Needs torch, diffusers 0.42.1, transformers, peft 0.21 (pip install torch diffusers transformers peft). Runs
../fixtures-src/make_lora_fixtures.py on each variant, so the LoRAs and references are made exactly as the shared
ones are. Writes, under OUT:
  sd15-locon/          tiny-sd15 with a LoCon LoRA (the resnets' 3x3 convolutions too)
  sdxl-locon-sgm/      tiny-sdxl with a LoCon LoRA named in the SGM numbering
  sd15-3blocks/        a new SD 1.x UNet: blocks (32, 64, 64), cross-attention in the first two, one layer per
                       block, with a LoCon LoRA
  sdxl-3blocks-sgm/    a new SDXL UNet: blocks (32, 64, 64), cross-attention in the last two (1 and 2 transformer
                       layers), one layer per block, LoCon LoRA in SGM names (numbered unlike any real model)
  sd15-peft/, sdxl-peft/  the shared fixtures' own LoRAs as diffusers' `save_lora_weights` writes them (the
                       PEFT layout, `unet.….lora_A.weight`, alphas in the `lora_adapter_metadata`), with the
                       shared references: loading either layout must give the same images
diffusers 0.42 maps SGM names only for SDXL pipelines, so the SD 1.x variants use diffusers names.
Each variant folder is a whole pipeline (the shared components are copied) with lora/ as in the shared fixtures.
"""
import json, os, shutil, subprocess, sys

import torch


def copy_model(src, dst):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lora", "*.png", "expected_f64.safetensors"))


def three_block_unet(dst, seed, xl):
    from diffusers import UNet2DConditionModel
    sys.path.insert(0, FIXTURES_SRC)
    from make_fixtures import randomize  # the shared fixtures' seeded initialisation

    if xl:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=32)
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    randomize(unet.eval(), seed)
    shutil.rmtree(os.path.join(dst, "unet"))
    unet.to(torch.float16).save_pretrained(os.path.join(dst, "unet"))


def peft_copy(fixtures, base, dst):
    """The shared kohya LoRAs of `base`, loaded by diffusers and saved back in its own (PEFT) layout."""
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    src = os.path.join(fixtures, base)
    os.makedirs(os.path.join(dst, "lora"), exist_ok=True)
    for name in ("style", "detail"):
        pipe = DiffusionPipeline.from_pretrained(src, torch_dtype=torch.float32)
        pipe.load_lora_weights(os.path.join(src, "lora", f"{name}.safetensors"), adapter_name=name)
        parts = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet, adapter_name=name),
                 "text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder, adapter_name=name)}
        meta = {"unet_lora_adapter_metadata": pipe.unet.peft_config[name].to_dict(),
                "text_encoder_lora_adapter_metadata": pipe.text_encoder.peft_config[name].to_dict()}
        if getattr(pipe, "text_encoder_2", None) is not None:
            parts["text_encoder_2_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder_2, adapter_name=name)
            meta["text_encoder_2_lora_adapter_metadata"] = pipe.text_encoder_2.peft_config[name].to_dict()
        type(pipe).save_lora_weights(os.path.join(dst, "lora"), weight_name=f"{name}.safetensors", **parts, **meta)
    for f in ("expected.json", "expected.safetensors"):
        shutil.copy(os.path.join(src, "lora", f), os.path.join(dst, "lora", f))


def lora(model, *flags):
    script = os.path.join(FIXTURES_SRC, "make_lora_fixtures.py")
    subprocess.run([sys.executable, script, model, *flags], check=True, stdout=subprocess.DEVNULL)
    print(model, json.load(open(os.path.join(model, "lora", "expected.json")))["max_abs_change_from_base"])


def main():
    global FIXTURES_SRC
    fixtures, out = sys.argv[1], sys.argv[2]
    FIXTURES_SRC = os.path.join(os.path.dirname(os.path.abspath(fixtures)), "fixtures-src")
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(2)

    variants = [
        ("sd15-locon", "tiny-sd15", None, ["--seed", "101", "--second-seed", "102", "--conv"]),
        ("sdxl-locon-sgm", "tiny-sdxl", None, ["--seed", "201", "--second-seed", "202", "--conv", "--sgm"]),
        ("sd15-3blocks", "tiny-sd15", False, ["--seed", "301", "--second-seed", "302", "--conv"]),
        ("sdxl-3blocks-sgm", "tiny-sdxl", True, ["--seed", "401", "--second-seed", "402", "--conv", "--sgm"]),
    ]
    for name, base, xl, flags in variants:
        d = os.path.join(out, name)
        copy_model(os.path.join(fixtures, base), d)
        if xl is not None:
            three_block_unet(d, 77, xl)
        lora(d, *flags)
        keep_variant(name, d, xl is not None)
    for name, base in [("sd15-peft", "tiny-sd15"), ("sdxl-peft", "tiny-sdxl")]:
        d = os.path.join(out, name)
        peft_copy(fixtures, base, d)
        keep_variant(name, d, False)


def keep_variant(name, d, own_unet):
    """Copies what the tests need of variant `name` (made in `d`) to KEEP, when given."""
    if len(sys.argv) > 3:
        keep = os.path.join(sys.argv[3], name)
        shutil.rmtree(keep, ignore_errors=True)
        for part in ["lora"] + (["unet"] if own_unet else []):
            shutil.copytree(os.path.join(d, part), os.path.join(keep, part))


if __name__ == "__main__":
    main()
