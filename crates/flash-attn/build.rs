//! Compiles the FlashAttention-2 forward kernels that Stable Diffusion's attention needs (non-causal, f16, head
//! dimensions up to 64, 96 and 160: SD 1.x's 40, 80 and 160, SD 2.x's and SDXL's 64) plus `sd_flash_api.cu`, and
//! links them statically.
//!
//! candle-flash-attn builds 53 kernels (every head dimension, causal, split-KV, paged) and fetches CUTLASS
//! from GitHub at build time: hours on two cores, and impossible offline. Three kernels take about ten
//! minutes. Needs `nvcc` (`$NVCC`, `$CUDA_HOME/bin/nvcc` or on `PATH`) and CUTLASS 3.5's headers
//! (`$CUTLASS_DIR`, holding `include/cute` and `include/cutlass`); `CUDA_COMPUTE_CAP` picks the GPU
//! architecture (default 90, Hopper). `SD_RBEE_FLASH_ATTN_BUILD_DIR` keeps the objects between builds.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (dtype tag, head-dimension bucket) of every compiled kernel; `src/lib.rs` reads the same list.
/// f16 only for now: each kernel costs about five minutes of nvcc on one core, and bf16 would double that.
const KERNELS: [(&str, usize); 3] = [("fp16", 64), ("fp16", 96), ("fp16", 160)];

/// Headers every kernel includes: a change to one rebuilds all objects.
const HEADERS: [&str; 16] = [
    "alibi.h",
    "block_info.h",
    "dropout.h",
    "error.h",
    "flash.h",
    "flash_fwd_kernel.h",
    "flash_fwd_launch_template.h",
    "hardware_info.h",
    "kernel_traits.h",
    "kernel_traits_sm90.h",
    "mask.h",
    "philox.cuh",
    "rotary.h",
    "softmax.h",
    "static_switch.h",
    "utils.h",
];

fn nvcc() -> PathBuf {
    if let Ok(nvcc) = std::env::var("NVCC") {
        return nvcc.into();
    }
    if let Ok(home) = std::env::var("CUDA_HOME").or_else(|_| std::env::var("CUDA_PATH")) {
        let candidate = Path::new(&home).join("bin/nvcc");
        if candidate.exists() {
            return candidate;
        }
    }
    "nvcc".into()
}

fn main() {
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUTLASS_DIR", "CUDA_COMPUTE_CAP", "SD_RBEE_FLASH_ATTN_BUILD_DIR"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=build.rs");
    for header in HEADERS {
        println!("cargo::rerun-if-changed=kernels/{header}");
    }
    println!("cargo::rerun-if-changed=kernels/sd_flash_api.cu");
    let cutlass = std::env::var("CUTLASS_DIR").unwrap_or_else(|_| {
        panic!(
            "sd-rbee-flash-attn: set CUTLASS_DIR to a CUTLASS 3.5 checkout (the folder holding include/cute); \
             scripts/gpu/build.sh shows how"
        )
    });
    let cutlass = PathBuf::from(cutlass);
    assert!(cutlass.join("include/cute").is_dir(), "CUTLASS_DIR={} has no include/cute", cutlass.display());
    let cap: u32 = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|v| v.trim().parse().expect("CUDA_COMPUTE_CAP must be a number such as 90"))
        .unwrap_or(90);
    assert!(cap >= 80, "FlashAttention-2 needs compute capability 8.0 or newer (CUDA_COMPUTE_CAP={cap})");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let build_dir = std::env::var("SD_RBEE_FLASH_ATTN_BUILD_DIR").map(PathBuf::from).unwrap_or(out_dir.clone());
    std::fs::create_dir_all(&build_dir).unwrap();

    let mut sources: Vec<String> = KERNELS.iter().map(|(t, d)| format!("flash_fwd_hdim{d}_{t}_sm80.cu")).collect();
    sources.push("sd_flash_api.cu".into());
    let defines: Vec<String> = KERNELS.iter().map(|(t, d)| format!("-DSDR_FA_{t}_{d}=1")).collect();
    let flags = |source: &str, object: &Path| {
        let mut cmd = Command::new(nvcc());
        cmd.arg(format!("-gencode=arch=compute_{cap},code=sm_{cap}"))
            .args(["-c", "-o"])
            .arg(object)
            .arg(format!("kernels/{source}"))
            .args(["--default-stream", "per-thread", "-std=c++17", "-O3"])
            .args(["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__"])
            .args(["-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"])
            .args(["--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math"])
            .args(["-Xcompiler", "-fPIC", "-Ikernels"])
            .arg(format!("-I{}", cutlass.join("include").display()))
            .arg(format!("-I{}", cutlass.join("tools/util/include").display()))
            .args(&defines);
        cmd
    };
    // An object is rebuilt when missing or older than its source or any header (a stamp records the flags).
    let stamp = format!("{cap} {} {}", cutlass.display(), defines.join(" "));
    let stamp_path = build_dir.join("flags.txt");
    let same_flags = std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp);
    let newest_header = HEADERS
        .iter()
        .filter_map(|h| std::fs::metadata(format!("kernels/{h}")).and_then(|m| m.modified()).ok())
        .max()
        .unwrap();
    let jobs: Vec<(String, PathBuf)> = sources
        .iter()
        .map(|s| (s.clone(), build_dir.join(s.replace(".cu", ".o"))))
        .filter(|(source, object)| {
            let built = std::fs::metadata(object).and_then(|m| m.modified()).ok();
            let source_time = std::fs::metadata(format!("kernels/{source}")).and_then(|m| m.modified()).unwrap();
            println!("cargo::rerun-if-changed=kernels/{source}");
            !same_flags || built.is_none_or(|b| b < source_time || b < newest_header)
        })
        .collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    for chunk in jobs.chunks(threads) {
        let running: Vec<_> = chunk
            .iter()
            .map(|(source, object)| {
                let child = flags(source, object)
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot run nvcc ({}): {e}", nvcc().display()));
                (source, child)
            })
            .collect();
        for (source, mut child) in running {
            let status = child.wait().unwrap();
            assert!(status.success(), "nvcc failed on kernels/{source} ({status})");
        }
    }
    std::fs::write(&stamp_path, stamp).unwrap();
    let library = build_dir.join("libsdrflashattn.a");
    let _ = std::fs::remove_file(&library);
    let status = Command::new("ar")
        .arg("rcs")
        .arg(&library)
        .args(sources.iter().map(|s| build_dir.join(s.replace(".cu", ".o"))))
        .status()
        .expect("cannot run ar");
    assert!(status.success(), "ar failed ({status})");
    let list: Vec<String> = KERNELS.iter().map(|(t, d)| format!("(\"{t}\", {d})")).collect();
    std::fs::write(
        out_dir.join("kernels.rs"),
        format!("pub(crate) const KERNELS: &[(&str, usize)] = &[{}];\n", list.join(", ")),
    )
    .unwrap();
    println!("cargo::rustc-link-search=native={}", build_dir.display());
    println!("cargo::rustc-link-lib=static=sdrflashattn");
    println!("cargo::rustc-link-lib=dylib=cudart");
    println!("cargo::rustc-link-lib=dylib=stdc++");
}
