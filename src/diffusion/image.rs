//! Conversions between image tensors and 8-bit pictures, in one place for every path: `[3, H, W]` floats in
//! [0, 1] become RGB bytes exactly as diffusers' `numpy_to_pil` makes them (`round(x * 255)`, ties to even,
//! as NumPy rounds), and back.

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// `[3, H, W]` (or `[1, 3, H, W]`) in [0, 1] → RGB image.
pub fn tensor_to_rgb8(image: &Tensor) -> anyhow::Result<RgbImage> {
    let image = if image.rank() == 4 { image.squeeze(0)? } else { image.clone() };
    let (c, h, w) = image.dims3().context("an image tensor must be [3, H, W]")?;
    if c != 3 {
        bail!("an image tensor must have 3 channels, this one has {c}");
    }
    let hwc: Vec<f32> = image.to_dtype(DType::F32)?.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let bytes = hwc.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes).context("image buffer size mismatch")
}

/// RGB image → `[1, 3, H, W]` f32 in [0, 1].
pub fn rgb8_to_tensor(image: &RgbImage, device: &Device) -> anyhow::Result<Tensor> {
    let (w, h) = image.dimensions();
    let data: Vec<f32> = image.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize, 3), device)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}

/// `paste_back`: the original pixels where `mask` is 0, the generated ones where it is 1, blended in between
/// (`generated` `[3, H, W]`, `original` `[1, 3, H, W]`, `mask` `[1, 1, H, W]`, all in [0, 1]).
pub fn paste_back(generated: &Tensor, original: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let original = original.squeeze(0)?.to_dtype(DType::F32)?;
    let mask = mask.squeeze(0)?.to_dtype(DType::F32)?;
    original.broadcast_mul(&mask.affine(-1.0, 1.0)?)? + generated.to_dtype(DType::F32)?.broadcast_mul(&mask)?
}

/// Approximate latent → RGB factors for a fast preview without the VAE (4-channel SD latents).
const SD_LATENT_RGB: [[f32; 3]; 4] =
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]];
const SDXL_LATENT_RGB: [[f32; 3]; 4] =
    [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]];

/// A cheap preview of one image's latents `[C, h, w]` (latent resolution, no VAE), for progress reports.
pub fn latent_preview(latents: &Tensor, sdxl: bool) -> anyhow::Result<RgbImage> {
    let (c, h, w) = latents.dims3().context("latents for a preview must be [C, h, w]")?;
    let data: Vec<f32> = latents.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let factors = if sdxl { &SDXL_LATENT_RGB } else { &SD_LATENT_RGB };
    let mut out = Vec::with_capacity(h * w * 3);
    for p in 0..h * w {
        for k in 0..3 {
            let v: f32 = if c == 4 {
                factors.iter().enumerate().map(|(ch, f)| data[ch * h * w + p] * f[k]).sum()
            } else {
                (0..c).map(|ch| data[ch * h * w + p]).sum::<f32>() / c as f32
            };
            out.push(((v + 1.0) / 2.0 * 255.0).clamp(0.0, 255.0).round() as u8);
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).context("preview buffer size mismatch")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_like_numpy() {
        // 0.5 * 255 = 127.5 → 128 (even); 126.5/255 → 126 (even); values outside [0, 1] clamp.
        let t = Tensor::new(
            &[[[0.5f32, 126.5 / 255.0, -0.2, 1.3]], [[0.0f32, 1.0, 0.25, 0.75]], [[0.1f32; 4]]],
            &Device::Cpu,
        )
        .unwrap();
        let img = tensor_to_rgb8(&t).unwrap();
        let reds: Vec<u8> = (0..4).map(|x| img.get_pixel(x, 0)[0]).collect();
        assert_eq!(reds, vec![128, 126, 0, 255]);
        assert_eq!(img.get_pixel(3, 0)[1], 191);
    }

    #[test]
    fn paste_back_keeps_the_original_outside_the_mask() {
        let generated = Tensor::ones((3, 1, 3), DType::F32, &Device::Cpu).unwrap();
        let original = Tensor::zeros((1, 3, 1, 3), DType::F32, &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[[[0f32, 0.5, 1.0]]]], &Device::Cpu).unwrap();
        let out: Vec<f32> =
            paste_back(&generated, &original, &mask).unwrap().get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(out, vec![0.0, 0.5, 1.0]);
    }

    #[test]
    fn round_trip_is_exact() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let t = rgb8_to_tensor(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 3, 5]);
        assert_eq!(tensor_to_rgb8(&t).unwrap(), img);
    }
}
