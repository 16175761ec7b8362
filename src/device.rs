//! Choosing where and in what precision models run: `--device cpu|cuda[:N]|metal[:N]` and
//! `--dtype f32|f16|bf16`, with errors that say which cargo feature a build lacks.

use std::str::FromStr;

use anyhow::{bail, Context};
use candle_core::{DType, Device};

/// A device named on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let (kind, ordinal) = match s.split_once(':') {
            Some((k, n)) => {
                let n = n.parse::<usize>().map_err(|_| format!("invalid device ordinal in '{s}'"))?;
                (k.to_string(), n)
            }
            None => (s.clone(), 0),
        };
        match kind.as_str() {
            "cpu" if ordinal == 0 => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(ordinal)),
            "metal" | "mps" => Ok(DeviceSpec::Metal(ordinal)),
            _ => Err(format!("unknown device '{s}' (expected cpu, cuda, cuda:N, metal or metal:N)")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The kind of device, whatever its ordinal: `cpu`, `cuda` or `metal` (what its numbers depend on).
    pub fn class(self) -> &'static str {
        match self {
            DeviceSpec::Cpu => "cpu",
            DeviceSpec::Cuda(_) => "cuda",
            DeviceSpec::Metal(_) => "metal",
        }
    }

    /// Opens the device, explaining a missing cargo feature.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    bail!(
                        "--device {self}: this sd-rbee was built without CUDA support (rebuild with `--features cuda`)"
                    );
                }
                set_tf32(tf32_from_env()?);
                let device = Device::new_cuda(n).with_context(|| format!("cannot open CUDA device {n}"))?;
                #[cfg(feature = "cuda")]
                cuda_pool::keep_freed_memory(&device);
                Ok(device)
            }
            DeviceSpec::Metal(n) => {
                if !cfg!(feature = "metal") {
                    bail!("--device {self}: this sd-rbee was built without Metal support (rebuild with `--features metal`)");
                }
                Device::new_metal(n).with_context(|| format!("cannot open Metal device {n}"))
            }
        }
    }
}

/// `SD_RBEE_TF32=1` lets f32 matrix multiplies and convolutions on CUDA use TF32 tensor cores (10-bit mantissa
/// inputs, f32 accumulation): several times faster, about 1e-3 relative error per product. Off by default, as
/// PyTorch's `torch.backends.cuda.matmul.allow_tf32` is; PyTorch's cuDNN convolutions do use TF32 by default,
/// ours do not, so that f32 on CUDA matches diffusers' f32 numbers (2.9e-3 max abs on tiny-sd15 with TF32
/// convolutions, against 5e-6 without).
fn tf32_from_env() -> anyhow::Result<bool> {
    match std::env::var("SD_RBEE_TF32").ok().as_deref().map(str::trim) {
        None | Some("") | Some("0") | Some("false") | Some("off") => Ok(false),
        Some("1") | Some("true") | Some("on") => Ok(true),
        Some(other) => bail!("SD_RBEE_TF32={other}: expected 1 or 0"),
    }
}

#[cfg(feature = "cuda")]
fn set_tf32(on: bool) {
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(on);
}

#[cfg(not(feature = "cuda"))]
fn set_tf32(_: bool) {}

/// The CUDA device's default memory pool, which Candle's allocations come from (cudarc allocates with
/// `cuMemAllocAsync`).
#[cfg(feature = "cuda")]
pub mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    fn pool(device: &Device) -> Option<sys::CUmemoryPool> {
        let Device::Cuda(cuda) = device else { return None };
        let stream = cuda.cuda_stream();
        let context = stream.context();
        context.bind_to_thread().ok()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: plain driver query with a valid out-pointer and the context's own device.
        let status = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()) };
        (status == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    /// Keeps freed device memory in the pool instead of handing it back to the driver at every
    /// synchronisation (the pool's default release threshold is 0), so a denoising step reuses the last
    /// step's buffers instead of mapping fresh pages: what PyTorch's caching allocator does.
    pub fn keep_freed_memory(device: &Device) {
        if let Some(pool) = pool(device) {
            let mut threshold = u64::MAX;
            // SAFETY: the attribute takes a u64 by pointer.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                );
            }
        }
    }

    /// The most device memory the pool has held since the process started, in bytes.
    pub fn peak_bytes(device: &Device) -> Option<u64> {
        let pool = pool(device)?;
        let mut high = 0u64;
        // SAFETY: the attribute is a u64 written through the pointer.
        let status = unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                (&mut high as *mut u64).cast(),
            )
        };
        (status == sys::CUresult::CUDA_SUCCESS).then_some(high)
    }
}

/// Runs a benchmark's timed calls `f` inside a window for a profiler attached to the process (`nsys profile
/// -c cudaProfilerApi`, or `scripts/gpu/kernel_census.c`), the device synchronised first so that no earlier
/// work falls inside. Off CUDA, or without a profiler, it only runs `f`.
pub fn in_profiler_window<R>(device: &Device, f: impl FnOnce() -> R) -> candle_core::Result<R> {
    device.synchronize()?;
    #[cfg(feature = "cuda")]
    let _window = match device {
        Device::Cuda(cuda) => {
            cuda.cuda_stream().context().bind_to_thread().ok();
            candle_core::cuda_backend::cudarc::driver::Profiler::new().ok() // stops on drop, after `f`
        }
        _ => None,
    };
    Ok(f())
}

/// Pins Candle's CPU thread count for the life of the process.
///
/// Candle asks for its thread count on every matrix multiply, and when `RAYON_NUM_THREADS` is unset it
/// recomputes it by reading `/proc/cpuinfo` each time, which costs more than a small matmul. Setting the
/// variable once, to the value Candle would compute, keeps the same parallelism without the re-reads.
/// Call it at start-up, before other threads exist.
pub fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY (edition 2021 API): called from `main` before any other thread is started.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Keeps freed memory in the process for reuse instead of returning it to the kernel (glibc only).
///
/// A denoising step allocates and frees the same large activation buffers over and over; by default glibc
/// serves big ones with fresh `mmap`s, so every step pays page faults and page zeroing for them (5–7 % of a
/// step here). With `mmap` off and trimming raised, freed buffers are simply reused. Peak memory is unchanged:
/// it is still set by the largest step. Skipped when the user sets `GLIBC_TUNABLES`.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only changes allocator parameters; called at start-up.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f64" | "float64" => Ok(DType::F64),
        other => Err(format!("unknown dtype '{other}' (expected f32, f16 or bf16)")),
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("CUDA:2".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(2)));
        assert_eq!("metal".parse::<DeviceSpec>(), Ok(DeviceSpec::Metal(0)));
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("unknown device"));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn parses_dtypes() {
        assert_eq!(parse_dtype("f16"), Ok(DType::F16));
        assert_eq!(parse_dtype("bf16"), Ok(DType::BF16));
        assert!(parse_dtype("int8").unwrap_err().contains("int8"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_it() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
