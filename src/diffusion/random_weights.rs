//! Seeded random weights for any architecture, so the real SD 1.5 and SDXL models can be built and timed
//! without downloading them (`sd-rbee bench --arch`). Each tensor is drawn from its name and the seed
//! alone (the same model every time, whatever order it is built in), the way PyTorch initialises a fresh
//! module: weights uniform in ±1/√fan_in, normalisation scales 1, biases 0. Activations then stay in range
//! through the whole pipeline, so timings are those of real weights (no NaN or denormal slow paths).

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// A [`SimpleBackend`] that makes up every tensor asked for.
pub struct SeededRandom {
    seed: u64,
}

/// A `VarBuilder` over seeded random weights.
pub fn random_var_builder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SeededRandom { seed }), dtype, device.clone())
}

/// SplitMix64: a fast, well-mixed hash of a counter.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a tensor name: each tensor's own stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl SeededRandom {
    fn values(&self, name: &str, dims: &[usize]) -> Vec<f32> {
        let n: usize = dims.iter().product();
        let vector = dims.len() == 1;
        let leaf = name.rsplit('.').next().unwrap_or(name);
        if vector && (name.contains("norm") || leaf == "gamma") && leaf != "bias" && leaf != "beta" {
            return vec![1.0; n];
        }
        if vector {
            return vec![0.0; n];
        }
        let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let stream = splitmix(self.seed ^ name_hash(name));
        let mut out = vec![0f32; n];
        out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
            let base = (c as u64) << 16;
            for (i, v) in chunk.iter_mut().enumerate() {
                let bits = splitmix(stream.wrapping_add(base + i as u64));
                // 24 random bits to [0, 1), then to [-bound, bound).
                let unit = (bits >> 40) as f32 / (1u64 << 24) as f32;
                *v = (2.0 * unit - 1.0) * bound;
            }
        });
        out
    }
}

impl SimpleBackend for SeededRandom {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.values(name, s.dims()), s, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape: {name} was asked for without one")
    }

    /// Every tensor a model asks for exists, except the ones that name another layout of the same layer
    /// (old attention names) or an optional projection that the configuration does not ask for.
    fn contains_tensor(&self, name: &str) -> bool {
        !(name.ends_with("query.weight") || name.ends_with("text_projection.weight"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_depend_on_name_and_seed_only() {
        let a = SeededRandom { seed: 1 };
        let b = SeededRandom { seed: 2 };
        let w = a.values("down.0.conv.weight", &[8, 4, 3, 3]);
        assert_eq!(w, a.values("down.0.conv.weight", &[8, 4, 3, 3]));
        assert_ne!(w, b.values("down.0.conv.weight", &[8, 4, 3, 3]));
        assert_ne!(w, a.values("down.1.conv.weight", &[8, 4, 3, 3]));
        let bound = 1.0 / 36f32.sqrt();
        assert!(w.iter().all(|v| v.abs() <= bound));
        let mean = w.iter().sum::<f32>() / w.len() as f32;
        assert!(mean.abs() < 0.05, "{mean}");
        assert!(a.values("mid.norm1.weight", &[8]).iter().all(|&v| v == 1.0));
        assert!(a.values("mid.norm1.bias", &[8]).iter().all(|&v| v == 0.0));
        assert!(a.values("mid.proj.bias", &[8]).iter().all(|&v| v == 0.0));
    }
}
