//! Test harness that replays the diffusers reference loops recorded by `scripts/scheduler_reference.py`
//! (`tests/fixtures/schedulers/reference.{json,safetensors}`) and compares every timestep and sample.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor};

use super::{build, NoiseSource, SchedulerConfig, SchedulerKind, TimestepSpacing};

/// Largest absolute difference allowed on timesteps, and on samples of magnitude up to 5.
pub(crate) const TOLERANCE: f64 = 1e-5;
/// Larger samples are compared relative to the largest magnitude the run has seen so far (an error made at a
/// large magnitude carries over to the later, smaller samples): f32 itself
/// only resolves ~4e-6 at 40 and ~3e-5 at 300 (Euler starts at sigma ~15, ~157 with the default linear betas,
/// ~4096 with zero-SNR and ~20000 with the cosine schedule), and torch rounds every scalar coefficient to f32
/// where these schedulers use f64 (diffusers' own f32 and f64 runs of `unipc/bh1_noLOF` differ by 1.05e-5).
pub(crate) const REL_TOLERANCE: f64 = 2e-6;

/// Float timesteps (Euler with Karras sigmas) may differ by an f32 ulp or two (~3e-5 at t = 260): torch's
/// float32 sqrt and numpy's SIMD float32 log are not correctly rounded, so the log-sigma table they
/// interpolate in differs in the last bit from the one computed here. They are held to 1e-6 relative.
pub(crate) const TIMESTEP_REL_TOLERANCE: f64 = 1e-6;

/// The error bound for a sample when the run's largest magnitude so far is `scale`.
pub(crate) fn sample_tolerance(scale: f64) -> f64 {
    TOLERANCE.max(REL_TOLERANCE * scale)
}

#[derive(serde::Deserialize)]
struct Meta {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    kind: String,
    config: serde_json::Value,
    steps: usize,
    spacing: Option<String>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    add_noise_steps: Vec<usize>,
    /// img2img cases start at this step index from `add_noise(x0, x_init, begin)`.
    #[serde(default)]
    begin: usize,
}

/// Largest errors seen over the cases of one kind.
#[derive(Debug, Default)]
pub(crate) struct MaxErrors {
    pub cases: usize,
    pub timestep: f64,
    pub init_noise_sigma_rel: f64,
    pub sample: f64,
    /// Sample error divided by the sample's largest magnitude.
    pub sample_rel: f64,
    pub add_noise: f64,
}

/// Replays the recorded noise of an ancestral sampler.
pub(crate) struct ListNoise(pub VecDeque<Tensor>);

impl NoiseSource for ListNoise {
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let Some(t) = self.0.pop_front() else {
            candle_core::bail!("recorded noise exhausted");
        };
        if t.dims() != like.dims() {
            candle_core::bail!("recorded noise has shape {:?}, wanted {:?}", t.dims(), like.dims());
        }
        t.to_dtype(like.dtype())
    }
}

/// A noise source for deterministic schedulers: any draw is a test failure.
pub(crate) struct NoNoise;

impl NoiseSource for NoNoise {
    fn randn_like(&mut self, _like: &Tensor) -> Result<Tensor> {
        candle_core::bail!("unexpected noise draw")
    }
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// The fake model of the reference script: `0.3 * scaled + 0.1 * cos(t / 100)`.
pub(crate) fn fake_model(scaled: &Tensor, t: f64) -> Result<Tensor> {
    scaled.affine(0.3, 0.1 * (t / 100.0).cos())
}

/// Runs every recorded case of `kind` and asserts it matches diffusers within [`TOLERANCE`].
pub(crate) fn check_kind(kind: SchedulerKind) -> MaxErrors {
    let dir = fixture_dir();
    let meta: Meta =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reading reference.json"))
            .expect("parsing reference.json");
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
            .expect("loading reference.safetensors");
    let x_init = &tensors["x_init"];
    let x0 = &tensors["x0"];
    let add_noise_eps = &tensors["add_noise_eps"];

    let mut errs = MaxErrors::default();
    for case in meta.cases.iter().filter(|c| c.kind == kind.name()) {
        let config = SchedulerConfig::from_json_str(&case.config.to_string()).unwrap();
        let spacing: Option<TimestepSpacing> = case.spacing.as_deref().map(|s| s.parse().unwrap());
        let mut sched =
            build(kind, &config, case.steps, spacing).unwrap_or_else(|e| panic!("{}: build failed: {e:#}", case.name));
        let name = &case.name;

        let ts = sched.timesteps().to_vec();
        assert_eq!(ts.len(), case.timesteps.len(), "{name}: timestep count");
        for (a, b) in ts.iter().zip(&case.timesteps) {
            let e = (a - b).abs();
            errs.timestep = errs.timestep.max(e);
            assert!(
                e <= TOLERANCE.max(TIMESTEP_REL_TOLERANCE * b.abs()),
                "{name}: timesteps {ts:?} vs {:?}",
                case.timesteps
            );
        }
        let rel = (sched.init_noise_sigma() - case.init_noise_sigma).abs() / case.init_noise_sigma;
        errs.init_noise_sigma_rel = errs.init_noise_sigma_rel.max(rel);
        assert!(rel <= 1e-6, "{name}: init_noise_sigma {} vs {}", sched.init_noise_sigma(), case.init_noise_sigma);

        let expected = &tensors[&format!("{name}/samples")];
        let mut noise: Box<dyn NoiseSource> = match tensors.get(&format!("{name}/noise")) {
            Some(n) => Box::new(ListNoise((0..n.dim(0).unwrap()).map(|i| n.get(i).unwrap()).collect())),
            None => Box::new(NoNoise),
        };
        let (mut case_abs, mut case_rel) = (0f64, 0f64);
        let mut latents = if case.begin > 0 {
            sched.add_noise(x0, x_init, case.begin).unwrap()
        } else {
            x_init.affine(sched.init_noise_sigma(), 0.0).unwrap()
        };
        let mut scale = max_abs(&latents);
        for (i, &t) in ts.iter().enumerate().skip(case.begin) {
            let scaled = sched.scale_model_input(&latents, i).unwrap();
            let model_output = fake_model(&scaled, t).unwrap();
            latents = sched
                .step(&model_output, i, &latents, noise.as_mut())
                .unwrap_or_else(|e| panic!("{name}: step {i}: {e}"));
            let exp_i = expected.get(i - case.begin).unwrap();
            let e = max_abs_diff(&latents, &exp_i);
            scale = scale.max(max_abs(&exp_i));
            errs.sample = errs.sample.max(e);
            errs.sample_rel = errs.sample_rel.max(e / scale);
            case_abs = case_abs.max(e);
            case_rel = case_rel.max(e / scale);
            assert!(e <= sample_tolerance(scale), "{name}: step {i} differs by {e:e} (magnitude {scale})");
        }

        let expected = &tensors[&format!("{name}/add_noise")];
        for (j, &k) in case.add_noise_steps.iter().enumerate() {
            let got = sched.add_noise(x0, add_noise_eps, k).unwrap();
            let exp_j = expected.get(j).unwrap();
            let e = max_abs_diff(&got, &exp_j);
            errs.add_noise = errs.add_noise.max(e);
            assert!(e <= sample_tolerance(max_abs(&exp_j)), "{name}: add_noise at step {k} differs by {e:e}");
        }
        println!("  {name:28} max abs {case_abs:.2e}  rel to largest magnitude {case_rel:.2e}");
        errs.cases += 1;
    }
    assert!(errs.cases > 0, "no reference cases for {kind}");
    println!("{kind}: {errs:?}");
    errs
}
