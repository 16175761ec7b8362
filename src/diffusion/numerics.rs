//! What, beyond a job's parameters and its model's weights, decides the exact numbers this process computes:
//! the code's numerics revision, the kernels compiled in, the CPU instructions they dispatch to, and the
//! switches that choose between kernels which round differently. The result cache keys on it, so a worker
//! never answers with pixels another build or configuration made.

/// Raise it with every change that alters any job's pixels (a kernel's summation order, a scheduler's
/// arithmetic, a default a job may leave out, a fix to how inputs are brought to size): entries made before
/// it then no longer answer jobs. Workers of several versions share one store during a rolling update.
pub const REVISION: u32 = 2;

/// The switches read from the environment that choose between kernels; each one's value as set (unset is
/// empty). Two spellings of one setting give two signatures: a cache miss, never a wrong answer.
const SWITCHES: [&str; 6] = [
    "SD_RBEE_TF32",
    "SD_RBEE_WINOGRAD",
    "SD_RBEE_FLASH_ATTN",
    "SD_RBEE_FUSED_KERNELS",
    "SD_RBEE_CUDNN_PLANS",
    super::blas::BLAS_VAR,
];

/// This process's numerics, as text: same text, same numbers for the same job on the same device class.
pub fn signature() -> String {
    signature_with(|name| std::env::var(name).ok())
}

fn signature_with(var: impl Fn(&str) -> Option<String>) -> String {
    let features: Vec<&str> = [("cuda", cfg!(feature = "cuda")), ("cudnn", cfg!(feature = "cudnn"))]
        .into_iter()
        .chain([("flash-attn", cfg!(feature = "flash-attn")), ("mkl", cfg!(feature = "mkl"))])
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
    let switches: Vec<String> =
        SWITCHES.iter().map(|name| format!("{name}={}", var(name).unwrap_or_default().trim())).collect();
    format!(
        "sd-rbee {} r{REVISION}; features [{}]; cpu {}; {}",
        env!("CARGO_PKG_VERSION"),
        features.join(","),
        cpu_instructions(),
        switches.join(" ")
    )
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
    #[test]
    fn a_kernel_switch_changes_the_signature() {
        let unset = super::signature_with(|_| None);
        assert!(unset.contains(&format!("r{}", super::REVISION)), "{unset}");
        for switch in super::SWITCHES {
            let set = super::signature_with(|name| (name == switch).then(|| "0".to_string()));
            assert_ne!(unset, set, "{switch}");
        }
    }
}
