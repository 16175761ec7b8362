//! Borrowing the data of a contiguous f32 CPU tensor, for the hand-written CPU kernels.

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
