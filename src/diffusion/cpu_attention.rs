//! A fused scaled-dot-product attention kernel for the CPU (f32).
//!
//! For each (batch·head, block of query rows) it computes the block's scores with one matrix multiply,
//! turns them into probabilities in place with a vectorised exponential, and multiplies by V straight into
//! the output; blocks run in parallel, each with a reused per-thread score buffer sized to stay in cache.
//! Compared with the composite version (scale, matmul, softmax, matmul, concatenate) it allocates nothing per
//! call beyond the output (and, for K and V too large to read in place, one copy of each split into heads:
//! K transposed, V padded to whole vectors, the layouts the matrix kernel reads without packing them again),
//! never materialises the full attention matrix, and spends far less time in `exp`.

use std::cell::RefCell;

use candle_core::{DType, Result, Tensor};

use super::blas::{self, Dims, Operand, Output, Update};
use super::cpu_data::{filled, with_f32_data};
use super::simd::widest_simd;
use rayon::prelude::*;

/// Scores per block: 256 Ki floats (1 MiB). At 4096 keys (SD 1.5 at 512 px) that is 64 query rows, enough
/// for each multiply to amortise packing K and V: the full-size UNet step ran 5–10 % faster than with 16-row
/// blocks (64 Ki), on the built-in gemm and on OpenBLAS alike.
const BLOCK_SCORES: usize = 1 << 18;

/// The most elements of an item's K (or V) read where they lie, all heads together (256 KiB: about a core's
/// L2 cache). A head's rows there are `H·D` apart, so reading one head touches the cache lines of all of
/// them: past this the strided reads cost more than copying each head's K and V apart first (the full-size
/// SD 1.5 UNet's attention at 512 px, 4096 keys of 320: 20 % slower in place). Q and the output stay in
/// place either way: each block reads its few rows of Q once.
const MAX_IN_PLACE_KV: usize = 1 << 16;

/// Query rows per block at most (short keys, as cross-attention's 77, would otherwise make huge blocks).
const MAX_BLOCK_ROWS: usize = 1024;

/// Query rows per block when K and V are copied apart: few enough that the `gemm` crate multiplies both
/// operands where they lie, in its micro-kernels, rather than packing K and V into panels again for every
/// block (it packs past 8 of its micro-tiles' widths, 48 rows on AVX2 and AVX-512 alike). At 4096 keys of
/// 40 (SD 1.5 at 512 px) packing took a fifth of the attention's time; this layout runs it 10 % faster.
const SPLIT_BLOCK_ROWS: usize = 32;

/// Floats added to each row of a head's transposed K (`[D, Lk + pad]`): rows `Lk` apart would fall on the
/// same cache sets whenever `Lk` is a multiple of 1024, and the score product reads one value from each.
const K_ROW_PAD: usize = 16;

/// V's columns when copied apart are padded with zeros to a multiple of this (a vector of 16 floats), so its
/// product's width is whole vectors (the `gemm` crate packs V again for every block otherwise).
const V_COLUMNS: usize = 16;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `exp(x)` for x ≤ 0 (softmax inputs after subtracting the row maximum), within 2 ulp of the C library's,
/// written without branches so it vectorises: x = n·ln2 + r, Cephes' degree-6 polynomial for e^r, then 2^n.
/// Each multiply-add is one fused `mul_add`: a single instruction on the AVX2+FMA and AVX-512 paths (and on
/// ARM), nearly half the instructions of separate ones, and rounded once, so every path computes the same
/// value (a CPU without FMA gets it from the C library's `fmaf`, slowly but exactly).
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // max/min return the other operand for NaN, so x ends up in [-87, 0] whatever came in.
    #[allow(clippy::manual_clamp)] // `clamp` would keep NaN, which the conversion below must never see
    let x = x.max(-87.0).min(0.0);
    let n = x.mul_add(LOG2E, 0.5).floor();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
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

/// One head of a block of query rows: `out[rows, d] = softmax(q[rows, d] · kᵀ[d, lk] · scale) · v[lk, d]`,
/// where the rows of `q` and `out` are `stride` apart and those of `v` `kv_stride` apart (the heads of a
/// `[L, H·D]` projection sit side by side in its rows, so a head is read and written where it lies; K and V
/// may have been copied apart into heads of their own, K transposed and V padded to `dv` columns, see
/// [`MAX_IN_PLACE_KV`]).
struct HeadBlock<'a> {
    q: &'a [f32],
    k_t: Operand<'a>,
    v: &'a [f32],
    rows: usize,
    lk: usize,
    d: usize,
    stride: usize,
    kv_stride: usize,
    /// Columns of V's product, `d` or more (V padded with zero columns).
    dv: usize,
}

