//! Shared test harness: fixture paths, reference tensors and the comparison every parity test uses, the
//! tiny job the bus tests submit.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_rbee::protocol::{JobKind, JobRequest};

/// A txt2img job for the tiny model (the worker tests' `tiny`) at 64 × 64.
pub fn tiny_job(steps: u32, seed: u64) -> JobRequest {
    let mut job = JobRequest::new(JobKind::Txt2Img, "tiny", "a watercolor fox in the snow");
    (job.width, job.height, job.steps, job.seed) = (Some(64), Some(64), Some(steps), Some(seed));
    job
}

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name)
}

/// Copies a folder (a fixture model, to change), its files writable.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            let mut perm = std::fs::metadata(&target).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(&target, perm).unwrap();
        }
    }
}

/// Loads Debian's OpenBLAS (`libopenblas0`, which scripts/test.sh installs) as this process's CPU BLAS, as
/// `SD_RBEE_BLAS=libopenblas.so.0` does for the binary.
pub fn load_openblas() {
    let blas = sd_rbee::diffusion::blas::use_library("libopenblas.so.0")
        .unwrap_or_else(|e| panic!("{e}: install Debian's libopenblas0 (scripts/test.sh does), then rerun"));
    assert_eq!(sd_rbee::diffusion::blas::vendor().map(|b| b.path.as_str()), Some(blas.path.as_str()));
}

/// The prompt and negative prompt of every fixture reference.
pub const PROMPT: &str = "a photograph of an astronaut riding a horse";
pub const NEGATIVE: &str = "blurry, low quality";

/// `sd-rbee generate` arguments for a fixture reference run: [`PROMPT`] and [`NEGATIVE`], 96×64, 10 steps
/// with `scheduler` and `guidance`, from the `initial_latents` in `latents`, writing `out`; callers add the rest.
pub fn reference_run(
    model: &std::path::Path,
    latents: &std::path::Path,
    scheduler: &str,
    guidance: &str,
    out: &std::path::Path,
) -> Vec<String> {
    let (model, latents, out) = (model.to_str().unwrap(), latents.to_str().unwrap(), out.to_str().unwrap());
    [
        "generate",
        "--model",
        model,
        "--prompt",
        PROMPT,
        "--negative-prompt",
        NEGATIVE,
        "--width",
        "96",
        "--height",
        "64",
        "--steps",
        "10",
        "--guidance",
        guidance,
        "--scheduler",
        scheduler,
        "--initial-latents",
        latents,
        "--out",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The reference tensors diffusers computed for a fixture model, as f32.
pub fn expected(model: &str) -> HashMap<String, Tensor> {
    let path = fixture(model).join("expected.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub fn reference(map: &HashMap<String, Tensor>, name: &str) -> Tensor {
    map.get(name).unwrap_or_else(|| panic!("reference tensor {name} missing")).to_dtype(DType::F32).unwrap()
}

/// (max abs, mean abs) difference of two tensors of the same shape.
pub fn diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
    let max = d.max_all().unwrap().to_scalar::<f32>().unwrap();
    let mean = d.mean_all().unwrap().to_scalar::<f32>().unwrap();
    (max, mean)
}

/// Asserts `a` is within `max_tol` (max abs) and `mean_tol` (mean abs) of `b`.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, max_tol: f32, mean_tol: f32) {
    let (max, mean) = diff(a, b);
    eprintln!("{what}: max abs {max:.3e}, mean abs {mean:.3e}");
    assert!(max.is_finite() && max <= max_tol, "{what}: max abs diff {max:e} > {max_tol:e}");
    assert!(mean <= mean_tol, "{what}: mean abs diff {mean:e} > {mean_tol:e}");
}

/// Reads an 8-bit RGB PNG.
pub fn read_png(path: &std::path::Path) -> image::RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display())).to_rgb8()
}

/// Largest per-channel difference between two 8-bit images, and how many channel values differ.
pub fn png_diff(a: &image::RgbImage, b: &image::RgbImage) -> (u8, usize) {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let mut max = 0u8;
    let mut count = 0;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        if d > 0 {
            count += 1;
        }
        max = max.max(d);
    }
    (max, count)
}

pub mod hostile;
pub mod queen;
pub mod servers;
pub mod up;
