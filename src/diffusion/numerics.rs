//! What, beyond a job's parameters and its model's weights, decides the exact numbers this process computes
//! on a device class: the code's numerics revision, and for the CPU the instructions its kernels dispatch to
//! and the kernels chosen (Winograd, a vendor BLAS), for CUDA the kernels compiled in and switched on (TF32,
//! flash attention, fused kernels, cuDNN plans). The result cache and the checkpoints key on it, so a worker
//! never answers with, nor finishes, pixels another configuration began.

/// Raise it with every change that alters any job's pixels (a kernel's summation order, a scheduler's
/// arithmetic, a default a job may leave out, a fix to how inputs are brought to size): entries made before
/// it then no longer answer jobs. Versions that compute the same numbers share the cache during a rolling
/// update.
pub const REVISION: u32 = 2;

/// This process's numerics on `device_class` (`cpu`, `cuda`, `metal`), as text: same text, same numbers.
pub fn signature(device_class: &str) -> String {
    signature_with(device_class, |name| std::env::var(name).ok())
}

/// Whether a switch that is on unless set to `0` (or `off`) is on.
fn on_unless_zero(value: Option<String>) -> bool {
    !matches!(value.as_deref().map(str::trim), Some("0" | "off" | "false"))
}

fn signature_with(device_class: &str, var: impl Fn(&str) -> Option<String>) -> String {
    let state = match device_class {
        "cpu" => {
            // The library's file name, not where it is: the same OpenBLAS at two paths computes alike.
            let blas = var(super::blas::BLAS_VAR).filter(|v| !v.trim().is_empty()).map(|path| {
                let name = std::path::Path::new(path.trim()).file_name().map(|n| n.to_string_lossy().into_owned());
                name.unwrap_or(path)
            });
            format!(
                "{}; winograd {}; blas {}; mkl {}",
                cpu_instructions(),
                on_unless_zero(var("SD_RBEE_WINOGRAD")),
                blas.as_deref().unwrap_or("none"),
                cfg!(feature = "mkl") || cfg!(feature = "accelerate"),
            )
        }
        "cuda" => format!(
            "tf32 {}; flash attention {}; fused kernels {}; cudnn plans {}",
            matches!(var("SD_RBEE_TF32").as_deref().map(str::trim), Some("1" | "true" | "on")),
            cfg!(feature = "flash-attn") && on_unless_zero(var("SD_RBEE_FLASH_ATTN")),
            on_unless_zero(var("SD_RBEE_FUSED_KERNELS")),
            cfg!(feature = "cudnn") && on_unless_zero(var("SD_RBEE_CUDNN_PLANS")),
        ),
        _ => String::new(),
    };
    format!("r{REVISION} {device_class}: {state}")
}

/// The widest instructions the CPU kernels dispatch to here (see `simd::widest_simd`).
fn cpu_instructions() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return "avx2+fma";
        }
    }
    std::env::consts::ARCH
}

#[cfg(test)]
mod tests {
    use super::signature_with;

    #[test]
    fn the_signature_follows_what_each_device_computes_with() {
        let with = |class, set: &'static [(&str, &str)]| {
            signature_with(class, |name| set.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string()))
        };
        let cpu = with("cpu", &[]);
        assert!(cpu.starts_with(&format!("r{} cpu", super::REVISION)), "{cpu}");
        assert_ne!(cpu, with("cpu", &[("SD_RBEE_WINOGRAD", "0")]));
        assert_ne!(cpu, with("cpu", &[("SD_RBEE_BLAS", "/usr/lib/libopenblas.so.0")]));
        // What picks no other kernel leaves it alone: another spelling, another path to the same library,
        // a CUDA switch on the CPU.
        assert_eq!(cpu, with("cpu", &[("SD_RBEE_WINOGRAD", "1"), ("SD_RBEE_TF32", "1")]));
        let blas = with("cpu", &[("SD_RBEE_BLAS", "/usr/lib/libopenblas.so.0")]);
        assert_eq!(blas, with("cpu", &[("SD_RBEE_BLAS", "/opt/lib/libopenblas.so.0")]));
        let cuda = with("cuda", &[]);
        assert_ne!(cuda, with("cuda", &[("SD_RBEE_TF32", "1")]));
        assert_ne!(cuda, with("cuda", &[("SD_RBEE_FUSED_KERNELS", "0")]));
        assert_eq!(cuda, with("cuda", &[("SD_RBEE_WINOGRAD", "0")]), "a CPU switch on CUDA");
    }
}
