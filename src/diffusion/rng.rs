//! Seeded noise that reproduces PyTorch's CPU generator bit for bit (within a float ulp).
//!
//! `torch.Generator("cpu").manual_seed(s)` is an MT19937 engine; `torch.randn` on a float32 tensor of at
//! least 16 elements fills it with 24-bit uniforms and turns each block of 16 into normals with a
//! Box–Muller transform pairing element `j` with `j + 8` (and redraws the last 16 when the size is not a
//! multiple of 16). Matching it means a seed gives the same starting noise here as in a diffusers pipeline
//! run with `generator=torch.Generator().manual_seed(seed)`, and ancestral samplers continue the same stream.

use candle_core::{Device, Result, Shape, Tensor};
use rand_mt::Mt;

/// A PyTorch-compatible CPU random generator.
#[derive(Clone)]
pub struct TorchRng {
    engine: Mt,
    /// 32-bit words drawn since seeding: a checkpoint's whole record of the generator.
    draws: u64,
}

impl std::fmt::Debug for TorchRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TorchRng")
    }
}

impl TorchRng {
    /// `torch.Generator().manual_seed(seed)` (PyTorch seeds MT19937 with the low 32 bits).
    pub fn new(seed: u64) -> Self {
        Self { engine: Mt::new(seed as u32), draws: 0 }
    }

    /// The generator seeded with `seed` after `draws` words, as [`Self::draws`] reported it.
    pub fn resumed(seed: u64, draws: u64) -> Self {
        let mut rng = Self::new(seed);
        for _ in 0..draws {
            rng.next_u32();
        }
        rng
    }

    pub fn draws(&self) -> u64 {
        self.draws
    }

    fn next_u32(&mut self) -> u32 {
        self.draws += 1;
        self.engine.next_u32()
    }

    /// A uniform float in [0, 1) with 24 random bits, as `at::uniform_real_distribution<float>` draws it.
    fn uniform(&mut self) -> f32 {
        (self.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    fn box_muller_16(data: &mut [f32]) {
        let two_pi = (2.0 * std::f64::consts::PI) as f32;
        for j in 0..8 {
            let u1 = 1.0 - data[j];
            let u2 = data[j + 8];
            let radius = (-2.0 * u1.ln()).sqrt();
            let theta = two_pi * u2;
            data[j] = radius * theta.cos();
            data[j + 8] = radius * theta.sin();
        }
    }

    /// `torch.randn(n)` values. Sizes under 16 take PyTorch's scalar path, which this does not reproduce;
    /// they are still N(0, 1) from the same stream.
    pub fn randn_vec(&mut self, n: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform()).collect();
        if n < 16 {
            // Plain Box–Muller on pairs; no latent tensor is this small.
            for pair in data.chunks_mut(2) {
                let u1 = 1.0 - pair[0];
                let u2 = self.uniform();
                let r = (-2.0 * u1.ln()).sqrt();
                pair[0] = r * ((2.0 * std::f64::consts::PI) as f32 * u2).cos();
                if pair.len() > 1 {
                    pair[1] = r * ((2.0 * std::f64::consts::PI) as f32 * u2).sin();
                }
            }
            return data;
        }
        for block in data.chunks_exact_mut(16) {
            Self::box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform();
            }
            Self::box_muller_16(tail);
        }
        data
    }

    /// `torch.randn(shape, generator=self)` as an f32 tensor on `device`.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data = self.randn_vec(shape.elem_count());
        Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)
    }
}

/// The batch's generators, one per image, as diffusers uses a list of generators: each image's noise comes
/// from its own seed, so image `i` of a batch equals a single-image run with seed `seeds[i]`.
#[derive(Debug)]
pub struct BatchNoise {
    rngs: Vec<TorchRng>,
}

impl BatchNoise {
    pub fn new(seeds: &[u64]) -> Self {
        Self { rngs: seeds.iter().map(|&s| TorchRng::new(s)).collect() }
    }

    /// Each image's generator after the draws [`Self::draws`] reported.
    pub fn resumed(seeds: &[u64], draws: &[u64]) -> Self {
        Self { rngs: seeds.iter().zip(draws).map(|(&s, &d)| TorchRng::resumed(s, d)).collect() }
    }

    pub fn draws(&self) -> Vec<u64> {
        self.rngs.iter().map(TorchRng::draws).collect()
    }

    /// Noise shaped `[batch, rest...]` where `per_item` is the shape of one image's tensor (leading 1).
    pub fn randn(&mut self, per_item: &[usize], device: &Device) -> Result<Tensor> {
        let items = self.rngs.iter_mut().map(|r| r.randn(per_item, device)).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&items, 0)
    }
}

impl super::schedulers::NoiseSource for BatchNoise {
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let mut dims = like.dims().to_vec();
        if dims.is_empty() {
            candle_core::bail!("cannot draw noise for a scalar");
        }
        dims[0] = 1;
        self.randn(&dims, like.device())?.to_dtype(like.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The C++ standard requires the 10000th output of a default-seeded (5489) mt19937 to be 4123659995.
        let mut rng = TorchRng::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = rng.engine.next_u32();
        }
        assert_eq!(last, 4123659995);
    }

    #[test]
    fn same_seed_same_noise_and_different_seeds_differ() {
        let a = TorchRng::new(7).randn_vec(100);
        let b = TorchRng::new(7).randn_vec(100);
        let c = TorchRng::new(8).randn_vec(100);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / 100.0;
        assert!(mean.abs() < 0.5, "mean {mean}");
    }
}
