#!/usr/bin/env python3
"""Writes the tiny diffusers fixtures as single-file checkpoints in the original LDM/SGM layout, then checks with
diffusers that `from_single_file(file, config=folder)` loads them back to the same model.

Usage: make_single_file_fixtures.py FIXTURES OUT
  FIXTURES: tests/fixtures (tiny-sd15, tiny-sd15-inpaint, tiny-sdxl)
  OUT: where <name>.safetensors go (tests/fixtures/single-file)

The converter is written here, not taken from diffusers' convert_diffusers_to_original_*.py: those number the
UNet's blocks for two layers per block and SD's real widths. It maps, for any block layout:
  UNet  (model.diffusion_model.)  down_blocks.i.resnets.j -> input_blocks.N.0 (norm1/conv1/time_emb_proj/norm2/
        conv2/conv_shortcut -> in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection),
        attentions -> input_blocks.N.1, downsamplers.0.conv -> input_blocks.N.0.op, mid_block -> middle_block.0/1/2,
        up_blocks -> output_blocks (upsampler at .1 or .2 after an attention), time_embed, label_emb, out.0/out.2
  VAE   (first_stage_model.)  down_blocks/up_blocks -> down/up (up reversed), resnets -> block, conv_shortcut ->
        nin_shortcut, mid_block -> mid.block_1/attn_1/block_2 (attention as 1x1 convs q/k/v/proj_out, norm)
  CLIP  (cond_stage_model.transformer.text_model. / conditioner.embedders.0.transformer.text_model.)
  OpenCLIP (conditioner.embedders.1.model.) token_embedding, positional_embedding, transformer.resblocks.i with
        attn.in_proj_weight/bias (q, k, v stacked), attn.out_proj, ln_1, ln_2, mlp.c_fc, mlp.c_proj, ln_final,
        text_projection (transposed)
Checks: every tensor of the folder's UNet, VAE and text encoders equals diffusers' single-file load of the written
file (tiny-sdxl: its two text encoders have the same width, which diffusers' single-file loader cannot tell
apart, so there the file's tensors are compared with the folder's by the mapping itself), and the SD 1.x files
generate the folder's reference images. Needs torch, diffusers 0.42.1, transformers, safetensors.
"""
import json, os, sys

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_names(config, keys):
    """diffusers UNet key -> LDM key (without the model.diffusion_model. prefix)."""
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    lpb = [lpb] * n if isinstance(lpb, int) else lpb
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    inp, idx = {}, 1
    for i in range(n):
        for j in range(lpb[i]):
            inp[(i, j)] = idx; idx += 1
        if i < n - 1:
            inp[(i, "down")] = idx; idx += 1
    out, idx = {}, 0
    rev = list(reversed(lpb))
    for i in range(n):
        for j in range(rev[i] + 1):
            out[(i, j)] = idx; idx += 1
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    names = {}
    for key in keys:
        module, param = key.rsplit(".", 1)
        p = module.split(".")
        if module in top:
            new = top[module]
        elif p[0] == "down_blocks":
            i = int(p[1])
            if p[2] == "resnets":
                new = f"input_blocks.{inp[(i, int(p[3]))]}.0." + RESNET.get(".".join(p[4:]), ".".join(p[4:]))
            elif p[2] == "attentions":
                new = f"input_blocks.{inp[(i, int(p[3]))]}.1." + ".".join(p[4:])
            else:
                new = f"input_blocks.{inp[(i, 'down')]}.0.op"
        elif p[0] == "mid_block":
            k = int(p[2])
            if p[1] == "resnets":
                new = f"middle_block.{2 * k}." + RESNET.get(".".join(p[3:]), ".".join(p[3:]))
            else:
                new = f"middle_block.{2 * k + 1}." + ".".join(p[3:])
        elif p[0] == "up_blocks":
            i = int(p[1])
            if p[2] == "resnets":
                new = f"output_blocks.{out[(i, int(p[3]))]}.0." + RESNET.get(".".join(p[4:]), ".".join(p[4:]))
            elif p[2] == "attentions":
                new = f"output_blocks.{out[(i, int(p[3]))]}.1." + ".".join(p[4:])
            else:
                new = f"output_blocks.{out[(i, rev[i])]}.{2 if up_attn[i] else 1}.conv"
        else:
            raise ValueError(key)
        names[key] = new + "." + param
    return names


def vae_names(config, keys):
    n = len(config["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    names = {}
    for key in keys:
        module, param = key.rsplit(".", 1)
        p = module.split(".")
        side = p[0]
        rest = ".".join(p[1:])
        if rest in ("conv_in", "conv_out", "") or side in ("quant_conv", "post_quant_conv"):
            new = module
        elif rest == "conv_norm_out":
            new = f"{side}.norm_out"
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2]) if p[1] == "down_blocks" else n - 1 - int(p[2])
            where = "down" if p[1] == "down_blocks" else "up"
            if p[3] == "resnets":
                new = f"{side}.{where}.{i}.block.{p[4]}." + ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
            else:
                new = f"{side}.{where}.{i}.{'downsample' if where == 'down' else 'upsample'}.conv"
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                new = f"{side}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
            else:
                new = f"{side}.mid.attn_1." + attn[".".join(p[4:])]
        else:
            raise ValueError(key)
        names[key] = new + "." + param
    return names


