//! The pipeline's contract beyond numerics: progress reports, cancellation between steps, batches with
//! per-image seeds, request validation naming the field, and f16 on the CPU.

use crate::common;

use std::sync::OnceLock;

use candle_core::{DType, Device};
use common::fixture;
use sd_rbee::diffusion::{CancelFlag, GenerateError, GenerationRequest, LoadOptions, SchedulerKind, StableDiffusion};

fn sd15() -> &'static StableDiffusion {
    static MODEL: OnceLock<StableDiffusion> = OnceLock::new();
    MODEL.get_or_init(|| StableDiffusion::load(&fixture("tiny-sd15"), &LoadOptions::default()).unwrap())
}

/// A change to a valid request that makes it invalid.
type Breakage = Box<dyn Fn(&mut GenerationRequest)>;

fn small_request(steps: usize) -> GenerationRequest {
    let mut req = GenerationRequest::new("a lighthouse at dusk");
    req.width = 64;
    req.height = 48;
    req.steps = steps;
    req.seed = Some(3);
    req.scheduler = Some(SchedulerKind::EulerAncestral);
    req
}

#[test]
fn progress_is_reported_once_per_step_with_a_preview() {
    let mut seen = Vec::new();
    let mut preview_size = None;
    let out = sd15()
        .generate(
            &small_request(5),
            &mut |info| {
                seen.push((info.step, info.total));
                assert!(info.elapsed >= info.step_time);
                if info.step == 3 {
                    preview_size = Some(info.preview(0).unwrap().dimensions());
                }
            },
            None,
        )
        .unwrap();
    assert_eq!(seen, (1..=5).map(|s| (s, 5)).collect::<Vec<_>>());
    assert_eq!(preview_size, Some((8, 6)), "preview at latent resolution");
    assert_eq!(out.timings.step_ms.len(), 5);
    assert_eq!(out.images[0].pixels.dims(), &[3, 48, 64]);
}

#[test]
fn cancelling_stops_within_one_step_with_a_distinct_error() {
    let cancel = CancelFlag::new();
    let mut steps_run = 0;
    let result = sd15().generate(
        &small_request(10),
        &mut |info| {
            steps_run = info.step;
            if info.step == 2 {
                cancel.cancel();
            }
        },
        Some(&cancel),
    );
    match result {
        Err(GenerateError::Cancelled { completed, total }) => {
            assert_eq!((completed, total), (2, 10));
            assert_eq!(steps_run, 2, "no step runs after the cancel");
        }
        other => panic!("expected Cancelled, got {other:?}"),
    }
}

#[test]
fn ancestral_batches_reproduce_single_runs_with_each_seed() {
    // euler_a draws fresh noise every step: each image must draw from its own generator.
    let mut batch = small_request(4);
    batch.num_images = 2;
    batch.seed = Some(10);
    let out = sd15().generate(&batch, &mut |_| {}, None).unwrap();
    assert_eq!(out.images.iter().map(|i| i.seed).collect::<Vec<_>>(), vec![10, 11]);
    let mut single = small_request(4);
    single.seed = Some(11);
    let one = sd15().generate(&single, &mut |_| {}, None).unwrap();
    let (max, _) = common::diff(&out.images[1].pixels, &one.images[0].pixels);
    assert!(max < 1e-5, "batch image 1 differs from the single run by {max}");
    let (max, _) = common::diff(&out.images[0].pixels, &out.images[1].pixels);
    assert!(max > 1e-2, "images with different seeds should differ");
}

#[test]
fn invalid_requests_name_the_field() {
    let cases: Vec<(&str, Breakage)> = vec![
        ("width", Box::new(|r| r.width = 100)),
        ("height", Box::new(|r| r.height = 0)),
        ("steps", Box::new(|r| r.steps = 0)),
        ("steps", Box::new(|r| r.steps = 5000)),
        ("guidance", Box::new(|r| r.guidance_scale = f64::NAN)),
        ("num_images", Box::new(|r| r.num_images = 0)),
        (
            "strength",
            Box::new(|r| {
                let pixels = candle_core::Tensor::zeros((1, 3, 48, 64), DType::F32, &Device::Cpu).unwrap();
                r.init = Some(sd_rbee::diffusion::InitImage { pixels, strength: 0.0, mask: None, noise: None });
            }),
        ),
        (
            "strength",
            Box::new(|r| {
                let pixels = candle_core::Tensor::zeros((1, 3, 48, 64), DType::F32, &Device::Cpu).unwrap();
                r.steps = 2;
                r.init = Some(sd_rbee::diffusion::InitImage { pixels, strength: 0.4, mask: None, noise: None });
            }),
        ),
        (
            "init_image",
            Box::new(|r| {
                let pixels = candle_core::Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
                r.init = Some(sd_rbee::diffusion::InitImage { pixels, strength: 0.5, mask: None, noise: None });
            }),
        ),
        (
            "initial_latents",
            Box::new(|r| {
                r.initial_latents = Some(candle_core::Tensor::zeros((1, 4, 3, 3), DType::F32, &Device::Cpu).unwrap())
            }),
        ),
    ];
    for (field, mutate) in cases {
        let mut req = small_request(2);
        mutate(&mut req);
        match sd15().generate(&req, &mut |_| {}, None) {
            Err(e @ GenerateError::InvalidRequest { .. }) => {
                assert!(e.to_string().contains(&format!("`{field}`")), "{e}");
            }
            other => panic!("{field}: expected InvalidRequest, got {other:?}"),
        }
    }
}

