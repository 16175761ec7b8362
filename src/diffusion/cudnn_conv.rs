//! 2-D convolutions on CUDA through cuDNN with one plan per shape, as PyTorch runs them.
//!
//! Candle's cuDNN path rebuilds four descriptors, asks cuDNN's heuristics for an algorithm and allocates and
//! zeroes a fresh workspace on every call. Under cuDNN 9 the heuristic query alone costs milliseconds (it
//! plans through the backend engines): on an H200 that was about 3 ms a convolution in f16, 0.25 s of fixed
//! cost on each SD 1.5 UNet step whatever the batch. Here the descriptors and the algorithm are made once per
//! (device, dtype, shapes, padding, stride, dilation, TF32) and kept for the thread, the algorithm (the costly
//! part) for the process, so a fresh thread (the worker's batches run on a pool's) asks for none again, and one
//! workspace per device grows as needed and is reused (the stream orders its uses).
//!
//! Precision follows PyTorch's: f16 and bf16 run with f32 accumulation on tensor cores (cuDNN's pseudo-half
//! configuration; Candle accumulates f16 in f16), and f32 runs in full f32 (`CUDNN_FMA_MATH`) unless TF32 is
//! turned on (`SD_RBEE_TF32=1`), so that CUDA f32 output matches diffusers' f32 numbers, not TF32's.
//! `SD_RBEE_CUDNN_PLANS=0` hands every convolution back to Candle (A/B timing).

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId};
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !matches!(std::env::var("SD_RBEE_CUDNN_PLANS").as_deref().map(str::trim), Ok("0" | "off")))
}

/// Everything a plan depends on.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    device: DeviceId,
    dtype: DType,
    x: [usize; 4],
    w: [usize; 4],
    padding: usize,
    stride: usize,
    dilation: usize,
    tf32: bool,
}

/// The descriptors and algorithm for one key; `T` is the tensors' type, `C` the accumulation type.
struct Plan<T: CudnnDataType, C: CudnnDataType> {
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    conv: ConvDescriptor<C>,
    y: TensorDescriptor<T>,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
}

#[derive(Default)]
struct ThreadState {
    handles: HashMap<DeviceId, Arc<Cudnn>>,
    // Plan<T, C> for the key's dtype; descriptors are neither Send nor Sync, hence per thread.
    plans: HashMap<PlanKey, Box<dyn Any>>,
    workspaces: HashMap<DeviceId, CudaSlice<u8>>,
}

thread_local! {
    static STATE: RefCell<ThreadState> = RefCell::new(ThreadState::default());
}

/// The algorithm cuDNN's heuristics chose for each key, shared by every thread.
fn chosen_algorithms() -> &'static Mutex<HashMap<PlanKey, sys::cudnnConvolutionFwdAlgo_t>> {
    static CHOSEN: OnceLock<Mutex<HashMap<PlanKey, sys::cudnnConvolutionFwdAlgo_t>>> = OnceLock::new();
    CHOSEN.get_or_init(Mutex::default)
}

fn cudnn_error(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN convolution: {e:?}"))
}

fn dims4(l: &Layout) -> Result<[usize; 4]> {
    match *l.dims() {
        [a, b, c, d] => Ok([a, b, c, d]),
        _ => bail!("cuDNN convolution: expected a 4-D tensor, got {:?}", l.dims()),
    }
}

fn as_i32(dims: [usize; 4]) -> [i32; 4] {
    dims.map(|d| d as i32)
}

struct ConvOp {
    padding: usize,
    stride: usize,
    dilation: usize,
}

impl ConvOp {
    fn out_dims(&self, x: [usize; 4], w: [usize; 4]) -> [usize; 4] {
        let out = |size: usize, k: usize| (size + 2 * self.padding - self.dilation * (k - 1) - 1) / self.stride + 1;
        [x[0], w[0], out(x[2], w[2]), out(x[3], w[3])]
    }

