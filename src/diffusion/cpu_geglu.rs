//! GEGLU's gate on the CPU (f32): `h * gelu(g)` for `[h, g] = proj(x)`, in one parallel pass with a
//! vectorised erf, instead of Candle's two strided copies, scalar `erff` per element and a multiply.
//!
//! The erf is Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7; below 1e-6 evaluated
//! in f32), the approximation PyTorch's vectorised CPU `erf`, and so its exact GELU, computes.

use std::f32::consts::FRAC_1_SQRT_2;

use candle_core::{DType, Result, Tensor, D};

use super::cpu_attention::exp_nonpositive;
use super::cpu_data::{filled_in_parallel, with_f32_data};
use super::simd::widest_simd;

/// Rows per parallel task.
const TASK_ROWS: usize = 16;

#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let r = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_7) * t - 0.284_496_74) * t + 0.254_829_6) * t;
    (1.0 - r * exp_nonpositive(-a * a)).copysign(x)
}

#[inline(always)]
fn gate_rows_generic(projected: &[f32], out: &mut [f32], half: usize) {
    for (row, o) in projected.chunks_exact(2 * half).zip(out.chunks_exact_mut(half)) {
        let (h, g) = row.split_at(half);
        for ((o, &h), &g) in o.iter_mut().zip(h).zip(g) {
            *o = h * (0.5 * g * (1.0 + erf(g * FRAC_1_SQRT_2)));
        }
    }
}

widest_simd! {
    /// [`gate_rows_generic`] with the widest vector unit this CPU has.
    fn gate_rows(projected: &[f32], out: &mut [f32], half: usize) => gate_rows_generic
}

/// `h * gelu(g)` where `projected = [..., 2·half]` is `[h, g]` along its last dimension; `None` unless it is
/// an f32 CPU tensor (the caller then uses the composite path).
pub fn geglu(projected: &Tensor) -> Result<Option<Tensor>> {
    if !projected.device().is_cpu() || projected.dtype() != DType::F32 {
        return Ok(None);
    }
    let width = projected.dim(D::Minus1)?;
    if width == 0 || width % 2 != 0 {
        return Ok(None);
    }
    let half = width / 2;
    let rows = projected.elem_count() / width.max(1);
    let out = with_f32_data(projected, |p| {
        filled_in_parallel(rows * half, TASK_ROWS * half, |task, o| gate_rows(&p[task * TASK_ROWS * width..], o, half))
    })?;
    let mut shape = projected.dims().to_vec();
    *shape.last_mut().expect("checked above") = half;
    Ok(Some(Tensor::from_vec(out, shape, projected.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn erf_is_within_the_approximation_bound() {
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            // The approximation's 1.5e-7, plus f32 rounding in `1 - r·exp(-x²)`, which cancels near 0.
            assert!((erf(x) as f64 - want).abs() < 1e-6, "erf({x}) = {} vs {want}", erf(x));
        }
        assert_eq!(erf(40.0), 1.0);
        assert_eq!(erf(-40.0), -1.0);
        assert!(erf(0.0).abs() < 1e-6 && erf(1e-3) > 0.0 && erf(-1e-3) < 0.0);
    }

    #[test]
    fn fused_geglu_matches_the_composite() {
        let dev = Device::Cpu;
        let mut rng = crate::diffusion::rng::TorchRng::new(7);
        for (rows, half) in [(1, 1), (3, 5), (37, 64), (2 * 4096 / 64, 1280)] {
            let p = (rng.randn((rows, 2 * half), &dev).unwrap() * 3.0).unwrap();
            let fused = geglu(&p).unwrap().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let h = p.narrow(1, 0, half).unwrap();
            let g = p.narrow(1, half, half).unwrap();
            let want = (&h * g.gelu_erf().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let h = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in 0..want.len() {
                // An erf error e moves h·gelu(g) = h·g·(1 + erf(g/√2))/2 by |h·g|·e/2: e is the approximation's
                // bound in f32 (1e-6, as tested above) plus the rounding of `1 + erf` on both sides; the
                // products round each side by a few ulps of the result.
                let bound = 0.5 * (h[i] * g[i]).abs() * 1.5e-6 + 4.0 * f32::EPSILON * want[i].abs();
                let d = (fused[i] - want[i]).abs();
                assert!(
                    d <= bound,
                    "{rows}x{half} [{i}]: h={} g={}: {} vs {want_i}, off by {d} > {bound}",
                    h[i],
                    g[i],
                    fused[i],
                    want_i = want[i]
                );
            }
        }
        let p3 = Tensor::randn(0f32, 1.0, (2, 7, 6), &dev).unwrap();
        assert_eq!(geglu(&p3).unwrap().unwrap().dims(), &[2, 7, 3]);
    }
}
