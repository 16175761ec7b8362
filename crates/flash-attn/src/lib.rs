//! FlashAttention-2's forward pass for sd-rbee on CUDA: `softmax(q kᵀ · scale) v` over
//! `[batch, seq, heads, head_dim]` tensors in f16 or bf16, without materialising the attention matrix.
//!
//! Only the kernels Stable Diffusion needs are built (see `build.rs`): non-causal, f16, head dimensions in
//! the 64, 96 and 160 buckets (bf16 falls back to plain attention for now). [`supports`] says whether a shape has one; callers fall back to plain attention
//! otherwise. The wrapper follows candle-flash-attn 0.11.1's (MIT OR Apache-2.0); the kernels are
//! FlashAttention-2's (BSD-3-Clause, Tri Dao), as candle-flash-attn vendors them.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor};
use core::ffi::{c_int, c_void};
use half::{bf16, f16};

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

extern "C" {
    fn sdr_flash_attn_fwd(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        o: *const c_void,
        softmax_lse: *const c_void,
        q_batch_stride: u32,
        k_batch_stride: u32,
        v_batch_stride: u32,
        o_batch_stride: u32,
        q_row_stride: u32,
        k_row_stride: u32,
        v_row_stride: u32,
        o_row_stride: u32,
        q_head_stride: u32,
        k_head_stride: u32,
        v_head_stride: u32,
        o_head_stride: u32,
        b: u32,
        h: u32,
        d: u32,
        d_rounded: u32,
        softmax_scale: f32,
        seqlen_q: u32,
        seqlen_k: u32,
        seqlen_q_rounded: u32,
        seqlen_k_rounded: u32,
        is_bf16: c_int,
        stream: *mut c_void,
    ) -> c_int;
}

/// FlashAttention-2's head-dimension buckets.
fn bucket(head_dim: usize) -> Option<usize> {
    [32, 64, 96, 128, 160, 192, 224, 256, 512].into_iter().find(|&b| head_dim <= b)
}

/// Whether a kernel was built for `dtype` and `head_dim` (which must also be a multiple of 8).
pub fn supports(dtype: DType, head_dim: usize) -> bool {
    let tag = match dtype {
        DType::F16 => "fp16",
        DType::BF16 => "bf16",
        _ => return false,
    };
    head_dim % 8 == 0 && bucket(head_dim).is_some_and(|b| KERNELS.contains(&(tag, b)))
}

fn round_multiple(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

struct FlashAttn {
    softmax_scale: f32,
}

impl FlashAttn {
    #[allow(clippy::too_many_arguments)]
    fn fwd<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
        is_bf16: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device();
        let out_shape = q_l.shape().clone();
        let out_l = Layout::contiguous(&out_shape);
        let (q_s, k_s, v_s, o_s) = (q_l.stride(), k_l.stride(), v_l.stride(), out_l.stride());
        if q_s.len() != 4 || k_s.len() != 4 || v_s.len() != 4 {
            bail!("flash attention expects rank-4 q, k and v");
        }
        if q_s[3] != 1 || k_s[3] != 1 || v_s[3] != 1 {
            bail!("flash attention expects the head dimension contiguous (q {q_s:?}, k {k_s:?}, v {v_s:?})");
        }
        let (b, seqlen_q, heads, head_dim) = q_l.shape().dims4()?;
        let (kb, seqlen_k, k_heads, k_dim) = k_l.shape().dims4()?;
        if (kb, k_heads, k_dim) != (b, heads, head_dim) || k_l.shape() != v_l.shape() {
            bail!("flash attention: q {:?}, k {:?} and v {:?} do not match", q_l.shape(), k_l.shape(), v_l.shape());
        }
        let dtype = if is_bf16 { DType::BF16 } else { DType::F16 };
        if !supports(dtype, head_dim) {
            bail!("flash attention has no {dtype:?} kernel for head dimension {head_dim}");
        }
        let q = q.as_cuda_slice::<T>()?.slice(q_l.start_offset()..);
        let k = k.as_cuda_slice::<T>()?.slice(k_l.start_offset()..);
        let v = v.as_cuda_slice::<T>()?.slice(v_l.start_offset()..);
        let stream = dev.cuda_stream();
        let mut dst = unsafe { dev.alloc::<T>(out_shape.elem_count())? };
        // SAFETY: the kernel writes the log-sum-exp of every query row (and nothing reads it here).
        let mut lse = unsafe { dev.alloc::<f32>(b * heads * seqlen_q)? };
        let status = unsafe {
            let (q_ptr, _g1) = q.device_ptr(&stream);
            let (k_ptr, _g2) = k.device_ptr(&stream);
            let (v_ptr, _g3) = v.device_ptr(&stream);
            let (o_ptr, _g4) = dst.device_ptr_mut(&stream);
            let (lse_ptr, _g5) = lse.device_ptr_mut(&stream);
            sdr_flash_attn_fwd(
                q_ptr as *const c_void,
                k_ptr as *const c_void,
                v_ptr as *const c_void,
                o_ptr as *const c_void,
                lse_ptr as *const c_void,
                q_s[0] as u32,
                k_s[0] as u32,
                v_s[0] as u32,
                o_s[0] as u32,
                q_s[1] as u32,
                k_s[1] as u32,
                v_s[1] as u32,
                o_s[1] as u32,
                q_s[2] as u32,
                k_s[2] as u32,
                v_s[2] as u32,
                o_s[2] as u32,
                b as u32,
                heads as u32,
                head_dim as u32,
                round_multiple(head_dim, 32) as u32,
                self.softmax_scale,
                seqlen_q as u32,
                seqlen_k as u32,
                round_multiple(seqlen_q, 128) as u32,
                round_multiple(seqlen_k, 128) as u32,
                c_int::from(is_bf16),
                stream.cu_stream() as *mut c_void,
            )
        };
        if status != 0 {
            bail!("flash attention has no kernel for head dimension {head_dim}");
        }
        Ok((CudaStorage::wrap_cuda_slice(dst, dev.clone()), out_shape))
    }
}

impl candle_core::CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "sd-rbee-flash-attn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("flash attention runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match q.dtype() {
            DType::F16 => self.fwd::<f16>(q, q_l, k, k_l, v, v_l, false),
            DType::BF16 => self.fwd::<bf16>(q, q_l, k, k_l, v, v_l, true),
            dt => bail!("flash attention takes f16 or bf16, not {dt:?}"),
        }
    }
}

/// `softmax(q kᵀ · softmax_scale) v` for `q: [B, Lq, H, D]`, `k, v: [B, Lk, H, D]` on CUDA in f16/bf16;
/// returns `[B, Lq, H, D]`. Check [`supports`] first.
pub fn flash_attn(q: &Tensor, k: &Tensor, v: &Tensor, softmax_scale: f32) -> Result<Tensor> {
    q.apply_op3_no_bwd(k, v, &FlashAttn { softmax_scale })
}