def open_clip(sd, prefix, hidden):
    out = {}
    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    out[prefix + "token_embedding.weight"] = sd.pop("embeddings.token_embedding.weight")
    out[prefix + "positional_embedding"] = sd.pop("embeddings.position_embedding.weight")
    out[prefix + "ln_final.weight"] = sd.pop("final_layer_norm.weight")
    out[prefix + "ln_final.bias"] = sd.pop("final_layer_norm.bias")
    out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[dst + f"attn.in_proj_{w}"] = torch.cat([sd.pop(src + f"self_attn.{q}_proj.{w}") for q in "qkv"])
            out[dst + f"attn.out_proj.{w}"] = sd.pop(src + f"self_attn.out_proj.{w}")
            out[dst + f"ln_1.{w}"] = sd.pop(src + f"layer_norm1.{w}")
            out[dst + f"ln_2.{w}"] = sd.pop(src + f"layer_norm2.{w}")
            out[dst + f"mlp.c_fc.{w}"] = sd.pop(src + f"mlp.fc1.{w}")
            out[dst + f"mlp.c_proj.{w}"] = sd.pop(src + f"mlp.fc2.{w}")
    sd.pop("embeddings.position_ids", None)
    assert not sd, f"unmapped text encoder tensors: {sorted(sd)[:5]}"
    return out


def single_file(folder):
    """The folder's weights in the LDM/SGM layout."""
    load = lambda part, stem: load_file(os.path.join(folder, part, f"{stem}.safetensors"))
    cfg = lambda part: json.load(open(os.path.join(folder, part, "config.json")))
    out = {}
    unet = load("unet", "diffusion_pytorch_model")
    for k, v in unet_names(cfg("unet"), unet).items():
        out["model.diffusion_model." + v] = unet[k]
    vae = load("vae", "diffusion_pytorch_model")
    for k, v in vae_names(cfg("vae"), vae).items():
        t = vae[k]
        if ".mid.attn_1." in v and v.endswith(".weight") and t.dim() == 2:
            t = t[:, :, None, None]
        out["first_stage_model." + v] = t
    te = load("text_encoder", "model")
    xl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
    te_prefix = "conditioner.embedders.0.transformer." if xl else "cond_stage_model.transformer."
    for k, v in te.items():
        out[te_prefix + (k if k.startswith("text_model.") else "text_model." + k)] = v
    if xl:
        out.update(open_clip(load("text_encoder_2", "model"), "conditioner.embedders.1.model.", None))
    return out


@torch.no_grad()
def check(folder, path):
    from diffusers import (StableDiffusionPipeline, StableDiffusionInpaintPipeline, StableDiffusionXLPipeline,
                           DDIMScheduler)
    xl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
    inpaint = json.load(open(os.path.join(folder, "unet", "config.json")))["in_channels"] == 9
    cls = StableDiffusionXLPipeline if xl else StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    a = cls.from_pretrained(folder, torch_dtype=torch.float32)
    b = cls.from_single_file(path, config=folder, torch_dtype=torch.float32)
    parts = ["unet", "vae"] + ([] if xl else ["text_encoder"])
    worst = 0.0
    for part in parts:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        for k, v in sa.items():
            if "position_ids" in k:
                continue
            worst = max(worst, float((v - sb[k]).abs().max()))
    if xl:
        # diffusers' single-file loader cannot tell tiny-sdxl's two same-width text encoders apart; its own
        # conversion functions, given the prefixes, read them back tensor by tensor.
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
        ckpt = load_file(path)
        strip = lambda sd: {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
        te1 = strip(convert_ldm_clip_checkpoint(ckpt, remove_prefix="conditioner.embedders.0.transformer."))
        te2 = strip(convert_open_clip_checkpoint(a.text_encoder_2, ckpt, prefix="conditioner.embedders.1.model."))
        for theirs, model in ((te1, a.text_encoder), (te2, a.text_encoder_2)):
            for k, v in strip(model.state_dict()).items():
                if "position_ids" in k:
                    continue
                worst = max(worst, float((v.float() - theirs[k].float()).abs().max()))
        parts += ["text_encoder (diffusers' convert_ldm_clip_checkpoint)", "text_encoder_2 (convert_open_clip_checkpoint)"]
    report = {"file": os.path.basename(path), "tensors_compared_with_diffusers": parts, "max_abs": worst}
    if not xl:
        e = json.load(open(os.path.join(folder, "expected.json")))
        ref = load_file(os.path.join(folder, "expected.safetensors"))
        b.scheduler = DDIMScheduler.from_config(b.scheduler.config)
        kw = dict(prompt=e["prompt"], negative_prompt=e["negative_prompt"], width=e["width"], height=e["height"],
                  num_inference_steps=e["steps"], guidance_scale=e.get("guidance", e.get("guidance_scale")),
                  output_type="pt", latents=ref["initial_latents"])
        if inpaint:
            # As the shared references were made: the same pictures, and the VAE's posterior mean, not a sample.
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures-src"))
            from make_fixtures import gradient_image, mask_image, use_posterior_mean
            use_posterior_mean()
            kw.update(image=gradient_image(), mask_image=mask_image(), strength=1.0)
        name = "txt2img_ddim_image"
        img = b(**kw).images
        report["image"] = name
        report["image_max_abs_vs_reference"] = float((img - ref[name]).abs().max())
    print(json.dumps(report))
    return report


def main():
    fixtures, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(2)
    for name in ("tiny-sd15", "tiny-sd15-inpaint", "tiny-sdxl"):
        folder = os.path.join(fixtures, name)
        path = os.path.join(out, f"{name}.safetensors")
        save_file(single_file(folder), path)
        check(folder, path)


if __name__ == "__main__":
    main()
