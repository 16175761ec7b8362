//! Tiled VAE decoding against diffusers' `enable_tiling()` (tests/fixtures/vae-tiling, made by
//! scripts/make_vae_tiling_reference.py): the tiny SD 1.5 VAE (64-pixel tiles) decodes 22 × 30 latents in
//! 4 × 5 overlapping tiles, partial ones at the edges, blended as diffusers blends them.

use crate::common;

use candle_core::Device;
use sd_rbee::diffusion::{LoadOptions, StableDiffusion};

#[test]
fn tiled_decoding_matches_diffusers() {
    let sd = StableDiffusion::load(&common::fixture("tiny-sd15"), &LoadOptions::default()).unwrap();
    let path = common::fixture("vae-tiling").join("reference.safetensors");
    let reference = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let latents = &reference["latents"];
    let tiled = sd.vae().decode_raw_tiled(latents).unwrap();
    let whole = sd.vae().decode_raw(latents).unwrap();
    let (max, mean) = common::diff(&tiled, &reference["tiled"]);
    println!("tiled decode vs diffusers: max abs {max:e}, mean abs {mean:e}");
    assert!(max < 1e-4, "tiled decoding differs from diffusers' by {max}");
    let (whole_max, _) = common::diff(&whole, &reference["whole"]);
    assert!(whole_max < 1e-4, "whole decoding differs from diffusers' by {whole_max}");
    // Tiles are not a no-op: the seams are blended, so the two decodings differ.
    let (apart, _) = common::diff(&tiled, &whole);
    assert!(apart > 0.1, "tiled and whole decoding should differ, by {apart}");
    // The default decodes small images whole; `Some(true)` tiles.
    let config = sd.vae().config();
    assert!(!config.tiles_by_default(22, 30));
    assert!(config.tiles_by_default(256, 256), "2048 px images tile by default");
    let image = sd.vae().decode_to_image(latents, Some(true)).unwrap();
    assert_eq!(image.dims(), &[1, 3, 176, 240]);
}
