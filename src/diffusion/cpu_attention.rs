//! A fused scaled-dot-product attention kernel for the CPU (f32).
//!
//! For each (batch·head, block of query rows) it computes the block's scores with one matrix multiply,
//! turns them into probabilities in place with a vectorised exponential, and multiplies by V straight into
//! the output; blocks run in parallel, each with a reused per-thread score buffer sized to stay in cache.
//! Compared with the composite version (scale, matmul, softmax, matmul, concatenate) it allocates nothing per
//! call beyond the output, never materialises the full attention matrix, and spends far less time in `exp`.

use std::cell::RefCell;

use candle_core::{DType, Result, Tensor};

use super::blas::{self, Dims, Operand, Output, Update};
use super::cpu_data::with_f32_data;
use super::simd::widest_simd;
use rayon::prelude::*;

/// Scores per block: 256 Ki floats (1 MiB). At 4096 keys (SD 1.5 at 512 px) that is 64 query rows, enough
/// for each multiply to amortise packing K and V: the full-size UNet step ran 5–10 % faster than with 16-row
/// blocks (64 Ki), on the built-in gemm and on OpenBLAS alike.
const BLOCK_SCORES: usize = 1 << 18;

/// Query rows per block at most (short keys, as cross-attention's 77, would otherwise make huge blocks).
const MAX_BLOCK_ROWS: usize = 1024;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `exp(x)` for x ≤ 0 (softmax inputs after subtracting the row maximum), within 2 ulp of the C library's,
/// written without branches so it vectorises: x = n·ln2 + r, Cephes' degree-6 polynomial for e^r, then 2^n.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // max/min return the other operand for NaN, so x ends up in [-87, 0] whatever came in.
    #[allow(clippy::manual_clamp)] // `clamp` would keep NaN, which the conversion below must never see
    let x = x.max(-87.0).min(0.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // SAFETY: n is an integer in [-126, 0], so the conversion is exact (and, unlike `as`, needs no
    // saturation or NaN checks, which would keep this loop from vectorising).
    let n = unsafe { n.to_int_unchecked::<i32>() };
    // Wrapping: n + 127 is in [1, 127] and never overflows, but a checked add (test builds keep overflow
    // checks) is a branch per element that stops this loop, and every kernel calling it, from vectorising.
    e * f32::from_bits((n.wrapping_add(127) as u32) << 23)
}

/// Lanes of the independent accumulators below: wide enough for AVX-512, so reductions vectorise without
/// reassociating a single running sum.
const LANES: usize = 16;

#[inline(always)]
fn row_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Replaces each row of `scores` by `exp(x - max)` and writes `1 / Σ` of the row into `inv_sums`: the
/// softmax without its division, which the caller applies to the (much narrower) output rows instead. Two
/// passes over the scores (max; exponential and sum together) instead of four.
#[inline(always)]
fn exp_rows_generic(scores: &mut [f32], cols: usize, inv_sums: &mut [f32]) {
    for (row, inv) in scores.chunks_exact_mut(cols).zip(inv_sums) {
        let max = row_max(row);
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *v = exp_nonpositive(*v - max);
                *a += *v;
            }
        }
        let mut sum = acc.iter().sum::<f32>();
        // The last few columns (13 of cross-attention's 77 keys) through one padded vector: one at a time,
        // they cost three times the vectorised rest of the row. The same values, added in the same order.
        let rest = chunks.into_remainder();
        if rest.is_empty() {
            *inv = 1.0 / sum;
            continue;
        }
        let mut tail = [0f32; LANES];
        tail[..rest.len()].copy_from_slice(rest);
        for t in tail.iter_mut() {
            *t = exp_nonpositive(*t - max);
        }
        for (v, &e) in rest.iter_mut().zip(&tail) {
            *v = e;
            sum += e;
        }
        *inv = 1.0 / sum;
    }
}

