//! 3×3 convolutions (stride 1, padding 1) on the CPU by Winograd's minimal filtering F(2×2, 3×3) (Lavin &
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2015): each 2×2 block of output pixels is
//! computed from the 4×4 patch of input around it with 16 multiplies per channel pair instead of 36, so the
//! convolution becomes 16 matrix multiplies `[c_out, c_in] · [c_in, tiles]` with 2.25× fewer multiply-adds
//! than the direct kernel's, between three cheap passes of additions: the weights' transform, the input's,
//! and the output's (which also adds the bias).
//!
//! The transforms only add, subtract and halve, so the result stays within a few float32 roundings of the
//! direct sum (the tests bound it against Candle's convolution); larger tiles, F(4×4, 3×3), would save more
//! but lose digits to their ±2, ±4, ±8 factors.

use super::blas::{self, Dims, Operand, Output, Update};
use super::cpu_data::filled;
use super::simd::widest_simd;
use rayon::prelude::*;

/// A 3×3 layer's weights as [`super::conv::CpuConv`] holds them: one `[c_out, c_in·3]` matrix per kernel row
/// (`rows[ky][(o·c_in + i)·3 + kx] = w[o, i, ky, kx]`), and the bias.
pub struct Layer<'a> {
    pub rows: &'a [Vec<f32>],
    pub bias: &'a [f32],
    pub c_in: usize,
    pub c_out: usize,
}

/// The 16 positions of a transformed 4×4 tile.
const POSITIONS: usize = 16;

/// Output tiles (2×2 pixels) an image needs for the transforms to pay. Transforming the weights costs the
/// same whatever the image size, and at the full-size SD 1.5 UNet's 8×8 level (16 tiles an image, 1280
/// channels) it outweighs the multiplies saved: 1.0–1.3× the direct kernel's time there for a guided image,
/// against 0.54–0.66× at 16×16 (64 tiles) and above. Counted per image, not per batch, so that an image
/// takes the same path alone as in a batch (and comes out the same).
const MIN_TILES: usize = 64;

/// Channels in and out a multiply needs: with fewer (the UNet's first and last convolution, 4 channels) the
/// products are too thin for the matrix kernel, and the transforms cost more than they save.
const MIN_CHANNELS: usize = 32;

/// Whether a 3×3 layer of `c_in` → `c_out` channels on images of `h`×`w` runs here (unless
/// `SD_RBEE_WINOGRAD=0` turns it off: the direct kernel's sums are closer to PyTorch's order).
pub fn applies(c_in: usize, c_out: usize, h: usize, w: usize) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| std::env::var("SD_RBEE_WINOGRAD").map_or(true, |v| v.trim() != "0"));
    enabled && pays(c_in, c_out, h, w)
}

/// Whether the layer is large enough for the transforms to pay ([`MIN_CHANNELS`], [`MIN_TILES`]).
pub fn pays(c_in: usize, c_out: usize, h: usize, w: usize) -> bool {
    c_in.min(c_out) >= MIN_CHANNELS && h.div_ceil(2) * w.div_ceil(2) >= MIN_TILES
}

/// The most floats of transformed input (or of products) one block of tiles holds (64 MiB): the image is
/// convolved a block of tile rows at a time, so memory stays bounded at any size (a 512-px VAE decode would
/// otherwise transform 0.5 GB of input at once). Blocks of 16 MiB split the full-size SD 1.5 UNet's
/// 16×16 layers (2560 channels, a guided image) into products of 96 and 32 tiles, too thin for the matrix
/// kernel: this size keeps them whole, and those layers ran 8–17 % faster (Intel AVX-512 and AMD Zen 4).
const BLOCK_FLOATS: usize = 1 << 24;

/// `x` (`[batch, c_in, h, w]`) convolved, `[batch, c_out, h, w]`: the transforms and the 16 products on
/// rayon's threads, each product's multiply on `threads / 16` of them (one, on fewer than 17 cores).
pub fn convolve(layer: &Layer, x: &[f32], batch: usize, h: usize, w: usize, threads: usize) -> Vec<f32> {
    convolve_in_blocks(layer, x, (batch, h, w), threads, BLOCK_FLOATS)
}