fn attend_block(h: HeadBlock, out: &mut [f32], scale: f32) {
    let HeadBlock { q, k_t, v, rows, lk, d, stride, kv_stride, dv } = h;
    SCORES.with(|cell| {
        let mut scores = cell.borrow_mut();
        let wide_len = if dv == d { 0 } else { rows * dv };
        if scores.len() < rows * lk + wide_len {
            scores.resize(rows * lk + wide_len, 0.0);
        }
        let (s, wide) = scores.split_at_mut(rows * lk);
        // One thread each: the blocks themselves run in parallel.
        let q = Operand::rows(q, stride);
        blas::matmul(Dims { m: rows, n: lk, k: d }, q, k_t, Output::rows(s, lk), Update::scaled(scale), 1);
        let mut inv_sums = [0f32; MAX_BLOCK_ROWS];
        let inv_sums = &mut inv_sums[..rows];
        exp_rows(s, lk, inv_sums);
        let (s, v) = (Operand::rows(s, lk), Operand::rows(v, kv_stride));
        if dv == d {
            blas::matmul(Dims { m: rows, n: d, k: lk }, s, v, Output::rows(out, stride), Update::SET, 1);
            for (r, inv) in inv_sums.iter().enumerate() {
                out[r * stride..r * stride + d].iter_mut().for_each(|x| *x *= inv);
            }
        } else {
            // Into the padded width, then the real columns on to the output.
            let wide = &mut wide[..rows * dv];
            blas::matmul(Dims { m: rows, n: dv, k: lk }, s, v, Output::rows(wide, dv), Update::SET, 1);
            for (r, inv) in inv_sums.iter().enumerate() {
                out[r * stride..r * stride + d].iter_mut().zip(&wide[r * dv..]).for_each(|(x, w)| *x = w * inv);
            }
        }
    });
}

/// Fused attention for contiguous f32 CPU tensors `q: [N, Lq, D]`, `k, v: [N, Lk, D]`; `None` when the
/// inputs are not of that kind (the caller then uses the composite path).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    attention_heads(q, k, v, 1, scale)
}

