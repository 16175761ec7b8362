//! The end of a group's run: each member's latents checked, then every member's images decoded together,
//! in VAE calls of as many images as a pixel budget allows, instead of one call per image.
//!
//! A VAE call on a few small images costs little more than on one (most of a small call is per-layer
//! overhead, and on a GPU most of the device idles), so a batch of jobs also shares its decodes. The budget
//! keeps memory where it was for large images: on the CPU a 512-pixel image still decodes alone.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::{
    all_finite, ms, CancelFlag, GenerateError, GeneratedImage, GenerationOutput, GenerationRequest, Run, Timings,
};

/// Pixels one VAE call decodes at most on the CPU (one 512 × 512 image, or sixteen 128 × 128 ones).
const CPU_DECODE_PIXELS: usize = 512 * 512;
/// On GPUs: one 1024 × 1024 image, or four 512 × 512 ones.
const GPU_DECODE_PIXELS: usize = 1024 * 1024;

/// A member whose run finished the denoising loop.
pub(super) struct Finished<'a> {
    pub request: &'a GenerationRequest,
    pub run: Run,
    pub cancel: Option<&'a CancelFlag>,
    pub on_decode: Option<&'a dyn Fn()>,
    pub timings: Timings,
}

/// A member being decoded: its run, and its images so far (or why it failed).
struct Decoding<'a> {
    finished: Finished<'a>,
    images: Vec<GeneratedImage>,
    failed: Option<GenerateError>,
}

impl super::StableDiffusion {
    /// Decodes every finished member's images, several per VAE call where they fit the budget; one result
    /// per member, in order.
    pub(super) fn finish_runs(&self, finished: Vec<Finished>) -> Vec<Result<GenerationOutput, GenerateError>> {
        let t0 = Instant::now();
        let mut members: Vec<Decoding> = finished
            .into_iter()
            .map(|f| {
                let failed = match all_finite(&f.run.latents) {
                    Ok(true) => None,
                    Ok(false) => Some(GenerateError::NonFinite { stage: "denoising loop" }),
                    Err(e) => Some(e.into()),
                };
                Decoding { images: Vec::with_capacity(f.run.seeds.len()), finished: f, failed }
            })
            .collect();

        // Images in order, (member, image), cut into calls of equal tiling that fit the budget.
        let mut calls: Vec<(bool, Vec<(usize, usize)>)> = Vec::new();
        for (k, m) in members.iter().enumerate().filter(|(_, m)| m.failed.is_none()) {
            let (tiled, per_call) = self.decode_plan(m.finished.request);
            for i in 0..m.finished.run.seeds.len() {
                match calls.last_mut() {
                    Some((t, images)) if *t == tiled && images.len() < per_call => images.push((k, i)),
                    _ => calls.push((tiled, vec![(k, i)])),
                }
            }
        }
        for (tiled, images) in calls {
            for &(k, _) in &images {
                let m = &mut members[k];
                if m.failed.is_none() && m.finished.cancel.is_some_and(|c| c.is_cancelled()) {
                    let total = m.finished.run.total();
                    m.failed = Some(GenerateError::Cancelled { completed: total, total });
                }
            }
            let images: Vec<(usize, usize)> =
                images.into_iter().filter(|&(k, _)| members[k].failed.is_none()).collect();
            if images.is_empty() {
                continue;
            }
            match self.decode_call(&members, &images, tiled) {
                Ok(pixels) => {
                    for ((k, i), pixels) in images.into_iter().zip(pixels) {
                        let m = &mut members[k];
                        match pixels {
                            Some(pixels) if m.failed.is_none() => {
                                m.images.push(GeneratedImage { seed: m.finished.run.seeds[i], pixels })
                            }
                            Some(_) => {}
                            None => m.failed = Some(GenerateError::NonFinite { stage: "VAE decoder" }),
                        }
                    }
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    // A call that decoded several members' images failed for each of them: each may pass alone.
                    let several = images.iter().any(|&(k, _)| k != images[0].0);
                    for (k, _) in images {
                        let m = &mut members[k];
                        let failed = if m.finished.cancel.is_some_and(|c| c.is_cancelled()) {
                            // (stopped between tiles, or failed after the cancel: either way it was cancelled)
                            let total = m.finished.run.total();
                            GenerateError::Cancelled { completed: total, total }
                        } else if several {
                            GenerateError::Batch(anyhow::anyhow!("{message}"))
                        } else {
                            GenerateError::Other(anyhow::anyhow!("{message}"))
                        };
                        m.failed.get_or_insert(failed);
                    }
                }
            }
        }

        let decoding_ms = ms(t0.elapsed());
        members
            .into_iter()
            .map(|m| {
                if let Some(e) = m.failed {
                    return Err(e);
                }
                let Finished { run, mut timings, .. } = m.finished;
                timings.decoding_ms = decoding_ms;
                timings.total_ms = ms(run.started.elapsed());
                Ok(GenerationOutput { images: m.images, scheduler: run.kind, warnings: run.warnings, timings })
            })
            .collect()
    }