/// [`convolve`] in blocks of at most `block_floats` (or of one row of tiles, if that is more).
fn convolve_in_blocks(
    layer: &Layer,
    x: &[f32],
    (batch, h, w): (usize, usize, usize),
    threads: usize,
    block_floats: usize,
) -> Vec<f32> {
    let (ci, co) = (layer.c_in, layer.c_out);
    let (across, down) = (w.div_ceil(2), h.div_ceil(2));
    let mut scratch = Scratch::take();
    // `u[o][ξ][i]`: product ξ's left-hand side is rows `16·c_in` apart.
    let [r0, r1, r2] = [0, 1, 2].map(|ky| &layer.rows[ky][..]);
    let u = scratch.u.written(co * POSITIONS * ci, POSITIONS * ci, |o, out| {
        let at = o * ci * 3..(o + 1) * ci * 3;
        transform_weights(&r0[at.clone()], &r1[at.clone()], &r2[at], out)
    });
    let mut out = filled(batch * co * h * w, h * w, |_, _| {});
    // Rows of tiles, counted over the whole batch (item b's row ty is row b·down + ty), per block; the
    // blocks as even as they can be, so that none is a thin remainder.
    let all_rows = batch * down;
    let most = (block_floats / (POSITIONS * ci.max(co) * across)).max(1);
    let per_block = all_rows.div_ceil(all_rows.div_ceil(most));
    for first in (0..all_rows).step_by(per_block) {
        let tiles = Tiles { rows: first..all_rows.min(first + per_block), across, down, h, w };
        let n = tiles.count();
        // `v[i][ξ][tile]`: product ξ's right-hand side is rows `16·tiles` apart.
        let v = scratch.v.written(ci * POSITIONS * n, POSITIONS * n, |i, v| transform_input(x, ci, i, &tiles, v));
        // The 16 products, side by side: `m[ξ][o][tile]`. Each is a multiply of its own, so the threads take
        // whole products (16 of them balance over a few cores); more threads than products share each one.
        let per_product = threads.div_ceil(POSITIONS).max(1);
        let m = scratch.m.written(POSITIONS * co * n, co * n, |xi, product| {
            let a = Operand::rows(&u[xi * ci..], POSITIONS * ci);
            let b = Operand::rows(&v[xi * n..], POSITIONS * n);
            blas::matmul(Dims { m: co, n, k: ci }, a, b, Output::rows(product, n), Update::SET, per_product);
        });
        // Each output plane the block reaches, `[b][o]`.
        let items = tiles.rows.start / down..(tiles.rows.end - 1) / down + 1;
        let planes = &mut out[items.start * co * h * w..items.end * co * h * w];
        planes.par_chunks_mut(h * w).enumerate().for_each(|(k, plane)| {
            let (b, o) = (items.start + k / co, k % co);
            transform_output(m, co, b, o, layer.bias[o], &tiles, plane)
        });
    }
    scratch.put_back();
    out
}

/// A block of 2×2 output tiles: whole rows of them, `rows` counted over the batch, `across` tiles each.
struct Tiles {
    rows: std::ops::Range<usize>,
    across: usize,
    /// Tile rows per item.
    down: usize,
    h: usize,
    w: usize,
}

impl Tiles {
    fn count(&self) -> usize {
        self.rows.len() * self.across
    }
}

thread_local! {
    static SCRATCH: std::cell::Cell<Option<Box<Scratch>>> = const { std::cell::Cell::new(None) };
}

/// The transformed weights, input and products of the last call on this thread, kept for the next: fresh
/// ones would cost a page fault and a zeroing pass per page every call. The input and products are at most
/// [`BLOCK_FLOATS`] each (64 MiB); the weights are 16/9 of the largest layer's (SD 1.5's 2560 → 1280 at
/// 16×16: 210 MB), held per thread that convolves, until it exits.
/// Every element a call reads it has written first, so what the last call left needs no clearing.
#[derive(Default)]
struct Scratch {
    u: Buffer,
    v: Buffer,
    m: Buffer,
}

impl Scratch {
    /// This thread's buffers, or new ones if it has none (or a call on it is using them: a rayon thread
    /// waiting inside one convolution may run another).
    fn take() -> Box<Self> {
        SCRATCH.with(|s| s.take()).unwrap_or_default()
    }

    fn put_back(self: Box<Self>) {
        SCRATCH.with(|s| s.set(Some(self)));
    }
}

#[derive(Default)]
struct Buffer(Vec<f32>);

