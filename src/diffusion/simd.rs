//! Running a hand-written CPU kernel on the widest vector unit the machine has.
//!
//! The kernels are plain loops the compiler vectorises; built for the baseline x86-64 target they would get
//! SSE2 only (and no vector `floor`, which the exponentials need). [`widest_simd!`] compiles a kernel again
//! for AVX-512F and for AVX2+FMA and picks one at run time, so one binary runs on any x86-64 CPU.

/// `widest_simd!(pub fn name(a: A, b: B) -> R => generic);` defines `name`, which calls `generic` (an
/// `#[inline(always)]` function with the same arguments) compiled for AVX-512F or AVX2+FMA when this CPU has
/// them, else as built. Floating-point results are the same on every path: the target features change the
/// vector width, not the order of the operations the source spells out (no fast-math).
macro_rules! widest_simd {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $generic:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

pub(crate) use widest_simd;