    /// Whether a request's images decode in tiles, and how many of them one VAE call takes.
    fn decode_plan(&self, req: &GenerationRequest) -> (bool, usize) {
        let f = self.vae_scale_factor();
        let tiled = self.vae.decodes_in_tiles(req.height / f, req.width / f, req.vae_tiling);
        let budget = if self.device.is_cpu() { CPU_DECODE_PIXELS } else { GPU_DECODE_PIXELS };
        let per_call = if tiled { 1 } else { (budget / (req.width * req.height).max(1)).max(1) };
        (tiled, per_call)
    }

    /// One VAE call on the given (member, image) latents: each image as `[3, H, W]` f32 on the CPU, or
    /// `None` where it is not finite.
    fn decode_call(
        &self,
        members: &[Decoding],
        images: &[(usize, usize)],
        tiled: bool,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let latents = images
            .iter()
            .map(|&(k, i)| members[k].finished.run.latents.narrow(0, i, 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let z = Tensor::cat(&latents, 0)?.to_dtype(self.vae_dtype)?;
        let mut in_call: Vec<usize> = images.iter().map(|&(k, _)| k).collect();
        in_call.dedup();
        let in_call: Vec<&Finished> = in_call.into_iter().map(|k| &members[k].finished).collect();
        let signal = || in_call.iter().filter_map(|f| f.on_decode).for_each(|alive| alive());
        // A tiled call decodes one image (decode_plan): its member alone can stop it between tiles.
        debug_assert!(!tiled || images.len() == 1, "a tiled VAE call decodes one image");
        let mut after_tile = || {
            signal();
            match in_call.iter().any(|f| f.cancel.is_some_and(|c| c.is_cancelled())) {
                true => Err(candle_core::Error::Msg("cancelled between the tiles of its decode".into())),
                false => Ok(()),
            }
        };
        let pixels = self.vae.decode_to_unclamped_image_with(&z, Some(tiled), &mut after_tile)?;
        signal();
        into_images(&pixels.to_device(&Device::Cpu)?)
    }
}

/// Each image of a VAE call's output (`x / 2 + 0.5`, not yet clamped) in [0, 1], as `[3, H, W]` f32, or `None`
/// where it is not finite. Judged before the clamp: a clamp makes inf (and on CUDA and MKL NaN too) 0 or 1, a
/// black or white image that would be reported as done.
fn into_images(pixels: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
    (0..pixels.dim(0)?)
        .map(|j| {
            let image = pixels.get(j)?;
            Ok(if all_finite(&image)? { Some(image.clamp(0.0, 1.0)?.to_dtype(DType::F32)?) } else { None })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_judged_before_the_clamp() {
        let values = [0.5f32, -0.25, 1.5, 0.0, f32::INFINITY, 0.5, 0.5, 0.5, f32::NAN, 0.5, 0.5, 0.5];
        let pixels = Tensor::from_slice(&values, (3, 1, 2, 2), &Device::Cpu).unwrap();
        let images = into_images(&pixels).unwrap();
        let first = images[0].as_ref().expect("finite").flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(first, [0.5, 0.0, 1.0, 0.0], "clamped to [0, 1]");
        assert!(images[1].is_none(), "an inf is no white pixel");
        assert!(images[2].is_none(), "a NaN is no black pixel");
    }
}