impl Buffer {
    /// The first `len` floats, chunk `i` (`chunk` floats) written by `fill(i, chunk)` on rayon's threads;
    /// `fill` must write every element of its chunk.
    fn written(&mut self, len: usize, chunk: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> &[f32] {
        use rayon::prelude::*;
        if self.0.len() < len {
            self.0 = vec![0.0; len];
        }
        self.0[..len].par_chunks_mut(chunk).enumerate().for_each(|(i, c)| fill(i, c));
        &self.0[..len]
    }
}

/// `G g Gᵀ` for one output channel's kernels `g` (kernel row ky of input channel i at `r_ky[3i..3i + 3]`),
/// `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`, into `out[ξ][i]`.
#[inline(always)]
fn transform_weights_generic(r0: &[f32], r1: &[f32], r2: &[f32], out: &mut [f32]) {
    let ci = out.len() / POSITIONS;
    for i in 0..ci {
        let [g0, g1, g2] = [r0, r1, r2].map(|row| [row[3 * i], row[3 * i + 1], row[3 * i + 2]]);
        // G·g, a 4×3 matrix, row by row.
        let gg = [
            g0,
            std::array::from_fn(|kx| (g0[kx] + g1[kx] + g2[kx]) * 0.5),
            std::array::from_fn(|kx| (g0[kx] - g1[kx] + g2[kx]) * 0.5),
            g2,
        ];
        for (r, [a, b, c]) in gg.into_iter().enumerate() {
            let row = [a, (a + b + c) * 0.5, (a - b + c) * 0.5, c];
            for (col, value) in row.into_iter().enumerate() {
                out[(r * 4 + col) * ci + i] = value;
            }
        }
    }
}

widest_simd! {
    /// [`transform_weights_generic`] with the widest vector unit this CPU has.
    fn transform_weights(r0: &[f32], r1: &[f32], r2: &[f32], out: &mut [f32]) => transform_weights_generic
}

/// `Bᵀ d B` for each 4×4 patch `d` of input channel `i` (rows and columns `2t-1 ..= 2t+2` around output tile
/// t, zero past the edges), `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`, into
/// `out[ξ][tile]`.
#[inline(always)]
fn transform_input_generic(x: &[f32], ci: usize, i: usize, tiles: &Tiles, out: &mut [f32]) {
    let Tiles { across, down, h, w, .. } = *tiles;
    let n = tiles.count();
    // One padded row: a zero column on the left, the image row, zeros up to 2·across + 2.
    let padded = 2 * across + 2;
    let mut d = vec![0f32; 4 * padded];
    let mut t = vec![0f32; 4 * padded];
    for (k, row) in tiles.rows.clone().enumerate() {
        let (b, ty) = (row / down, row % down);
        let plane = &x[(b * ci + i) * h * w..(b * ci + i + 1) * h * w];
        for (j, row) in d.chunks_exact_mut(padded).enumerate() {
            // Image row 2·ty - 1 + j, or zeros above and below the image.
            match (2 * ty + j).checked_sub(1).filter(|&y| y < h) {
                Some(y) => row[1..=w].copy_from_slice(&plane[y * w..(y + 1) * w]),
                None => row[1..=w].fill(0.0),
            }
        }
        // Bᵀ·d: the four rows combined, whole rows at a time.
        let [d0, d1, d2, d3] = rows4(&d, padded);
        let (t0, rest) = t.split_at_mut(padded);
        let (t1, rest) = rest.split_at_mut(padded);
        let (t2, t3) = rest.split_at_mut(padded);
        for c in 0..padded {
            t0[c] = d0[c] - d2[c];
            t1[c] = d1[c] + d2[c];
            t2[c] = d2[c] - d1[c];
            t3[c] = d1[c] - d3[c];
        }
        // (Bᵀ·d)·B: the same on each tile's four columns.
        for (r, tr) in t.chunks_exact(padded).enumerate() {
            let (o0, rest) = out[r * 4 * n + k * across..].split_at_mut(n);
            let (o1, rest) = rest.split_at_mut(n);
            let (o2, o3) = rest.split_at_mut(n);
            for tx in 0..across {
                let c = &tr[2 * tx..2 * tx + 4];
                o0[tx] = c[0] - c[2];
                o1[tx] = c[1] + c[2];
                o2[tx] = c[2] - c[1];
                o3[tx] = c[1] - c[3];
            }
        }
    }
}

widest_simd! {
    /// [`transform_input_generic`] with the widest vector unit this CPU has.
    fn transform_input(x: &[f32], ci: usize, i: usize, tiles: &Tiles, out: &mut [f32]) => transform_input_generic
}

/// The four rows of `len` each that `d` holds.
fn rows4(d: &[f32], len: usize) -> [&[f32]; 4] {
    std::array::from_fn(|j| &d[j * len..(j + 1) * len])
}

/// `Aᵀ m A` for each tile's 16 products, `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`, plus the bias: output
/// channel `o` of item `b`, into `out[h][w]`.
#[inline(always)]
fn transform_output_generic(m: &[f32], co: usize, b: usize, o: usize, bias: f32, tiles: &Tiles, out: &mut [f32]) {
    let Tiles { across, down, h, w, .. } = *tiles;
    let n = tiles.count();
    let mut y = vec![[0f32; 4]; across];
    // This item's tile rows in the block.
    let rows = tiles.rows.start.max(b * down)..tiles.rows.end.min((b + 1) * down);
    for row in rows {
        let (k, ty) = (row - tiles.rows.start, row % down);
        let p: [&[f32]; POSITIONS] = std::array::from_fn(|xi| &m[(xi * co + o) * n + k * across..][..across]);
        for (tx, y) in y.iter_mut().enumerate() {
            // Aᵀ·m, column by column.
            let s = |col: usize| {
                let (a, b, c, d) = (p[col][tx], p[4 + col][tx], p[8 + col][tx], p[12 + col][tx]);
                (a + b + c, b - c - d)
            };
            let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
            *y = [
                s0.0 + s1.0 + s2.0 + bias,
                s1.0 - s2.0 - s3.0 + bias,
                s0.1 + s1.1 + s2.1 + bias,
                s1.1 - s2.1 - s3.1 + bias,
            ];
        }
        for r in 0..2 {
            let row = 2 * ty + r;
            if row >= h {
                break;
            }
            for (pair, y) in out[row * w..(row + 1) * w].chunks_mut(2).zip(&y) {
                pair[0] = y[2 * r];
                if let Some(second) = pair.get_mut(1) {
                    *second = y[2 * r + 1];
                }
            }
        }
    }
}

widest_simd! {
    /// [`transform_output_generic`] with the widest vector unit this CPU has.
    fn transform_output(m: &[f32], co: usize, b: usize, o: usize, bias: f32, tiles: &Tiles, out: &mut [f32]) => transform_output_generic
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    /// Against Candle's direct convolution: even and odd sizes (partial tiles on the right and at the
    /// bottom), single rows and columns, one item and several, few and many channels.
    #[test]
    fn winograd_matches_candle() {
        let dev = Device::Cpu;
        for (batch, c_in, c_out, h, w) in [
            (1, 1, 1, 1, 1),
            (2, 3, 5, 4, 6),
            (3, 8, 4, 5, 7),
            (1, 64, 32, 17, 9),
            (2, 320, 16, 8, 8),
            (1, 4, 3, 1, 9),
            (3, 16, 24, 7, 10),
        ] {
            let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, c_out, &dev).unwrap();
            let cfg = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
            let reference = candle_nn::Conv2d::new(weight.clone(), Some(bias.clone()), cfg);
            let x = Tensor::randn(0f32, 1.0, (batch, c_in, h, w), &dev).unwrap();
            let want: Vec<f32> = reference.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let wv: Vec<f32> = weight.flatten_all().unwrap().to_vec1().unwrap();
            let rows: Vec<Vec<f32>> = (0..3)
                .map(|ky| {
                    let mut r = Vec::new();
                    for o in 0..c_out {
                        for i in 0..c_in {
                            for kx in 0..3 {
                                r.push(wv[((o * c_in + i) * 3 + ky) * 3 + kx]);
                            }
                        }
                    }
                    r
                })
                .collect();
            let bias: Vec<f32> = bias.to_vec1().unwrap();
            let layer = Layer { rows: &rows, bias: &bias, c_in, c_out };
            let data: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            // One block; blocks of a row of tiles, or of two (some straddling two items); blocks of at most five
            // rows, evened out (12 rows: three of four).
            let row = POSITIONS * c_in.max(c_out) * w.div_ceil(2);
            for (threads, block) in
                [(1, BLOCK_FLOATS), (2, BLOCK_FLOATS), (3, BLOCK_FLOATS), (2, row), (2, 2 * row), (2, 5 * row)]
            {
                let got = convolve_in_blocks(&layer, &data, (batch, h, w), threads, block);
                assert_eq!(got.len(), want.len());
                let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let tol = 4e-6 * ((c_in * 9) as f32).sqrt();
                assert!(
                    d < tol,
                    "{batch}x{c_in}->{c_out} {h}x{w} threads {threads} block {block}: {d} (tolerance {tol})"
                );
            }
        }
    }
}
