//! The hand-written CPU kernels' data: borrowing a contiguous f32 tensor's elements, and writing a large new
//! vector on every core ([`filled`]).

use candle_core::{DType, Result, Storage, Tensor};

/// Runs `f` on the elements of `t` (f32, on the CPU) without copying them; `t` is made contiguous first
/// if it is not.
pub fn with_f32_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() != DType::F32 {
        candle_core::bail!("expected an f32 tensor, got {:?}", t.dtype());
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { candle_core::bail!("expected a CPU tensor") };
    let data = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(f(&data[start..end])),
        None => candle_core::bail!("expected a contiguous tensor"),
    }
}

/// Vectors of at least this many floats are written on rayon's threads by [`filled`]; smaller ones (the
/// tiny models' layers) on the calling thread, where handing off would cost more than it saves.
const PARALLEL_FILL: usize = 1 << 16;

/// A vector of `len` floats, chunk `i` (`chunk` floats; the last may be shorter) written by `fill(i, chunk)`,
/// the chunks in parallel when the vector is large. A fresh `vec![0.0; len]` is zeroed (or its pages first
/// touched) by one thread before any kernel runs: at full size that serial pass, and the serial fills that
/// followed it, left the other core idle about a tenth of a UNet call. Here each chunk is zeroed by the
/// thread that then fills it, while the chunk is in its cache.
pub fn filled(len: usize, chunk: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    filled_on(len >= PARALLEL_FILL, len, chunk, fill)
}

/// [`filled`] with the chunks always on rayon's threads, for kernels whose every chunk is real work.
pub fn filled_in_parallel(len: usize, chunk: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    filled_on(true, len, chunk, fill)
}

fn filled_on(parallel: bool, len: usize, chunk: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let chunk = chunk.max(1);
    let mut v: Vec<f32> = Vec::with_capacity(len);
    let spare = &mut v.spare_capacity_mut()[..len];
    let run = |(i, c): (usize, &mut [MaybeUninit<f32>])| {
        c.fill(MaybeUninit::new(0.0));
        // SAFETY: every element of `c` was initialised just above, and `f32` has no invalid bit patterns.
        let c = unsafe { &mut *(c as *mut [MaybeUninit<f32>] as *mut [f32]) };
        fill(i, c);
    };
    if parallel {
        spare.par_chunks_mut(chunk).enumerate().for_each(run);
    } else {
        spare.chunks_mut(chunk).enumerate().for_each(run);
    }
    // SAFETY: the loop above initialised all `len` elements (a panic in `fill` propagates before this).
    unsafe { v.set_len(len) };
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_chunk_is_filled_once_small_or_large() {
        for len in [0, 7, 1000, super::PARALLEL_FILL + 13] {
            let v = super::filled(len, 10, |i, c| c.iter_mut().enumerate().for_each(|(j, x)| *x = (i * 10 + j) as f32));
            assert_eq!(v.len(), len);
            assert!(v.iter().enumerate().all(|(k, &x)| x == k as f32), "len {len}");
        }
        // A fill that leaves part of its chunk alone leaves zeros there, not stale memory.
        let v = super::filled(super::PARALLEL_FILL * 2, 64, |_, c| c[0] = 1.0);
        assert!(v.chunks(64).all(|c| c[0] == 1.0 && c[1..].iter().all(|&x| x == 0.0)));
    }
}