widest_simd! {
    /// [`exp_rows_generic`] with the widest vector unit this CPU has.
    fn exp_rows(scores: &mut [f32], cols: usize, inv_sums: &mut [f32]) => exp_rows_generic
}

/// `out[rows, d] = softmax(q[rows, d] · k[lk, d]ᵀ · scale) · v[lk, d]`, all row-major.
fn attend_block(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], d: usize, lk: usize, scale: f32) {
    let rows = q.len() / d;
    SCORES.with(|cell| {
        let mut scores = cell.borrow_mut();
        if scores.len() < rows * lk {
            scores.resize(rows * lk, 0.0);
        }
        let s = &mut scores[..rows * lk];
        // One thread each: the blocks themselves run in parallel.
        let (q, k_t) = (Operand::rows(q, d), Operand::transposed(k, d));
        blas::matmul(Dims { m: rows, n: lk, k: d }, q, k_t, Output::rows(s, lk), Update::scaled(scale), 1);
        let mut inv_sums = [0f32; MAX_BLOCK_ROWS];
        let inv_sums = &mut inv_sums[..rows];
        exp_rows(s, lk, inv_sums);
        let (s, v) = (Operand::rows(s, lk), Operand::rows(v, d));
        blas::matmul(Dims { m: rows, n: d, k: lk }, s, v, Output::rows(out, d), Update::SET, 1);
        for (row, inv) in out.chunks_exact_mut(d).zip(inv_sums.iter()) {
            row.iter_mut().for_each(|x| *x *= inv);
        }
    });
}

/// Fused attention for contiguous f32 CPU tensors `q: [N, Lq, D]`, `k, v: [N, Lk, D]`; `None` when the
/// inputs are not of that kind (the caller then uses the composite path).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() || q.dtype() != DType::F32 || k.dtype() != DType::F32 || v.dtype() != DType::F32 {
        return Ok(None);
    }
    let (n, lq, d) = q.dims3()?;
    let (_, lk, _) = k.dims3()?;
    if k.dims() != [n, lk, d] || v.dims() != [n, lk, d] || lk == 0 || d == 0 {
        return Ok(None);
    }
    let rows = (BLOCK_SCORES / lk).clamp(1, lq.min(MAX_BLOCK_ROWS));
    let scale = scale as f32;
    let out = with_f32_data(q, |qs| {
        with_f32_data(k, |ks| {
            with_f32_data(v, |vs| {
                let mut out = vec![0f32; n * lq * d];
                out.par_chunks_mut(lq * d).enumerate().for_each(|(head, out_head)| {
                    let q_head = &qs[head * lq * d..(head + 1) * lq * d];
                    let k_head = &ks[head * lk * d..(head + 1) * lk * d];
                    let v_head = &vs[head * lk * d..(head + 1) * lk * d];
                    out_head.par_chunks_mut(rows * d).zip(q_head.par_chunks(rows * d)).for_each(|(o, qb)| {
                        attend_block(qb, k_head, v_head, o, d, lk, scale);
                    });
                });
                out
            })
        })
    })???;
    Ok(Some(Tensor::from_vec(out, (n, lq, d), q.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_matches_the_c_library() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -(i as f32) * 4.35e-4;
            let (a, b) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp_nonpositive(-1000.0) < 1e-37);
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NAN) < 1e-37 && exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn fused_attention_matches_the_composite() {
        let dev = Device::Cpu;
        // The last two run in several blocks of query rows, the final one partial.
        for (n, lq, lk, d) in
            [(2, 5, 7, 4), (16, 300, 300, 40), (4, 1000, 77, 64), (2, 2500, 600, 16), (1, 2100, 50, 8)]
        {
            let q = Tensor::randn(0f32, 1.0, (n, lq, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (n, lk, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (n, lk, d), &dev).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let fused = attention(&q, &k, &v, scale).unwrap().unwrap();
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap();
            let diff = (fused - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 2e-6, "({n}, {lq}, {lk}, {d}): {diff}");
        }
    }
}
