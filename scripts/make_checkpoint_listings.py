#!/usr/bin/env python3
"""Key and shape listings of the real SD 1.5, 2.1, XL (and inpainting, refiner, pix2pix, depth) single-file
checkpoints, without their weights, for tests/fixtures/checkpoint-listings/ (architecture detection and the
LDM name maps are tested against them).

Source: the per-component key lists of arenasys/stable-diffusion-webui-model-toolkit (components/*.txt, one
`key [shape]` per line, prefix stripped), which that toolkit uses to recognise real checkpoints; the prefixes are
put back as its toolkit.py defines them. Needs a local mirror of that repository (REPO below). sdxl-inpaint.json
was written by hand from the SDXL listing and A1111's sd_xl_inpaint.yaml (in_channels 9): only the tensors that
identify it.
"""
import json, subprocess
REPO="/work/.mirror/arenasys+stable-diffusion-webui-model-toolkit/repo"
COMMIT="e19dd46e61f04436832b258f7ae6adfc72bca346"
URL="https://github.com/arenasys/stable-diffusion-webui-model-toolkit"
def comp(name):
    txt=subprocess.check_output(["git","-C",REPO,"show",f"{COMMIT}:components/{name}.txt"],text=True)
    out=[]
    for l in txt.splitlines():
        if not l.strip(): continue
        k,z=l.rstrip().split(" ")
        z=z[1:-1]
        shape=[int(i) for i in z.split(",")] if z else []
        out.append((k,shape))
    return out
def build(fname, parts, complete, notes):
    tensors={}; src=[]
    for cname,prefix in parts:
        c=comp(cname)
        src.append(f"components/{cname}.txt ({len(c)} entries, prefix '{prefix}')")
        for k,s in c:
            key=prefix+k
            assert key not in tensors, key
            tensors[key]=s
    tensors=dict(sorted(tensors.items()))
    d={"source": f"{URL} @ {COMMIT} (toolkit.py COMPONENTS/ARCHITECTURES): " + " + ".join(src),
       "complete": complete, "notes": notes, "tensors": tensors}
    with open(f"/tmp/ckpt-listings/{fname}","w") as f: json.dump(d,f,indent=1)
    print(fname,len(tensors))
COMMON=("Component key lists (key + exact shape) that the model-toolkit requires to identify each component; "
 "prefixes applied exactly as in toolkit.py COMPONENTS. The toolkit identifies a component only if every listed "
 "(key, shape) is present, so for a real checkpoint the toolkit recognises, this is a subset of its header. "
 "Not a byte-for-byte dump of the named file: extra non-component keys the real file may carry (toolkit.py OPTIONAL: "
 "alphas_cumprod, betas, ..., model_ema.decay, model_ema.num_updates, logvar) are not listed. Shapes are PyTorch order.")
build("sd15.json",[("UNET-v1-SD","model.diffusion_model."),("VAE-v1-SD","first_stage_model."),("CLIP-v1-SD","cond_stage_model.transformer.text_model.")],
      True, "Architecture SD-v1 (UNET-v1 + VAE-v1 + CLIP-v1). "+COMMON)
build("sd15-inpaint.json",[("UNET-v1-Inpainting","model.diffusion_model."),("VAE-v1-SD","first_stage_model."),("CLIP-v1-SD","cond_stage_model.transformer.text_model.")],
      True, "Architecture SD-v1 with UNET-v1-Inpainting (differs from UNET-v1-SD only in input_blocks.0.0.weight [320,9,3,3]). "+COMMON)
build("sd15-pix2pix.json",[("UNET-v1-Pix2Pix","model.diffusion_model."),("VAE-v1-SD","first_stage_model."),("CLIP-v1-SD","cond_stage_model.transformer.text_model.")],
      True, "Architecture SD-v1-Pix2Pix (instruct-pix2pix, 8-channel input). "+COMMON)
build("sd21.json",[("UNET-v2-SD","model.diffusion_model."),("VAE-v1-SD","first_stage_model."),("CLIP-v2-SD","cond_stage_model.model.")],
      True, "Architecture SD-v2 (UNET-v2 + VAE-v1 + CLIP-v2, OpenCLIP ViT-H, 24 resblocks). Same list serves SD 2.0/2.1 512 and 768; v-prediction vs eps is not visible in keys/shapes. "+COMMON)
build("sd2-inpaint.json",[("UNET-v2-Inpainting","model.diffusion_model."),("VAE-v1-SD","first_stage_model."),("CLIP-v2-SD","cond_stage_model.model.")],
      True, "Architecture SD-v2 with UNET-v2-Inpainting (512-inpainting-ema; differs from UNET-v2-SD only in input_blocks.0.0.weight [320,9,3,3]). "+COMMON)
build("sd2-depth.json",[("UNET-v2-Depth","model.diffusion_model."),("VAE-v1-SD","first_stage_model."),("CLIP-v2-SD","cond_stage_model.model."),("Depth-v2-SD","depth_model.model.")],
      True, "Architecture SD-v2-Depth (512-depth-ema: 5-channel UNet input + MiDaS depth_model). "+COMMON)
build("sdxl.json",[("UNET-XL-SD","model.diffusion_model."),("VAE-v1-SD","first_stage_model."),("CLIP-v1-SD","conditioner.embedders.0.transformer.text_model."),("CLIP-XL-SD","conditioner.embedders.1.model.")],
      True, "Architecture SD-XL (UNET-XL + VAE-v1 + CLIP-XL-AUX (CLIP-L, same list as SD1 CLIP incl. position_ids) + CLIP-XL (OpenCLIP bigG, 32 resblocks)). "+COMMON)
build("sdxl-refiner.json",[("UNET-XL-Refiner","model.diffusion_model."),("VAE-v1-SD","first_stage_model."),("CLIP-XL-SD","conditioner.embedders.0.model.")],
      True, "Architecture SD-XL-Refiner (UNET-XL-Refiner + VAE-v1 + CLIP-XL as conditioner.embedders.0.model.). "+COMMON)