#[test]
fn half_precision_runs_on_the_cpu_close_to_f32() {
    let opts = LoadOptions { device: Device::Cpu, dtype: DType::F16, ..Default::default() };
    let half = StableDiffusion::load(&fixture("tiny-sd15"), &opts).unwrap();
    let mut req = small_request(4);
    req.scheduler = Some(SchedulerKind::Ddim);
    let a = half.generate(&req, &mut |_| {}, None).unwrap();
    let b = sd15().generate(&req, &mut |_| {}, None).unwrap();
    let (max, mean) = common::diff(&a.images[0].pixels, &b.images[0].pixels);
    assert!(max < 0.05 && mean < 0.005, "f16 vs f32: max {max}, mean {mean}");
}

#[test]
fn bf16_on_the_cpu_is_refused_clearly() {
    let opts = LoadOptions { device: Device::Cpu, dtype: DType::BF16, ..Default::default() };
    let err = StableDiffusion::load(&fixture("tiny-sd15"), &opts).unwrap_err().to_string();
    assert!(err.contains("bf16") && err.contains("CPU"), "{err}");
}

#[test]
fn a_run_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run() {
    use sd_rbee::diffusion::ResumeState;
    use std::sync::Arc;
    // Every scheduler: the multistep ones carry a history, the ancestral one draws noise every step; img2img
    // (a run that starts later) too.
    let img2img = |req: &mut GenerationRequest| {
        let pixels = candle_core::Tensor::rand(-1f32, 1.0, (1, 3, 48, 64), &Device::Cpu).unwrap();
        req.init = Some(sd_rbee::diffusion::InitImage { pixels, strength: 0.7, mask: None, noise: None });
    };
    for (kind, init) in SchedulerKind::ALL.iter().map(|&k| (k, false)).chain([(SchedulerKind::UniPc, true)]) {
        let mut req = small_request(9);
        req.scheduler = Some(kind);
        req.num_images = 2;
        if init {
            img2img(&mut req);
        }
        let mut saved = None;
        let whole = sd15()
            .generate(
                &req,
                &mut |info| {
                    if info.step == 4 {
                        saved = Some(info.checkpoint().unwrap().to_bytes().unwrap());
                    }
                },
                None,
            )
            .unwrap();
        let checkpoint = ResumeState::from_bytes(&saved.unwrap(), &Device::Cpu).unwrap();
        let mut resumed_req = req.clone();
        resumed_req.resume = Some(Arc::new(checkpoint));
        let mut steps = Vec::new();
        let resumed =
            sd15().generate(&resumed_req, &mut |info| steps.push((info.step, info.resumed_from)), None).unwrap();
        let total = if init { 6 } else { 9 };
        assert_eq!(steps, (5..=total).map(|s| (s, 4)).collect::<Vec<_>>(), "{kind}: steps 5.. only");
        for (a, b) in whole.images.iter().zip(&resumed.images) {
            let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (a, b) = (flat(&a.pixels), flat(&b.pixels));
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(a == b, "{kind} (img2img: {init}): the images differ by up to {worst:e}, not bit-identical");
        }
    }
    // A checkpoint of another run is refused, naming it.
    let mut saved = None;
    let req = small_request(6);
    sd15().generate(&req, &mut |info| saved = saved.take().or(Some(info.checkpoint().unwrap())), None).unwrap();
    let mut other = small_request(6);
    other.seed = Some(99);
    other.resume = saved.map(std::sync::Arc::new);
    match sd15().generate(&other, &mut |_| {}, None) {
        Err(GenerateError::InvalidRequest { field: "resume", message }) => {
            assert!(message.contains("seeds"), "{message}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // A counter out of its range (a damaged checkpoint, or one of another version) is refused, naming it,
    // before the run could index past the scheduler's history with it.
    let mut req = small_request(6);
    req.scheduler = Some(SchedulerKind::UniPc);
    let mut saved = None;
    sd15().generate(&req, &mut |info| saved = saved.take().or(Some(info.checkpoint().unwrap())), None).unwrap();
    let mut damaged = saved.unwrap();
    for (name, value) in &mut damaged.scheduler_state.counters {
        if name == "this_order" {
            *value = 7;
        }
    }
    req.resume = Some(std::sync::Arc::new(damaged));
    match sd15().generate(&req, &mut |_| {}, None) {
        Err(GenerateError::InvalidRequest { field: "resume", message }) => {
            assert!(message.contains("this_order is 7, not within 1..=1"), "{message}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // A noise count no run reaches (replaying it would spin for ever), and latents that are not finite, are
    // refused before anything runs.
    let req = small_request(6);
    let mut saved = None;
    sd15().generate(&req, &mut |info| saved = saved.take().or(Some(info.checkpoint().unwrap())), None).unwrap();
    let saved = saved.unwrap();
    let mut spinning = saved.clone();
    spinning.noise_draws = vec![u64::MAX];
    let mut blown_up = saved;
    blown_up.latents = (blown_up.latents * f64::NAN).unwrap();
    for (damaged, needle) in [(spinning, "draws in, past the"), (blown_up, "not finite")] {
        let mut req = req.clone();
        req.resume = Some(std::sync::Arc::new(damaged));
        let started = std::time::Instant::now();
        match sd15().generate(&req, &mut |_| {}, None) {
            Err(GenerateError::InvalidRequest { field: "resume", message }) => {
                assert!(message.contains(needle), "{message}")
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
    }
}
