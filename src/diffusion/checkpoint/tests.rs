//! Detection and the name maps against the key listings of the real checkpoints
//! (tests/fixtures/checkpoint-listings, see scripts/make_checkpoint_listings.py and make_diffusers_listings.py).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::configs;
use super::names::{self, Source, UnetNumbering};
use super::*;

fn listing_json(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-listings").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn shapes(v: &Value) -> BTreeMap<String, Vec<usize>> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| (k.clone(), s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
        .collect()
}

/// A real checkpoint's tensors (sdxl-inpaint: the SDXL listing with the 9-channel input its partial listing
/// names).
fn real(name: &str) -> BTreeMap<String, Vec<usize>> {
    if name == "sdxl-inpaint" {
        let mut all = real("sdxl");
        let partial = shapes(&listing_json("sdxl-inpaint.json")["tensors"]);
        for (k, v) in partial {
            assert!(all.contains_key(&k), "{k}");
            all.insert(k, v);
        }
        return all;
    }
    shapes(&listing_json(&format!("{name}.json"))["tensors"])
}

#[test]
fn the_real_checkpoints_are_recognised_and_the_others_named() {
    let arch = |family, inpainting| Architecture { family, inpainting, has_vae: true };
    for (name, want) in [
        ("sd15", arch(Family::Sd1, false)),
        ("sd15-inpaint", arch(Family::Sd1, true)),
        ("sd21", arch(Family::Sd2, false)),
        ("sd2-inpaint", arch(Family::Sd2, true)),
        ("sdxl", arch(Family::Sdxl, false)),
        ("sdxl-inpaint", arch(Family::Sdxl, true)),
    ] {
        assert_eq!(detect(&real(name)).unwrap(), want, "{name}");
    }
    for (name, needle) in [("sdxl-refiner", "refiner"), ("sd15-pix2pix", "instruct-pix2pix"), ("sd2-depth", "depth")] {
        let err = detect(&real(name)).unwrap_err().to_string();
        assert!(err.contains(needle), "{name}: {err}");
    }
    let mut no_vae = real("sd15");
    no_vae.retain(|k, _| !k.starts_with(VAE_PREFIX));
    assert!(!detect(&no_vae).unwrap().has_vae);

    let one = |key: &str| BTreeMap::from([(key.to_string(), vec![4, 4])]);
    for (key, needle) in [
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "LoRA"),
        ("decoder.up.0.block.0.conv1.weight", "VAE"),
        ("down_blocks.0.resnets.0.conv1.weight", "diffusers component"),
        ("control_model.time_embed.0.weight", "ControlNet"),
        ("something.else", "not a Stable Diffusion checkpoint"),
    ] {
        let err = detect(&one(key)).unwrap_err().to_string();
        assert!(err.contains(needle), "{key}: {err}");
    }
}

/// The shape a diffusers tensor has once read from `source` in a checkpoint with `real` shapes.
fn read_shape(source: &Source, real: &BTreeMap<String, Vec<usize>>) -> Option<Vec<usize>> {
    match source {
        Source::Tensor(n) => real.get(n).cloned(),
        Source::Rows { name, start, len } => {
            let s = real.get(name)?;
            (start + len <= s[0]).then(|| [vec![*len], s[1..].to_vec()].concat())
        }
        Source::Transposed(n) => real.get(n).map(|s| s.iter().rev().copied().collect()),
    }
}

fn source_name(source: &Source) -> &str {
    match source {
        Source::Tensor(n) | Source::Transposed(n) | Source::Rows { name: n, .. } => n,
    }
}

/// Every tensor of the real models as diffusers builds them (with sd-rbee's built-in configs) maps to a tensor
/// of the same size in the real checkpoint, and every tensor of the checkpoint's components is used.
#[test]
fn every_tensor_of_the_real_models_maps_to_the_real_checkpoints() {
    for name in ["sd15", "sd15-inpaint", "sd21", "sd2-inpaint", "sdxl"] {
        let doc = listing_json(&format!("diffusers-{name}.json"));
        let checkpoint = real(name);
        let arch = detect(&checkpoint).unwrap();
        let unet_config: crate::diffusion::unet_2d::UNet2DConditionConfig =
            serde_json::from_value(doc["configs"]["unet"].clone()).unwrap();
        let numbering = UnetNumbering::from_config(&unet_config).unwrap();
        let te_width = doc["configs"]["text_encoder"]["hidden_size"].as_u64().unwrap() as usize;
        let mut used = BTreeSet::new();
        for (part, tensors) in doc["tensors"].as_object().unwrap() {
            for (tensor, shape) in shapes(tensors) {
                let source = match (part.as_str(), arch.family) {
                    ("unet", _) => names::unet(&numbering, UNET_PREFIX, &tensor),
                    ("vae", _) => names::vae(VAE_PREFIX, 4, &tensor),
                    ("text_encoder", Family::Sd1) => names::clip(SD1_CLIP, &tensor),
                    ("text_encoder", Family::Sd2) => names::open_clip(SD2_OPEN_CLIP, te_width, &tensor),
                    ("text_encoder", Family::Sdxl) => names::clip(XL_CLIP, &tensor),
                    ("text_encoder_2", _) => names::open_clip(XL_OPEN_CLIP, 1280, &tensor),
                    _ => unreachable!(),
                };
                if tensor.ends_with("position_ids") {
                    continue;
                }
                let source = source.unwrap_or_else(|| panic!("{name}: {part}.{tensor} has no name in the checkpoint"));
                let got = read_shape(&source, &checkpoint)
                    .unwrap_or_else(|| panic!("{name}: {part}.{tensor} → {source:?} is not in the checkpoint"));
                let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
                assert!(got == shape || squeeze(&got) == squeeze(&shape), "{name}: {tensor} {shape:?} vs {got:?}");
                used.insert(source_name(&source).to_string());
            }
        }
        let unused: Vec<&String> = checkpoint
            .keys()
            .filter(|k| !used.contains(*k) && !k.ends_with("position_ids") && !k.ends_with("logit_scale"))
            .filter(|k| {
                !(arch.family == Family::Sd2 && (k.contains("resblocks.23.") || k.ends_with("text_projection")))
            })
            .collect();
        assert!(
            unused.is_empty(),
            "{name}: checkpoint tensors no model tensor reads: {:?}",
            &unused[..unused.len().min(5)]
        );
    }
}

/// The built-in configurations are the ones the listings were made with.
#[test]
fn the_built_in_configs_are_the_real_ones() {
    for (name, arch) in [
        ("sd15", Architecture { family: Family::Sd1, inpainting: false, has_vae: true }),
        ("sd2-inpaint", Architecture { family: Family::Sd2, inpainting: true, has_vae: true }),
        ("sd21", Architecture { family: Family::Sd2, inpainting: false, has_vae: true }),
        ("sdxl", Architecture { family: Family::Sdxl, inpainting: false, has_vae: true }),
    ] {
        let doc = listing_json(&format!("diffusers-{name}.json"));
        let files: BTreeMap<String, Value> = configs::files(arch)
            .into_iter()
            .filter(|(p, _)| p.ends_with("config.json") && !p.starts_with("tokenizer"))
            .map(|(p, bytes)| (p.trim_end_matches("/config.json").to_string(), serde_json::from_slice(&bytes).unwrap()))
            .collect();
        for (part, want) in doc["configs"].as_object().unwrap() {
            for (field, value) in want.as_object().unwrap() {
                assert_eq!(&files[part][field], value, "{name} {part}.{field}");
            }
        }
    }
}