    fn plan<T: CudnnDataType + 'static, C: CudnnDataType + 'static>(
        &self,
        cudnn: &Arc<Cudnn>,
        key: &PlanKey,
        math: sys::cudnnMathType_t,
    ) -> Result<Plan<T, C>> {
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let (p, s, d) = (self.padding as i32, self.stride as i32, self.dilation as i32);
        let x = cudnn.create_4d_tensor::<T>(nchw, as_i32(key.x)).map_err(cudnn_error)?;
        let w = cudnn.create_4d_filter::<T>(nchw, as_i32(key.w)).map_err(cudnn_error)?;
        let y = cudnn.create_4d_tensor::<T>(nchw, as_i32(self.out_dims(key.x, key.w))).map_err(cudnn_error)?;
        let mut conv = cudnn
            .create_conv2d::<C>([p, p], [s, s], [d, d], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
            .map_err(cudnn_error)?;
        conv.set_math_type(math).map_err(cudnn_error)?;
        let forward = ConvForward { conv: &conv, x: &x, w: &w, y: &y };
        let chosen = chosen_algorithms().lock().unwrap_or_else(|e| e.into_inner()).get(key).copied();
        let algo = match chosen {
            Some(algo) => algo,
            None => {
                let algo = forward.pick_algorithm().map_err(cudnn_error)?;
                chosen_algorithms().lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), algo);
                algo
            }
        };
        let workspace = forward.get_workspace_size(algo).map_err(cudnn_error)?;
        Ok(Plan { x, w, conv, y, algo, workspace })
    }

    fn run<T, C>(
        &self,
        dev: &CudaDevice,
        x: &CudaStorage,
        x_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
    ) -> Result<CudaStorage>
    where
        T: CudnnDataType + CudaDType + DeviceRepr + WithDType + 'static,
        T::Scalar: 'static,
        C: CudnnDataType + 'static,
    {
        let tf32 = candle_core::cuda_backend::gemm_reduced_precision_f32();
        let key = PlanKey {
            device: dev.id(),
            dtype: T::DTYPE,
            x: dims4(x_l)?,
            w: dims4(w_l)?,
            padding: self.padding,
            stride: self.stride,
            dilation: self.dilation,
            tf32,
        };
        let math = match T::DTYPE {
            DType::F32 if tf32 => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            DType::F32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        let (Some((x_start, _)), Some((w_start, _))) = (x_l.contiguous_offsets(), w_l.contiguous_offsets()) else {
            bail!("cuDNN convolution: the input and the weight must be contiguous")
        };
        let x = x.as_cuda_slice::<T>()?.slice(x_start..);
        let w = w.as_cuda_slice::<T>()?.slice(w_start..);
        let out_len = self.out_dims(key.x, key.w).iter().product();
        // SAFETY: the convolution writes every output element (beta = 0).
        let mut out = unsafe { dev.alloc::<T>(out_len)? };
        STATE.with(|state| -> Result<()> {
            let state = &mut *state.borrow_mut();
            let cudnn = match state.handles.get(&key.device) {
                Some(c) => c.clone(),
                None => {
                    let c = Cudnn::new(dev.cuda_stream()).map_err(cudnn_error)?;
                    state.handles.insert(key.device, c.clone());
                    c
                }
            };
            if !state.plans.contains_key(&key) {
                let plan = self.plan::<T, C>(&cudnn, &key, math)?;
                state.plans.insert(key.clone(), Box::new(plan));
            }
            let Some(plan) = state.plans[&key].downcast_ref::<Plan<T, C>>() else {
                bail!("cuDNN convolution: a plan of another type under {:?}", key.dtype)
            };
            let workspace = state.workspaces.entry(key.device);
            let workspace = match workspace {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    if e.get().len() < plan.workspace {
                        // SAFETY: a workspace is scratch; cuDNN never reads what it did not write.
                        e.insert(unsafe { dev.alloc::<u8>(plan.workspace)? });
                    }
                    e.into_mut()
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(unsafe { dev.alloc::<u8>(plan.workspace.max(1))? })
                }
            };
            let forward = ConvForward { conv: &plan.conv, x: &plan.x, w: &plan.w, y: &plan.y };
            let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
            // SAFETY: the slices hold the types and shapes the plan's descriptors describe.
            unsafe { forward.launch(plan.algo, Some(workspace), (one, zero), &x, &w, &mut out) }.map_err(cudnn_error)
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl candle_core::CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "cudnn-conv2d"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("cudnn-conv2d runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_l: &Layout, w: &CudaStorage, w_l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let out = match x.dtype() {
            DType::F32 => self.run::<f32, f32>(&dev, x, x_l, w, w_l)?,
            DType::F16 => self.run::<f16, f32>(&dev, x, x_l, w, w_l)?,
            DType::BF16 => self.run::<bf16, f32>(&dev, x, x_l, w, w_l)?,
            other => bail!("cudnn-conv2d takes f32, f16 or bf16, not {other:?}"),
        };
        Ok((out, Shape::from(self.out_dims(dims4(x_l)?, dims4(w_l)?).to_vec())))
    }
}

/// `conv`'s product with `x` (without its bias, which the caller adds in the layer's tail) through a cached
/// cuDNN plan, for CUDA tensors of f32, f16 or bf16 and ungrouped convolutions; `None` where it does not
/// apply (Candle's own path then runs).
pub fn product(x: &Tensor, conv: &candle_nn::Conv2d) -> Result<Option<Tensor>> {
    let cfg = conv.config();
    let weight = conv.weight();
    if !x.device().is_cuda()
        || !enabled()
        || cfg.groups != 1
        || cfg.cudnn_fwd_algo.is_some()
        || x.rank() != 4
        || x.dtype() != weight.dtype()
        || !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        || x.elem_count() == 0
    {
        return Ok(None);
    }
    let (_, c_in, h, w) = x.dims4()?;
    let (_, w_in, kh, kw) = weight.dims4()?;
    let reach = |k: usize| cfg.dilation * (k - 1) + 1;
    if c_in != w_in || h + 2 * cfg.padding < reach(kh) || w + 2 * cfg.padding < reach(kw) {
        return Ok(None);
    }
    let op = ConvOp { padding: cfg.padding, stride: cfg.stride, dilation: cfg.dilation };
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &op).map(Some)
}