/// Fused multi-head attention on projections as they come out of their linear layers, `q: [B, Lq, H·D]`,
/// `k, v: [B, Lk, H·D]`, into `[B, Lq, H·D]` (what the output projection takes): each head is read and
/// written in place, where splitting into `[B·H, L, D]` and merging back would copy q, k, v and the output
/// once more each (K and V too large to read in place, [`MAX_IN_PLACE_KV`], are copied apart into heads, in
/// parallel). `None` when the inputs are not f32 CPU tensors of that kind.
pub fn attention_heads(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() || q.dtype() != DType::F32 || k.dtype() != DType::F32 || v.dtype() != DType::F32 {
        return Ok(None);
    }
    let (b, lq, inner) = q.dims3()?;
    let (_, lk, _) = k.dims3()?;
    if heads == 0 || inner % heads != 0 || k.dims() != [b, lk, inner] || v.dims() != [b, lk, inner] || lk == 0 {
        return Ok(None);
    }
    let d = inner / heads;
    if d == 0 || lq == 0 {
        return Ok(None);
    }
    let split_kv = heads > 1 && lk * inner > MAX_IN_PLACE_KV;
    let most_rows = if split_kv { SPLIT_BLOCK_ROWS } else { MAX_BLOCK_ROWS };
    let mut rows = (BLOCK_SCORES / lk).clamp(1, lq.min(most_rows));
    // V's width and K's row stride once copied apart.
    let (dv, k_stride) = if split_kv { (d.next_multiple_of(V_COLUMNS), lk + K_ROW_PAD) } else { (d, inner) };
    // Blocks run in parallel: a single image without guidance (B = 1) still gives every thread one.
    let threads = candle_core::utils::get_num_threads().max(1);
    if b * lq.div_ceil(rows) < threads {
        rows = lq.div_ceil(threads.div_ceil(b)).max(1);
    }
    let scale = scale as f32;
    // Each item's heads of V one after the other, `[B, H, Lk, dv]`.
    let heads_apart = |kv: &[f32]| {
        filled(b * heads * lk * dv, lk * dv, |item_head, dst| {
            let (item, at) = (item_head / heads, (item_head % heads) * d);
            let src = &kv[item * lk * inner + at..];
            // The padding stays zero (`filled` zeroes first); it only reaches product columns never read.
            for (j, row) in dst.chunks_exact_mut(dv).enumerate() {
                row[..d].copy_from_slice(&src[j * inner..j * inner + d]);
            }
        })
    };
    // Each item's heads of K transposed, `[B, H, D, k_stride]` (the padding stays zero, never read): the
    // scores' right-hand side as the matrix kernel reads it without packing.
    let heads_transposed = |k: &[f32]| {
        filled(b * heads * d * k_stride, d * k_stride, |item_head, dst| {
            let (item, at) = (item_head / heads, (item_head % heads) * d);
            let src = &k[item * lk * inner + at..];
            for (j, row) in src.chunks(inner).take(lk).enumerate() {
                for (c, &x) in row[..d].iter().enumerate() {
                    dst[c * k_stride + j] = x;
                }
            }
        })
    };
    let out = with_f32_data(q, |qs| {
        with_f32_data(k, |ks| {
            with_f32_data(v, |vs| {
                let (k_apart, v_apart);
                let (ks, vs, kv_stride) = if split_kv {
                    (k_apart, v_apart) = (heads_transposed(ks), heads_apart(vs));
                    (&k_apart[..], &v_apart[..], dv)
                } else {
                    (ks, vs, inner)
                };
                // Head `head` of item `item`: the scores' right-hand side Kᵀ, and V.
                let k_t = |item: usize, head: usize| match split_kv {
                    true => Operand::rows(&ks[(item * heads + head) * d * k_stride..], k_stride),
                    false => Operand::transposed(&ks[item * lk * inner + head * d..], inner),
                };
                let v_at = |item: usize, head: usize| match split_kv {
                    true => (item * heads + head) * lk * dv,
                    false => item * lk * inner + head * d,
                };
                let mut out = vec![0f32; b * lq * inner];
                out.par_chunks_mut(lq * inner).enumerate().for_each(|(item, out_item)| {
                    let q_item = &qs[item * lq * inner..(item + 1) * lq * inner];
                    out_item.par_chunks_mut(rows * inner).enumerate().for_each(|(block, o)| {
                        let q_block = &q_item[block * rows * inner..];
                        let rows = o.len() / inner;
                        for head in 0..heads {
                            let at = head * d;
                            let h = HeadBlock {
                                q: &q_block[at..],
                                k_t: k_t(item, head),
                                v: &vs[v_at(item, head)..],
                                rows,
                                lk,
                                d,
                                stride: inner,
                                kv_stride,
                                dv,
                            };
                            attend_block(h, &mut o[at..], scale);
                        }
                    });
                });
                out
            })
        })
    })???;
    Ok(Some(Tensor::from_vec(out, (b, lq, inner), q.device())?))
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

    #[test]
    fn heads_read_in_place_match_heads_split_apart() {
        let dev = Device::Cpu;
        // Cross-attention's 77 keys, one item (row blocks split for the threads), several items and blocks;
        // then K and V past the in-place bound (copied apart into heads): one item, and two of uneven blocks.
        let cases =
            [(1, 8, 64, 77, 4), (3, 5, 33, 33, 8), (2, 2, 2100, 50, 40), (1, 8, 70, 1100, 8), (2, 4, 300, 700, 40)];
        for (b, heads, lq, lk, d) in cases {
            assert_eq!(lk * heads * d > MAX_IN_PLACE_KV, lk >= 700, "the cases cover both sides of the bound");
            let q = Tensor::randn(0f32, 1.0, (b, lq, heads * d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, lk, heads * d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, lk, heads * d), &dev).unwrap();
            let split = |t: &Tensor, l: usize| {
                t.reshape((b, l, heads, d)).unwrap().transpose(1, 2).unwrap().reshape((b * heads, l, d)).unwrap()
            };
            let scale = 1.0 / (d as f64).sqrt();
            let apart = attention(
                &split(&q, lq).contiguous().unwrap(),
                &split(&k, lk).contiguous().unwrap(),
                &split(&v, lk).contiguous().unwrap(),
                scale,
            )
            .unwrap()
            .unwrap();
            let want =
                apart.reshape((b, heads, lq, d)).unwrap().transpose(1, 2).unwrap().reshape((b, lq, heads * d)).unwrap();
            let fused = attention_heads(&q, &k, &v, heads, scale).unwrap().unwrap();
            let diff = (fused - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "({b}, {heads}, {lq}, {lk}, {d}): {diff}");
        }
    }
}
